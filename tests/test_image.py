"""The real image: the Dockerfile built with buildah, run with podman (hack/testbed/image.py).

No Docker engine and no registry: the base is a Debian root filesystem made
by debootstrap and imported as a local image, the tools are the test bed's
own builds at the Dockerfile's pins. The built image is checked (non-root,
read-only root, its tools and their versions, no compiler), then run as
deploy/'s Deployment would run it, against the session cluster: deploy/'s
ServiceAccount, RBAC and config, the account's token and the cluster's CA
mounted where a pod has them, a read-only root with /tmp on tmpfs and a
writable host directory for its cache dir, every capability dropped. It reconciles sample-repo/.

Marked `image`: the suite runs these last (tests/conftest.py), each with a
timeout of its own. A cold build (debootstrap, Debian packages and the locked
wheels fetched) takes a minute or two; a warm one is skipped by its inputs'
hash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid

import pytest
import yaml
from deployment import (APP_NAMESPACES, DEPLOY, SYSTEM_NS, app_status, deployment_flags, kubectl, rendered, seed,
                        service_account_files, shipped_config, uninstall, write_config)
from helpers import wait_for
from testbed import build as tb_build
from testbed import image as tb_image
from testbed import procs

import gitopsd

pytestmark = pytest.mark.image

NONROOT = 65532


@pytest.fixture(scope="module")
def built() -> tb_image.Built:
    try:
        return tb_image.build_image(out=sys.stderr)
    except tb_image.ImageError as exc:
        pytest.fail(f"the image could not be built: {exc}", pytrace=False)


def test_the_build_context_is_what_dockerignore_admits():
    files = {str(f.relative_to(tb_image.ROOT)) for f in tb_image.context_files()}
    assert {"pyproject.toml", "requirements.lock", "README.md", "gitopsd/__init__.py", "gitopsd/web/static/app.js",
            "gitopsd/schemas/sync-result.schema.json"} <= files
    assert not [f for f in files if f.startswith(("tests/", "hack/", "deploy/", "sample-repo/", ".git/"))
                or "__pycache__" in f or f.endswith(".pyc")]


@pytest.mark.timeout(1200)
def test_the_image_builds_with_buildah_on_a_debootstrap_base_and_runs_read_only_as_non_root(built, record_property):
    checked = tb_image.check(built.ref)   # every command with a read-only root and no network
    assert checked.user == f"{NONROOT}:{NONROOT}"
    assert checked.outputs["gitopsd --version"] == f"gitopsd {gitopsd.__version__}"
    assert checked.outputs["kustomize version"] == tb_build.KUSTOMIZE
    assert checked.outputs["helm version"] == tb_build.HELM
    assert checked.outputs["sops --version"] == f"sops {tb_build.SOPS.lstrip('v')}"
    assert checked.outputs["git --version"].startswith("git version ")
    assert checked.outputs["ssh -V"].startswith("OpenSSH_")
    assert checked.outputs["gpg --version"].startswith("gpg (GnuPG)")
    assert checked.compilers == []
    info = json.loads(subprocess.run(["podman", "image", "inspect", built.ref], capture_output=True,
                                     text=True, check=True).stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["io.gitopsd.base.sha256"] == built.base.sha256, "the base's tarball is named in the image"
    assert labels["org.opencontainers.image.version"] == gitopsd.__version__
    assert info["Config"]["Entrypoint"] == ["gitopsd"]
    record_property("image_size_mb", round(checked.size / 1e6))
    sys.stderr.write(f"\nimage {built.ref}: {checked.size / 1e6:.0f} MB, "
                     f"{'reused' if built.reused else f'built in {built.seconds:.0f}s'}\n")


def test_an_unchanged_tree_reuses_its_image(built):
    again = tb_image.build_image()
    assert again.reused and again.id == built.id and again.ref == built.ref


def test_the_saved_archive_loads_as_the_same_image(built, tmp_path):
    archive = tb_image.save(built.ref, tmp_path / "gitopsd.tar")
    out = subprocess.run(["podman", "load", "-i", str(archive)], capture_output=True, text=True, check=True).stdout
    assert built.id.removeprefix("sha256:")[:12] in out or built.ref in out, out


# ------------------------------------------------------------------ the container in the cluster

class Container:
    """A detached podman container; its JSON log lines read back with `podman logs`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        proc = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
        return proc.stdout + proc.stderr

    def events(self) -> list[dict]:
        found = []
        for line in self.logs().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def running(self) -> bool:
        proc = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", self.name],
                              capture_output=True, text=True)
        return proc.stdout.strip() == "true"

    def wait_event(self, match, what: str, timeout: float = 120.0) -> dict:
        def found():
            if not self.running():
                raise AssertionError(f"the container stopped while waiting for {what}:\n{self.logs()[-3000:]}")
            return next((e for e in self.events() if match(e)), None)
        try:
            return wait_for(what, found, timeout, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncontainer log (tail):\n{self.logs()[-3000:]}") from None

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "10", self.name], capture_output=True)


@pytest.fixture
def installed(sample_namespaces, kube, kubeconfig):
    """deploy/ applied without its Deployment: the container below is the replica (on KWOK's
    fake nodes a pod would only be pretended). Everything removed afterwards."""
    uninstall(kube, kubeconfig)
    docs = rendered(kubeconfig, DEPLOY)
    kept = [d for d in docs if d["kind"] not in ("Deployment", "PodDisruptionBudget")]
    kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(kept))
    yield docs
    uninstall(kube, kubeconfig)


@pytest.mark.timeout(900)
def test_the_container_reconciles_sample_repo_with_a_mounted_service_account_token(
        built, cluster, kube, installed, repo, tmp_path):
    sha = seed(repo)
    # The remote, mounted read-only; owned by the image's user, as git wants a repository it reads.
    fleet = tmp_path / "fleet.git"
    shutil.copytree(repo.bare, fleet)
    for path in [fleet, *fleet.rglob("*")]:
        shutil.chown(path, NONROOT, NONROOT)
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    write_config(config_dir / "config.yaml", shipped_config(installed, repo_url="file:///fleet.git"))
    sa = service_account_files(kube, tmp_path / "serviceaccount")
    # The pod's emptyDir for the cache: a host directory the image's user owns (as fsGroup makes it).
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.chown(cache, NONROOT, NONROOT)
    port = procs.free_port()
    container = Container(f"gitopsd-test-{uuid.uuid4().hex[:8]}")
    argv = tb_image.run_argv(
        "-d", "--name", container.name, "--hostname", container.name, "--network", "host",
        # What deploy/'s Deployment asks of the pod: a read-only root, writable /tmp and cache,
        # no capability, no privilege escalation, the nonroot user.
        "--read-only", "--tmpfs", "/tmp:rw,mode=1777", "-v", f"{cache}:/var/cache/gitopsd",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", f"{NONROOT}:{NONROOT}",
        "-v", f"{sa}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
        "-v", f"{config_dir}:/etc/gitopsd:ro", "-v", f"{fleet}:/fleet.git:ro",
        "-e", "KUBERNETES_SERVICE_HOST=127.0.0.1", "-e", f"KUBERNETES_SERVICE_PORT={cluster.ports['apiserver']}",
        "-e", f"GITOPSD_NAMESPACE={SYSTEM_NS}", "-e", f"GITOPSD_HTTP_PORT={port}",
        "-e", "GITOPSD_HTTP_ADDRESS=127.0.0.1",
        built.ref, "run", "--config", "/etc/gitopsd/config.yaml", "--log-format", "json",
        *deployment_flags(installed))
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, f"podman run failed: {proc.stderr}"
    try:
        for app in APP_NAMESPACES:
            line = container.wait_event(lambda e, a=app: e.get("event") == "audit" and e.get("app") == a
                                        and e.get("result") == "Applied", f"audit line {app} Applied")
            assert line["revision"] == sha and not line["errors"]
        web = kube.get(kube.resource("apps/v1", "Deployment"), "web", "web-dev")
        assert web is not None and web["metadata"]["labels"]["app.kubernetes.io/name"] == "web"
        wait_for("status web-dev", lambda: app_status(kube, "web-dev").get("result") == "Applied", 30)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for("/readyz from the container", ready, 60)
        def shards() -> list[str] | None:   # the only replica takes every shard, one after another
            leases = {x["metadata"]["name"]: x["spec"].get("holderIdentity") or ""
                      for x in kube.list(kube.resource("coordination.k8s.io/v1", "Lease"), namespace=SYSTEM_NS)}
            held = [h for name, h in leases.items() if name.startswith("gitopsd-shard-")]
            return held if len(held) == 4 and all(held) else None
        assert all(h.startswith(container.name) for h in wait_for("all 4 shards held", shards, 30))
        # All of it with a read-only root: nothing failed for want of a writable path, nothing was refused.
        readonly = subprocess.run(["podman", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container.name],
                                  capture_output=True, text=True).stdout.strip()
        assert readonly == "true"
        refused = [e for e in container.events() if "forbidden" in str(e).lower() or "read-only" in str(e).lower()]
        assert not refused, refused
    finally:
        container.remove()


# ------------------------------------------------------------------ the pod on a real kubelet

REAL_NODE_OVERLAY = tb_image.ROOT / "hack" / "testbed" / "overlays" / "real-node"
GIT_USER, GIT_TOKEN = "deploy", "real-node-fleet-token"


def _pods(kube) -> list[dict]:
    pods = kube.list(kube.resource("v1", "Pod"), namespace=SYSTEM_NS, label_selector="app.kubernetes.io/name=gitopsd")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])


def _shard_holders(kube) -> dict[str, str]:
    leases = kube.list(kube.resource("coordination.k8s.io/v1", "Lease"), namespace=SYSTEM_NS)
    return {x["metadata"]["name"]: x["spec"].get("holderIdentity") or ""
            for x in leases if x["metadata"]["name"].startswith("gitopsd-shard-")}


@pytest.mark.timeout(1200)
def test_deploy_runs_as_real_pods_that_reconcile_sample_repo_and_survive_a_deleted_pod(
        built, cluster, kube, kubeconfig, sample_namespaces, real_node, repo, tmp_path):
    """`kubectl apply -k` of deploy/ (through hack/testbed/overlays/real-node) on a real kubelet:
    the image imported into the node's containerd, both replicas Ready through their probes, the
    apps reconciled from a Git remote the pods reach over the pod network with a token from a
    Secret, the audit lines in `kubectl logs`, and a deleted pod's shards taken over by the live
    replicas while the Deployment brings a new pod up; a push after that is applied."""
    from gitserver import GitHTTPServer
    from testbed import node as tb_node

    uninstall(kube, kubeconfig)
    archive = tb_image.save(built.ref, tmp_path / "gitopsd.tar")
    assert "localhost/gitopsd:0.1.0" in tb_node.import_image(cluster.name, archive, name="localhost/gitopsd:0.1.0")

    sha = seed(repo)
    server = GitHTTPServer(root=repo.bare.parent, username=GIT_USER, token=GIT_TOKEN).start()
    try:
        host, port = tb_node.expose(cluster.name, server.port)
        url = f"http://{host}:{port}/{repo.bare.name}"
        overlay = tmp_path / "overlay"
        overlay.mkdir()
        config = shipped_config(rendered(kubeconfig, REAL_NODE_OVERLAY), repo_url=url)
        for entry in config["apps"]:
            entry.update(credentials={"secretRef": {"name": "fleet-git"}}, interval="10s")
        write_config(overlay / "config.yaml", config)
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(REAL_NODE_OVERLAY, overlay)],
            "configMapGenerator": [{"name": "gitopsd-config", "namespace": SYSTEM_NS, "behavior": "replace",
                                    "files": ["config.yaml"], "options": {"disableNameSuffixHash": True}}],
        }))
        kubectl(kubeconfig, "apply", "-k", str(overlay))
        kubectl(kubeconfig, "-n", SYSTEM_NS, "create", "secret", "generic", "fleet-git",
                f"--from-literal=username={GIT_USER}", f"--from-literal=token={GIT_TOKEN}")

        # Both replicas Ready on the real node: the kubelet's probes of /readyz passed.
        pods = wait_for("two gitopsd pods Ready", lambda: (lambda ps: ps if len(ps) == 2 and all(map(_ready, ps))
                                                            else None)(_pods(kube)), 300)
        assert {p["spec"]["nodeName"] for p in pods} == {real_node.name}
        assert all(not p["spec"].get("hostNetwork") for p in pods)
        for app in APP_NAMESPACES:
            wait_for(f"{app} Applied at the pushed commit", lambda a=app: app_status(kube, a).get("revision") == sha
                     and app_status(kube, a).get("result") == "Applied", 180)
        assert any(h.startswith("Basic ") for h in server.auth_headers), "fetched with the Secret's token"

        # The audit lines are in the pods' logs, read through the apiserver and the kubelet.
        def audited() -> set[str]:
            found = set()
            for pod in _pods(kube):
                out = kubectl(kubeconfig, "-n", SYSTEM_NS, "logs", pod["metadata"]["name"], check=False).stdout
                for line in out.splitlines():
                    if '"event": "audit"' in line and '"result": "Applied"' in line:
                        found.add(json.loads(line)["app"])
            return found if found >= set(APP_NAMESPACES) else None
        wait_for("an Applied audit line for every app in kubectl logs", audited, 60)
        assert GIT_TOKEN not in "".join(kubectl(kubeconfig, "-n", SYSTEM_NS, "logs", p["metadata"]["name"]).stdout
                                        for p in _pods(kube))

        # Failover: delete the pod holding shard 0; the other replica takes its shards.
        holders = wait_for("every shard held", lambda: (lambda h: h if len(h) == 4 and all(h.values()) else None)(
            _shard_holders(kube)), 60)
        victim = next(p["metadata"]["name"] for p in pods if holders["gitopsd-shard-0-of-4"].startswith(
            p["metadata"]["name"]))
        survivor = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"] != victim)
        kubectl(kubeconfig, "-n", SYSTEM_NS, "delete", "pod", victim, "--wait=false")
        # Its shards go to the live replicas: the survivor, or the new pod once it has joined.
        wait_for("every shard held by a live replica", lambda: (lambda h: len(h) == 4 and all(
            v and not v.startswith(victim) for v in h.values()))(_shard_holders(kube)), 120)
        replacement = wait_for("a new pod Ready", lambda: [p for p in _pods(kube) if _ready(p) and
                                                          p["metadata"]["name"] not in (victim, survivor)] or None, 300)
        assert replacement[0]["spec"]["nodeName"] == real_node.name

        # Still reconciling: a push after the failover is applied.
        (repo.work / "apps" / "web" / "overlays" / "dev" / "after-failover.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after-failover"}, "data": {"ok": "yes"}}))
        kustomization = repo.work / "apps" / "web" / "overlays" / "dev" / "kustomization.yaml"
        text = kustomization.read_text()
        assert "resources:\n" in text
        kustomization.write_text(text.replace("resources:\n", "resources:\n  - after-failover.yaml\n", 1))
        pushed = repo.commit("after the failover")
        wait_for("web-dev Applied at the push after the failover",
                 lambda: app_status(kube, "web-dev").get("revision") == pushed, 120)
        assert kube.get(kube.resource("v1", "ConfigMap"), "after-failover", "web-dev")["data"] == {"ok": "yes"}
    finally:
        server.stop()
        uninstall(kube, kubeconfig)
