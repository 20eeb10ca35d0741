"""gitopsd as deploy/ installs it, for the tests that deploy it as it ships.

kubectl and the rendered manifests; deploy/'s config pointed at a test remote
and its Deployment's flags; install and uninstall with what the sample apps
leave behind; the ServiceAccount's files as a pod has them; sample-repo/
seeded into a remote. Users: tests/test_deploy_incluster.py (the daemon as a
process seeing what a pod sees) and tests/test_image.py (the real image).
Both write the fixed namespaces gitopsd-system and web-*: they hold the
`sample_namespaces` lock (tests/conftest.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from helpers import GitRepo, wait_for

from gitopsd import audit
from gitopsd.daemon import status as status_mod

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACED = DEPLOY / "overlays" / "namespaced"
SAMPLE = ROOT / "sample-repo"
PLACEHOLDER_REPO = "https://git.example.com/fleet.git"
SYSTEM_NS = "gitopsd-system"
APP_NAMESPACES = ("web-dev", "web-staging", "web-production")


# ------------------------------------------------------------------ kubectl and the manifests

def kubectl(kubeconfig: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    from testbed import build as tb_build

    proc = subprocess.run([str(tb_build.binary("kubectl")), f"--kubeconfig={kubeconfig}", *args], input=stdin,
                          capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def rendered(kubeconfig: Path, path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(kubectl(kubeconfig, "kustomize", str(path)).stdout) if d]


def shipped_config(docs: list[dict], *, repo_url: str, apps: tuple[str, ...] | None = None) -> dict:
    """The config in a variant's gitopsd-config ConfigMap, pointed at `repo_url`."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gitopsd-config"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert {a["repo"] for a in config["apps"]} == {PLACEHOLDER_REPO}
    config["apps"] = [{**a, "repo": repo_url} for a in config["apps"] if apps is None or a["name"] in apps]
    return config


def deployment_flags(docs: list[dict]) -> tuple[str, ...]:
    """The Deployment's `gitopsd run` flags, less the two a test sets itself (--config, --log-format)."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args, flags = container["args"][1:], []
    while args:
        flag, args = args[0], args[1:]
        if flag in ("--config", "--log-format"):
            args = args[1:]
        else:
            flags.append(flag)
    return tuple(flags)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------ cluster state

def wait_gone(kube, names: tuple[str, ...], timeout: float = 120.0) -> None:
    nss = kube.resource("v1", "Namespace")
    wait_for(f"namespaces {', '.join(names)} gone", lambda: all(kube.get(nss, n) is None for n in names), timeout)


def remove_sample_apps(kube) -> None:
    """What the sample apps leave: their namespaces, their Events in `default`,
    and their parents, status and audit trail in gitopsd-system (plus the Leases)."""
    nss = kube.resource("v1", "Namespace")
    for ns in APP_NAMESPACES:
        kube.delete(nss, ns)
    events = kube.resource("events.k8s.io/v1", "Event")
    for ns in ("default", SYSTEM_NS):
        for event in kube.list(events, namespace=ns, label_selector=audit.AUDIT_APP_LABEL):
            kube.delete(events, event["metadata"]["name"], ns)
    if kube.get(nss, SYSTEM_NS) is not None:
        cms = kube.resource("v1", "ConfigMap")
        for selector in ("app.kubernetes.io/managed-by=gitopsd", audit.AUDIT_APP_LABEL):
            for cm in kube.list(cms, namespace=SYSTEM_NS, label_selector=selector):
                kube.delete(cms, cm["metadata"]["name"], SYSTEM_NS)
        leases = kube.resource("coordination.k8s.io/v1", "Lease")
        for lease in kube.list(leases, namespace=SYSTEM_NS):
            if lease["metadata"]["name"].startswith("gitopsd-"):
                kube.delete(leases, lease["metadata"]["name"], SYSTEM_NS)
    wait_gone(kube, APP_NAMESPACES)


def uninstall(kube, kubeconfig: Path) -> None:
    for variant in (NAMESPACED, DEPLOY):
        kubectl(kubeconfig, "delete", "-k", str(variant), "--ignore-not-found", "--wait=false")
    remove_sample_apps(kube)
    wait_gone(kube, (SYSTEM_NS,))


def install(kubeconfig: Path, variant: Path) -> str:
    return kubectl(kubeconfig, "apply", "-k", str(variant)).stdout



# ------------------------------------------------------------------ a pod's view

def service_account_files(kube, directory: Path) -> Path:
    """token (TokenRequest, as the kubelet asks for it) and ca.crt (kube-root-ca.crt), laid out as in a pod."""
    directory.mkdir(parents=True)
    review = kube.request("POST", f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/gitopsd/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 3600}})
    (directory / "token").write_text(review["status"]["token"])
    cms = kube.resource("v1", "ConfigMap")
    root_ca = wait_for("kube-root-ca.crt in gitopsd-system", lambda: kube.get(cms, "kube-root-ca.crt", SYSTEM_NS), 30)
    (directory / "ca.crt").write_text(root_ca["data"]["ca.crt"])
    (directory / "namespace").write_text(SYSTEM_NS)
    return directory


def seed(repo: GitRepo, *, tenant: bool = False) -> str:
    """Push sample-repo/ to the test's remote. `tenant`: without the overlays' Namespace
    objects, as a repo must be for the namespaced variant (it creates the namespaces)."""
    shutil.copytree(SAMPLE, repo.work, dirs_exist_ok=True)
    if tenant:
        for overlay in (repo.work / "apps" / "web" / "overlays").iterdir():
            kustomization = overlay / "kustomization.yaml"
            kustomization.write_text(kustomization.read_text().replace("  - namespace.yaml\n", ""))
            (overlay / "namespace.yaml").unlink()
    return repo.commit("sample repo" + (" (tenant)" if tenant else ""))


def app_status(kube, app: str) -> dict:
    (found,) = status_mod.read_all(kube, namespace=SYSTEM_NS, app=app) or [{}]
    return found


