"""Audit records of syncs and drift: one record per attempt, with the right fields, and no Secret value anywhere."""

from __future__ import annotations

import base64
import io
import json
import subprocess

import pytest
import structlog
from helpers import configmap, deployment, gitopsd, gitopsd_json
from test_secrets import _secret  # the same Secret shape the CLI output test uses

from gitopsd import audit
from gitopsd import log as gitopsd_log
from gitopsd.engine import diff
from gitopsd.objects import ObjectRef

pytestmark = pytest.mark.cluster


def _records(kube, namespace, app):
    return audit.history(kube, namespace=namespace, app=app)


def _events(kube, namespace, app):
    return kube.list(kube.resource("events.k8s.io/v1", "Event"), namespace=namespace,
                     label_selector=f"{audit.AUDIT_APP_LABEL}={app}")


def _objects(rec):
    return {(o["kind"], o["name"]): o for o in rec["plan"]["objects"]}


def test_every_sync_path_writes_exactly_one_record_with_the_right_fields(app, repo, kube, namespace):
    trail = audit.AuditLog(kube, namespace=namespace, instance="test-instance")
    seen: list[dict] = []

    def sync_and_record(**overrides) -> dict:
        result = app.sync(**overrides)
        previous = audit.last_revision(kube, namespace=namespace, app=namespace)
        stored = trail.record(audit.transition_record(result, trigger="poll", previous=previous,
                                                      instance="test-instance"))
        records = _records(kube, namespace, namespace)
        assert len(records) == len(seen) + 1, "each sync attempt writes exactly one record"
        assert records[0] == stored
        seen.append(stored)
        assert stored["seq"] == len(seen) and stored["app"] == namespace and stored["trigger"] == "poll"
        assert stored["instance"] == "test-instance" and stored["signature"] is None
        assert stored["source"] == repo.url and stored["ref"] == "main"
        assert stored["duration_seconds"] >= 0
        return stored

    # create
    for name in ("a", "b", "c"):
        repo.write(f"{name}.yaml", configmap(name, {"k": name}))
    sha1 = repo.commit("three config maps\n\nwith a body")
    rec = sync_and_record()
    assert rec["result"] == "Applied" and rec["previous"] is None and rec["revision"] == sha1
    assert rec["commit"]["author"] == "Ada Author <ada@example.com>"
    assert rec["commit"]["committer"] == "Cy Committer <cy@example.com>"
    assert rec["commit"]["message"] == "three config maps\n\nwith a body"
    assert {k: (o["action"], o["done"]) for k, o in _objects(rec).items()} == {
        ("ConfigMap", n): ("created", True) for n in ("a", "b", "c")}
    assert all(o["uid"] for o in rec["plan"]["objects"])
    assert rec["written"] == 3 and rec["health"]["outcome"] == "Healthy"

    # update
    repo.write("a.yaml", configmap("a", {"k": "A"}))
    sha2 = repo.commit("change a")
    rec = sync_and_record()
    assert rec["result"] == "Applied" and (rec["previous"], rec["revision"]) == (sha1, sha2)
    assert rec["plan"]["objects"] == [{"group": "", "kind": "ConfigMap", "namespace": namespace, "name": "a",
                                       "action": "configured", "fields": ["data.k"], "done": True,
                                       "uid": rec["plan"]["objects"][0]["uid"]}]
    assert rec["plan"]["unchanged"] == 2

    # prune
    repo.remove("c.yaml")
    sha3 = repo.commit("drop c")
    rec = sync_and_record()
    assert rec["result"] == "Applied" and rec["previous"] == sha2 and rec["revision"] == sha3
    assert {k: o["action"] for k, o in _objects(rec).items()} == {("ConfigMap", "c"): "pruned"}

    # no-op
    rec = sync_and_record()
    assert rec["result"] == "NoChange" and rec["previous"] == sha3 and rec["revision"] == sha3
    assert rec["plan"]["objects"] == [] and rec["plan"]["unchanged"] == 2 and rec["written"] == 0
    assert rec["health"]["outcome"] == "NotChecked"

    # failure: the server refuses the object in the dry-run; nothing is written
    repo.write("bad.yaml", configmap("bad", {"bad key!": "x"}))
    sha4 = repo.commit("a broken object")
    rec = sync_and_record()
    assert rec["result"] == "Failed" and rec["revision"] == sha4 and rec["previous"] == sha3
    assert "invalid" in rec["reason"] and any("bad" in e for e in rec["errors"])
    assert rec["written"] == 0

    # unhealthy: written, but the rollout never becomes ready
    repo.remove("bad.yaml")
    stuck = deployment("stuck")
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    repo.write("stuck.yaml", stuck)
    sha5 = repo.commit("a rollout that never finishes")
    rec = sync_and_record(timeout=3.0)
    assert rec["result"] == "Unhealthy" and rec["revision"] == sha5
    assert rec["previous"] == sha3, "a Failed attempt never became live, so it is not `previous`"
    assert _objects(rec)[("Deployment", "stuck")]["action"] == "created"
    assert rec["health"]["outcome"] == "Unhealthy"
    (bad,) = rec["health"]["objects"]
    assert (bad["kind"], bad["name"]) == ("Deployment", "stuck") and bad["status"] != "Current" and bad["message"]

    # prune-guard refusal: an emptied repository
    for name in ("a", "b", "stuck"):
        repo.remove(f"{name}.yaml")
    repo.write("README.md", "moved elsewhere\n")
    sha6 = repo.commit("oops: emptied")
    rec = sync_and_record()
    assert rec["result"] == "Refused" and rec["revision"] == sha6 and rec["previous"] == sha5
    assert "prune" in rec["reason"] and rec["written"] == 0
    assert {o["action"] for o in rec["plan"]["objects"]} == {"pruned"}
    assert not any(o["done"] for o in rec["plan"]["objects"]), "refused: listed as intended, not done"

    assert audit.verify(kube, namespace=namespace, app=namespace)[0]
    # One Event per record, on the ApplySet parent, and none per object a transition wrote
    # (as Flux records on the Kustomization): the note counts them, the record names them.
    events = _events(kube, namespace, namespace)
    on_parent = [e for e in events if e["regarding"]["name"] == f"gitopsd-{namespace}"]
    assert sorted(e["reason"] for e in on_parent) == sorted(r["result"] for r in seen)
    assert all(e["regarding"].get("uid") for e in on_parent), "kubectl describe finds events by uid"
    refused = next(e for e in on_parent if e["reason"] == "Refused")
    assert refused["type"] == "Warning" and "oops: emptied" in refused["note"]
    applied = next(e for e in on_parent if e["metadata"]["annotations"]["gitopsd.io/audit-seq"] == "1")
    assert "3 created" in applied["note"]
    assert [e for e in events if e not in on_parent] == [], "no Event per object of a transition"

    # The number reported in the issue: bytes per 1,000 records of this mix.
    per_record = sum(len(audit.canonical(r)) + 12 for r in seen) / len(seen)
    print(f"\naudit store: {per_record:.0f} bytes per record on average, "
          f"{per_record * 1000 / 1024:.0f} KiB per 1,000 records")


def test_cli_sync_writes_an_audit_record(repo, kubeconfig, source_cache, namespace):
    args = ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)
    store = ("--namespace", namespace)
    repo.write("a.yaml", configmap("a", {"k": "1"}))
    sha1 = repo.commit("first")

    gitopsd_json("sync", "--dry-run", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    none = gitopsd("history", namespace, *store, kubeconfig=kubeconfig, cache=source_cache)
    assert none.returncode == 1 and "no audit records" in none.stdout, "--dry-run writes no record"

    proc = gitopsd("sync", "-o", "json", *args, kubeconfig=kubeconfig, cache=source_cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "Applied", "stdout stays one JSON document"
    (line,) = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    assert line["event"] == "audit" and line["seq"] == 1 and line["trigger"] == "cli" and line["hash"]

    repo.write("a.yaml", configmap("a", {"k": "2"}))
    sha2 = repo.commit("second")
    gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)

    _, records = gitopsd_json("history", namespace, *store, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    assert [r["seq"] for r in records] == [2, 1], "newest first"
    newest = records[0]
    assert newest["trigger"] == "cli" and newest["instance"].startswith("cli/")
    assert (newest["previous"], newest["revision"]) == (sha1, sha2)
    assert newest["plan"]["objects"][0]["fields"] == ["data.k"]
    assert line["hash"] == records[1]["hash"], "the log line carries the stored record's hash"

    text = gitopsd("history", namespace, *store, "--limit", "1", kubeconfig=kubeconfig, cache=source_cache)
    assert text.returncode == 0
    (only,) = text.stdout.splitlines()
    assert "Applied" in only and f"{sha1[:8]}->{sha2[:8]}" in only and "Ada Author" in only and '"second"' in only
    assert "1 configured" in only and "[cli]" in only

    ok = gitopsd("audit", "verify", namespace, *store, kubeconfig=kubeconfig, cache=source_cache)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 2 records")


def test_drift_record_names_the_editing_manager(app, repo, kube, kubeconfig, cluster, namespace):
    repo.write("web.yaml", deployment("web", replicas=2))
    sha = repo.commit("web")
    assert app.sync().outcome.value == "Applied"
    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "scale", "deployment/web",
                    "--replicas=5"], check=True, capture_output=True)

    # What the daemon's self-heal does: see the drift, name who made it, correct it, record it.
    seen = app.sync(dry_run=True)
    (change,) = [c for c in seen.plan.changes if c.action.value == "update"]
    managers = diff.managers_of(change.live, change.diff.fields)
    assert app.sync().outcome.value == "Applied"
    trail = audit.AuditLog(kube, namespace=namespace, instance="gitopsd-0")
    stored = trail.record(audit.drift_record(app=namespace, ref=change.ref, fields=change.diff.fields,
                                             managers=managers, action="corrected", revision=sha,
                                             instance="gitopsd-0"))

    (rec,) = audit.history(kube, namespace=namespace, app=namespace)
    assert rec == stored
    assert rec["type"] == "drift" and rec["action"] == "corrected" and rec["revision"] == sha
    assert rec["object"] == {"group": "apps", "kind": "Deployment", "namespace": namespace, "name": "web"}
    assert "spec.replicas" in rec["fields"]
    # kubectl up to 1.3x wrote as "kubectl-scale"; 1.37 writes as "kubectl" through the scale subresource.
    assert any(m.split(" ")[0] in ("kubectl", "kubectl-scale") for m in rec["managers"]), rec["managers"]
    assert "gitopsd" not in [m.split(" ")[0] for m in rec["managers"]]

    events = _events(kube, namespace, namespace)
    on_web = [e for e in events if e["regarding"]["kind"] == "Deployment"]
    assert len(on_web) == 1 and on_web[0]["reason"] == "DriftCorrected" and "(by kubectl" in on_web[0]["note"]
    assert "(by kubectl" in audit.summary_line(rec)


VALUE_1 = "hunter2-audit-secret-value"
VALUE_2 = "rotated-audit-s3cret-xyz"


def test_no_secret_value_in_any_record_event_or_log_line(app, repo, kube, kubeconfig, source_cache, namespace):
    out = io.StringIO()
    gitopsd_log.configure(fmt="json", stream=out)
    try:
        trail = audit.AuditLog(kube, namespace=namespace, instance="gitopsd-0")

        def sync_and_record():
            result = app.sync()
            trail.record(audit.transition_record(result, trigger="webhook", previous=None, instance="gitopsd-0"))
            return result

        repo.write("secret.yaml", _secret(VALUE_1))
        repo.commit("add db secret")
        assert sync_and_record().outcome.value == "Applied"
        repo.write("secret.yaml", _secret(VALUE_2))
        repo.commit("rotate")
        assert sync_and_record().outcome.value == "Applied"
        # The server's error about an invalid key must not carry the value into the record either.
        repo.write("secret.yaml", _secret(VALUE_2, {"bad key!": base64.b64encode(VALUE_1.encode()).decode()}))
        repo.commit("invalid key")
        assert sync_and_record().outcome.value == "Failed"
        trail.record(audit.drift_record(app=namespace, ref=ObjectRef("", "Secret", namespace, "db"),
                                        fields=["data.password"], managers=["kubectl-edit (Update)"],
                                        action="reported", revision=None, instance="gitopsd-0"))
    finally:
        structlog.reset_defaults()

    # And the CLI's own record (its log line goes to stderr).
    repo.write("secret.yaml", _secret(VALUE_1))
    repo.commit("rotate back")
    cli = gitopsd("sync", "--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
                  "--inventory-namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 0, cli.stderr

    records = audit.history(kube, namespace=namespace, app=namespace)
    assert len(records) == 5
    rotate = next(r for r in records if (r.get("commit") or {}).get("message") == "rotate")
    assert "data.password" in rotate["plan"]["objects"][0]["fields"], "the changed key is named, not its value"

    segments = kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace,
                         label_selector=f"{audit.AUDIT_APP_LABEL}={namespace}")
    events = kube.list(kube.resource("events.k8s.io/v1", "Event"), namespace=namespace)
    assert segments and events
    haystacks = {
        "stored records": json.dumps(segments),
        "events": json.dumps(events),
        "log lines": out.getvalue(),
        "cli output": cli.stdout + cli.stderr,
    }
    assert out.getvalue().count('"event": "audit"') == 4
    forbidden = [VALUE_1, VALUE_2, VALUE_1 + "-token", VALUE_2 + "-token"]
    forbidden += [base64.b64encode(v.encode()).decode() for v in forbidden]
    for where, text in haystacks.items():
        for value in forbidden:
            assert value not in text, f"a Secret value leaked into the {where}"
