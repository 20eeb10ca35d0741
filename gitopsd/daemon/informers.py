"""A watch-fed cache of one app's managed objects — and nothing else.

Argo CD caches the whole cluster and pays for it in gigabytes (DESIGN.md
pain #7). gitopsd lists and watches only its ApplySet members, with the
`applyset.kubernetes.io/part-of` label selector, per group-kind x namespace.
The cache serves two purposes:

- self-heal: every change to a member arrives as an event within
  milliseconds, and the daemon judges it against the desired object;
- cheap periodic reconciles: while every watch is synced, the plan takes
  live state from the cache instead of listing (zero apiserver reads).

Each (resource, namespace) has one thread: list -> watch from the list's
resourceVersion -> on 410 Gone re-list, and report what changed in the gap
as events, so nothing is missed across a reconnect.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

from gitopsd.errors import ClusterError
from gitopsd.kube import Kube, KubeApiError, Resource
from gitopsd.objects import ObjectRef, ref_of

log = structlog.get_logger("gitopsd.daemon.informers")

Target = tuple[Resource, str | None]          # (resource, namespace or None for cluster scope)
EventHandler = Callable[[str, dict], None]     # ("ADDED" | "MODIFIED" | "DELETED", object)
WATCH_TIMEOUT_SECONDS = 240


class _Watcher:
    def __init__(self, kube: Kube, target: Target, selector: str, on_event: EventHandler) -> None:
        self.kube, self.target, self.selector, self.on_event = kube, target, selector, on_event
        self.objects: dict[ObjectRef, dict] = {}
        self.synced = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        res, ns = target
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"watch-{res.kind}-{ns or 'cluster'}")

    def _relist(self) -> str:
        """List, replace the store, and report what changed since the last look.

        The first list reports every member (as ADDED): a hand edit made between
        our apply and the start of this watch is drift the watch would never show.
        """
        res, ns = self.target
        items, rv = self.kube.list_with_version(res, namespace=ns, label_selector=self.selector)
        fresh = {ref_of(o): o for o in items}
        with self.lock:
            old, self.objects = self.objects, fresh
        for ref, obj in fresh.items():
            before = old.get(ref)
            if before is None:
                self.on_event("ADDED", obj)
            elif before["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self.on_event("MODIFIED", obj)
        for ref, obj in old.items():
            if ref not in fresh:
                self.on_event("DELETED", obj)
        return rv

    def _run(self) -> None:
        res, ns = self.target
        rv = ""
        backoff = 0.5
        while not self.stop.is_set():
            try:
                if not rv:
                    rv = self._relist()
                    self.synced.set()
                for kind, obj in self.kube.watch(res, namespace=ns, label_selector=self.selector,
                                                 resource_version=rv, timeout_seconds=WATCH_TIMEOUT_SECONDS):
                    if self.stop.is_set():
                        return
                    rv = obj.get("metadata", {}).get("resourceVersion") or rv
                    if kind == "BOOKMARK":
                        continue
                    ref = ref_of(obj)
                    with self.lock:
                        if kind == "DELETED":
                            self.objects.pop(ref, None)
                        else:
                            self.objects[ref] = obj
                    self.on_event(kind, obj)
                backoff = 0.5
            except KubeApiError as exc:
                if exc.status == 410:
                    rv = ""  # expired: re-list and report the gap
                    continue
                self._pause(exc, backoff)
                backoff = min(backoff * 2, 30)
            except (ClusterError, OSError, ValueError) as exc:
                self._pause(exc, backoff)
                backoff = min(backoff * 2, 30)

    def _pause(self, exc: Exception, delay: float) -> None:
        res, ns = self.target
        log.warning("watch interrupted; retrying", kind=res.kind, namespace=ns, error=str(exc), retry_in=delay)
        self.stop.wait(delay)


class MemberCache:
    """Live members of one app, kept current by list+watch per target."""

    def __init__(self, kube: Kube, *, selector: str, on_event: EventHandler) -> None:
        self.kube = kube
        self.selector = selector
        self.on_event = on_event
        self._watchers: dict[Target, _Watcher] = {}
        self._lock = threading.Lock()
        self._closed = False   # stopped for good: ensure() starts nothing any more

    def ensure(self, targets: set[Target], *, wait: float = 10.0) -> None:
        """Watch exactly `targets`: start new watchers, stop ones no longer needed."""
        with self._lock:
            if self._closed:
                return
            for target in list(self._watchers):
                if target not in targets:
                    self._watchers.pop(target).stop.set()
            started = []
            for target in targets:
                if target not in self._watchers:
                    w = _Watcher(self.kube, target, self.selector, self.on_event)
                    self._watchers[target] = w
                    w.thread.start()
                    started.append(w)
        deadline = time.monotonic() + wait
        for w in started:
            w.synced.wait(max(0.0, deadline - time.monotonic()))

    def members(self) -> dict[ObjectRef, dict] | None:
        """Every cached member, or None while any watch has not synced yet."""
        with self._lock:
            watchers = list(self._watchers.values())
        if not watchers or not all(w.synced.is_set() for w in watchers):
            return None
        out: dict[ObjectRef, dict] = {}
        for w in watchers:
            with w.lock:
                out.update(w.objects)
        return out

    @property
    def targets(self) -> set[Target]:
        with self._lock:
            return set(self._watchers)

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._watchers.values():
                w.stop.set()
            self._watchers.clear()
