"""`gitopsd run`: keep many apps converged.

The daemon orchestrates; the stages do the work (gitopsd.engine.sync). One
AppRunner per target (gitopsd.daemon.runner) owns everything about it: a
target is an app on one cluster (gitopsd.config.AppConfig.key: `app` on
gitopsd's own cluster, `app@cluster` elsewhere; an app deployed to several
clusters is one target per cluster).
This module wires the runners to the outside world and to each other:

- triggers (gitopsd.daemon.triggers): the poll schedule (apscheduler), push
  webhooks, and in development local repositories;
- what the apps of one repository share: its fetches
  (gitopsd.engine.source_share: one per poll or push, whatever the number of
  apps) and the renders (gitopsd.engine.render_cache: reused while the files
  they read are unchanged);
- the clusters (gitopsd.daemon.clusters): per cluster one connection, its
  shared informers (gitopsd.daemon.informers: one watch per kind of managed
  object for all its targets, feeding their plans, self-heal and health
  waits; stopped at shutdown) and its audit log; a cluster other than
  gitopsd's own is probed, and one that does not answer holds up only its
  own targets;
- the HTTP server (gitopsd.daemon.server): push webhooks, /healthz,
  /readyz, /metrics, /status, and the read-only web view (gitopsd.web), whose
  pages are made from the runners' memory and told of changes by the feed
  (gitopsd.daemon.feed);
- the config file (gitopsd.daemon.config_watch): hot reload;
- notifications (gitopsd.notify): a feed listener that only enqueues; its
  own threads send, and get a short grace at shutdown;
- leadership (gitopsd.daemon.leadership): a Lease for all apps, or one per
  shard with --shards N (gitopsd.daemon.shards). Only the holder reconciles
  an app, and every write it sends is fenced (gitopsd.daemon.leader): a
  reconcile or self-heal runs within the term it began in and writes through
  a Kube that refuses each write once this replica cannot prove that term
  still holds the lease. Such a run ends quietly ("leadership lost
  mid-reconcile; N writes not sent"), records nothing and leaves what it
  wrote: the new holder records and converges;
- SIGTERM: stop taking work, let running reconciles finish (their health
  waits are cancelled), release the leases;
- memory (gitopsd.daemon.memory): two malloc arenas, set before the first
  thread starts, and free heap pages handed back after a busy spell.

Reconciles run on the reconcile pool of the process's one budget
(gitopsd.budget, sized by --concurrency), which also bounds the requests of
all of them together and pauses them all when the apiserver throttles.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import structlog

from gitopsd import __version__, metrics
from gitopsd import config as config_mod
from gitopsd.budget import Budget
from gitopsd.daemon.clusters import ClusterSet
from gitopsd.daemon.config_watch import ConfigWatcher
from gitopsd.daemon.credentials import CredentialStore
from gitopsd.daemon.dependencies import Dependencies
from gitopsd.daemon.feed import Feed
from gitopsd.daemon.informers import Informers
from gitopsd.daemon.leader import FencedKube, LeaderElector
from gitopsd.daemon.leadership import Leadership
from gitopsd.daemon.memory import Trimmer, limit_arenas
from gitopsd.daemon.release import Request, RequestWatch
from gitopsd.daemon.runner import AppRunner, _iso
from gitopsd.daemon.server import Server
from gitopsd.daemon.shards import Shards
from gitopsd.daemon.triggers import LocalRepoWatcher, PushRouter, Schedule
from gitopsd.engine.render_cache import RenderCache
from gitopsd.engine.source_share import SharedFetches
from gitopsd.engine.sync import default_cache_dir
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube
from gitopsd.notify.notifier import Notifier
from gitopsd.web.site import Site
from gitopsd.web.views import Views

log = structlog.get_logger("gitopsd")

SHUTDOWN_GRACE = 25.0


class Daemon:
    def __init__(self, *, kube: Kube, config_path: Path, namespace: str, http_host: str, http_port: int,
                 instance: str, leader_elect: bool = True, lease_duration: float = 15.0,
                 lease_renew: float = 5.0, watch_local: bool = True, cache_dir: Path | None = None,
                 advertise_url: str | None = None, shards: int = 1, prometheus_url: str | None = None,
                 ui: bool = True, ui_token_file: Path | None = None, ui_url: str | None = None) -> None:
        self.kube = kube
        kube.user_agent = f"gitopsd/{__version__} ({instance})"   # names us in the apiserver's audit log
        self.namespace = namespace
        self.instance = instance
        self.prometheus_url = prometheus_url   # progressive-delivery gates (gitopsd.daemon.rollouts)
        self.ui_url = ui_url.rstrip("/") if ui_url else None   # the web view as people reach it (links in notifications)
        self.cache_dir = cache_dir or default_cache_dir()
        self.watch_local = watch_local
        self._stop = threading.Event()
        # What happens to the targets, for the web view's live updates and the notifier (gitopsd.daemon.feed).
        self.feed = Feed()
        self.config_watch = ConfigWatcher(config_path, on_change=self._on_config, stopped=self._stop)
        self.runners: dict[str, AppRunner] = {}   # by target (AppConfig.key: `app`, `app@cluster`)
        # Reconciles and heals run here; the pool is sized by the process's one
        # budget (gitopsd.budget), which also bounds their requests together.
        self.pool = kube.budget.reconciles()
        self.fetches = SharedFetches(cache_dir=self.cache_dir, on_fetch=self._fetching,
                                     on_new_commit=self._on_new_commit)
        self.renders = RenderCache(on_lookup=lambda result: metrics.RENDER_CACHE.labels(result=result).inc())
        self.schedule = Schedule(self._stop, fetches=self.fetches, renders=self.renders,
                                 credentials=lambda cfg: self.credentials.resolve(cfg),
                                 pace_above=kube.budget.reconcile_workers)
        self.credentials = CredentialStore(kube, namespace=namespace)
        # Commit statuses, chat messages, JSON webhooks (gitopsd.notify): fed by the feed, sent by its own threads.
        self.notifier = Notifier(config=lambda: self.config, credentials=self.credentials, ui_url=self.ui_url)
        self.feed.listen(self.notifier.listen)
        # Each cluster's connection, informers and audit log (gitopsd.daemon.clusters); in-cluster is `kube`.
        self.clusters = ClusterSet(kube, namespace=namespace, instance=instance, fence=self.fence,
                                   stopped=self._stop, on_back=self._cluster_back)
        self.pushes = PushRouter(self)
        self.leadership = Leadership(kube, namespace=namespace, instance=instance, leader_elect=leader_elect,
                                     shards=shards, lease_duration=lease_duration, lease_renew=lease_renew,
                                     advertise_url=advertise_url, runners=lambda: self.runners, stopped=self._stop,
                                     wake=self.schedule.wake)
        # Records are stored and announced only while this replica may write (Daemon.fence);
        # the runners check it before each record too, in the term their run began in.
        self.audit = self.clusters.home.audit
        # dependsOn: who waits for whom; a dependency of another replica's shard is read from its status.
        self.dependencies = Dependencies(kube=kube, namespace=namespace, runners=lambda: self.runners,
                                         local=lambda app: self.shards is None or self.shards.may_start(app),
                                         kube_of=lambda cluster: self.clusters.get(cluster).kube)
        # `gitopsd hold|resume|rollback` from anywhere with a kubeconfig (gitopsd.daemon.release).
        self.release_requests = RequestWatch(kube, namespace=namespace, deliver=self._release_request)
        # The read-only web view (gitopsd.web), from the runners' memory and the feed.
        self.views = Views(self) if ui else None
        self.ui_token_file = ui_token_file
        self.server = Server(host=http_host, port=http_port, on_push=self.pushes.on_push,
                             webhook_secret=self.pushes.webhook_secret, ready=self.ready, status=self.status_json,
                             status_summary=self.status_summary,
                             site=Site(views=self.views, token_file=ui_token_file) if self.views else None)
        self._threads: list[threading.Thread] = []

    @property
    def config(self) -> config_mod.Config:
        """The running config: the last valid version of the file."""
        return self.config_watch.config

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from gitopsd.engine import inventory

        try:
            # Before leading, through the plain Kube like the Lease it is needed for.
            inventory.ensure_namespace(self.kube, self.namespace)
        except GitopsdError as exc:
            log.warning("cannot ensure gitopsd namespace", namespace=self.namespace, error=str(exc))
        self.server.start()
        self.notifier.start()
        self.schedule.start()
        self.dependencies.update(self.config)
        self.clusters.update(self.config)   # reads the kubeconfigs: a cluster that cannot be used fails its targets
        for cfg in self.config.targets:
            self._add(cfg)
        self.release_requests.start()
        self._spawn(self.config_watch.watch, "config-watch")
        self._spawn(Trimmer(stopped=self._stop).run, "memory-trim")
        if self.watch_local:
            self._spawn(LocalRepoWatcher(self).run, "local-repo-watch")
        self.leadership.start(advertise_url=self._advertise_url)
        log.info("gitopsd started", instance=self.instance, apps=[a.key for a in self.config.targets],
                 http=f"{self.server.host}:{self.server.port}", namespace=self.namespace,
                 leader_election=self.elector is not None or self.shards is not None,
                 shards=self.shards.count if self.shards else 1,
                 ui=("off" if self.views is None else
                     f"http://{self.server.host}:{self.server.port}/" + (" (token)" if self.ui_token_file else "")))

    def release_request(self, app: str) -> Request | None:
        """The newest release request stored for `app` (a runner taking the app over reads it)."""
        return self.release_requests.latest(app)

    def _release_request(self, app: str, request: Request) -> None:
        runner = self.runners.get(app)
        if runner is not None:
            runner.request(request)

    def _advertise_url(self, given: str | None) -> str | None:
        """Where the other replicas forward pushes to this one: --advertise-url, else a concrete
        listen address as is (0.0.0.0 says nothing)."""
        if given or self.server.host in ("0.0.0.0", "::", ""):
            return given
        return f"http://{self.server.host}:{self.server.port}"

    def run_forever(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        """Graceful: stop taking work, finish (or safely cut) running work, release the lease."""
        if self._stop.is_set():
            return
        log.info("shutting down", instance=self.instance)
        self._stop.set()
        self.schedule.shutdown()
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
        # Hand the leases over at once only when no work of ours is still
        # running; otherwise let them expire, so no other replica writes beside us.
        self.leadership.stop(release=idle)
        self.notifier.stop()   # what the runs announced gets a short grace to go out
        self.clusters.stop()
        self.release_requests.stop()
        self.dependencies.stop()
        self.credentials.close()
        self.server.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", instance=self.instance)

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------ leadership (gitopsd.daemon.leadership)

    @property
    def elector(self) -> LeaderElector | None:
        return self.leadership.elector

    @property
    def shards(self) -> Shards | None:
        return self.leadership.shards

    @property
    def _leading(self) -> bool:
        return self.leadership.leading

    def may_write(self, term: int | None = None, *, app: str | None = None) -> bool:
        return self.leadership.may_write(term, app=app)

    def fence(self, term: int | None = None, *, app: str | None = None) -> None:
        self.leadership.fence(term, app=app)

    def may_start(self, app: str | None = None) -> bool:
        return self.leadership.may_start(app)

    def writer(self, app: str | None = None, *, kube: Kube | None = None) -> FencedKube | None:
        return self.leadership.writer(app, kube=kube)

    @property
    def informers(self) -> Informers:
        """The informers of gitopsd's own cluster."""
        return self.clusters.home.informers

    def _cluster_back(self, cluster: str) -> None:
        """A cluster answers again (or its kubeconfig works now): its targets run at once."""
        woken = [r for r in list(self.runners.values()) if r.link.name == cluster]
        for runner in woken:
            runner.trigger("cluster")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------ apps

    @staticmethod
    def _fetching(key) -> None:
        metrics.GIT_FETCHES.labels(repo=key.url).inc()
        log.debug("git fetch", repo=key.url, ref=key.ref)

    def _on_new_commit(self, url: str, ref: str, checkout) -> None:
        self.schedule.commits.on_new_commit(url, ref, checkout)

    def _add(self, cfg: config_mod.AppConfig) -> AppRunner:
        """A runner for the app, polled with its repository; woken by the caller (or by leading)."""
        runner = AppRunner(self, cfg)
        self.runners[cfg.key] = runner
        self.schedule.poll(runner)
        return runner

    def _remove(self, name: str) -> None:
        runner = self.runners.pop(name, None)
        self.schedule.remove(name)
        if runner:
            runner.stop()
        metrics.forget_app(name)
        if self.views is not None:
            self.views.trails.forget(name)

    def _on_config(self, new: config_mod.Config, change: config_mod.ConfigChange) -> None:
        """A valid new config (gitopsd.daemon.config_watch): stop, start and re-trigger apps.

        Added and changed apps are woken like a push wakes them: their
        repositories refreshed once each (a config edit often follows a
        push it relies on), then one fetch shared by their runs. The dependency graph is the
        new file's from here on (gitopsd.daemon.dependencies).
        """
        self.dependencies.update(new)
        for name in change.removed:
            self._remove(name)
        self.clusters.update(new)   # after the removed targets stopped: a cluster no longer named is closed
        woken = [self._add(new.target(name)) for name in change.added]
        for name in change.changed:
            runner = self.runners.get(name)
            if runner is None:
                continue
            runner.cfg = new.target(name)
            self.schedule.poll(runner)
            woken.append(runner)
        self.schedule.wake(woken, "config")

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "shutting down"
        return True, f"ok ({self.leadership.describe()}, {len(self.runners)} apps)"

    def status_json(self) -> dict:
        """GET /status: every app's row, by name. Each repository's next poll is read once for all
        its apps (Schedule.next_runs), so a status of 10,000 apps costs one pass over the runners."""
        next_runs = self.schedule.next_runs()
        apps = []
        for name, r in sorted(list(self.runners.items())):
            s = r.status()
            s["nextRun"] = _iso(next_runs.get(name))
            s["running"] = r.running
            apps.append({**s, **self.leadership.app_status(name)})
        return {"instance": self.instance, **self.leadership.status(), "clusters": self.clusters.status(),
                "apps": apps}

    def status_summary(self) -> dict:
        """GET /status?summary: how many apps have each result and, within it, each health, and how
        many run now — what a dashboard or a rollout script polls, without a row per app."""
        counts: dict[str, dict[str, int]] = {}
        running = 0
        for r in list(self.runners.values()):
            result, health = r.verdict()
            by_health = counts.setdefault(result, {})
            by_health[health] = by_health.get(health, 0) + 1
            running += r.running
        return {"instance": self.instance, **self.leadership.status(),
                "summary": {"apps": sum(sum(h.values()) for h in counts.values()), "running": running,
                            "results": counts}}


def main(args) -> int:
    """Entry point of `gitopsd run` (parsed by gitopsd.cli)."""
    from gitopsd import log as log_mod

    limit_arenas()   # before any thread: arenas made already would stay
    log_mod.configure(fmt=args.log_format, level=args.log_level)
    instance = args.instance or f"{socket.gethostname()}-{os.getpid()}"
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context, budget=Budget(limit=args.concurrency))
        daemon = Daemon(kube=kube, config_path=args.config, namespace=args.namespace, http_host=args.http_address,
                        http_port=args.http_port, instance=instance, leader_elect=args.leader_elect,
                        lease_duration=args.lease_duration, lease_renew=args.lease_renew,
                        watch_local=args.watch_local, advertise_url=args.advertise_url, shards=args.shards,
                        prometheus_url=args.prometheus_url, ui=args.ui, ui_token_file=args.ui_token_file,
                        ui_url=args.ui_url)
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
