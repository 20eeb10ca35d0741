"""Audit: one record per commit-to-cluster transition and per drift, tamper-evident.

This is the Record stage of DESIGN.md §2 and the part auditors read years
later: which commit was live at time T, who wrote it, and who changed the
cluster by hand in between. Every record goes three ways:

1. stdout — one structlog event ``audit`` carrying the record's fields
   (JSON on a pod's stdout, a readable line on a terminal; gitopsd.log
   decides). The line's ``time`` is stamped by the log pipeline, a few
   microseconds after the stored record's ``time``; every other field is the
   stored record's, ``hash`` included, so a log collector holds an external
   copy of the chain head.
2. Kubernetes Events (events.k8s.io/v1) — one on the app's ApplySet parent
   ConfigMap (``gitopsd-<app>``), plus at most MAX_OBJECT_EVENTS on the
   objects the record names, so ``kubectl describe`` shows what gitopsd did.
   Events are best effort (the apiserver expires them after an hour); a
   failed Event write is logged and never fails the record.
3. The durable store, described below. It is the source of truth for
   ``gitopsd history`` and ``gitopsd audit verify``.

The store: a per-app series of ConfigMaps in gitopsd's own namespace
--------------------------------------------------------------------
``gitopsd-audit-<app>-<NNNNNN>`` (label ``gitopsd.io/audit-app=<app>``), each
a *segment* of at most SEGMENT_MAX_RECORDS records and SEGMENT_MAX_BYTES of
data, one data key per record (the zero-padded seq) holding the record as
canonical JSON. Why this store rather than a file on a volume:

- it lives where gitopsd's other state lives, in the cluster, so it survives
  pod restarts and a leader hand-over with no volume to provision, attach or
  move between nodes (a ReadWriteOnce volume cannot follow a new leader on
  another node), and it is backed up with etcd like everything else;
- an append is one small merge-PATCH carrying the segment's
  ``resourceVersion``: the apiserver's optimistic concurrency makes two
  writers (an old leader that has not noticed its lease expired, a CLI
  ``gitopsd sync`` beside the daemon) serialise — the loser gets 409
  Conflict, re-reads the head and re-chains its record on top;
- segments bound every object far below etcd's 1.5 MiB request limit however
  long gitopsd runs (DESIGN.md pain #8), and retention deletes whole old
  segments, never edits one: a full segment is sealed (``immutable: true``),
  so the apiserver rejects any later edit of its records;
- reading is cheap: a metadata-only LIST finds the segments, and history
  reads only as many segments (newest first) as the query needs.

Retention (AuditLog(retention=N), default 5000 per app): when a new segment
opens, whole oldest segments are deleted while the rest still hold at least
N records. Size, measured (tests/test_audit_sync_paths.py prints it): a
record is 0.5 KiB (drift) to ~2.6 KiB (a 5-object commit with a 1 KiB
message); the create/update/prune/no-op/fail/unhealthy/refused mix averages
1.35 KB, i.e. about 1.3 MiB per 1,000 records = 10 segments of ~135 KiB.

Hash chain: ``hash = sha256(prev_hash + canonical_json(record without hash))``
with canonical JSON = orjson with sorted keys; the first record (seq 1) has
``prev_hash`` = 64 zeros. Each segment carries ``gitopsd.io/audit-head``
(``<seq>:<hash>`` of its newest record), written in the same request as the
record, so deleting the newest records of a segment is detected too; when
retention removes segments it first marks the oldest survivor with
``gitopsd.io/audit-retained-from``, so ``verify`` tells retention from
deletion.

The chain head is also kept outside the segments, because a segment cannot
testify to its own deletion: after each append the same ``<seq>:<hash>`` and
the name of the segment holding it go onto the app's ApplySet parent
(``gitopsd-<app>``, annotations ``gitopsd.io/audit-head`` and
``gitopsd.io/audit-head-segment``, field manager ``gitopsd-audit``; the
parent is created if the app never applied), and the writing process keeps
it in memory. So when the newest segment — or every segment — is deleted by
hand:

- the writer continues from the furthest head it knows (its memory, the
  parent, the newest segment's records and marker): seq N+1 chained on hash
  N, in a new segment numbered past the lost one, never a fresh chain at
  seq 1 that would verify as whole;
- ``verify`` compares the parent's head with what the segments hold and names
  the gap and the segment that held it ("seq 4 missing (through seq 6): the
  segments end at seq 3, but the chain head kept on ConfigMap
  gitopsd-system/gitopsd-web is seq 6 in gitopsd-audit-web-000002 (the newest
  segment gitopsd-audit-web-000002 deleted?)"); once records follow the gap,
  the chain itself shows it, and a gap in the segments' numbering names the
  deleted ones.

The parent is written after the segment (never ahead of the store); a crash
in between, or a concurrent writer's older head landing last, leaves it a
record or two behind, which verify accepts when that record's hash matches.
A first-ever record has no head anywhere and starts at seq 1. What the
cluster still cannot prove: that nobody with delete rights removed the
newest segment *and* the parent's annotations while no gitopsd was running,
or rewrote every record from some seq on and re-hashed them. The stdout
lines (shipped off the cluster) carry each record's hash and are the
external anchor for that.

Record fields (stable names; see transition_record and drift_record):
``type`` (transition|drift), ``app``, ``time`` (UTC ISO 8601), ``instance``,
``seq``, ``prev_hash``, ``hash``; transitions add ``trigger``, ``source``,
``ref``, ``previous``, ``revision``, ``commit`` {author, committer, message,
time}, ``signature`` (null until verification exists), ``plan`` {objects
[{group, kind, namespace, name, uid?, action, fields, done}], unchanged,
kept, orphans}, ``written``, ``result``, ``reason``, ``errors``, ``health``
{outcome, objects}, ``started``, ``duration_seconds``; drifts add ``object``,
``fields``, ``managers``, ``action``, ``deleted``, ``revision``, ``error``.
Only field *paths* ever enter a record, never diff text, so no Secret value
can (gitopsd.diff masks values before paths are computed); `reason` and
`errors` are the sync's own messages, which gitopsd.sync has already
cleaned of Secret values. As the last line of defence, AuditLog.record
scrubs every string of every record by value (gitopsd.redact) before it is
hashed, so what is stored, logged and announced in Events is the same
clean text. A record over RECORD_MAX_BYTES has its longest
lists cut, the numbers dropped under ``truncated``.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import orjson
import structlog

from gitopsd import health as health_
from gitopsd import inventory, redact
from gitopsd.errors import ClusterError, GitopsdError
from gitopsd.kube import Kube, KubeApiError
from gitopsd.objects import ObjectRef
from gitopsd.plan import HASH_ANNOTATION, Action
from gitopsd.sync import Outcome, SyncResult

GENESIS_HASH = "0" * 64
AUDIT_APP_LABEL = "gitopsd.io/audit-app"
HEAD_ANNOTATION = "gitopsd.io/audit-head"                     # "<seq>:<hash>" of the segment's newest record
HEAD_SEGMENT_ANNOTATION = "gitopsd.io/audit-head-segment"     # on the app's parent: the segment holding the head
HEAD_FIELD_MANAGER = "gitopsd-audit"                          # owns the parent's two head annotations
FIRST_SEQ_ANNOTATION = "gitopsd.io/audit-first-seq"           # seq of the segment's first record
RETAINED_FROM_ANNOTATION = "gitopsd.io/audit-retained-from"   # set by retention on the oldest survivor
SEGMENT_PREFIX = "gitopsd-audit-"
SEGMENT_MAX_RECORDS = 100
# etcd refuses requests over 1.5 MiB and the apiserver ConfigMaps over 1 MiB;
# a third of that leaves room for metadata and for a record or two of slack.
SEGMENT_MAX_BYTES = 500 * 1024
# One record larger than this has its longest lists cut (see _fit): a plan of
# thousands of objects still records, and a segment still holds several records.
RECORD_MAX_BYTES = 100 * 1024
MAX_MESSAGE_CHARS = 4096
MAX_OBJECT_EVENTS = 10
MAX_BACKLOG = 1000
APPEND_ATTEMPTS = 10
DEFAULT_RETENTION = 5000
REPORTING_CONTROLLER = "gitopsd.io/gitopsd"
EVENT_NOTE_MAX = 1024

DRIFT_ACTIONS = ("corrected", "reported", "failed")
# Transitions that wrote the app's objects: after one, its commit is what runs.
CLUSTER_CHANGING = frozenset({Outcome.APPLIED.value, Outcome.UNHEALTHY.value})
# Transitions after which the cluster matched the commit (drift, if any, is gone).
CONVERGED = CLUSTER_CHANGING | {Outcome.NO_CHANGE.value}
WARNING_RESULTS = frozenset({Outcome.FAILED.value, Outcome.UNHEALTHY.value, Outcome.REFUSED.value})

_PAST = {Action.CREATE: "created", Action.UPDATE: "configured", Action.PRUNE: "pruned",
         Action.RECREATE: "recreated"}
_META_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
_META_LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
_KEY = re.compile(r"\d{12}")
_MARKER = re.compile(r"([1-9]\d*):([0-9a-f]{64})")


# ------------------------------------------------------------------ records

def canonical(rec: dict) -> bytes:
    """The bytes that are hashed and stored: JSON with sorted keys, no whitespace."""
    return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)


def record_hash(rec: dict) -> str:
    """sha256(prev_hash + canonical JSON of the record without its "hash")."""
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(str(rec.get("prev_hash", "")).encode() + canonical(body)).hexdigest()


def _ref_dict(ref: ObjectRef) -> dict:
    return {"group": ref.group, "kind": ref.kind, "namespace": ref.namespace, "name": ref.name}


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def transition_record(result: SyncResult, *, trigger: str, previous: str | None, instance: str,
                      source: str | None = None, ref: str | None = None) -> dict:
    """The audit record of one sync attempt (not yet chained: AuditLog.record does that).

    `trigger` says what started it: poll, webhook, self-heal, cli, config,
    watch, retry — recorded as given, not checked, so a new trigger never
    costs a record.

    `previous` is the revision that was live before (the caller knows: the
    daemon from its state, the CLI from the store, see last_revision).
    `source`/`ref` name the repository when the result has no revision (the
    fetch itself failed); otherwise the revision's credential-free URL wins.

    Plan objects are the plan's intended changes with the action in the past
    tense and `done` saying whether this attempt really wrote it: a Refused
    or Failed record lists what the commit *would* have done, all `done:
    false` (or partly, when an apply stage failed midway; `written` counts
    them). Only field paths are kept, never values or diff text.
    """
    rev, plan = result.revision, result.plan
    done = {c.ref for c in result.applied} | {c.ref for c in result.pruned}
    objects, unchanged, kept, orphans = [], 0, [], []
    if plan is not None:
        for c in plan.changes:
            if c.action == Action.UNCHANGED:
                unchanged += 1
                continue
            obj = {**_ref_dict(c.ref), "action": _PAST[c.action], "fields": _changed_fields(c),
                   "done": c.ref in done}
            uid = ((c.live or {}).get("metadata") or {}).get("uid")
            if uid:
                obj["uid"] = uid
            objects.append(obj)
        kept, orphans = [str(r) for r in plan.kept], [str(r) for r in plan.orphans]
    if result.outcome.value in CLUSTER_CHANGING or result.health:   # (a NoChange may carry a recheck)
        healthy, _ = health_.summarize(result.health)
        outcome = "Healthy" if healthy else "Unhealthy"
    else:
        outcome = "NotChecked"   # nothing was written, or the apply failed before the wait
    message = rev.message if rev else ""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " [truncated]"
    return _fit({
        "type": "transition",
        "app": result.app,
        "trigger": trigger,
        "source": rev.url if rev else _public_url(source),
        "ref": rev.ref if rev else ref,
        "previous": previous,
        "revision": rev.sha if rev else None,
        "commit": None if rev is None else {
            "author": rev.author, "committer": rev.committer, "message": message, "time": _iso(rev.time)},
        "signature": None,   # no commit signature verification yet; the field is kept for it
        "plan": {"objects": objects, "unchanged": unchanged, "kept": kept, "orphans": orphans},
        "written": len(done),
        "result": result.outcome.value,
        "reason": result.reason,
        "errors": list(result.errors),
        "health": {"outcome": outcome,
                   "objects": [{**_ref_dict(h.ref), "status": h.status.value, "message": h.message}
                               for h in result.health if h.status is not health_.Status.CURRENT]},
        "started": _iso(result.started),
        "duration_seconds": round(result.duration, 3),
        "instance": instance,
    })


_HASH_PATH = f"metadata.annotations.{HASH_ANNOTATION}"


def _changed_fields(change) -> list[str]:
    """The paths worth an auditor's time.

    A created or pruned object has no "changed fields" (its diff against
    nothing lists only top-level keys), and gitopsd's own desired-hash
    annotation changes with every update, so it is left out unless it is all
    that changed (someone edited it by hand).
    """
    if change.diff is None or change.action in (Action.CREATE, Action.PRUNE):
        return []
    return [f for f in change.diff.fields if f != _HASH_PATH] or list(change.diff.fields)


def drift_record(*, app: str, ref: ObjectRef, fields: Sequence[str], managers: Sequence[str], action: str,
                 revision: str | None, instance: str, deleted: bool = False, error: str | None = None) -> dict:
    """The audit record of one drift: which object, which fields, who, and what gitopsd did.

    `managers` are the field managers that own the drifted paths
    (gitopsd.diff.managers_of), i.e. who edited by hand; `deleted` marks an
    object removed by hand (no fields then). `action`: "corrected" (put
    back), "reported" (self-heal off: left alone), "failed" (the correction
    was refused; `error` says why).
    """
    if action not in DRIFT_ACTIONS:
        raise ValueError(f"drift action must be one of {', '.join(DRIFT_ACTIONS)}, not {action!r}")
    return _fit({
        "type": "drift", "app": app, "object": _ref_dict(ref), "fields": list(fields),
        "managers": list(managers), "action": action, "deleted": deleted, "revision": revision,
        "error": error, "instance": instance,
    })


def _public_url(url: str | None) -> str | None:
    """`url` without any user:password@ (the revision's own URL is already clean; this is the fallback)."""
    if not url or "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, ""))


def _fit(rec: dict) -> dict:
    """Cut the longest lists of an oversized record so it fits RECORD_MAX_BYTES.

    A commit touching thousands of objects must still record (and a segment
    must still hold it), so the object list is halved until it fits, the
    number dropped kept under `truncated`. Counts (`written`, `unchanged`)
    stay exact.
    """
    if len(canonical(rec)) <= RECORD_MAX_BYTES:
        return rec
    truncated: dict[str, int] = {}
    lists = [("plan", "objects"), (None, "errors"), ("health", "objects"), ("plan", "kept"),
             ("plan", "orphans"), (None, "fields")]
    for parent, key in lists:
        holder = rec.get(parent) if parent else rec
        if not isinstance(holder, dict) or not isinstance(holder.get(key), list):
            continue
        items = holder[key]
        original = len(items)
        while items and len(canonical(rec)) > RECORD_MAX_BYTES:
            items = items[:len(items) // 2]
            holder[key] = items
        if len(items) < original:
            truncated[f"{parent}.{key}" if parent else key] = original - len(items)
            rec["truncated"] = truncated
        if len(canonical(rec)) <= RECORD_MAX_BYTES:
            break
    return rec


def default_instance() -> str:
    """hostname-pid: a pod's name in the cluster, distinct for two daemons on one host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def cli_instance() -> str:
    """Who ran a one-shot CLI command: cli/<user>@<host>."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli/{user}@{socket.gethostname()}"


# ------------------------------------------------------------------ the store: reading

def segment_name(app: str, number: int) -> str:
    return f"{SEGMENT_PREFIX}{app}-{number:06d}"


def _key(seq: int) -> str:
    return f"{seq:012d}"


@dataclass(frozen=True)
class _Segment:
    number: int
    name: str
    annotations: dict


def _segments(kube: Kube, *, namespace: str, app: str) -> list[_Segment]:
    """The app's segments, oldest first, from a metadata-only LIST (no record data moves)."""
    cms = kube.resource("v1", "ConfigMap")
    query = {"labelSelector": f"{AUDIT_APP_LABEL}={app}", "limit": "500"}
    prefix = f"{SEGMENT_PREFIX}{app}-"
    out: list[_Segment] = []
    while True:
        doc = kube.request("GET", cms.path(namespace), query=query, accept=_META_LIST_ACCEPT)
        for item in doc.get("items") or []:
            meta = item.get("metadata") or {}
            name = meta.get("name", "")
            suffix = name[len(prefix):]
            if name.startswith(prefix) and suffix.isdigit():
                out.append(_Segment(number=int(suffix), name=name, annotations=meta.get("annotations") or {}))
        cont = (doc.get("metadata") or {}).get("continue")
        if not cont:
            return sorted(out, key=lambda s: s.number)
        query["continue"] = cont


@dataclass
class _Head:
    """A chain head: where the next record goes, as a segment, the app's parent or this process saw it."""

    seq: int = 0                 # 0: no record yet
    hash: str = GENESIS_HASH
    segment: int = 0             # 0: no segment yet
    resource_version: str = ""   # of the head segment; "": it is not in the store, the next record opens a new one
    count: int = 0               # records in the head segment
    size: int = 0                # bytes of data in the head segment


def _marker(text: str | None) -> _Head | None:
    """A segment's "<seq>:<hash>" head marker, or None when it has none."""
    seq, _, digest = (text or "").partition(":")
    return _Head(seq=int(seq), hash=digest) if seq.isdigit() else None


def _kept_head(kube: Kube, *, namespace: str, app: str) -> _Head | None:
    """The chain head kept on the app's parent ConfigMap, outside the segments.

    None when there is none: no record yet, a trail written before gitopsd
    kept it, or the parent deleted. ValueError naming the ConfigMap and its
    annotations when they are there but unreadable (gitopsd writes both
    together, so a half or malformed head was edited by hand).
    """
    name = inventory.parent_name(app)
    try:
        meta = kube.request("GET", kube.resource("v1", "ConfigMap").path(namespace, name), accept=_META_ACCEPT)
    except KubeApiError as exc:
        if exc.status == 404:
            return None
        raise
    annotations = (meta.get("metadata") or {}).get("annotations") or {}
    marker, held = annotations.get(HEAD_ANNOTATION), annotations.get(HEAD_SEGMENT_ANNOTATION)
    if marker is None and held is None:
        return None
    prefix = f"{SEGMENT_PREFIX}{app}-"
    number = held[len(prefix):] if isinstance(held, str) and held.startswith(prefix) else ""
    found = _MARKER.fullmatch(marker or "")
    if found is None or not number.isdigit():
        raise ValueError(f"the chain head kept on ConfigMap {namespace}/{name} is unreadable: annotations "
                         f"{HEAD_ANNOTATION}={marker!r}, {HEAD_SEGMENT_ANNOTATION}={held!r} (gitopsd writes "
                         f"<seq>:<sha256 hex> and the name of one of app {app}'s segments, {prefix}NNNNNN); "
                         f"it was edited by hand, and the next record rewrites it")
    return _Head(seq=int(found[1]), hash=found[2], segment=int(number))


def _further(stored: _Head, known: _Head | None) -> _Head:
    """The head to chain on: `stored` (writable, from the newest segment) unless `known` is further.

    `known` is a head seen elsewhere — on the app's parent, in a segment's
    marker, in this process's memory. Further means records left the store
    by hand: the chain goes on after them, in a new segment numbered past
    any that held them, so the gap stays in the chain for verify to name
    instead of a fresh chain at seq 1 that would verify as whole.
    """
    if known is None or known.seq <= stored.seq:
        return stored
    return _Head(seq=known.seq, hash=known.hash, segment=max(known.segment, stored.segment))


def _read_segment(kube: Kube, *, namespace: str, name: str) -> dict | None:
    return kube.get(kube.resource("v1", "ConfigMap"), name, namespace)


def _parse(raw: str) -> dict | None:
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _newest_first(kube: Kube, *, namespace: str, app: str) -> Iterator[dict]:
    """Records newest first, reading one segment at a time (so `--limit 5` reads one).

    Unreadable entries are skipped here; `verify` is the place that reports them.
    """
    for seg in reversed(_segments(kube, namespace=namespace, app=app)):
        cm = _read_segment(kube, namespace=namespace, name=seg.name)
        if cm is None:
            continue   # removed by retention while we read
        data = cm.get("data") or {}
        for key in sorted(data, reverse=True):
            rec = _parse(data[key])
            if rec is not None:
                yield rec


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An instant from ISO 8601 (`2026-11-20T14:00:00Z`; naive means UTC) or an age (`90m`, `2h`, `7d`,
    `1h30m`: a duration as the config reads it, with a unit; a bare `2026` is no age)."""
    from gitopsd.config import parse_duration

    text = text.strip()
    if not re.fullmatch(r"[\d.]*", text):
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=parse_duration(text))
        except ValueError:
            pass   # not an age; ISO 8601 below
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use ISO 8601 (2026-11-20T14:00:00Z) or an age (90m, 2h, 7d)") \
            from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _time_of(rec: dict) -> datetime | None:
    try:
        return parse_time(rec["time"])
    except (KeyError, TypeError, ValueError):
        return None


def history(kube: Kube, *, namespace: str, app: str, since: datetime | None = None,
            limit: int | None = None) -> list[dict]:
    """The app's records (transitions and drifts), newest first.

    Stops reading segments as soon as `limit` records are found or a record is
    older than `since`, so a short query on a long history stays cheap.
    """
    out: list[dict] = []
    for rec in _newest_first(kube, namespace=namespace, app=app):
        when = _time_of(rec)
        if since is not None and when is not None and when < since:
            break
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def last_revision(kube: Kube, *, namespace: str, app: str) -> str | None:
    """The newest recorded revision the cluster converged to (Applied, Unhealthy or NoChange).

    What a new transition calls `previous`: a Failed or Refused attempt never
    became live, so it does not count.
    """
    for rec in _newest_first(kube, namespace=namespace, app=app):
        if rec.get("type") == "transition" and rec.get("result") in CONVERGED and rec.get("revision"):
            return rec["revision"]
    return None


def _all_records(kube: Kube, *, namespace: str, app: str) -> list[dict]:
    recs = list(_newest_first(kube, namespace=namespace, app=app))
    return sorted(recs, key=lambda r: r.get("seq") if isinstance(r.get("seq"), int) else -1)


def _object_key(obj: dict) -> tuple:
    return (obj.get("group", ""), obj.get("kind", ""), obj.get("namespace", ""), obj.get("name", ""))


def live_at(kube: Kube, *, namespace: str, app: str, when: datetime) -> dict:
    """Which revision was live at `when`, who wrote it, and the drift open then.

    Live = the newest transition at or before `when` that wrote the app's
    objects: result Applied or Unhealthy (an Unhealthy rollout is still what
    runs). NoChange does not move it (nothing was written: a commit that only
    touched a README did not put anything in the cluster), nor do Failed,
    Refused or DryRun; a Failed attempt that wrote some objects before
    failing is listed under `partial`.

    Open drift = drift records after that transition and at or before `when`
    with action reported/failed, not since closed by a "corrected" record
    for the same object or by a transition that converged the app (Applied,
    Unhealthy or NoChange — a NoChange means nothing differed any more).
    """
    records = _all_records(kube, namespace=namespace, app=app)
    live: dict | None = None
    drift: dict[tuple, dict] = {}
    partial: list[dict] = []
    for rec in records:
        t = _time_of(rec)
        if t is None or t > when:
            break
        if rec.get("type") == "transition":
            if rec.get("result") in CLUSTER_CHANGING:
                live, partial = rec, []
            if rec.get("result") in CONVERGED:
                drift.clear()
            elif rec.get("written"):
                partial.append(rec)
        elif rec.get("type") == "drift":
            key = _object_key(rec.get("object") or {})
            if rec.get("action") == "corrected":
                drift.pop(key, None)
            else:
                drift[key] = rec
    first_seq = records[0].get("seq") if records else None
    answer = {"app": app, "at": _iso(when), "revision": None, "commit": None, "source": None, "ref": None,
              "transition": None, "open_drift": list(drift.values()), "partial": partial, "note": None}
    if live is not None:
        answer.update(revision=live.get("revision"), commit=live.get("commit"), source=live.get("source"),
                      ref=live.get("ref"),
                      transition={k: live.get(k) for k in ("seq", "time", "result", "reason", "trigger",
                                                           "previous", "instance", "hash")})
    elif not records:
        answer["note"] = f"no audit records for app {app} in namespace {namespace}"
    else:
        answer["note"] = f"no transition that wrote the cluster is recorded at or before {_iso(when)}"
        if isinstance(first_seq, int) and first_seq > 1:
            answer["note"] += f" (records before seq {first_seq} were removed by retention)"
    return answer


# ------------------------------------------------------------------ verify

def verify(kube: Kube, *, namespace: str, app: str) -> tuple[bool, str]:
    """Check the app's chain; (ok, message naming the first broken link).

    Detects an edited record (its hash no longer matches its content, or it
    was re-hashed and the next record's prev_hash no longer matches it), a
    missing one (a gap in seq, a missing start without a retention marker,
    fewer records than a segment's head marker says, or fewer than the head
    kept on the app's parent says: the newest segments, or all of them,
    deleted), one moved to another key or another app's series (out of
    order). A chain whose oldest records left by retention is OK and says
    where it starts. A "missing" message starts with the first missing seq
    and says how far the gap runs and which segment held it.
    """
    try:
        # Before the segments, so a daemon appending meanwhile can only put the store ahead of it.
        kept = _kept_head(kube, namespace=namespace, app=app)
    except ValueError as exc:
        return False, str(exc)
    segments = _segments(kube, namespace=namespace, app=app)
    if not segments:
        if kept is None:
            return True, f"no audit records for app {app} in namespace {namespace}"
        return False, (f"{_missing(1, kept.seq)}: no audit segment of app {app} is left, but the chain head kept on "
                       f"{_parent_ref(namespace, app)} is seq {kept.seq} in {segment_name(app, kept.segment)} "
                       f"(were the segments deleted?)")
    entries: list[tuple[int, str, _Segment]] = []   # (seq from key, raw, segment)
    for seg in segments:
        cm = _read_segment(kube, namespace=namespace, name=seg.name)
        if cm is None:
            return False, f"segment {seg.name} disappeared while verifying; run verify again"
        data = cm.get("data") or {}
        for key, raw in data.items():
            if not _KEY.fullmatch(key):
                return False, f"segment {seg.name} holds a foreign key {key!r}: records are stored by seq"
            entries.append((int(key), raw, seg))
    entries.sort(key=lambda e: e[0])
    if not entries:
        return False, f"every record is missing: the segments of app {app} are empty"
    problem = _start_problem(entries[0][0], segments[0], app=app)
    if problem is None:
        problem, hashes = _chain_problem(entries, app=app)
    if problem is None:
        problem = _head_problem(hashes, segments, kept, app=app, parent=_parent_ref(namespace, app))
    if problem is not None:
        return False, problem
    first, last = min(hashes), max(hashes)
    msg = f"OK: {len(entries)} records, seq {first}..{last}, chain intact (head {hashes[last][:12]})"
    if first > 1:
        msg += f"; chain starts at seq {first} (older records removed by retention)"
    if kept is None:
        msg += (f"; no chain head is kept on {_parent_ref(namespace, app)} yet (the next record writes it), so a "
                f"deleted newest segment would go unnoticed")
    return True, msg


def _missing(first: int, last: int) -> str:
    """ "seq 4 missing", or "seq 4 missing (through seq 9)" for a run of them."""
    return f"seq {first} missing" + (f" (through seq {last})" if last > first else "")


def _parent_ref(namespace: str, app: str) -> str:
    return f"ConfigMap {namespace}/{inventory.parent_name(app)}"


def _gone(app: str, first: int, last: int) -> str:
    """The segments numbered first..last, by name: what a gap in the numbering says was deleted."""
    if first == last:
        return f"segment {segment_name(app, first)}"
    return f"segments {segment_name(app, first)}..{last:06d}"


def _start_problem(first: int, oldest: _Segment, *, app: str) -> str | None:
    """Why the chain may not start at `first`: only seq 1 or the seq retention marked is a start."""
    if first < 1:
        return f"seq {first} out of order: the chain starts at seq 1"
    if first == 1 or oldest.annotations.get(RETAINED_FROM_ANNOTATION) == str(first):
        return None
    message = (f"seq {first - 1} missing: the chain starts at seq {first} and no retention marker says older records "
               f"were removed")
    if oldest.number > 1:
        older = " or an older one" if oldest.number > 2 else ""
        message += f" ({_gone(app, oldest.number - 1, oldest.number - 1)}{older} deleted by hand?)"
    return message


def _chain_problem(entries: list[tuple[int, str, _Segment]], *, app: str) -> tuple[str | None, dict[int, str]]:
    """Walk the records oldest first: the first broken link, and every seq's hash."""
    hashes: dict[int, str] = {}
    prev: dict | None = None
    prev_seg: _Segment | None = None
    for seq, raw, seg in entries:
        rec = _parse(raw)
        where = f"(segment {seg.name})"
        if rec is None:
            return f"seq {seq} edited: the record is not valid JSON {where}", hashes
        if prev is not None and seq == prev["seq"]:
            return f"seq {seq} out of order: stored twice {where}", hashes
        if rec.get("seq") != seq:
            return f"seq {seq} out of order: the record stored under it says seq {rec.get('seq')} {where}", hashes
        if rec.get("app") != app:
            return f"seq {seq} out of order: it belongs to app {rec.get('app')!r}, not {app!r} {where}", hashes
        if prev is not None and prev_seg is not None and seq != prev["seq"] + 1:
            gap = f"{_missing(prev['seq'] + 1, seq - 1)}: the chain jumps from seq {prev['seq']}"
            if seg.number > prev_seg.number + 1:   # numbers are never skipped: the ones between were deleted
                return (f"{gap} in {prev_seg.name} to seq {seq} in {seg.name} "
                        f"({_gone(app, prev_seg.number + 1, seg.number - 1)} deleted?)"), hashes
            return f"{gap} to {seq} {where}", hashes
        if record_hash(rec) != rec.get("hash"):
            return f"seq {seq} edited: its content no longer matches its hash {where}", hashes
        expected = prev["hash"] if prev is not None else (GENESIS_HASH if seq == 1 else rec.get("prev_hash"))
        if rec.get("prev_hash") != expected:
            return (f"seq {seq - 1} edited or replaced: seq {seq} carries prev_hash "
                    f"{str(rec.get('prev_hash'))[:12]}… but seq {seq - 1} hashes to {expected[:12]}…"), hashes
        hashes[seq] = rec["hash"]
        prev, prev_seg = rec, seg
    return None, hashes


def _head_problem(hashes: dict[int, str], segments: list[_Segment], kept: _Head | None, *, app: str,
                  parent: str) -> str | None:
    """Compare the end of the stored chain with the newest segment's marker and the head kept on the parent.

    The parent's head may lag a record or two behind the store (see the
    module docstring) but is never ahead of it: ahead means records left the
    store with their segment.
    """
    first, last = min(hashes), max(hashes)
    newest = segments[-1]
    marker = _marker(newest.annotations.get(HEAD_ANNOTATION))
    if marker is not None and marker.seq > last:
        return (f"{_missing(last + 1, marker.seq)}: the newest segment's head marker says the chain ends at seq "
                f"{marker.seq}, the store ends at seq {last}")
    if marker is not None and marker.seq == last and marker.hash != hashes[last]:
        return f"seq {last} edited or replaced: it does not match the segment's head marker"
    if kept is None:
        return None
    if kept.seq > last:
        held = segment_name(app, kept.segment)
        why = (f"the newest {_gone(app, newest.number + 1, kept.segment)} deleted?" if kept.segment > newest.number
               else f"records deleted from {held}?")
        return (f"{_missing(last + 1, kept.seq)}: the segments end at seq {last}, but the chain head kept on "
                f"{parent} is seq {kept.seq} in {held} ({why})")
    if kept.seq >= first and kept.hash != hashes[kept.seq]:
        return f"seq {kept.seq} edited or replaced: it does not match the chain head kept on {parent}"
    return None


# ------------------------------------------------------------------ the store: writing

class AuditLog:
    """Writes records: stdout line, Events, and the durable chained store.

    One instance per process; thread-safe. Appends of one app are serialised
    by a per-app lock here and by resourceVersion preconditions across
    processes; different apps never wait for each other. A new instance (a
    restart, a new leader) continues each chain from the stored head.

    `kube=None` keeps the chain in memory only and emits no Events (unit
    tests, a dry run). When the store cannot be written (apiserver down),
    the record is still logged, kept in a bounded in-memory backlog and
    stored, in order, before the app's next record; `store_error` says why.
    """

    def __init__(self, kube: Kube | None, *, namespace: str, retention: int = DEFAULT_RETENTION,
                 events: bool = True, logger=None, instance: str | None = None,
                 segment_records: int = SEGMENT_MAX_RECORDS, segment_bytes: int = SEGMENT_MAX_BYTES) -> None:
        self.kube = kube
        self.namespace = namespace
        self.retention = retention          # records kept per app (at least); <= 0 keeps all
        self.events = events and kube is not None
        self.instance = instance or default_instance()
        self.segment_records = segment_records
        self.segment_bytes = min(segment_bytes, SEGMENT_MAX_BYTES)
        self.store_error: str | None = None
        self._log = logger or structlog.get_logger("gitopsd.audit")
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._heads: dict[str, _Head] = {}
        self._backlog: dict[str, list[dict]] = {}
        self._parent_uids: dict[str, str] = {}
        self._namespace_ready = False

    # -------------------------------------------------------------- public

    def record(self, rec: dict) -> dict:
        """Chain, store, log and announce one record; returns it as stored.

        Adds `time`, `instance` (if missing), `seq`, `prev_hash`, `hash`. A
        record the store could not take comes back without `seq`/`hash` and
        is retried before the app's next record.
        """
        app = rec.get("app")
        if not app:
            raise ValueError("an audit record needs its app")
        # A JSON round trip: a deep copy (the caller's dict is never changed) in
        # exactly the types that will be stored and hashed; then scrubbed of
        # secret values before anything hashes, stores or prints it.
        rec = _fit(redact.scrub_data(orjson.loads(canonical(rec))))
        rec["time"] = _iso(datetime.now(timezone.utc))
        rec.setdefault("instance", self.instance)
        with self._lock_for(app):
            stored = self._store_in_order(app, rec)
            if stored is None:
                self._log.warning("audit", **log_fields(rec), stored=False)
                return rec
            self._log.info("audit", **log_fields(stored))
        if self.events:
            self._announce(stored)
        return stored

    def head(self, app: str) -> tuple[int, str]:
        """(seq, hash) of the app's newest record; (0, genesis) when there is none."""
        with self._lock_for(app):
            h = self._head(app)
            return h.seq, h.hash

    # -------------------------------------------------------------- chaining

    def _lock_for(self, app: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(app, threading.Lock())

    def _store_in_order(self, app: str, rec: dict) -> dict | None:
        """Store the backlog, then `rec`; None when the store refused (rec joins the backlog)."""
        backlog = self._backlog.setdefault(app, [])
        backlog.append(rec)
        while backlog:
            try:
                stored = self._append(app, backlog[0])
            except GitopsdError as exc:
                self.store_error = str(exc)
                self._log.error("audit_store_failed", app=app, error=str(exc), backlog=len(backlog))
                if len(backlog) > MAX_BACKLOG:
                    dropped = backlog.pop(0)
                    self._log.error("audit_record_dropped", app=app, time=dropped.get("time"))
                return None
            done = backlog.pop(0)
            if done is not rec:
                # Logged already when it was refused; now say where it landed.
                self._log.info("audit_stored", app=app, seq=stored["seq"], hash=stored["hash"],
                               recorded=stored["time"])
            else:
                self.store_error = None
                return stored
        return None  # unreachable: rec is always last

    def _head(self, app: str) -> _Head:
        head = self._heads.get(app)
        if head is None:
            head = self._heads[app] = self._load_head(app) if self.kube is not None else _Head()
        return head

    def _append(self, app: str, rec: dict) -> dict:
        """Chain `rec` on the head and write it; re-chain on another writer's conflict."""
        for attempt in range(APPEND_ATTEMPTS):
            head = self._head(app)
            stamped = {**rec, "seq": head.seq + 1, "prev_hash": head.hash}
            stamped["hash"] = record_hash(stamped)
            if self.kube is None:
                self._heads[app] = _Head(seq=stamped["seq"], hash=stamped["hash"])
                return stamped
            try:
                self._write(app, head, stamped)
                return stamped
            except KubeApiError as exc:
                sealed = exc.status == 422 and "immutable" in exc.api_message.lower()
                if exc.status in (404, 409) or sealed:
                    # Another writer moved the head (409) or sealed its segment (422), or retention
                    # removed it under us (404) — or someone deleted it (404): re-read and re-chain on
                    # top, never below what this process already wrote. The jittered back-off lets a
                    # busy writer finish instead of winning every race.
                    time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
                    self._heads[app] = _further(self._load_head(app), head)
                    continue
                raise
        raise ClusterError(f"could not append to the audit trail of app {app}: another writer kept moving its "
                           f"head ({APPEND_ATTEMPTS} attempts)", hint="are two gitopsd leaders running at once?")

    def _write(self, app: str, head: _Head, stamped: dict) -> None:
        kube = self.kube
        cms = kube.resource("v1", "ConfigMap")
        key, value = _key(stamped["seq"]), canonical(stamped).decode()
        size = len(key) + len(value.encode())
        marker = f"{stamped['seq']}:{stamped['hash']}"
        if head.resource_version and head.count < self.segment_records and head.size + size <= self.segment_bytes:
            # The resourceVersion makes this an optimistic-concurrency write: 409 if anyone else wrote first.
            body = {"metadata": {"resourceVersion": head.resource_version, "annotations": {HEAD_ANNOTATION: marker}},
                    "data": {key: value}}
            meta = kube.request("PATCH", cms.path(self.namespace, segment_name(app, head.segment)), body=body,
                                content_type="application/merge-patch+json", accept=_META_ACCEPT)
            self._heads[app] = _Head(seq=stamped["seq"], hash=stamped["hash"], segment=head.segment,
                                     resource_version=meta["metadata"]["resourceVersion"], count=head.count + 1,
                                     size=head.size + size)
            self._keep_head(app, marker, head.segment)
            return
        number = head.segment + 1
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": segment_name(app, number), "namespace": self.namespace,
                             "labels": {AUDIT_APP_LABEL: app, "app.kubernetes.io/part-of": "gitopsd",
                                        "app.kubernetes.io/component": "audit"},
                             "annotations": {HEAD_ANNOTATION: marker,
                                             FIRST_SEQ_ANNOTATION: str(stamped["seq"])}},
                "data": {key: value}}
        self._ensure_namespace()
        # POST, not apply: a 409 AlreadyExists means another writer opened this segment first.
        meta = kube.request("POST", cms.path(self.namespace), body=body, accept=_META_ACCEPT)
        self._heads[app] = _Head(seq=stamped["seq"], hash=stamped["hash"], segment=number,
                                 resource_version=meta["metadata"]["resourceVersion"], count=1, size=size)
        self._keep_head(app, marker, number)
        if head.resource_version:   # (not when the head segment was lost: nothing to seal)
            self._seal(app, head.segment)
        self._retain(app)

    def _keep_head(self, app: str, marker: str, number: int) -> None:
        """Copy the new head onto the app's parent, where a deleted segment cannot take it along.

        After the segment write, so it is never ahead of the store. A failure
        costs only the copy (the record is stored; the next one writes it
        again), so it is logged, not raised.
        """
        inv = inventory.Inventory(app=app, namespace=self.namespace)
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": inv.name, "namespace": self.namespace, "labels": inv.labels,
                             "annotations": {HEAD_ANNOTATION: marker,
                                             HEAD_SEGMENT_ANNOTATION: segment_name(app, number)}}}
        try:
            parent = self.kube.apply(body, field_manager=HEAD_FIELD_MANAGER)
        except GitopsdError as exc:
            self._log.warning("audit_head_not_kept", app=app, head=marker, parent=inv.name, error=str(exc))
            return
        uid = (parent.get("metadata") or {}).get("uid")
        if uid:
            self._parent_uids[app] = uid   # the Event on the parent needs it next

    def _load_head(self, app: str) -> _Head:
        """Where a restarted daemon, a new leader or a CLI run continues.

        The further of the newest segment's head and the head kept on the
        app's parent: when the parent is ahead, the newest records left the
        store with their segment, and the chain goes on after them.
        """
        # The parent first: another writer may append between the two reads, and a parent read after
        # the segments could then be ahead of them with nothing deleted (and this writer would fork the
        # chain into a new segment). Read first, it can only be behind.
        try:
            kept = _kept_head(self.kube, namespace=self.namespace, app=app)
        except ValueError as exc:
            self._log.warning("audit_head_unreadable", app=app, error=str(exc))
            kept = None
        stored = self._stored_head(app)
        head = _further(stored, kept)
        if head is not stored:
            self._log.warning("audit_records_missing", app=app, stored_to=stored.seq, head=head.seq,
                              segment=segment_name(app, head.segment),
                              hint=f"run `gitopsd audit verify {app} --namespace {self.namespace}`")
        return head

    def _stored_head(self, app: str) -> _Head:
        """The head as the newest segment holds it (its newest record, or its marker when that is further)."""
        for _ in range(3):
            segments = _segments(self.kube, namespace=self.namespace, app=app)
            if not segments:
                return _Head()
            seg = segments[-1]
            cm = _read_segment(self.kube, namespace=self.namespace, name=seg.name)
            if cm is None:
                continue   # retention removed it between the LIST and the GET
            data = cm.get("data") or {}
            keys = [k for k in data if _KEY.fullmatch(k)]
            newest = _parse(data[max(keys)]) if keys else None
            marker = _marker((cm["metadata"].get("annotations") or {}).get(HEAD_ANNOTATION))
            if marker is None and (newest is None or not isinstance(newest.get("seq"), int) or not newest.get("hash")):
                raise ClusterError(f"the audit trail of app {app} has no readable head in ConfigMap "
                                   f"{self.namespace}/{seg.name}",
                                   hint=f"run `gitopsd audit verify {app} --namespace {self.namespace}`")
            size = sum(len(k) + len(v.encode()) for k, v in data.items())
            stored = _Head(segment=seg.number, resource_version=cm["metadata"]["resourceVersion"], count=len(data),
                           size=size)
            if newest is not None and isinstance(newest.get("seq"), int) and newest.get("hash"):
                stored.seq, stored.hash = newest["seq"], newest["hash"]
            if marker is not None:
                marker.segment = seg.number
            # Records deleted from the segment by hand: its marker is further than what it holds.
            return _further(stored, marker)
        raise ClusterError(f"the audit trail of app {app} kept changing while its head was read")

    def _ensure_namespace(self) -> None:
        if not self._namespace_ready:
            inventory.ensure_namespace(self.kube, self.namespace)
            self._namespace_ready = True

    def _seal(self, app: str, number: int) -> None:
        """Make a full segment immutable: the apiserver then refuses any edit of its records."""
        cms = self.kube.resource("v1", "ConfigMap")
        try:
            self.kube.request("PATCH", cms.path(self.namespace, segment_name(app, number)), body={"immutable": True},
                              content_type="application/merge-patch+json", accept=_META_ACCEPT)
        except GitopsdError as exc:
            self._log.warning("audit_seal_failed", app=app, segment=segment_name(app, number), error=str(exc))

    def _retain(self, app: str) -> None:
        """Delete whole oldest segments while the rest still hold >= retention records.

        The oldest survivor is marked first, so `verify` can tell retention
        from deletion even if we crash between the two steps.
        """
        if self.retention <= 0:
            return
        head = self._heads[app]
        try:
            segments = _segments(self.kube, namespace=self.namespace, app=app)
            doomed: list[_Segment] = []
            while len(segments) - len(doomed) > 1:
                survivor = segments[len(doomed) + 1]
                first = survivor.annotations.get(FIRST_SEQ_ANNOTATION, "")
                if not first.isdigit() or head.seq - int(first) + 1 < self.retention:
                    break
                doomed.append(segments[len(doomed)])
            if not doomed:
                return
            survivor = segments[len(doomed)]
            cms = self.kube.resource("v1", "ConfigMap")
            meta = self.kube.request(
                "PATCH", cms.path(self.namespace, survivor.name), content_type="application/merge-patch+json",
                body={"metadata": {"annotations": {
                    RETAINED_FROM_ANNOTATION: survivor.annotations[FIRST_SEQ_ANNOTATION]}}},
                accept=_META_ACCEPT)
            if survivor.number == head.segment:
                head.resource_version = meta["metadata"]["resourceVersion"]
            for seg in doomed:
                self.kube.delete(cms, seg.name, self.namespace)
            self._log.info("audit_retention", app=app, removed=[s.name for s in doomed],
                           chain_starts_at=int(survivor.annotations[FIRST_SEQ_ANNOTATION]))
        except GitopsdError as exc:
            self._log.warning("audit_retention_failed", app=app, error=str(exc))

    # -------------------------------------------------------------- events

    def _announce(self, rec: dict) -> None:
        """One Event on the app's parent, and at most MAX_OBJECT_EVENTS on the objects named."""
        app = rec["app"]
        parent = inventory.parent_name(app)
        targets: list[tuple[dict, str]] = [(
            {"apiVersion": "v1", "kind": "ConfigMap", "namespace": self.namespace, "name": parent,
             **({"uid": uid} if (uid := self._parent_uid(app)) else {})},
            event_note(rec))]
        if rec.get("type") == "drift":
            objects = [rec["object"]]
        else:
            objects = [o for o in rec.get("plan", {}).get("objects", []) if o.get("done")]
        for obj in objects[:MAX_OBJECT_EVENTS]:
            res = self.kube.resource_for_group_kind(obj.get("group", ""), obj.get("kind", ""))
            if res is None:
                continue
            regarding = {"apiVersion": res.api_version, "kind": obj["kind"], "name": obj["name"]}
            if obj.get("namespace"):
                regarding["namespace"] = obj["namespace"]
            if obj.get("uid"):
                regarding["uid"] = obj["uid"]
            targets.append((regarding, object_note(rec, obj)))
        for regarding, note in targets:
            self._event(rec, regarding=regarding, note=note)

    def _parent_uid(self, app: str) -> str | None:
        uid = self._parent_uids.get(app)
        if uid is None:
            try:
                parent = self.kube.get(self.kube.resource("v1", "ConfigMap"), inventory.parent_name(app),
                                       self.namespace)
            except GitopsdError:
                parent = None
            uid = ((parent or {}).get("metadata") or {}).get("uid")
            if uid:
                self._parent_uids[app] = uid
        return uid

    def _event(self, rec: dict, *, regarding: dict, note: str) -> None:
        if rec.get("type") == "drift":
            reason = {"corrected": "DriftCorrected", "reported": "DriftReported",
                      "failed": "DriftCorrectionFailed"}[rec["action"]]
            warning, action = rec["action"] != "corrected", "SelfHeal"
        else:
            reason = rec.get("result") or "Unknown"
            warning, action = reason in WARNING_RESULTS, "Sync"
        # Events live beside what they are about; cluster-scoped objects' in "default", as client-go does.
        namespace = regarding.get("namespace") or "default"
        body = {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": f"{regarding['name'][:200]}.{time.time_ns():x}", "namespace": namespace,
                         "labels": {AUDIT_APP_LABEL: rec["app"]},
                         "annotations": {"gitopsd.io/audit-seq": str(rec.get("seq", "")),
                                         "gitopsd.io/audit-hash": rec.get("hash", "")}},
            "eventTime": rec["time"], "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": str(rec.get("instance", ""))[:128] or "gitopsd",
            "action": action, "reason": reason, "type": "Warning" if warning else "Normal",
            "regarding": regarding, "note": redact.scrub(note)[:EVENT_NOTE_MAX],
        }
        try:
            events = self.kube.resource("events.k8s.io/v1", "Event")
            self.kube.request("POST", events.path(namespace), body=body)
        except GitopsdError as exc:
            self._log.warning("audit_event_failed", app=rec["app"], regarding=regarding.get("name"), error=str(exc))


# ------------------------------------------------------------------ rendering

# The order fields appear in on a log line: what happened first, the chain last.
_LOG_ORDER = ("app", "type", "seq", "trigger", "result", "action", "reason", "previous", "revision", "object",
              "fields", "managers", "deleted", "error", "commit", "written", "plan", "health", "errors", "source",
              "ref", "signature", "started", "duration_seconds", "instance", "time", "prev_hash", "hash")


def log_fields(rec: dict) -> dict:
    """The record's fields in reading order (same names and values; only the order differs)."""
    ordered = {k: rec[k] for k in _LOG_ORDER if k in rec}
    ordered.update((k, v) for k, v in rec.items() if k not in ordered)
    return ordered


def _short(sha: str | None) -> str:
    return sha[:8] if sha else "none"


def _subject(rec: dict) -> str:
    commit = rec.get("commit") or {}
    return (commit.get("message") or "").splitlines()[0] if commit.get("message") else ""


def _counts(rec: dict) -> str:
    plan = rec.get("plan") or {}
    counts: dict[str, int] = {}
    for obj in plan.get("objects", []):
        counts[obj["action"]] = counts.get(obj["action"], 0) + 1
    parts = [f"{n} {action}" for action, n in sorted(counts.items())]
    parts.append(f"{plan.get('unchanged', 0)} unchanged")
    return ", ".join(parts)


def _object_str(obj: dict) -> str:
    return str(ObjectRef(group=obj.get("group", ""), kind=obj.get("kind", ""), namespace=obj.get("namespace", ""),
                         name=obj.get("name", "")))


def summary_line(rec: dict) -> str:
    """One line per record for `gitopsd history`: time, seq, what happened, who, counts."""
    when = (rec.get("time") or "")[:19] + "Z"
    seq = f"#{rec.get('seq', '?')}"
    if rec.get("type") == "drift":
        obj = rec.get("object") or {}
        what = "deleted" if rec.get("deleted") else ", ".join(rec.get("fields") or []) or "-"
        by = ", ".join(rec.get("managers") or []) or "unknown manager"
        line = f"{when}  {seq:>6}  drift {rec.get('action', '?'):<9}  {_object_str(obj)}: {what} (by {by})"
        return line + (f"  error: {rec['error']}" if rec.get("error") else "")
    commit = rec.get("commit") or {}
    author = (commit.get("author") or "").split(" <")[0] or "-"
    line = (f"{when}  {seq:>6}  {rec.get('result', '?'):<9}  {_short(rec.get('previous'))}->"
            f"{_short(rec.get('revision'))}  {author}  \"{_subject(rec)}\"  {_counts(rec)}  "
            f"[{rec.get('trigger', '?')}]")
    if rec.get("result") not in ("Applied", "NoChange") and rec.get("reason"):
        line += f"  {rec['reason'][:120]}"
    return line


def event_note(rec: dict) -> str:
    """The parent Event's note: the record in one sentence (no values, only paths)."""
    if rec.get("type") == "drift":
        return object_note(rec, rec.get("object") or {})
    commit = rec.get("commit") or {}
    return (f"{rec.get('result')}: {rec.get('reason', '')} | revision {_short(rec.get('revision'))} (was "
            f"{_short(rec.get('previous'))}) by {commit.get('author', '-')}: {_subject(rec)} | {_counts(rec)} | "
            f"trigger {rec.get('trigger')}, audit seq {rec.get('seq', '-')}")[:EVENT_NOTE_MAX]


def object_note(rec: dict, obj: dict) -> str:
    if rec.get("type") == "drift":
        what = "deleted by hand" if rec.get("deleted") else "changed " + ", ".join(rec.get("fields") or [])
        by = ", ".join(rec.get("managers") or []) or "unknown manager"
        text = f"drift {rec.get('action')}: {what} (by {by}); revision {_short(rec.get('revision'))}"
        return (text + (f"; error: {rec['error']}" if rec.get("error") else ""))[:EVENT_NOTE_MAX]
    fields = obj.get("fields") or []
    text = f"{obj.get('action')} by gitopsd at revision {_short(rec.get('revision'))}"
    if fields and obj.get("action") != "created":
        text += ": " + ", ".join(fields)
    return text[:EVENT_NOTE_MAX]


def live_at_text(answer: dict) -> str:
    """`gitopsd history APP --at T` for people."""
    lines = [f"app {answer['app']} at {answer['at']}:"]
    if answer.get("revision") is None and answer.get("transition") is None:
        lines.append(f"  {answer.get('note') or 'no live revision recorded'}")
    else:
        commit = answer.get("commit") or {}
        t = answer["transition"]
        lines.append(f"  revision {answer['revision']} ({answer.get('ref')}) from {answer.get('source')}")
        lines.append(f"  author    {commit.get('author', '-')}")
        lines.append(f"  committer {commit.get('committer', '-')} at {commit.get('time', '-')}")
        message = (commit.get("message") or "").splitlines() or [""]
        lines.append(f"  message   {message[0]}")
        lines.extend(f"            {m}" for m in message[1:])
        lines.append(f"  put there by audit seq {t['seq']} ({t['result']}, trigger {t['trigger']}) at {t['time']} "
                     f"by {t['instance']}")
    for rec in answer.get("partial") or []:
        lines.append(f"  partly written afterwards: seq {rec.get('seq')} {rec.get('result')} revision "
                     f"{_short(rec.get('revision'))} ({rec.get('written')} objects): {rec.get('reason', '')[:100]}")
    drift = answer.get("open_drift") or []
    if not drift:
        lines.append("  open drift: none")
    for rec in drift:
        what = "deleted" if rec.get("deleted") else ", ".join(rec.get("fields") or [])
        lines.append(f"  open drift: {_object_str(rec.get('object') or {})}: {what} by "
                     f"{', '.join(rec.get('managers') or []) or 'unknown'} ({rec.get('action')} at {rec.get('time')}, "
                     f"seq {rec.get('seq')})")
    return "\n".join(lines)
