"""An app's manifests cannot overwrite or impersonate gitopsd's own state:
the ApplySet parents, the status, the audit trail and the leader Lease live
in gitopsd's namespace, and a repo that wrote them could rewrite history or
take leadership. Each case is refused before any write, naming the object."""

from __future__ import annotations

import pytest
from helpers import configmap

pytestmark = pytest.mark.cluster


def _snapshot(kube, namespace):
    """name -> resourceVersion of every ConfigMap and Lease in the namespace."""
    out = {}
    for api_version, kind in (("v1", "ConfigMap"), ("coordination.k8s.io/v1", "Lease")):
        for obj in kube.list(kube.resource(api_version, kind), namespace=namespace):
            out[f"{kind}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
    return out


@pytest.mark.parametrize("name, body", [
    ("audit segment", lambda ns: configmap("gitopsd-audit-victim-000001", {"records": "[]"}, namespace=ns)),
    ("another app's parent", lambda ns: configmap("gitopsd-victim", {"status": "{}"}, namespace=ns)),
    ("leader lease", lambda ns: {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": "gitopsd-leader", "namespace": ns},
                                 "spec": {"holderIdentity": "attacker", "leaseDurationSeconds": 3600}}),
    ("forged applyset id label", lambda ns: configmap("looks-like-a-parent", {"k": "v"}, namespace=ns, labels={
        "applyset.kubernetes.io/id": "applyset-forged-v1"})),
    ("forged audit label", lambda ns: configmap("looks-like-audit", {"k": "v"}, namespace=ns, labels={
        "gitopsd.io/audit-app": "victim"})),
])
def test_an_app_cannot_write_gitopsds_own_state(app, repo, kube, namespace, name, body):
    repo.write("ok.yaml", configmap("harmless", {"k": "v"}))
    repo.write("own.yaml", body(namespace))    # the app's inventory lives in this namespace (see conftest)
    repo.commit()
    before = _snapshot(kube, namespace)

    result = app.sync()

    assert result.outcome.value == "Failed", (name, result.reason)
    assert any(e.startswith("own.yaml:") and "gitopsd" in e for e in result.errors), result.errors
    assert _snapshot(kube, namespace) == before, "nothing was written"


def test_gitopsd_named_objects_outside_its_namespace_are_an_apps_own(app, repo, kube, namespace):
    """The reserved names hold only in gitopsd's namespace: elsewhere they are ordinary names."""
    repo.write("cm.yaml", configmap("gitopsd-settings", {"k": "v"}, namespace=f"{namespace}-apps"))
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"{namespace}-apps"}})
    repo.commit()
    try:
        result = app.sync()
        assert result.outcome.value == "Applied", (result.reason, result.errors)
    finally:
        kube.delete(kube.resource("v1", "Namespace"), f"{namespace}-apps")
