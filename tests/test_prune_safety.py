"""Prune safety under hostile conditions: deleting a Namespace deletes everything
in it, so gitopsd prunes one only when it has seen the whole namespace and
found nothing that is not its own; and prune never leaves the app's bounds.

Each test plants something that is not the app's and proves it survives the
commit that would have taken it (the object itself read back afterwards).
"""

from __future__ import annotations

import dataclasses

import pytest
from helpers import configmap, delete_service_account_rbac, deployment, service_account_kubeconfig, wait_for

from gitopsd.engine import plan as plan_mod
from gitopsd.engine.sync import sync
from gitopsd.kube import Kube

pytestmark = pytest.mark.cluster


def _ns(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _own_namespace_then_drop_it(app, repo, kube, ns: str, *, extra: dict[str, dict] | None = None, **sync_args):
    """Commit a Namespace (+ extra files), sync, return a function that drops
    all of it from Git and syncs again, returning that result."""
    repo.write("ns.yaml", _ns(ns))
    repo.write("anchor.yaml", configmap("anchor", {"k": "v"}))   # keeps the app from being emptied
    for path, body in (extra or {}).items():
        repo.write(path, body)
    repo.commit()
    first = app.sync(**sync_args)
    assert first.outcome.value == "Applied", (first.reason, first.errors)

    def drop():
        repo.remove("ns.yaml")
        for path in extra or {}:
            repo.remove(path)
        repo.commit("the namespace leaves Git")
        return app.sync(prune_guard=1.0, **sync_args)

    return drop


def _kept_reason(result, ns: str) -> str:
    ref = next((r for r in result.plan.kept if r.kind == "Namespace" and r.name == ns), None)
    assert ref is not None, f"Namespace/{ns} was not kept; pruned: {[str(c.ref) for c in result.pruned]}"
    return result.plan.kept_reasons[ref]


def _active(kube, ns: str) -> bool:
    live = kube.get(kube.resource("v1", "Namespace"), ns)
    return bool(live) and live["status"]["phase"] == "Active" and not live["metadata"].get("deletionTimestamp")


@pytest.fixture
def team_ns(namespace, kube):
    name = f"{namespace}-team"
    yield name
    kube.delete(kube.resource("v1", "Namespace"), name)


@pytest.mark.parametrize("page", [None, 7], ids=["default-page", "small-pages"])
def test_a_foreign_object_behind_many_managed_ones_keeps_the_namespace(app, repo, kube, team_ns, monkeypatch, page):
    """The hostile-run case: 55 managed ConfigMaps listed before the foreign one."""
    if page:
        monkeypatch.setattr(plan_mod, "NAMESPACE_CHECK_PAGE", page)
    cms = kube.resource("v1", "ConfigMap")
    files = {f"cm-{i:02}.yaml": configmap(f"a-{i:02}", {"k": str(i)}, namespace=team_ns) for i in range(55)}
    drop = _own_namespace_then_drop_it(app, repo, kube, team_ns, extra=files)
    kube.request("POST", cms.path(team_ns), body=configmap("zz-hand-made", {"precious": "data"}))

    result = drop()

    assert "ConfigMap/zz-hand-made" in _kept_reason(result, team_ns)
    assert kube.get(cms, "zz-hand-made", team_ns)["data"] == {"precious": "data"}
    assert _active(kube, team_ns)
    assert len(result.pruned) == 55 and all(c.ref.kind == "ConfigMap" for c in result.pruned)


def _create_crd(kube, group: str, plural: str, kind: str):
    """A namespaced CRD `<plural>.<group>` taking any object; returns the CRD resource."""
    crds = kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    kube.request("POST", crds.path(), body={
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": plural, "singular": plural.rstrip("s"), "kind": kind},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}]}})
    return crds


def test_a_foreign_custom_resource_of_a_new_crd_keeps_the_namespace(app, repo, kube, team_ns, namespace):
    """A kind the cluster started serving after gitopsd's last discovery still counts."""
    drop = _own_namespace_then_drop_it(app, repo, kube, team_ns)
    kube.resource("v1", "ConfigMap")   # discovery happened before the CRD exists
    group = f"{namespace}.example.com"
    crds = _create_crd(kube, group, "backups", "Backup")
    try:
        def established():
            live = kube.get(crds, f"backups.{group}")
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in (live.get("status") or {}).get("conditions") or [])
        wait_for("the CRD to be established", established)
        wait_for("the new kind in discovery", lambda: kube.request("GET", f"/apis/{group}/v1"))
        kube.request("POST", f"/apis/{group}/v1/namespaces/{team_ns}/backups",
                     body={"apiVersion": f"{group}/v1", "kind": "Backup", "metadata": {"name": "nightly"}})

        result = drop()

        assert "Backup/nightly" in _kept_reason(result, team_ns)
        assert _active(kube, team_ns)
    finally:
        kube.delete(crds, f"backups.{group}")


def test_a_crd_deleted_between_discovery_and_the_check_does_not_keep_the_namespace(kube, team_ns, namespace):
    """Its kind answers 404 and discovery, asked again, no longer lists it: none of its objects
    can be left (a CRD's deletion deletes them first), so it is no reason to keep the namespace.
    (Seen in the parallel suite: another test's CRD going away kept an unrelated namespace.)"""
    group = f"{namespace}.example.com"
    crds = _create_crd(kube, group, "gadgets", "Gadget")
    wait_for("the new kind in discovery", lambda: (kube.discover(), kube.resource_for_group_kind(group, "Gadget"))[1])
    kube.delete(crds, f"gadgets.{group}")
    wait_for("the kind no longer served", lambda: _not_served(kube, f"/apis/{group}/v1/namespaces/{team_ns}/gadgets"))
    # The check starts from the discovery made while the CRD existed (the race, made to happen).
    refreshed, calls = kube.discover, []

    def first_call_stale() -> None:
        calls.append(1)
        if len(calls) > 1:
            refreshed()
    kube.discover = first_call_stale
    try:
        found = plan_mod.foreign_objects(kube, team_ns, "applyset-none")
    finally:
        kube.discover = refreshed
    assert not [f for f in found if "gadgets" in f], found
    assert len(calls) >= 2 and kube.resource_for_group_kind(group, "Gadget") is None, "discovery was asked again"


def _not_served(kube, path: str) -> bool:
    from gitopsd.kube import KubeApiError

    try:
        kube.request("GET", path)
    except KubeApiError as exc:
        return exc.path_not_served
    return False


def test_an_object_owned_from_outside_the_namespace_keeps_it(app, repo, kube, team_ns, namespace):
    """ownerReferences excuse an object only when its owner is inside the namespace (and so checked too)."""
    roles = kube.resource("rbac.authorization.k8s.io/v1", "ClusterRole")
    role = kube.request("POST", roles.path(), body={"apiVersion": "rbac.authorization.k8s.io/v1",
                                                    "kind": "ClusterRole", "metadata": {"name": f"{namespace}-owner"},
                                                    "rules": []})
    try:
        drop = _own_namespace_then_drop_it(app, repo, kube, team_ns)
        owned = configmap("owned-elsewhere", {"k": "v"}, ownerReferences=[{
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "name": role["metadata"]["name"], "uid": role["metadata"]["uid"]}])
        kube.request("POST", kube.resource("v1", "ConfigMap").path(team_ns), body=owned)

        result = drop()

        assert "ConfigMap/owned-elsewhere" in _kept_reason(result, team_ns)
        assert _active(kube, team_ns)
    finally:
        kube.delete(roles, f"{namespace}-owner")


def test_pods_of_a_managed_deployment_do_not_keep_the_namespace(app, repo, kube, team_ns):
    """Objects owned by the app's own objects (ReplicaSets, Pods) go with it."""
    web = deployment("web", replicas=2)
    web["metadata"]["namespace"] = team_ns
    drop = _own_namespace_then_drop_it(app, repo, kube, team_ns, extra={"web.yaml": web})
    pods = kube.resource("v1", "Pod")
    wait_for("the deployment's pods", lambda: len(kube.list(pods, namespace=team_ns)) == 2)

    result = drop()

    assert sorted(str(c.ref) for c in result.pruned) == [f"Deployment.apps/{team_ns}/web", f"Namespace/{team_ns}"], \
        result.plan.kept_reasons


def test_a_kind_gitopsd_may_not_list_keeps_the_namespace(app, repo, kube, kubeconfig, team_ns, namespace, tmp_path):
    """What gitopsd cannot see it cannot protect: least-privilege RBAC keeps Namespaces rather than guessing."""
    restricted = _restricted_kube(kube, kubeconfig, namespace, tmp_path, rules=[
        {"apiGroups": [""], "resources": ["configmaps", "namespaces"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    ])
    try:
        spec = app.spec()

        def run():
            return sync(restricted, spec, cache_dir=app.cache_dir)

        repo.write("ns.yaml", _ns(team_ns))
        repo.write("anchor.yaml", configmap("anchor", {"k": "v"}))
        repo.commit()
        assert run().outcome.value == "Applied"
        repo.remove("ns.yaml")
        repo.commit("the namespace leaves Git")

        result = sync(restricted, dataclasses.replace(spec, prune_guard=1.0), cache_dir=app.cache_dir)

        reason = _kept_reason(result, team_ns)
        assert "may not list" in reason, reason
        assert _active(kube, team_ns)
    finally:
        restricted.close()
        delete_service_account_rbac(kube, f"{namespace}-restricted")


def test_prune_never_leaves_the_allowed_namespaces(app, repo, kube, namespace):
    """A member record and label pointing outside the app's bounds (hand-edited parent, or
    an app restricted after the fact) does not make the app delete there."""
    other = f"{namespace}-other"
    nss, cms = kube.resource("v1", "Namespace"), kube.resource("v1", "ConfigMap")
    kube.request("POST", nss.path(), body=_ns(other))
    try:
        repo.write("a.yaml", configmap("a", {"k": "v"}))
        repo.write("b.yaml", configmap("b", {"k": "v"}, namespace=other))
        repo.commit()
        assert app.sync().outcome.value == "Applied"      # unrestricted at first
        repo.remove("b.yaml")
        repo.commit("b leaves Git")

        result = app.sync(allowed_namespaces=(namespace,), prune_guard=1.0)

        ref = next(r for r in result.plan.kept if r.name == "b")
        assert result.plan.kept_reasons[ref] == "outside the app's allowed namespaces"
        assert result.pruned == []
        assert kube.get(cms, "b", other) is not None
    finally:
        kube.delete(nss, other)


# ------------------------------------------------------------------ helpers


def _restricted_kube(kube, kubeconfig, namespace: str, tmp_path, *, rules: list[dict]) -> Kube:
    """A client as a ServiceAccount holding only `rules` (cluster-wide), via a TokenRequest."""
    return Kube.connect(kubeconfig=service_account_kubeconfig(kube, kubeconfig, namespace, tmp_path,
                                                              name=f"{namespace}-restricted", rules=rules))
