"""One daemon, two real clusters: targets on each, a fan-out to both, isolation of a cluster that stops.

Cluster `a` is the session's control plane (gitopsd's own, `in-cluster`);
cluster `b` is a second real control plane (the `cluster_b` fixture,
started once per session), reached through a self-contained kubeconfig in
a Secret in gitopsd's namespace, minted per test for its own user.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import UTC, datetime

import pytest
import yaml
from helpers import (
    app_entry,
    audit_events,
    cm_data,
    configmap,
    gitopsd,
    post_generic,
    snapshot,
    wait_for,
)
from testbed import cluster as tb

pytestmark = pytest.mark.cluster


# ---------------------------------------------------------------- helpers

def put_kubeconfig(api_client, namespace: str, cluster_b, *, name: str = "b-kubeconfig", user: str = "gitopsd-b",
                   groups=("system:masters",), context: str | None = None) -> dict:
    """Store a kubeconfig for a new client certificate of `user` on cluster b in a Secret (key `value`)."""
    from kubernetes import client

    kc = tb.client_kubeconfig(cluster_b, user=user, groups=groups, context=context)
    body = {"metadata": {"name": name}, "stringData": {"value": yaml.safe_dump(kc)}}
    core = client.CoreV1Api(api_client)
    try:
        core.create_namespaced_secret(namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_secret(name, namespace, body)
    return kc


def write_clusters_config(path, apps: list[dict], clusters: dict):
    path.write_text(yaml.safe_dump({"clusters": clusters, "apps": apps}, sort_keys=False))
    return path


B = {"b": {"kubeconfig": {"secretRef": {"name": "b-kubeconfig"}}, "labels": {"env": "test"}}}


def status_rows(daemon) -> dict[tuple[str, str], dict]:
    code, body = daemon.get("/status")
    assert code == 200, body
    return {(row["app"], row["cluster"]): row for row in json.loads(body)["apps"]}


@pytest.fixture
def on_b(kube_b, namespace):
    """The test's namespace on cluster b too (gitopsd's namespace there, and the apps'): removed afterwards."""
    yield namespace
    try:
        kube_b.delete(kube_b.resource("v1", "Namespace"), namespace)
    except Exception:  # noqa: BLE001 - cleanup
        pass


@pytest.fixture
def two_cluster_daemon(repo, namespace, tmp_path, start_daemon, api_client, cluster_b, on_b):
    """A daemon with app `on-a` (cluster a), `on-b` (cluster b) and `fan` (both), all converged."""
    repo.write("a/cm.yaml", configmap("only-a", {"k": "1"}))
    repo.write("b/cm.yaml", configmap("only-b", {"k": "1"}))
    repo.write("fan/cm.yaml", configmap("fan", {"v": "1"}))
    repo.commit("three apps")
    put_kubeconfig(api_client, namespace, cluster_b)
    cfg = write_clusters_config(tmp_path / "config.yaml", [
        app_entry("on-a", repo.url, namespace, path="a", selfHeal=True, prune=True),
        app_entry("on-b", repo.url, namespace, path="b", cluster="b", selfHeal=True, prune=True),
        app_entry("fan", repo.url, namespace, path="fan", clusters=["in-cluster", "b"], selfHeal=True, prune=True),
    ], B)
    return start_daemon(cfg, "--no-leader-elect"), cfg


def converged(kube, kube_b, namespace) -> bool:
    return bool(cm_data(kube, namespace, "only-a") and cm_data(kube_b, namespace, "only-b")
                and cm_data(kube, namespace, "fan") and cm_data(kube_b, namespace, "fan"))


# ---------------------------------------------------------------- tests

def test_apps_on_two_clusters_and_a_fan_out_converge_and_a_push_reaches_both(
        two_cluster_daemon, repo, kube, kube_b, namespace, tmp_path, kubeconfig, cluster, cluster_b):
    daemon, cfg = two_cluster_daemon
    wait_for("every target converged", lambda: converged(kube, kube_b, namespace), 60)
    assert cm_data(kube_b, namespace, "only-a") is None and cm_data(kube, namespace, "only-b") is None

    # One row per target; each audit record names its cluster.
    wait_for("every target reported", lambda: {k: r["result"] for k, r in status_rows(daemon).items()} == {
        ("on-a", "in-cluster"): "Applied", ("on-b", "b"): "Applied", ("fan", "in-cluster"): "Applied",
        ("fan", "b"): "Applied"}, 30)
    records = audit_events(daemon, type="transition")
    assert {(r["app"], r["cluster"]) for r in records} == {("on-a", "in-cluster"), ("on-b", "b"),
                                                          ("fan", "in-cluster"), ("fan", "b")}

    # A target's state lives beside its objects: the parent (status, audit head) and segments on b.
    parent = kube_b.get(kube_b.resource("v1", "ConfigMap"), "gitopsd-fan", namespace)
    assert parent is not None and json.loads(parent["data"]["status"])["cluster"] == "b"
    assert kube.get(kube.resource("v1", "ConfigMap"), "gitopsd-on-b", namespace) is None

    # A push deploys to both clusters.
    repo.write("fan/cm.yaml", configmap("fan", {"v": "2"}))
    sha = repo.commit("fan v2")
    post_generic(daemon, repo.url, sha)
    wait_for("v2 on both clusters", lambda: (cm_data(kube, namespace, "fan") or {}).get("v") == "2"
             and (cm_data(kube_b, namespace, "fan") or {}).get("v") == "2", 60)

    # Each cluster's credentials are used for that cluster only: every write on b to the test's namespace is
    # by b's kubeconfig user, and a's apiserver never saw that user.
    # (The test bed's controller-manager, as `admin`, adds kube-root-ca.crt and the default ServiceAccount.)
    writers_b = {e["user"]["username"] for e in cluster_b.audit_events()
                 if (e.get("objectRef") or {}).get("namespace") == namespace
                 and e["objectRef"].get("name") not in ("kube-root-ca.crt", "default")}
    assert writers_b == {"gitopsd-b"}, writers_b
    assert not [e for e in cluster.audit_events() if e["user"]["username"] == "gitopsd-b"]

    # The metrics carry the cluster.
    text = daemon.get("/metrics")[1]
    assert 'gitopsd_reconcile_total{app="fan",cluster="b"' in text
    assert 'gitopsd_cluster_reachable{cluster="b"} 1.0' in text

    # The CLI reads a remote target's trail and status where they live.
    cache = tmp_path / "cli-cache"
    history = gitopsd("history", "fan", "--cluster", "b", "--config", str(cfg), "--namespace", namespace,
                      kubeconfig=kubeconfig, cache=cache)
    assert history.returncode == 0, history.stderr
    assert sha[:8] in history.stdout and "fan v2" in history.stdout
    verify = gitopsd("audit", "verify", "fan", "--cluster", "b", "--config", str(cfg), "--namespace", namespace,
                     kubeconfig=kubeconfig, cache=cache)
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    exported = tmp_path / "export"
    done = gitopsd("export", "fan", "--cluster", "b", "--config", str(cfg), "--namespace", namespace,
                   "--at", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "-o", str(exported),
                   kubeconfig=kubeconfig, cache=cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any("v: '2'" in f.read_text() or 'v: "2"' in f.read_text() for f in exported.rglob("*.yaml"))
    status = gitopsd("status", "--config", str(cfg), "--namespace", namespace, "-o", "json",
                     kubeconfig=kubeconfig, cache=cache)
    assert status.returncode == 0, status.stderr
    assert sorted((r["app"], r["cluster"]) for r in json.loads(status.stdout)) == [
        ("fan", "b"), ("fan", "in-cluster"), ("on-a", "in-cluster"), ("on-b", "b")]


def test_a_hand_edit_on_b_is_reverted_on_b_only(two_cluster_daemon, kube, kube_b, namespace):
    daemon, _ = two_cluster_daemon
    wait_for("every target converged", lambda: converged(kube, kube_b, namespace), 60)
    before_a = snapshot(kube, namespace)["fan"]
    kube_b.apply(configmap("fan", {"v": "hand-edit"}, namespace=namespace), field_manager="kubectl-edit")
    drift = wait_for("drift corrected on b", lambda: next(
        (e for e in audit_events(daemon, type="drift") if e.get("action") == "corrected"), None), 30)
    assert drift["app"] == "fan" and drift["cluster"] == "b"
    assert "kubectl-edit" in " ".join(drift.get("managers") or [])
    wait_for("b back to v1", lambda: (cm_data(kube_b, namespace, "fan") or {}).get("v") == "1", 30)
    assert snapshot(kube, namespace)["fan"] == before_a   # nothing written on a
    assert [e for e in audit_events(daemon, type="drift") if e.get("cluster") != "b"] == []


def test_a_stopped_cluster_holds_up_only_its_own_targets(two_cluster_daemon, repo, kube, kube_b, namespace,
                                                         cluster_b):
    daemon, _ = two_cluster_daemon
    wait_for("every target converged", lambda: converged(kube, kube_b, namespace), 60)
    # The apps' objects on b (gitopsd's own ConfigMaps there, its parents and audit segments, come and go).
    b_before = {name: v for name, v in snapshot(kube_b, namespace).items() if name in ("only-b", "fan")}
    assert set(b_before) == {"only-b", "fan"}
    tb.pause(cluster_b, "kube-apiserver")
    try:
        wait_for("b's targets unreachable", lambda: {k: r["result"] for k, r in status_rows(daemon).items()
                                                     if k[1] == "b"} == {("on-b", "b"): "ClusterUnreachable",
                                                                         ("fan", "b"): "ClusterUnreachable"}, 60)
        repo.write("a/cm.yaml", configmap("only-a", {"k": "2"}))
        repo.write("fan/cm.yaml", configmap("fan", {"v": "2"}))
        sha = repo.commit("while b is down")
        pushed = time.monotonic()
        post_generic(daemon, repo.url, sha)
        wait_for("the push applied on a", lambda: (cm_data(kube, namespace, "only-a") or {}).get("k") == "2"
                 and (cm_data(kube, namespace, "fan") or {}).get("v") == "2", 30)
        latency = time.monotonic() - pushed
        assert tb.is_paused(cluster_b, "kube-apiserver")   # all of it while b was stopped
        print(f"push -> applied on a while b is stopped: {latency:.2f}s")
        rows = status_rows(daemon)
        assert rows[("on-a", "in-cluster")]["result"] == "Applied"
        assert "ClusterUnreachable" in rows[("fan", "b")]["reason"] or \
            rows[("fan", "b")]["result"] == "ClusterUnreachable"
    finally:
        tb.resume(cluster_b, "kube-apiserver")
    wait_for("b converged to the push", lambda: (cm_data(kube_b, namespace, "fan") or {}).get("v") == "2", 90)
    # on-b's files did not change: its last verdict (Applied) stands again once b answers.
    wait_for("b's targets recovered", lambda: {k[0]: r["result"] for k, r in status_rows(daemon).items()
                                               if k[1] == "b"} == {"on-b": "Applied", "fan": "Applied"}, 60)
    after = snapshot(kube_b, namespace)
    # Nothing pruned, nothing recreated: the same objects, by uid (fan's was updated in place).
    assert {name: uid for name, (uid, _) in b_before.items()} == \
        {name: after[name][0] for name in b_before if name in after}
    assert not [r for r in audit_events(daemon, type="transition") if r.get("cluster") == "b"
                and any(o.get("action") == "pruned" for o in (r.get("plan") or {}).get("objects", []))]
    events = daemon.events()
    assert any(e.get("event") == "cluster unreachable" and e.get("cluster") == "b" for e in events)
    assert any(e.get("event") == "cluster reachable again" and e.get("cluster") == "b" for e in events)


def test_a_rotated_kubeconfig_secret_is_used_without_a_restart(repo, kube, kube_b, namespace, tmp_path, start_daemon,
                                                              api_client, cluster_b, on_b):
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"}}
    users = [f"rot-one-{namespace[-5:]}", f"rot-two-{namespace[-5:]}"]
    for user in users:
        kube_b.apply({**binding, "metadata": {"name": user},
                      "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]},
                     field_manager="test")
    try:
        repo.write("b/cm.yaml", configmap("rotating", {"v": "1"}))
        repo.commit("one")
        put_kubeconfig(api_client, namespace, cluster_b, user=users[0], groups=())
        cfg = write_clusters_config(tmp_path / "config.yaml", [
            app_entry("rot", repo.url, namespace, path="b", cluster="b")], B)
        daemon = start_daemon(cfg, "--no-leader-elect")
        wait_for("applied on b as the first user", lambda: cm_data(kube_b, namespace, "rotating"), 60)

        put_kubeconfig(api_client, namespace, cluster_b, user=users[1], groups=())   # the new certificate
        daemon.wait_event(lambda e: e.get("event") == "cluster kubeconfig changed: reconnected"
                          and e.get("cluster") == "b", "reconnected with the new kubeconfig", 30)
        kube_b.delete(kube_b.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), users[0])

        repo.write("b/cm.yaml", configmap("rotating", {"v": "2"}))
        sha = repo.commit("two")
        post_generic(daemon, repo.url, sha)
        wait_for("applied on b as the second user", lambda: (cm_data(kube_b, namespace, "rotating") or {}).get("v")
                 == "2", 60)
        writers = {e["user"]["username"] for e in cluster_b.audit_events()
                   if e.get("objectRef", {}).get("name") == "rotating" and e.get("verb") == "patch"
                   and e.get("objectRef", {}).get("namespace") == namespace}
        assert users[1] in writers
    finally:
        for user in users:
            try:
                kube_b.delete(kube_b.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), user)
            except Exception:  # noqa: BLE001 - cleanup
                pass


def test_a_kubeconfig_naming_a_missing_context_fails_its_targets_clearly(repo, kube, namespace, tmp_path,
                                                                          start_daemon, api_client, cluster_b):
    repo.write("a/cm.yaml", configmap("still-deployed", {"k": "1"}))
    repo.write("c/cm.yaml", configmap("never", {"k": "1"}))
    repo.commit()
    put_kubeconfig(api_client, namespace, cluster_b, name="c-kubeconfig", context="real-context")
    cfg = write_clusters_config(tmp_path / "config.yaml", [
        app_entry("home", repo.url, namespace, path="a"),
        app_entry("elsewhere", repo.url, namespace, path="c", cluster="c")],
        {"c": {"kubeconfig": {"secretRef": {"name": "c-kubeconfig"}}, "context": "no-such-context"}})
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_for("the other app deployed", lambda: cm_data(kube, namespace, "still-deployed"), 60)
    failed = wait_for("the target failed", lambda: (status_rows(daemon).get(("elsewhere", "c")) or {}).get("result")
                      == "Failed" and status_rows(daemon)[("elsewhere", "c")], 30)
    assert "context 'no-such-context' is not in the kubeconfig (contexts: real-context)" in failed["reason"]
    assert f"kubeconfig Secret {namespace}/c-kubeconfig" in failed["reason"]
    logged = daemon.wait_event(lambda e: e.get("event") == "cannot connect to cluster", "the load error logged", 10)
    assert logged["cluster"] == "c" and "no-such-context" in logged["error"]


def test_a_cluster_added_by_a_reload_runs_its_targets_once_its_kubeconfig_secret_exists(
        repo, kube, kube_b, namespace, tmp_path, start_daemon, api_client, cluster_b, on_b):
    repo.write("a/cm.yaml", configmap("home", {"k": "1"}))
    repo.write("b/cm.yaml", configmap("later", {"k": "1"}))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_clusters_config(cfg, [app_entry("home", repo.url, namespace, path="a")], {})
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_for("home deployed", lambda: cm_data(kube, namespace, "home"), 60)

    # The reload names cluster b, whose Secret is not there yet: its target fails and says why.
    write_clusters_config(cfg, [app_entry("home", repo.url, namespace, path="a"),
                                app_entry("later", repo.url, namespace, path="b", cluster="b")], B)
    failed = wait_for("the new target failed", lambda: (status_rows(daemon).get(("later", "b")) or {}).get("result")
                      == "Failed" and status_rows(daemon)[("later", "b")], 30)
    assert f"kubeconfig Secret {namespace}/b-kubeconfig (key value): the Secret does not exist" in failed["reason"]
    assert cm_data(kube, namespace, "home")   # the other target is untouched

    # The Secret appears: the target runs, without a restart.
    put_kubeconfig(api_client, namespace, cluster_b)
    wait_for("deployed on b", lambda: cm_data(kube_b, namespace, "later"), 60)
    wait_for("the target reports Applied", lambda: (status_rows(daemon).get(("later", "b")) or {}).get("result")
             == "Applied", 30)

    # Taken out of the config again: the cluster is closed, its objects stay (removing an app never prunes).
    write_clusters_config(cfg, [app_entry("home", repo.url, namespace, path="a")], {})
    daemon.wait_event(lambda e: e.get("event") == "cluster removed from the config" and e.get("cluster") == "b",
                      "cluster b closed", 30)
    assert ("later", "b") not in status_rows(daemon)
    assert cm_data(kube_b, namespace, "later")


def test_a_fan_out_target_held_on_one_cluster_leaves_the_other_following(
        two_cluster_daemon, repo, kube, kube_b, namespace, kubeconfig):
    from helpers import release_cli

    daemon, cfg = two_cluster_daemon
    wait_for("every target converged", lambda: converged(kube, kube_b, namespace), 60)
    held = release_cli(kubeconfig, namespace, "hold", "fan", "--cluster", "b", "--config", str(cfg), "-o", "json")
    assert held.returncode == 0, held.stdout + held.stderr
    assert json.loads(held.stdout)["state"] == "held"
    assert "requested for app fan@b" in held.stderr

    repo.write("fan/cm.yaml", configmap("fan", {"v": "2"}))
    sha = repo.commit("fan v2, held on b")
    post_generic(daemon, repo.url, sha)
    wait_for("v2 on a", lambda: (cm_data(kube, namespace, "fan") or {}).get("v") == "2", 60)
    record = wait_for("the held record of fan@b", lambda: next(
        (r for r in audit_events(daemon, type="transition", app="fan", cluster="b") if r.get("result") == "Held"),
        None), 30)
    assert record["revision"] == sha
    assert (cm_data(kube_b, namespace, "fan") or {}).get("v") == "1"   # b stays where it was held
    rows = status_rows(daemon)
    assert rows[("fan", "b")]["release"]["state"] == "held" and "release" not in rows[("fan", "in-cluster")]

    resumed = release_cli(kubeconfig, namespace, "resume", "fan", "--cluster", "b", "--config", str(cfg))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    wait_for("v2 on b once resumed", lambda: (cm_data(kube_b, namespace, "fan") or {}).get("v") == "2", 60)


def test_the_web_view_shows_each_target_with_its_cluster_and_a_remote_targets_page_from_its_cluster(
        two_cluster_daemon, kube, kube_b, namespace):
    daemon, _ = two_cluster_daemon
    wait_for("converged on both clusters", lambda: converged(kube, kube_b, namespace), 60)

    def doc(path: str) -> dict:
        with urllib.request.urlopen(daemon.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    rows = wait_for("every target Applied", lambda: (r := {row["target"]: row for row in doc("/api/v1/apps")["apps"]})
                    and all(row["result"] == "Applied" for row in r.values()) and r)
    assert {t: r["cluster"] for t, r in rows.items()} == {"on-a": "in-cluster", "on-b@b": "b", "fan": "in-cluster",
                                                         "fan@b": "b"}
    page = doc("/api/v1/apps/fan%40b")   # as a browser encodes app@cluster
    assert page["app"]["cluster"] == "b" and page["app"]["target"] == "fan@b"
    assert [(o["name"], o["health"]) for o in page["objects"]] == [("fan", "Current")]   # b's informers
    assert page["lastTransition"]["cluster"] == "b" and page["verify"]["ok"], page["verify"]
    cms = kube_b.resource("v1", "ConfigMap")
    kube_b.request("PATCH", f"{cms.path(namespace)}/fan", query={"fieldManager": "hand-on-b"},
                   content_type="application/merge-patch+json", body={"data": {"v": "by hand"}})
    drift = wait_for("the drift on fan@b's page", lambda: doc("/api/v1/apps/fan%40b")["drifts"], 30)
    assert drift[0]["managers"] == ["hand-on-b (Update)"] and drift[0]["cluster"] == "b"
    assert doc("/api/v1/apps/fan")["drifts"] == []
