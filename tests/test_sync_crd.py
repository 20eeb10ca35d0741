"""A CRD and a custom resource of it in one commit."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.cluster


def test_crd_and_custom_resource_in_one_commit(app, repo, kube, namespace):
    group = f"t{uuid.uuid4().hex[:6]}.gitopsd.io"
    repo.write("crd.yaml", {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "size": {"type": "integer", "default": 1}, "color": {"type": "string"}}}}}}}]},
    })
    repo.write("gadget.yaml", {"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": "g1"},
                               "spec": {"color": "red"}})
    repo.commit()
    try:
        result = app.sync()

        assert result.outcome.value == "Applied", (result.reason, result.errors)
        kinds = [c.ref.kind for c in result.applied]
        assert kinds.index("CustomResourceDefinition") < kinds.index("Gadget"), "CRD applied in an earlier stage"
        gadget = kube.get(kube.resource(f"{group}/v1", "Gadget"), "g1", namespace)
        assert gadget["spec"] == {"color": "red", "size": 1}
        # The schema default (size: 1) is server-side: a re-sync sees no drift.
        assert app.sync().outcome.value == "NoChange"
    finally:
        kube.delete(kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition"), f"gadgets.{group}")


def test_custom_resource_of_an_unknown_kind_is_a_clear_error(app, repo, kube, namespace):
    repo.write("x.yaml", {"apiVersion": "nowhere.gitopsd.io/v1", "kind": "Phantom", "metadata": {"name": "p"}})
    repo.commit()

    result = app.sync()

    assert result.outcome.value == "Failed"
    (error,) = result.errors
    assert "x.yaml" in error and "Phantom" in error and "nowhere.gitopsd.io/v1" in error


def test_crd_schema_change_and_a_resource_using_it_in_one_commit(app, repo, kube, namespace):
    group = f"t{uuid.uuid4().hex[:6]}.gitopsd.io"

    def crd(props: dict) -> dict:
        return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"gadgets.{group}"},
                "spec": {"group": group, "scope": "Namespaced",
                         "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                         "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                             "type": "object", "properties": {"spec": {"type": "object", "properties": props}}}}}]}}

    repo.write("crd.yaml", crd({"size": {"type": "integer"}}))
    repo.write("gadget.yaml", {"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": "g1"},
                               "spec": {"size": 1}})
    repo.commit()
    try:
        assert app.sync().outcome.value == "Applied"
        repo.write("crd.yaml", crd({"size": {"type": "integer"}, "color": {"type": "string"}}))
        repo.write("gadget.yaml", {"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": "g1"},
                                   "spec": {"size": 1, "color": "red"}})
        repo.commit("new field, and a resource that uses it")

        result = app.sync()

        assert result.outcome.value == "Applied", (result.reason, result.errors)
        gadget = kube.get(kube.resource(f"{group}/v1", "Gadget"), "g1", namespace)
        assert gadget["spec"]["color"] == "red"
    finally:
        kube.delete(kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition"), f"gadgets.{group}")
