"""A commit with invalid objects leaves the cluster untouched and reports every error."""

from __future__ import annotations

import pytest
from helpers import configmap, deployment

pytestmark = pytest.mark.cluster


def test_invalid_objects_leave_the_cluster_untouched_and_all_are_reported(app, repo, kube, namespace):
    repo.write("good.yaml", configmap("good", {"k": "v"}))
    bad_deploy = deployment("bad-replicas")
    bad_deploy["spec"]["replicas"] = -3
    repo.write("bad1.yaml", bad_deploy)
    repo.write("bad2.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad-svc"},
                             "spec": {"ports": [{"port": 99999}]}})
    repo.commit()

    result = app.sync()

    assert result.outcome.value == "Failed"
    assert len(result.errors) == 2, result.errors
    joined = "\n".join(result.errors)
    assert "bad1.yaml" in joined and "bad-replicas" in joined and "replicas" in joined
    assert "bad2.yaml" in joined and "bad-svc" in joined and "99999" in joined
    assert kube.get(kube.resource("v1", "ConfigMap"), "good", namespace) is None, "nothing was applied"
    assert kube.get(kube.resource("v1", "ConfigMap"), f"gitopsd-{namespace}", namespace) is None


def test_malformed_yaml_names_the_file_and_applies_nothing(app, repo, kube, namespace):
    repo.write("good.yaml", configmap("good", {"k": "v"}))
    repo.write("broken.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n data: [unclosed\n")
    repo.commit()

    result = app.sync()

    assert result.outcome.value == "Failed"
    assert "broken.yaml" in "\n".join(result.errors)
    assert kube.get(kube.resource("v1", "ConfigMap"), "good", namespace) is None


def test_object_in_a_namespace_that_does_not_exist_fails_before_any_write(app, repo, kube, namespace):
    repo.write("good.yaml", configmap("good", {"k": "v"}))
    repo.write("elsewhere.yaml", configmap("x", {"k": "v"}, namespace="no-such-namespace-here"))
    repo.commit()

    result = app.sync()

    assert result.outcome.value == "Failed"
    assert "no-such-namespace-here" in "\n".join(result.errors)
    assert kube.get(kube.resource("v1", "ConfigMap"), "good", namespace) is None


def test_namespace_and_its_objects_in_one_commit(app, repo, kube, namespace):
    ns = f"{namespace}-extra"
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    repo.write("cm.yaml", configmap("inside", {"k": "v"}, namespace=ns))
    repo.commit()
    try:
        result = app.sync()
        assert result.outcome.value == "Applied", (result.reason, result.errors)
        assert kube.get(kube.resource("v1", "ConfigMap"), "inside", ns) is not None
    finally:
        kube.delete(kube.resource("v1", "Namespace"), ns)
