"""What wakes an app: its poll schedule, a push webhook, a commit to a local repository.

- Schedule: one apscheduler interval job per app (jittered, so that a
  thousand apps do not poll in step) and one-shot
  retries with backoff after a failure;
- PushRouter: a verified push (gitopsd.daemon.server) triggers the runners
  whose repo and branch match; a standby hands it to the leader; with
  shards, the apps of other replicas' shards are forwarded to their owners;
- LocalRepoWatcher: in development, a commit to a local repository
  reconciles within a second (watchfiles).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from gitopsd import redact
from gitopsd.daemon.webhook import PushEvent, matches, normalize_repo_url

if TYPE_CHECKING:
    from gitopsd.daemon.core import Daemon
    from gitopsd.daemon.runner import AppRunner

log = structlog.get_logger("gitopsd")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Schedule:
    """The apscheduler jobs of the apps: `poll-NAME` (interval) and `retry-NAME` (one shot)."""

    def __init__(self, stopped: threading.Event) -> None:
        self._stopped = stopped
        self.scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True,
                                                                                   "max_instances": 1})

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - already stopped
            pass

    def poll(self, runner: AppRunner) -> None:
        interval = runner.cfg.interval
        self.scheduler.add_job(runner.trigger, "interval", args=("poll",), seconds=interval,
                               jitter=max(1, int(interval * 0.1)), id=f"poll-{runner.cfg.name}",
                               replace_existing=True,
                               next_run_time=_now() + timedelta(seconds=interval * random.uniform(0.9, 1.0)))

    def once(self, runner: AppRunner, delay: float, reason: str) -> None:
        if self._stopped.is_set():
            return
        self.scheduler.add_job(runner.trigger, "date", args=(reason,), id=f"retry-{runner.cfg.name}",
                               replace_existing=True, run_date=_now() + timedelta(seconds=delay))

    def remove(self, name: str) -> None:
        for job_id in (f"poll-{name}", f"retry-{name}"):
            try:
                self.scheduler.remove_job(job_id)
            except Exception:  # noqa: BLE001 - JobLookupError: no such job
                pass

    def next_run(self, name: str) -> datetime | None:
        job = self.scheduler.get_job(f"poll-{name}")
        return job.next_run_time if job else None



class PushRouter:
    """Push webhooks to the runners they concern (the HTTP server calls on_push)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def on_push(self, event: PushEvent) -> list[str]:
        if self.daemon.elector is not None and not self.daemon._leading and not self.daemon._stop.is_set():
            return self._forward_to_leader(event)
        hit = [r for r in list(self.daemon.runners.values()) if matches(r.cfg.repo, r.cfg.ref, event)]
        hit, elsewhere = self._by_owner(hit)
        for r in hit:
            r.trigger("webhook", sha=event.after)
        log.info("push received", provider=event.provider, ref=event.ref,
                 repo=normalize_repo_url(event.repo_urls[0]) if event.repo_urls else None,
                 triggered=[r.cfg.name for r in hit])
        return [r.cfg.name for r in hit] + self._forward_to_owners(event, elsewhere)

    def _by_owner(self, hit: list[AppRunner]) -> tuple[list[AppRunner], dict[str | None, list[str]]]:
        """The ownership check: with shards, the apps whose shard this replica holds, and the others
        by their owner's webhook URL (None: no live owner or no URL known)."""
        shards = self.daemon.shards
        if shards is None:
            return hit, {}
        mine, elsewhere = [], {}
        for r in hit:
            if shards.owner(r.cfg.name) == self.daemon.instance:
                mine.append(r)
            else:
                elsewhere.setdefault(shards.owner_url(r.cfg.name), []).append(r.cfg.name)
        return mine, elsewhere

    def _forward_to_leader(self, event: PushEvent) -> list[str]:
        """A standby behind the same Service got the push: hand it to the leader.

        Re-sent as a generic hook signed with the shared secret, to the URL the
        leader publishes on the Lease. Without it half the pushes to a
        two-replica Service would wait for the next poll.
        """
        url = self.daemon.elector.leader_url
        if event.forwarded_by:
            log.warning("a forwarded push reached a standby; not forwarding it again", ref=event.ref,
                        forwarded_by=event.forwarded_by)
            return []
        if url and url == self.daemon.elector.advertise_url:
            log.warning("the lease names this replica's own address; not forwarding to itself", url=url)
            return []
        if not url:
            log.warning("push received by a standby; no leader address to forward it to",
                        ref=event.ref, hint="set --advertise-url (deploy/ sets it from the pod IP)")
            return []
        return self._forward(event, url, role="leader")

    def _forward_to_owners(self, event: PushEvent, elsewhere: dict[str | None, list[str]]) -> list[str]:
        """Shards: send the push once to each replica that holds a shard with a matching app.

        A forwarded push is never forwarded again (the shard may have moved
        since the sender looked: its new owner triggers every app of the shard
        when it takes it). Apps of a shard nobody holds are picked up the same way.
        """
        if not elsewhere:
            return []
        if event.forwarded_by:
            log.info("forwarded push: apps of shards not held here are left to their owners", ref=event.ref,
                     forwarded_by=event.forwarded_by, apps=sorted(a for apps in elsewhere.values() for a in apps))
            return []
        unowned = elsewhere.pop(None, [])
        if unowned:
            log.info("push: no live owner known for some apps; whoever takes their shards reconciles them",
                     ref=event.ref, apps=sorted(unowned),
                     hint="a replica that holds shards but advertises no URL needs --advertise-url")
        triggered: list[str] = []
        for url in sorted(u for u in elsewhere if u != self.daemon.shards.advertise_url):
            triggered += self._forward(event, url, role="owner")
        return triggered

    def _forward(self, event: PushEvent, url: str, *, role: str) -> list[str]:
        """Re-send the push to another replica as a generic hook signed with the shared secret
        (with the sender's delivery id, so the receiver recognises a replay too)."""
        import hmac
        import json
        import urllib.request

        secret = self.webhook_secret()
        if not secret:
            log.warning("push not forwarded: no webhook secret to sign it with", to=url)
            return []
        body = json.dumps({"repo": event.repo_urls[0] if event.repo_urls else "", "repos": list(event.repo_urls),
                           "ref": event.ref, "after": event.after, "forwardedBy": self.daemon.instance}).encode()
        sig = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Gitopsd-Signature": sig}
        if event.delivery:
            headers["X-Gitopsd-Delivery"] = event.delivery
        req = urllib.request.Request(url.rstrip("/") + "/hooks/generic", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                triggered = json.loads(resp.read() or b"{}").get("triggered", [])
            log.info(f"push forwarded to the {role}", **{role: url}, ref=event.ref, triggered=triggered)
            return triggered
        except (OSError, ValueError) as exc:
            log.warning(f"forwarding a push to the {role} failed", **{role: url}, error=str(exc))
            return []

    def webhook_secret(self) -> bytes:
        """The shared webhook secret, re-read at every delivery (rotation works); empty: webhooks off.

        Registered with gitopsd.redact as it is read, so no log line echoes
        it — whatever a sender put where (a delivery id, a URL).
        """
        path = self.daemon.config.webhook.secret_file
        if path is not None:
            try:
                secret = path.read_bytes().strip()
            except OSError:
                return b""
        else:
            secret = os.environ.get("GITOPSD_WEBHOOK_SECRET", "").encode()
        redact.remember((secret.decode("utf-8", "replace"),))
        return secret


class LocalRepoWatcher:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def run(self) -> None:
        """Development mode: a commit to a local repository reconciles within a second."""
        from watchfiles import watch

        while not self.daemon._stop.is_set():
            paths = {}
            for r in list(self.daemon.runners.values()):
                local = _local_path(r.cfg.repo)
                if local is not None and local.exists():
                    paths.setdefault(local, []).append(r.cfg.name)
            if not paths:
                self.daemon._stop.wait(2.0)
                continue
            snapshot = dict(paths)
            for changes in watch(*snapshot, stop_event=self.daemon._stop, debounce=100, step=30, rust_timeout=2000,
                                 yield_on_timeout=True):
                if changes:
                    touched = {p for p in snapshot if any(str(c[1]).startswith(str(p)) for c in changes)}
                    for p in touched:
                        for name in snapshot[p]:
                            runner = self.daemon.runners.get(name)
                            if runner is not None:
                                runner.trigger("watch")
                current = {_local_path(r.cfg.repo) for r in list(self.daemon.runners.values())} - {None}
                if current != set(snapshot):
                    break  # the app set changed: re-arm the watch


def _local_path(repo: str) -> Path | None:
    if repo.startswith("file://"):
        return Path(repo[len("file://"):])
    if repo.startswith("/"):
        return Path(repo)
    return None
