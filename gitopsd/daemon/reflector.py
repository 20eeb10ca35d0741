"""One list+watch loop: a store of objects kept current by one watch stream.

client-go calls this a reflector. The shared informers
(gitopsd.daemon.informers) run one per group-kind; a health wait runs a
short-lived one on the pods of a rolling workload. Either way it is one
thread and one connection, and it never loses a change:

- list, then watch from the list's resourceVersion with bookmarks
  (allowWatchBookmarks), so a quiet stream still advances the
  resourceVersion and a reconnect resumes from a recent point;
- a stream that breaks (apiserver restart, network) is resumed from the
  last resourceVersion seen: the apiserver replays every change since;
- 410 Gone (that resourceVersion fell out of the apiserver's window, e.g.
  after a restart of the apiserver): list again and report the difference
  with the old store as ADDED / MODIFIED / DELETED, so an edit or a
  deletion made in the gap is reported like any other;
- errors back off exponentially with jitter (0.5 s up to 30 s), so many
  streams, or many replicas, do not reconnect in step; an unexpected error
  (a bug in the sink's callback) is logged with its traceback and the
  stream lists again after the back-off, rather than ending for good;
- `relist()` from another thread (an app registered after the last list)
  and `stop()` end the open stream at once: the read blocked in it is shut
  down, so a stopped reflector holds no connection and the gauge of open
  watches (gitopsd_informer_watches) is exact.

Objects are kept in *buckets*: the informers bucket by ApplySet part-of value
(one app each). An object whose bucket the sink does not keep is dropped on
arrival; one that moves from bucket to bucket is reported DELETED to the old
one. A bucket is *complete* once a list taken while it was wanted has been
stored: before that, its objects are only those that happened to change.

Objects are kept packed (`Packer`), not as dicts: their JSON, deflated with
a preset dictionary. A ConfigMap of five keys with its managedFields is
~4 KiB of Python objects (every key, value, nested dict and list a separate
allocation), ~0.9 KiB of JSON, and mostly the same JSON as its neighbours —
the same keys, labels, managers and field sets — so deflated against the
first object of its kind it is tens to a few hundred bytes. The store is
the part of the daemon that grows with the fleet: at 10,000 apps of five
objects that is ~200 MiB as dicts, ~45 MiB as JSON, ~10 MiB packed (the
fleet benchmark: the informers' share fell from 19 to 4 KiB an app).
Nothing is left out — managedFields included (the ownership fast path and
the drift report's "who changed it" read them) — so a read gives back the
exact object the apiserver sent, decoded afresh: a reader may change its
copy, never the store. Packing costs ~7 us an object and unpacking about
what parsing the JSON alone costs, and the watch's hot path, an event for
self-heal, hands over the object it just parsed without a round trip
through the store.

`listed=False` is for short-lived watches (pods during a health wait): no
LIST at all, the watch starts "now" with a synthetic ADDED event for every
object that exists (resourceVersion unset), and a 410 simply starts over.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Callable
from typing import Protocol

import orjson
import structlog

from gitopsd import metrics
from gitopsd.errors import ClusterError
from gitopsd.kube import Kube, KubeApiError, Resource
from gitopsd.objects import ObjectRef, ref_of

log = structlog.get_logger("gitopsd.daemon.reflector")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
# The apiserver ends a watch after timeoutSeconds; a random length in this range
# (as client-go does) keeps many streams from renewing in step.
WATCH_SECONDS = (300, 600)

Event = tuple[str, str, dict]          # (bucket, "ADDED" | "MODIFIED" | "DELETED", object)


class Sink(Protocol):
    """Who a reflector keeps objects for and reports changes to."""

    def keeps(self, bucket: str) -> bool: ...

    def wanted(self, taken: Callable[[frozenset[str]], None]) -> frozenset[str] | None:
        """The buckets a list keeps (None: every bucket); `taken` hears them while none can be added."""

    def on_event(self, stream: "Reflector", kind: str, bucket: str, obj: dict) -> None: ...

    def on_synced(self, stream: "Reflector", buckets: frozenset[str]) -> None: ...   # newly complete

    def on_forbidden(self, stream: "Reflector") -> bool: ...   # True: the sink replaces this stream


def resource_version(obj: dict | None) -> str:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion") or ""


def at_least(rv: str, floor: str) -> bool | None:
    """Whether resourceVersion `rv` is not older than `floor`; None when they cannot be compared.

    kube-apiserver's resourceVersions are etcd revisions, comparable as
    integers (KEP-5504 makes that a guarantee); an aggregated API may use
    anything, and then nothing can be said.
    """
    if rv.isdigit() and floor.isdigit():
        return int(rv) >= int(floor)
    return None


class Packer:
    """An object as the store keeps it and back (see the module docstring): its JSON,
    deflated with the first object packed as the preset dictionary.

    The dictionary is fixed at the first pack and kept for the store's life
    (every stored object is unpacked with it). Deflate's window is 8 KiB
    (WBITS): a dictionary and matches within an object reach that far, and a
    pack or unpack allocates ~40 KiB of zlib state instead of the default
    ~260 KiB, which is most of what a pack would cost. Only the reflector's
    own thread packs a store's objects; any thread unpacks. The runners' desired
    objects share one packer across threads (gitopsd.daemon.desired.DesiredState).
    """

    WBITS = 13
    LEVEL = 1          # the fastest: a preset dictionary does most of the work
    MEM_LEVEL = 6

    def __init__(self) -> None:
        self._zdict: bytes | None = None
        self._first = threading.Lock()   # the dictionary is set once, whichever thread packs first

    def pack(self, obj: dict) -> bytes:
        """Raises TypeError (orjson.JSONEncodeError) for what JSON cannot hold exactly: keys that
        are not strings, integers beyond 64 bits."""
        raw = orjson.dumps(obj)
        if self._zdict is None:
            with self._first:
                if self._zdict is None:
                    self._zdict = raw[:1 << self.WBITS]
        deflate = zlib.compressobj(self.LEVEL, zlib.DEFLATED, self.WBITS, self.MEM_LEVEL, zdict=self._zdict)
        return deflate.compress(raw) + deflate.flush()   # a new bytes of its own length

    def unpack(self, stored: bytes) -> dict:
        """A stored object, decoded afresh: exactly what was packed, the caller's own copy."""
        inflate = zlib.decompressobj(self.WBITS, **({"zdict": self._zdict} if self._zdict else {}))
        return orjson.loads(inflate.decompress(stored) + inflate.flush())


def diff(old: dict[ObjectRef, bytes], new: dict[ObjectRef, bytes],
         unpack: Callable[[bytes], dict]) -> list[tuple[str, dict]]:
    """What changed from one store of a bucket to the next, as watch events would have said it."""
    out: list[tuple[str, dict]] = []
    for ref, stored in new.items():
        before = old.get(ref)
        if before is None:
            out.append(("ADDED", unpack(stored)))
        elif before != stored:   # same bytes, same resourceVersion: only the rest is decoded
            obj = unpack(stored)
            if resource_version(unpack(before)) != resource_version(obj):
                out.append(("MODIFIED", obj))
    out.extend(("DELETED", unpack(stored)) for ref, stored in old.items() if ref not in new)
    return out


class Reflector:
    """One list+watch of one resource in one namespace (None: all namespaces / cluster scope)."""

    def __init__(self, kube: Kube, res: Resource, namespace: str | None, *, selector: str,
                 bucket_of: Callable[[dict], str | None], sink: Sink, listed: bool = True,
                 kind: str | None = None) -> None:
        self.kube, self.res, self.namespace, self.selector = kube, res, namespace, selector
        self.listed = listed
        self.synced = threading.Event()      # the store is current: listed, and the stream not broken since
        self.complete: frozenset[str] = frozenset()
        self.rv = ""                         # the last resourceVersion seen (list, event or bookmark)
        # What the metrics and log lines call it: the kind, or a name of its own (`kind`) for a
        # watch of the same kind with another job (gitopsd.daemon.release's requests).
        self.kind = kind or (f"{res.kind}.{res.group}" if res.group else res.kind)
        self._bucket_of, self._sink = bucket_of, sink
        self._packer = Packer()
        self._buckets: dict[str, dict[ObjectRef, bytes]] = {}   # bucket -> ref -> packed object
        self._where: dict[ObjectRef, str] = {}
        self._listing: frozenset[str] = frozenset()   # buckets the list under way will complete
        self._due = listed                  # a list is coming that has not yet taken its buckets
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._relist = False                # list again before the next watch
        self._cut = False                   # we ended the open stream (stop, relist): not an error
        self._close: Callable[[], None] | None = None
        self._open = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"reflector-{self.kind}-{namespace or 'all'}")

    # ------------------------------------------------------------ control (any thread)

    def start(self) -> "Reflector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._interrupt()

    def relist(self) -> None:
        """List again soon (coalesced): a bucket wanted since the last list becomes complete."""
        with self._lock:
            self._relist = self._due = True
        self._interrupt()

    def _interrupt(self) -> None:
        with self._lock:
            self._cut = True
            close = self._close
        if close is not None:
            close()

    # ------------------------------------------------------------ reading (any thread)

    def ready_for(self, bucket: str) -> bool:
        return self.synced.is_set() and bucket in self.complete

    def will_cover(self, bucket: str) -> bool:
        """Complete, or about to be: the list under way or due takes every bucket the sink wants.
        (The sink asks under the same lock as it hands out `wanted`, so a bucket added since
        a list took its buckets is never taken for covered.)"""
        with self._lock:
            return self._due or bucket in self.complete or bucket in self._listing

    def bucket(self, name: str) -> dict[ObjectRef, dict]:
        """The bucket's objects, each the caller's own copy."""
        with self._lock:
            held = list((self._buckets.get(name) or {}).items())
        return {ref: self._packer.unpack(stored) for ref, stored in held}

    def count(self, name: str) -> int:
        with self._lock:
            return len(self._buckets.get(name) or ())

    def buckets(self) -> list[str]:
        with self._lock:
            return list(self._buckets)

    def get(self, bucket: str, ref: ObjectRef) -> dict | None:
        """One object (the caller's own copy), or None."""
        with self._lock:
            stored = (self._buckets.get(bucket) or {}).get(ref)
        return self._packer.unpack(stored) if stored is not None else None

    def reached(self, rv: str) -> bool:
        """Whether the store has seen every change up to resourceVersion `rv`."""
        with self._lock:
            return bool(at_least(self.rv, rv))

    def drop(self, bucket: str) -> None:
        """Forget a bucket (its app is gone): its objects leave memory now."""
        with self._lock:
            gone = self._buckets.pop(bucket, None) or {}
            for ref in gone:
                self._where.pop(ref, None)
            self.complete = self.complete - {bucket}
        metrics.INFORMER_OBJECTS.labels(kind=self.kind).dec(len(gone))

    # ------------------------------------------------------------ the loop (its own thread)

    def _run(self) -> None:
        delay = BACKOFF_START
        try:
            while not self._stopping.is_set():
                try:
                    if self.listed and (not self.rv or self._relist):
                        self._list()
                    self._watch()
                    delay = BACKOFF_START
                except KubeApiError as exc:
                    if exc.status == 410:
                        self._expired()
                    elif exc.status == 403 and self._sink.on_forbidden(self):
                        return
                    elif not self._cut_by_us():
                        delay = self._pause(exc, delay)
                except (ClusterError, OSError, ValueError) as exc:
                    if not self._cut_by_us():
                        delay = self._pause(exc, delay)
                except Exception as exc:  # noqa: BLE001 - a bug in a sink's callback must not end the watch for good
                    with self._lock:
                        self._relist = self._due = self.listed
                    delay = self._pause(exc, delay, unexpected=True)
        finally:
            with self._lock:
                held = len(self._where)
                self._buckets, self._where = {}, {}
            metrics.INFORMER_OBJECTS.labels(kind=self.kind).dec(held)

    def _must_break(self) -> bool:
        return self._stopping.is_set() or self._relist

    def _cut_by_us(self) -> bool:
        """Whether the failure is the stream we ended ourselves (stop, relist): not an error."""
        with self._lock:
            cut, self._cut = self._cut, False
        return cut or self._stopping.is_set()

    def _pause(self, exc: Exception, delay: float, *, unexpected: bool = False) -> float:
        """Back off before resuming; an `unexpected` error (called in its except block) is logged with
        its traceback, and the stream lists again (set by the caller)."""
        self.synced.clear()
        wait = random.uniform(delay / 2, delay)
        (log.exception if unexpected else log.warning)(
            "watch interrupted; resuming", kind=self.kind, namespace=self.namespace, error=str(exc),
            retry_in=round(wait, 2))
        self._stopping.wait(wait)
        return min(delay * 2, BACKOFF_MAX)

    def _expired(self) -> None:
        """410 Gone: the resourceVersion left the apiserver's window; start over from a list."""
        log.info("watch expired; listing again", kind=self.kind, namespace=self.namespace)
        self.synced.clear()
        with self._lock:
            self.rv, self._due = "", self.listed
        if not self.listed:
            with self._lock:
                held = len(self._where)
                self._buckets, self._where = {}, {}
            metrics.INFORMER_OBJECTS.labels(kind=self.kind).dec(held)

    def _list(self) -> None:
        with self._lock:
            self._relist = False   # first: a request from here on lists once more
        wanted = self._sink.wanted(self._taken) or frozenset()
        try:
            items, rv = self.kube.list_with_version(self.res, namespace=self.namespace,
                                                    label_selector=self.selector)
        except BaseException:
            with self._lock:
                self._relist, self._due, self._listing = True, True, frozenset()
            raise
        if self._stopping.is_set():
            return
        fresh: dict[str, dict[ObjectRef, bytes]] = {}
        for obj in items:
            bucket = self._bucket_of(obj)
            if bucket in wanted and self._sink.keeps(bucket):
                fresh.setdefault(bucket, {})[ref_of(obj)] = self._packer.pack(obj)
        del items   # the list's dicts go now, not after the events below
        complete = frozenset(b for b in wanted if self._sink.keeps(b))
        with self._lock:
            old, before, held = self._buckets, self.complete, len(self._where)
            self._buckets = fresh
            self._where = {ref: b for b, objs in fresh.items() for ref in objs}
            self.complete, self._listing, self.rv = complete, frozenset(), rv
            now = len(self._where)
        metrics.INFORMER_OBJECTS.labels(kind=self.kind).inc(now - held)
        self.synced.set()
        for bucket in sorted(before & complete):
            for kind, obj in diff(old.get(bucket) or {}, fresh.get(bucket) or {}, self._packer.unpack):
                self._sink.on_event(self, kind, bucket, obj)
        self._sink.on_synced(self, complete - before)

    def _taken(self, buckets: frozenset[str]) -> None:
        with self._lock:
            self._listing, self._due = buckets, False

    def _watch(self) -> None:
        events = self.kube.watch(self.res, namespace=self.namespace, label_selector=self.selector,
                                 resource_version=self.rv, timeout_seconds=random.randint(*WATCH_SECONDS),
                                 on_open=self._opened)
        try:
            for kind, obj in events:
                if self._must_break():
                    return
                self._receive(kind, obj)
        finally:
            events.close()
            self._closed()

    def _opened(self, close: Callable[[], None]) -> None:
        with self._lock:
            self._close, self._open = close, True
            cut = self._must_break()
        metrics.INFORMER_WATCHES.labels(kind=self.kind).inc()
        self.synced.set()   # listed before, or (unlisted) every object arrives as ADDED now
        if cut:
            close()

    def _closed(self) -> None:
        with self._lock:
            was_open, self._close, self._open = self._open, None, False
        if was_open:
            metrics.INFORMER_WATCHES.labels(kind=self.kind).dec()

    def _receive(self, kind: str, obj: dict) -> None:
        rv = resource_version(obj)
        if kind == "BOOKMARK":
            if rv:
                with self._lock:
                    self.rv = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        for bucket, what, changed in self._store(kind, obj, rv):
            self._sink.on_event(self, what, bucket, changed)

    def _store(self, kind: str, obj: dict, rv: str) -> list[Event]:
        ref = ref_of(obj)
        new = None if kind == "DELETED" else self._bucket_of(obj)
        if new is not None and not self._sink.keeps(new):
            new = None   # another ApplySet's object (or an app no longer registered): dropped on arrival
        stored = self._packer.pack(obj) if new is not None else b""
        out: list[Event] = []
        with self._lock:
            old = self._where.pop(ref, None)
            if old is not None:
                held = self._buckets.get(old) or {}
                held.pop(ref, None)
                if not held:
                    self._buckets.pop(old, None)
                if old != new:
                    out.append((old, "DELETED", obj))
            if new is not None:
                self._buckets.setdefault(new, {})[ref] = stored
                self._where[ref] = new
                out.append((new, kind if old == new else "ADDED", obj))
            if rv:
                self.rv = rv
        delta = (new is not None) - (old is not None)
        if delta:
            metrics.INFORMER_OBJECTS.labels(kind=self.kind).inc(delta)
        return out
