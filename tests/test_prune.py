"""Prune: exactly what left Git, never what is not ours, never a whole app by accident."""

from __future__ import annotations

import pytest

from helpers import configmap

pytestmark = pytest.mark.cluster


def _names(kube, namespace):
    return sorted(o["metadata"]["name"] for o in kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace)
                  if o["metadata"]["name"] != "kube-root-ca.crt" and not o["metadata"]["name"].startswith("gitopsd-"))


def test_removing_a_file_prunes_exactly_that_object(app, repo, kube, namespace):
    for name in ("a", "b", "c", "d"):
        repo.write(f"{name}.yaml", configmap(name, {"k": name}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"

    repo.remove("c.yaml")
    repo.commit("drop c")
    result = app.sync()

    assert result.outcome.value == "Applied", result.reason
    assert [str(c.ref) for c in result.pruned] == [f"ConfigMap/{namespace}/c"]
    assert _names(kube, namespace) == ["a", "b", "d"]


def test_unlabelled_object_of_the_same_name_is_never_deleted(app, repo, kube, namespace):
    repo.write("a.yaml", configmap("a", {"k": "a"}))
    repo.write("b.yaml", configmap("b", {"k": "b"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    # Someone replaces b by hand with an object that is not gitopsd's.
    cms = kube.resource("v1", "ConfigMap")
    kube.delete(cms, "b", namespace)
    kube.request("POST", cms.path(namespace), body=configmap("b", {"k": "hand-made"}))

    repo.remove("b.yaml")
    repo.commit("drop b")
    result = app.sync(prune_guard=1.0)

    assert result.outcome.value in ("Applied", "NoChange"), result.reason
    assert result.pruned == []
    assert kube.get(cms, "b", namespace)["data"] == {"k": "hand-made"}


def test_prune_guard_stops_an_emptied_repository(app, repo, kube, namespace):
    for name in ("a", "b", "c"):
        repo.write(f"{name}.yaml", configmap(name, {"k": name}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"

    for name in ("a", "b", "c"):
        repo.remove(f"{name}.yaml")
    repo.write("README.md", "nothing here any more\n")
    repo.commit("oops: emptied")
    result = app.sync()

    assert result.outcome.value == "Refused"
    assert "all 3 objects" in result.reason
    assert _names(kube, namespace) == ["a", "b", "c"]

    allowed = app.sync(allow_prune_all=True)
    assert allowed.outcome.value == "Applied"
    assert _names(kube, namespace) == []


def test_prune_guard_refuses_more_than_the_configured_share(app, repo, kube, namespace):
    for name in ("a", "b", "c", "d"):
        repo.write(f"{name}.yaml", configmap(name, {"k": name}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    for name in ("b", "c", "d"):
        repo.remove(f"{name}.yaml")
    repo.commit("drop three of four")

    refused = app.sync()
    assert refused.outcome.value == "Refused" and "3 of 4" in refused.reason
    assert app.sync(prune_guard=0.8).outcome.value == "Applied"
    assert _names(kube, namespace) == ["a"]


def test_prune_disabled_annotation_keeps_the_object(app, repo, kube, namespace):
    repo.write("a.yaml", configmap("a", {"k": "a"}))
    repo.write("keep.yaml", configmap("keep", {"k": "v"}, annotations={"gitopsd.io/prune": "disabled"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    repo.remove("keep.yaml")
    repo.commit("drop keep")

    result = app.sync()

    assert result.pruned == []
    assert [str(r) for r in result.plan.kept] == [f"ConfigMap/{namespace}/keep"]
    assert _names(kube, namespace) == ["a", "keep"]
