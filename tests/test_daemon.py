"""`gitopsd run` against the real control plane: triggers, self-heal, reload, health endpoints."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from helpers import (
    SECRET,
    app_entry,
    blue_app_running,
    cm_data,
    configmap,
    deployment,
    post_generic,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.cluster


def test_commit_plus_webhook_is_applied_within_two_seconds(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon,
                              "hooked", "--no-watch-local", "--no-leader-elect")

    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    started = time.monotonic()
    code, body = post_generic(daemon, repo.url, sha)
    assert code == 202 and json.loads(body)["triggered"] == ["hooked"]
    wait_for("webhook-triggered apply", lambda: cm_data(kube, namespace, "settings") == {"color": "green"}, 10,
             interval=0.02)
    assert time.monotonic() - started < 2.0


def test_bad_webhook_signature_is_refused_and_never_reconciles(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon,
                              "hooked", "--no-watch-local", "--no-leader-elect")

    repo.write("cm.yaml", configmap("settings", {"color": "red"}))
    sha = repo.commit("red")
    code, _ = post_generic(daemon, repo.url, sha, secret="wrong-secret")
    assert code == 401
    body = json.dumps({"repo": repo.url, "ref": "main"}).encode()
    assert daemon.post("/hooks/generic", body, {})[0] == 401
    time.sleep(2)
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}
    refused = [e for e in daemon.events() if "refused" in e.get("event", "")]
    assert refused, "a refused webhook leaves a log line"
    assert SECRET not in daemon.log_path.read_text()


def test_hand_scale_is_reverted_within_two_seconds_naming_the_manager(repo, kube, namespace, tmp_path,
                                                                       start_daemon, kubeconfig, cluster):
    repo.write("web.yaml", deployment("web", replicas=2))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("healer", repo.url, namespace)])
    daemon = start_daemon(cfg, "--no-leader-elect")
    deps = kube.resource("apps/v1", "Deployment")
    wait_for("first sync", lambda: (kube.get(deps, "web", namespace) or {}).get("spec", {}).get("replicas") == 2, 30)
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied", "first audit", 30)

    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    started = time.monotonic()
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "scale", "deployment/web",
                    "--replicas=5"], check=True, capture_output=True)
    wait_for("self-heal", lambda: kube.get(deps, "web", namespace)["spec"]["replicas"] == 2, 10, interval=0.02)
    assert time.monotonic() - started < 2.0

    drift = daemon.wait_event(lambda e: e.get("event") == "drift corrected", "drift report", 10)
    assert drift["object"] == f"Deployment.apps/{namespace}/web"
    assert "spec.replicas" in drift["fields"]
    assert any("kubectl" in m for m in drift["managers"]), drift["managers"]


def test_deleted_managed_object_is_recreated(repo, kube, namespace, tmp_path, start_daemon):
    blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "healer", "--no-leader-elect")

    kube.delete(kube.resource("v1", "ConfigMap"), "settings", namespace)
    wait_for("recreated", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 10, interval=0.05)


def test_self_heal_off_reports_drift_without_reverting(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon,
                              "watcher", "--no-leader-elect", selfHeal=False)

    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = "hand-painted"
    kube.request("PUT", cms.path(namespace, "settings"), body=live)

    report = daemon.wait_event(lambda e: e.get("event") == "drift detected", "drift report", 10)
    assert report["action"] == "reported" and "data.color" in report["fields"]
    time.sleep(1.5)
    assert cm_data(kube, namespace, "settings") == {"color": "hand-painted"}

    # A new commit is still deployed.
    repo.write("cm.yaml", configmap("settings", {"color": "teal"}))
    sha = repo.commit("teal")
    post_generic(daemon, repo.url, sha)
    wait_for("new commit applied", lambda: cm_data(kube, namespace, "settings") == {"color": "teal"}, 10)


def test_config_edit_adds_and_removes_an_app_live(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("a/cm.yaml", configmap("from-a", {"k": "a"}))
    repo.write("b/cm.yaml", configmap("from-b", {"k": "b"}))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("app-a", repo.url, namespace, path="a")])
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_for("app-a synced", lambda: cm_data(kube, namespace, "from-a") is not None, 30)

    write_config(cfg, [app_entry("app-a", repo.url, namespace, path="a"),
                       app_entry("app-b", repo.url, namespace, path="b")])
    wait_for("app-b added live", lambda: cm_data(kube, namespace, "from-b") is not None, 10)

    write_config(cfg, [app_entry("app-b", repo.url, namespace, path="b")])
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("removed") == ["app-a"],
                      "app-a removed", 10)
    code, body = daemon.get("/status")
    assert [a["app"] for a in json.loads(body)["apps"]] == ["app-b"]


def test_invalid_config_edit_is_rejected_and_old_apps_keep_running(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "steady", "--no-leader-elect")

    (tmp_path / "config.yaml").write_text("apps:\n  - name: steady\n    repo: " + repo.url + "\n    interval: soon\n")
    rejected = daemon.wait_event(lambda e: e.get("event", "").startswith("config change rejected"), "rejection", 10)
    assert "interval" in rejected["error"]

    repo.write("cm.yaml", configmap("settings", {"color": "violet"}))
    sha = repo.commit("violet")
    assert post_generic(daemon, repo.url, sha)[0] == 202
    wait_for("old app still reconciles", lambda: cm_data(kube, namespace, "settings") == {"color": "violet"}, 10)


def test_failing_app_does_not_delay_a_healthy_one(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("good/cm.yaml", configmap("good", {"k": "v"}))
    stuck = deployment("stuck")
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    repo.write("slow/stuck.yaml", stuck)
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [
        app_entry("broken", "file:///nonexistent/repo.git", namespace),
        app_entry("slow", repo.url, namespace, path="slow", timeout="2m"),
        app_entry("healthy", repo.url, namespace, path="good"),
    ])
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_for("healthy app synced", lambda: cm_data(kube, namespace, "good") is not None, 15)
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("app") == "broken"
                      and e.get("result") == "Failed", "broken app failed", 15)

    repo.write("good/cm.yaml", configmap("good", {"k": "v2"}))
    sha = repo.commit("v2")
    started = time.monotonic()
    post_generic(daemon, repo.url, sha)
    wait_for("healthy app updated while slow waits", lambda: cm_data(kube, namespace, "good") == {"k": "v2"}, 10,
             interval=0.05)
    assert time.monotonic() - started < 3


def test_health_endpoints_and_metrics(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "metered", "--no-leader-elect")
    daemon.wait_event(lambda e: e.get("event") == "audit", "audit line", 10)

    assert daemon.get("/healthz")[0] == 200
    assert daemon.get("/readyz")[0] == 200
    code, text = daemon.get("/metrics")
    assert code == 200
    for name in ("gitopsd_reconcile_duration_seconds_bucket", 'gitopsd_reconcile_total{app="metered"',
                 "gitopsd_last_applied_revision_info", "gitopsd_apiserver_requests_total"):
        assert name in text, name
    status = json.loads(daemon.get("/status")[1])
    (app,) = status["apps"]
    assert app["result"] == "Applied" and app["nextRun"]


def test_gitopsd_status_shows_the_stored_status(repo, kube, namespace, tmp_path, start_daemon, kubeconfig,
                                                source_cache):
    from helpers import gitopsd

    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    sha = repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("shown", repo.url, namespace)])
    start_daemon(cfg, "--no-leader-elect")
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)

    def stored():
        proc = gitopsd("status", "--namespace", namespace, "-o", "json", kubeconfig=kubeconfig, cache=source_cache)
        data = json.loads(proc.stdout) if proc.returncode == 0 else []
        return data[0] if data and data[0].get("revision") == sha else None

    row = wait_for("stored status", stored, 10)
    assert row["app"] == "shown" and row["result"] == "Applied" and row["health"] == "Healthy"
    text = gitopsd("status", "shown", "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert "shown" in text.stdout and sha[:12] in text.stdout


def test_new_commit_cancels_a_running_health_wait_and_deploys_at_once(repo, kube, namespace, tmp_path,
                                                                       start_daemon):
    stuck = deployment("web")
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    repo.write("web.yaml", stuck)
    repo.commit("a rollout that never becomes ready")
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("rolling", repo.url, namespace, timeout="5m")])
    daemon = start_daemon(cfg, "--no-leader-elect", "--no-watch-local")
    deps = kube.resource("apps/v1", "Deployment")
    wait_for("stuck rollout applied", lambda: kube.get(deps, "web", namespace) is not None, 30)
    time.sleep(1)  # the daemon is now waiting on health (for up to 5 minutes)

    fixed = deployment("web")
    repo.write("web.yaml", fixed)
    sha = repo.commit("fix the rollout")
    started = time.monotonic()
    post_generic(daemon, repo.url, sha)

    def fixed_applied():
        spec = kube.get(deps, "web", namespace)["spec"]["template"]["spec"]
        return "nodeSelector" not in spec
    wait_for("the fix deployed without waiting for the old rollout", fixed_applied, 10, interval=0.05)
    assert time.monotonic() - started < 2.0
    first = daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Unhealthy",
                              "the cancelled wait recorded", 10)
    assert "cancelled" in json.dumps(first)
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied"
                      and e.get("revision") == sha, "the fix recorded as Applied", 30)


def test_commit_to_a_local_repository_reconciles_within_a_second(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("local", repo.url, namespace)])
    start_daemon(cfg, "--no-leader-elect")   # --watch-local is the default
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    time.sleep(1)

    repo.write("cm.yaml", configmap("settings", {"color": "amber"}))
    started = time.monotonic()
    repo.commit("amber")   # pushes to the local bare repository; no webhook
    wait_for("local commit applied", lambda: cm_data(kube, namespace, "settings") == {"color": "amber"}, 10,
             interval=0.02)
    assert time.monotonic() - started < 1.5


def test_self_heal_off_reports_a_lasting_drift_once_not_at_every_poll(repo, kube, namespace, tmp_path,
                                                                      start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon,
                              "watcher", "--no-leader-elect", "--no-watch-local", selfHeal=False, interval="5s")

    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = "hand-painted"
    kube.request("PUT", cms.path(namespace, "settings"), body=live)
    daemon.wait_event(lambda e: e.get("event") == "drift detected", "drift report", 10)
    time.sleep(12)   # two or more polls of an unchanged, still drifted app

    reports = [e for e in daemon.events() if e.get("event") == "drift detected"]
    assert len(reports) == 1, [r.get("fields") for r in reports]
    assert cm_data(kube, namespace, "settings") == {"color": "hand-painted"}


def test_an_unhealthy_verdict_stands_until_the_rollout_recovers(repo, kube, namespace, tmp_path, start_daemon):
    label = f"gitopsd.io/pool-{namespace[-5:]}"
    stuck = deployment("web")
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {label: "yes"}
    repo.write("web.yaml", stuck)
    repo.commit()
    config = write_config(tmp_path / "config.yaml",
                          [app_entry("slow", repo.url, namespace, interval="5s", timeout="3s")])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Unhealthy", "Unhealthy", 30)
    time.sleep(6)   # a steady poll does not turn the verdict into Healthy
    assert json.loads(daemon.get("/status")[1])["apps"][0]["health"] == "Unhealthy"

    nodes = kube.resource("v1", "Node")
    node = kube.list(nodes)[0]["metadata"]["name"]
    patch = {"metadata": {"labels": {label: "yes"}}}
    kube.request("PATCH", nodes.path(None, node), body=patch, content_type="application/merge-patch+json")
    try:
        recovered = daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "NoChange"
                                      and "healthy" in e.get("reason", ""), "recovery recorded", 30)
        assert recovered["health"]["outcome"] == "Healthy"
        assert json.loads(daemon.get("/status")[1])["apps"][0]["health"] == "Healthy"
    finally:
        kube.request("PATCH", nodes.path(None, node), body={"metadata": {"labels": {label: None}}},
                     content_type="application/merge-patch+json")


def test_a_github_push_webhook_deploys_the_pushed_commit(repo, kube, namespace, tmp_path, start_daemon):
    import hashlib
    import hmac

    from helpers import SECRET

    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon,
                              "hub", "--no-watch-local", "--no-leader-elect")
    repo.write("cm.yaml", configmap("settings", {"color": "github-green"}))
    sha = repo.commit("from GitHub")
    payload = {  # the shape GitHub sends for a push (trimmed)
        "ref": "refs/heads/main", "before": "0" * 39 + "1", "after": sha,
        "repository": {"full_name": "org/fleet", "clone_url": repo.url, "ssh_url": "git@github.com:org/fleet.git",
                       "html_url": "https://github.com/org/fleet"},
        "head_commit": {"id": sha, "message": "from GitHub"},
    }
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    started = time.monotonic()
    code, answer = daemon.post("/hooks/github", body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature,
                                                       "Content-Type": "application/json"})
    assert code == 202 and json.loads(answer)["triggered"] == ["hub"]
    wait_for("GitHub push applied", lambda: cm_data(kube, namespace, "settings") == {"color": "github-green"}, 10,
             interval=0.02)
    assert time.monotonic() - started < 2.0

    tampered = body.replace(b"from GitHub", b"from an attacker")
    assert daemon.post("/hooks/github", tampered, {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature,
                                                   "Content-Type": "application/json"})[0] == 401
