"""A health wait's window on the informers: wake-ups, and the pods of rolling workloads.

engine.health.wait asks two things of watch-fed state while it waits
(its LiveSource protocol):

- read an object from memory, and be woken when it changes. The app's
  shared informers already hold every managed object, so a session only
  records which refs wake it (AppView.dispatch calls `heard`): a wait
  costs no request at all while the reflectors covering its objects are
  synced.
- the pods of an in-progress workload, for the early verdicts
  (CrashLoopBackOff, ImagePullBackOff, ...; engine.health). Pods are not
  managed objects, so no informer holds them: the session watches them
  itself, one temporary watch per workload selector (namespace +
  spec.selector), opened the first time the wait looks at that workload's
  pods and closed when the wait ends. It starts "from now" without a LIST
  (the apiserver sends the existing pods as ADDED events), and every pod
  event wakes the wait, so a pod entering CrashLoopBackOff fails the
  rollout as soon as the kubelet says so — no polling. The cost is one
  connection per rolling workload for the length of its wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from gitopsd.daemon.reflector import Reflector
from gitopsd.engine.health import Reading
from gitopsd.kube import Kube
from gitopsd.objects import ObjectRef, ref_of


def label_selector(selector: dict | None) -> str:
    """A LabelSelector (matchLabels, matchExpressions) as the `labelSelector` query string."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), ",".join(expr.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": f"{key}", "DoesNotExist": f"!{key}"}.get(op, ""))
    return ",".join(p for p in parts if p)


class WaitSession:
    """One health wait (engine.health.LiveSession) of one app."""

    def __init__(self, view, refs: Iterable[ObjectRef], *, wake: Callable[[ObjectRef], None], kube: Kube) -> None:
        self._view, self._refs, self._wake, self._kube = view, frozenset(refs), wake, kube
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], Reflector] = {}       # (namespace, selector) -> its watch
        self._workloads: dict[Reflector, set[ObjectRef]] = {}   # which waited workloads a watch wakes
        self._closed = False
        view.attach(self)

    def heard(self, ref: ObjectRef) -> None:
        """An event of the app's (from its informers): wake the wait if it waits on `ref`."""
        if ref in self._refs:
            self._wake(ref)

    def read(self, ref: ObjectRef, *, after: dict | None) -> Reading:
        return self._view.read(ref, after=after)

    def pods(self, workload: dict) -> list[dict]:
        """The workload's pods as its temporary watch knows them ([] until the first arrive)."""
        namespace = (workload.get("metadata") or {}).get("namespace") or ""
        selector = label_selector((workload.get("spec") or {}).get("selector"))
        if not namespace or not selector:
            return []
        with self._lock:
            if self._closed:
                return []
            stream = self._pods.get((namespace, selector))
            if stream is None:
                stream = Reflector(self._kube, self._kube.resource("v1", "Pod"), namespace, selector=selector,
                                   bucket_of=lambda _pod: "", sink=self, listed=False)
                self._pods[(namespace, selector)] = stream
                self._workloads[stream] = set()
                stream.start()
            self._workloads[stream].add(ref_of(workload))
        return list(stream.bucket("").values())

    def close(self) -> None:
        """The wait is over: its pod watches end now."""
        with self._lock:
            self._closed = True
            streams, self._pods, self._workloads = list(self._pods.values()), {}, {}
        for s in streams:
            s.stop()
        self._view.detach(self)

    # ------------------------------------------------------------ the pod watches' sink

    def keeps(self, bucket: str) -> bool:
        return True

    def wanted(self, taken: Callable[[frozenset[str]], None]) -> frozenset[str] | None:
        return None   # never asked: pod watches do not list

    def on_event(self, stream: Reflector, kind: str, bucket: str, obj: dict) -> None:
        with self._lock:
            workloads = list(self._workloads.get(stream, ()))
        for ref in workloads:
            self._wake(ref)

    def on_synced(self, stream: Reflector, buckets: frozenset[str]) -> None:
        return None

    def on_forbidden(self, stream: Reflector) -> bool:
        return False
