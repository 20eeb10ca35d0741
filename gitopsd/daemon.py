"""`gitopsd run`: keep many apps converged.

The daemon orchestrates; the stages do the work (gitopsd.sync). Per app an
AppRunner owns everything about that app: its schedule, its one-at-a-time
execution, its watch cache of managed objects, its last desired state, its
backoff, its status. The daemon wires the runners to the outside world:

- apscheduler: one interval job per app (with jitter) that asks its runner to
  reconcile; failures retry with exponential backoff, reset on success;
- the HTTP server: push webhooks (-> runners whose repo and branch match),
  /healthz, /readyz, /metrics, /status;
- watchfiles: the config file (hot reload; an invalid edit is rejected and the
  previous config keeps running — a missing, unreadable or empty file is an
  invalid edit, never "no apps": that takes an explicit `apps: []`) and, in
  development, local repositories;
- a Lease (leader election): only the leader reconciles, and every write it
  sends is fenced (gitopsd.leader): a reconcile or self-heal runs within the
  leadership term it began in and writes through a Kube that refuses each
  write once this replica cannot prove that term still holds the lease. Such
  a run ends quietly ("leadership lost mid-reconcile; N writes not sent"),
  records nothing and leaves what it wrote: the new leader records and
  converges;
- SIGTERM: stop taking work, let running reconciles finish (their health
  waits are cancelled), release the lease.

A runner starts knowing nothing, whether the daemon just started, won the
lease, or a reload (re-)added its app: before its first reconcile it reads
the app's last applied revision back from the audit trail in the cluster, so
`previous` is right and, with self-heal off, hand edits are not reverted.

Execution model: a runner never runs two reconciles of its app at once. A
trigger that arrives while one runs is remembered and runs right after; a
webhook for a new commit also cancels a running health wait, so the new
commit deploys at once instead of after the old rollout times out. Runners
execute on a shared thread pool sized so that every app can run at the same
time: a slow or failing app never delays the others.

Self-heal: the runner's watch cache reports every change to a managed
object. A change that leaves the object "still ours" (gitopsd.plan.still_ours:
our hash, our fields) is not drift — status updates by controllers, our own
applies. Anything else is re-planned for that object alone and, with
self-heal on, corrected at once; either way a drift report names the object,
the changed fields and the field managers that changed them.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from gitopsd import __version__, audit, config as config_mod, metrics, redact, source, status as status_mod
from gitopsd.diff import managers_of, within
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube, KubeApiError
from gitopsd.leader import FencedKube, LeaderElector, LeadershipLost
from gitopsd.objects import ObjectRef, ref_of
from gitopsd.plan import Action, ObjectChange, judge_one, still_ours
from gitopsd.server import Server
from gitopsd import health as health_mod
from gitopsd.sync import Outcome, SyncResult, default_cache_dir, recheck_health, sync
from gitopsd.watch import MemberCache
from gitopsd.webhook import PushEvent, matches, normalize_repo_url

log = structlog.get_logger("gitopsd")

BACKOFF_START = 5.0
BACKOFF_MAX = 300.0
SHUTDOWN_GRACE = 25.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""


class AppRunner:
    """Everything about one app; see the module docstring."""

    def __init__(self, daemon: "Daemon", cfg: config_mod.AppConfig) -> None:
        self.daemon = daemon
        self.cfg = cfg
        self.lock = threading.Lock()          # guards the fields below
        self.exec_lock = threading.Lock()     # held while a reconcile or heal runs
        self.running = False
        self.pending: str | None = None       # trigger to run after the current one
        self.cancel = threading.Event()       # cancels the running health wait
        self.current_sha: str | None = None   # revision of the running reconcile
        self.failures = 0
        self.cache: MemberCache | None = None
        self.inv = None                       # the ApplySet parent as we last wrote/read it
        self.desired: dict[ObjectRef, ObjectChange] = {}
        self.dirty: set[ObjectRef] = set()    # drift candidates seen during a run
        self.last_applied: str | None = None  # sha last written to the cluster
        self.restored = False                 # last_applied read back from the cluster (see _restore)
        self.last_result: SyncResult | None = None
        self.last_drift: dict | None = None
        self.reported: dict[ObjectRef, tuple] = {}   # drift already reported (self-heal off)
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
        self.daemon.pool.submit(self._loop, reason)

    def _loop(self, reason: str) -> None:
        while True:
            with self.lock:
                self.cancel = threading.Event()
                self.current_sha = None
                if self.stopped:
                    self.cancel.set()
            try:
                with self.exec_lock:
                    self._reconcile(reason)
            except LeadershipLost as exc:
                self._fenced(exc)
            except Exception:  # noqa: BLE001 - a bug must not kill the runner
                log.exception("reconcile crashed", app=self.cfg.name)
            with self.lock:
                if self.pending is None or self.stopped:
                    self.running = False
                    dirty = bool(self.dirty)
                    break
                reason, self.pending = self.pending, None
        if dirty:
            self.daemon.pool.submit(self._heal_dirty)

    # ------------------------------------------------------------ reconcile

    def _fenced(self, exc: LeadershipLost) -> None:
        """A run stopped by the fence: one line; the new leader records and converges."""
        log.warning(str(exc), app=self.cfg.name, unsent=exc.unsent)

    def _reconcile(self, trigger: str) -> None:
        cfg = self.cfg
        writer = None if cfg.suspend else self.daemon.writer()
        if writer is None:
            return
        self.writer = writer
        if not self.restored:
            try:
                self._restore()
            except GitopsdError as exc:
                self._record_failure(trigger, f"cannot read the last applied revision of app {cfg.name} from "
                                              f"its audit trail: {exc}")
                return
        try:
            spec = cfg.to_spec(inventory_namespace=self.daemon.namespace,
                               credentials=self.daemon.credentials(cfg))
        except GitopsdError as exc:
            self._record_failure(trigger, str(exc))
            return
        hold = self.last_applied if not cfg.self_heal else None
        started = time.monotonic()
        def fetched(rev) -> None:
            with self.lock:
                self.current_sha = rev.sha

        def stop_after_stage(_verb, _change) -> None:
            # Called after every write: a daemon shutting down ends the apply with
            # the stage in flight (no later stage, no prune); the next leader goes on.
            if self.daemon.stopping:
                raise GitopsdError("gitopsd is shutting down: the apply stopped after a stage; "
                                   "the next leader continues")

        result = sync(writer, spec, cache_dir=self.daemon.cache_dir, cancel=self.cancel,
                      cache=self.cache, inv=self.inv, hold_revision=hold, on_revision=fetched,
                      on_progress=stop_after_stage)
        writer.check()   # lost during the health wait: the verdict is the new leader's to record
        metrics.RECONCILE_DURATION.labels(app=cfg.name).observe(time.monotonic() - started)
        metrics.RECONCILE_RESULTS.labels(app=cfg.name, trigger=trigger, outcome=result.outcome.value).inc()
        previous = self.last_applied
        with self.lock:
            stopped = self.stopped
        if stopped:
            # Removed from the config (or shutting down) meanwhile: start nothing new
            # for it, but what this run wrote is history, and the trail is where a
            # re-added app or the next leader reads its last revision from.
            if result.applied or result.pruned:
                self._record(audit.transition_record(result, trigger=trigger, previous=previous,
                                                     instance=self.daemon.instance))
            return
        plan = result.plan
        if plan is not None and not plan.errors:
            self.inv = plan.inventory
            self.desired = {c.ref: c for c in plan.changes if c.action != Action.PRUNE and c.desired}
            self._watch(plan.targets)
        if result.outcome in (Outcome.APPLIED, Outcome.UNHEALTHY, Outcome.NO_CHANGE) and result.revision:
            if previous and previous != result.revision.sha:
                try:
                    metrics.LAST_APPLIED.remove(cfg.name, previous)
                except KeyError:
                    pass
            self.last_applied = result.revision.sha
            metrics.LAST_APPLIED.labels(app=cfg.name, revision=result.revision.sha).set(1)
        if result.outcome == Outcome.DRY_RUN and plan is not None:
            drifted = {c.ref for c in plan.changes if c.action in (Action.CREATE, Action.UPDATE, Action.RECREATE)}
            for ref in set(self.reported) - drifted:
                del self.reported[ref]   # back in sync (reverted by hand or by a commit)
            for change in plan.changes:
                if change.ref in drifted:
                    self._report_drift(change, corrected=False)
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
                rechecked = recheck_health(self.daemon.kube, refs) if refs else []
            except GitopsdError:
                rechecked = []
            if rechecked and health_mod.summarize(rechecked)[0]:
                result.health = rechecked
                result.reason = "the rollout has become healthy"
        transition = self._is_transition(result)
        if transition:
            self.last_result = result
        if transition:
            self._record(audit.transition_record(result, trigger=trigger, previous=previous,
                                                 instance=self.daemon.instance))
        else:
            log.debug("reconciled: no change", app=cfg.name, revision=(result.revision.sha[:12]
                                                                        if result.revision else None))
        self._write_status()

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
        """Read the app's last applied revision back from its audit trail.

        The trail, not this process, is the memory: another replica may have
        led meanwhile, and a removed app's runner is gone with its state.
        Raises GitopsdError when the trail cannot be read; the reconcile then
        fails and retries rather than run without it (self-heal off would
        apply over hand edits).
        """
        self.last_applied = audit.last_revision(self.daemon.kube, namespace=self.daemon.namespace,
                                                app=self.cfg.name)
        self.restored = True

    def _record_failure(self, trigger: str, reason: str) -> None:
        result = SyncResult(app=self.cfg.name, outcome=Outcome.FAILED, reason=reason, errors=[reason])
        metrics.RECONCILE_RESULTS.labels(app=self.cfg.name, trigger=trigger, outcome="Failed").inc()
        self._schedule_retry()
        if not self._is_transition(result):
            return
        self.last_result = result
        self._record(audit.transition_record(result, trigger=trigger, previous=self.last_applied,
                                             instance=self.daemon.instance, source=self.cfg.repo, ref=self.cfg.ref))
        self._write_status()

    def _record(self, rec: dict) -> None:
        """Store an audit record of this run, if this replica may still write in the run's term.

        The writer refuses every request of the record anyway; checking first
        keeps a lost leader from leaving the record in the audit log's
        backlog, to be stored later as if it were history.
        """
        self.writer.check()
        self.daemon.audit.record(rec)

    def _schedule_retry(self) -> None:
        self.failures += 1
        # Never later than the regular poll would come anyway.
        delay = min(BACKOFF_START * 2 ** (self.failures - 1), BACKOFF_MAX, self.cfg.interval)
        self.daemon.schedule_once(self, delay, "retry")

    # ------------------------------------------------------------ self-heal

    def _watch(self, targets) -> None:
        if self.cache is None:
            self.cache = MemberCache(self.daemon.kube, selector=self.inv.selector, on_event=self.on_event)
        try:
            self.cache.ensure(set(targets))
        except (GitopsdError, OSError) as exc:
            log.warning("cannot watch managed objects", app=self.cfg.name, error=str(exc))

    def on_event(self, kind: str, obj: dict) -> None:
        """From the watch threads: decide cheaply whether this can be drift."""
        if self.stopped:
            return
        ref = ref_of(obj)
        change = self.desired.get(ref)
        if change is None or not self.daemon.may_start():
            return
        if kind != "DELETED" and still_ours(obj, change.desired):
            return
        with self.lock:
            self.dirty.add(ref)
            busy = self.running
        if not busy:
            self.daemon.pool.submit(self._heal_dirty)

    def _heal_dirty(self) -> None:
        with self.exec_lock:
            with self.lock:
                refs, self.dirty = self.dirty, set()
            writer = None if not refs or self.stopped or self.cfg.suspend else self.daemon.writer()
            if writer is None:
                return
            self.writer = writer
            members = self.cache.members() if self.cache else None
            todo = sorted(refs)
            for index, ref in enumerate(todo):
                desired = self.desired.get(ref)
                if desired is None:
                    continue
                live = (members or {}).get(ref)
                if live is not None and still_ours(live, desired.desired):
                    continue  # settled by our own reconcile in the meantime
                try:
                    self._heal_one(desired, live)
                except LeadershipLost as exc:
                    exc.unsent = len(todo) - index   # this correction and the ones after it
                    self._fenced(exc)
                    return

    def _heal_one(self, desired: ObjectChange, live: dict | None) -> None:
        try:
            # The cache may trail the controllers (a Deployment's revision
            # annotation moves right after a hand edit): compare the dry-run with
            # a fresh read, so the drift report names only what really differs.
            if desired.resource is not None:
                live = self.daemon.kube.get(desired.resource, desired.ref.name, desired.ref.namespace or None)
        except GitopsdError as exc:
            log.warning("cannot re-read a drifted object", app=self.cfg.name, object=str(desired.ref),
                        error=str(exc))
        if live is not None and still_ours(live, desired.desired):
            return
        change = ObjectChange(ref=desired.ref, action=Action.CREATE, source=desired.source,
                              desired=desired.desired, live=live, resource=desired.resource)
        try:
            errors = judge_one(self.daemon.kube, change, recreate=self.cfg.recreate)
        except GitopsdError as exc:
            errors = [str(exc)]
        if errors:
            self._report_drift(change, corrected=False, error="; ".join(errors))
            return
        if change.action == Action.UNCHANGED:
            return  # someone changed a field we do not own: not our business
        if not self.cfg.self_heal:
            self._report_drift(change, corrected=False)
            return
        try:
            self.writer.apply(change.desired)
            self._report_drift(change, corrected=True)
        except KubeApiError as exc:
            self._report_drift(change, corrected=False,
                               error=f"{exc.reason}: {redact.scrub_about(exc.api_message, change.desired)}")

    def _report_drift(self, change: ObjectChange, *, corrected: bool, error: str | None = None) -> None:
        deleted = change.live is None
        fields = [f for f in change.diff.fields if within(change.desired, f)] if change.diff and not deleted else []
        managers = managers_of(change.live, fields) if change.live else ["unknown (the object was deleted)"]
        action = "failed" if error else ("corrected" if corrected else "reported")
        if action == "reported":
            # With self-heal off the same drift is seen at every poll: report it
            # once, again only when it changes.
            key = (tuple(fields), deleted)
            if self.reported.get(change.ref) == key:
                return
            self.reported[change.ref] = key
        metrics.DRIFT_DETECTED.labels(app=self.cfg.name).inc()
        if corrected:
            metrics.DRIFT_CORRECTED.labels(app=self.cfg.name).inc()
        log.warning("drift " + ("corrected" if corrected else "detected"), app=self.cfg.name,
                    object=str(change.ref), deleted=deleted, fields=fields, managers=managers, action=action,
                    error=error)
        self.last_drift = {"time": _iso(_now()), "object": str(change.ref), "fields": fields,
                           "managers": managers, "action": action}
        self._record(audit.drift_record(
            app=self.cfg.name, ref=change.ref, fields=fields, managers=managers, action=action,
            revision=self.last_applied, instance=self.daemon.instance, deleted=deleted, error=error))
        self._write_status()

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        r = self.last_result
        unhealthy = [h for h in (r.health if r else []) if h.status.value != "Current"]
        return {
            "app": self.cfg.name,
            "revision": self.last_applied or "",
            "ref": self.cfg.ref,
            "result": r.outcome.value if r else "Pending",
            "reason": r.reason if r else "",
            "health": ("Healthy" if r and not unhealthy and r.outcome != Outcome.FAILED else
                       ("Unhealthy" if unhealthy else "Unknown")),
            "lastTransition": _iso(r.started) if r else "",
            "lastDrift": self.last_drift,
            "interval": self.cfg.interval,
            "suspended": self.cfg.suspend,
        }

    def _write_status(self) -> None:
        current = self.status()
        if current == self.status_written:
            return  # steady state: nothing a reader would see has changed
        try:
            status_mod.write(self.writer, app=self.cfg.name, namespace=self.daemon.namespace, status=current)
            self.status_written = current
        except (GitopsdError, OSError) as exc:
            log.warning("cannot store app status", app=self.cfg.name, error=str(exc))

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.cancel.set()
        if self.cache:
            self.cache.stop()


class Daemon:
    def __init__(self, *, kube: Kube, config_path: Path, namespace: str, http_host: str, http_port: int,
                 instance: str, leader_elect: bool = True, lease_duration: float = 15.0,
                 lease_renew: float = 5.0, watch_local: bool = True, cache_dir: Path | None = None,
                 advertise_url: str | None = None) -> None:
        self.kube = kube
        kube.user_agent = f"gitopsd/{__version__} ({instance})"   # names us in the apiserver's audit log
        self.config_path = config_path
        self.namespace = namespace
        self.instance = instance
        self.cache_dir = cache_dir or default_cache_dir()
        self.watch_local = watch_local
        self.config = config_mod.load(config_path)   # an invalid initial config is fatal
        try:
            self._config_digest = self._read_config()[0]
        except OSError:
            self._config_digest = ""   # gone since load: the watch will say so
        self.runners: dict[str, AppRunner] = {}
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="app")
        self.scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True,
                                                                                   "max_instances": 1})
        # Records are stored and announced only while this replica may write (Daemon.fence);
        # the runners check it before each record too, in the term their run began in.
        self.audit = audit.AuditLog(FencedKube(kube, self.fence), namespace=namespace, instance=instance)
        self._stop = threading.Event()
        self._leading = False            # set by _on_leading (at start when election is off)
        self._secret_dir = Path(tempfile.mkdtemp(prefix="gitopsd-credentials-"))
        self.elector = (LeaderElector(kube, namespace=namespace, identity=instance, lease_duration=lease_duration,
                                      renew_interval=lease_renew, on_started_leading=self._on_leading,
                                      on_stopped_leading=self._on_standby, advertise_url=advertise_url)
                        if leader_elect else None)
        self.server = Server(host=http_host, port=http_port, on_push=self.on_push,
                             webhook_secret=self.webhook_secret, ready=self.ready, status=self.status_json)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from gitopsd import inventory

        try:
            # Before leading, through the plain Kube like the Lease it is needed for.
            inventory.ensure_namespace(self.kube, self.namespace)
        except GitopsdError as exc:
            log.warning("cannot ensure gitopsd namespace", namespace=self.namespace, error=str(exc))
        self.server.start()
        self.scheduler.start()
        for cfg in self.config.apps:
            self._add(cfg)
        self._spawn(self._watch_config, "config-watch")
        if self.watch_local:
            self._spawn(self._watch_local_repos, "local-repo-watch")
        if self.elector:
            if not self.elector.advertise_url and self.server.host not in ("0.0.0.0", "::", ""):
                # A concrete listen address is reachable as is (0.0.0.0 says nothing).
                self.elector.advertise_url = f"http://{self.server.host}:{self.server.port}"
            self.elector.start()
        else:
            self._on_leading()
        log.info("gitopsd started", instance=self.instance, apps=[a.name for a in self.config.apps],
                 http=f"{self.server.host}:{self.server.port}", namespace=self.namespace,
                 leader_election=self.elector is not None)

    def run_forever(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        """Graceful: stop taking work, finish (or safely cut) running work, release the lease."""
        if self._stop.is_set():
            return
        log.info("shutting down", instance=self.instance)
        self._stop.set()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - already stopped
            pass
        runners = list(self.runners.values())
        for r in runners:
            r.stop()   # cancels health waits; an apply in progress finishes its stage
        deadline = time.monotonic() + SHUTDOWN_GRACE
        idle = True
        for r in runners:
            if r.exec_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                r.exec_lock.release()
            else:
                idle = False
        self._leading = False
        if self.elector:
            # Hand the lease over at once only when no work of ours is still
            # running; otherwise let it expire, so a standby cannot write beside us.
            self.elector.stop(release=idle)
        shutil.rmtree(self._secret_dir, ignore_errors=True)
        self.server.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", instance=self.instance)

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------ leadership

    def may_write(self, term: int | None = None) -> bool:
        """The fencing rule (gitopsd.leader): may this replica write now, in `term` if given?

        With leader election it is the elector's deadline; without, this
        process leads from start() until stop() has let running work end.
        """
        if self.elector is None:
            return self._leading
        return self.elector.may_write(term)

    def fence(self, term: int | None = None) -> None:
        """The one check before every write: raises LeadershipLost when may_write says no."""
        if not self.may_write(term):
            raise LeadershipLost()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def may_start(self) -> bool:
        """Whether new work (a reconcile, a self-heal) may begin."""
        return not self.stopping and self.may_write()

    def writer(self) -> FencedKube | None:
        """The Kube for one run of work, fenced to the current leadership term; None when no
        work may begin. A term that ends (even if this replica leads again at once) fences the
        run for good: it was planned under a lease another replica may have held since."""
        term = self.elector.term if self.elector else None
        if not self.may_start():
            return None
        return FencedKube(self.kube, lambda: self.fence(term))

    def _on_leading(self) -> None:
        self._leading = True
        for r in list(self.runners.values()):
            # Another replica may have led meanwhile: re-read the ApplySet parent,
            # rewrite status, and take the last applied commit from the audit trail
            # again (AppRunner._restore, before the next reconcile).
            r.inv, r.status_written, r.last_result, r.restored = None, None, None, False
            r.trigger("leader")

    def _on_standby(self) -> None:
        self._leading = False
        for r in list(self.runners.values()):
            r.cancel.set()

    # ------------------------------------------------------------ apps

    def _add(self, cfg: config_mod.AppConfig) -> None:
        runner = AppRunner(self, cfg)
        self.runners[cfg.name] = runner
        self._schedule(runner)
        if self.may_start():
            runner.trigger("config")

    def _schedule(self, runner: AppRunner) -> None:
        interval = runner.cfg.interval
        self.scheduler.add_job(runner.trigger, "interval", args=("poll",), seconds=interval,
                               jitter=max(1, int(interval * 0.1)), id=f"poll-{runner.cfg.name}",
                               replace_existing=True,
                               next_run_time=_now() + timedelta(seconds=interval * random.uniform(0.9, 1.0)))

    def schedule_once(self, runner: AppRunner, delay: float, reason: str) -> None:
        if self._stop.is_set():
            return
        self.scheduler.add_job(runner.trigger, "date", args=(reason,), id=f"retry-{runner.cfg.name}",
                               replace_existing=True, run_date=_now() + timedelta(seconds=delay))

    def _remove(self, name: str) -> None:
        runner = self.runners.pop(name, None)
        for job_id in (f"poll-{name}", f"retry-{name}"):
            try:
                self.scheduler.remove_job(job_id)
            except Exception:  # noqa: BLE001 - JobLookupError: no such job
                pass
        if runner:
            runner.stop()

    def credentials(self, cfg: config_mod.AppConfig) -> source.Credentials | None:
        """Resolve an app's credentials reference (re-read every reconcile: rotation works).

        The secret parts — the token (an https password or access token) and
        the SSH private key's content — are registered with gitopsd.redact as
        they are read, so a git or tool message that echoes one is scrubbed
        from every log line and record. The username and known_hosts are not
        secrets: registered, a username would be blanked from every line that
        happens to contain it.
        """
        ref = cfg.credentials
        if ref is None:
            return None
        if ref.secret_name:
            secret = self.kube.get(self.kube.resource("v1", "Secret"), ref.secret_name, self.namespace)
            if secret is None:
                raise GitopsdError(f"app {cfg.name}: credentials Secret {self.namespace}/{ref.secret_name} not found",
                                   hint="create it with keys token (and username) or identity and known_hosts")
            import base64

            wanted = ("token", "username", "identity", "known_hosts")
            try:
                data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()
                        if k in wanted}
            except (ValueError, UnicodeDecodeError):
                raise GitopsdError(f"app {cfg.name}: credentials Secret {self.namespace}/{ref.secret_name} "
                                   "has a key that is not text", hint=f"keys read: {', '.join(wanted)}") from None
            redact.remember((data.get("token"), data.get("identity")))
            key_file = hosts_file = None
            if "identity" in data:
                key_file = self._private_file(f"{cfg.name}-identity", data["identity"])
            if "known_hosts" in data:
                hosts_file = self._private_file(f"{cfg.name}-known_hosts", data["known_hosts"])
            return source.Credentials(username=data.get("username"), token=data.get("token"),
                                      ssh_key_file=key_file, known_hosts_file=hosts_file)
        try:
            token = ref.token_file.read_text().strip() if ref.token_file else None
            username = ref.username or (ref.username_file.read_text().strip() if ref.username_file else None)
            key = ref.ssh_key_file.read_text(errors="replace") if ref.ssh_key_file else None
        except OSError as exc:
            raise GitopsdError(f"app {cfg.name}: cannot read a credentials file: {exc.strerror}: {exc.filename}",
                               hint="is the Secret volume mounted at that path?") from None
        redact.remember((token, key))
        return source.Credentials(username=username, token=token, ssh_key_file=ref.ssh_key_file,
                                  known_hosts_file=ref.known_hosts_file)

    def _private_file(self, name: str, content: str) -> Path:
        path = self._secret_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content if content.endswith("\n") else content + "\n")
        return path

    # ------------------------------------------------------------ config reload

    def _read_config(self) -> tuple[str, bytes]:
        """(digest, bytes) of one read of the file: what is parsed is what was hashed.

        Raises OSError when the file cannot be read (missing, a directory, no permission).
        """
        data = self.config_path.read_bytes()
        return hashlib.sha256(data).hexdigest(), data

    def _config_dirs(self) -> tuple[Path, ...]:
        """Where a change to the config file shows: its directory (watched recursively,
        so a ConfigMap volume's `..data` swap is seen), and the directory of the file
        a symlink points to when that lies elsewhere."""
        parent = self.config_path.absolute().parent
        target = self.config_path.resolve().parent
        if target == parent or target.is_relative_to(parent) or not target.is_dir():
            return (parent,)
        return (parent, target)

    def _watch_config(self) -> None:
        """Hot reload until stopped, surviving what editors and Kubernetes do to the file.

        Not a watch on the file itself: editors save by writing a new file and
        renaming it over the old one, and ConfigMap volumes swap a symlink, either
        of which ends a watch on the old inode. If the watch itself fails (the
        directory was removed), it is re-armed every second, and the file is read
        again each time so that nothing changed meanwhile is missed.
        """
        from watchfiles import watch

        problem = None
        while not self._stop.is_set():
            dirs = self._config_dirs()
            try:
                for _changes in watch(*dirs, stop_event=self._stop, debounce=200, step=50, rust_timeout=1000,
                                      yield_on_timeout=False):
                    problem = None
                    self._reload_safely()
                    if self._config_dirs() != dirs:
                        break  # the link points into another directory now: watch that one
            except Exception as exc:  # noqa: BLE001 - the watch must come back, whatever ended it
                if str(exc) != problem:
                    log.warning("cannot watch the config file's directory; retrying every second",
                                path=str(self.config_path), directories=[str(d) for d in dirs],
                                error=f"{type(exc).__name__}: {exc}")
                problem = str(exc)
                self._stop.wait(1.0)
                self._reload_safely()

    def _reload_safely(self) -> None:
        try:
            self.reload()
        except Exception:  # noqa: BLE001 - hot reload must survive a bug in one reload
            log.exception("config reload failed; the previous config keeps running")

    def reload(self) -> None:
        """Apply a changed config file; a file that is not a valid config changes nothing.

        Missing, unreadable, empty or not UTF-8 is not "no apps": an `rm`, a
        half-written save or a broken volume mount must not stop every app.
        Each distinct rejected state is logged once; the next valid version
        (the file re-created included) is picked up.
        """
        try:
            digest, data = self._read_config()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                why = "the file is missing (deleted, or moved away)"
            else:
                why = f"cannot read the file: {exc.strerror or exc}"
            self._reject(f"unreadable:{type(exc).__name__}", why,
                         hint="restore the file; to remove every app, write a file with `apps: []`")
            return
        if digest == self._config_digest:
            return
        if not data.strip():
            self._reject(digest, "the file is empty",
                         hint="to remove every app, write `apps: []`; an empty file is taken for an accident")
            return
        try:
            new = config_mod.parse(data.decode("utf-8"), source=str(self.config_path),
                                   base_dir=self.config_path.absolute().parent)
        except UnicodeDecodeError as exc:
            self._reject(digest, f"not UTF-8 text (byte {exc.start})")
            return
        except GitopsdError as exc:
            self._reject(digest, str(exc))
            return
        change = config_mod.diff(self.config, new)
        self.config, self._config_digest = new, digest
        for name in change.removed:
            self._remove(name)
        for name in change.added:
            self._add(new.app(name))
        for name in change.changed:
            runner = self.runners.get(name)
            if runner is None:
                continue
            runner.cfg = new.app(name)
            self._schedule(runner)
            runner.trigger("config")
        log.info("config reloaded", path=str(self.config_path), added=list(change.added),
                 removed=list(change.removed), changed=list(change.changed))

    def _reject(self, state: str, error: str, *, hint: str | None = None) -> None:
        """Log a rejected config state once (`state` identifies it) and keep the running apps."""
        if state == self._config_digest:
            return
        self._config_digest = state
        log.error("config change rejected; the previous config keeps running", path=str(self.config_path),
                  error=error, hint=hint, running=sorted(self.runners))

    def _watch_local_repos(self) -> None:
        """Development mode: a commit to a local repository reconciles within a second."""
        from watchfiles import watch

        while not self._stop.is_set():
            paths = {}
            for r in list(self.runners.values()):
                local = _local_path(r.cfg.repo)
                if local is not None and local.exists():
                    paths.setdefault(local, []).append(r.cfg.name)
            if not paths:
                self._stop.wait(2.0)
                continue
            snapshot = dict(paths)
            for changes in watch(*snapshot, stop_event=self._stop, debounce=100, step=30, rust_timeout=2000,
                                 yield_on_timeout=True):
                if changes:
                    touched = {p for p in snapshot if any(str(c[1]).startswith(str(p)) for c in changes)}
                    for p in touched:
                        for name in snapshot[p]:
                            runner = self.runners.get(name)
                            if runner is not None:
                                runner.trigger("watch")
                current = {_local_path(r.cfg.repo) for r in list(self.runners.values())} - {None}
                if current != set(snapshot):
                    break  # the app set changed: re-arm the watch

    # ------------------------------------------------------------ HTTP callbacks

    def on_push(self, event: PushEvent) -> list[str]:
        if self.elector is not None and not self._leading and not self._stop.is_set():
            return self._forward_to_leader(event)
        hit = [r for r in list(self.runners.values()) if matches(r.cfg.repo, r.cfg.ref, event)]
        for r in hit:
            r.trigger("webhook", sha=event.after)
        log.info("push received", provider=event.provider, ref=event.ref,
                 repo=normalize_repo_url(event.repo_urls[0]) if event.repo_urls else None,
                 triggered=[r.cfg.name for r in hit])
        return [r.cfg.name for r in hit]

    def _forward_to_leader(self, event: PushEvent) -> list[str]:
        """A standby behind the same Service got the push: hand it to the leader.

        Re-sent as a generic hook signed with the shared secret, to the URL the
        leader publishes on the Lease. Without it half the pushes to a
        two-replica Service would wait for the next poll.
        """
        import hmac
        import json
        import urllib.request

        url = self.elector.leader_url
        secret = self.webhook_secret()
        if event.forwarded_by:
            log.warning("a forwarded push reached a standby; not forwarding it again", ref=event.ref,
                        forwarded_by=event.forwarded_by)
            return []
        if url and url == self.elector.advertise_url:
            log.warning("the lease names this replica's own address; not forwarding to itself", url=url)
            return []
        if not url or not secret:
            log.warning("push received by a standby; no leader address to forward it to",
                        ref=event.ref, hint="set --advertise-url (deploy/ sets it from the pod IP)")
            return []
        body = json.dumps({"repo": event.repo_urls[0] if event.repo_urls else "", "repos": list(event.repo_urls),
                           "ref": event.ref, "after": event.after, "forwardedBy": self.instance}).encode()
        sig = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Gitopsd-Signature": sig}
        if event.delivery:
            headers["X-Gitopsd-Delivery"] = event.delivery   # so the leader recognises a replay too
        req = urllib.request.Request(url.rstrip("/") + "/hooks/generic", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                triggered = json.loads(resp.read() or b"{}").get("triggered", [])
            log.info("push forwarded to the leader", leader=url, ref=event.ref, triggered=triggered)
            return triggered
        except (OSError, ValueError) as exc:
            log.warning("forwarding a push to the leader failed", leader=url, error=str(exc))
            return []

    def webhook_secret(self) -> bytes:
        """The shared webhook secret, re-read at every delivery (rotation works); empty: webhooks off.

        Registered with gitopsd.redact as it is read, so no log line echoes
        it — whatever a sender put where (a delivery id, a URL).
        """
        path = self.config.webhook.secret_file
        if path is not None:
            try:
                secret = path.read_bytes().strip()
            except OSError:
                return b""
        else:
            secret = os.environ.get("GITOPSD_WEBHOOK_SECRET", "").encode()
        redact.remember((secret.decode("utf-8", "replace"),))
        return secret

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "shutting down"
        role = "leader" if self._leading else "standby"
        return True, f"ok ({role}, {len(self.runners)} apps)"

    def status_json(self) -> dict:
        apps = []
        for name, r in sorted(list(self.runners.items())):
            s = r.status()
            job = self.scheduler.get_job(f"poll-{name}")
            s["nextRun"] = _iso(job.next_run_time) if job and job.next_run_time else ""
            s["running"] = r.running
            apps.append(s)
        return {"instance": self.instance, "leader": self._leading, "apps": apps}


def _local_path(repo: str) -> Path | None:
    if repo.startswith("file://"):
        return Path(repo[len("file://"):])
    if repo.startswith("/"):
        return Path(repo)
    return None


def main(args) -> int:
    """Entry point of `gitopsd run` (parsed by gitopsd.cli)."""
    from gitopsd import log as log_mod

    log_mod.configure(fmt=args.log_format)
    instance = args.instance or f"{socket.gethostname()}-{os.getpid()}"
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context, max_workers=args.concurrency)
        daemon = Daemon(kube=kube, config_path=args.config, namespace=args.namespace, http_host=args.http_address,
                        http_port=args.http_port, instance=instance, leader_elect=args.leader_elect,
                        lease_duration=args.lease_duration, lease_renew=args.lease_renew,
                        watch_local=args.watch_local, advertise_url=args.advertise_url)
    except GitopsdError as exc:
        log.error("cannot start", error=str(exc))
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
    except GitopsdError as exc:
        log.error("cannot start", error=str(exc))
        daemon.stop()
        return 2
    try:
        while not stop.wait(0.5):
            pass
    finally:
        daemon.stop()
    return 0
