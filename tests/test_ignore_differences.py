"""Drift an app means to allow (issue 14, item 2): ignore rules and field managers left alone.

Against the real control plane: another field manager scaling a Deployment
whose spec.replicas a rule ignores (neither drift nor reverted, and no
dry-run for its events) and the same without the rule (reverted, with the
rule suggested); a real HorizontalPodAutoscaler, left alone by the default
manager list, whose count gitopsd never resets, not even to 1 when it
applies the Deployment again; an injected annotation; wildcards in
`gitopsd diff`; and the server-side apply pitfall: a field gitopsd alone
owns keeps following Git. The pure logic is in tests/test_ignore.py.
"""

from __future__ import annotations

import threading

import pytest
from helpers import (
    app_entry,
    audit_events,
    configmap,
    deployment,
    gitopsd,
    gitopsd_json,
    metric,
    post_generic,
    wait_audit,
    wait_for,
    wait_transition,
    write_config,
)

from gitopsd.config import IgnoreDifference
from gitopsd.kube import FIELD_MANAGER

pytestmark = pytest.mark.cluster

IMAGE = "spec.template.spec.containers[0].image"


def _daemon(repo, tmp_path, start_daemon, namespace, objects: dict, **entry):
    """A repo holding `objects`, one app over it, a daemon, and its first Applied."""
    for path, body in objects.items():
        repo.write(path, body)
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(namespace, repo.url, namespace, **entry)])
    daemon = start_daemon(config, "--no-leader-elect")
    wait_transition(daemon, "first sync", 60, app=namespace, result="Applied")
    return daemon


def _scale(kube, namespace: str, name: str, replicas: int, *, manager: str) -> None:
    """What an autoscaler does: a write to the scale subresource, under its own field manager."""
    res = kube.resource("apps/v1", "Deployment")
    kube.request("PATCH", res.path(namespace, name) + "/scale", body={"spec": {"replicas": replicas}},
                 query={"fieldManager": manager}, content_type="application/merge-patch+json")


def _patch(kube, obj_kind: tuple[str, str], namespace: str, name: str, body: dict, *, manager: str) -> None:
    """A hand edit (`kubectl edit`-style strategic merge) under `manager`."""
    res = kube.resource(*obj_kind)
    kube.request("PATCH", res.path(namespace, name), body=body, query={"fieldManager": manager},
                 content_type="application/strategic-merge-patch+json")


def _set_image(kube, namespace: str, name: str, image: str, *, manager: str = "kubectl-edit") -> None:
    _patch(kube, ("apps/v1", "Deployment"), namespace, name,
           {"spec": {"template": {"spec": {"containers": [{"name": name, "image": image}]}}}}, manager=manager)


def _web(kube, namespace: str, name: str = "web") -> dict:
    return kube.get(kube.resource("apps/v1", "Deployment"), name, namespace)


def _owners_of_replicas(obj: dict) -> set[str]:
    return {m["manager"] for m in obj["metadata"]["managedFields"]
            if "f:replicas" in (m.get("fieldsV1") or {}).get("f:spec", {})}


# ---------------------------------------------------------------- through the daemon

def test_a_scale_by_another_manager_of_ignored_replicas_is_neither_drift_nor_reverted(
        repo, kube, namespace, tmp_path, start_daemon):
    daemon = _daemon(repo, tmp_path, start_daemon, namespace, {"web.yaml": deployment("web", replicas=2)},
                     ignoreDifferences=[{"kind": "Deployment", "name": "web", "jsonPointers": ["/spec/replicas"]}],
                     ignoreManagers=[])
    dry_runs = metric(daemon, "gitopsd_apiserver_requests_total", verb="apply-dry-run")

    _scale(kube, namespace, "web", 7, manager="autoscaler")
    _scale(kube, namespace, "web", 6, manager="autoscaler")
    _set_image(kube, namespace, "web", "nginx:1.28")   # drift the rule does not name: the events' witness

    record = wait_audit(daemon, "the image edit corrected", app=namespace, type="drift", action="corrected")
    assert record["fields"] == [IMAGE], "the scale is not drift"
    assert len(audit_events(daemon, namespace, type="drift")) == 1
    live = _web(kube, namespace)
    assert live["spec"]["replicas"] == 6, "nor reverted: the heal applied the Deployment without it"
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert _owners_of_replicas(live) == {"autoscaler"}
    # One dry-run, the image edit's: the scale events cost none. (A second when the deployment
    # controller's revision annotation, which the image edit sets off, lands between the watch
    # event and the dry-run: the plan then reads the object again rather than report it.)
    assert metric(daemon, "gitopsd_apiserver_requests_total", verb="apply-dry-run") in (dry_runs + 1, dry_runs + 2), \
        "one dry-run, the image edit's: the scale events cost none"


def test_without_the_rule_the_same_scale_is_reverted_and_the_record_suggests_the_rule(
        repo, kube, namespace, tmp_path, start_daemon):
    daemon = _daemon(repo, tmp_path, start_daemon, namespace, {"web.yaml": deployment("web", replicas=2)})

    _scale(kube, namespace, "web", 7, manager="autoscaler")

    record = wait_audit(daemon, "the scale corrected", app=namespace, type="drift", action="corrected")
    assert record["fields"] == ["spec.replicas"] and record["managers"] == ["autoscaler (Update)"]
    suggestion = "ignoreDifferences: [{kind: Deployment, name: web, jsonPointers: [/spec/replicas]}]"
    assert record["suggestion"] == suggestion
    line = daemon.wait_event(lambda e: e.get("event") == "drift corrected", "the log line")
    assert line["suggestion"] == suggestion
    assert _web(kube, namespace)["spec"]["replicas"] == 2


def test_a_real_hpa_keeps_its_count_and_gitopsd_never_resets_it_even_when_it_applies_again(
        repo, kube, namespace, tmp_path, start_daemon):
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": 3, "maxReplicas": 5,
                    "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]}}
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:   # every spec.replicas the Deployment ever has, in order
        deployments = kube.resource("apps/v1", "Deployment")
        while not stop.is_set():
            for kind, obj in kube.watch(deployments, namespace=namespace, timeout_seconds=5):
                if kind == "BOOKMARK":
                    continue
                replicas = (obj.get("spec") or {}).get("replicas")
                if replicas is not None and (not seen or seen[-1] != replicas):
                    seen.append(replicas)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # Git declares replicas (1); no metrics server: the HPA scales to minReplicas anyway.
        daemon = _daemon(repo, tmp_path, start_daemon, namespace,
                         {"web.yaml": deployment("web", replicas=1), "hpa.yaml": hpa})
        wait_for("the HPA's scale to 3", lambda: _web(kube, namespace)["spec"]["replicas"] == 3, 90)
        assert "kube-controller-manager" in _owners_of_replicas(_web(kube, namespace)), \
            "the default ignoreManagers names the manager the HPA writes as"

        repo.write("web.yaml", deployment("web", replicas=1, image="nginx:1.28"))
        sha = repo.commit("web: nginx 1.28")
        assert post_generic(daemon, repo.url, sha)[0] < 300
        applied = wait_transition(daemon, "the new commit applied", 90, app=namespace, revision=sha,
                                  result="Applied")
    finally:
        stop.set()
    watcher.join(15)
    live = _web(kube, namespace)
    assert live["spec"]["replicas"] == 3 and live["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "nginx:1.28"
    assert FIELD_MANAGER not in _owners_of_replicas(live)
    assert seen[:2] == [1, 3] and set(seen[1:]) == {3}, f"gitopsd reset the HPA's count: {seen}"
    (web,) = [o for o in applied["plan"]["objects"] if o["kind"] == "Deployment"]
    assert "spec.replicas" not in web.get("fields", [])
    assert audit_events(daemon, namespace, type="drift") == [], "the HPA's scale is no drift"


def test_an_annotation_an_injector_rewrites_stays_as_it_wrote_it(repo, kube, namespace, tmp_path, start_daemon):
    settings = configmap("settings", {"color": "blue"}, annotations={"example.com/injected": "pending"})
    daemon = _daemon(repo, tmp_path, start_daemon, namespace, {"cm.yaml": settings},
                     ignoreDifferences=[{"kind": "ConfigMap", "name": "sett*",
                                         "fields": ["metadata.annotations.example.com/injected"]}])

    _patch(kube, ("v1", "ConfigMap"), namespace, "settings",
           {"metadata": {"annotations": {"example.com/injected": "sidecar-1.4"}}}, manager="sidecar-injector")
    _patch(kube, ("v1", "ConfigMap"), namespace, "settings", {"data": {"color": "red"}}, manager="kubectl-edit")

    record = wait_audit(daemon, "the data edit corrected", app=namespace, type="drift", action="corrected")
    assert record["fields"] == ["data.color"]
    live = kube.get(kube.resource("v1", "ConfigMap"), "settings", namespace)
    assert live["data"] == {"color": "blue"}
    assert live["metadata"]["annotations"]["example.com/injected"] == "sidecar-1.4"


# ---------------------------------------------------------------- the CLI and the engine

def _args(repo, namespace, *rules: str):
    out = ["--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
           "--inventory-namespace", namespace]
    for rule in rules:
        out += ["--ignore-differences", rule]
    return out


def test_diff_does_not_show_ignored_fields_and_wildcards_match_objects_and_list_items(
        repo, kube, kubeconfig, source_cache, namespace):
    repo.write("deployments.yaml", [deployment(name) for name in ("web-a", "web-b", "api")])
    repo.commit()
    gitopsd_json("sync", *_args(repo, namespace), kubeconfig=kubeconfig, cache=source_cache, expect=0)
    for name in ("web-a", "web-b", "api"):
        _set_image(kube, namespace, name, "nginx:1.28", manager="image-updater")
    rule = '{kind: Deploy*, name: web-*, fields: ["spec.template.spec.containers[*].image"]}'

    _, report = gitopsd_json("diff", *_args(repo, namespace, rule), kubeconfig=kubeconfig, cache=source_cache,
                             expect=1)

    assert [(c["name"], c["fields"]) for c in report["changes"]] == [("api", [IMAGE])]
    text = gitopsd("diff", *_args(repo, namespace, rule), kubeconfig=kubeconfig, cache=source_cache).stdout
    assert "web-a" not in text and "web-b" not in text and "Deployment.apps/" + namespace + "/api" in text

    gitopsd_json("sync", *_args(repo, namespace, rule), kubeconfig=kubeconfig, cache=source_cache, expect=0)
    images = {name: _web(kube, namespace, name)["spec"]["template"]["spec"]["containers"][0]["image"]
              for name in ("web-a", "web-b", "api")}
    assert images == {"web-a": "nginx:1.28", "web-b": "nginx:1.28", "api": "nginx:1.27"}
    gitopsd_json("diff", *_args(repo, namespace, rule), kubeconfig=kubeconfig, cache=source_cache, expect=0)


def test_a_bad_rule_on_the_command_line_names_the_flag_and_the_field(repo, kubeconfig, source_cache, namespace):
    proc = gitopsd("diff", *_args(repo, namespace, "{kind: Deployment, jsonPointers: [spec/replicas]}"),
                   kubeconfig=kubeconfig, cache=source_cache)
    assert proc.returncode == 2
    assert "argument --ignore-differences: ignoreDifferences[0].jsonPointers[0]: \"spec/replicas\" is not a " \
           "JSON pointer" in proc.stderr


REPLICAS = IgnoreDifference(kind="Deployment", name="web", json_pointers=("/spec/replicas",))


def test_an_ignored_field_gitopsd_alone_owns_keeps_following_git_and_is_never_reset(app, repo, kube, namespace):
    # The server-side apply pitfall: had gitopsd stopped applying spec.replicas while it
    # alone owned it, the apiserver would have removed it (back to the default, 1).
    repo.write("web.yaml", deployment("web", replicas=3))
    repo.commit()
    assert app.sync(ignore_differences=(REPLICAS,)).outcome.value == "Applied"
    repo.write("web.yaml", deployment("web", replicas=3, image="nginx:1.28"))
    repo.commit()

    result = app.sync(ignore_differences=(REPLICAS,))

    assert [c.action.value for c in result.applied] == ["update"] and result.applied[0].left_alone == ()
    live = _web(kube, namespace)
    assert live["spec"]["replicas"] == 3 and _owners_of_replicas(live) == {FIELD_MANAGER}
    repo.write("web.yaml", deployment("web", replicas=4, image="nginx:1.28"))
    repo.commit()
    assert app.sync(ignore_differences=(REPLICAS,)).outcome.value == "Applied"
    assert _web(kube, namespace)["spec"]["replicas"] == 4, "nobody else took it: a Git change is applied"


def test_a_deleted_object_comes_back_with_gits_value_of_an_ignored_field(app, repo, kube, namespace):
    repo.write("web.yaml", deployment("web", replicas=2))
    repo.commit()
    assert app.sync(ignore_differences=(REPLICAS,)).outcome.value == "Applied"
    _scale(kube, namespace, "web", 5, manager="autoscaler")
    assert app.sync(ignore_differences=(REPLICAS,)).outcome.value == "NoChange"
    kube.delete(kube.resource("apps/v1", "Deployment"), "web", namespace)

    result = app.sync(ignore_differences=(REPLICAS,))

    assert [c.action.value for c in result.applied] == ["create"]
    assert _web(kube, namespace)["spec"]["replicas"] == 2


def test_fields_of_a_manager_the_app_names_are_left_to_it_and_only_then(app, repo, kube, namespace):
    repo.write("web.yaml", deployment("web", replicas=2))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    _scale(kube, namespace, "web", 5, manager="autoscaler")

    assert app.sync(ignore_managers=("autoscaler",), dry_run=True).plan.in_sync
    assert app.sync(ignore_managers=("autoscaler",)).outcome.value == "NoChange"
    assert _web(kube, namespace)["spec"]["replicas"] == 5

    reverted = app.sync()   # the default list: the HPA's manager, not this one
    assert [(c.action.value, c.diff.fields) for c in reverted.applied] == [("update", ("spec.replicas",))]
    assert _web(kube, namespace)["spec"]["replicas"] == 2
