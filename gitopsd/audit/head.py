"""The chain head: where the next record goes, and the copy of it kept outside the segments.

The chain head is kept outside the segments, because a segment cannot
testify to its own deletion: after each append the same ``<seq>:<hash>`` as
the segment's marker and the name of the segment holding it go onto the
app's ApplySet parent (``gitopsd-<app>``, annotations
``gitopsd.io/audit-head`` and ``gitopsd.io/audit-head-segment``, field
manager ``gitopsd-audit``; the parent is created if the app never applied),
and the writing process keeps it in memory. So when the newest segment — or
every segment — is deleted by hand:

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
"""

from __future__ import annotations

import re

from gitopsd.audit.segments import (
    HEAD_ANNOTATION,
    META_ACCEPT,
    RECORD_KEY,
    SEGMENT_PREFIX,
    Head,
    Segment,
    list_segments,
    parse_record,
    read_segment,
    segment_name,
)
from gitopsd.engine import inventory
from gitopsd.errors import ClusterError, GitopsdError
from gitopsd.kube import Kube, KubeApiError

HEAD_SEGMENT_ANNOTATION = "gitopsd.io/audit-head-segment"     # on the app's parent: the segment holding the head
HEAD_FIELD_MANAGER = "gitopsd-audit"                          # owns the parent's two head annotations

_MARKER = re.compile(r"([1-9]\d*):([0-9a-f]{64})")


def parse_marker(text: str | None) -> Head | None:
    """A segment's "<seq>:<hash>" head marker, or None when it has none."""
    seq, _, digest = (text or "").partition(":")
    return Head(seq=int(seq), hash=digest) if seq.isdigit() else None


def kept_head(kube: Kube, *, namespace: str, app: str) -> Head | None:
    """The chain head kept on the app's parent ConfigMap, outside the segments (read now).

    None when there is none: no record yet, a trail written before gitopsd
    kept it, or the parent deleted. ValueError naming the ConfigMap and its
    annotations when they are there but unreadable (gitopsd writes both
    together, so a half or malformed head was edited by hand).
    """
    name = inventory.parent_name(app)
    try:
        meta = kube.request("GET", kube.resource("v1", "ConfigMap").path(namespace, name), accept=META_ACCEPT)
    except KubeApiError as exc:
        if exc.status == 404:
            return None
        raise
    return head_on_parent(meta, namespace=namespace, app=app)


def head_on_parent(parent: dict | None, *, namespace: str, app: str) -> Head | None:
    """The chain head a read of the app's parent holds (None: no parent, or no head on it); see kept_head."""
    name = inventory.parent_name(app)
    annotations = ((parent or {}).get("metadata") or {}).get("annotations") or {}
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
    return Head(seq=int(found[1]), hash=found[2], segment=int(number))


def further(stored: Head, known: Head | None) -> Head:
    """The head to chain on: `stored` (writable, from the newest segment) unless `known` is further.

    `known` is a head seen elsewhere — on the app's parent, in a segment's
    marker, in this process's memory. Further means records left the store
    by hand: the chain goes on after them, in a new segment numbered past
    any that held them, so the gap stays in the chain for verify to name
    instead of a fresh chain at seq 1 that would verify as whole.
    """
    if known is None or known.seq <= stored.seq:
        return stored
    return Head(seq=known.seq, hash=known.hash, segment=max(known.segment, stored.segment))



_UNREAD = object()


def load_head(kube: Kube, *, namespace: str, app: str, log, parent=_UNREAD,
              segments: list[Segment] | None = None) -> Head:
    """Where a restarted daemon, a new leader or a CLI run continues.

    The further of the newest segment's head and the head kept on the
    app's parent: when the parent is ahead, the newest records left the
    store with their segment, and the chain goes on after them.

    `parent` (the parent as just read, None when absent) and `segments`
    (list_segments, read after it) save reading them again: the daemon
    reads both once per app when it takes the app over (AuditLog.prime).
    """
    # The parent first: another writer may append between the two reads, and a parent read after
    # the segments could then be ahead of them with nothing deleted (and this writer would fork the
    # chain into a new segment). Read first, it can only be behind.
    try:
        kept = (kept_head(kube, namespace=namespace, app=app) if parent is _UNREAD
                else head_on_parent(parent, namespace=namespace, app=app))
    except ValueError as exc:
        log.warning("audit_head_unreadable", app=app, error=str(exc))
        kept = None
    stored = stored_head(kube, namespace=namespace, app=app, segments=segments)
    head = further(stored, kept)
    if head is not stored:
        log.warning("audit_records_missing", app=app, stored_to=stored.seq, head=head.seq,
                    segment=segment_name(app, head.segment),
                    hint=f"run `gitopsd audit verify {app} --namespace {namespace}`")
    return head


def stored_head(kube: Kube, *, namespace: str, app: str, segments: list[Segment] | None = None) -> Head:
    """The head as the newest segment holds it (its newest record, or its marker when that is further).

    `segments`: the app's segments as just listed (the first attempt uses them instead of a LIST)."""
    for _ in range(3):
        if segments is None:
            segments = list_segments(kube, namespace=namespace, app=app)
        if not segments:
            return Head()
        seg = segments[-1]
        segments = None   # a retry lists again
        cm = read_segment(kube, namespace=namespace, name=seg.name)
        if cm is None:
            continue   # retention removed it between the LIST and the GET
        data = cm.get("data") or {}
        keys = [k for k in data if RECORD_KEY.fullmatch(k)]
        newest = parse_record(data[max(keys)]) if keys else None
        marker = parse_marker((cm["metadata"].get("annotations") or {}).get(HEAD_ANNOTATION))
        if marker is None and (newest is None or not isinstance(newest.get("seq"), int) or not newest.get("hash")):
            raise ClusterError(f"the audit trail of app {app} has no readable head in ConfigMap "
                               f"{namespace}/{seg.name}",
                               hint=f"run `gitopsd audit verify {app} --namespace {namespace}`")
        size = sum(len(k) + len(v.encode()) for k, v in data.items())
        stored = Head(segment=seg.number, resource_version=cm["metadata"]["resourceVersion"], count=len(data),
                      size=size)
        if newest is not None and isinstance(newest.get("seq"), int) and newest.get("hash"):
            stored.seq, stored.hash = newest["seq"], newest["hash"]
        if marker is not None:
            marker.segment = seg.number
        # Records deleted from the segment by hand: its marker is further than what it holds.
        return further(stored, marker)
    raise ClusterError(f"the audit trail of app {app} kept changing while its head was read")


def keep_head(kube: Kube, *, namespace: str, app: str, marker: str, segment: int, log) -> str | None:
    """Copy the new head onto the app's parent, where a deleted segment cannot take it along; the parent's uid.

    After the segment write, so it is never ahead of the store. A failure
    costs only the copy (the record is stored; the next one writes it
    again), so it is logged, not raised, and the uid is None.
    """
    inv = inventory.Inventory(app=app, namespace=namespace)
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": inv.name, "namespace": namespace, "labels": inv.labels,
                         "annotations": {HEAD_ANNOTATION: marker,
                                         HEAD_SEGMENT_ANNOTATION: segment_name(app, segment)}}}
    try:
        parent = kube.apply(body, field_manager=HEAD_FIELD_MANAGER)
    except GitopsdError as exc:
        log.warning("audit_head_not_kept", app=app, head=marker, parent=inv.name, error=str(exc))
        return None
    return (parent.get("metadata") or {}).get("uid")
