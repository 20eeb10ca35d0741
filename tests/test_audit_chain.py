"""The durable audit store: a hash chain that detects tampering, survives restarts and hand-overs, stays
within etcd's limits, and keeps concurrent apps apart."""

from __future__ import annotations

import threading

import orjson
import pytest
from helpers import configmap, gitopsd, gitopsd_json

from gitopsd import audit
from gitopsd.engine import inventory
from gitopsd.kube import KubeApiError
from gitopsd.objects import ObjectRef

pytestmark = pytest.mark.cluster


def _drift(app: str, n: int, *, instance: str = "gitopsd-0") -> dict:
    """A small, cheap record: the chain does not care what kind it is."""
    return audit.drift_record(app=app, ref=ObjectRef("apps", "Deployment", "web", f"web-{n}"),
                              fields=["spec.replicas"], managers=["kubectl (Update)"], action="reported",
                              revision="a" * 40, instance=instance)


def _write(kube, namespace: str, app: str, count: int, **kwargs) -> audit.AuditLog:
    trail = audit.AuditLog(kube, namespace=namespace, events=False, **kwargs)
    for n in range(count):
        trail.record(_drift(app, n))
    return trail


def _segments(kube, namespace: str, app: str) -> list[dict]:
    items = kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace,
                      label_selector=f"{audit.AUDIT_APP_LABEL}={app}")
    return sorted(items, key=lambda cm: cm["metadata"]["name"])


def _patch_data(kube, namespace: str, name: str, data: dict) -> None:
    kube.request("PATCH", kube.resource("v1", "ConfigMap").path(namespace, name), body={"data": data},
                 content_type="application/merge-patch+json")


def _delete_segments(kube, namespace: str, app: str, *numbers: int) -> None:
    for number in numbers:
        assert kube.delete(kube.resource("v1", "ConfigMap"), audit.segment_name(app, number), namespace)


def _kept(kube, namespace: str, app: str) -> tuple[str | None, str | None]:
    """The chain head kept on the app's parent: (seq:hash, segment name)."""
    parent = kube.get(kube.resource("v1", "ConfigMap"), inventory.parent_name(app), namespace)
    annotations = parent["metadata"].get("annotations") or {}
    return annotations.get(audit.HEAD_ANNOTATION), annotations.get(audit.HEAD_SEGMENT_ANNOTATION)


def _keep(kube, namespace: str, app: str, marker: str | None, segment: str | None = None) -> None:
    """Edit the head kept on the parent by hand (None removes an annotation)."""
    annotations = {audit.HEAD_ANNOTATION: marker}
    if segment is not None or marker is None:
        annotations[audit.HEAD_SEGMENT_ANNOTATION] = segment
    kube.request("PATCH", kube.resource("v1", "ConfigMap").path(namespace, inventory.parent_name(app)),
                 body={"metadata": {"annotations": annotations}}, content_type="application/merge-patch+json")


def _stored(kube, namespace, app, seq) -> tuple[str, dict]:
    for cm in _segments(kube, namespace, app):
        raw = (cm.get("data") or {}).get(f"{seq:012d}")
        if raw:
            return cm["metadata"]["name"], orjson.loads(raw)
    raise AssertionError(f"seq {seq} not stored")


def test_verify_detects_an_edited_record(kube, namespace, kubeconfig, source_cache):
    app = "shop"
    _write(kube, namespace, app, 5)
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert ok and message.startswith("OK: 5 records, seq 1..5"), message
    segment, rec = _stored(kube, namespace, app, 3)

    # Someone rewrites who made the change, leaving the hash alone.
    forged = {**rec, "managers": ["gitopsd (Apply)"]}
    _patch_data(kube, namespace, segment, {f"{3:012d}": audit.canonical(forged).decode()})
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 3 edited"), message

    cli = gitopsd("audit", "verify", app, "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 1 and cli.stdout.startswith("BROKEN: seq 3 edited"), cli.stdout + cli.stderr

    # A smarter forger re-computes the record's own hash: the next record's prev_hash still points at the original.
    forged["hash"] = audit.record_hash(forged)
    _patch_data(kube, namespace, segment, {f"{3:012d}": audit.canonical(forged).decode()})
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 3 edited or replaced"), message

    # Put back, the chain is whole again.
    _patch_data(kube, namespace, segment, {f"{3:012d}": audit.canonical(rec).decode()})
    assert audit.verify(kube, namespace=namespace, app=app)[0]


def test_verify_detects_a_reordered_record(kube, namespace):
    app = "shop"
    _write(kube, namespace, app, 4)
    segment, two = _stored(kube, namespace, app, 2)
    _, three = _stored(kube, namespace, app, 3)
    _patch_data(kube, namespace, segment, {f"{2:012d}": audit.canonical(three).decode(),
                                           f"{3:012d}": audit.canonical(two).decode()})
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 2 out of order"), message


def test_verify_detects_a_deleted_record(kube, namespace, kubeconfig, source_cache):
    app = "shop"
    _write(kube, namespace, app, 5)
    segment, _ = _stored(kube, namespace, app, 3)

    _patch_data(kube, namespace, segment, {f"{3:012d}": None})
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 3 missing"), message
    cli = gitopsd("audit", "verify", app, "-n", namespace, "-o", "json", kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 1 and orjson.loads(cli.stdout)["message"].startswith("seq 3 missing")


def test_verify_detects_deleted_newest_and_oldest_records(kube, namespace):
    app = "shop"
    _write(kube, namespace, app, 5, segment_records=3)   # segments: 1-3, 4-5
    first, last = (cm["metadata"]["name"] for cm in _segments(kube, namespace, app))

    # The newest record: nothing after it to break, but the segment's head marker remembers it.
    _patch_data(kube, namespace, last, {f"{5:012d}": None})
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 5 missing"), message
    _patch_data(kube, namespace, last, {f"{4:012d}": None})
    assert audit.verify(kube, namespace=namespace, app=app)[1].startswith("seq 4 missing")

    # A whole oldest segment deleted by hand is not retention: no marker says so.
    app = "shelf"
    _write(kube, namespace, app, 5, segment_records=3)
    kube.delete(kube.resource("v1", "ConfigMap"), audit.segment_name(app, 1), namespace)
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message == ("seq 3 missing: the chain starts at seq 4 and no retention marker says older "
                                  "records were removed (segment gitopsd-audit-shelf-000001 deleted by hand?)"), message


def test_records_survive_a_new_auditlog_instance(kube, namespace):
    app = "shop"
    old_leader = _write(kube, namespace, app, 3, instance="gitopsd-0")

    # A restart or a new leader: a fresh instance, nothing in memory, continues the stored chain.
    new_leader = audit.AuditLog(kube, namespace=namespace, events=False, instance="gitopsd-1")
    assert new_leader.head(app)[0] == 3
    four = new_leader.record(_drift(app, 4, instance="gitopsd-1"))
    five = new_leader.record(_drift(app, 5, instance="gitopsd-1"))
    assert (four["seq"], five["seq"]) == (4, 5) and four["prev_hash"] == _stored(kube, namespace, app, 3)[1]["hash"]

    # The old leader has not noticed it lost the lease; its cached head (seq 3) is stale.
    # Its write is refused (409 on the resourceVersion), it re-reads and chains on top instead of forking.
    six = old_leader.record(_drift(app, 6))
    assert six["seq"] == 6 and six["prev_hash"] == five["hash"]

    records = audit.history(kube, namespace=namespace, app=app)
    assert [r["seq"] for r in records] == [6, 5, 4, 3, 2, 1]
    assert [r["instance"] for r in records] == ["gitopsd-0", "gitopsd-1", "gitopsd-1", "gitopsd-0", "gitopsd-0",
                                                "gitopsd-0"]
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert ok, message


def test_retention_drops_whole_old_segments_and_verify_still_passes(kube, namespace):
    app = "shop"
    _write(kube, namespace, app, 25, retention=10, segment_records=4)

    segments = _segments(kube, namespace, app)
    seqs = [sorted(int(k) for k in cm["data"]) for cm in segments]
    kept = [s for segment in seqs for s in segment]
    assert kept == list(range(kept[0], 26)), "what is left is one contiguous tail"
    assert 10 <= len(kept) < 10 + 4, "at least `retention` records, less than one segment more"
    assert all(segment[0] % 4 == 1 for segment in seqs), "only whole segments left"
    assert all(len(segment) == 4 for segment in seqs[:-1])
    assert segments[0]["metadata"]["name"] != audit.segment_name(app, 1)

    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert ok, message
    assert f"chain starts at seq {kept[0]} (older records removed by retention)" in message

    # Full segments are sealed: the apiserver itself refuses an edit.
    with pytest.raises(KubeApiError) as refused:
        _patch_data(kube, namespace, segments[0]["metadata"]["name"], {f"{kept[0]:012d}": "{}"})
    assert refused.value.status == 422 and "immutable" in refused.value.api_message.lower()
    assert audit.history(kube, namespace=namespace, app=app, limit=3)[0]["seq"] == 25


def test_concurrent_apps_keep_whole_valid_chains(kube, namespace):
    apps = [f"app-{i}" for i in range(4)]
    per_thread = 12
    # Two AuditLog instances (two processes) and two threads each per app: appends race inside a
    # process (the per-app lock) and across processes (resourceVersion conflicts, segment roll-over).
    logs = [audit.AuditLog(kube, namespace=namespace, events=False, instance=f"gitopsd-{i}", segment_records=5)
            for i in range(2)]
    errors: list[BaseException] = []

    def work(trail: audit.AuditLog, app: str, thread: int) -> None:
        try:
            for n in range(per_thread):
                rec = trail.record(_drift(app, thread * 100 + n, instance=trail.instance))
                assert "hash" in rec, trail.store_error
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(logs[t % 2], app, t)) for app in apps for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors

    for app in apps:
        ok, message = audit.verify(kube, namespace=namespace, app=app)
        assert ok, f"{app}: {message}"
        records = audit.history(kube, namespace=namespace, app=app)
        assert len(records) == 4 * per_thread
        assert {r["app"] for r in records} == {app}
        objects = sorted(r["object"]["name"] for r in records)
        assert objects == sorted(f"web-{t * 100 + n}" for t in range(4) for n in range(per_thread)), \
            "every record stored exactly once"


def test_segment_stays_under_size_limit(kube, namespace):
    app = "mono"
    trail = audit.AuditLog(kube, namespace=namespace, events=False, instance="gitopsd-0")
    # A monorepo commit touching 600 objects, each with a long field list: far over one record's budget.
    objects = [{"group": "apps", "kind": "Deployment", "namespace": f"team-{i % 40}", "name": f"service-{i:04d}",
                "action": "configured", "done": True,
                "fields": [f"spec.template.spec.containers[{c}].env[{e}].value" for c in range(3) for e in range(4)]}
               for i in range(600)]
    big = {"type": "transition", "app": app, "trigger": "webhook", "revision": "b" * 40, "result": "Applied",
           "plan": {"objects": objects, "unchanged": 10, "kept": [], "orphans": []}, "written": 600}
    assert len(audit.canonical(big)) > 2 * audit.RECORD_MAX_BYTES
    stored = [trail.record(big) for _ in range(12)]

    first = stored[0]
    assert len(audit.canonical(first)) <= audit.RECORD_MAX_BYTES
    assert first["truncated"]["plan.objects"] > 0 and first["written"] == 600, "counts stay exact"
    assert len(first["plan"]["objects"]) + first["truncated"]["plan.objects"] == 600

    segments = _segments(kube, namespace, app)
    assert len(segments) > 1, "segments roll over by size long before 100 records"
    for cm in segments:
        size = sum(len(k) + len(v.encode()) for k, v in cm["data"].items())
        assert size <= audit.SEGMENT_MAX_BYTES, f"{cm['metadata']['name']}: {size} bytes"
        assert len(orjson.dumps(cm)) < 1024 * 1024, "far under etcd's 1.5 MiB request limit"
    assert audit.verify(kube, namespace=namespace, app=app)[0]


class _Outage:
    """The session's Kube, with the apiserver "unreachable" while `down` is set."""

    def __init__(self, kube) -> None:
        self._kube = kube
        self.down = False

    def request(self, method, path, **kwargs):
        from gitopsd.errors import ClusterError

        if self.down:
            raise ClusterError(f"{method} {path}: cannot reach the apiserver")
        return self._kube.request(method, path, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kube, name)


def test_a_record_the_store_refused_is_stored_before_the_next_one(kube, namespace):
    app = "shop"
    flaky = _Outage(kube)
    trail = audit.AuditLog(flaky, namespace=namespace, events=False, instance="gitopsd-0")
    trail.record(_drift(app, 1))

    flaky.down = True
    lost = trail.record(_drift(app, 2))
    assert "hash" not in lost and "cannot reach the apiserver" in trail.store_error

    flaky.down = False
    three = trail.record(_drift(app, 3))
    assert three["seq"] == 3 and trail.store_error is None
    records = audit.history(kube, namespace=namespace, app=app)
    assert [(r["seq"], r["object"]["name"]) for r in records] == [(3, "web-3"), (2, "web-2"), (1, "web-1")]
    assert records[1]["time"] == lost["time"], "stored as it was recorded, in order"
    assert audit.verify(kube, namespace=namespace, app=app)[0]


# ------------------------------------------------------------------ deleted segments

def test_every_record_keeps_the_chain_head_on_the_apps_parent(kube, namespace):
    app = "shop"
    trail = _write(kube, namespace, app, 4, segment_records=3)
    seq, digest = trail.head(app)
    assert _kept(kube, namespace, app) == (f"4:{digest}", audit.segment_name(app, 2))

    # The first record created the parent (the app never applied): it is the app's ApplySet parent all the same.
    inv = inventory.load(kube, app=app, namespace=namespace)
    assert inv.exists and inv.group_kinds == set()
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert ok and message == f"OK: 4 records, seq 1..4, chain intact (head {digest[:12]})", message


def test_verify_accepts_a_kept_head_a_record_behind_and_names_one_that_does_not_match(kube, namespace):
    app = "shop"
    trail = _write(kube, namespace, app, 4)
    _, three = _stored(kube, namespace, app, 3)
    parent = f"ConfigMap {namespace}/gitopsd-{app}"

    # A crash between the segment write and the parent's, or a concurrent writer's older head landing last.
    _keep(kube, namespace, app, f"3:{three['hash']}")
    assert audit.verify(kube, namespace=namespace, app=app)[0]

    _keep(kube, namespace, app, f"3:{'f' * 64}")
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message == f"seq 3 edited or replaced: it does not match the chain head kept on {parent}"

    _keep(kube, namespace, app, "4:not-a-hash")
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith(f"the chain head kept on {parent} is unreadable: annotations "
                                         f"{audit.HEAD_ANNOTATION}='4:not-a-hash'"), message

    # The next record rewrites it.
    assert trail.record(_drift(app, 5))["seq"] == 5
    assert audit.verify(kube, namespace=namespace, app=app)[0]

    # A trail written before gitopsd kept its head: OK, and verify says what it cannot see.
    _keep(kube, namespace, app, None)
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert ok and message.endswith(f"; no chain head is kept on {parent} yet (the next record writes it), so a "
                                   "deleted newest segment would go unnoticed"), message


def test_a_deleted_newest_segment_is_named_by_verify_and_a_new_writer_continues_after_it(
        kube, namespace, kubeconfig, source_cache):
    app = "shop"
    _write(kube, namespace, app, 5, segment_records=3)          # segments: 1-3, 4-5
    _, five = _stored(kube, namespace, app, 5)
    _delete_segments(kube, namespace, app, 2)

    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message == (
        f"seq 4 missing (through seq 5): the segments end at seq 3, but the chain head kept on ConfigMap "
        f"{namespace}/gitopsd-shop is seq 5 in gitopsd-audit-shop-000002 (the newest segment "
        f"gitopsd-audit-shop-000002 deleted?)"), message
    cli = gitopsd("audit", "verify", app, "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 1 and cli.stdout == f"BROKEN: {message}\n", cli.stdout + cli.stderr

    # A restart, a new leader, a CLI run: nothing in memory; the head kept on the parent says where the chain goes on.
    restarted = audit.AuditLog(kube, namespace=namespace, events=False, instance="gitopsd-1", segment_records=3)
    six = restarted.record(_drift(app, 6, instance="gitopsd-1"))
    assert (six["seq"], six["prev_hash"]) == (6, five["hash"]), "chained on the lost head, not a new chain at seq 1"
    assert _stored(kube, namespace, app, 6)[0] == audit.segment_name(app, 3), "a new segment, never the lost name"
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message == (
        "seq 4 missing (through seq 5): the chain jumps from seq 3 in gitopsd-audit-shop-000001 to seq 6 in "
        "gitopsd-audit-shop-000003 (segment gitopsd-audit-shop-000002 deleted?)"), message
    assert [r["seq"] for r in audit.history(kube, namespace=namespace, app=app)] == [6, 3, 2, 1]


def test_a_running_writer_continues_from_memory_when_the_newest_segment_and_the_parent_are_deleted(kube, namespace):
    app = "shop"
    trail = _write(kube, namespace, app, 5, segment_records=3)   # the daemon's AuditLog: it saw seq 5 written
    _, five = _stored(kube, namespace, app, 5)
    _delete_segments(kube, namespace, app, 2)
    assert kube.delete(kube.resource("v1", "ConfigMap"), inventory.parent_name(app), namespace)

    six = trail.record(_drift(app, 6))
    assert (six["seq"], six["prev_hash"]) == (6, five["hash"])
    assert _kept(kube, namespace, app) == (f"6:{six['hash']}", audit.segment_name(app, 3)), "the parent is back"
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith("seq 4 missing (through seq 5): the chain jumps from seq 3 in "
                                         "gitopsd-audit-shop-000001 to seq 6 in gitopsd-audit-shop-000003"), message


def test_deleting_every_segment_is_named_by_verify_and_the_cli_keeps_recording(repo, kube, kubeconfig, source_cache,
                                                                                namespace):
    app = namespace   # the CLI's --app
    args = ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", app,
            "--inventory-namespace", namespace)
    store = ("--namespace", namespace)
    for n in (1, 2):
        repo.write("a.yaml", configmap("a", {"k": str(n)}))
        repo.commit(f"commit {n}")
        gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    _, two = _stored(kube, namespace, app, 2)
    _delete_segments(kube, namespace, app, 1)

    cli = gitopsd("audit", "verify", app, *store, kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 1 and cli.stdout == (
        f"BROKEN: seq 1 missing (through seq 2): no audit segment of app {app} is left, but the chain head kept on "
        f"ConfigMap {namespace}/gitopsd-{app} is seq 2 in gitopsd-audit-{app}-000001 (were the segments deleted?)\n"
    ), cli.stdout + cli.stderr

    repo.write("a.yaml", configmap("a", {"k": "3"}))
    repo.commit("commit 3")
    proc = gitopsd("sync", *args, kubeconfig=kubeconfig, cache=source_cache)
    assert proc.returncode == 0 and "not stored" not in proc.stderr, proc.stderr
    _, records = gitopsd_json("history", app, *store, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    assert [(r["seq"], r["prev_hash"]) for r in records] == [(3, two["hash"])]
    cli = gitopsd("audit", "verify", app, *store, kubeconfig=kubeconfig, cache=source_cache)
    assert cli.returncode == 1 and cli.stdout == (
        f"BROKEN: seq 2 missing: the chain starts at seq 3 and no retention marker says older records were removed "
        f"(segment gitopsd-audit-{app}-000001 deleted by hand?)\n"), cli.stdout + cli.stderr


def test_a_deleted_middle_segment_is_named_by_verify_and_recording_goes_on(kube, namespace):
    app = "shop"
    trail = _write(kube, namespace, app, 7, segment_records=3)   # segments: 1-3, 4-6, 7
    _delete_segments(kube, namespace, app, 2)
    gap = ("seq 4 missing (through seq 6): the chain jumps from seq 3 in gitopsd-audit-shop-000001 to seq 7 in "
           "gitopsd-audit-shop-000003 (segment gitopsd-audit-shop-000002 deleted?)")
    assert audit.verify(kube, namespace=namespace, app=app) == (False, gap)

    assert trail.record(_drift(app, 8))["seq"] == 8
    assert audit.verify(kube, namespace=namespace, app=app) == (False, gap)


def test_retention_is_told_apart_from_a_deleted_newest_segment(kube, namespace):
    app = "shop"
    trail = _write(kube, namespace, app, 25, retention=10, segment_records=4)
    *_, before, newest = (cm["metadata"]["name"] for cm in _segments(kube, namespace, app))
    assert audit.verify(kube, namespace=namespace, app=app)[0], "retention's cut verifies"

    kube.delete(kube.resource("v1", "ConfigMap"), newest, namespace)   # it held seq 25 alone
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message == (
        f"seq 25 missing: the segments end at seq 24, but the chain head kept on ConfigMap {namespace}/gitopsd-shop "
        f"is seq 25 in {newest} (the newest segment {newest} deleted?)"), message

    assert trail.record(_drift(app, 26))["seq"] == 26
    ok, message = audit.verify(kube, namespace=namespace, app=app)
    assert not ok and message.startswith(f"seq 25 missing: the chain jumps from seq 24 in {before} to seq 26 in "
                                         f"gitopsd-audit-shop-000008 (segment {newest} deleted?)"), message
