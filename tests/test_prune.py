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


@pytest.mark.parametrize(("annotations", "reason"), [
    ({"kustomize.toolkit.fluxcd.io/prune": "disabled"}, "kustomize.toolkit.fluxcd.io/prune: disabled"),
    ({"argocd.argoproj.io/sync-options": "ServerSideApply=true, Prune=false"},
     "argocd.argoproj.io/sync-options: Prune=false"),
    ({"argocd.argoproj.io/sync-options": "Prune=confirm"}, "argocd.argoproj.io/sync-options: Prune=confirm"),
    ({"helm.sh/resource-policy": "keep"}, "helm.sh/resource-policy: keep"),
], ids=["flux", "argo-cd", "argo-cd-confirm", "helm-keep"])
def test_a_repository_written_for_flux_argo_cd_or_helm_keeps_what_it_marks_unprunable(
        app, repo, kube, namespace, annotations, reason):
    repo.write("a.yaml", configmap("a", {"k": "a"}))
    repo.write("data.yaml", configmap("data", {"k": "v"}, annotations=annotations))
    repo.write("gone.yaml", configmap("gone", {"k": "v"}, annotations={
        "argocd.argoproj.io/sync-options": "Prune=true", "kustomize.toolkit.fluxcd.io/prune": "enabled"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    repo.remove("data.yaml")
    repo.remove("gone.yaml")
    repo.commit("drop both")

    result = app.sync()

    assert result.outcome.value == "Applied", result.reason
    assert [str(c.ref) for c in result.pruned] == [f"ConfigMap/{namespace}/gone"]
    assert {str(r): why for r, why in result.plan.kept_reasons.items()} == {f"ConfigMap/{namespace}/data": reason}
    assert _names(kube, namespace) == ["a", "data"]


def test_a_namespace_still_holding_objects_of_the_commit_is_never_pruned(app, repo, kube, namespace):
    ns = f"{namespace}-own"
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    repo.write("a.yaml", configmap("a", {"k": "a"}, namespace=ns))
    repo.write("b.yaml", configmap("b", {"k": "b"}, namespace=ns))
    repo.commit()
    try:
        assert app.sync().outcome.value == "Applied"
        repo.remove("ns.yaml")   # the Namespace object moved to another app
        repo.commit("namespaces are managed elsewhere now")

        result = app.sync()

        assert result.outcome.value in ("Applied", "NoChange"), (result.reason, result.errors)
        assert result.pruned == []
        assert f"Namespace/{ns}" in [str(r) for r in result.plan.kept]
        assert kube.get(kube.resource("v1", "Namespace"), ns)["status"]["phase"] == "Active"
    finally:
        kube.delete(kube.resource("v1", "Namespace"), ns)


def test_a_rename_is_not_a_mass_prune(app, repo, kube, namespace):
    repo.write("svc.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
    repo.write("cm.yaml", [configmap("features-aaaa", {"k": "1"}), configmap("settings-aaaa", {"k": "1"})])
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    # A configMapGenerator edit renames both generated ConfigMaps.
    repo.write("cm.yaml", [configmap("features-bbbb", {"k": "2"}), configmap("settings-bbbb", {"k": "2"})])
    repo.commit("new toggles")

    result = app.sync()

    assert result.outcome.value == "Applied", result.reason
    assert sorted(c.ref.name for c in result.pruned) == ["features-aaaa", "settings-aaaa"]


def test_another_apps_applyset_parent_is_never_adopted(app, repo, kube, namespace):
    victim = app.spec(name="victim")
    repo.write("a.yaml", configmap("a", {"k": "a"}))
    repo.commit()
    from gitopsd.engine.sync import sync

    assert sync(kube, victim, cache_dir=app.cache_dir).outcome.value == "Applied"
    repo.write("steal.yaml", configmap("gitopsd-victim", {"k": "mine now"}))
    repo.commit("ship a ConfigMap named like another app's parent")

    result = app.sync()

    assert result.outcome.value == "Failed"
    assert "steal.yaml: ConfigMap" in "\n".join(result.errors)
    assert "an app may not manage gitopsd's own state" in "\n".join(result.errors)
    parent = kube.get(kube.resource("v1", "ConfigMap"), "gitopsd-victim", namespace)
    assert "applyset.kubernetes.io/id" in parent["metadata"]["labels"]


def test_an_unreachable_remote_or_unknown_ref_never_prunes(app, repo, kube, namespace, tmp_path):
    import shutil

    for name in ("a", "b"):
        repo.write(f"{name}.yaml", configmap(name, {"k": name}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"

    unknown = app.sync(ref="no-such-branch")
    assert unknown.outcome.value == "Failed" and "no-such-branch" in unknown.reason
    shutil.move(str(repo.bare), str(tmp_path / "moved-away.git"))   # the remote disappears
    gone = app.sync()
    assert gone.outcome.value == "Failed" and "remote.git" in "\n".join(gone.errors)

    assert _names(kube, namespace) == ["a", "b"], "nothing was pruned"
    assert unknown.pruned == [] and gone.pruned == []


def test_a_namespace_holding_unmanaged_objects_is_kept_not_pruned(app, repo, kube, namespace):
    ns = f"{namespace}-team"
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    repo.write("cm.yaml", configmap("ours", {"k": "v"}, namespace=ns))
    repo.write("keep.yaml", configmap("elsewhere", {"k": "v"}))
    repo.commit()
    nss, cms = kube.resource("v1", "Namespace"), kube.resource("v1", "ConfigMap")
    try:
        assert app.sync().outcome.value == "Applied"
        kube.request("POST", cms.path(ns), body=configmap("hand-made", {"precious": "data"}))
        repo.remove("ns.yaml")
        repo.remove("cm.yaml")
        repo.commit("the team namespace leaves Git")

        result = app.sync(prune_guard=1.0)

        assert result.outcome.value == "Applied", (result.reason, result.errors)
        assert [str(c.ref) for c in result.pruned] == [f"ConfigMap/{ns}/ours"]
        assert "ConfigMap/hand-made" in result.plan.kept_reasons[next(r for r in result.plan.kept
                                                                     if r.kind == "Namespace")]
        assert kube.get(cms, "hand-made", ns)["data"] == {"precious": "data"}
        assert kube.get(nss, ns)["status"]["phase"] == "Active"
    finally:
        kube.delete(nss, ns)


def test_an_empty_managed_namespace_is_pruned(app, repo, kube, namespace):
    ns = f"{namespace}-gone"
    repo.write("ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    repo.write("keep.yaml", configmap("elsewhere", {"k": "v"}))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    repo.remove("ns.yaml")
    repo.commit("drop the namespace")

    result = app.sync(prune_guard=1.0)

    assert [str(c.ref) for c in result.pruned] == [f"Namespace/{ns}"]


def test_the_parents_namespace_is_searched_for_members_only_when_some_live_there(app, repo, kube, namespace):
    """gitopsd's parents live in its own namespace, where under namespaced RBAC it may not even
    list the apps' kinds: the parent records whether members live there (the ApplySet standard
    counts that namespace in implicitly), and only then is it searched — and pruned."""
    from gitopsd.engine import inventory

    home = f"{namespace}-home"
    namespaces = kube.resource("v1", "Namespace")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": home}})
    try:
        repo.write("cm.yaml", configmap("elsewhere", {"a": "1"}))
        repo.commit()
        assert app.sync(inventory_namespace=home).ok
        inv = inventory.load(kube, app=namespace, namespace=home)
        assert inv.namespaces == {namespace}, "members only in the app's namespace: home is not searched"

        cms = kube.resource("v1", "ConfigMap")
        repo.write("home.yaml", {**configmap("at-home", {"b": "2"}), "metadata": {"name": "at-home",
                                                                                  "namespace": home}})
        repo.commit()
        assert app.sync(inventory_namespace=home).ok
        assert inventory.load(kube, app=namespace, namespace=home).namespaces == {namespace, home}

        repo.remove("home.yaml")
        repo.commit()
        assert app.sync(inventory_namespace=home).ok
        assert kube.get(cms, "at-home", home) is None, "a member in the parent's namespace is still pruned"
        assert inventory.load(kube, app=namespace, namespace=home).namespaces == {namespace}
    finally:
        kube.delete(namespaces, home)
