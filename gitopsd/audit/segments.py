"""The durable audit store: a per-app series of ConfigMaps in gitopsd's own namespace.

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

Each segment carries ``gitopsd.io/audit-head`` (``<seq>:<hash>`` of its
newest record), written in the same request as the record, so deleting the
newest records of a segment is detected too; and ``gitopsd.io/audit-first-seq``.

Retention (AuditLog(retention=N), default 5000 per app): when a new segment
opens, whole oldest segments are deleted while the rest still hold at least
N records; the oldest survivor is first marked with
``gitopsd.io/audit-retained-from``, so ``verify`` tells retention from
deletion. At the measured 1.35 KB per record (gitopsd.audit.records), 1,000
records are about 1.3 MiB = 10 segments of ~135 KiB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from gitopsd.audit.records import GENESIS_HASH, canonical
from gitopsd.engine import inventory
from gitopsd.errors import GitopsdError
from gitopsd.kube import METADATA_LIST_ACCEPT, Kube

AUDIT_APP_LABEL = "gitopsd.io/audit-app"
HEAD_ANNOTATION = "gitopsd.io/audit-head"                     # "<seq>:<hash>" of the segment's newest record
FIRST_SEQ_ANNOTATION = "gitopsd.io/audit-first-seq"           # seq of the segment's first record
RETAINED_FROM_ANNOTATION = "gitopsd.io/audit-retained-from"   # set by retention on the oldest survivor
SEGMENT_PREFIX = "gitopsd-audit-"
SEGMENT_MAX_RECORDS = 100
# etcd refuses requests over 1.5 MiB and the apiserver ConfigMaps over 1 MiB;
# a third of that leaves room for metadata and for a record or two of slack.
SEGMENT_MAX_BYTES = 500 * 1024
DEFAULT_RETENTION = 5000

META_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
RECORD_KEY = re.compile(r"\d{12}")


# ------------------------------------------------------------------ reading

def segment_name(app: str, number: int) -> str:
    return f"{SEGMENT_PREFIX}{app}-{number:06d}"


def record_key(seq: int) -> str:
    return f"{seq:012d}"


@dataclass(frozen=True)
class Segment:
    number: int
    name: str
    annotations: dict


def list_segments(kube: Kube, *, namespace: str, app: str) -> list[Segment]:
    """The app's segments, oldest first, from a metadata-only LIST (no record data moves)."""
    cms = kube.resource("v1", "ConfigMap")
    query = {"labelSelector": f"{AUDIT_APP_LABEL}={app}", "limit": "500"}
    prefix = f"{SEGMENT_PREFIX}{app}-"
    out: list[Segment] = []
    while True:
        doc = kube.request("GET", cms.path(namespace), query=query, accept=METADATA_LIST_ACCEPT)
        for item in doc.get("items") or []:
            meta = item.get("metadata") or {}
            name = meta.get("name", "")
            suffix = name[len(prefix):]
            if name.startswith(prefix) and suffix.isdigit():
                out.append(Segment(number=int(suffix), name=name, annotations=meta.get("annotations") or {}))
        cont = (doc.get("metadata") or {}).get("continue")
        if not cont:
            return sorted(out, key=lambda s: s.number)
        query["continue"] = cont


def read_segment(kube: Kube, *, namespace: str, name: str) -> dict | None:
    return kube.get(kube.resource("v1", "ConfigMap"), name, namespace)


def parse_record(raw: str) -> dict | None:
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


# ------------------------------------------------------------------ writing

@dataclass
class Head:
    """A chain head: where the next record goes, as a segment, the app's parent or this process saw it."""

    seq: int = 0                 # 0: no record yet
    hash: str = GENESIS_HASH
    segment: int = 0             # 0: no segment yet
    resource_version: str = ""   # of the head segment; "": it is not in the store, the next record opens a new one
    count: int = 0               # records in the head segment
    size: int = 0                # bytes of data in the head segment


class SegmentStore:
    """Segment IO of one process: append a record, open, seal and retain segments.

    Chaining and retries are the caller's (AuditLog): a KubeApiError from
    `append` (409 another writer, 404 segment gone, 422 sealed) goes back to
    it unchanged.
    """

    def __init__(self, kube: Kube, *, namespace: str, retention: int, segment_records: int, segment_bytes: int,
                 logger) -> None:
        self.kube = kube
        self.namespace = namespace
        self.retention = retention          # records kept per app (at least); <= 0 keeps all
        self.segment_records = segment_records
        self.segment_bytes = segment_bytes
        self._log = logger

    def append(self, app: str, head: Head, stamped: dict) -> Head:
        """Write the chained record after `head`: into the head segment, or a new one when that is full or lost.

        Returns the new head. Opening a new segment neither seals the old
        one nor applies retention: the caller does both once the head is
        kept (see AuditLog._write), in that order.
        """
        kube = self.kube
        cms = kube.resource("v1", "ConfigMap")
        key, value = record_key(stamped["seq"]), canonical(stamped).decode()
        size = len(key) + len(value.encode())
        marker = f"{stamped['seq']}:{stamped['hash']}"
        if head.resource_version and head.count < self.segment_records and head.size + size <= self.segment_bytes:
            # The resourceVersion makes this an optimistic-concurrency write: 409 if anyone else wrote first.
            body = {"metadata": {"resourceVersion": head.resource_version, "annotations": {HEAD_ANNOTATION: marker}},
                    "data": {key: value}}
            meta = kube.request("PATCH", cms.path(self.namespace, segment_name(app, head.segment)), body=body,
                                content_type="application/merge-patch+json", accept=META_ACCEPT)
            return Head(seq=stamped["seq"], hash=stamped["hash"], segment=head.segment,
                        resource_version=meta["metadata"]["resourceVersion"], count=head.count + 1,
                        size=head.size + size)
        number = head.segment + 1
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": segment_name(app, number), "namespace": self.namespace,
                             "labels": {AUDIT_APP_LABEL: app, "app.kubernetes.io/part-of": "gitopsd",
                                        "app.kubernetes.io/component": "audit"},
                             "annotations": {HEAD_ANNOTATION: marker,
                                             FIRST_SEQ_ANNOTATION: str(stamped["seq"])}},
                "data": {key: value}}
        # POST, not apply: a 409 AlreadyExists means another writer opened this segment first.
        meta = inventory.in_namespace(kube, self.namespace, lambda: kube.request(
            "POST", cms.path(self.namespace), body=body, accept=META_ACCEPT))
        return Head(seq=stamped["seq"], hash=stamped["hash"], segment=number,
                    resource_version=meta["metadata"]["resourceVersion"], count=1, size=size)

    def seal(self, app: str, number: int) -> None:
        """Make a full segment immutable: the apiserver then refuses any edit of its records."""
        cms = self.kube.resource("v1", "ConfigMap")
        try:
            self.kube.request("PATCH", cms.path(self.namespace, segment_name(app, number)), body={"immutable": True},
                              content_type="application/merge-patch+json", accept=META_ACCEPT)
        except GitopsdError as exc:
            self._log.warning("audit_seal_failed", app=app, segment=segment_name(app, number), error=str(exc))

    def retain(self, app: str, head: Head) -> None:
        """Delete whole oldest segments while the rest still hold >= retention records.

        The oldest survivor is marked first, so `verify` can tell retention
        from deletion even if we crash between the two steps. `head` is the
        app's current head; its resource_version follows when the survivor
        is the head segment.
        """
        if self.retention <= 0 or head.seq + 1 < self.retention:
            # Nothing can be old enough to go, so no LIST to find out: a survivor's
            # first seq is at least 0, and it must hold `retention` records up to
            # the head before anything older is deleted.
            return
        try:
            segments = list_segments(self.kube, namespace=self.namespace, app=app)
            doomed: list[Segment] = []
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
                accept=META_ACCEPT)
            if survivor.number == head.segment:
                head.resource_version = meta["metadata"]["resourceVersion"]
            for seg in doomed:
                self.kube.delete(cms, seg.name, self.namespace)
            self._log.info("audit_retention", app=app, removed=[s.name for s in doomed],
                           chain_starts_at=int(survivor.annotations[FIRST_SEQ_ANNOTATION]))
        except GitopsdError as exc:
            self._log.warning("audit_retention_failed", app=app, error=str(exc))
