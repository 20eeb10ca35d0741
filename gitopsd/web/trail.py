"""The audit trail as the web view reads it: kept in memory, so a page view sends no request.

The trail's home is the cluster (gitopsd.audit.segments); reading it there
for every page view would put the apiserver under the browsers' refresh rate.
So `Trails` keeps, per target viewed:

- its newest records (up to ``RECORDS``), read once with the first view of the
  target, then kept current from the feed (gitopsd.daemon.feed), which hands
  over every record this daemon stores as it stores it. A target not viewed
  for a while is forgotten (LRU of ``TARGETS``): memory grows with the
  targets people look at, not with the fleet.
- the verdict of `gitopsd audit verify` on its chain, computed when a page asks
  and kept until the chain's head moves on (a new record); a chain broken
  by hand meanwhile shows at the next record or restart, as the daemon's own
  head check would find it.
- the diff text of the newest transitions (``DIFFS`` and ``DIFFS_BYTES`` in
  all, of every target, cut at ``DIFF_BYTES`` each): the records keep only field paths by design, and the
  text is what a reviewer reads. It is gitopsd.report.transition_diff's
  output, Secret values masked before the text is made; it lives in memory
  only, so a transition from before a restart shows its field paths and says
  why there is no text.

Records written by another replica (another shard's targets) are not shown
here: each replica's web view shows the targets it runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gitopsd import audit
from gitopsd.daemon.feed import Event
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube

log = structlog.get_logger("gitopsd.web")

RECORDS = 200        # newest records kept per viewed target
TARGETS = 64         # targets whose trail is kept (least recently viewed forgotten first)
DIFFS = 512          # transition diffs kept, all targets together ...
DIFFS_BYTES = 32 * 1024 * 1024   # ... and at most this much text in all
DIFF_BYTES = 256 * 1024          # one diff's text beyond this is cut


@dataclass(frozen=True)
class Where:
    """Where a target's trail is: its cluster's connection, gitopsd's namespace there, the app's name."""
    kube: Kube
    namespace: str
    app: str


@dataclass
class _Trail:
    records: dict[int, dict]          # by seq
    verified: tuple[int, bool, str] | None = None   # (newest seq when checked, ok, message)


class Trails:
    def __init__(self, *, where: Callable[[str], Where | None]) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._trails: OrderedDict[str, _Trail] = OrderedDict()
        self._loading: dict[str, list[dict]] = {}       # records that arrived while a trail was being read
        self._diffs: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._diff_bytes = 0

    # ------------------------------------------------------------ fed by the runners

    def on_event(self, event: Event) -> None:
        """A record stored: keep it (if its trail is kept) and its diff text (if it has one)."""
        rec = event.record
        if event.kind != "record" or not rec or not isinstance(rec.get("seq"), int):
            return   # not stored (the store was away): it reaches the trail later, and a reload shows it
        with self._lock:
            if event.diff:
                self._keep_diff((event.target, rec["seq"]), _cut(event.diff))
            if event.target in self._loading:
                self._loading[event.target].append(rec)
            trail = self._trails.get(event.target)
            if trail is not None:
                _keep(trail, [rec])

    def forget(self, target: str) -> None:
        """A target removed from the config: its trail stays in the cluster, not here."""
        with self._lock:
            self._trails.pop(target, None)
            for key in [k for k in self._diffs if k[0] == target]:
                self._diff_bytes -= len(self._diffs.pop(key))

    def _keep_diff(self, key: tuple[str, int], text: str) -> None:
        """Keep one diff (the caller holds the lock); the oldest go past either bound."""
        self._diff_bytes += len(text) - len(self._diffs.pop(key, ""))
        self._diffs[key] = text
        while self._diffs and (len(self._diffs) > DIFFS or self._diff_bytes > DIFFS_BYTES):
            self._diff_bytes -= len(self._diffs.popitem(last=False)[1])

    # ------------------------------------------------------------ read by the pages

    def records(self, target: str) -> list[dict]:
        """The target's newest records, newest first; read from the cluster at the first view only.

        Raises GitopsdError when that first read fails (the page says why; the next view tries again).
        """
        return sorted(self._trail(target).records.values(), key=lambda r: r["seq"], reverse=True)

    def record(self, target: str, seq: int) -> dict | None:
        """One record by seq: from memory, or (older than what is kept) one read of the trail."""
        trail = self._trail(target)
        if seq in trail.records:
            return trail.records[seq]
        where = self._where(target)
        if where is None:
            return None
        for rec in audit.history(where.kube, namespace=where.namespace, app=where.app):
            if rec.get("seq") == seq:
                return rec
        return None

    def diff(self, target: str, seq: int) -> str | None:
        with self._lock:
            return self._diffs.get((target, seq))

    def verify(self, target: str) -> dict:
        """{"ok", "message", "seq"}: the chain checked once per head, as `gitopsd audit verify` does."""
        trail = self._trail(target)
        head = max(trail.records, default=0)
        if trail.verified is not None and trail.verified[0] == head:
            _, ok, message = trail.verified
            return {"ok": ok, "message": message, "seq": head}
        where = self._where(target)
        if where is None:
            return {"ok": False, "message": f"no app {target}", "seq": head}
        try:
            ok, message = audit.verify(where.kube, namespace=where.namespace, app=where.app)
        except (GitopsdError, OSError) as exc:
            return {"ok": False, "message": f"cannot read the trail: {exc}", "seq": head}
        trail.verified = (head, ok, message)
        return {"ok": ok, "message": message, "seq": head}

    def _trail(self, target: str) -> _Trail:
        with self._lock:
            trail = self._trails.get(target)
            if trail is not None:
                self._trails.move_to_end(target)
                return trail
            self._loading.setdefault(target, [])
        try:
            where = self._where(target)
            read = [] if where is None else audit.history(where.kube, namespace=where.namespace, app=where.app,
                                                          limit=RECORDS)
        except BaseException:
            with self._lock:
                self._loading.pop(target, None)
            raise
        with self._lock:
            trail = _Trail(records={})
            _keep(trail, [r for r in read if isinstance(r.get("seq"), int)] + self._loading.pop(target, []))
            self._trails[target] = trail
            while len(self._trails) > TARGETS:
                self._trails.popitem(last=False)
            return trail


def _keep(trail: _Trail, recs: list[dict]) -> None:
    for rec in recs:
        trail.records[rec["seq"]] = rec
    while len(trail.records) > RECORDS:
        del trail.records[min(trail.records)]


def _cut(text: str) -> str:
    raw = text.encode()
    if len(raw) <= DIFF_BYTES:
        return text
    return raw[:DIFF_BYTES].decode(errors="ignore") + f"\n… cut at {DIFF_BYTES // 1024} KiB\n"
