"""Drift: hand edits show in `diff` and are reverted by `sync`; defaults never drift."""

from __future__ import annotations

import subprocess

import pytest
from helpers import deployment, gitopsd, gitopsd_json

pytestmark = pytest.mark.cluster


def _args(repo, namespace):
    return ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)


def test_hand_edit_shows_as_drift_and_sync_reverts_it(repo, kube, kubeconfig, source_cache, namespace, cluster):
    repo.write("web.yaml", deployment("web", replicas=2))
    repo.commit()
    gitopsd_json("sync", *_args(repo, namespace), kubeconfig=kubeconfig, cache=source_cache, expect=0)

    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "scale", "deployment/web",
                    "--replicas=5"], check=True, capture_output=True)

    code, report = gitopsd_json("diff", *_args(repo, namespace), kubeconfig=kubeconfig, cache=source_cache, expect=1)
    (change,) = report["changes"]
    assert change["action"] == "update" and change["name"] == "web"
    assert "spec.replicas" in change["fields"]
    assert "-  replicas: 5" in change["diff"] and "+  replicas: 2" in change["diff"]

    text = gitopsd("diff", *_args(repo, namespace), kubeconfig=kubeconfig, cache=source_cache)
    assert "~ update" in text.stdout and "spec.replicas" in text.stdout

    gitopsd_json("sync", *_args(repo, namespace), kubeconfig=kubeconfig, cache=source_cache, expect=0)
    dep = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert dep["spec"]["replicas"] == 2


def test_image_edit_inside_a_list_is_drift(app, repo, kube, namespace, kubeconfig, cluster):
    repo.write("web.yaml", deployment("web"))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "set", "image", "deployment/web",
                    "web=nginx:1.28"], check=True, capture_output=True)

    result = app.sync(dry_run=True)

    (change,) = [c for c in result.plan.changes if c.action.value != "unchanged"]
    assert "spec.template.spec.containers[0].image" in change.diff.fields


def test_server_defaulted_fields_never_show_as_drift(app, repo, kube, namespace):
    # A Deployment, a Service and a Job leave dozens of fields to server defaults
    # (strategy, revisionHistoryLimit, protocol, clusterIP, sessionAffinity, ...).
    repo.write("objs.yaml", [
        deployment("web"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
         "spec": {"template": {"spec": {"restartPolicy": "Never",
                                        "containers": [{"name": "c", "image": "busybox"}]}}}},
    ])
    repo.commit()
    assert app.sync().outcome.value == "Applied"

    # Force the full server-side comparison: drop our ownership fast path by
    # deleting the hash annotation's meaning (a new desired hash) is not what we
    # want here; instead, compare via dry-run for every object.
    from gitopsd.engine import plan as plan_mod

    original = plan_mod.still_ours
    plan_mod.still_ours = lambda live, desired, **_: False
    try:
        result = app.sync(dry_run=True)
    finally:
        plan_mod.still_ours = original
    drifted = {str(c.ref): c.diff.fields for c in result.plan.changes if c.action.value != "unchanged"}
    assert drifted == {}


def test_deleted_managed_object_is_recreated(app, repo, kube, namespace):
    repo.write("web.yaml", deployment("web"))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    deps = kube.resource("apps/v1", "Deployment")
    kube.delete(deps, "web", namespace)

    result = app.sync()

    assert [c.action.value for c in result.applied] == ["create"]
    assert kube.get(deps, "web", namespace) is not None


def _hand_put(kube, obj):
    res = kube.resource(obj["apiVersion"], obj["kind"])
    kube.request("PUT", res.path(obj["metadata"].get("namespace"), obj["metadata"]["name"]), body=obj,
                 query={"fieldManager": "kubectl-edit"})


def test_hand_edit_of_a_secret_written_with_stringdata_is_drift(app, repo, kube, namespace):
    repo.write("s.yaml", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
                          "stringData": {"password": "from-git"}})
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    secret = kube.get(kube.resource("v1", "Secret"), "db", namespace)
    secret["data"]["password"] = "aGFuZC1lZGl0ZWQ="   # "hand-edited"
    _hand_put(kube, secret)

    result = app.sync()

    assert [c.action.value for c in result.applied] == ["update"], "stringData is write-only: always re-judged"
    assert kube.get(kube.resource("v1", "Secret"), "db", namespace)["data"]["password"] == "ZnJvbS1naXQ="


def test_a_field_set_by_hand_where_git_says_null_is_drift(app, repo, kube, namespace):
    web = deployment("web")
    web["spec"]["template"]["spec"]["nodeSelector"] = None   # as `helm template` often writes it
    repo.write("web.yaml", web)
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    live = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    live["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "gpu"}
    _hand_put(kube, live)

    result = app.sync(dry_run=True)

    (change,) = [c for c in result.plan.changes if c.action.value != "unchanged"]
    assert any("nodeSelector" in f for f in change.diff.fields), change.diff.fields


class _StaleCache:
    """A watch cache that lags: it holds the members as they were read before another write
    (the daemon's informers can be a write behind the apiserver under load)."""

    def __init__(self, members: dict) -> None:
        self._members = members
        self.targets = {(res, ns) for res, ns in members.pop("__targets__")}

    def members(self):
        return self._members

    def ensure(self, targets) -> None:
        pass


def test_a_write_by_another_manager_between_the_read_and_the_dry_run_is_not_shown_as_a_change(
        app, repo, kube, namespace):
    """The dry-run runs on the stored object, which may be newer than the live copy the plan
    holds. Compared with the older copy, another manager's field (a controller's annotation, say)
    would show as gitopsd's change; the plan reads the object again and compares like with like."""
    from gitopsd.engine import inventory
    from gitopsd.engine.plan import Action, make_plan, ref_of
    from gitopsd.engine.render import Manifest

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
          "data": {"color": "blue"}}
    repo.write("cm.yaml", cm)
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    cms = kube.resource("v1", "ConfigMap")
    stale = kube.get(cms, "settings", namespace)
    kube.request("PATCH", f"{cms.path(namespace)}/settings", query={"fieldManager": "a-controller"},
                 content_type="application/merge-patch+json",
                 body={"metadata": {"annotations": {"example.com/revision": "2"}}})

    desired = {**cm, "data": {"color": "green"}}
    cache = _StaleCache({ref_of(stale): stale, "__targets__": [(cms, namespace)]})
    inv = inventory.load(kube, app=namespace, namespace=namespace)
    plan = make_plan(kube, [Manifest(obj=desired, source="cm.yaml")], inv, cache=cache)

    (change,) = plan.changes
    assert change.action == Action.UPDATE
    # What the commit changes (and gitopsd's hash of it), not the controller's annotation.
    assert change.diff.fields == ("data.color", "metadata.annotations.gitopsd.io/desired-hash"), change.diff.fields
    assert change.live["metadata"]["annotations"]["example.com/revision"] == "2", "compared with the object read again"
