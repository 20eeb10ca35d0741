"""deploy/ on the real control plane: gitopsd in-cluster, with exactly deploy/'s RBAC.

No container runs here, so the daemon runs as a process that sees what a pod
of deploy/'s Deployment would see: `kubectl apply -k deploy/` installs the
ServiceAccount and its rights; a TokenRequest gives the account's token; the
CA comes from the `kube-root-ca.crt` ConfigMap the controller-manager
publishes into every namespace (what the kubelet mounts as ca.crt); and the
daemon starts with KUBERNETES_SERVICE_HOST/PORT and no kubeconfig, so it takes
the in-cluster branch of Kube.connect (GITOPSD_SA_TOKEN_FILE / _CA_FILE only
move the two files out of /var/run/secrets), and with the Deployment's own
flags (--shards: the shard and member Leases are created, listed, renewed and
deleted with the Role's rights). Its config is the one deploy/ ships, with
the placeholder repository replaced by a local remote seeded from sample-repo/.

The sample overlays deploy into fixed namespaces (web-dev, web-staging,
web-production) and deploy/ into gitopsd-system: every test starts by
removing what an earlier run left there, and the module ends by deleting it
all, cluster-scoped RBAC included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deployment import (APP_NAMESPACES, DEPLOY, NAMESPACED, PLACEHOLDER_REPO, ROOT, SYSTEM_NS, app_status,
                        deployment_flags, install, kubectl, remove_sample_apps, rendered, seed,
                        service_account_files, shipped_config, uninstall, wait_gone, write_config)
from helpers import DaemonProcess, wait_for

from gitopsd import audit

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("sample_namespaces")]   # fixed namespaces: take turns

SA_USER = f"system:serviceaccount:{SYSTEM_NS}:gitopsd"
VERBS = "get|list|watch|create|update|patch|delete"


@pytest.fixture(scope="module")
def deployed(sample_namespaces, kube, kubeconfig):
    """deploy/ applied to a cluster without earlier leftovers; everything deleted at the end."""
    uninstall(kube, kubeconfig)
    install(kubeconfig, DEPLOY)
    yield
    uninstall(kube, kubeconfig)


@pytest.fixture
def clean(deployed, kube, kubeconfig):
    """Each test: the cluster-wide variant exactly as deploy/ has it, no sample app anywhere."""
    remove_sample_apps(kube)
    install(kubeconfig, DEPLOY)
    yield
    remove_sample_apps(kube)


# ------------------------------------------------------------------ a pod's view

@pytest.fixture
def in_cluster(cluster, kube, kubeconfig, tmp_path, clean):
    """Start `gitopsd run` as deploy/'s Deployment would: in-cluster settings, the ServiceAccount's token."""
    sa = service_account_files(kube, tmp_path / "serviceaccount")
    env = {
        # Empty is unset for Kube.connect: no kubeconfig, so the in-cluster branch is taken.
        "KUBECONFIG": "",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.ports["apiserver"]),
        "GITOPSD_SA_TOKEN_FILE": str(sa / "token"),
        "GITOPSD_SA_CA_FILE": str(sa / "ca.crt"),
    }
    started: list[DaemonProcess] = []
    flags = deployment_flags(rendered(kubeconfig, DEPLOY))

    def start(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config=config, kubeconfig=Path("/nonexistent"), namespace=SYSTEM_NS,
                               workdir=tmp_path, cache=tmp_path / "cache", env=env, name="in-cluster", extra=flags)
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def audit_line(daemon: DaemonProcess, app: str, result: str, timeout: float = 90.0) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("app") == app
                             and e.get("result") == result, f"audit line {app} {result}", timeout)


def writes_by(cluster, user: str, *, resource: str, namespace: str) -> list[dict]:
    return [e for e in cluster.audit_events()
            if e.get("user", {}).get("username") == user
            and (e.get("objectRef") or {}).get("resource") == resource
            and (e.get("objectRef") or {}).get("namespace") == namespace
            and (e.get("responseStatus") or {}).get("code", 0) < 300]


# ------------------------------------------------------------------ static checks of the RBAC

def test_rbac_has_no_wildcards_and_every_rule_is_commented(kubeconfig):
    for variant in (DEPLOY, NAMESPACED):
        for doc in rendered(kubeconfig, variant):
            for rule in doc.get("rules") or []:
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(key, []), f"{doc['metadata']['name']}: wildcard in {rule}"
                assert "update" not in rule["verbs"] or (rule["resources"] == ["leases"] and doc["kind"] == "Role"), \
                    f"{doc['metadata']['name']}: gitopsd PUTs only its Leases, in its own namespace: {rule}"
    for path in sorted(DEPLOY.rglob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[i - 1].strip().startswith("#"), f"{path.relative_to(ROOT)}:{i + 1}: rule without a comment"


def test_namespaced_variant_grants_no_cluster_wide_write(kubeconfig):
    docs = rendered(kubeconfig, NAMESPACED)
    cluster_bound = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
    for role in (d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in cluster_bound):
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"} and rule.get("resourceNames"), \
                f"cluster-wide rule beyond reading one named object: {role['metadata']['name']}: {rule}"
    bound = {(d["metadata"]["namespace"], d["roleRef"]["name"]) for d in docs if d["kind"] == "RoleBinding"}
    assert {ns for ns, role in bound if role == "gitopsd-apps"} == set(APP_NAMESPACES)
    config = shipped_config(docs, repo_url=PLACEHOLDER_REPO)
    assert all(a["allowedNamespaces"] == [a["namespace"]] for a in config["apps"])


def test_create_namespace_is_granted_cluster_wide_and_not_in_the_namespaced_variant(kubeconfig):
    """createNamespace POSTs a Namespace: the `create` verb, cluster-scoped."""
    def may_create_namespaces(variant) -> bool:
        docs = rendered(kubeconfig, variant)
        bound = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
        return any("namespaces" in rule["resources"] and "create" in rule["verbs"] and not rule.get("resourceNames")
                   for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound
                   for rule in d["rules"])

    assert may_create_namespaces(DEPLOY)
    assert not may_create_namespaces(NAMESPACED), "the namespaced install creates its namespaces itself"


# ------------------------------------------------------------------ in-cluster, cluster-wide variant

def test_deploy_applies_and_its_pods_pass_restricted_pod_security(clean, kube, kubeconfig):
    out = install(kubeconfig, DEPLOY)
    assert "deployment.apps/gitopsd" in out
    deployment = kube.get(kube.resource("apps/v1", "Deployment"), "gitopsd", SYSTEM_NS)
    assert deployment["spec"]["replicas"] == 2
    # gitopsd-system enforces the "restricted" Pod Security Standard: the
    # ReplicaSet gets its pods only if the securityContext satisfies it.
    pods = kube.resource("v1", "Pod")
    wait_for("2 gitopsd pods admitted", lambda: len(kube.list(pods, namespace=SYSTEM_NS,
                                                               label_selector="app.kubernetes.io/name=gitopsd")) == 2,
             60)
    for kind, api, name in (("Service", "v1", "gitopsd"), ("PodDisruptionBudget", "policy/v1", "gitopsd"),
                            ("ConfigMap", "v1", "gitopsd-config"), ("ServiceAccount", "v1", "gitopsd")):
        assert kube.get(kube.resource(api, kind), name, SYSTEM_NS) is not None, kind


def test_daemon_in_cluster_reconciles_sample_repo_with_exactly_deploys_rbac(cluster, kube, kubeconfig, in_cluster,
                                                                           repo, tmp_path):
    sha = seed(repo)
    config = write_config(tmp_path / "config.yaml", shipped_config(rendered(kubeconfig, DEPLOY), repo_url=repo.url))
    daemon = in_cluster(config)

    for ns in APP_NAMESPACES:
        line = audit_line(daemon, ns, "Applied")
        assert line["revision"] == sha and not line["errors"]
    web = kube.get(kube.resource("apps/v1", "Deployment"), "web", "web-dev")
    assert web is not None and web["metadata"]["labels"]["app.kubernetes.io/name"] == "web"
    assert kube.get(kube.resource("autoscaling/v2", "HorizontalPodAutoscaler"), "web", "web-production") \
        ["spec"]["minReplicas"] == 4

    # The durable trail and the status, written with the Role's ConfigMap rights.
    wait_for("status web-dev", lambda: app_status(kube, "web-dev").get("result") == "Applied", 30)
    assert app_status(kube, "web-dev")["revision"] == sha
    (newest, *_) = audit.history(kube, namespace=SYSTEM_NS, app="web-dev")
    assert newest["result"] == "Applied" and newest["revision"] == sha
    # The Leases (the only replica holds every shard), the transition's one Event on the app's
    # parent, and a drift's Event beside the object it corrected (the events right in web-dev).
    flags = deployment_flags(rendered(kubeconfig, DEPLOY))
    shards = int(flags[flags.index("--shards") + 1])
    # A shard none of the sample apps falls in may be taken a renewal later than those the apps need.
    want = {"gitopsd-member-in-cluster": "in-cluster",
            **{f"gitopsd-shard-{i}-of-{shards}": "in-cluster" for i in range(shards)}}
    seen: list[dict] = [{}]

    def leases_held() -> bool:
        seen[0] = {x["metadata"]["name"]: x["spec"].get("holderIdentity")
                   for x in kube.list(kube.resource("coordination.k8s.io/v1", "Lease"), namespace=SYSTEM_NS)}
        return seen[0] == want

    try:
        wait_for("every shard's Lease held by the one replica", leases_held, 30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen[0]} != {want}") from None
    events = kube.resource("events.k8s.io/v1", "Event")

    def gitopsd_events(ns: str) -> list[dict]:
        return kube.list(events, namespace=ns, label_selector=f"{audit.AUDIT_APP_LABEL}=web-dev")

    wait_for("the transition's Event on the parent", lambda: gitopsd_events(SYSTEM_NS), 15)
    deployments = kube.resource("apps/v1", "Deployment")
    kube.request("PATCH", f"{deployments.path('web-dev')}/web", query={"fieldManager": "kubectl-set"},
                 content_type="application/strategic-merge-patch+json",
                 body={"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web:by-hand"}]}}}})
    wait_for("the drift's Event beside the Deployment", lambda: gitopsd_events("web-dev"), 30)

    # Every write was made as the ServiceAccount, and no request was refused.
    assert writes_by(cluster, SA_USER, resource="deployments", namespace="web-dev")
    refused = [e for e in daemon.events() if "forbidden" in str(e).lower()
               or e.get("event") in ("audit_event_failed", "cannot store app status", "lease request failed")]
    assert not refused, refused


def test_a_removed_rbac_rule_fails_the_sync_naming_verb_and_resource(kube, kubeconfig, in_cluster, repo, tmp_path):
    seed(repo)
    role = kube.get(kube.resource("rbac.authorization.k8s.io/v1", "ClusterRole"), "gitopsd-apps")
    index = next(i for i, r in enumerate(role["rules"]) if "deployments" in r["resources"])
    without = [r for r in role["rules"][index]["resources"] if r != "deployments"]
    kubectl(kubeconfig, "patch", "clusterrole", "gitopsd-apps", "--type=json",
            "-p", json.dumps([{"op": "replace", "path": f"/rules/{index}/resources", "value": without}]))
    try:
        config = write_config(tmp_path / "config.yaml",
                              shipped_config(rendered(kubeconfig, DEPLOY), repo_url=repo.url, apps=("web-dev",)))
        daemon = in_cluster(config)

        failed = audit_line(daemon, "web-dev", "Failed")
        text = "\n".join(failed["errors"])
        assert "forbidden" in text.lower(), text
        assert re.search(rf'cannot ({VERBS}) resource "deployments" in API group "apps"', text), text
        assert SA_USER in text, text
        wait_for("status Failed", lambda: app_status(kube, "web-dev").get("result") == "Failed", 30)
        assert "forbidden" in app_status(kube, "web-dev")["reason"].lower()
        # It failed while planning: nothing of the app was written.
        assert kube.get(kube.resource("v1", "Namespace"), "web-dev") is None
    finally:
        install(kubeconfig, DEPLOY)   # restores the rule, exactly as deploy/ has it

    # With the right back, the retry (backoff) converges without a restart.
    audit_line(daemon, "web-dev", "Applied", timeout=60)
    assert kube.get(kube.resource("apps/v1", "Deployment"), "web", "web-dev") is not None


def test_an_app_outside_its_allowed_namespaces_is_refused_before_any_write(kube, kubeconfig, in_cluster, repo,
                                                                           tmp_path):
    seed(repo)
    # Allowed web-dev only, but the staging overlay writes to web-staging (and
    # creates that Namespace): gitopsd's cluster-wide RBAC would allow both.
    config = {"apps": [{"name": "web-dev", "repo": repo.url, "ref": "main", "path": "apps/web/overlays/staging",
                        "namespace": "web-dev", "allowedNamespaces": ["web-dev"], "interval": "1h"}]}
    daemon = in_cluster(write_config(tmp_path / "config.yaml", config))

    failed = audit_line(daemon, "web-dev", "Failed")
    text = "\n".join(failed["errors"])
    assert "Deployment.apps/web-staging/web" in text, text
    assert "may not write to namespace 'web-staging'; allowed namespaces: web-dev" in text, text
    assert "may not write to cluster scope" in text, text   # the Namespace object
    assert "nothing was applied" in failed["reason"], failed["reason"]
    nss = kube.resource("v1", "Namespace")
    assert kube.get(nss, "web-staging") is None and kube.get(nss, "web-dev") is None


def test_credentials_secret_ref_is_read_with_the_roles_get_only(kube, kubeconfig, in_cluster, repo, tmp_path):
    """A private repository: the token is in a Secret in gitopsd-system, which the Role lets gitopsd get."""
    from gitserver import GitHTTPServer

    sha = seed(repo)
    server = GitHTTPServer(root=repo.bare.parent, username="deploy", token="in-cluster-token").start()
    secrets = kube.resource("v1", "Secret")
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fleet-git", "namespace": SYSTEM_NS},
                "stringData": {"username": "deploy", "token": "in-cluster-token"}})
    try:
        config = shipped_config(rendered(kubeconfig, DEPLOY), repo_url=server.url(repo.bare.name), apps=("web-dev",))
        config["apps"][0]["credentials"] = {"secretRef": {"name": "fleet-git"}}
        daemon = in_cluster(write_config(tmp_path / "config.yaml", config))

        assert audit_line(daemon, "web-dev", "Applied")["revision"] == sha
        assert any(h.startswith("Basic ") for h in server.auth_headers)
        assert not [e for e in daemon.events() if "forbidden" in str(e).lower()]
    finally:
        server.stop()
        kube.delete(secrets, "fleet-git", SYSTEM_NS)


# ------------------------------------------------------------------ in-cluster, namespaced variant

@pytest.fixture
def namespaced(clean, kube, kubeconfig):
    """The namespaced variant alone: what only deploy/ has (its cluster-wide bindings) is removed."""
    cluster_wide_only = [d for d in rendered(kubeconfig, DEPLOY)
                         if d["kind"].startswith("Cluster")
                         and (d["kind"], d["metadata"]["name"]) not in
                         {(n["kind"], n["metadata"]["name"]) for n in rendered(kubeconfig, NAMESPACED)}]
    assert {d["metadata"]["name"] for d in cluster_wide_only} == {"gitopsd-apps", "gitopsd-namespaces",
                                                                  "gitopsd-impersonate"}
    kubectl(kubeconfig, "delete", "-f", "-", stdin=yaml.safe_dump_all(cluster_wide_only))
    install(kubeconfig, NAMESPACED)
    yield
    kubectl(kubeconfig, "delete", "-k", str(NAMESPACED), "--ignore-not-found", "--wait=false")
    remove_sample_apps(kube)
    wait_gone(kube, (SYSTEM_NS,))
    install(kubeconfig, DEPLOY)


def test_namespaced_variant_reconciles_a_tenant_repo_with_rights_in_its_namespaces_only(
        namespaced, kube, kubeconfig, in_cluster, repo, tmp_path):
    def can_i(*args: str) -> str:
        return kubectl(kubeconfig, "auth", "can-i", *args, f"--as={SA_USER}", check=False).stdout.strip()

    assert can_i("patch", "deployments.apps", "-n", "web-dev") == "yes"
    assert can_i("patch", "deployments.apps", "-n", "default") == "no"
    assert can_i("create", "namespaces") == "no"
    assert can_i("list", "secrets", "--all-namespaces") == "no"
    # Tenancy (serviceAccountName): the ServiceAccounts of its namespaces only, and no group at all.
    assert can_i("impersonate", "serviceaccounts", "-n", "web-dev") == "yes"
    assert can_i("impersonate", "serviceaccounts", "-n", "kube-system") == "no"
    assert can_i("impersonate", "groups") == "no"

    sha = seed(repo, tenant=True)
    config = write_config(tmp_path / "config.yaml", shipped_config(rendered(kubeconfig, NAMESPACED), repo_url=repo.url))
    daemon = in_cluster(config)

    for ns in APP_NAMESPACES:
        line = audit_line(daemon, ns, "Applied")
        assert line["revision"] == sha and not line["errors"]
        # (staging's blue-green runs the Deployment as web-blue)
        assert kube.list(kube.resource("apps/v1", "Deployment"), namespace=ns,
                         label_selector="app.kubernetes.io/name=web")
    wait_for("status web-production", lambda: app_status(kube, "web-production").get("result") == "Applied", 30)
    refused = [e for e in daemon.events() if "forbidden" in str(e).lower()]
    assert not refused, refused
