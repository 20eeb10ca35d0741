"""createNamespace: an Argo-style repo (no Namespace in it) into a namespace that does not exist yet.

Argo CD's guestbook and most Helm charts name no Namespace: Argo users set
CreateNamespace=true, Helm users `--create-namespace`. gitopsd creates the
app's namespace when asked, labels it as the app's, and never prunes it
(it is no ApplySet member) unless a Namespace object for it is in Git.
"""

from __future__ import annotations

import json

import pytest
from helpers import app_entry, configmap, deployment, gitopsd_json, post_generic, wait_transition, write_config

from gitopsd.engine.apply import CREATED_BY_LABEL
from gitopsd.engine.inventory import PART_OF_LABEL

pytestmark = pytest.mark.cluster

GUESTBOOK_SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "guestbook-ui"},
                     "spec": {"selector": {"app": "guestbook-ui"}, "ports": [{"port": 80, "targetPort": 80}]}}


@pytest.fixture
def target(namespace, kube):
    """The app's namespace: not there yet; deleted after the test (without waiting)."""
    name = f"{namespace}-app"
    yield name
    kube.delete(kube.resource("v1", "Namespace"), name)


def guestbook(repo) -> str:
    """Argo CD's guestbook example, as its repository has it: a Deployment and a Service naming no namespace."""
    repo.write("guestbook/deployment.yaml", deployment("guestbook-ui", image="gcr.io/heptio-images/ks-guestbook-demo:0.2"))
    repo.write("guestbook/service.yaml", GUESTBOOK_SERVICE)
    return repo.commit("guestbook, as Argo CD's example repository has it")


def namespace_of(kube, name: str) -> dict | None:
    return kube.get(kube.resource("v1", "Namespace"), name)


def test_an_app_into_a_missing_namespace_is_refused_naming_create_namespace(app, repo, kube, target):
    guestbook(repo)

    result = app.sync(namespace=target, path="guestbook")

    assert result.outcome.value == "Failed"
    assert len(result.errors) == 2, result.errors
    for error in result.errors:
        assert f'namespaces "{target}" not found' in error
        assert f"namespace {target} does not exist; set createNamespace: true on the app" in error
        assert "--create-namespace" in error
    assert "createNamespace" in result.reason, "the one-line reason carries the hint too"
    assert namespace_of(kube, target) is None, "nothing was created"


def test_with_create_namespace_the_app_is_applied_healthy_and_its_namespace_labelled(app, repo, kube, target):
    guestbook(repo)

    result = app.sync(namespace=target, path="guestbook", create_namespace=True)

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    assert result.created_namespace == target
    assert {h.status.value for h in result.health} == {"Current"}
    created = namespace_of(kube, target)
    labels = created["metadata"]["labels"]
    assert labels[CREATED_BY_LABEL] == app.spec().name, "visible which app created it"
    assert PART_OF_LABEL not in labels, "no member of the ApplySet: never pruned"
    assert kube.get(kube.resource("apps/v1", "Deployment"), "guestbook-ui", target) is not None
    assert [c.action.value for c in result.applied] == ["create", "create"]

    again = app.sync(namespace=target, path="guestbook", create_namespace=True)
    assert again.outcome.value == "NoChange" and again.created_namespace is None


def test_a_dry_run_creates_nothing_and_says_the_namespace_would_be_created(repo, kube, kubeconfig, source_cache,
                                                                            namespace, target):
    guestbook(repo)
    args = ("--repo", repo.url, "--path", "guestbook", "--namespace", target, "--create-namespace",
            "--app", namespace, "--inventory-namespace", namespace)

    _, report = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=1)
    _, result = gitopsd_json("sync", "--dry-run", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)

    assert report["create_namespace"] == target and report["errors"] == []
    assert report["counts"]["create"] == 2, "the objects in it: creates, validated once it exists"
    assert result["outcome"] == "DryRun" and result["plan"]["create_namespace"] == target
    assert result["created_namespace"] is None
    assert namespace_of(kube, target) is None


def test_gitopsd_sync_create_namespace_flag_creates_it(repo, kube, kubeconfig, source_cache, namespace, target):
    guestbook(repo)
    args = ("--repo", repo.url, "--path", "guestbook", "--namespace", target, "--app", namespace,
            "--inventory-namespace", namespace)

    _, refused = gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=2)
    _, applied = gitopsd_json("sync", *args, "--create-namespace", kubeconfig=kubeconfig, cache=source_cache,
                              expect=0)

    assert "createNamespace" in refused["reason"] and refused["created_namespace"] is None
    assert applied["outcome"] == "Applied" and applied["created_namespace"] == target
    assert namespace_of(kube, target)["metadata"]["labels"][CREATED_BY_LABEL] == namespace


def test_only_the_apps_namespace_is_created(app, repo, kube, target):
    other = f"{target}-x"
    repo.write("cm.yaml", [configmap("mine", {"k": "v"}), configmap("elsewhere", {"k": "v"}, namespace=other)])
    repo.commit()

    result = app.sync(namespace=target, create_namespace=True)

    assert result.outcome.value == "Failed"
    (error,) = result.errors
    assert f"ConfigMap/{other}/elsewhere" in error
    assert f"createNamespace creates only the app's namespace ({target}): add a Namespace {other}" in error
    assert namespace_of(kube, target) is None and namespace_of(kube, other) is None, "nothing half-applied"


def test_the_namespace_survives_removal_of_the_apps_last_object_and_of_the_app(
        repo, kube, namespace, target, tmp_path, start_daemon):
    guestbook(repo)
    config = write_config(tmp_path / "config.yaml", [app_entry(
        "guestbook", repo.url, target, path="guestbook", createNamespace=True, allowPruneAll=True)])
    daemon = start_daemon(config)
    wait_transition(daemon, "the guestbook applied", 90, app="guestbook", result="Applied")
    assert namespace_of(kube, target)["metadata"]["labels"][CREATED_BY_LABEL] == "guestbook"

    repo.remove("guestbook")
    repo.write("guestbook/.keep", "")
    sha = repo.commit("the last objects leave Git")
    assert post_generic(daemon, repo.url, sha)[0] == 202
    pruned = wait_transition(daemon, "the prune", 60, app="guestbook", revision=sha)
    assert pruned["result"] == "Applied", json.dumps(pruned)
    assert kube.get(kube.resource("apps/v1", "Deployment"), "guestbook-ui", target) is None
    assert namespace_of(kube, target) is not None, "not pruned: no member, and not in Git"

    write_config(config, [])
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("removed") == ["guestbook"],
                      "the app removed", 20)
    kept = namespace_of(kube, target)
    assert kept is not None and kept["metadata"].get("deletionTimestamp") is None


def test_without_the_right_to_create_namespaces_the_app_fails_before_any_object_is_written(
        app, repo, kube, kubeconfig, namespace, target, tmp_path):
    from helpers import delete_service_account_rbac, service_account_kubeconfig

    from gitopsd.engine.sync import sync
    from gitopsd.kube import Kube

    guestbook(repo)
    verbs = ["get", "list", "watch", "create", "patch", "delete"]
    name = f"{namespace}-tenant"
    # gitopsd-apps of deploy/base/apps-rbac/, as the namespaced install grants it: nothing on namespaces.
    path = service_account_kubeconfig(kube, kubeconfig, namespace, tmp_path, name=name, rules=[
        {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": verbs},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": verbs}])
    limited = Kube.connect(kubeconfig=path)
    try:
        result = sync(limited, app.spec(namespace=target, path="guestbook", create_namespace=True),
                      cache_dir=app.cache_dir)
    finally:
        limited.close()
        delete_service_account_rbac(kube, name)

    assert result.outcome.value == "Failed"
    (error,) = result.errors
    assert error.startswith(f"Namespace/{target}: cannot create it (createNamespace): Forbidden"), error
    assert "gitopsd needs `create` on namespaces" in error and "deploy/cluster-wide.yaml" in error
    assert not result.applied and namespace_of(kube, target) is None
