"""Tenancy: an app that names a ServiceAccount (serviceAccountName) writes as that account.

gitopsd impersonates the account for the app's dry-runs, applies, prunes
and createNamespace; its own bookkeeping (the ApplySet parent, status,
audit) stays gitopsd's. The test cluster authorizes with RBAC (DESIGN.md
§4) and writes an audit log of every write (hack/testbed/cluster.py), which
records for each request who sent it and whom it impersonated: the proof of
which identity wrote what. The tenants' namespaces are made per test
(`sa-...`) so that the tests can share the cluster with others.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from helpers import (
    app_entry,
    configmap,
    delete_service_account_rbac,
    service_account_kubeconfig,
    wait_audit,
    write_config,
)

from gitopsd import config as cfg
from gitopsd import report
from gitopsd.daemon.leader import FencedKube
from gitopsd.errors import LeadershipLost
from gitopsd.kube import Kube, ServiceAccount

RBAC = "/apis/rbac.authorization.k8s.io/v1"
EDIT_CONFIGMAPS = [{"apiGroups": [""], "resources": ["configmaps"],
                    "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]


# ------------------------------------------------------------------ the setting and the client (no cluster)

def _parse(text: str) -> cfg.Config:
    return cfg.parse(text, source="test.yaml")


def test_service_account_lives_in_the_apps_namespace_unless_another_is_named():
    config = _parse("""
        apps:
          - {name: a, repo: r, namespace: tenant-a, serviceAccountName: deployer}
          - {name: b, repo: r, namespace: tenant-b, serviceAccountName: deployer, serviceAccountNamespace: ops}
          - {name: c, repo: r, namespace: tenant-c}
    """)
    assert [a.service_account for a in config.apps] == [
        ServiceAccount(namespace="tenant-a", name="deployer"), ServiceAccount(namespace="ops", name="deployer"), None]
    assert config.apps[0].service_account.user == "system:serviceaccount:tenant-a:deployer"


def test_the_files_default_service_account_is_used_by_every_app_that_names_none():
    config = _parse("""
        defaultServiceAccountName: gitops
        apps:
          - {name: a, repo: r, namespace: tenant-a}
          - {name: b, repo: r, namespace: tenant-b, serviceAccountName: own}
    """)
    assert [a.service_account for a in config.apps] == [ServiceAccount(namespace="tenant-a", name="gitops"),
                                                        ServiceAccount(namespace="tenant-b", name="own")]


def test_a_service_account_namespace_without_a_name_is_refused():
    with pytest.raises(cfg.ConfigError) as info:
        _parse("apps: [{name: a, repo: r, serviceAccountNamespace: ops}]")
    assert info.value.problems == ["apps[0] (a).serviceAccountNamespace: only used with serviceAccountName; "
                                   "name the account"]
    with pytest.raises(cfg.ConfigError) as info:
        _parse("apps: [{name: a, repo: r, serviceAccountName: Deployer}]")
    assert "is not a valid ServiceAccount name" in info.value.problems[0]


def _offline_kube() -> Kube:
    from kubernetes import client

    return Kube(client.ApiClient(client.Configuration(host="https://127.0.0.1:1")))


def test_an_impersonating_view_shares_the_connection_and_adds_only_the_user():
    kube = _offline_kube()
    account = ServiceAccount(namespace="tenant-a", name="deployer")
    view = kube.impersonating(account)
    assert view is kube.impersonating(account), "one view per account, cached"
    assert view._pool is kube._pool and view.budget is kube.budget and view.requests is kube.requests
    headers = view._headers("application/json")
    assert headers["Impersonate-User"] == "system:serviceaccount:tenant-a:deployer"
    # No Impersonate-Group: the apiserver derives a ServiceAccount's groups itself (see Kube.impersonating).
    assert not any(k.lower().startswith("impersonate-") and k != "Impersonate-User" for k in headers)
    assert "Impersonate-User" not in kube._headers("application/json"), "gitopsd's own client stays its own"
    other = view.impersonating(ServiceAccount(namespace="tenant-b", name="deployer"))
    assert other._headers("application/json")["Impersonate-User"] == "system:serviceaccount:tenant-b:deployer"


def test_an_impersonating_view_of_a_fenced_kube_is_fenced_too():
    def fence():
        raise LeadershipLost("lease lost")

    view = FencedKube(_offline_kube(), fence).impersonating(ServiceAccount(namespace="t", name="d"))
    assert isinstance(view, FencedKube) and view.account == ServiceAccount(namespace="t", name="d")
    with pytest.raises(LeadershipLost):
        view.apply(configmap("x", {"k": "v"}, namespace="t"))


# ------------------------------------------------------------------ tenants on the real control plane

class Tenants:
    """Two tenant namespaces `a` and `b`, and a ServiceAccount `deployer` in `a` bound to the
    built-in `edit` ClusterRole in `a` only (a RoleBinding)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        suffix = uuid.uuid4().hex[:5]
        self.a, self.b = f"sa-tenant-a-{suffix}", f"sa-tenant-b-{suffix}"
        for ns in (self.a, self.b):
            kube.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": ns}})
        self.service_account("deployer")
        self.bind("deployer", cluster_role="edit")

    def service_account(self, name: str) -> None:
        self.kube.request("POST", f"/api/v1/namespaces/{self.a}/serviceaccounts",
                          body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})

    def bind(self, name: str, *, cluster_role: str | None = None, rules: list[dict] | None = None) -> None:
        """Grant ServiceAccount `name` (in `a`) a built-in ClusterRole, or `rules`, in `a` only."""
        if rules is not None:
            self.kube.request("POST", f"{RBAC}/namespaces/{self.a}/roles", body={
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
                "rules": rules})
        self.kube.request("POST", f"{RBAC}/namespaces/{self.a}/rolebindings", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole" if cluster_role else "Role",
                        "name": cluster_role or name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": self.a}]})

    def cm(self, name: str, namespace: str) -> dict | None:
        return self.kube.get(self.kube.resource("v1", "ConfigMap"), name, namespace)

    def delete(self) -> None:
        for ns in (self.a, self.b):
            self.kube.delete(self.kube.resource("v1", "Namespace"), ns)


@pytest.fixture
def tenants(kube):
    t = Tenants(kube)
    yield t
    t.delete()


def writes_as(cluster, *, namespace: str, name: str) -> list[tuple[str, str, str | None]]:
    """(verb, the sender, whom it impersonated) of each accepted write of ConfigMap `name` in
    `namespace`, from the apiserver's audit log (dry-runs included: they are writes too)."""
    return [(e["verb"], e["user"]["username"], (e.get("impersonatedUser") or {}).get("username"))
            for e in cluster.audit_events()
            if (e.get("objectRef") or {}).get("resource") == "configmaps"
            and e["objectRef"].get("namespace") == namespace and e["objectRef"].get("name") == name
            and (e.get("responseStatus") or {}).get("code", 0) < 300]


@pytest.mark.cluster
def test_a_write_outside_the_accounts_rights_fails_that_app_before_anything_is_applied_while_another_app_goes_on(
        tenants, repo, kube, namespace, tmp_path, start_daemon):
    """App A (deployer: edit in tenant a only) writes to a and b; app B (gitopsd's own identity), same run."""
    from helpers import GitRepo

    repo.write("a/mine.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.write("a/theirs.yaml", configmap("theirs", {"k": "v"}, namespace=tenants.b))
    repo.commit("tenant a reaches into tenant b")
    other = GitRepo(tmp_path / "other")
    other.write("cm.yaml", configmap("fine", {"k": "v"}, namespace=tenants.b))
    other.commit("app b")
    config = write_config(tmp_path / "config.yaml", [
        app_entry("sa-app-a", repo.url, tenants.a, path="a", serviceAccountName="deployer"),
        app_entry("sa-app-b", other.url, tenants.b)])

    daemon = start_daemon(config)

    failed = wait_audit(daemon, "app A refused", app="sa-app-a", result="Failed")
    wait_audit(daemon, "app B applied in the same run", app="sa-app-b", result="Applied")
    text = "\n".join(failed["errors"])
    assert "theirs.yaml" in text and f"ConfigMap/{tenants.b}/theirs" in text, text
    assert f'User "system:serviceaccount:{tenants.a}:deployer" cannot' in text, text
    assert f'in the namespace "{tenants.b}"' in text, text
    assert "Forbidden" in failed["reason"] and "nothing was applied" in failed["reason"], failed["reason"]
    assert f"RoleBinding in namespace {tenants.b}" in text, "the hint says how to grant it"
    assert tenants.cm("mine", tenants.a) is None, "not even the part the account may write was applied"
    assert tenants.cm("theirs", tenants.b) is None
    assert tenants.cm("fine", tenants.b) is not None


@pytest.mark.cluster
def test_an_app_within_its_accounts_rights_is_written_as_the_account_and_its_bookkeeping_as_gitopsd(
        tenants, app, repo, kube, cluster, namespace):
    repo.write("cm.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.commit()

    result = app.sync(service_account_name="deployer", service_account_namespace=tenants.a)

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    assert tenants.cm("mine", tenants.a)["data"] == {"k": "v"}
    sa = f"system:serviceaccount:{tenants.a}:deployer"
    writes = writes_as(cluster, namespace=tenants.a, name="mine")
    assert writes and all(impersonated == sa for _, _, impersonated in writes), writes
    assert {verb for verb, _, _ in writes} == {"patch"}, "the dry-run and the apply (server-side apply is a PATCH)"
    parent = writes_as(cluster, namespace=namespace, name=f"gitopsd-{namespace}")
    assert parent and all(impersonated is None for _, _, impersonated in parent), \
        f"the ApplySet parent is gitopsd's own: {parent}"


@pytest.mark.cluster
def test_a_self_heal_is_written_as_the_account(tenants, repo, kube, cluster, tmp_path, start_daemon):
    from helpers import wait_for

    repo.write("cm.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry("sa-heal", repo.url, tenants.a,
                                                               serviceAccountName="deployer")])
    daemon = start_daemon(config)
    first = wait_audit(daemon, "the first sync", app="sa-heal", result="Applied")
    sa = f"system:serviceaccount:{tenants.a}:deployer"
    assert first["written_as"] == sa, "the audit record says whom the app wrote as"
    assert f"  as {sa}" in report.summary_line(first), "and `gitopsd history` shows it"
    before = len(writes_as(cluster, namespace=tenants.a, name="mine"))

    kube.request("PATCH", f"/api/v1/namespaces/{tenants.a}/configmaps/mine", query={"fieldManager": "kubectl-edit"},
                 body=[{"op": "replace", "path": "/data/k", "value": "by hand"}],
                 content_type="application/json-patch+json")
    wait_for("the hand edit reverted", lambda: tenants.cm("mine", tenants.a)["data"] == {"k": "v"})

    hand, *heal = writes_as(cluster, namespace=tenants.a, name="mine")[before:]
    assert hand[2] is None, "the hand edit, by the admin itself"
    assert heal and all(impersonated == sa for _, _, impersonated in heal), heal


@pytest.mark.cluster
def test_a_prune_the_account_may_not_do_fails_the_app_before_anything_is_written(tenants, app, repo, kube):
    tenants.service_account("no-delete")
    tenants.bind("no-delete", rules=[{"apiGroups": [""], "resources": ["configmaps"],
                                      "verbs": ["get", "list", "watch", "create", "patch"]}])
    repo.write("keep.yaml", configmap("keep", {"k": "v1"}, namespace=tenants.a))
    repo.write("gone.yaml", configmap("gone", {"k": "v"}, namespace=tenants.a))
    repo.commit()
    spec = dict(service_account_name="no-delete", service_account_namespace=tenants.a)
    assert app.sync(**spec).outcome.value == "Applied"
    repo.remove("gone.yaml")
    repo.write("keep.yaml", configmap("keep", {"k": "v2"}, namespace=tenants.a))
    repo.commit("drop one")

    result = app.sync(**spec)

    assert result.outcome.value == "Failed", (result.reason, result.errors)
    [error] = result.errors
    assert error.startswith(f"ConfigMap/{tenants.a}/gone: prune refused: Forbidden:"), error
    assert f'User "system:serviceaccount:{tenants.a}:no-delete" cannot delete' in error, error
    assert tenants.cm("gone", tenants.a) is not None, "the object the account may not delete stays"
    assert tenants.cm("keep", tenants.a)["data"] == {"k": "v1"}, \
        "the plan-time dry-run of the prune caught it: nothing of the commit was written"
    assert result.pruned == [] and result.applied == []


@pytest.mark.cluster
def test_an_account_that_does_not_exist_is_named_as_the_cause_when_every_write_is_refused(tenants, app, repo):
    repo.write("cm.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.commit()

    result = app.sync(service_account_name="ghost", service_account_namespace=tenants.a)

    assert result.outcome.value == "Failed"
    assert f"Forbidden: every write of the app was refused to ServiceAccount {tenants.a}/ghost: it does not exist" \
        in result.reason, result.reason
    assert tenants.cm("mine", tenants.a) is None


@pytest.mark.cluster
def test_an_account_with_nothing_bound_is_named_as_the_cause_when_every_write_is_refused(tenants, app, repo):
    tenants.service_account("unbound")
    repo.write("cm.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.commit()

    result = app.sync(service_account_name="unbound", service_account_namespace=tenants.a)

    assert result.outcome.value == "Failed"
    assert "it exists, but no Role or ClusterRole is bound to it" in result.reason, result.reason


@pytest.mark.cluster
def test_diff_with_service_account_previews_what_the_account_may_not_write(tenants, repo, namespace, kubeconfig,
                                                                          source_cache):
    from helpers import gitopsd

    repo.write("mine.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
    repo.write("theirs.yaml", configmap("theirs", {"k": "v"}, namespace=tenants.b))
    repo.commit()
    args = ("diff", "--repo", repo.url, "--ref", "main", "-n", tenants.a, "--app", namespace,
            "--inventory-namespace", namespace)

    as_account = gitopsd(*args, "--service-account", "deployer", kubeconfig=kubeconfig, cache=source_cache)
    as_admin = gitopsd(*args, kubeconfig=kubeconfig, cache=source_cache)

    assert as_account.returncode == 2, as_account.stdout + as_account.stderr
    assert f'User "system:serviceaccount:{tenants.a}:deployer" cannot patch resource "configmaps"' \
        in as_account.stdout, as_account.stdout
    assert f"theirs.yaml: ConfigMap/{tenants.b}/theirs: Forbidden" in as_account.stdout, as_account.stdout
    assert as_admin.returncode == 1, as_admin.stdout + as_admin.stderr   # two creates, nothing refused
    assert tenants.cm("mine", tenants.a) is None, "a diff writes nothing"


@pytest.mark.cluster
def test_gitopsd_needs_impersonate_on_serviceaccounts_only_not_on_groups(tenants, repo, namespace, kubeconfig,
                                                                        tmp_path, kube):
    """gitopsd as an ordinary identity (not system:masters) with its bookkeeping rights and
    `impersonate` on serviceaccounts — the grant deploy/ ships — and nothing on groups."""
    from gitopsd.engine.sync import AppSpec, sync

    name = f"sa-gitopsd-{uuid.uuid4().hex[:5]}"
    own = service_account_kubeconfig(kube, kubeconfig, namespace, tmp_path, name=name, rules=[
        *EDIT_CONFIGMAPS,   # the ApplySet parent in its namespace (and, here, listing the members)
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}])
    limited = Kube.connect(kubeconfig=own)
    try:
        repo.write("cm.yaml", configmap("mine", {"k": "v"}, namespace=tenants.a))
        repo.commit()
        spec = AppSpec(name=name, repo=repo.url, namespace=tenants.a, inventory_namespace=namespace, timeout=60.0,
                       service_account_name="deployer")
        result = sync(limited, spec, cache_dir=tmp_path / "cache")
        assert result.outcome.value == "Applied", (result.reason, result.errors)
        assert tenants.cm("mine", tenants.a) is not None
        # Without the grant, the apiserver refuses the impersonation itself, and says so.
        kube.request("PUT", f"{RBAC}/clusterroles/{name}", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": EDIT_CONFIGMAPS})
        repo.write("cm.yaml", configmap("mine", {"k": "v2"}, namespace=tenants.a))
        repo.commit()
        refused = sync(limited, spec, cache_dir=tmp_path / "cache")
        assert refused.outcome.value == "Failed"
        assert f'User "system:serviceaccount:{namespace}:{name}" cannot impersonate resource "serviceaccounts"' \
            in refused.reason, refused.reason
        assert "grant gitopsd `impersonate` on serviceaccounts" in refused.errors[0], refused.errors
    finally:
        limited.close()
        delete_service_account_rbac(kube, name)


def test_deploy_grants_impersonate_on_serviceaccounts_only_and_explains_it():
    import yaml

    root = Path(__file__).resolve().parent.parent / "deploy"
    docs = [d for path in (root / "base" / "rbac.yaml", root / "cluster-wide.yaml",
                           root / "overlays" / "namespaced" / "rolebindings.yaml")
            for d in yaml.safe_load_all(path.read_text()) if d]
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d.get("rules") or []
             if "impersonate" in r["verbs"]]
    assert rules == [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "gitopsd-impersonate"]
    cluster_bound = [d for d in docs if d["kind"] == "ClusterRoleBinding"
                     and d["roleRef"]["name"] == "gitopsd-impersonate"]
    namespaced = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"
                  and d["roleRef"]["name"] == "gitopsd-impersonate"}
    assert len(cluster_bound) == 1, "cluster-wide.yaml binds it everywhere"
    assert namespaced == {"web-dev", "web-staging", "web-production"}, "the namespaced variant: only its namespaces"
    assert "Impersonate-Group" in (root / "base" / "rbac.yaml").read_text(), "the choice is explained"
