"""Field-manager takeover: what kubectl wrote before gitopsd adopted an object becomes gitopsd's.

Without it a field removed from Git survives in the cluster: `kubectl apply`
(client-side), `kubectl create` and the like still co-own it. The pure
rewrite of managedFields is tested with fakes; adoption, removal and who
keeps their fields run against the real control plane and the real kubectl.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import configmap, deployment, gitopsd_json

from gitopsd.engine import takeover
from gitopsd.engine.plan import Action

CSA = {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
       "fieldsV1": {"f:data": {".": {}, "f:k": {}, "f:old": {}},
                    "f:metadata": {"f:annotations": {".": {}, f"f:{takeover.LAST_APPLIED_ANNOTATION}": {}},
                                   "f:labels": {".": {}, "f:team": {}}}}}
OURS = {"manager": "gitopsd", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:data": {"f:k": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}}
CONTROLLER = {"manager": "cost-operator", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
              "fieldsV1": {"f:metadata": {"f:labels": {"f:cost-center": {}}}}}
STATUS = {"manager": "kubectl-edit", "operation": "Update", "apiVersion": "v1", "subresource": "status",
          "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:x": {}}}}


def live(*entries: dict, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm", "namespace": "ns", "resourceVersion": "42", "managedFields": list(entries),
                         "annotations": annotations or {}}}


# ---------------------------------------------------------------- the rewrite (pure)

def applied(obj: dict, ops: list[dict]) -> dict:
    """`obj` after the JSON patch `ops` (the operations takeover.patch uses; a failed test raises)."""
    obj = json.loads(json.dumps(obj))

    def parent(path: str):
        *steps, last = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
        node = obj
        for step in steps:
            node = node[int(step)] if isinstance(node, list) else node[step]
        return node, (last if isinstance(node, dict) or last == "-" else int(last))

    for op in ops:
        node, key = parent(op["path"])
        if op["op"] == "test":
            assert node[key] == op["value"], f"test failed: {op['path']}"
        elif op["op"] == "replace":
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] == "add":
            node.append(op["value"]) if key == "-" else node.insert(key, op["value"])
    return obj


def test_an_adopted_objects_client_side_apply_entry_becomes_gitopsds_apply_entry_without_the_annotation():
    obj = live(CSA, CONTROLLER, annotations={takeover.LAST_APPLIED_ANNOTATION: "{...}"})

    ops = takeover.patch(obj, takeover_names())

    assert ops[0] == {"op": "test", "path": "/metadata/managedFields/0", "value": CSA}, "guarded by the entry read"
    assert not any(op["path"] == "/metadata/resourceVersion" for op in ops), "a status update must not conflict"
    after = applied(obj, ops)
    assert after["metadata"]["annotations"] == {}
    controller, ours = after["metadata"]["managedFields"]
    assert ours["manager"] == "gitopsd" and ours["operation"] == "Apply"
    assert ours["fieldsV1"] == {"f:data": {".": {}, "f:k": {}, "f:old": {}},
                                "f:metadata": {"f:annotations": {".": {}}, "f:labels": {".": {}, "f:team": {}}}}
    assert controller == CONTROLLER, "a manager not on the list keeps its fields"
    assert obj["metadata"]["managedFields"][0] == CSA, "the live object is not modified"


def test_listed_managers_are_merged_into_gitopsds_existing_entry_and_subresources_are_left_alone():
    edit = {**CSA, "manager": "kubectl-edit", "fieldsV1": {"f:data": {"f:added": {}}}}
    obj = live(OURS, edit, STATUS, CONTROLLER)

    entries = applied(obj, takeover.patch(obj, takeover_names()))["metadata"]["managedFields"]

    assert [e["manager"] for e in entries] == ["gitopsd", "kubectl-edit", "cost-operator"]
    assert entries[1] == STATUS
    assert entries[0]["fieldsV1"] == {"f:data": {"f:k": {}, "f:added": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}
    assert takeover.managers(obj, takeover_names()) == ("kubectl-edit",)


def test_the_patch_fails_when_an_entry_it_rewrites_changed_since_it_was_read():
    edit = {**CSA, "manager": "kubectl-edit", "fieldsV1": {"f:data": {"f:added": {}}}}
    obj = live(OURS, edit)
    ops = takeover.patch(obj, takeover_names())
    obj["metadata"]["managedFields"][1] = {**edit, "fieldsV1": {"f:data": {"f:added": {}, "f:more": {}}}}

    with pytest.raises(AssertionError, match="test failed"):
        applied(obj, ops)


def test_what_the_app_leaves_to_others_is_not_taken_over():
    from gitopsd.engine.ignore import Ignore, Rule

    edit = {**CSA, "manager": "kubectl-edit",
            "fieldsV1": {"f:data": {"f:added": {}}, "f:metadata": {"f:annotations": {"f:injected": {}}}}}
    obj = live(OURS, edit, annotations={"injected": "x"})
    obj["data"] = {"k": "v", "added": "y"}
    rule = Rule(kind="ConfigMap", pointers=("/metadata/annotations/injected",))

    ours, edit_rest = applied(obj, takeover.patch(obj, takeover_names(), ignore=Ignore(rules=(rule,))))[
        "metadata"]["managedFields"]

    assert ours["fieldsV1"] == {"f:data": {"f:k": {}, "f:added": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}
    assert edit_rest["manager"] == "kubectl-edit"
    assert edit_rest["fieldsV1"] == {"f:metadata": {"f:annotations": {"f:injected": {}}}}, "the rule's field stays"
    only_ignored = {**edit, "fieldsV1": {"f:metadata": {"f:annotations": {"f:injected": {}}}}}
    assert takeover.patch(live(OURS, only_ignored, annotations={"injected": "x"}), takeover_names(),
                          ignore=Ignore(rules=(rule,))) is None, "nothing left to take"
    left_alone = Ignore(managers=frozenset({"kubectl-edit"}))
    assert takeover.managers(obj, takeover_names(), ignore=left_alone) == (), "a manager left alone is never taken"


def test_nothing_to_take_over_is_no_patch():
    assert takeover.patch(live(OURS, CONTROLLER, STATUS), takeover_names()) is None
    assert takeover.managers(live(OURS, CONTROLLER), takeover_names()) == ()
    assert takeover.patch(live(CSA), ()) is None, "an empty list turns it off"


def test_a_name_ending_in_a_star_is_a_prefix():
    rollout = {**CONTROLLER, "manager": "kubectl-rollout"}
    assert takeover.managers(live(rollout, CSA), ["kubectl-*"]) == ("kubectl-rollout", "kubectl-client-side-apply")
    assert takeover.managers(live(rollout, CSA), ["kubectl-client-side-apply"]) == ("kubectl-client-side-apply",)
    assert not takeover.matches("kubectl", ["kubectl-*"]) and takeover.matches("kubectl", ["kubectl"])


def takeover_names() -> tuple[str, ...]:
    from gitopsd.config import DEFAULT_TAKE_OVER_MANAGERS

    return DEFAULT_TAKE_OVER_MANAGERS


# ---------------------------------------------------------------- the real control plane

def kubectl(cluster, kubeconfig, *args: str, stdin: str | None = None) -> str:
    binary = str(cluster.dir.parent.parent / "bin" / "kubectl")
    proc = subprocess.run([binary, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def managers_of(kube, obj: dict) -> set[str]:
    res = kube.resource(obj["apiVersion"], obj["kind"])
    live_obj = kube.get(res, obj["metadata"]["name"], obj["metadata"]["namespace"])
    return {e["manager"] for e in live_obj["metadata"]["managedFields"] if not e.get("subresource")}


def labelled(obj: dict, **labels: str) -> dict:
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), **labels}
    return obj


@pytest.mark.cluster
@pytest.mark.parametrize("verb", ["apply", "create"])
def test_a_label_removed_from_git_after_adopting_an_object_kubectl_wrote_is_removed_from_the_cluster(
        app, repo, kube, cluster, kubeconfig, namespace, verb):
    web = labelled(deployment("web"), tier="frontend")
    web["metadata"]["namespace"] = namespace
    kubectl(cluster, kubeconfig, verb, "-f", "-", stdin=json.dumps(web))   # apply: client-side, as CI scripts do
    by_kubectl = managers_of(kube, web)
    assert by_kubectl and "gitopsd" not in by_kubectl
    repo.write("web.yaml", labelled(deployment("web"), tier="frontend"))
    repo.commit("adopt what kubectl applied")

    adopted = app.sync()

    assert adopted.outcome.value == "Applied", (adopted.reason, adopted.errors)
    (change,) = adopted.plan.changes
    assert change.action == Action.UPDATE and set(change.takeover) == by_kubectl
    live_web = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert takeover.LAST_APPLIED_ANNOTATION not in (live_web["metadata"].get("annotations") or {})
    assert not by_kubectl & managers_of(kube, web), "kubectl owns nothing of it any more"

    repo.write("web.yaml", deployment("web"))
    repo.commit("the tier label goes")
    removed = app.sync()

    assert removed.outcome.value == "Applied", (removed.reason, removed.errors)
    live_web = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert "tier" not in live_web["metadata"]["labels"], "gone from the cluster, as from Git"


@pytest.mark.cluster
def test_a_field_manager_not_on_the_list_keeps_its_field(app, repo, kube, cluster, kubeconfig, namespace):
    settings = labelled(configmap("settings", {"color": "blue"}), team="web")
    settings["metadata"]["namespace"] = namespace
    kubectl(cluster, kubeconfig, "apply", "-f", "-", stdin=json.dumps(settings))
    # An operator of the platform team labels it (its own field manager, an Update).
    cms = kube.resource("v1", "ConfigMap")
    kube.request("PATCH", cms.path(namespace, "settings"), body={"metadata": {"labels": {"cost-center": "42"}}},
                 content_type="application/merge-patch+json", query={"fieldManager": "cost-operator"})
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))   # Git has neither label
    repo.commit()

    result = app.sync()

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    labels = kube.get(cms, "settings", namespace)["metadata"]["labels"]
    assert "team" not in labels, "kubectl's label, taken over and not in Git, is removed"
    assert labels["cost-center"] == "42", "the operator's label stays: it is not on the list"
    assert "cost-operator" in managers_of(kube, settings)


@pytest.mark.cluster
def test_takeover_is_one_patch_and_only_where_a_listed_manager_wrote(app, repo, kube, cluster, kubeconfig,
                                                                       namespace):
    by_hand = configmap("by-hand", {"k": "v"}, namespace=namespace)
    kubectl(cluster, kubeconfig, "apply", "-f", "-", stdin=json.dumps(by_hand))
    repo.write("cm.yaml", [configmap("by-hand", {"k": "v"}), configmap("fresh", {"k": "v"})])
    repo.commit()

    before = dict(kube.requests)
    assert app.sync().outcome.value == "Applied"
    first = {verb: n - before.get(verb, 0) for verb, n in kube.requests.items()}
    before = dict(kube.requests)
    again = app.sync()
    second = {verb: n - before.get(verb, 0) for verb, n in kube.requests.items()}

    assert first.get("patch") == 1, first   # the adopted ConfigMap only, not the new one
    assert again.outcome.value == "NoChange" and not second.get("patch"), second


@pytest.mark.cluster
def test_an_object_with_a_listed_manager_is_an_update_even_when_nothing_else_differs(app, repo, kube, namespace):
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    cms = kube.resource("v1", "ConfigMap")
    # `kubectl edit` adds an annotation Git does not have: not drift of any field Git sets.
    kube.request("PATCH", cms.path(namespace, "settings"), body={"metadata": {"annotations": {"note": "by hand"}}},
                 content_type="application/merge-patch+json", query={"fieldManager": "kubectl-edit"})

    seen = app.sync(dry_run=True)
    (change,) = seen.plan.changes
    assert change.action == Action.UPDATE and change.takeover == ("kubectl-edit",)
    assert app.sync().outcome.value == "Applied"
    assert "note" not in (kube.get(cms, "settings", namespace)["metadata"].get("annotations") or {})
    assert app.sync().outcome.value == "NoChange"


@pytest.mark.cluster
def test_the_cli_takes_over_by_default_and_not_with_an_empty_list(repo, kube, cluster, kubeconfig, source_cache,
                                                                   namespace):
    for name in ("kept", "taken"):
        kubectl(cluster, kubeconfig, "apply", "-f", "-",
                stdin=json.dumps(configmap(name, {"k": "v"}, namespace=namespace, labels={"team": "web"})))
    cms = kube.resource("v1", "ConfigMap")

    def sync(name: str, *flags: str) -> dict:
        repo.write("cm.yaml", configmap(name, {"k": "v"}))
        repo.commit(name)
        _, result = gitopsd_json("sync", "--repo", repo.url, "--namespace", namespace, "--app", name,
                                 "--inventory-namespace", namespace, *flags, kubeconfig=kubeconfig,
                                 cache=source_cache, expect=0)
        return result

    kept = sync("kept", "--take-over-managers", "")
    taken = sync("taken")

    assert kept["plan"]["changes"][0]["takeover"] == []
    assert kube.get(cms, "kept", namespace)["metadata"]["labels"]["team"] == "web", "kubectl still owns it"
    assert taken["plan"]["changes"][0]["takeover"] == ["kubectl-client-side-apply"]
    assert "team" not in kube.get(cms, "taken", namespace)["metadata"]["labels"]


@pytest.mark.cluster
def test_a_field_an_ignore_rule_names_stays_with_its_manager_when_the_rest_is_taken_over(app, repo, kube, namespace):
    from gitopsd.config import IgnoreDifference

    injected = IgnoreDifference(kind="ConfigMap", json_pointers=("/metadata/annotations/injected",))
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    assert app.sync(ignore_differences=(injected,)).outcome.value == "Applied"
    cms = kube.resource("v1", "ConfigMap")
    # One hand edit: an annotation the app means to allow, and an extra key it does not.
    kube.request("PATCH", cms.path(namespace, "settings"), content_type="application/merge-patch+json",
                 body={"metadata": {"annotations": {"injected": "by hand"}}, "data": {"extra": "by hand"}},
                 query={"fieldManager": "kubectl-edit"})

    result = app.sync(ignore_differences=(injected,))

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    live = kube.get(cms, "settings", namespace)
    assert "extra" not in live["data"], "taken over and not in Git: removed"
    assert live["metadata"]["annotations"]["injected"] == "by hand", "the rule's field is left to its manager"
    assert "kubectl-edit" in managers_of(kube, live)
    assert app.sync(ignore_differences=(injected,)).outcome.value == "NoChange", "nothing left to take"
