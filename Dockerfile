# gitopsd's container image. Build: docker build -t gitopsd:0.1.0 .
# (deploy/README.md: building, loading into a cluster, what the image expects.)
#
# Three stages, so the final image holds no compiler and no build tool:
#   python-build  the gitopsd wheel, installed with its dependencies in a venv
#   tools         kustomize, helm and sops, built from their Go modules (static, CGO off)
#   final         python slim + git + ssh client + gpg + the venv + the binaries
#
# Base images are pinned by tag. For a release, pin them by digest as well
# (FROM python:3.11-slim-trixie@sha256:...), so a rebuild is byte-for-byte
# the same base; the tags here are what the digests should be taken from.
ARG PYTHON_IMAGE=python:3.11-slim-trixie
ARG GO_IMAGE=golang:1.26-trixie

# ---------------------------------------------------------------- python-build
FROM ${PYTHON_IMAGE} AS python-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY pyproject.toml README.md ./
COPY gitopsd ./gitopsd
# Dependencies come as wheels only (--only-binary; orjson and watchfiles ship
# manylinux wheels for CPython 3.11): nothing is compiled, no compiler is
# needed. pip writes the .pyc files at install time: the read-only image
# never needs to.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/gitopsd/venv \
 && /opt/gitopsd/venv/bin/pip install --only-binary=:all: /wheels/gitopsd-*.whl \
 && /opt/gitopsd/venv/bin/gitopsd --version

# ---------------------------------------------------------------- tools
FROM ${GO_IMAGE} AS tools
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
