"""Shared informers: one watch per kind for the whole process, indexed by app.

Argo CD caches the whole cluster and pays for it in gigabytes (DESIGN.md
pain #7); one watch per app and kind, as gitopsd had, costs a connection
per app (a thousand apps: a thousand connections). Here one list+watch per
group-kind (gitopsd.daemon.reflector) serves every app:

- cluster-wide, selected by the *existence* of the ApplySet label
  `applyset.kubernetes.io/part-of`, so memory grows with what gitopsd
  manages, never with the cluster; and of those only objects whose part-of
  value is a registered app's are kept — another ApplySet tool's objects
  (same key, other value) are dropped on arrival;
- indexed by that value: an app's members are one dict lookup;
- started lazily when the first app needs a kind, stopped when the last
  app stops needing it;
- where RBAC forbids the cluster-wide list/watch of a kind (403: the
  namespaced install, deploy/overlays/namespaced), one shared reflector per
  namespace that any app needs, still shared by every app.

Each app sees the informers through an AppView:
- `targets` and `members()` are engine.plan's LiveCache: while every
  reflector covering the app is synced, the planner reads live state from
  memory with zero requests;
- every change of one of its objects reaches the app's handler (the
  runner's self-heal), and the members it has never been told of are
  replayed to it once as ADDED when it starts watching a kind: a hand edit
  made between an apply and the start of the watch is drift too;
- `session()` is engine.health's LiveSource: the health wait reads from
  memory and is woken by the watch (gitopsd.daemon.waits).

Registration and completeness: an app is registered when its view is made
(the daemon makes every runner's view before the first reconcile, so the
first list of each kind covers every app at once). An app registered
after a kind's last list is not complete there — its objects were dropped
on arrival — so its first need of that kind makes the reflector list again
(coalesced: one list for any number of new apps), and the app reads from
memory once that list is stored.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from gitopsd.daemon.reflector import Reflector, at_least, resource_version
from gitopsd.daemon.waits import WaitSession
from gitopsd.engine.health import Reading
from gitopsd.engine.inventory import PART_OF_LABEL
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube, Resource
from gitopsd.objects import ObjectRef, ref_of

log = structlog.get_logger("gitopsd.daemon.informers")

Target = tuple[Resource, str | None]          # (resource, namespace or None for cluster scope)
EventHandler = Callable[[str, dict], None]     # ("ADDED" | "MODIFIED" | "DELETED", object)
SYNC_TIMEOUT = 10.0                            # how long ensure() waits for a new kind's first list
UNCOVERED = Reading(covered=False, fresh=False, obj=None)


def part_of(obj: dict) -> str | None:
    """The ApplySet an object belongs to (its bucket), or None."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(PART_OF_LABEL)


@dataclass
class _Kind:
    """The reflectors of one group-kind and how many apps need each namespace of it."""

    res: Resource
    need: Counter = field(default_factory=Counter)          # namespace (None: cluster scope) -> apps
    streams: dict[str | None, Reflector] = field(default_factory=dict)
    forbidden: bool = False                                 # no cluster-wide list/watch: one per namespace

    def covering(self, namespace: str | None) -> Reflector | None:
        if self.forbidden and self.res.namespaced:
            return self.streams.get(namespace)
        return self.streams.get(None)

    def wanted_streams(self) -> set[str | None]:
        needed = {ns for ns, n in self.need.items() if n > 0}
        if not needed:
            return set()
        if self.forbidden and self.res.namespaced:
            return {ns for ns in needed if ns}
        return {None}


class Informers:
    """The process's shared informers (one per Kube); see the module docstring."""

    def __init__(self, kube: Kube, *, sync_timeout: float = SYNC_TIMEOUT) -> None:
        self.kube = kube
        self.sync_timeout = sync_timeout
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)    # a reflector synced or was replaced
        self._views: dict[str, AppView] = {}
        self._kinds: dict[tuple[str, str], _Kind] = {}
        self._stopped = False

    def view(self, *, app_id: str, on_event: EventHandler) -> "AppView":
        """Register an app (its ApplySet id); its objects are kept from now on."""
        view = AppView(self, app_id=app_id, on_event=on_event)
        with self._lock:
            self._views[app_id] = view
        return view

    def stop(self) -> None:
        """Stop every reflector (daemon shutdown); views stay readable but go stale."""
        with self._lock:
            self._stopped = True
            streams = [s for k in self._kinds.values() for s in k.streams.values()]
            self._kinds.clear()
        for s in streams:
            s.stop()

    def covering(self, group: str, kind: str, namespace: str | None) -> Reflector | None:
        with self._lock:
            k = self._kinds.get((group, kind))
            return k.covering(namespace or None) if k else None

    def cached(self) -> dict[str, int]:
        """Objects in memory by app id (for tests and debugging)."""
        with self._lock:
            streams = [s for k in self._kinds.values() for s in k.streams.values()]
        out: Counter = Counter()
        for s in streams:
            for app in s.buckets():
                out[app] += s.count(app)
        return dict(out)

    # ------------------------------------------------------------ for the views

    def _retarget(self, view: "AppView", targets: frozenset[Target]) -> None:
        """Make `view` need exactly `targets`: start what is missing, stop what nobody needs."""
        with self._lock:
            if self._stopped or (view.stopped and targets):
                return
            old, view._targets = view._targets, targets
            touched: dict[tuple[str, str], _Kind] = {}
            for (res, ns), step in [(t, -1) for t in old - targets] + [(t, 1) for t in targets - old]:
                k = self._kinds.get((res.group, res.kind))
                if k is None:
                    k = self._kinds[(res.group, res.kind)] = _Kind(res=res)
                k.need[ns if res.namespaced else None] += step
                touched[(res.group, res.kind)] = k
            for key, k in touched.items():
                self._reconcile(key, k)
            for res, ns in targets:
                stream = self._kinds[(res.group, res.kind)].covering(ns)
                if stream is not None and not stream.will_cover(view.app_id):
                    stream.relist()   # registered after this kind's last list

    def _reconcile(self, key: tuple[str, str], k: _Kind) -> None:
        wanted = k.wanted_streams()
        for ns in set(k.streams) - wanted:
            k.streams.pop(ns).stop()
        for ns in wanted - set(k.streams):
            k.streams[ns] = Reflector(self.kube, k.res, ns, selector=PART_OF_LABEL, bucket_of=part_of,
                                      sink=self).start()
        if not wanted:
            del self._kinds[key]

    def _release(self, view: "AppView") -> None:
        """The app is gone: unregister it, drop its objects, stop what only it needed."""
        with self._lock:
            self._retarget(view, frozenset())
            if self._views.get(view.app_id) is view:
                del self._views[view.app_id]
            streams = [s for k in self._kinds.values() for s in k.streams.values()]
        for s in streams:
            s.drop(view.app_id)

    def _await(self, ready: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(ready, timeout)

    # ------------------------------------------------------------ the reflectors' sink

    def keeps(self, bucket: str) -> bool:
        return bucket in self._views

    def wanted(self, taken: Callable[[frozenset[str]], None]) -> frozenset[str]:
        with self._lock:   # the lock _retarget asks Reflector.will_cover under
            apps = frozenset(self._views)
            taken(apps)
            return apps

    def on_event(self, stream: Reflector, kind: str, bucket: str, obj: dict) -> None:
        view = self._views.get(bucket)
        if view is not None:
            view.dispatch(kind, obj)

    def on_synced(self, stream: Reflector, buckets: frozenset[str]) -> None:
        for app in buckets:
            view = self._views.get(app)
            if view is not None:
                view.replay(stream)
        with self._changed:
            self._changed.notify_all()

    def on_forbidden(self, stream: Reflector) -> bool:
        """A 403 on a cluster-wide list/watch: fall back to one reflector per namespace."""
        if stream.namespace is not None or not stream.res.namespaced:
            return False
        with self._lock:
            key = (stream.res.group, stream.res.kind)
            k = self._kinds.get(key)
            if k is not None and k.streams.get(None) is stream:
                log.info("may not list and watch this kind in all namespaces; watching each namespace "
                            "the apps need instead", kind=stream.kind)
                k.forbidden = True
                self._reconcile(key, k)
            self._changed.notify_all()
        return True


class AppView:
    """One app's window on the shared informers: LiveCache for the planner,
    LiveSource for the health wait, events for self-heal."""

    def __init__(self, informers: Informers, *, app_id: str, on_event: EventHandler) -> None:
        self.app_id = app_id
        self.stopped = False
        self._informers = informers
        self._on_event = on_event
        self._targets: frozenset[Target] = frozenset()   # set under the informers' lock
        self._lock = threading.Lock()
        self._replayed: set[Reflector] = set()            # reflectors whose members this app was told of
        self._waits: frozenset[WaitSession] = frozenset()   # open health waits (replaced, never mutated)

    @property
    def targets(self) -> set[Target]:
        return set(self._targets)

    def ensure(self, targets: Iterable[Target], *, wait: float | None = None) -> None:
        """Need exactly `targets`; wait (up to `wait`, default the informers' sync timeout) until
        each has been listed for this app once, and tell the app of the members it has not heard
        of yet. A reflector whose stream is broken now (the apiserver restarting) is not waited
        for: it lists or resumes on its own, and meanwhile the planner lists for itself."""
        wanted = frozenset(targets)
        self._informers._retarget(self, wanted)
        timeout = self._informers.sync_timeout if wait is None else wait
        if timeout > 0:
            self._informers._await(lambda: self._listed(wanted), timeout)
        for stream in self._covering(wanted):
            if stream is not None and stream.ready_for(self.app_id):
                self.replay(stream)

    def cover(self, targets: Iterable[Target]) -> None:
        """Need `targets` too, without waiting (a health wait on kinds the app did not watch yet)."""
        extra = frozenset(targets) - self._targets
        if extra:
            self.ensure(self._targets | extra, wait=0)

    def members(self) -> dict[ObjectRef, dict] | None:
        """Every cached member of the app, or None while a reflector it needs has not synced."""
        streams = set(self._covering(self._targets))
        if not streams or None in streams or not all(s.ready_for(self.app_id) for s in streams):
            return None
        out: dict[ObjectRef, dict] = {}
        for s in streams:
            out.update(s.bucket(self.app_id))
        return out

    def read(self, ref: ObjectRef, *, after: dict | None) -> Reading:
        """The object from memory, if a synced reflector covers it and it is not older than `after`.

        Not covered, or resourceVersions that cannot be compared: the caller
        reads it from the apiserver. Covered but nothing newer than `after`
        yet (the watch trails the apply that returned `after`): fresh=False.
        Absent and the reflector has seen past `after`: gone (obj None).
        """
        stream = self._informers.covering(ref.group, ref.kind, ref.namespace)
        if stream is None or not stream.ready_for(self.app_id):
            return UNCOVERED
        obj = stream.get(self.app_id, ref)
        if after is None:
            return Reading(covered=True, fresh=True, obj=obj)
        floor = resource_version(after)
        newer = at_least(resource_version(obj), floor) if obj is not None else stream.reached(floor)
        if newer is None and obj is not None:
            return UNCOVERED
        return Reading(covered=True, fresh=bool(newer), obj=obj)

    def session(self, refs: Iterable[ObjectRef], *, wake: Callable[[ObjectRef], None]) -> WaitSession:
        """A health wait on `refs` (engine.health.LiveSource): the kinds of `refs` are watched
        from now on (the first wait of a new kind reads from the apiserver until its list is in)."""
        refs = list(refs)
        self.cover(self._resolve(refs))
        return WaitSession(self, refs, wake=wake, kube=self._informers.kube)

    def dispatch(self, kind: str, obj: dict) -> None:
        if self.stopped:
            return
        self._on_event(kind, obj)
        waits = self._waits
        if waits:
            ref = ref_of(obj)
            for w in waits:
                w.heard(ref)

    def attach(self, session: WaitSession) -> None:
        with self._lock:
            self._waits = frozenset(self._waits | {session})

    def detach(self, session: WaitSession) -> None:
        with self._lock:
            self._waits = frozenset(self._waits - {session})

    def replay(self, stream: Reflector) -> None:
        """Tell the app once of every member `stream` holds for it (as ADDED)."""
        if stream not in self._covering(self._targets):
            return
        with self._lock:
            if stream in self._replayed or self.stopped:
                return
            self._replayed = {s for s in self._replayed if s in self._covering(self._targets)} | {stream}
        for obj in stream.bucket(self.app_id).values():
            self._on_event("ADDED", obj)

    def stop(self) -> None:
        self.stopped = True
        for w in self._waits:
            w.close()
        self._informers._release(self)

    def _covering(self, targets: Iterable[Target]) -> list[Reflector | None]:
        return [self._informers.covering(res.group, res.kind, ns) for res, ns in targets]

    def _listed(self, targets: frozenset[Target]) -> bool:
        streams = self._covering(targets)
        return all(s is not None and self.app_id in s.complete for s in streams)

    def _resolve(self, refs: Iterable[ObjectRef]) -> set[Target]:
        """The targets covering `refs` (kinds the cluster does not serve are left out)."""
        out: set[Target] = set()
        for ref in refs:
            try:
                res = self._informers.kube.resource_for_group_kind(ref.group, ref.kind)
            except GitopsdError:
                continue   # discovery failed: the wait reads this one from the apiserver
            if res is not None:
                out.add((res, ref.namespace if res.namespaced else None))
        return out
