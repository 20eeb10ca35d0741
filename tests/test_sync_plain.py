"""Syncing a plain directory of manifests, and the no-op re-sync."""

from __future__ import annotations

import pytest
from helpers import configmap, deployment, gitopsd_json

pytestmark = pytest.mark.cluster


def test_plain_directory_sync_creates_every_object(app, repo, kube, namespace):
    repo.write("config/settings.yaml", configmap("settings", {"color": "blue"}))
    repo.write("apps/web.yaml", [deployment("web", replicas=2), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}])
    sha = repo.commit("first")

    result = app.sync()

    assert result.outcome.value == "Applied", result.errors
    assert result.revision.sha == sha
    assert sorted(str(c.ref) for c in result.applied) == sorted([
        f"ConfigMap/{namespace}/settings", f"Deployment.apps/{namespace}/web", f"Service/{namespace}/web"])
    dep = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["labels"]["applyset.kubernetes.io/part-of"].startswith("applyset-")
    assert {h.status.value for h in result.health} == {"Current"}, "the sync waited for health"


def test_second_sync_of_an_unchanged_commit_makes_zero_writes(app, repo, kube, namespace):
    repo.write("all.yaml", [configmap(f"cm-{i}", {"i": str(i)}) for i in range(20)] + [deployment("web")])
    repo.commit("twenty configmaps and a deployment")
    assert app.sync().outcome.value == "Applied"
    cms = kube.resource("v1", "ConfigMap")
    before = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in kube.list(cms, namespace=namespace)}

    kube.requests.clear()
    result = app.sync()

    assert result.outcome.value == "NoChange", result.reason
    writes = {verb: n for verb, n in kube.requests.items() if verb in ("apply", "post", "put", "delete")}
    assert writes == {}, f"a no-op sync wrote: {writes}"
    assert kube.requests.get("apply-dry-run", 0) == 0, \
        "unchanged members are proven unchanged by field ownership, without a dry-run each"
    after = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in kube.list(cms, namespace=namespace)}
    assert after == before


def test_diff_exit_codes_follow_kubectl_diff(repo, kubeconfig, source_cache, namespace):
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    args = ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)

    code, report = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=1)
    assert report["counts"]["create"] == 1 and report["in_sync"] is False

    gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    code, report = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    assert report["counts"]["unchanged"] == 1 and report["in_sync"] is True

    code, report = gitopsd_json("diff", "--repo", "file:///nonexistent/repo.git", "--namespace", namespace,
                                kubeconfig=kubeconfig, cache=source_cache, expect=2)
    assert "nonexistent" in report["error"]


def test_kubeconfig_flag_wins_over_the_environment(repo, kubeconfig, source_cache, namespace, tmp_path):
    import os
    import subprocess
    import sys

    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"), "GITOPSD_CACHE": str(source_cache)}
    args = [sys.executable, "-m", "gitopsd", "diff", "--repo", repo.url, "--ref", "main", "--namespace", namespace,
            "--app", namespace, "--inventory-namespace", namespace]

    broken = subprocess.run(args, env=env, capture_output=True, text=True)
    assert broken.returncode == 2 and "no-such-kubeconfig" in broken.stdout

    flagged = subprocess.run(args + ["--kubeconfig", str(kubeconfig)], env=env, capture_output=True, text=True)
    assert flagged.returncode == 1, flagged.stdout + flagged.stderr   # drift: the ConfigMap is not there yet


def test_a_long_sync_shows_progress_on_a_terminal(repo, kubeconfig, source_cache, namespace):
    import os
    import pty
    import subprocess
    import sys

    repo.write("all.yaml", [configmap(f"cm-{i}", {"i": str(i)}) for i in range(30)])
    repo.commit()
    controller, terminal = pty.openpty()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GITOPSD_CACHE": str(source_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "gitopsd", "sync", "--repo", repo.url, "--ref", "main",
                             "--namespace", namespace, "--app", namespace, "--inventory-namespace", namespace],
                            env=env, stdin=terminal, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    assert "30 written: create ConfigMap/" in text, text[-500:]
