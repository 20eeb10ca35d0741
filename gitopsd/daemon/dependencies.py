"""`dependsOn` in the daemon: an app waits until the apps it depends on are ready, and runs as soon as they are.

A dependency is *ready* when its latest reconcile converged: Applied or
NoChange (the revision it runs is the one its ref names, and nothing was
left to write) and Healthy. Like a Flux Kustomization whose Ready condition
is Unknown while it reconciles, a dependency that is running (or queued to
run) is not ready yet: a push wakes the CRD app and the app of its custom
resources together, and the second must not race the first to the apiserver.
Nor is one that is waiting for its own dependencies (chains wait in order),
suspended, failing, refused by its prune guard or Unhealthy: the waiting
app's status says which and why (`gitopsd status`: RESULT Waiting, the REASON
naming each dependency and its state). A DryRun verdict counts as ready: in
the daemon it only means an app with self-heal off holding the commit it
already applied.

Where the answer comes from:

- A dependency this replica runs (every app, without sharding): its runner,
  in memory. When a runner's runs end (`settled`), the apps waiting for it
  are triggered at once (trigger "dependency", in the lane of commits, not
  the polls'): a dependency that becomes ready starts its dependents without
  waiting for their next poll. One that is still not ready wakes them too,
  so that their status says its new state.
- A dependency of a shard another replica holds (`--shards N`): its status
  record in the cluster (gitopsd.daemon.status), which its owner writes on
  every change of result, health or reason. `_StatusWatch` watches the
  ApplySet parents that carry them (started when a dependency is first found
  to be another replica's; it keeps only the parents of apps something
  depends on), so a change of such a record wakes the apps waiting for it
  like a local run's end does. Should the watch be refused (no RBAC to watch
  ConfigMaps), the record is read with a GET, and a waiting app looks again
  every REMOTE_RECHECK seconds. A record says nothing of a run under way:
  there, ready means the owner's last recorded verdict.

Config reloads: the file is checked as a whole (gitopsd.config refuses an
unknown name or a cycle, and the daemon keeps the last good file), so the
graph here is always complete and acyclic; `update` takes the new one. An
app whose dependsOn changed is woken by the reload like any changed app,
and judges its new dependencies then.

A waiting app fetches, renders and writes nothing; its self-heal keeps
putting back the revision it last applied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from gitopsd.config import IN_CLUSTER, split_target
from gitopsd.daemon import status as status_mod
from gitopsd.daemon.reflector import Reflector
from gitopsd.engine.inventory import ID_LABEL, applyset_id, parent_name
from gitopsd.errors import GitopsdError

if TYPE_CHECKING:
    from gitopsd.config import AppConfig, Config
    from gitopsd.daemon.runner import AppRunner
    from gitopsd.kube import Kube

log = structlog.get_logger("gitopsd")

#: Verdicts of a dependency's last reconcile that let its dependents go (with health Healthy).
READY_RESULTS = frozenset({"Applied", "NoChange", "DryRun"})
#: How often an app waiting for another replica's app reads that app's status again (seconds).
REMOTE_RECHECK = 5.0
#: A reason is one line of a status table; a dependency's own reason is cut to this.
MAX_REASON = 160


class Dependencies:
    """Who waits for whom, and whether a dependency is ready (module docstring)."""

    def __init__(self, *, kube: Kube, namespace: str, runners: Callable[[], dict[str, AppRunner]],
                 local: Callable[[str], bool], kube_of: Callable[[str], Kube] | None = None) -> None:
        """`local(app)`: whether this replica runs `app` (holds its shard); otherwise its status
        record in `namespace` is read. Apps are targets (`app`, `app@cluster`: gitopsd.config.AppConfig.key);
        `kube_of(cluster)` reaches the record of a target on another cluster."""
        self._kube, self._namespace = kube, namespace
        self._kube_of = kube_of
        self._runners, self._local = runners, local
        self._dependents: dict[str, tuple[str, ...]] = {}
        self._depended: frozenset[str] = frozenset()   # the apps something depends on
        self._lock = threading.Lock()
        self._watch: _StatusWatch | None = None
        self._ends: dict[str, int] = {}   # app -> how many times its runs ended (or its record changed)

    def update(self, config: Config) -> None:
        """Take the graph of a newly loaded config (valid: every name known, no cycle)."""
        dependents: dict[str, list[str]] = {}
        for app in config.targets:
            for dep in app.dependency_keys():
                dependents.setdefault(dep, []).append(app.key)
        grew = set(dependents) - self._depended
        self._dependents = {dep: tuple(names) for dep, names in dependents.items()}
        self._depended = frozenset(dependents)
        if grew and self._watch is not None:
            self._watch.relist()   # records of the new dependencies too

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    def blocking(self, cfg: AppConfig) -> tuple[list[str], bool]:
        """Why `cfg` may not reconcile now: one line per dependency that is not ready
        (`infra: Unhealthy: ...`), none when it may; and whether one of them is another
        replica's that no watch follows (the caller then looks again in REMOTE_RECHECK seconds)."""
        waiting, poll = [], False
        runners = self._runners()
        for name in cfg.dependency_keys():
            runner = runners.get(name)
            if runner is not None and self._local(name):
                why = local_readiness(runner)
            else:
                why, watched = self._remote_readiness(name)
                poll = poll or not watched
            if why is not None:
                waiting.append(f"{name}: {_cut(why)}")
        return waiting, poll

    def ends(self, names: Iterable[str]) -> int:
        """A count that moves whenever one of `names` settles: an app that sees it move while it
        judges judges again, for that end may have come before it was marked waiting (and so
        not have woken it)."""
        return sum(self._ends.get(name, 0) for name in names)

    def settled(self, name: str) -> None:
        """`name`'s runs have ended: trigger every app waiting for it, to judge again."""
        self._ends[name] = self._ends.get(name, 0) + 1
        runners = self._runners()
        for dependent in self._dependents.get(name, ()):
            runner = runners.get(dependent)
            if runner is not None and runner.waiting:
                runner.trigger("dependency")

    def _remote_readiness(self, name: str) -> tuple[str | None, bool]:
        """Readiness from `name`'s status record: the watch's copy when it has one, else a GET;
        and whether the watch follows it (False: the caller must look again itself)."""
        app, cluster = split_target(name)
        if cluster != IN_CLUSTER:
            # Another replica's target on another cluster: its record there, read again every REMOTE_RECHECK.
            try:
                found = status_mod.read_all(self._kube_of(cluster), namespace=self._namespace, app=app)
            except (GitopsdError, KeyError) as exc:
                return f"its status cannot be read ({exc})", False
            return record_readiness(found[0] if found else None), False
        watch = self._status_watch()
        if watch.covers(name):
            return record_readiness(watch.record(name)), True
        try:
            found = status_mod.read_all(self._kube, namespace=self._namespace, app=name)
        except GitopsdError as exc:
            return f"its status cannot be read ({exc})", False
        # Not yet synced: its first list reports every record (on_synced), which wakes this app again.
        return record_readiness(found[0] if found else None), watch.alive

    def _status_watch(self) -> _StatusWatch:
        with self._lock:
            if self._watch is None:
                self._watch = _StatusWatch(self._kube, self._namespace, wanted=lambda: self._depended,
                                           changed=self.settled)
            return self._watch


class _StatusWatch:
    """The status records of the apps something depends on, kept current by one watch of the
    ApplySet parents in gitopsd's namespace (gitopsd.daemon.reflector); each change of one
    calls `changed(app)`."""

    def __init__(self, kube: Kube, namespace: str, *, wanted: Callable[[], frozenset[str]],
                 changed: Callable[[str], None]) -> None:
        self._namespace, self._wanted, self._changed = namespace, wanted, changed
        self._seen: dict[str, dict | None] = {}
        self.alive = True
        prefix = parent_name("")
        self._reflector = Reflector(
            kube, kube.resource("v1", "ConfigMap"), namespace,
            selector=f"app.kubernetes.io/managed-by=gitopsd,{ID_LABEL}",
            bucket_of=lambda obj: _app_of(obj, prefix=prefix, namespace=namespace),
            sink=self, kind="dependency-status")
        # Started once assigned: its first list calls on_synced, which reads self._reflector (started in
        # the same expression, a quick list could get there first and end the watch with an AttributeError).
        self._reflector.start()

    def covers(self, app: str) -> bool:
        return self.alive and self._reflector.ready_for(app)

    def record(self, app: str) -> dict | None:
        parents = list(self._reflector.bucket(app).values())
        return status_mod.read_one(parents[0], namespace=self._namespace) if parents else None

    def relist(self) -> None:
        self._reflector.relist()

    def stop(self) -> None:
        self._reflector.stop()

    # the reflector's Sink
    def keeps(self, bucket: str) -> bool:
        return bucket in self._wanted()

    def wanted(self, taken: Callable[[frozenset[str]], None]) -> frozenset[str]:
        buckets = self._wanted()
        taken(buckets)
        return buckets

    def on_event(self, stream, kind: str, bucket: str, obj: dict) -> None:
        record = None if kind == "DELETED" else status_mod.read_one(obj, namespace=self._namespace)
        if self._seen.get(bucket) != record:   # an inventory write leaves the record as it was
            self._seen[bucket] = record
            self._changed(bucket)

    def on_synced(self, stream, buckets: frozenset[str]) -> None:
        for app in buckets:
            self._seen[app] = self.record(app)
            self._changed(app)

    def on_forbidden(self, stream) -> bool:
        log.warning("gitopsd may not watch ConfigMaps in its namespace: apps waiting for another replica's app "
                    f"read its status every {REMOTE_RECHECK:g}s instead", hint="grant list and watch on configmaps "
                    "(deploy/rbac.yaml)")
        self.alive = False
        return True


def _app_of(parent: dict, *, prefix: str, namespace: str) -> str | None:
    """The app whose ApplySet parent `parent` is (named `gitopsd-<app>`, with that name's ApplySet
    id), None for another ConfigMap (an audit segment `gitopsd-audit-...` is no app's parent)."""
    meta = parent.get("metadata") or {}
    name = meta.get("name") or ""
    if not name.startswith(prefix) or (meta.get("labels") or {}).get(ID_LABEL) != \
            applyset_id(name=name, namespace=namespace):
        return None
    return name[len(prefix):] or None


def local_readiness(runner: AppRunner) -> str | None:
    """Why the app of `runner` (run by this replica) is not ready, or None when it is."""
    if runner.cfg.suspend:
        return "suspended"
    with runner.lock:
        running, waiting = runner.running, runner.waiting
    if running:
        return "reconciling"
    if waiting:
        return "waiting for " + "; ".join(waiting)
    last = runner.last_result
    if last is None:
        return "not reconciled yet"
    result, health = runner.verdict()
    return _verdict_readiness(result, health, last.reason)


def record_readiness(record: dict | None) -> str | None:
    """Why the app whose stored status is `record` (gitopsd.daemon.status) is not ready, or None."""
    if record is None:
        return "no status recorded yet (its replica has not reconciled it)"
    if "error" in record:
        return f"its status is unreadable: {record['error']}"
    if record.get("suspended"):
        return "suspended"
    return _verdict_readiness(str(record.get("result")), str(record.get("health")), str(record.get("reason") or ""))


def _verdict_readiness(result: str, health: str, reason: str) -> str | None:
    if result in READY_RESULTS and health == "Healthy":
        return None
    if result == "Waiting":
        return reason
    state = result if result not in READY_RESULTS else health
    return f"{state}: {reason}" if reason else state


def names(waiting: Iterable[str]) -> list[str]:
    """The dependencies named in `blocking`'s lines."""
    return [line.partition(":")[0] for line in waiting]


def _cut(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON else flat[:MAX_REASON - 3] + "..."
