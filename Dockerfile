# gitopsd's container image. Build: docker build -t gitopsd:0.1.0 .
# (deploy/README.md: building, loading into a cluster, what the image expects.)
# Without Docker or registry access: hack/image build (buildah, a Debian base
# made with debootstrap, the test bed's tools; hack/testbed/image.py).
#
# Stages, so the final image holds no compiler and no build tool:
#   python-build       the dependencies from requirements.lock (hashes checked)
#                      and the gitopsd wheel, in a venv
#   tools-from-source  kustomize, helm and sops, built from their Go modules
#                      (static, CGO off)
#   tools              where the final stage takes them from: TOOLS names a
#                      stage or an image holding them in /out (hack/image
#                      passes one made from the test bed's builds, same pins)
#   final              python + git + ssh client + gpg + the venv + the binaries
#
# The public bases are pinned by digest (the multi-arch index of the tag
# named before the @). The digests are the tags' as published on Docker Hub;
# refresh them with `skopeo inspect --format '{{.Digest}}' docker://IMAGE:TAG`
# where the registry can be reached (this project's build machines cannot).
# PYTHON_IMAGE may be any image with python3 (>= 3.11, with venv) at the
# same path in both stages that use it.
ARG PYTHON_IMAGE=python:3.11-slim-trixie@sha256:9534e5a8e315485d4061ed659af0fd78a284c015f9b73661b41d6bab25604534
ARG GO_IMAGE=golang:1.26-trixie@sha256:87ffdb09b6a2e29ff910748b745395e8a0299aa80b7c0551cdca9b55e3fd2b3e
ARG TOOLS=tools-from-source

# ---------------------------------------------------------------- python-build
FROM ${PYTHON_IMAGE} AS python-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY requirements.lock pyproject.toml README.md ./
COPY gitopsd ./gitopsd
# Every dependency, and the build backend, is the version and the file
# requirements.lock names (`make lock` writes it with uv from pyproject.toml):
# --require-hashes refuses anything else. Wheels only (--only-binary; orjson,
# pydantic-core, watchfiles and cel-expr-python ship manylinux wheels for
# CPython 3.11): nothing is compiled, no compiler is needed. The wheel is
# built with that locked setuptools (--no-build-isolation), which is then
# removed. pip writes the .pyc files at install time: the read-only image
# never needs to.
RUN python3 -m venv /opt/gitopsd/venv \
 && /opt/gitopsd/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r requirements.lock \
 && /opt/gitopsd/venv/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
 && /opt/gitopsd/venv/bin/pip install --no-deps /wheels/gitopsd-*.whl \
 && /opt/gitopsd/venv/bin/pip uninstall -y setuptools wheel \
 && /opt/gitopsd/venv/bin/pip check \
 && /opt/gitopsd/venv/bin/gitopsd --version

# ---------------------------------------------------------------- tools
FROM ${GO_IMAGE} AS tools-from-source
# The same pins as the test bed (hack/testbed/build.py KUSTOMIZE, HELM, SOPS):
# what CI renders (and decrypts) with is what the image renders with.
ARG KUSTOMIZE_VERSION=v5.8.1
ARG HELM_VERSION=v3.22.0
ARG SOPS_VERSION=v3.13.3
ENV CGO_ENABLED=0 \
    GOFLAGS=-trimpath \
    GOBIN=/out
# helm reads its own version from ldflags (a plain go install reports "v3.22"
# and charts see it as .Capabilities.HelmVersion): stamp the full one.
RUN go install -ldflags "-s -w" "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}" \
 && go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
      "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" \
 && go install -ldflags "-s -w" "github.com/getsops/sops/v3/cmd/sops@${SOPS_VERSION}" \
 && /out/kustomize version \
 && /out/helm version --short \
 && SOPS_DISABLE_VERSION_CHECK=1 /out/sops --version

# ---------------------------------------------------------------- tools
FROM ${TOOLS} AS tools

# ---------------------------------------------------------------- final
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gitopsd" \
      org.opencontainers.image.description="GitOps reconciliation daemon: Git commits in, converged Kubernetes cluster and an audit trail out" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# git for sources (GitPython drives the git binary), ssh for ssh:// remotes and
# ssh-keygen -Y verify (commit signatures), gpg for OpenPGP commit signatures
# (Debian's minimal gpg: import and verify, no agent, no dirmngr).
# Versions come with the pinned base image's Debian release; no recommends
# (no compilers, no perl docs), no package lists left behind.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client gpg ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/cache/gitopsd \
 && chown 65532:65532 /var/cache/gitopsd
COPY --from=python-build /opt/gitopsd/venv /opt/gitopsd/venv
COPY --from=tools /out/kustomize /out/helm /out/sops /usr/local/bin/
# Whichever way they came, they run here (static binaries) and say their version.
RUN kustomize version \
 && helm version --short \
 && SOPS_DISABLE_VERSION_CHECK=1 sops --version \
 && git --version
# Writable places only: /tmp (HOME: git and helm scratch, credential files)
# and $GITOPSD_CACHE (bare Git clones). The Deployment mounts both as
# emptyDir and keeps the root filesystem read-only.
ENV PATH=/opt/gitopsd/venv/bin:$PATH \
    GITOPSD_CACHE=/var/cache/gitopsd \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# gitopsd caps its malloc arenas itself (gitopsd/daemon/memory.py: mallopt before its first
# thread), so no MALLOC_ARENA_MAX is needed here, nor in deploy/.
# 65532: the conventional "nonroot" uid/gid of distroless images; numeric,
# so runAsNonRoot can verify it without an /etc/passwd entry.
USER 65532:65532
WORKDIR /tmp
# Webhooks, /metrics, /healthz, /readyz, /status.
EXPOSE 8080
ENTRYPOINT ["gitopsd"]
CMD ["run", "--config", "/etc/gitopsd/config.yaml"]
