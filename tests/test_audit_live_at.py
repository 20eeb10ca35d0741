"""`gitopsd history APP --at T`: which commit was live at T, who wrote it, and who had changed the cluster by hand."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone

import pytest
from helpers import deployment, gitopsd

from gitopsd import audit
from gitopsd.engine import diff

pytestmark = pytest.mark.cluster


def _commit_as(repo, message: str, author: str) -> str:
    repo._git("add", "-A")
    repo._git("commit", "-q", "-m", message, "--author", author)
    repo._git("push", "-q", "origin", "main")
    return repo._git("rev-parse", "HEAD")


def _now() -> datetime:
    # Records carry microseconds; step past the last one so "at or before" is unambiguous.
    time.sleep(0.01)
    when = datetime.now(timezone.utc)
    time.sleep(0.01)
    return when


def test_live_at_answers_across_three_commits_and_a_drift(app, repo, kube, kubeconfig, cluster, source_cache,
                                                          namespace):
    trail = audit.AuditLog(kube, namespace=namespace, instance="gitopsd-0")

    def sync_and_record() -> dict:
        result = app.sync()
        assert result.outcome.value == "Applied", result.reason
        previous = audit.last_revision(kube, namespace=namespace, app=namespace)
        return trail.record(audit.transition_record(result, trigger="poll", previous=previous, instance="gitopsd-0"))

    before_anything = _now()
    repo.write("web.yaml", deployment("web", replicas=1))
    sha1 = _commit_as(repo, "web: first deploy\n\nticket OPS-1", "Ada Author <ada@example.com>")
    sync_and_record()
    t1 = _now()

    repo.write("web.yaml", deployment("web", replicas=2))
    sha2 = _commit_as(repo, "web: two replicas", "Bea Builder <bea@example.com>")
    sync_and_record()
    t2 = _now()

    # Someone scales by hand; self-heal is off, so gitopsd only reports it.
    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "scale", "deployment/web",
                    "--replicas=7"], check=True, capture_output=True)
    seen = app.sync(dry_run=True)
    (change,) = [c for c in seen.plan.changes if c.action.value == "update"]
    trail.record(audit.drift_record(app=namespace, ref=change.ref, fields=change.diff.fields,
                                    managers=diff.managers_of(change.live, change.diff.fields), action="reported",
                                    revision=sha2, instance="gitopsd-0"))
    t3 = _now()

    repo.write("web.yaml", deployment("web", replicas=3))
    sha3 = _commit_as(repo, "web: three replicas", "Cyd Coder <cyd@example.com>")
    sync_and_record()
    t4 = _now()

    def at(when):
        return audit.live_at(kube, namespace=namespace, app=namespace, when=when)

    nothing = at(before_anything)
    assert nothing["revision"] is None and "no transition" in nothing["note"]

    first = at(t1)
    assert first["revision"] == sha1 and first["commit"]["author"] == "Ada Author <ada@example.com>"
    assert first["commit"]["message"] == "web: first deploy\n\nticket OPS-1" and first["open_drift"] == []
    assert first["transition"]["result"] == "Applied" and first["transition"]["seq"] == 1

    second = at(t2)
    assert second["revision"] == sha2 and second["commit"]["author"].startswith("Bea Builder")
    assert second["open_drift"] == []

    drifted = at(t3)
    assert drifted["revision"] == sha2, "a hand edit does not change which commit is live"
    (open_drift,) = drifted["open_drift"]
    assert open_drift["object"]["name"] == "web" and "spec.replicas" in open_drift["fields"]
    assert any(m.startswith("kubectl") for m in open_drift["managers"])

    third = at(t4)
    assert third["revision"] == sha3 and third["commit"]["author"].startswith("Cyd Coder")
    assert third["open_drift"] == [], "the next transition wrote over the hand edit"

    # The same answers from the command line.
    args = ("--namespace", namespace)
    proc = gitopsd("history", namespace, *args, "--at", t3.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), kubeconfig=kubeconfig,
                   cache=source_cache)
    assert proc.returncode == 0, proc.stderr
    assert f"revision {sha2}" in proc.stdout and "Bea Builder <bea@example.com>" in proc.stdout
    assert "message   web: two replicas" in proc.stdout
    assert "open drift: Deployment.apps/" in proc.stdout and "spec.replicas by kubectl" in proc.stdout

    as_json = gitopsd("history", namespace, *args, "--at", t1.isoformat(), "-o", "json", kubeconfig=kubeconfig,
                      cache=source_cache)
    assert json.loads(as_json.stdout)["revision"] == sha1

    early = gitopsd("history", namespace, *args, "--at", before_anything.isoformat(), kubeconfig=kubeconfig,
                    cache=source_cache)
    assert early.returncode == 1 and "no transition" in early.stdout

    listing = gitopsd("history", namespace, *args, kubeconfig=kubeconfig, cache=source_cache)
    lines = listing.stdout.splitlines()
    assert len(lines) == 4 and "#4" in lines[0] and "drift reported" in lines[1] and "#1" in lines[3]
    since = gitopsd("history", namespace, *args, "--since", t2.isoformat(), "-o", "json", kubeconfig=kubeconfig,
                    cache=source_cache)
    assert [r["seq"] for r in json.loads(since.stdout)] == [4, 3]
