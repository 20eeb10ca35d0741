"""gitopsd's container image, built here: buildah and podman from Debian, no Docker engine, no registry.

The Dockerfile is the one users build with `docker build`; what changes here
is only where its bases come from, through its build arguments:

PYTHON_IMAGE  Base images cannot be pulled on these machines. `base()` makes
              one: a Debian bookworm root filesystem made by debootstrap
              (--variant=minbase) from the Debian mirror, with python3 (3.11,
              as the public python:3.11 base), python3-venv and
              ca-certificates, slimmed as Debian's slim images are (dpkg
              leaves out docs, man pages and locales, also for what the
              Dockerfile installs later; apt's lists and caches removed). It
              is packed as a tarball in the cache (image/base-*.tar, reused:
              debootstrap takes about a minute) and imported into the local
              image store as localhost/gitopsd-base:<key>, key naming the
              recipe. The tarball's sha256 is the base's identity, recorded
              in the built image's labels (there is no registry digest).
TOOLS         kustomize, helm and sops: the test bed's own builds (build.py,
              the Dockerfile's pins: tests check they agree), packed FROM
              scratch into localhost/gitopsd-tools:<pins> in /out, where the
              Dockerfile's own tools-from-source stage leaves them. The
              image renders with what CI renders with, and no Go toolchain
              image is needed.

`build()` runs `buildah bud` with chroot isolation and the host's network
(RUN steps fetch Debian packages and the locked PyPI wheels; the host's CA
bundle is mounted for them, read-only and left out of the image, for
machines whose egress re-signs TLS) and tags the result
localhost/gitopsd:<version> and localhost/gitopsd:inputs-<hash>. The hash
covers every input (the build context as .dockerignore admits it, the
Dockerfile, the base and tools image IDs): a build whose inputs have an
image already is skipped. `check()` inspects and runs the result; `save()`
writes it as a docker-archive tarball (what `ctr images import` and
`podman load` read).

Running containers here (`run_argv`): podman with runc. crun refuses this
VM's hybrid cgroup layout (v1 controllers, plus hugetlb on the v2 mount);
runc runs on the v1 hierarchies. The sessions lack CAP_SYS_RESOURCE, so the
rlimits podman asks for by default (above the hard limits) are refused:
run_argv passes limits the container may have.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import build

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("GITOPSD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Bump when the recipe below changes, so a cached base is made afresh.
BASE_RECIPE = "3"
# What Debian's slim images leave out (their /etc/dpkg/dpkg.cfg.d/docker).
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""
TOOLS = ("kustomize", "helm", "sops")
REPOSITORY = "localhost/gitopsd"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# conmon, which starts the container's process, runs here with this many processes at most.
CONMON_NPROC = 32768


class ImageError(RuntimeError):
    """The image could not be made; the message says which step and carries its output's tail."""


def image_dir() -> Path:
    return build.cache_dir() / "image"


def _run(cmd: list[str], *, what: str, log: Path | None = None, cwd: Path | None = None,
         input: bytes | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.decode(errors="replace")
    if log is not None:
        with log.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n{out}")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-25:])
        raise ImageError(f"{what} failed (`{' '.join(cmd[:3])} ...` exit {proc.returncode})"
                         + (f"; log {log}" if log else "") + f":\n{tail}")
    return out


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(f"{', '.join(missing)} not found: install Debian's packages buildah, podman and "
                         f"debootstrap (.ci/run does)")


def image_id(ref: str) -> str | None:
    proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ---------------------------------------------------------------- the base

def _base_key() -> str:
    recipe = json.dumps([BASE_RECIPE, DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES, DPKG_EXCLUDES])
    return f"{DEBIAN_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Base:
    ref: str          # localhost/gitopsd-base:<key>
    tarball: Path
    sha256: str       # of the tarball: the base's identity


def base(*, out=None) -> Base:
    """The Debian + python3 base image, made (debootstrap) or reused from the cache, in the image store."""
    _require("podman")
    say = (lambda m: print(m, file=out, flush=True)) if out else (lambda m: None)
    key = _base_key()
    ref = f"localhost/gitopsd-base:{key}"
    tarball = image_dir() / f"base-{key}.tar"
    if not tarball.exists():
        _require("debootstrap")
        image_dir().mkdir(parents=True, exist_ok=True)
        log = image_dir() / "base.log"
        log.write_text("")
        rootfs = image_dir() / f"rootfs-{key}"
        shutil.rmtree(rootfs, ignore_errors=True)
        started = time.monotonic()
        say(f"  base: debootstrap {DEBIAN_SUITE} from {DEBIAN_MIRROR} (log {log}) ...")
        try:
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE,
                  str(rootfs), DEBIAN_MIRROR], what="debootstrap", log=log)
            _slim(rootfs)
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", str(rootfs), "--numeric-owner", "--sort=name", "-cf", str(partial), "."],
                 what="packing the base", log=log)
            partial.rename(tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        say(f"  base: made in {time.monotonic() - started:.0f}s ({tarball.stat().st_size / 2**20:.0f} MiB)")
    digest = _sha256(tarball)
    if image_id(ref) is None:
        _run(["podman", "import", "--change", 'CMD ["/bin/bash"]',
              "--change", f"LABEL io.gitopsd.base.sha256={digest} io.gitopsd.base.suite={DEBIAN_SUITE}",
              str(tarball), ref], what="importing the base")
    return Base(ref=ref, tarball=tarball, sha256=digest)


def _slim(rootfs: Path) -> None:
    """What Debian's slim images drop, and dpkg told to keep dropping it for later installs."""
    excludes = rootfs / "etc" / "dpkg" / "dpkg.cfg.d" / "slim"
    excludes.parent.mkdir(parents=True, exist_ok=True)
    excludes.write_text(DPKG_EXCLUDES)
    for pattern in ("usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                    "usr/share/lintian/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/lib/apt/lists/*", "var/log/*.log", "var/log/apt/*"):
        for path in rootfs.glob(pattern):
            if path.name == "copyright":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# ---------------------------------------------------------------- the tools

def tools_ref() -> str:
    """Named by the binaries' bytes: a rebuild at another pin (or with other flags) is another image."""
    h = hashlib.sha256()
    for t in TOOLS:
        h.update(_sha256(build.binary(t)).encode())
    return f"localhost/gitopsd-tools:{h.hexdigest()[:12]}"


def tools() -> str:
    """kustomize, helm and sops from the test bed's cache, FROM scratch in /out; the image's ref."""
    _require("buildah")
    missing = build.missing(list(TOOLS))
    if missing:
        raise ImageError(f"{', '.join(missing)} not built: run `make toolchain` (hack/cluster build) first")
    ref = tools_ref()
    if image_id(ref) is None:
        container = _run(["buildah", "from", "scratch"], what="buildah from scratch").strip().splitlines()[-1]
        try:
            _run(["buildah", "copy", container, *[str(build.binary(t)) for t in TOOLS], "/out/"],
                 what="copying the tools")
            _run(["buildah", "commit", "--quiet", container, ref], what="committing the tools image")
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
    return ref


# ---------------------------------------------------------------- the image

def context_files() -> list[Path]:
    """The build context's files as .dockerignore admits them (this project's: `*`, then `!` entries)."""
    allowed, denied = [], []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "*":
            continue
        (allowed if line.startswith("!") else denied).append(line.lstrip("!").rstrip("/"))
    files = []
    for entry in allowed:
        path = ROOT / entry
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            rel = f.relative_to(ROOT)
            if any(rel.match(d) or any(part == "__pycache__" for part in rel.parts) for d in denied):
                continue
            files.append(f)
    return files


def inputs_hash(base_ref: str, tools: str) -> str:
    """Names every input of a build: the Dockerfile, the context's files (path and bytes), the base and tools images."""
    h = hashlib.sha256()
    for f in [DOCKERFILE, ROOT / ".dockerignore", *context_files()]:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for ref in (base_ref, tools):
        h.update((image_id(ref) or ref).encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Built:
    ref: str                 # localhost/gitopsd:inputs-<hash>
    version_ref: str         # localhost/gitopsd:<version>
    id: str
    size: int                # bytes, as the image store counts them
    seconds: float           # 0.0 when an image with these inputs existed
    base: Base
    tools: str
    reused: bool = False
    log: Path | None = None


def _version() -> str:
    import re

    text = (ROOT / "gitopsd" / "__init__.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def build_image(*, out=None) -> Built:
    """Build the Dockerfile with the local base and tools (or reuse the image of the same inputs)."""
    _require("buildah", "podman")
    say = (lambda m: print(m, file=out, flush=True)) if out else (lambda m: None)
    b = base(out=out)
    t = tools()
    digest = inputs_hash(b.ref, t)
    ref, version_ref = f"{REPOSITORY}:inputs-{digest}", f"{REPOSITORY}:{_version()}"
    started = time.monotonic()
    reused = image_id(ref) is not None
    log = image_dir() / "build.log"
    if not reused:
        image_dir().mkdir(parents=True, exist_ok=True)
        log.write_text("")
        say(f"  image: buildah bud (log {log}) ...")
        mounts = ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if HOST_CA_BUNDLE.exists() else []
        _run(["buildah", "bud", "--isolation", "chroot", "--network", "host", "--layers=false", *mounts,
              "--build-arg", f"PYTHON_IMAGE={b.ref}", "--build-arg", f"TOOLS={t}",
              "--label", f"io.gitopsd.base.sha256={b.sha256}", "--label", f"io.gitopsd.inputs={digest}",
              "-f", str(DOCKERFILE), "-t", ref, str(ROOT)], what="buildah bud", log=log)
    _run(["podman", "tag", ref, version_ref], what="tagging the image")
    info = json.loads(_run(["podman", "image", "inspect", ref], what="inspecting the image"))[0]
    seconds = 0.0 if reused else time.monotonic() - started
    say(f"  image: {ref} ({'reused' if reused else f'built in {seconds:.0f}s'}, {info['Size'] / 1e6:.0f} MB)")
    return Built(ref=ref, version_ref=version_ref, id=info["Id"], size=int(info["Size"]), seconds=seconds,
                 base=b, tools=t, reused=reused, log=None if reused else log)


# ---------------------------------------------------------------- running and checking it

def run_argv(*args: str) -> list[str]:
    """`podman run` as it works on these machines (runc; limits the container may have), then args."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], CONMON_NPROC)
    return ["podman", "--runtime", "runc", "run", "--ulimit", f"nofile={nofile}:{nofile}",
            "--ulimit", f"nproc={nproc}:{nproc}", *args]


@dataclass
class Checked:
    user: str
    size: int
    outputs: dict[str, str] = field(default_factory=dict)   # command -> first line it printed
    compilers: list[str] = field(default_factory=list)      # any found on PATH (should be none)


CHECKS = {
    "gitopsd --version": ["gitopsd", "--version"],
    "kustomize version": ["kustomize", "version"],
    "helm version": ["helm", "version", "--short"],
    "sops --version": ["sh", "-c", "SOPS_DISABLE_VERSION_CHECK=1 sops --version"],
    "git --version": ["git", "--version"],
    "ssh -V": ["sh", "-c", "ssh -V 2>&1"],
    "gpg --version": ["gpg", "--version"],
}


def check(ref: str) -> Checked:
    """Run the image's tools with a read-only root (tmpfs /tmp, as deploy/ mounts emptyDirs); what they say."""
    info = json.loads(_run(["podman", "image", "inspect", ref], what="inspecting the image"))[0]
    result = Checked(user=info["Config"].get("User", ""), size=int(info["Size"]))
    for name, cmd in CHECKS.items():
        out = _run(run_argv("--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",
                            "--entrypoint", cmd[0], ref, *cmd[1:]), what=f"`{name}` in the image")
        result.outputs[name] = out.strip().splitlines()[0] if out.strip() else ""
    found = _run(run_argv("--rm", "--read-only", "--network", "none", "--entrypoint", "sh", ref, "-c",
                          "for c in gcc cc g++ clang make go cargo; do command -v $c; done; true"),
                 what="looking for compilers")
    result.compilers = found.split()
    return result


def save(ref: str, path: Path) -> Path:
    """The image as a docker-archive tarball (`podman load`, `ctr images import`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _run(["podman", "save", "--format", "docker-archive", "-o", str(path), ref], what="podman save")
    with tarfile.open(path) as tar:   # a readable archive with a manifest, or an error here
        tar.getmember("manifest.json")
    return path
