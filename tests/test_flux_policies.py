"""Flux's per-object apply policies, as repositories written for Flux use them.

- `kustomize.toolkit.fluxcd.io/ssa: IfNotPresent`: created when missing, never written again (a Secret
  or webhook configuration another controller fills in): neither a new commit nor self-heal touches it.
- `kustomize.toolkit.fluxcd.io/reconcile: disabled`, on the manifest or put on the live object by
  hand: never written again and never pruned.

(The prune and force annotations of Flux and Argo CD: tests/test_prune.py, tests/test_recreate.py.)
"""

from __future__ import annotations

import pytest
from helpers import configmap

from gitopsd.engine.plan import HASH_ANNOTATION, still_ours

pytestmark = pytest.mark.cluster

SSA = "kustomize.toolkit.fluxcd.io/ssa"
RECONCILE = "kustomize.toolkit.fluxcd.io/reconcile"


def _cm(kube, namespace: str, name: str) -> dict:
    return kube.get(kube.resource("v1", "ConfigMap"), name, namespace)


def _write_by_hand(kube, namespace: str, obj: dict) -> None:
    kube.request("PUT", kube.resource("v1", "ConfigMap").path(namespace, obj["metadata"]["name"]), body=obj,
                 query={"fieldManager": "cert-controller"})


def test_if_not_present_creates_once_and_then_leaves_the_object_to_others(app, repo, kube, namespace):
    repo.write("ca.yaml", configmap("ca-bundle", {"ca.crt": "placeholder"}, annotations={SSA: "IfNotPresent"}))
    repo.write("plain.yaml", configmap("plain", {"v": "1"}))
    repo.commit()
    first = app.sync()
    assert first.outcome.value == "Applied", first.reason
    assert _cm(kube, namespace, "ca-bundle")["data"] == {"ca.crt": "placeholder"}

    filled = _cm(kube, namespace, "ca-bundle")
    filled["data"] = {"ca.crt": "filled in by a controller"}
    _write_by_hand(kube, namespace, filled)
    repo.write("ca.yaml", configmap("ca-bundle", {"ca.crt": "placeholder v2"}, annotations={SSA: "IfNotPresent"}))
    repo.write("plain.yaml", configmap("plain", {"v": "2"}))
    repo.commit("both change in Git")
    second = app.sync()

    assert second.outcome.value == "Applied", second.reason
    assert [str(c.ref) for c in second.applied] == [f"ConfigMap/{namespace}/plain"]
    assert _cm(kube, namespace, "ca-bundle")["data"] == {"ca.crt": "filled in by a controller"}
    assert _cm(kube, namespace, "plain")["data"] == {"v": "2"}

    kube.delete(kube.resource("v1", "ConfigMap"), "ca-bundle", namespace)
    third = app.sync()
    assert [str(c.ref) for c in third.applied] == [f"ConfigMap/{namespace}/ca-bundle"], "missing: created again"
    assert _cm(kube, namespace, "ca-bundle")["data"] == {"ca.crt": "placeholder v2"}


def test_reconcile_disabled_on_the_live_object_stops_writes_and_prune(app, repo, kube, namespace):
    repo.write("legacy.yaml", configmap("legacy", {"v": "1"}))
    repo.write("a.yaml", configmap("a", {"v": "1"}))
    repo.write("b.yaml", configmap("b", {"v": "1"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"

    live = _cm(kube, namespace, "legacy")
    live["metadata"].setdefault("annotations", {})[RECONCILE] = "disabled"   # kubectl annotate, by hand
    live["data"] = {"v": "hand-tuned"}
    _write_by_hand(kube, namespace, live)
    repo.write("legacy.yaml", configmap("legacy", {"v": "2"}))
    repo.commit("Git moves on")
    changed = app.sync()
    assert changed.outcome.value == "NoChange", changed.reason   # the commit's only change is not written
    assert changed.applied == [] and _cm(kube, namespace, "legacy")["data"] == {"v": "hand-tuned"}

    repo.remove("legacy.yaml")
    repo.commit("and drops it")
    dropped = app.sync()
    assert dropped.outcome.value == "NoChange", dropped.reason
    assert dropped.pruned == []
    assert {str(r): why for r, why in dropped.plan.kept_reasons.items()} == {
        f"ConfigMap/{namespace}/legacy": f"{RECONCILE}: disabled"}
    assert _cm(kube, namespace, "legacy") is not None


def test_a_frozen_object_changed_by_others_is_no_drift():
    desired = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "git"},
               "metadata": {"name": "x", "annotations": {HASH_ANNOTATION: "new", SSA: "IfNotPresent"}}}
    live = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "theirs"},
            "metadata": {"name": "x", "annotations": {HASH_ANNOTATION: "old"}, "managedFields": []}}
    assert still_ours(live, desired), "what self-heal asks of every watch event"
    plain = {**desired, "metadata": {"name": "x", "annotations": {HASH_ANNOTATION: "new"}}}
    assert not still_ours(live, plain)
    assert not still_ours({**live, "metadata": {**live["metadata"], "deletionTimestamp": "now"}}, desired), \
        "an object being deleted is not left alone: it is created again once gone"
