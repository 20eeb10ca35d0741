"""The writer: AuditLog chains each record on the app's head and sends it three ways.

1. stdout — one structlog event ``audit`` carrying the record's fields
   (JSON on a pod's stdout, a readable line on a terminal; gitopsd.log
   decides). The line's ``time`` is stamped by the log pipeline, a few
   microseconds after the stored record's ``time``; every other field is the
   stored record's, ``hash`` included, so a log collector holds an external
   copy of the chain head.
2. Kubernetes Events (gitopsd.audit.events), best effort.
3. The durable store (gitopsd.audit.segments), with the chain head copied
   onto the app's parent (gitopsd.audit.head). It is the source of truth for
   ``gitopsd history`` and ``gitopsd audit verify``.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timezone

import orjson
import structlog

from gitopsd import redact
from gitopsd.audit.events import EventRecorder
from gitopsd.audit.head import further, keep_head, load_head
from gitopsd.audit.records import (
    canonical,
    default_instance,
    fit,
    iso_time,
    record_hash,
)
from gitopsd.audit.segments import (
    DEFAULT_RETENTION,
    SEGMENT_MAX_BYTES,
    SEGMENT_MAX_RECORDS,
    Head,
    SegmentStore,
)
from gitopsd.errors import ClusterError, GitopsdError
from gitopsd.kube import Kube, KubeApiError
from gitopsd.report import log_fields

MAX_BACKLOG = 1000
APPEND_ATTEMPTS = 10


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
                 events: bool = True, logger=None, instance: str | None = None, cluster: str | None = None,
                 segment_records: int = SEGMENT_MAX_RECORDS, segment_bytes: int = SEGMENT_MAX_BYTES) -> None:
        self.kube = kube
        self.namespace = namespace
        self.events = events and kube is not None
        self.instance = instance or default_instance()
        self.cluster = cluster   # the cluster of the targets whose records this log keeps (gitopsd.daemon.clusters)
        self.store_error: str | None = None
        self._log = logger or structlog.get_logger("gitopsd.audit")
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._heads: dict[str, Head] = {}
        self._backlog: dict[str, list[dict]] = {}
        self._segments = None if kube is None else SegmentStore(
            kube, namespace=namespace, retention=retention, segment_records=segment_records,
            segment_bytes=min(segment_bytes, SEGMENT_MAX_BYTES), logger=self._log)
        self._announcer = None if kube is None else EventRecorder(kube, namespace=namespace, logger=self._log)

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
        rec = fit(redact.scrub_data(orjson.loads(canonical(rec))))
        rec["time"] = iso_time(datetime.now(timezone.utc))
        rec.setdefault("instance", self.instance)
        if self.cluster is not None:
            rec.setdefault("cluster", self.cluster)
        with self._lock_for(app):
            stored = self._store_in_order(app, rec)
            if stored is None:
                self._log.warning("audit", **log_fields(rec), stored=False)
                return rec
            self._log.info("audit", **log_fields(stored))
        if self.events:
            self._announcer.announce(stored)
        return stored

    def prime(self, app: str, *, parent: dict | None, segments: list) -> None:
        """Take the app's chain head from reads the caller just made — its parent (None: absent),
        then its segments (list_segments) — instead of reading both again before its first record.

        The daemon reads them anyway when it takes an app over (the inventory, the last
        revision). A head this process already holds is kept. One that is stale by the time
        the record is written (another writer appended meanwhile) costs what it always does:
        the segment write is refused (409, or AlreadyExists) and the head read again.
        """
        if self.kube is None:
            return
        with self._lock_for(app):
            if app not in self._heads:
                self._heads[app] = load_head(self.kube, namespace=self.namespace, app=app, log=self._log,
                                             parent=parent, segments=segments)

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

    def _head(self, app: str) -> Head:
        head = self._heads.get(app)
        if head is None:
            head = self._heads[app] = self._load_head(app) if self.kube is not None else Head()
        return head

    def _load_head(self, app: str) -> Head:
        return load_head(self.kube, namespace=self.namespace, app=app, log=self._log)

    def _append(self, app: str, rec: dict) -> dict:
        """Chain `rec` on the head and write it; re-chain on another writer's conflict."""
        for attempt in range(APPEND_ATTEMPTS):
            head = self._head(app)
            stamped = {**rec, "seq": head.seq + 1, "prev_hash": head.hash}
            stamped["hash"] = record_hash(stamped)
            if self.kube is None:
                self._heads[app] = Head(seq=stamped["seq"], hash=stamped["hash"])
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
                    self._heads[app] = further(self._load_head(app), head)
                    continue
                raise
        raise ClusterError(f"could not append to the audit trail of app {app}: another writer kept moving its "
                           f"head ({APPEND_ATTEMPTS} attempts)", hint="are two gitopsd leaders running at once?")

    def _write(self, app: str, head: Head, stamped: dict) -> None:
        """Store `stamped`, then keep the new head on the parent; a new segment then seals the old and retains."""
        new = self._heads[app] = self._segments.append(app, head, stamped)
        uid = keep_head(self.kube, namespace=self.namespace, app=app, marker=f"{new.seq}:{new.hash}",
                        segment=new.segment, log=self._log)
        if self._announcer is not None:
            self._announcer.remember_parent(app, uid)   # the Event on the parent needs it next
        if new.segment != head.segment:
            if head.resource_version:   # (not when the head segment was lost: nothing to seal)
                self._segments.seal(app, head.segment)
            self._segments.retain(app, new)
