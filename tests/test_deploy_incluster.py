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
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import DaemonProcess, GitRepo, wait_for

from gitopsd import audit
from gitopsd.daemon import status as status_mod

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACED = DEPLOY / "overlays" / "namespaced"
SAMPLE = ROOT / "sample-repo"
PLACEHOLDER_REPO = "https://git.example.com/fleet.git"
SYSTEM_NS = "gitopsd-system"
SA_USER = f"system:serviceaccount:{SYSTEM_NS}:gitopsd"
APP_NAMESPACES = ("web-dev", "web-staging", "web-production")
VERBS = "get|list|watch|create|update|patch|delete"


# ------------------------------------------------------------------ kubectl and the manifests

def kubectl(kubeconfig: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    from testbed import build as tb_build

    proc = subprocess.run([str(tb_build.binary("kubectl")), f"--kubeconfig={kubeconfig}", *args], input=stdin,
                          capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def rendered(kubeconfig: Path, path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(kubectl(kubeconfig, "kustomize", str(path)).stdout) if d]


def shipped_config(docs: list[dict], *, repo_url: str, apps: tuple[str, ...] | None = None) -> dict:
    """The config in a variant's gitopsd-config ConfigMap, pointed at `repo_url`."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gitopsd-config"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert {a["repo"] for a in config["apps"]} == {PLACEHOLDER_REPO}
    config["apps"] = [{**a, "repo": repo_url} for a in config["apps"] if apps is None or a["name"] in apps]
    return config


def deployment_flags(docs: list[dict]) -> tuple[str, ...]:
    """The Deployment's `gitopsd run` flags, less the two a test sets itself (--config, --log-format)."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args, flags = container["args"][1:], []
    while args:
        flag, args = args[0], args[1:]
        if flag in ("--config", "--log-format"):
            args = args[1:]
        else:
            flags.append(flag)
    return tuple(flags)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------ cluster state

def _wait_gone(kube, names: tuple[str, ...], timeout: float = 120.0) -> None:
    nss = kube.resource("v1", "Namespace")
    wait_for(f"namespaces {', '.join(names)} gone", lambda: all(kube.get(nss, n) is None for n in names), timeout)


def remove_sample_apps(kube) -> None:
    """What the sample apps leave: their namespaces, their Events in `default`,
    and their parents, status and audit trail in gitopsd-system (plus the Leases)."""
    nss = kube.resource("v1", "Namespace")
    for ns in APP_NAMESPACES:
        kube.delete(nss, ns)
    events = kube.resource("events.k8s.io/v1", "Event")
    for ns in ("default", SYSTEM_NS):
        for event in kube.list(events, namespace=ns, label_selector=audit.AUDIT_APP_LABEL):
            kube.delete(events, event["metadata"]["name"], ns)
    if kube.get(nss, SYSTEM_NS) is not None:
        cms = kube.resource("v1", "ConfigMap")
        for selector in ("app.kubernetes.io/managed-by=gitopsd", audit.AUDIT_APP_LABEL):
            for cm in kube.list(cms, namespace=SYSTEM_NS, label_selector=selector):
                kube.delete(cms, cm["metadata"]["name"], SYSTEM_NS)
        leases = kube.resource("coordination.k8s.io/v1", "Lease")
        for lease in kube.list(leases, namespace=SYSTEM_NS):
            if lease["metadata"]["name"].startswith("gitopsd-"):
                kube.delete(leases, lease["metadata"]["name"], SYSTEM_NS)
    _wait_gone(kube, APP_NAMESPACES)


def uninstall(kube, kubeconfig: Path) -> None:
    for variant in (NAMESPACED, DEPLOY):
        kubectl(kubeconfig, "delete", "-k", str(variant), "--ignore-not-found", "--wait=false")
    remove_sample_apps(kube)
    _wait_gone(kube, (SYSTEM_NS,))


def install(kubeconfig: Path, variant: Path) -> str:
    return kubectl(kubeconfig, "apply", "-k", str(variant)).stdout


@pytest.fixture(scope="module")
def deployed(kube, kubeconfig):
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

def service_account_files(kube, directory: Path) -> Path:
    """token (TokenRequest, as the kubelet asks for it) and ca.crt (kube-root-ca.crt), laid out as in a pod."""
    directory.mkdir(parents=True)
    review = kube.request("POST", f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/gitopsd/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 3600}})
    (directory / "token").write_text(review["status"]["token"])
    cms = kube.resource("v1", "ConfigMap")
    root_ca = wait_for("kube-root-ca.crt in gitopsd-system", lambda: kube.get(cms, "kube-root-ca.crt", SYSTEM_NS), 30)
    (directory / "ca.crt").write_text(root_ca["data"]["ca.crt"])
    (directory / "namespace").write_text(SYSTEM_NS)
    return directory


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


def seed(repo: GitRepo, *, tenant: bool = False) -> str:
    """Push sample-repo/ to the test's remote. `tenant`: without the overlays' Namespace
    objects, as a repo must be for the namespaced variant (it creates the namespaces)."""
    shutil.copytree(SAMPLE, repo.work, dirs_exist_ok=True)
    if tenant:
        for overlay in (repo.work / "apps" / "web" / "overlays").iterdir():
            kustomization = overlay / "kustomization.yaml"
            kustomization.write_text(kustomization.read_text().replace("  - namespace.yaml\n", ""))
            (overlay / "namespace.yaml").unlink()
    return repo.commit("sample repo" + (" (tenant)" if tenant else ""))


def audit_line(daemon: DaemonProcess, app: str, result: str, timeout: float = 90.0) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("app") == app
                             and e.get("result") == result, f"audit line {app} {result}", timeout)


def app_status(kube, app: str) -> dict:
    (found,) = status_mod.read_all(kube, namespace=SYSTEM_NS, app=app) or [{}]
    return found


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
    leases = {x["metadata"]["name"]: x["spec"]["holderIdentity"]
              for x in kube.list(kube.resource("coordination.k8s.io/v1", "Lease"), namespace=SYSTEM_NS)}
    assert leases == {"gitopsd-member-in-cluster": "in-cluster",
                      **{f"gitopsd-shard-{i}-of-{shards}": "in-cluster" for i in range(shards)}}
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
    _wait_gone(kube, (SYSTEM_NS,))
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
