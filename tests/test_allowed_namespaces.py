"""allowedNamespaces: an app writes only there (and may own those Namespace objects)."""

from __future__ import annotations

import pytest
from helpers import configmap

pytestmark = pytest.mark.cluster


def test_app_may_create_its_allowed_namespace_and_write_into_it(app, repo, kube, namespace):
    own = f"{namespace}-own"
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": own}})
    repo.write("cm.yaml", configmap("inside", {"k": "v"}, namespace=own))
    repo.commit()
    try:
        result = app.sync(allowed_namespaces=(own,))
        assert result.outcome.value == "Applied", (result.reason, result.errors)
    finally:
        kube.delete(kube.resource("v1", "Namespace"), own)


def test_objects_outside_the_allowed_namespaces_are_refused_before_any_write(app, repo, kube, namespace):
    repo.write("mine.yaml", configmap("mine", {"k": "v"}))
    repo.write("theirs.yaml", configmap("theirs", {"k": "v"}, namespace="kube-system"))
    repo.write("role.yaml", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                             "metadata": {"name": f"{namespace}-role"}, "rules": []})
    repo.commit()

    result = app.sync(allowed_namespaces=(namespace,))

    assert result.outcome.value == "Failed"
    text = "\n".join(result.errors)
    assert "theirs.yaml" in text and "may not write to namespace 'kube-system'" in text
    assert "role.yaml" in text and "may not write to cluster scope" in text
    assert kube.get(kube.resource("v1", "ConfigMap"), "mine", namespace) is None
