"""One app's runner: its one-at-a-time execution, desired state, self-heal and status.

A runner owns everything about one app: its view of the shared informers
(gitopsd.daemon.informers: the app's managed objects, from one watch per
kind for the whole process), its last desired state, its backoff, its status. The daemon
(gitopsd.daemon.core) creates one per app in the config and wakes it
(gitopsd.daemon.triggers).

A runner starts knowing nothing, whether the daemon just started, won the
lease, or a reload (re-)added its app: before its first reconcile it reads
the app's last applied revision back from the audit trail in the cluster, so
`previous` is right and, with self-heal off, hand edits are not reverted.

Execution model: a runner never runs two reconciles of its app at once. A
trigger that arrives while one runs is remembered and runs right after; a
webhook for a new commit also cancels a running health wait, so the new
commit deploys at once instead of after the old rollout times out. Runners
execute on the process's reconcile pool (gitopsd.budget.ReconcilePool): when
more runs are due than it has threads, a heal goes first, then a new commit,
then the polls, so a poll round of a fleet never delays a hand edit's revert.

Self-heal: the runner's informer view reports every change to a managed
object. A change that leaves the object "still ours" (gitopsd.engine.plan.still_ours:
our hash, our fields) is not drift — status updates by controllers, our own
applies, fields the app leaves to other managers (gitopsd.engine.ignore: an
HPA's replicas), which cost no dry-run either. Anything else is a small commit of the last applied revision
through the same pipeline as a push (gitopsd.engine.sync.heal): a partial
plan of the drifted objects, the staged apply through this run's fenced
writer, the health wait, a SyncResult (trigger "self-heal" in the metrics).
With self-heal off the same plan runs as a dry run. Either way a drift
record per object names it, the changed fields and the field managers that
changed them; a correction the apiserver refuses is a "failed" record with
the object and the reason; a drift record also suggests the ignore rule that
would allow that drift. A heal's health wait gives way to anything newer:
drift of other objects, or a new commit.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from gitopsd import audit, metrics, report
from gitopsd import config as config_mod
from gitopsd import log as log_mod
from gitopsd.budget import Lane
from gitopsd.daemon import dependencies
from gitopsd.daemon import status as status_mod
from gitopsd.daemon.dependencies import REMOTE_RECHECK
from gitopsd.daemon.desired import DesiredState
from gitopsd.daemon.feed import Event
from gitopsd.daemon.informers import AppView
from gitopsd.daemon.leader import FencedKube, LeadershipLost
from gitopsd.daemon.release import ReleaseControl, Request
from gitopsd.daemon.rollouts import RolloutControl
from gitopsd.engine import health as health_mod
from gitopsd.engine import inventory
from gitopsd.engine.inventory import applyset_id, parent_name
from gitopsd.engine.plan import Action, ObjectChange, member_targets, still_ours
from gitopsd.engine.source import Revision
from gitopsd.engine.sync import (
    AppSpec,
    Drift,
    Outcome,
    SyncResult,
    drift_of,
    heal,
    recheck_health,
    sync,
)
from gitopsd.errors import GitopsdError
from gitopsd.kube import KubeApiError
from gitopsd.objects import ObjectRef, ref_of

if TYPE_CHECKING:
    from gitopsd.daemon.core import Daemon

log = structlog.get_logger("gitopsd")

BACKOFF_START = 5.0
BACKOFF_MAX = 300.0


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""


class _NoRun:
    """The cancel event of a run that is not under way: nothing to cancel. One for every runner
    between runs, where each kept its own Event (~0.9 KiB; two a runner, 18 MiB at 10,000 apps);
    each run and each heal creates its own."""

    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return False


NO_RUN = _NoRun()
NOTHING: frozenset = frozenset()   # one empty set for every runner not healing (each `frozenset()` is new)


class AppRunner:
    """Everything about one app; see the module docstring."""

    def __init__(self, daemon: Daemon, cfg: config_mod.AppConfig) -> None:
        self.daemon = daemon
        self.cfg = cfg
        self.key = cfg.key                    # the target: `app`, or `app@cluster` (gitopsd.config.AppConfig.key)
        # The cluster it deploys to: its connection, informers and audit log (gitopsd.daemon.clusters).
        self.link = daemon.clusters.get(cfg.target_cluster)
        self.lock = threading.Lock()          # guards the fields below
        self.exec_lock = threading.Lock()     # held while a reconcile or heal runs
        self.running = False
        self.pending: str | None = None       # trigger to run after the current one
        self.cancel: threading.Event | _NoRun = NO_RUN   # cancels the running health wait (a new one per run)
        self.current_sha: str | None = None   # revision of the running reconcile
        self.failures = 0
        # Registered before the first reconcile of any app, so the first list of
        # each kind covers every app of the config at once.
        self.cache: AppView = self.link.informers.view(
            app_id=applyset_id(name=parent_name(cfg.name), namespace=daemon.namespace), on_event=self.on_event)
        self.inv = None                       # the ApplySet parent as we last wrote/read it
        self.desired = DesiredState()
        self.desired_revision: Revision | None = None   # the commit `desired` was planned from
        self.release = ReleaseControl(cfg.name)          # held, rolled back, quarantined (gitopsd.daemon.release)
        self.rollouts = RolloutControl(cfg.key, live=self._live,   # canaries in progress (gitopsd.daemon.rollouts)
                                       prometheus_url=daemon.prometheus_url)
        self.spec: AppSpec | None = None                 # what the last reconcile ran with (a heal reuses it)
        self.heal_cancel: threading.Event | _NoRun = NO_RUN   # cancels a running heal's health wait
        self.healing: frozenset[ObjectRef] = NOTHING     # what the running heal corrects
        self.dirty: set[ObjectRef] = set()    # drift candidates seen during a run
        self.last_applied: str | None = None  # sha last written to the cluster
        self.restored = False                 # last_applied read back from the cluster (see _restore)
        self.last_result: SyncResult | None = None
        self.last_drift: dict | None = None
        self.reported: dict[ObjectRef, tuple] = {}   # drift already reported (self-heal off)
        self.waiting: tuple[str, ...] = ()    # dependsOn not ready: `dep: why` each (gitopsd.daemon.dependencies)
        self.status_written: dict | None = None
        self.stopped = False
        # The running reconcile's or heal's Kube, fenced to the leadership term it
        # began in: every write of the run goes through it (Daemon.writer).
        self.writer: FencedKube | None = None

    # ------------------------------------------------------------ triggers

    def trigger(self, reason: str, *, sha: str | None = None) -> None:
        """Ask for a reconcile. Never blocks; coalesces with one already queued."""
        with self.lock:
            if self.stopped:
                return
            if reason in ("webhook", "watch", "config"):
                self.heal_cancel.set()   # a heal waiting on health gives way to a new commit
            if self.running:
                if self.pending is None or reason != "poll":
                    self.pending = reason
                # A newer commit than the one being deployed: stop waiting on the old
                # rollout. Before the fetch (current_sha None) the run will see it anyway.
                if reason in ("webhook", "watch", "config") and self.current_sha is not None \
                        and (sha is None or sha != self.current_sha):
                    self.cancel.set()
                return
            self.running = True
            self.pending = None
        self.daemon.pool.submit(self._loop, reason, lane=Lane.of(reason))

    def _loop(self, reason: str) -> None:
        while True:
            with self.lock:
                self.cancel = threading.Event()
                self.current_sha = None
                if self.stopped:
                    self.cancel.set()
            try:
                with self.exec_lock, log_mod.scope(app=self.cfg.name, trigger=reason, **self.link.log_fields):
                    self._reconcile(reason)
            except LeadershipLost as exc:
                self._fenced(exc)
            except Exception:  # noqa: BLE001 - a bug must not kill the runner
                log.exception("reconcile crashed", app=self.cfg.name)
            with self.lock:
                if self.pending is None or self.stopped:
                    self.running = False
                    self.cancel = NO_RUN
                    dirty = bool(self.dirty)
                    break
                reason, self.pending = self.pending, None
        self.daemon.dependencies.settled(self.key)   # the apps waiting for this one judge again
        if dirty:
            self.daemon.pool.submit(self._heal_dirty, lane=Lane.HEAL)

    # ------------------------------------------------------------ reconcile

    def _fenced(self, exc: LeadershipLost) -> None:
        """A run stopped by the fence: one line; the new leader records and converges."""
        log.warning(str(exc), app=self.cfg.name, unsent=exc.unsent)

    def _reconcile(self, trigger: str) -> None:
        cfg = self.cfg
        writer = None if cfg.suspend else self.daemon.writer(self.key, kube=self.link.kube)
        if writer is None:
            return
        self.writer = writer
        if (blocked := self.link.blocked()) is not None:
            self._cluster_blocked(trigger, blocked)
            return
        if not self.link.home:
            try:
                self.daemon.clusters.ensure_namespace(self.link)
            except GitopsdError as exc:
                self._record_failure(trigger, f"cannot create gitopsd's namespace in cluster {self.link.name}: {exc}")
                return
        if not self.restored:
            try:
                self._restore()
            except GitopsdError as exc:
                self._record_failure(trigger, f"cannot read the last applied revision of app {cfg.name} from "
                                              f"its audit trail: {exc}")
                return
        if self._waits(cfg):
            return
        try:
            spec = cfg.to_spec(inventory_namespace=self.daemon.namespace,
                               credentials=self.daemon.credentials.resolve(cfg),
                               decryption_keys=self.daemon.credentials.decryption_keys(cfg),
                               trusted_keys=self.daemon.credentials.trusted_keys(cfg))
        except GitopsdError as exc:
            self._record_failure(trigger, str(exc))
            return
        self._take_request()
        hold = self.last_applied if not cfg.self_heal else None
        started = time.monotonic()
        def fetched(rev) -> None:
            log_mod.bind(revision=rev.sha[:12])   # on every line of this run from here on
            with self.lock:
                self.current_sha = rev.sha
            if rev.sha != self.last_applied:
                self._publish("revision", revision=rev)   # a transition begins (a commit status: pending)

        result = sync(writer, spec, cache_dir=self.daemon.cache_dir, cancel=self.cancel,
                      cache=self.cache, inv=self.inv, hold_revision=hold, on_revision=fetched,
                      on_progress=self._stop_after_stage, fetches=self.daemon.fetches,
                      renders=self.daemon.renders, pick=self.release.pick, verify=self.release.rolling_back,
                      shape=self.rollouts.shape)
        writer.check()   # lost during the health wait: the verdict is the new leader's to record
        previous = self.last_applied
        with self.lock:
            stopped = self.stopped
        if stopped:
            # Removed from the config (or shutting down) meanwhile: start nothing new
            # for it, but what this run wrote is history, and the trail is where a
            # re-added app or the next leader reads its last revision from. No metric:
            # the app's series went with it (metrics.forget_app).
            if result.applied or result.pruned:
                self._record(audit.transition_record(result, trigger=trigger, previous=previous,
                                                     instance=self.daemon.instance),
                             plan=result.plan)
            return
        metrics.RECONCILE_DURATION.observe(app=self.key, value=time.monotonic() - started)
        metrics.RECONCILE_RESULTS.inc(app=self.key, trigger=trigger, outcome=result.outcome.value)
        plan = result.plan
        if plan is not None and not plan.errors:
            self.inv = plan.inventory
        if plan is not None and not plan.errors and result.outcome != Outcome.REFUSED:
            # What drift is judged against and self-heal puts back: the commit as planned
            # for the cluster (not one the prune guard refused, of which nothing was written).
            before, self.desired = self.desired, DesiredState.of(plan.changes, before=self.desired)
            self.spec, self.desired_revision = spec, result.revision
        else:
            before = self.desired
        if plan is not None and not plan.errors:
            self._watch(plan, live=result.outcome in (Outcome.APPLIED, Outcome.UNHEALTHY, Outcome.NO_CHANGE),
                        before=before)
        if result.outcome in (Outcome.APPLIED, Outcome.UNHEALTHY, Outcome.NO_CHANGE) and result.revision:
            self.last_applied = result.revision.sha
            metrics.LAST_APPLIED.set(app=self.key, value=result.revision.sha)   # the previous one's series goes
        if result.outcome == Outcome.DRY_RUN and plan is not None:
            drifted = {c.ref for c in plan.changes if c.action in (Action.CREATE, Action.UPDATE, Action.RECREATE)}
            for ref in set(self.reported) - drifted:
                del self.reported[ref]   # back in sync (reverted by hand or by a commit)
            for change in plan.changes:
                if change.ref in drifted:
                    self._report_drift(drift_of(change), action="reported", revision=self.last_applied)
        elif result.outcome in (Outcome.APPLIED, Outcome.NO_CHANGE):
            self.reported.clear()

        if result.outcome == Outcome.FAILED:
            self._schedule_retry()
        else:
            self.failures = 0

        prev = self.last_result
        if (result.outcome == Outcome.NO_CHANGE and prev is not None and prev.outcome == Outcome.UNHEALTHY
                and prev.revision and result.revision and prev.revision.sha == result.revision.sha):
            # The verdict stands until the rollout recovers: look once more at what was not healthy.
            refs = [h.ref for h in prev.health if h.status.value != "Current"]
            try:
                rechecked = recheck_health(self.link.kube, refs, app=cfg, live=self.cache) if refs else []
            except GitopsdError:
                rechecked = []
            if rechecked and health_mod.summarize(rechecked)[0]:
                result.health = rechecked
                result.reason = "the rollout has become healthy"
        # A health wait cut short (a newer commit, shutdown) is no verdict on the commit.
        cancelled = self.cancel.is_set()
        next_step, aborted, rollout = self.rollouts.after(result, cancelled=cancelled)
        # A failed canary step rolls back whatever the app's setting: abort is part of the strategy.
        release = self.release.after(result, auto=(cfg.rollback_on_unhealthy or aborted) and not cancelled,
                                     last_healthy=self._last_healthy)
        if release.roll_back:
            metrics.RELEASE_DECISIONS.inc(app=self.key, action="rollback", by="gitopsd")
            self._write_status()   # the decision first: a replica taking over mid-way finishes the rollback
        transition = self._is_transition(result) or release.release is not None
        if transition:
            self.last_result = _verdict(result)
            self._record(audit.transition_record(result, trigger=trigger, previous=previous,
                                                 instance=self.daemon.instance, outcome=release.result,
                                                 release=release.release, rollout=rollout),
                         plan=result.plan)
        else:
            log.debug("reconciled: no change", app=cfg.name, revision=(result.revision.sha[:12]
                                                                        if result.revision else None))
        if release.held is not None:
            held = SyncResult(app=cfg.name, outcome=Outcome.NO_CHANGE, revision=release.held,
                              reason=f"not applied: the app is held at {self.release.state.revision[:12]}")
            self._record(audit.transition_record(held, trigger=trigger, previous=self.last_applied,
                                                 instance=self.daemon.instance, outcome=audit.HELD,
                                                 release=self.release.state.record()))
        self._write_status()
        if release.roll_back:
            self.trigger("rollback")   # runs next, on this thread (the pending trigger)
        elif next_step is not None:
            self.daemon.schedule.once(self, next_step, "rollout")   # the canary's next step, after its pause

    # ------------------------------------------------------------ dependsOn (gitopsd.daemon.dependencies)

    def _waits(self, cfg: config_mod.AppConfig) -> bool:
        """Whether a dependency is not ready: then the run ends here, having written only the
        app's status (RESULT Waiting, the reason naming each dependency). The dependency's own
        runs (or, another replica's, changes of its status record) wake this app again; one
        that nothing watches is looked at again shortly."""
        if not cfg.depends_on and not self.waiting:
            return False
        deps = self.daemon.dependencies
        ended = deps.ends(cfg.dependency_keys())
        waiting, poll = deps.blocking(cfg)   # none left (a reload dropped them): go
        with self.lock:
            changed, self.waiting = tuple(waiting) != self.waiting, tuple(waiting)
        if not waiting:
            if changed:
                log.info("dependencies ready", app=cfg.name, depends_on=list(cfg.depends_on))
            return False
        if changed:
            log.info("waiting for dependencies", app=cfg.name, waiting_for=waiting)
        self._write_status()
        if deps.ends(cfg.dependency_keys()) != ended:
            self.trigger("dependency")   # one ended while this run judged, perhaps before it waited: again
        elif poll:
            self.daemon.schedule.once(self, REMOTE_RECHECK, "dependency")
        return True

    # ------------------------------------------------------------ release control (gitopsd.daemon.release)

    def request(self, request: Request) -> None:
        """A release request for this app arrived (the request watch): act on it in a run."""
        if self.release.requested(request):
            self.trigger("release")

    def _take_request(self) -> None:
        taken, refused = self.release.take(live=self.last_applied, last_healthy=self._last_healthy)
        if taken is None:
            return
        metrics.RELEASE_DECISIONS.inc(app=self.key, action=taken.action if refused is None else "refused",
                                      by="cli" if taken.by.startswith("cli/") else "other")
        if refused is not None:
            log.warning("release request refused", app=self.cfg.name, error=refused.message, hint=refused.hint)
        self._write_status()   # before anything of it is applied
        self._record(audit.release_record(app=self.cfg.name, request=taken.as_record(),
                                          state=self.release.state.record(), instance=self.daemon.instance,
                                          error=refused and str(refused)))

    def _live(self, ref: ObjectRef) -> dict | None:
        """The live object from the informers when they cover it, else from the apiserver."""
        seen = self.cache.read(ref, after=None)
        if seen.covered and seen.fresh:
            return seen.obj
        kube = self.link.kube
        return kube.get(kube.resource_for_group_kind(ref.group, ref.kind), ref.name, ref.namespace or None)

    def _last_healthy(self, besides: set[str]) -> str | None:
        try:
            return audit.last_healthy(self.link.kube, namespace=self.daemon.namespace, app=self.cfg.name,
                                      besides=besides)
        except GitopsdError as exc:
            log.warning("cannot read the audit trail for a healthy revision", app=self.cfg.name, error=str(exc))
            return None

    def _is_transition(self, result: SyncResult) -> bool:
        """Whether this reconcile is worth an audit record and a status write.

        Steady state is not: a NoChange of the same commit after a success (or
        after an Unhealthy of the same commit, whose verdict stands until a new
        rollout), or the same failure again on retry — else an outage of a day
        writes thousands of identical records and retention pushes out the
        history that matters. Whatever triggered it: a webhook replayed fifty
        times is fifty reconciles in gitopsd_reconcile_total{trigger="webhook",
        outcome="NoChange"}, not fifty records. A new commit is always one.
        """
        prev = self.last_result
        if prev is None:
            return True
        sha = result.revision.sha if result.revision else None
        prev_sha = prev.revision.sha if prev.revision else None
        if result.outcome in (Outcome.NO_CHANGE, Outcome.DRY_RUN):
            if sha != prev_sha:
                return True   # a commit that changed nothing live still moved the revision
            if prev.outcome == Outcome.UNHEALTHY:
                return bool(result.health)   # only once the rollout has recovered
            return prev.outcome not in (Outcome.APPLIED, Outcome.NO_CHANGE, result.outcome)
        if result.outcome in (Outcome.FAILED, Outcome.REFUSED):
            return not (prev.outcome == result.outcome and prev.reason == result.reason and prev_sha == sha)
        return True

    def _restore(self) -> None:
        """Read back what the cluster remembers of the app: its last applied revision (from its
        audit trail), its inventory and its chain head (from its ApplySet parent).

        The trail, not this process, is the memory: another replica may have
        led meanwhile, and a removed app's runner is gone with its state.
        Raises GitopsdError when the trail cannot be read; the reconcile then
        fails and retries rather than run without it (self-heal off would
        apply over hand edits).

        One read of the parent and one list of the segments serve all three
        (a new app: two requests), where the plan, the last revision and the
        audit log's head each read them for themselves before. A ConfigMap of
        the parent's name that is not the app's is left for the plan to
        refuse, with the error it gives.
        """
        kube, namespace, app = self.link.kube, self.daemon.namespace, self.cfg.name
        parent = kube.get(kube.resource("v1", "ConfigMap"), parent_name(app), namespace)
        segments = audit.list_segments(kube, namespace=namespace, app=app)
        self.last_applied = audit.last_revision(kube, namespace=namespace, app=app, segments=segments)
        try:
            self.inv = inventory.from_parent(parent, app=app, namespace=namespace)
        except KubeApiError:
            self.inv = None
        self.link.audit.prime(app, parent=parent, segments=segments)
        self.release.restore(status_mod.of_parent(parent))
        if (request := self.daemon.release_request(self.key)) is not None:
            self.release.requested(request)   # made while no replica ran the app: taken in this run
        self.restored = True

    def _stop_after_stage(self, _verb: str, _change: ObjectChange) -> None:
        """After every write of a reconcile or heal: a daemon shutting down ends the apply
        with the stage in flight (no later stage, no prune); the next leader goes on."""
        if self.daemon.stopping:
            raise GitopsdError("gitopsd is shutting down: the apply stopped after a stage; "
                               "the next leader continues")

    def _cluster_blocked(self, trigger: str, reason: str) -> None:
        """The cluster cannot be reached (or its kubeconfig used): nothing is sent to it. Not a
        transition of the cluster, so no audit record (it would have to be stored there): the status,
        a metric and one log line per new reason; retried with backoff, and woken when it is back."""
        metrics.RECONCILE_RESULTS.inc(app=self.key, trigger=trigger, outcome="Failed")
        result = SyncResult(app=self.cfg.name, outcome=Outcome.FAILED, reason=reason, errors=[reason])
        if self._is_transition(result):
            log.warning("target not reconciled", app=self.cfg.name, cluster=self.link.name, reason=reason)
            self.last_result = _verdict(result)
        self._schedule_retry()

    def _record_failure(self, trigger: str, reason: str) -> None:
        result = SyncResult(app=self.cfg.name, outcome=Outcome.FAILED, reason=reason, errors=[reason])
        metrics.RECONCILE_RESULTS.inc(app=self.key, trigger=trigger, outcome="Failed")
        self._schedule_retry()
        if not self._is_transition(result):
            self._write_status()   # the same failure again: only what else changed (no longer waiting)
            return
        self.last_result = _verdict(result)
        self._record(audit.transition_record(result, trigger=trigger, previous=self.last_applied,
                                             instance=self.daemon.instance, source=self.cfg.repo, ref=self.cfg.ref))
        self._write_status()

    def _record(self, rec: dict, *, plan=None) -> None:
        """Store an audit record of this run, if this replica may still write in the run's term.

        The writer refuses every request of the record anyway; checking first
        keeps a lost leader from leaving the record in the audit log's
        backlog, to be stored later as if it were history.
        """
        self.writer.check()
        # The transition's diff text, for the web view only (its memory; records keep field paths).
        diff = report.transition_diff(plan) if plan is not None and self.daemon.views is not None else None
        self._publish("record", record=self.link.audit.record(rec), diff=diff)

    def _publish(self, kind: str, **what) -> None:
        self.daemon.feed.publish(Event(kind=kind, target=self.key, cfg=self.cfg, **what))

    def _schedule_retry(self) -> None:
        self.failures += 1
        # Never later than the regular poll would come anyway.
        delay = min(BACKOFF_START * 2 ** (self.failures - 1), BACKOFF_MAX, self.cfg.interval)
        self.daemon.schedule.once(self, delay, "retry")

    # ------------------------------------------------------------ self-heal

    def _watch(self, plan, *, live: bool, before: DesiredState) -> None:
        """Need exactly the kinds and namespaces the next plan will search (the shared informers
        start a kind's watch for its first app and stop it after its last): those of this plan's
        objects and of the parent as this run left it, so that the next poll reads from memory too.

        When the run left every desired object live (`live`), what the synced informers
        hold now is judged once against the new desired state: the watch ran during the
        run (the plan asked it to), but on_event judged its events against the old desired
        state, or — for an object new in this commit — ignored them. So an object absent,
        and the watch past the version the run saw, was deleted since: it is reported as
        DELETED; one at least as new as what the run wrote but no longer ours was edited
        since: MODIFIED. What the watch has not caught up with yet arrives as an event.
        Only objects whose desired state this run changed (`before`: the one it replaced)
        are judged again: for the others the old judgement was the new one.
        """
        try:
            targets = member_targets(self.link.kube, plan.inventory, plan.changes)
        except GitopsdError:
            targets = plan.targets   # discovery failed: what this plan searched
        self.cache.ensure(set(targets))
        if not live:
            return
        desired = self.desired
        written = {c.ref: c.live for c in plan.changes}   # each object as this run wrote (or read) it
        for ref in desired.changed_since(before):
            seen = self.cache.read(ref, after=written.get(ref))
            if not (seen.covered and seen.fresh):
                continue
            if seen.obj is None:
                self.on_event("DELETED", desired.get(ref))
            elif not still_ours(seen.obj, desired.get(ref), ignore=self.cfg.ignore):
                self.on_event("MODIFIED", seen.obj)

    def on_event(self, kind: str, obj: dict) -> None:
        """From the watch threads: decide cheaply whether this can be drift."""
        if self.stopped:
            return
        ref = ref_of(obj)
        desired = self.desired   # replaced whole by a reconcile meanwhile: read one of them
        if ref not in desired or not self.daemon.may_start(self.key):
            return
        if kind != "DELETED" and still_ours(obj, desired.get(ref), ignore=self.cfg.ignore):
            return
        with self.lock:
            self.dirty.add(ref)
            busy = self.running
        if not busy:
            self.daemon.pool.submit(self._heal_dirty, lane=Lane.HEAL)

    def _heal_dirty(self) -> None:
        """Heal what the watch found drifted since the last heal: one small commit."""
        with self.lock:
            if self.dirty - self.healing:
                # Drift of other objects: a heal still waiting on health gives way. Events of
                # the objects it just corrected (their controllers at work) do not count.
                self.heal_cancel.set()
        with self.exec_lock:
            with self.lock:
                refs, self.dirty = self.dirty, set()
                self.heal_cancel = cancel = threading.Event()
            try:
                self._heal_if_drifted(refs, cancel=cancel)
            finally:
                with self.lock:
                    self.healing = NOTHING
                    self.heal_cancel = NO_RUN

    def _heal_if_drifted(self, refs: set[ObjectRef], *, cancel: threading.Event) -> None:
        """Heal those of `refs` still drifted, if this replica may write now (exec_lock held)."""
        refs = {ref for ref in refs if ref in self.desired and not self._settled(ref)}
        if not refs or self.stopped or self.cfg.suspend or self.spec is None or self.inv is None:
            return
        if self.link.blocked() is not None:
            return   # the probe wakes the runner when the cluster is back; the reconcile heals then
        writer = self.daemon.writer(self.key, kube=self.link.kube)
        if writer is None:
            return
        self.writer = writer
        try:
            with self.lock:
                self.healing = frozenset(refs)
            with log_mod.scope(app=self.cfg.name, trigger="self-heal", **self.link.log_fields):
                self._heal(refs, cancel=cancel)
        except LeadershipLost as exc:
            self._fenced(exc)   # exc.unsent: the corrections not sent, as for a reconcile

    def _settled(self, ref: ObjectRef) -> bool:
        """Whether the cache shows `ref` as ours again: the event was our own reconcile's
        apply, seen before that reconcile set the new desired state. Not drift; no heal."""
        members = self.cache.members() if self.cache is not None else None
        live = (members or {}).get(ref)
        return live is not None and still_ours(live, self.desired.get(ref), ignore=self.cfg.ignore)

    def _heal(self, refs: set[ObjectRef], *, cancel: threading.Event) -> None:
        manifests = self.desired.manifests()
        result = heal(self.writer, self.spec, manifests=manifests, refs=refs, revision=self.desired_revision,
                      inv=self.inv, cache=self.cache, dry_run=not self.cfg.self_heal, cancel=cancel,
                      on_progress=self._stop_after_stage)
        self.writer.check()   # lost meanwhile: the new leader sees the drift and records it
        metrics.RECONCILE_RESULTS.inc(app=self.key, trigger="self-heal", outcome=result.outcome.value)
        if result.plan is not None and result.plan.waiting:
            log.debug("self-heal waits for deletions to finish", app=self.cfg.name,
                      objects=[str(r) for r in result.plan.waiting])
        if result.outcome in (Outcome.NO_CHANGE, Outcome.DRY_RUN):
            # Back in sync (a field gitopsd does not own, an edit undone by hand): a later
            # drift of these objects is news again.
            for ref in refs - {d.ref for d in result.drift}:
                self.reported.pop(ref, None)
        failed = result.outcome == Outcome.FAILED
        if result.drift and result.outcome != Outcome.DRY_RUN or failed:
            (log.info if result.ok else log.warning)(
                "self-heal", app=self.cfg.name, outcome=result.outcome.value, reason=result.reason,
                revision=result.revision.sha if result.revision else None,
                applied=[f"{c.action.value} {c.ref}" for c in result.applied],
                duration_seconds=round(result.duration, 3))
        if failed and not (result.plan and result.plan.errors):
            # Not the objects but the way to the apiserver failed (unreachable, a result
            # unknown): a reconcile retries soon, rather than leave the drift until the poll.
            self._schedule_retry()
        self._report_heal(result)

    def _report_heal(self, result: SyncResult) -> None:
        """One drift record per object that differed: corrected, reported (dry run) or failed."""
        applied = {c.ref for c in result.applied}
        revision = result.revision.sha if result.revision else self.last_applied
        for drift in result.drift:
            if result.outcome == Outcome.DRY_RUN:
                self._report_drift(drift, action="reported", revision=revision)
            elif drift.ref in applied:
                self._report_drift(drift, action="corrected", revision=revision)
            else:
                self._report_drift(drift, action="failed", revision=revision, error=_error_of(drift, result))
        if result.drift:
            self._write_status()

    def _report_drift(self, drift: Drift, *, action: str, revision: str | None, error: str | None = None) -> None:
        if action == "reported":
            # With self-heal off the same drift is seen at every poll: report it
            # once, again only when it changes.
            key = (drift.fields, drift.deleted)
            if self.reported.get(drift.ref) == key:
                return
            self.reported[drift.ref] = key
        metrics.DRIFT_DETECTED.inc(app=self.key)
        if action == "corrected":
            metrics.DRIFT_CORRECTED.inc(app=self.key)
        log.warning("drift " + ("corrected" if action == "corrected" else "detected"), app=self.cfg.name,
                    object=str(drift.ref), deleted=drift.deleted, fields=list(drift.fields),
                    managers=list(drift.managers), action=action, error=error, suggestion=drift.suggestion)
        self.last_drift = {"time": _iso(_now()), "object": str(drift.ref), "fields": list(drift.fields),
                           "managers": list(drift.managers), "action": action}
        self._record(audit.drift_record(
            app=self.cfg.name, ref=drift.ref, fields=drift.fields, managers=drift.managers, action=action,
            revision=revision, instance=self.daemon.instance, deleted=drift.deleted, error=error,
            suggestion=drift.suggestion))

    # ------------------------------------------------------------ status

    def verdict(self) -> tuple[str, str]:
        """The result and health of the last transition: ("Pending", "Unknown") before the first;
        the result is "Waiting" while a dependency is not ready (the health stays the last one's)."""
        r = self.last_result
        unhealthy = any(h.status.value != "Current" for h in (r.health if r else []))
        health = ("Healthy" if r and not unhealthy and r.outcome != Outcome.FAILED else
                  ("Unhealthy" if unhealthy else "Unknown"))
        if not self.link.reachable:
            return "ClusterUnreachable", health
        return ("Waiting" if self.waiting else r.outcome.value if r else "Pending"), health

    def status(self) -> dict:
        r = self.last_result
        result, health = self.verdict()
        waiting = self.waiting
        return {
            "app": self.cfg.name,
            "cluster": self.link.name,
            "revision": self.last_applied or "",
            "ref": self.cfg.ref,
            "result": result,
            "reason": ("waiting for " + "; ".join(waiting)) if waiting else r.reason if r else "",
            **({"waitingFor": dependencies.names(waiting)} if waiting else {}),
            "health": health,
            "lastTransition": _iso(r.started) if r else "",
            "lastDrift": self.last_drift,
            "interval": self.cfg.interval,
            "suspended": self.cfg.suspend,
            **({"release": release} if (release := self.release.state.to_status()) else {}),
            **({"rollout": rollout} if (rollout := self.rollouts.status()) else {}),
        }

    def _write_status(self) -> None:
        current = self.status()
        if current != self.status_written:
            self._publish("status")
        if current == self.status_written or self.link.blocked() is not None:
            return  # steady state: nothing a reader would see has changed (or nowhere to write it now)
        try:
            status_mod.write(self.writer, app=self.cfg.name, namespace=self.daemon.namespace, status=current)
            self.status_written = current
        except (GitopsdError, OSError) as exc:
            log.warning("cannot store app status", app=self.cfg.name, error=str(exc))

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.cancel.set()
            self.heal_cancel.set()
        self.cache.stop()


def _verdict(result: SyncResult) -> SyncResult:
    """What a runner keeps of its last transition: the verdict (outcome, reason, revision,
    health, start) that status, retries and the next run's transition test read — not the
    plan, the changes applied or pruned and the drift, which hold every live and desired
    object of the app (~30 KiB an app; a thousand apps: 30 MiB) and are in its audit record.
    Of the health, the objects not Current: what status and the recheck of an Unhealthy
    verdict read (all Current: Healthy); a healthy app keeps none."""
    return dataclasses.replace(result, plan=None, applied=[], pruned=[], drift=[],
                               health=[h for h in result.health if h.status.value != "Current"])


def _error_of(drift: Drift, result: SyncResult) -> str:
    """Why the heal did not correct this object: its own error line (the plan and
    the apply name file and object first), else the heal's reason (an earlier
    stage failed, the daemon stopped)."""
    prefix = f"{drift.source}: {drift.ref}:"
    return next((e for e in result.errors if e.startswith(prefix)), result.reason)
