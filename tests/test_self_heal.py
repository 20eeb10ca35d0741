"""Self-heal is a small commit through the one pipeline (gitopsd.engine.sync.heal).

A hand edit is planned, applied in stages, health-checked and recorded by the
same code as a push; it never prunes, never rewrites the ApplySet parent,
costs no more requests than the old hand-built path (one dry-run and one
apply for an edit), and a correction the apiserver refuses is a Failed
result naming the object and the reason, never a Secret value. The daemon
tests run `gitopsd run` against the real control plane; the request-count
and leadership tests call the engine directly, where the requests of one
heal can be counted alone.
"""

from __future__ import annotations

import base64
import subprocess

import pytest
from helpers import (
    app_entry,
    audit_events,
    cm_data,
    configmap,
    deployment,
    metric,
    post_generic,
    wait_audit,
    wait_for,
    write_config,
)

from gitopsd import audit
from gitopsd.engine import inventory
from gitopsd.engine.plan import heal_set
from gitopsd.engine.render import Manifest
from gitopsd.engine.sync import Outcome, heal
from gitopsd.errors import LeadershipLost
from gitopsd.kube import KubeApiError
from gitopsd.objects import ObjectRef, ref_of

pytestmark = pytest.mark.cluster

PASSWORD = "hunter2-from-git-0451"


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _daemon_with(repo, tmp_path, start_daemon, namespace, objects: dict[str, object], **entry):
    """A repo holding `objects` (file -> body), one app over it, a daemon, and its first Applied."""
    for path, body in objects.items():
        repo.write(path, body)
    sha = repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(namespace, repo.url, namespace, **entry)])
    daemon = start_daemon(config, "--no-leader-elect")
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied", "first sync", 60)
    return daemon, sha


def _heal_line(daemon, what: str, **match) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == "self-heal"
                             and all(e.get(k) == v for k, v in match.items()), what, 30)


def _kubectl(cluster, kubeconfig, *args: str) -> None:
    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), *args], check=True, capture_output=True)


# ---------------------------------------------------------------- through the daemon

def test_a_hand_edit_is_corrected_by_a_self_heal_result(repo, kube, namespace, tmp_path, start_daemon, cluster,
                                                        kubeconfig):
    daemon, sha = _daemon_with(repo, tmp_path, start_daemon, namespace,
                               {"web.yaml": deployment("web", replicas=2),
                                "cm.yaml": configmap("settings", {"color": "blue"})})

    _kubectl(cluster, kubeconfig, "-n", namespace, "scale", "deployment/web", "--replicas=5")

    healed = _heal_line(daemon, "the self-heal result")
    assert healed["outcome"] == "Applied" and healed["revision"] == sha, healed
    assert healed["applied"] == [f"update Deployment.apps/{namespace}/web"], "only the drifted object"
    record = wait_audit(daemon, "the drift record", app=namespace, type="drift")
    assert record["action"] == "corrected" and record["revision"] == sha
    assert record["object"]["kind"] == "Deployment" and record["fields"] == ["spec.replicas"]
    assert any(m.startswith("kubectl") for m in record["managers"]), record["managers"]
    assert kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)["spec"]["replicas"] == 2
    assert metric(daemon, "gitopsd_reconcile_total", app=namespace, trigger="self-heal", outcome="Applied") == 1


def test_a_deleted_namespace_comes_back_before_the_objects_in_it(repo, kube, namespace, tmp_path, start_daemon):
    owned = f"{namespace}-own"
    namespaces = kube.resource("v1", "Namespace")
    try:
        daemon, _ = _daemon_with(repo, tmp_path, start_daemon, namespace, {
            "ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": owned}},
            "cm.yaml": configmap("inside", {"k": "v"}, namespace=owned),
        })
        uid = kube.get(namespaces, owned)["metadata"]["uid"]

        kube.delete(namespaces, owned)   # the namespace controller deletes the ConfigMap, then the Namespace

        healed = _heal_line(daemon, "the Namespace and its ConfigMap re-created", outcome="Applied")
        assert healed["applied"] == [f"create Namespace/{owned}", f"create ConfigMap/{owned}/inside"], \
            "stage 0 (the Namespace) first, then what lives in it"
        assert kube.get(namespaces, owned)["metadata"]["uid"] != uid
        assert cm_data(kube, owned, "inside") == {"k": "v"}
        wait_audit(daemon, "both drift records", after=1, app=namespace, type="drift", action="corrected")
        corrected = {(r["object"]["kind"], r["deleted"]) for r in audit_events(daemon, namespace, type="drift",
                                                                               action="corrected")}
        assert corrected == {("Namespace", True), ("ConfigMap", True)}
        assert not audit_events(daemon, namespace, type="drift", action="failed"), \
            "nothing is tried while the Namespace is terminating"
    finally:
        kube.delete(namespaces, owned)


def test_a_deleted_crd_comes_back_before_its_custom_resources(repo, kube, namespace, tmp_path, start_daemon):
    group = f"{namespace}.heal.gitopsd.test"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"widgets.{group}"},
           "spec": {"group": group, "scope": "Namespaced",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                      "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]}}
    widget = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}
    crds = kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    try:
        daemon, _ = _daemon_with(repo, tmp_path, start_daemon, namespace, {"crd.yaml": crd, "widget.yaml": widget})

        kube.delete(crds, f"widgets.{group}")   # its custom resources go with it

        healed = _heal_line(daemon, "the CRD and its Widget re-created", outcome="Applied")
        assert healed["applied"] == [f"create CustomResourceDefinition.apiextensions.k8s.io/widgets.{group}",
                                     f"create Widget.{group}/{namespace}/w"], healed
        kube.discover()
        assert kube.get(kube.resource(f"{group}/v1", "Widget"), "w", namespace)["spec"] == {"size": 3}
    finally:
        kube.delete(crds, f"widgets.{group}")


def test_a_heal_never_prunes_and_never_rewrites_the_applyset_parent(repo, kube, namespace, tmp_path, start_daemon):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    daemon, _ = _daemon_with(repo, tmp_path, start_daemon, namespace,
                             {"cm.yaml": configmap("settings", {"color": "blue"}), "svc.yaml": service})
    cms = kube.resource("v1", "ConfigMap")
    inv = inventory.load(kube, app=namespace, namespace=namespace)
    # A member that left Git: the next full reconcile prunes it; a heal must not.
    kube.apply(configmap("stray", {"k": "v"}, namespace=namespace,
                         labels={inventory.PART_OF_LABEL: inv.id}), field_manager="gitopsd")
    parent_before = _parent_record(kube, namespace)

    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = "hand-painted"
    kube.request("PUT", cms.path(namespace, "settings"), body=live)

    assert _heal_line(daemon, "the hand edit corrected")["outcome"] == "Applied"
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}
    assert cm_data(kube, namespace, "stray") == {"k": "v"}, "a heal prunes nothing"
    assert _parent_record(kube, namespace) == parent_before, \
        "the parent still records the Service kind and was not written by the heal"

    # The stray object really was prunable: the next commit's reconcile removes it.
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    post_generic(daemon, repo.url, repo.commit("green"))
    wait_for("the stray member pruned by a reconcile", lambda: cm_data(kube, namespace, "stray") is None, 30)


def _parent_record(kube, namespace: str) -> tuple:
    """The parent's ApplySet annotations and when the gitopsd manager last changed them."""
    parent = kube.get(kube.resource("v1", "ConfigMap"), inventory.parent_name(namespace), namespace)
    meta = parent["metadata"]
    ours = [(m.get("time"), m.get("fieldsV1")) for m in meta["managedFields"] if m["manager"] == "gitopsd"]
    annotations = {k: v for k, v in meta["annotations"].items() if k.startswith("applyset.kubernetes.io/")}
    return annotations, ours


def test_a_heal_restores_the_last_applied_commit_not_one_the_prune_guard_refused(repo, kube, namespace, tmp_path,
                                                                                  start_daemon):
    daemon, applied_sha = _daemon_with(repo, tmp_path, start_daemon, namespace,
                                       {f"{n}.yaml": configmap(n, {"color": "blue"}) for n in "abcd"})
    for n in "bcd":
        repo.remove(f"{n}.yaml")
    repo.write("a.yaml", configmap("a", {"color": "green"}))
    refused_sha = repo.commit("drop three of four, repaint a")
    post_generic(daemon, repo.url, refused_sha)
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Refused", "the prune guard", 30)

    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "a", namespace)
    live["data"]["color"] = "hand-painted"
    kube.request("PUT", cms.path(namespace, "a"), body=live)

    healed = _heal_line(daemon, "the hand edit corrected")
    assert healed["outcome"] == "Applied" and healed["revision"] == applied_sha
    assert cm_data(kube, namespace, "a") == {"color": "blue"}, "what is live, not what the guard refused"


@pytest.fixture
def frozen_password(kube, namespace):
    """A ValidatingAdmissionPolicy in the test's namespace refusing any update that sets
    Secret db's password to PASSWORD (the first create passes): the apiserver rejects the heal."""
    name = f"{namespace}-frozen"
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {
                           "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
                                              "resources": ["secrets"]}],
                           "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
                       "validations": [{
                           # CEL sees a Secret's data values as their base64 text.
                           "expression": f"object.metadata.name != 'db' || !has(object.data) || "
                                         f"!('password' in object.data) || object.data.password != '{_b64(PASSWORD)}'",
                           # Echoes the value, as real policies' messages do: gitopsd must scrub it.
                           "messageExpression": "'password ' + object.data.password + ' is frozen'"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": ["Deny"]}}

    def install():
        kube.apply(policy, field_manager="test")
        kube.apply(binding, field_manager="test")

    yield install
    for kind in ("ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy"):
        kube.delete(kube.resource("admissionregistration.k8s.io/v1", kind), name)


def test_a_heal_the_apiserver_rejects_is_failed_naming_the_object_and_reason_never_the_value(
        repo, kube, namespace, tmp_path, start_daemon, frozen_password):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
              "data": {"password": _b64(PASSWORD)}}
    daemon, _ = _daemon_with(repo, tmp_path, start_daemon, namespace, {"secret.yaml": secret})
    frozen_password()
    desired = {**secret, "metadata": {"name": "db", "namespace": namespace}}
    wait_for("the policy enforced", lambda: _refused(kube, desired), 30, interval=0.1)

    secrets = kube.resource("v1", "Secret")
    live = kube.get(secrets, "db", namespace)
    live["data"]["password"] = _b64("hand-edited-value-77")
    kube.request("PUT", secrets.path(namespace, "db"), body=live, query={"fieldManager": "kubectl-edit"})

    failed = _heal_line(daemon, "the refused heal", outcome="Failed")
    assert f"Secret/{namespace}/db" in failed["reason"] and "is frozen" in failed["reason"], failed["reason"]
    record = wait_audit(daemon, "the drift record", app=namespace, type="drift")
    assert record["action"] == "failed" and record["fields"] == ["data.password"]
    assert f"secret.yaml: Secret/{namespace}/db:" in record["error"] and "is frozen" in record["error"]
    assert "kubectl-edit (Update)" in record["managers"]
    stored = audit.history(kube, namespace=namespace, app=namespace)[0]
    assert stored["type"] == "drift" and stored["error"] == record["error"]
    text = daemon.log_path.read_text()
    for value in (PASSWORD, _b64(PASSWORD), "hand-edited-value-77", _b64("hand-edited-value-77")):
        assert value not in text and value not in str(stored), f"{value} leaked"


def _refused(kube, desired: dict) -> bool:
    try:
        kube.apply(desired, dry_run=True)
    except KubeApiError:
        return True
    return False


def test_self_heal_off_reports_through_the_plan_and_writes_nothing(repo, kube, namespace, tmp_path, start_daemon):
    daemon, sha = _daemon_with(repo, tmp_path, start_daemon, namespace,
                               {"cm.yaml": configmap("settings", {"color": "blue"})}, selfHeal=False)
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = "hand-painted"
    edited = kube.request("PUT", cms.path(namespace, "settings"), body=live, query={"fieldManager": "kubectl-edit"})

    report = daemon.wait_event(lambda e: e.get("event") == "drift detected", "the drift report", 30)
    assert report["action"] == "reported" and report["fields"] == ["data.color"]
    assert report["managers"] == ["kubectl-edit (Update)"]
    assert metric(daemon, "gitopsd_reconcile_total", app=namespace, trigger="self-heal", outcome="DryRun") >= 1
    after = kube.get(cms, "settings", namespace)
    assert after["metadata"]["resourceVersion"] == edited["metadata"]["resourceVersion"], "nothing was written"
    assert not [e for e in daemon.events() if e.get("event") == "self-heal"]
    record = wait_audit(daemon, "the drift record", app=namespace, type="drift")
    assert record["action"] == "reported" and record["revision"] == sha


# ---------------------------------------------------------------- the engine's heal, counted

class _Members:
    """A LiveCache as the daemon's informers keep it: the app's members, read once
    (outside the counted window), including the hand edit the watch delivered."""

    def __init__(self, kube, plan) -> None:
        self.targets = set(plan.targets)
        self._members = {ref_of(o): o for res, ns in plan.targets
                         for o in kube.list(res, namespace=ns, label_selector=plan.inventory.selector)}

    def members(self) -> dict:
        return self._members


def _applied(app, repo, objects: list[dict]):
    repo.write("objs.yaml", objects)
    repo.commit()
    result = app.sync()
    assert result.outcome == Outcome.APPLIED, result.reason
    manifests = [Manifest(obj=c.desired, source=c.source) for c in result.plan.changes if c.desired]
    return result, manifests


def _heal_counted(kube, app, result, manifests, refs, *, cache=None):
    before = dict(kube.requests)
    healed = heal(kube, app.spec(), manifests=manifests, refs=refs, revision=result.revision,
                  inv=result.plan.inventory, cache=cache)
    return healed, {verb: n - before.get(verb, 0) for verb, n in kube.requests.items() if n != before.get(verb, 0)}


def test_a_hand_edit_costs_one_dry_run_and_one_apply(app, repo, kube, namespace):
    result, manifests = _applied(app, repo, [configmap("a", {"k": "a"}), configmap("b", {"k": "b"})])
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "a", namespace)
    live["data"]["k"] = "hand"
    kube.request("PUT", cms.path(namespace, "a"), body=live)

    healed, requests = _heal_counted(kube, app, result, manifests, {ref_of(live)},
                                     cache=_Members(kube, result.plan))

    assert healed.outcome == Outcome.APPLIED and [str(c.ref) for c in healed.applied] == [str(ref_of(live))]
    assert requests == {"apply-dry-run": 1, "apply": 1}, "the member cache answers the read; no parent write"
    assert cm_data(kube, namespace, "a") == {"k": "a"}


def test_a_deleted_object_costs_one_dry_run_and_one_apply(app, repo, kube, namespace):
    result, manifests = _applied(app, repo, [configmap("a", {"k": "a"})])
    cms = kube.resource("v1", "ConfigMap")
    kube.delete(cms, "a", namespace)

    healed, requests = _heal_counted(kube, app, result, manifests, {ObjectRef("", "ConfigMap", namespace, "a")},
                                     cache=_Members(kube, result.plan))

    assert healed.outcome == Outcome.APPLIED and [c.action.value for c in healed.applied] == ["create"]
    (drift,) = healed.drift
    assert drift.deleted and drift.fields == ()
    # Whether the name is taken by someone else's object: the dry-run says (a create has no
    # resourceVersion), so no read.
    assert requests == {"apply-dry-run": 1, "apply": 1}


def test_a_field_gitopsd_does_not_own_is_not_drift(app, repo, kube, namespace):
    result, manifests = _applied(app, repo, [configmap("a", {"k": "a"})])
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "a", namespace)
    live["data"]["added-by-hand"] = "x"
    live["metadata"]["annotations"] = {**live["metadata"]["annotations"], "team": "ops"}
    kube.request("PUT", cms.path(namespace, "a"), body=live)

    healed, requests = _heal_counted(kube, app, result, manifests, {ref_of(live)},
                                     cache=_Members(kube, result.plan))

    assert healed.outcome == Outcome.NO_CHANGE and healed.drift == [] and requests == {}
    assert cm_data(kube, namespace, "a") == {"k": "a", "added-by-hand": "x"}


def _recreated_by_hand_with_another_selector(kube, namespace: str) -> dict:
    """Someone deletes the Deployment and creates it again, labels and all, with another selector."""
    deps = kube.resource("apps/v1", "Deployment")
    live = kube.get(deps, "web", namespace)
    kube.delete(deps, "web", namespace)
    wait_for("the Deployment gone", lambda: kube.get(deps, "web", namespace) is None, 30, interval=0.05)
    meta = {k: v for k, v in live["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
    spec = live["spec"]
    spec["selector"]["matchLabels"]["app"] = "web-by-hand"
    spec["template"]["metadata"]["labels"]["app"] = "web-by-hand"
    return kube.request("POST", deps.path(namespace), body={"apiVersion": "apps/v1", "kind": "Deployment",
                                                            "metadata": meta, "spec": spec},
                        query={"fieldManager": "kubectl-create"})


@pytest.mark.parametrize("recreate", [False, True], ids=["reported", "recreated-when-opted-in"])
def test_immutable_field_drift_is_reported_not_corrected_unless_recreate_is_on(app, repo, kube, namespace, recreate):
    result, manifests = _applied(app, repo, [deployment("web")])
    hand = _recreated_by_hand_with_another_selector(kube, namespace)

    healed = heal(kube, app.spec(recreate=recreate), manifests=manifests, refs={ref_of(hand)},
                  revision=result.revision, inv=result.plan.inventory)

    live = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    (drift,) = healed.drift
    assert "spec.selector.matchLabels.app" in drift.fields and "kubectl-create (Update)" in drift.managers
    if recreate:
        assert healed.outcome == Outcome.APPLIED and [c.action.value for c in healed.applied] == ["recreate"]
        assert live["metadata"]["uid"] != hand["metadata"]["uid"] and live["spec"]["selector"]["matchLabels"]["app"] == "web"
    else:
        assert healed.outcome == Outcome.FAILED and not healed.applied
        (error,) = healed.errors
        assert "immutable" in error and "gitopsd.io/recreate" in error, "the hint says how to allow it"
        assert live["metadata"]["uid"] == hand["metadata"]["uid"], "left as it is"


def test_a_heal_that_loses_the_lease_sends_nothing_and_raises_leadership_lost(app, repo, kube, namespace):
    from gitopsd.daemon.leader import FencedKube

    result, manifests = _applied(app, repo, [configmap("a", {"k": "a"})])
    cms = kube.resource("v1", "ConfigMap")
    kube.delete(cms, "a", namespace)

    def lost() -> None:
        raise LeadershipLost()

    with pytest.raises(LeadershipLost) as caught:
        heal(FencedKube(kube, lost), app.spec(), manifests=manifests, refs={ObjectRef("", "ConfigMap", namespace, "a")},
             revision=result.revision, inv=result.plan.inventory)
    assert caught.value.unsent == 1
    assert cm_data(kube, namespace, "a") is None


# ---------------------------------------------------------------- what a heal plans (pure)

def _m(obj: dict) -> Manifest:
    return Manifest(obj=obj, source="x.yaml")


def test_a_heal_plans_what_the_drifted_objects_stand_on_and_what_stands_on_them():
    ns = _m({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    crd = _m({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
              "metadata": {"name": "widgets.example.com"},
              "spec": {"group": "example.com", "names": {"kind": "Widget", "plural": "widgets"}}})
    cm = _m(configmap("settings", {}, namespace="shop"))
    other = _m(configmap("other", {}, namespace="elsewhere"))
    widget = _m({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "elsewhere"}})
    everything = [ns, crd, cm, other, widget]

    def refs(*ms):
        return {m.ref for m in ms}

    assert heal_set(everything, refs(cm)) == [ns, cm], "a ConfigMap and the Namespace it lives in"
    assert heal_set(everything, refs(ns)) == [ns, cm], "a Namespace and what the app keeps in it"
    assert heal_set(everything, refs(widget)) == [crd, widget], "a custom resource and its CRD"
    assert heal_set(everything, refs(crd)) == [crd, widget], "a CRD and its custom resources"
    assert heal_set(everything, refs(other)) == [other], "nothing else: its Namespace is not the app's"
    assert heal_set(everything, {ObjectRef("", "ConfigMap", "shop", "gone-from-git")}) == []
