"""deploy/managed-cluster/ on a real second cluster: gitopsd deploys there with exactly those rights.

Cluster `a` is the session's control plane (gitopsd's own); cluster `b`
(conftest `cluster_b`) is a cluster gitopsd deploys to. The test does what
deploy/managed-cluster/README.md tells a user to do:

1. `kustomize build deploy/managed-cluster` and apply every object to b
   (as admin of b);
2. wait for b's token controller to fill Secret gitopsd-remote-token;
3. `hack/cluster-kubeconfig` turns it into a self-contained kubeconfig
   (server, CA from the Secret's ca.crt, the ServiceAccount's token);
4. that kubeconfig goes into a Secret in gitopsd's namespace on a, which the
   config's `clusters: {b: {kubeconfig: {secretRef: ...}}}` names;

and then runs a real daemon with an app `cluster: b`.

One rewrite keeps it honest and parallel-safe: in tests the daemon's
namespace is the test's namespace (DaemonProcess passes --namespace), not
gitopsd-system. So every mention of gitopsd-system in the built objects is
rewritten to the test's namespace (the Namespace itself, the namespaced
objects, the subjects, the resourceNames of the own-namespace rule) — and
the test checks that none is left — and the cluster-scoped objects get the
namespace as a suffix, so that runs never share a ClusterRole. Rules and
verbs are untouched. Everything made on b is deleted at the end.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import app_entry, audit_events, cm_data, gitopsd, post_generic, wait_audit, wait_for
from testbed import build as tb_build

from gitopsd import audit

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
MANAGED = ROOT / "deploy" / "managed-cluster"
SCRIPT = ROOT / "hack" / "cluster-kubeconfig"
SYSTEM_NS = "gitopsd-system"
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding")
RBAC = "rbac.authorization.k8s.io/v1"


def kustomize_build(path: Path) -> list[dict]:
    out = subprocess.run([str(tb_build.binary("kustomize")), "build", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def for_namespace(docs: list[dict], namespace: str) -> list[dict]:
    """The built objects with gitopsd's namespace `namespace` and cluster-scoped names unique to it."""
    docs = json.loads(json.dumps(docs))
    suffixed = {d["metadata"]["name"] for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")}
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            assert meta["name"] == SYSTEM_NS
            meta["name"] = namespace
        elif doc["kind"] in CLUSTER_SCOPED:
            meta["name"] = f"{meta['name']}-{namespace}"
        else:
            assert meta["namespace"] == SYSTEM_NS, doc
            meta["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            assert subject["namespace"] == SYSTEM_NS
            subject["namespace"] = namespace
        ref = doc.get("roleRef")
        if ref and ref["kind"] == "ClusterRole":
            assert ref["name"] in suffixed, f"{meta['name']} binds a ClusterRole this install does not ship"
            ref["name"] = f"{ref['name']}-{namespace}"
        for rule in doc.get("rules") or []:
            if "resourceNames" in rule:
                rule["resourceNames"] = [namespace if n == SYSTEM_NS else n for n in rule["resourceNames"]]
    assert SYSTEM_NS not in json.dumps(docs), "a mention of gitopsd-system was not rewritten"
    return docs


def account(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:gitopsd-remote"


def remote_writes(cluster_b, namespace: str) -> list[dict]:
    """What b's apiserver audited of gitopsd-remote's writes (the audit policy logs every write)."""
    return [e for e in cluster_b.audit_events() if (e.get("user") or {}).get("username") == account(namespace)]


@pytest.fixture
def managed_b(kube_b, namespace):
    """deploy/managed-cluster applied to b for gitopsd's namespace `namespace`; all of it deleted afterwards."""
    docs = for_namespace(kustomize_build(MANAGED), namespace)
    try:
        for doc in docs:   # kustomize's order: Namespace, ServiceAccount, RBAC, then the token Secret
            kube_b.apply(doc, field_manager="test")
        yield docs
    finally:
        for doc in reversed(docs):
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                try:
                    kube_b.delete(kube_b.resource(RBAC, doc["kind"]), doc["metadata"]["name"])
                except Exception:  # noqa: BLE001 - cleanup
                    pass
        try:
            kube_b.delete(kube_b.resource("v1", "Namespace"), namespace)
        except Exception:  # noqa: BLE001 - cleanup
            pass


def restricted_deployment(name: str) -> dict:
    """A Deployment whose pods the namespace's Pod Security level (restricted, from namespace.yaml) admits."""
    labels = {"app": name}
    security = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                                               "seccompProfile": {"type": "RuntimeDefault"}},
                                           "containers": [{"name": name, "image": "nginx:1.27",
                                                           "securityContext": security}]}}}}


# ------------------------------------------------------------------ static checks

def test_managed_cluster_rbac_is_least_privilege_and_shares_gitopsd_apps():
    docs = kustomize_build(MANAGED)
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for doc in docs:
        for rule in doc.get("rules") or []:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{doc['metadata']['name']}: wildcard in {rule}"
            assert "update" not in rule["verbs"], f"{doc['metadata']['name']}: nothing is PUT on a managed cluster"
    (role,) = by_kind["Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch",
                                                                   "delete"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    # The app rights are gitopsd-apps itself (deploy/base/apps-rbac), not a copy that could drift from it.
    (home_apps,) = [d for d in kustomize_build(ROOT / "deploy") if d["kind"] == "ClusterRole"
                    and d["metadata"]["name"] == "gitopsd-apps"]
    roles = {d["metadata"]["name"]: d for d in by_kind["ClusterRole"]}
    assert set(roles) == {"gitopsd-remote-apps", "gitopsd-remote-own-namespace"}
    assert roles["gitopsd-remote-apps"]["rules"] == home_apps["rules"]
    assert roles["gitopsd-remote-own-namespace"]["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "resourceNames": [SYSTEM_NS], "verbs": ["get"]}]
    # Nothing is named like gitopsd's own install: both may be applied to one cluster.
    own = {(d["kind"], d["metadata"]["name"]) for d in kustomize_build(ROOT / "deploy") if d["kind"] != "Namespace"}
    assert not own & {(d["kind"], d["metadata"]["name"]) for d in docs}
    # Every binding grants to gitopsd-remote, and to nothing else.
    for doc in by_kind["RoleBinding"] + by_kind["ClusterRoleBinding"]:
        assert doc["subjects"] == [{"kind": "ServiceAccount", "name": "gitopsd-remote", "namespace": SYSTEM_NS}]
    (secret,) = by_kind["Secret"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "gitopsd-remote"}


# ------------------------------------------------------------------ the daemon on b with exactly those rights

def test_daemon_deploys_to_a_managed_cluster_with_exactly_its_rights(
        managed_b, cluster_b, kubeconfig_b, kube_b, kube, kubeconfig, api_client, namespace, repo, tmp_path,
        start_daemon):
    from kubernetes import client

    secrets_b = kube_b.resource("v1", "Secret")
    wait_for("b's token controller filled gitopsd-remote-token",
             lambda: ((kube_b.get(secrets_b, "gitopsd-remote-token", namespace) or {}).get("data") or {})
             .get("token"), 60)

    # The kubeconfig, as the README makes it: self-contained, the ServiceAccount's token, b's CA.
    made = subprocess.run([sys.executable, str(SCRIPT), "--kubeconfig", str(kubeconfig_b), "--namespace", namespace,
                           "--name", "b", "--kubectl", str(tb_build.binary("kubectl")),
                           "--output", str(tmp_path / "b.kubeconfig")], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert made.stdout == "" and (tmp_path / "b.kubeconfig").stat().st_mode & 0o077 == 0
    text = (tmp_path / "b.kubeconfig").read_text()
    kc = yaml.safe_load(text)
    (user,) = kc["users"]
    (cl,) = kc["clusters"]
    assert set(user["user"]) == {"token"} and set(cl["cluster"]) == {"server", "certificate-authority-data"}
    assert cl["cluster"]["server"] == cluster_b.server
    assert base64.b64decode(cl["cluster"]["certificate-authority-data"]) == \
        (cluster_b.dir / "pki" / "ca.crt").read_bytes()
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "b-kubeconfig"}, "stringData": {"value": text}})

    # An app on b: a ConfigMap and a Deployment (its health wait reads pods and ReplicaSets on b).
    repo.write("app/cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "remote-cm"},
                               "data": {"v": "1"}})
    repo.write("app/deploy.yaml", restricted_deployment("remote-web"))
    repo.commit("an app for cluster b")
    name = "web-b"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "clusters": {"b": {"kubeconfig": {"secretRef": {"name": "b-kubeconfig"}}}},
        "apps": [app_entry(name, repo.url, namespace, path="app", cluster="b", prune=True, selfHeal=True)]},
        sort_keys=False))
    daemon = start_daemon(cfg, "--no-leader-elect")

    applied = wait_audit(daemon, "the app applied on b", type="transition", app=name, result="Applied", timeout=120)
    assert applied["cluster"] == "b", applied

    # The app's objects are on b, not on a.
    assert cm_data(kube_b, namespace, "remote-cm") == {"v": "1"}
    deployments = kube_b.resource("apps/v1", "Deployment")
    assert kube_b.get(deployments, "remote-web", namespace) is not None
    assert cm_data(kube, namespace, "remote-cm") is None
    assert kube.get(kube.resource("apps/v1", "Deployment"), "remote-web", namespace) is None

    # Its state lives on b, in gitopsd's namespace there: parent + status + audit head, segments, Events.
    cms_b = kube_b.resource("v1", "ConfigMap")

    def stored_status() -> dict:
        parent = kube_b.get(cms_b, f"gitopsd-{name}", namespace) or {}
        return json.loads((parent.get("data") or {}).get("status") or "{}")

    status = wait_for("Applied and Healthy in the status on b",
                      lambda: (st := stored_status()).get("health") == "Healthy" and st, 120)
    assert status["cluster"] == "b" and status["result"] == "Applied", status
    parent = kube_b.get(cms_b, f"gitopsd-{name}", namespace)
    assert any(k.startswith("gitopsd.io/audit-head") for k in parent["metadata"].get("annotations") or {})
    segments = kube_b.list(cms_b, namespace=namespace, label_selector=f"{audit.AUDIT_APP_LABEL}={name}")
    assert [s["metadata"]["name"] for s in segments] == [f"gitopsd-audit-{name}-000001"], segments
    events_b = kube_b.resource("events.k8s.io/v1", "Event")
    wait_for("the transition's Event on b", lambda: kube_b.list(
        events_b, namespace=namespace, label_selector=f"{audit.AUDIT_APP_LABEL}={name}"), 30)
    assert kube.get(kube.resource("v1", "ConfigMap"), f"gitopsd-{name}", namespace) is None
    assert not kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace,
                         label_selector=f"{audit.AUDIT_APP_LABEL}={name}")

    # b's audit log: gitopsd-remote made every write of the app's objects and of its state there (the
    # controllers only write status subresources), and none of its writes was refused: the rights suffice.
    ours = {"remote-cm", "remote-web", f"gitopsd-{name}", f"gitopsd-audit-{name}-000001"}
    writers = {(e["user"]["username"], e["objectRef"]["resource"], e["objectRef"]["name"], e["verb"])
               for e in cluster_b.audit_events() if (e.get("objectRef") or {}).get("namespace") == namespace
               and e["objectRef"].get("resource") in ("configmaps", "deployments")
               and e["objectRef"].get("name") in ours and not e["objectRef"].get("subresource")
               and (e.get("responseStatus") or {}).get("code", 0) < 300}
    assert {w[0] for w in writers} == {account(namespace)}, writers
    assert {w[1:] for w in writers} >= {("configmaps", "remote-cm", "patch"), ("deployments", "remote-web", "patch"),
                                        ("configmaps", f"gitopsd-{name}", "patch")}, writers
    assert ("events", "create") in {(e["objectRef"]["resource"], e["verb"])
                                    for e in remote_writes(cluster_b, namespace)}
    assert refused_writes(cluster_b, namespace) == set()

    # The CLI verifies the trail on b, through the same kubeconfig Secret and rights.
    verify = gitopsd("audit", "verify", name, "--cluster", "b", "--config", str(cfg), "--namespace", namespace,
                     kubeconfig=kubeconfig, cache=tmp_path / "cli-cache")
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr

    # Least privilege, 1: an object the rights do not let gitopsd write fails, named. gitopsd-apps lets
    # gitopsd list and watch pods (health), nothing more: a commit that changes the ConfigMap and adds a
    # Pod is refused by b's RBAC for gitopsd-remote while planning, naming the Pod, and nothing of it is
    # applied.
    sneaky = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sneaky"},
              "spec": restricted_deployment("sneaky")["spec"]["template"]["spec"]}
    repo.write("app/cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "remote-cm"},
                               "data": {"v": "2"}})
    repo.write("app/pod.yaml", sneaky)
    text = failed_commit(daemon, repo, name, "v2 and a Pod")
    assert f'pods "sneaky" is forbidden: User "{account(namespace)}"' in text, text
    assert f'resource "pods" in API group "" in the namespace "{namespace}"' in text, text
    assert cm_data(kube_b, namespace, "remote-cm") == {"v": "1"}, "nothing of the failed commit is applied"
    assert kube_b.get(kube_b.resource("v1", "Pod"), "sneaky", namespace) is None
    wait_for("status Failed on b", lambda: stored_status().get("result") == "Failed", 30)
    # b's own audit log: the one write refused was the Pod's dry-run (a dry-run is audited like a write).
    pod_dry_run = ("pods", "sneaky", "patch", True)
    wait_for("the refused dry-run in b's audit log", lambda: refused_writes(cluster_b, namespace), 30)
    assert refused_writes(cluster_b, namespace) == {pod_dry_run}

    # Least privilege, 2: no RBAC object may be written on b (a repo could otherwise grant itself any
    # right). The plan is refused reading the kind, before any write; the ConfigMap still keeps v1.
    escalate = f"escalate-{namespace}"
    repo.remove("app/pod.yaml")
    repo.write("app/clusterrole.yaml", {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": escalate},
                                        "rules": [{"apiGroups": [""], "resources": ["secrets"],
                                                   "verbs": ["get", "list"]}]})
    text = failed_commit(daemon, repo, name, "v2 and a ClusterRole")
    assert account(namespace) in text and 'resource "clusterroles" in API group "rbac.authorization.k8s.io"' \
        in text, text
    # The error names the object and its file, not only the request that failed.
    assert f"clusterrole.yaml: ClusterRole.rbac.authorization.k8s.io/{escalate}: gitopsd may not list ClusterRole" \
        in text, text
    assert cm_data(kube_b, namespace, "remote-cm") == {"v": "1"}, "nothing of the failed commit is applied"
    assert kube_b.get(kube_b.resource(RBAC, "ClusterRole"), escalate) is None
    # Refused before any write, dry-run or not: b's audit log has no new refused write of gitopsd-remote.
    assert refused_writes(cluster_b, namespace) == {pod_dry_run}


def failed_commit(daemon, repo, app: str, message: str) -> str:
    """Commit, push, and the errors and reason of the Failed transition that follows."""
    before = len(audit_events(daemon, type="transition", app=app))
    post_generic(daemon, repo.url, repo.commit(message))
    failed = wait_for(f"{message!r} failed", lambda: next(
        (r for r in audit_events(daemon, type="transition", app=app)[before:] if r.get("result") == "Failed"),
        None), 90)
    text = "\n".join(failed.get("errors") or []) + "\n" + failed.get("reason", "")
    assert "forbidden" in text.lower(), text
    return text


def refused_writes(cluster_b, namespace: str) -> set[tuple[str, str, str, bool]]:
    """(resource, name, verb, dry-run?) of every write of gitopsd-remote that b's apiserver answered 403."""
    return {(e["objectRef"]["resource"], e["objectRef"].get("name"), e["verb"], "dryRun=All" in e["requestURI"])
            for e in remote_writes(cluster_b, namespace) if (e.get("responseStatus") or {}).get("code") == 403}
