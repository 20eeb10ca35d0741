"""Build the pinned test-bed binaries from Go modules into a cache.

Why wrapper modules: `go install k8s.io/kubernetes/cmd/...@vX` is refused
because k8s.io/kubernetes' go.mod replaces its 33 staging modules with local
paths. A wrapper module that requires k8s.io/kubernetes and replaces each
staging module with its published v0.Y.Z builds the real commands. etcd's
server module has the same problem; a three-line main calling etcdmain.Main
avoids it. kwok, kustomize, helm, sops, age and prometheus install directly.

sops (getsops/sops, decrypting SOPS-encrypted manifests at render time) and
age / age-keygen (filippo.io/age: the tests make keys and encrypt with
them, as a team does) are no part of a control plane, but the suite's SOPS
tests need them, so they are built with the rest.

Prometheus (the test bed's, for progressive-delivery gates): its Go module
versions are v0.<major*100+minor>.<patch> for release <major>.<minor>.<patch>
(v0.316.0 is 3.16.0, per the module's VERSION file; 2.x releases were
v0.<minor>.<patch>). Built with the tag
`remove_all_sd`, which drops the ~25 cloud service-discovery plugins
(static_configs is all we use), and without `builtinassets`, so the web UI is
not embedded (the module zip has no compiled UI anyway): the HTTP API is all
tests need. The version is stamped so /api/v1/status/buildinfo names it.

Gitea (the test bed's forge: real push webhooks and commit-status API for
the webhook and notifier tests) cannot be `go install`ed either: its go.mod
has replace directives, and from v1.27 it names itself `gitea.dev` while the
proxy serves it as code.gitea.io/gitea. So the module is downloaded (`go mod
download` checks it against the checksum database, sum.golang.org, as every
download is; its dependencies are checked against its go.sum), copied out
of the read-only module cache and built in place, with
CGO_ENABLED=0: v1.27 links the pure-Go modernc sqlite by default, no gcc. A
build without the `bindata` tag reads `options/` (locales: startup fails
without them) and `templates/` from disk at run time, so those two
directories are kept in `gitea-static/` beside the cache's bin/; the rest of
the copied source (about 50 MB) is removed after the build. The front-end
assets are not built: the API and git over http need none.

Every binary gets a `<name>.version` stamp beside it; a binary whose stamp
matches the pin is not rebuilt, so a warm `build` costs only a few stats.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KUBERNETES = "v1.37.2"
ETCD = "v3.7.3"
KWOK = "v0.8.0"
KUSTOMIZE = "v5.8.1"
HELM = "v3.22.0"
SOPS = "v3.13.3"
AGE = "v1.3.2"
PROMETHEUS = "v0.316.0"  # = Prometheus 3.16.0
PROMETHEUS_TAGS = "remove_all_sd"
GITEA = "v1.27.3"
GITEA_MODULE = "code.gitea.io/gitea"  # go.mod says gitea.dev from v1.27; the proxy serves this path
GITEA_STATIC = ("options", "templates")  # read from disk at run time (no bindata tag)

# The staging modules that k8s.io/kubernetes replaces with ./staging/src/...
# Each is published as v0.<minor>.<patch>.
STAGING = [
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime",
    "client-go", "cloud-provider", "cluster-bootstrap", "code-generator",
    "component-base", "component-helpers", "controller-manager", "cri-api",
    "cri-client", "cri-streaming", "csi-translation-lib",
    "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms",
    "kube-aggregator", "kube-controller-manager", "kube-proxy", "kube-scheduler",
    "kubectl", "kubelet", "metrics", "mount-utils", "pod-security-admission",
    "sample-apiserver", "sample-cli-plugin", "sample-controller", "streaming",
]

DOWNLOAD_ATTEMPTS = 4

# Built by `build` with the rest, so `make toolchain` (and CI) has them before
# the tests run, but no control plane needs them: `hack/cluster up` and
# all_built() leave them out; `hack/cluster prometheus up` builds Prometheus
# when it is missing, and the `gitea` test fixture fails with the build hint.
ON_DEMAND = ("prometheus", "gitea", "kubelet")

# Built only when named (`hack/cluster build --only kubelet`, or by
# `hack/cluster node up` when missing): a plain `build` (`make toolchain`)
# leaves them out. The kubelet is only for a real node (node.py); over an
# existing control-plane build it cost 62 s (13 s to rebuild).
EXPLICIT = ("kubelet",)

# KWOK Stage sets copied from its module: fast node start, lease heartbeats
# (without them the node-lifecycle controller marks nodes NotReady after 40 s
# and evicts every pod), fast pod lifecycle.
KWOK_STAGE_SETS = ("node/fast", "node/heartbeat-with-lease", "pod/fast")


def cache_dir() -> Path:
    """The cache root: $GITOPSD_CACHE, else ~/.cache/gitopsd."""
    return Path(os.environ.get("GITOPSD_CACHE") or Path.home() / ".cache" / "gitopsd")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def binary(name: str) -> Path:
    """Path of a built binary; raises a clear error when it is missing."""
    path = bin_dir() / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `hack/cluster build` first (it builds the "
            f"pinned control plane into {bin_dir()})"
        )
    return path


def kwok_stages_dir() -> Path:
    return cache_dir() / "kwok-stages"


def gitea_static_dir() -> Path:
    """Gitea's STATIC_ROOT_PATH: the `options/` and `templates/` of the pinned source."""
    return cache_dir() / "gitea-static"


@dataclass(frozen=True)
class Step:
    name: str          # binary name under bin/
    version: str       # stamp written beside it
    also: tuple[Path, ...] = ()  # other files the build leaves, all needed at run time


def _stamp(name: str) -> Path:
    return bin_dir() / f"{name}.version"


def is_built(step: Step) -> bool:
    stamp = _stamp(step.name)
    return ((bin_dir() / step.name).exists() and all(p.exists() for p in step.also)
            and stamp.exists() and stamp.read_text().strip() == step.version)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    env["CGO_ENABLED"] = "0"
    return env


def _run(cmd: list[str], *, cwd: Path | None = None, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); log {log}:\n{tail}")


def _run_with_retries(cmd: list[str], *, cwd: Path | None = None, log: Path, what: str) -> None:
    """Module downloads fail now and then on a busy proxy: retry with backoff."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            _run(cmd, cwd=cwd, log=log)
            return
        except RuntimeError as exc:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise RuntimeError(
                    f"downloading {what} failed {DOWNLOAD_ATTEMPTS} times; is the Go module "
                    f"proxy ({os.environ.get('GOPROXY', 'default')}) reachable?\n{exc}"
                ) from None
            delay = 5 * attempt
            print(f"  download of {what} failed (attempt {attempt}), retrying in {delay}s", flush=True)
            time.sleep(delay)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _kubernetes_wrapper() -> Path:
    src = cache_dir() / "src" / f"kubernetes-{KUBERNETES}"
    minor = KUBERNETES.lstrip("v").split(".", 1)[1]
    replaces = "\n".join(f"\tk8s.io/{m} => k8s.io/{m} v0.{minor}" for m in STAGING)
    _write(src / "go.mod", (
        "module gitopsd.local/kubernetes-build\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {KUBERNETES}\n\nreplace (\n{replaces}\n)\n"
    ))
    return src


def _etcd_wrapper() -> Path:
    src = cache_dir() / "src" / f"etcd-{ETCD}"
    _write(src / "go.mod", f"module gitopsd.local/etcd-build\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD}\n")
    _write(src / "main.go", (
        "// Command etcd runs etcd's own main; a wrapper because the server module\n"
        "// replaces its siblings with local paths and cannot be `go install`ed.\n"
        "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\n"
        "func main() { etcdmain.Main(os.Args) }\n"
    ))
    return src


def _kube_ldflags() -> str:
    major, minor, _ = KUBERNETES.lstrip("v").split(".")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build_kubernetes(names: list[str], log: Path) -> None:
    src = _kubernetes_wrapper()
    pkgs = [f"k8s.io/kubernetes/cmd/{n}" for n in names]
    _run_with_retries(["go", "get", *[f"{p}@{KUBERNETES}" for p in pkgs]], cwd=src, log=log,
                      what=f"k8s.io/kubernetes {KUBERNETES}")
    for name, pkg in zip(names, pkgs):
        _run(["go", "build", "-trimpath", "-ldflags", _kube_ldflags(), "-o", str(bin_dir() / name), pkg],
             cwd=src, log=log)


def _build_etcd(log: Path) -> None:
    src = _etcd_wrapper()
    _run_with_retries(["go", "mod", "tidy"], cwd=src, log=log, what=f"etcd {ETCD}")
    _run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir() / "etcd"), "."], cwd=src, log=log)


def _go_install(module_pkg: str, version: str, name: str, log: Path, *, tags: str = "",
                ldflags: str = "-s -w") -> None:
    env_bin = bin_dir()
    cmd = ["env", f"GOBIN={env_bin}", "go", "install", "-trimpath", *(["-tags", tags] if tags else []),
           "-ldflags", ldflags, f"{module_pkg}@{version}"]
    _run_with_retries(cmd, log=log, what=f"{module_pkg}@{version}")
    if not (env_bin / name).exists():
        raise RuntimeError(f"go install {module_pkg}@{version} produced no {name} in {env_bin}")


def _build_age(names: list[str], log: Path) -> None:
    for name in names:   # one module, two commands
        _go_install(f"filippo.io/age/cmd/{name}", AGE, name, log)


def prometheus_release() -> str:
    """The Prometheus release of the pinned module version: v0.316.0 -> 3.16.0."""
    _, minor, patch = PROMETHEUS.lstrip("v").split(".")
    return f"{int(minor) // 100}.{int(minor) % 100}.{patch}"


def _build_prometheus(_names: list[str], log: Path) -> None:
    ldflags = f"-s -w -X github.com/prometheus/common/version.Version={prometheus_release()}"
    _go_install("github.com/prometheus/prometheus/cmd/prometheus", PROMETHEUS, "prometheus", log,
                tags=PROMETHEUS_TAGS, ldflags=ldflags)


def _module_source(module: str, version: str, log: Path) -> Path:
    """Download a module's source (hash checked against the checksum database,
    as every download is) and return its read-only directory in GOMODCACHE."""
    _run_with_retries(["go", "mod", "download", f"{module}@{version}"], log=log, what=f"{module}@{version} source")
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, env=_go_env()).stdout.strip()
    return Path(modcache) / f"{module}@{version}"


def _copy_kwok_stages(log: Path) -> None:
    """KWOK ships Stage configs in its module; keep the sets we need."""
    root = _module_source("sigs.k8s.io/kwok", KWOK, log) / "kustomize" / "stage"
    dest = kwok_stages_dir()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for sub in KWOK_STAGE_SETS:
        for f in sorted((root / sub).glob("*.yaml")):
            if f.name == "kustomization.yaml":
                continue
            target = dest / f"{sub.replace('/', '-')}-{f.name}"
            target.write_text(f.read_text())
            target.chmod(0o644)


def _writable_copy(source: Path, *, dest: Path) -> Path:
    """Copy a module out of the (read-only) module cache so a build may write in it."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return dest


def _build_gitea(_names: list[str], log: Path) -> None:
    """Build Gitea in a copy of its module, keep its static dirs, drop the copy.

    `go list -deps` first fetches the modules the server's packages import
    (not the tools and test-only modules its go.mod lists too), with the
    retries a busy proxy needs; the build then finds them in the cache."""
    src = _writable_copy(_module_source(GITEA_MODULE, GITEA, log), dest=cache_dir() / "src" / f"gitea-{GITEA}")
    _run_with_retries(["go", "list", "-deps", "-f", "{{with .Module}}{{if not .Main}}{{.Path}}{{end}}{{end}}", "."],
                      cwd=src, log=log, what=f"gitea {GITEA} dependencies")
    ldflags = f"-s -w -X main.Version={GITEA.lstrip('v')}"
    _run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(bin_dir() / "gitea"), "."], cwd=src, log=log)
    static = gitea_static_dir()
    shutil.rmtree(static, ignore_errors=True)
    for sub in GITEA_STATIC:
        shutil.copytree(src / sub, static / sub)
    shutil.rmtree(src)


def steps() -> list[tuple[list[Step], Callable[[list[str], Path], None]]]:
    """Build steps in order: (binaries produced, build(names still to build, log))."""
    kube = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"]

    def kwok(_names: list[str], log: Path) -> None:
        _go_install("sigs.k8s.io/kwok/cmd/kwok", KWOK, "kwok", log)
        _copy_kwok_stages(log)

    return [
        ([Step("etcd", ETCD)], lambda _names, log: _build_etcd(log)),
        ([Step(n, KUBERNETES) for n in kube], _build_kubernetes),
        # A real node (node.py), on demand: the same wrapper module, so the
        # kubelet has the control plane's version and reuses most of its
        # compiled packages.
        ([Step("kubelet", KUBERNETES)], _build_kubernetes),
        # The stamp names the stage sets too, so changing them re-copies.
        ([Step("kwok", f"{KWOK} stages={','.join(KWOK_STAGE_SETS)}")], kwok),
        ([Step("kustomize", KUSTOMIZE)],
         lambda _names, log: _go_install("sigs.k8s.io/kustomize/kustomize/v5", KUSTOMIZE, "kustomize", log)),
        # Its full version stamped, as the Dockerfile does (a plain install says "v3.22", and
        # charts see that as .Capabilities.HelmVersion); the stamp's "+version" rebuilds an older one.
        ([Step("helm", f"{HELM}+version")], lambda _names, log: _go_install(
            "helm.sh/helm/v3/cmd/helm", HELM, "helm", log,
            ldflags=f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM}")),
        ([Step("sops", SOPS)],
         lambda _names, log: _go_install("github.com/getsops/sops/v3/cmd/sops", SOPS, "sops", log)),
        ([Step("age", AGE), Step("age-keygen", AGE)], _build_age),
        # The stamp names the tags too, so changing them rebuilds.
        ([Step("prometheus", f"{PROMETHEUS} tags={PROMETHEUS_TAGS}")], _build_prometheus),
        # Its static dirs are part of the build: a missing one rebuilds it.
        ([Step("gitea", GITEA, also=tuple(gitea_static_dir() / d for d in GITEA_STATIC))], _build_gitea),
    ]


def build(*, only: list[str] | None = None, skip: tuple[str, ...] = (), out=sys.stdout) -> float:
    """Build what is missing or stale (of `only`, default all; never `skip`); return total seconds spent."""
    bin_dir().mkdir(parents=True, exist_ok=True)
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    total_start = time.monotonic()
    plan = steps()
    for produced, fn in plan:
        names = [s.name for s in produced]
        if (only and not set(names) & set(only)) or set(names) & set(skip):
            continue
        if not only and set(names) & set(EXPLICIT):
            continue
        todo = [s for s in produced if not is_built(s)]
        label = ", ".join(names)
        if not todo:
            print(f"  {label}: {produced[0].version} already built", file=out, flush=True)
            continue
        log = logs / f"build-{names[0]}.log"
        log.write_text("")
        print(f"  {label}: building {produced[0].version} (log {log}) ...", file=out, flush=True)
        start = time.monotonic()
        fn([s.name for s in todo], log)
        for s in produced:
            _stamp(s.name).write_text(s.version + "\n")
        print(f"  {label}: built in {time.monotonic() - start:.0f}s", file=out, flush=True)
    elapsed = time.monotonic() - total_start
    print(f"build done in {elapsed:.0f}s; binaries in {bin_dir()}", file=out, flush=True)
    return elapsed


# ---------------------------------------------------------------- building while the tests run
#
# Gitea's cold build is ~12 minutes of the 2 cores, and only its own tests (the
# last ones, tests/conftest.py) need it. `make test` starts it in the
# background under nice 19 before pytest; the suite's first half leaves the
# cores idle often enough (its tests mostly wait on the control plane) that it
# is done long before its tests run, instead of adding its minutes to a cold CI
# run. The `gitea` fixture waits for it (wait_built); with no build running it
# builds in the foreground.


def _pid_file(name: str) -> Path:
    return cache_dir() / f"building-{name}.pid"


def start_background(names: list[str], *, out=sys.stdout) -> list[str]:
    """Start building `names` (those missing) in a detached, nice'd process; return what it builds."""
    todo = [n for n in missing(names) if not _building(n)]
    if not todo:
        return []
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / "build-background.log").open("w")
    cli = Path(__file__).resolve().parent.parent / "cluster"
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(cli), "build", "--only", *todo],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    for name in todo:
        _pid_file(name).write_text(f"{proc.pid}\n")
    print(f"  {', '.join(todo)}: building in the background (nice 19, pid {proc.pid}, log {log.name})",
          file=out, flush=True)
    return todo


def _building(name: str) -> bool:
    """Whether a background build of `name` is still running (a stale pid file is removed)."""
    path = _pid_file(name)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return False
    try:   # a pid reused by another process after the build ended: not ours
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if b"build" not in cmdline:
        path.unlink(missing_ok=True)
        return False
    return True


def wait_built(name: str, *, timeout: float = 3600.0, out=sys.stdout) -> None:
    """Return once `name` is built: wait for its background build, else build it here.

    Raises RuntimeError when the background build runs past `timeout` or ends
    without the binary (its log says why)."""
    deadline = time.monotonic() + timeout
    waited = False
    while _building(name):
        if not waited:
            print(f"  {name}: waiting for its background build", file=out, flush=True)
            waited = True
        if time.monotonic() > deadline:
            raise RuntimeError(f"the background build of {name} ran past {timeout:.0f}s")
        time.sleep(2)
    if missing([name]):
        if waited:
            raise RuntimeError(f"the background build of {name} ended without it: see "
                               f"{cache_dir() / 'logs' / 'build-background.log'}")
        build(only=[name], out=out)


def missing(names: list[str] | None = None) -> list[str]:
    """Binaries (of `names`, default all) not built at their pin."""
    return [s.name for produced, _ in steps() for s in produced
            if (names is None or s.name in names) and not is_built(s)]


def control_plane() -> list[str]:
    """The binaries a cluster (and the suite around it) needs: all but ON_DEMAND."""
    return [s.name for produced, _ in steps() for s in produced if s.name not in ON_DEMAND]


def all_built() -> bool:
    """True when every control-plane binary is built at its pin (ON_DEMAND aside)."""
    return not missing(control_plane())
