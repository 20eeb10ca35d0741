"""`gitopsd run`: keep many apps converged.

The daemon orchestrates; the stages do the work (gitopsd.engine.sync). One
AppRunner per app (gitopsd.daemon.runner) owns everything about that app.
This module wires the runners to the outside world and to each other:

- triggers (gitopsd.daemon.triggers): the poll schedule (apscheduler), push
  webhooks, and in development local repositories;
- the shared informers (gitopsd.daemon.informers): one watch per kind of
  managed object for all apps, feeding their plans, self-heal and health
  waits; stopped at shutdown;
- the HTTP server (gitopsd.daemon.server): push webhooks, /healthz,
  /readyz, /metrics, /status;
- the config file (gitopsd.daemon.config_watch): hot reload;
- a Lease (leader election): only the leader reconciles, and every write it
  sends is fenced (gitopsd.daemon.leader): a reconcile or self-heal runs within the
  leadership term it began in and writes through a Kube that refuses each
  write once this replica cannot prove that term still holds the lease. Such
  a run ends quietly ("leadership lost mid-reconcile; N writes not sent"),
  records nothing and leaves what it wrote: the new leader records and
  converges;
- SIGTERM: stop taking work, let running reconciles finish (their health
  waits are cancelled), release the lease.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from gitopsd import __version__, audit
from gitopsd import config as config_mod
from gitopsd.daemon.config_watch import ConfigWatcher
from gitopsd.daemon.credentials import CredentialStore
from gitopsd.daemon.informers import Informers
from gitopsd.daemon.leader import FencedKube, LeaderElector, LeadershipLost
from gitopsd.daemon.runner import AppRunner, _iso
from gitopsd.daemon.server import Server
from gitopsd.daemon.triggers import LocalRepoWatcher, PushRouter, Schedule
from gitopsd.engine.sync import default_cache_dir
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube

log = structlog.get_logger("gitopsd")

SHUTDOWN_GRACE = 25.0


class Daemon:
    def __init__(self, *, kube: Kube, config_path: Path, namespace: str, http_host: str, http_port: int,
                 instance: str, leader_elect: bool = True, lease_duration: float = 15.0,
                 lease_renew: float = 5.0, watch_local: bool = True, cache_dir: Path | None = None,
                 advertise_url: str | None = None) -> None:
        self.kube = kube
        kube.user_agent = f"gitopsd/{__version__} ({instance})"   # names us in the apiserver's audit log
        self.namespace = namespace
        self.instance = instance
        self.cache_dir = cache_dir or default_cache_dir()
        self.watch_local = watch_local
        self._stop = threading.Event()
        self.config_watch = ConfigWatcher(config_path, on_change=self._on_config, stopped=self._stop)
        self.runners: dict[str, AppRunner] = {}
        self.informers = Informers(kube)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="app")
        self.schedule = Schedule(self._stop)
        self.credentials = CredentialStore(kube, namespace=namespace)
        self.pushes = PushRouter(self)
        # Records are stored and announced only while this replica may write (Daemon.fence);
        # the runners check it before each record too, in the term their run began in.
        self.audit = audit.AuditLog(FencedKube(kube, self.fence), namespace=namespace, instance=instance)
        self._leading = False            # set by _on_leading (at start when election is off)
        self.elector = (LeaderElector(kube, namespace=namespace, identity=instance, lease_duration=lease_duration,
                                      renew_interval=lease_renew, on_started_leading=self._on_leading,
                                      on_stopped_leading=self._on_standby, advertise_url=advertise_url)
                        if leader_elect else None)
        self.server = Server(host=http_host, port=http_port, on_push=self.pushes.on_push,
                             webhook_secret=self.pushes.webhook_secret, ready=self.ready, status=self.status_json)
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
        self.schedule.start()
        for cfg in self.config.apps:
            self._add(cfg)
        self._spawn(self.config_watch.watch, "config-watch")
        if self.watch_local:
            self._spawn(LocalRepoWatcher(self).run, "local-repo-watch")
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
        self._leading = False
        if self.elector:
            # Hand the lease over at once only when no work of ours is still
            # running; otherwise let it expire, so a standby cannot write beside us.
            self.elector.stop(release=idle)
        self.informers.stop()
        self.credentials.close()
        self.server.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", instance=self.instance)

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------ leadership

    def may_write(self, term: int | None = None) -> bool:
        """The fencing rule (gitopsd.daemon.leader): may this replica write now, in `term` if given?

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
        self.schedule.poll(runner)
        if self.may_start():
            runner.trigger("config")

    def _remove(self, name: str) -> None:
        runner = self.runners.pop(name, None)
        self.schedule.remove(name)
        if runner:
            runner.stop()

    def _on_config(self, new: config_mod.Config, change: config_mod.ConfigChange) -> None:
        """A valid new config (gitopsd.daemon.config_watch): stop, start and re-trigger apps."""
        for name in change.removed:
            self._remove(name)
        for name in change.added:
            self._add(new.app(name))
        for name in change.changed:
            runner = self.runners.get(name)
            if runner is None:
                continue
            runner.cfg = new.app(name)
            self.schedule.poll(runner)
            runner.trigger("config")

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "shutting down"
        role = "leader" if self._leading else "standby"
        return True, f"ok ({role}, {len(self.runners)} apps)"

    def status_json(self) -> dict:
        apps = []
        for name, r in sorted(list(self.runners.items())):
            s = r.status()
            s["nextRun"] = _iso(self.schedule.next_run(name))
            s["running"] = r.running
            apps.append(s)
        return {"instance": self.instance, "leader": self._leading, "apps": apps}



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
