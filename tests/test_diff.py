"""Pure logic of gitopsd.engine.diff: comparing, redacting, attributing drift."""

from __future__ import annotations

from gitopsd.engine.diff import (
    REDACTED,
    REDACTED_CHANGED,
    compare,
    managers_of,
    redact_pair,
    within,
)


def secret(**data) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "annotations": {
        "gitopsd.io/desired-hash": "0123456789abcdef0123456789abcdef"}}, "data": data}


def test_secret_values_are_masked_and_only_changes_are_marked():
    live, after = redact_pair(secret(a="b2xk", same="eA=="), secret(a="bmV3", same="eA==", added="eQ=="))
    assert live["data"] == {"a": REDACTED, "same": REDACTED}
    assert after["data"] == {"a": REDACTED_CHANGED, "same": REDACTED, "added": REDACTED}
    assert after["metadata"]["annotations"]["gitopsd.io/desired-hash"] == REDACTED, "a hash of the values"


def test_a_secret_diff_names_keys_never_values():
    d = compare(secret(password="aHVudGVyMg=="), secret(password="czNjcmV0"), label="Secret/app/db")
    assert d.fields == ("data.password",)
    assert "aHVudGVyMg==" not in d.text and "czNjcmV0" not in d.text and "0123456789abcdef" not in d.text


def test_server_maintained_metadata_and_status_are_not_drift():
    live = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "resourceVersion": "7", "uid": "u",
            "managedFields": [{}], "creationTimestamp": "t"}, "data": {"k": "v"}, "status": {"x": 1}}
    after = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "resourceVersion": "8"},
             "data": {"k": "v"}}
    assert compare(live, after, label="c").empty


def test_within_matches_dotted_keys_and_list_indices():
    desired = {"metadata": {"labels": {"app.kubernetes.io/name": "web"}},
               "spec": {"template": {"spec": {"containers": [{"image": "i"}]}}}}
    assert within(desired, "metadata.labels.app.kubernetes.io/name")
    assert within(desired, "spec.template.spec.containers[0].image")
    assert not within(desired, "spec.template.spec.containers[1].image")
    assert not within(desired, "metadata.annotations.deployment.kubernetes.io/revision")


def test_managers_of_names_who_owns_the_drifted_field():
    live = {"metadata": {"managedFields": [
        {"manager": "gitopsd", "operation": "Apply", "fieldsV1": {"f:spec": {"f:template": {}}}},
        {"manager": "kubectl-set", "operation": "Update", "time": "2026-11-26T10:00:00Z", "fieldsV1": {
            "f:spec": {"f:template": {"f:spec": {"f:containers": {
                'k:{"name":"web"}': {"f:image": {}}}}}}}},
        {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
         "fieldsV1": {"f:status": {}}},
    ]}}
    assert managers_of(live, ["spec.template.spec.containers[0].image"]) == ["kubectl-set (Update)"]
