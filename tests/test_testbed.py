"""The test bed itself: a real control plane whose controllers really run.

Every later cluster test relies on these behaviours, so they are proven
first and on their own.
"""

from __future__ import annotations

import pytest
from helpers import wait_for
from kubernetes import client
from kubernetes.dynamic import DynamicClient

pytestmark = pytest.mark.cluster


def test_nodes_are_ready(api_client):
    nodes = client.CoreV1Api(api_client).list_node().items
    assert len(nodes) >= 3
    for node in nodes:
        ready = {c.type: c.status for c in node.status.conditions}
        assert ready.get("Ready") == "True", node.metadata.name
    zones = {n.metadata.labels["topology.kubernetes.io/zone"] for n in nodes}
    assert len(zones) == 3, "fake nodes are spread over three zones for topology tests"


def test_fake_nodes_renew_their_leases(api_client):
    """The node lifecycle controller judges liveness by the node Lease; KWOK
    must renew one per node, or every node turns NotReady once the grace
    period after its last status update runs out (and every pod with it)."""
    from kubernetes import watch

    coord = client.CoordinationV1Api(api_client)
    nodes = [n.metadata.name for n in client.CoreV1Api(api_client).list_node().items]
    leases = coord.list_namespaced_lease("kube-node-lease")
    first = {lease.metadata.name: lease.spec.renew_time for lease in leases.items}
    assert set(nodes) <= set(first), f"nodes without a Lease: {sorted(set(nodes) - set(first))}"
    renewed: set[str] = set()
    for event in watch.Watch().stream(coord.list_namespaced_lease, "kube-node-lease",
                                      resource_version=leases.metadata.resource_version, timeout_seconds=90):
        lease = event["object"]
        if lease.metadata.name in first and lease.spec.renew_time > first[lease.metadata.name]:
            renewed.add(lease.metadata.name)
        if renewed >= set(nodes):
            break
    assert renewed >= set(nodes), f"leases not renewed within 90 s: {sorted(set(nodes) - renewed)}"


def test_deployment_becomes_available(api_client, namespace):
    apps = client.AppsV1Api(api_client)
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}},
        },
    })

    def available():
        d = apps.read_namespaced_deployment("web", namespace)
        conds = {c.type: c.status for c in (d.status.conditions or [])}
        return d.status.available_replicas == 3 and conds.get("Available") == "True"

    wait_for("Deployment web Available with 3 replicas", available)
    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    for pod in pods:
        assert pod.status.phase == "Running"
        assert pod.spec.node_name.startswith("kwok-node-")


def test_namespace_deletion_completes(api_client):
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", {"metadata": {"name": "cm"}, "data": {"a": "b"}})
    core.delete_namespace("doomed")

    def gone():
        try:
            core.read_namespace("doomed")
            return False
        except client.ApiException as exc:
            return exc.status == 404

    wait_for("namespace doomed to be finalized and removed", gone)


def test_server_side_apply_creates_then_updates_with_field_manager(api_client, namespace):
    dyn = DynamicClient(api_client)
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "namespace": namespace},
            "data": {"color": "blue"}}

    created = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert created.data.color == "blue"
    managers = [m.manager for m in created.metadata.managedFields]
    assert managers == ["gitopsd"]

    body["data"]["color"] = "green"
    updated = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert updated.data.color == "green"
    assert updated.metadata.resourceVersion != created.metadata.resourceVersion

    again = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert again.metadata.resourceVersion == updated.metadata.resourceVersion, \
        "an identical apply must be a no-op on the server"


def test_crd_becomes_established_and_custom_resource_can_be_created(api_client, namespace):
    ext = client.ApiextensionsV1Api(api_client)
    ext.create_custom_resource_definition({
        "metadata": {"name": "widgets.testbed.gitopsd.io"},
        "spec": {
            "group": "testbed.gitopsd.io",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
            }}}],
        },
    })
    try:
        def established():
            crd = ext.read_custom_resource_definition("widgets.testbed.gitopsd.io")
            return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

        wait_for("CRD Established", established)
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object("testbed.gitopsd.io", "v1", namespace, "widgets", {
            "apiVersion": "testbed.gitopsd.io/v1", "kind": "Widget",
            "metadata": {"name": "w1"}, "spec": {"size": 3},
        })
        got = custom.get_namespaced_custom_object("testbed.gitopsd.io", "v1", namespace, "widgets", "w1")
        assert got["spec"]["size"] == 3
    finally:
        ext.delete_custom_resource_definition("widgets.testbed.gitopsd.io")


def test_token_request_authenticates_and_rbac_denies_what_was_not_granted(api_client, namespace, cluster):
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })
    tr = core.create_namespaced_service_account_token("reader", namespace, {
        "spec": {"expirationSeconds": 600},
    })
    token = tr.status.token
    assert token.count(".") == 2, "a JWT"

    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = str(cluster.dir / "pki" / "ca.crt")
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    as_sa = client.CoreV1Api(client.ApiClient(cfg))

    # Authenticates: the RBAC grant works ...
    assert as_sa.list_namespaced_config_map(namespace).items is not None
    # ... and what was not granted is denied by RBAC (403), not unauthenticated (401).
    with pytest.raises(client.ApiException) as denied:
        as_sa.list_namespaced_secret(namespace)
    assert denied.value.status == 403
    assert "system:serviceaccount:%s:reader" % namespace in denied.value.body
    with pytest.raises(client.ApiException) as denied_write:
        as_sa.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}})
    assert denied_write.value.status == 403
