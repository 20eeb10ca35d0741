"""What wakes an app: its repository's poll, a push webhook, a commit to a local repository.

The apps of one repository and ref share its fetches (gitopsd.engine.source_share):
a trigger here first says that the repository may have moved (`refresh`),
then wakes the apps; their reconciles then share one fetch, whatever their
number. So:

- Schedule: one apscheduler interval job per repository and ref (`poll-…`),
  at the shortest interval of its apps (jittered, so that a thousand
  repositories do not poll in step). Each run refreshes the repository once
  and wakes the apps whose own interval has come (an app polled every hour
  beside one polled every minute is still woken hourly): that poll is the
  app's drift check and runs whatever changed. More apps due at once than
  the reconcile pool runs are woken spread over half the interval, in the
  same order every time (so each app's period stays its interval): a burst
  of a thousand drift checks would hold a push's reconcile up behind it.
  One-shot retries with backoff after a failure (`retry-<app>`) start a new
  fetch only if the last one failed.
- A new commit wakes the apps it concerns, not the repository
  (`on_new_commit`, called by the fetch that found it, whoever asked for
  it): the cost of a push follows the change. Which apps it concerns is the
  render cache's rule (gitopsd.engine.render_cache, `unchanged_by`): an app
  whose last build's inputs — closed over symlinks, whole directories for
  what a render lists — no path changed since the commit they were last
  checked at is, lies below or lies above, is left alone (it would render
  the same, keep its revision and plan "unchanged": its poll is its drift
  check). Every other app that has not seen the commit is woken: those the
  change touches first, then those whose inputs are unknown (never built in
  this process, a failed build, allowRemoteBases, evicted, self-heal off,
  git unable to tell what changed), as every app was woken before. Not woken
  either: an app woken since the repository was last refreshed (its run
  fetches after that), or whose last run fetched this commit.
- Pushes (`push`): a verified push webhook (gitopsd.daemon.server, through
  PushRouter) or a commit to a local repository refreshes the repository and
  looks at it once, on a thread of its own (the webhook's answer does not
  wait for git): the fetch, shared as any other (and going straight for the
  ref, SharedFetches.pushed: a push needs no ls-remote), finds the new commit and
  wakes the apps it concerns as above. When it finds none (a replayed or
  repeated push of a commit already fetched) the push wakes the apps that
  commit concerned when it was found — one NoChange reconcile each, counted,
  not recorded — or every app pushed to when that is not known (the first
  fetch since the daemon started). A failed fetch wakes them all, as each
  reports it. PushRouter: a standby hands a push to the leader; with shards,
  the apps of other replicas' shards are forwarded to their owners;
- LocalRepoWatcher: in development, a commit to a local repository
  reconciles within a second (watchfiles).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from gitopsd import redact
from gitopsd.daemon.webhook import PushEvent, matches, normalize_repo_url
from gitopsd.engine import source
from gitopsd.engine.source_share import SharedFetches, repo_key

if TYPE_CHECKING:
    from gitopsd.config import AppConfig
    from gitopsd.daemon.core import Daemon
    from gitopsd.daemon.runner import AppRunner
    from gitopsd.engine.render_cache import RenderCache

log = structlog.get_logger("gitopsd")


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Repo:
    """The apps of one repository and ref, and when each was last woken by a poll."""

    key: tuple[str, str]
    runners: dict[str, "AppRunner"] = field(default_factory=dict)
    polled: dict[str, float] = field(default_factory=dict)   # app -> monotonic time of its last poll
    interval: float = 0.0                                    # of the job: the shortest of the apps'
    paced: int = 0                                           # runs of the job so far (see Schedule._pace)

    @property
    def job_id(self) -> str:
        return "poll-" + hashlib.sha256("\0".join(self.key).encode()).hexdigest()[:16]

    def due(self, runner: "AppRunner", now: float) -> bool:
        """Whether the app's own interval has come at this run of the job (the run nearest to it)."""
        return now - self.polled.get(runner.cfg.key, now) >= runner.cfg.interval - self.interval / 2


class Schedule:
    """The apscheduler jobs: `poll-…` per repository and ref, `retry-<app>` (one shot) per app."""

    def __init__(self, stopped: threading.Event, *, fetches: SharedFetches, renders: RenderCache | None = None,
                 credentials: Callable[[AppConfig], source.Credentials | None] | None = None,
                 pace_above: int = 64) -> None:
        """A poll that finds more than `pace_above` apps due (the daemon: its reconcile workers) wakes
        them spread out; `renders` and `credentials`: see NewCommits (`commits`)."""
        self._stopped = stopped
        self._fetches = fetches
        self._pace_above = pace_above
        self.scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True,
                                                                                   "max_instances": 1})
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._repo_of: dict[str, tuple[str, str]] = {}   # app -> its repository and ref
        self._woken: dict[str, float] = {}               # app -> the generation it was last woken in
        self.commits = NewCommits(self, stopped=stopped, fetches=fetches, renders=renders, credentials=credentials)

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - already stopped
            pass

    def poll(self, runner: AppRunner) -> None:
        """Poll the app with its repository (added, or its config changed)."""
        name = runner.cfg.key
        key = repo_key(runner.cfg.repo, runner.cfg.ref)
        with self._lock:
            if self._repo_of.get(name, key) != key:
                self._leave(name)
            repo = self._repos.setdefault(key, _Repo(key))
            repo.runners[name] = runner
            repo.polled.setdefault(name, time.monotonic())
            self._repo_of[name] = key
            self._arm(repo)

    def wake(self, runners: list[AppRunner], reason: str, *, sha: str | None = None) -> None:
        """Refresh the repository of each runner once, then trigger each runner once.

        A poll, a config edit and a new leader or shard owner come through
        here (pushes through NewCommits.push): the runs they start share one
        fetch per repository.
        """
        generations = {key: self._fetches.refresh(*key) for key in {repo_key(r.cfg.repo, r.cfg.ref)
                                                                    for r in runners}}
        with self._lock:
            for r in runners:
                self._woken[r.cfg.key] = generations[repo_key(r.cfg.repo, r.cfg.ref)]
        for r in runners:
            r.trigger(reason, sha=sha)

    def once(self, runner: AppRunner, delay: float, reason: str) -> None:
        if self._stopped.is_set():
            return
        self.scheduler.add_job(self._retry, "date", args=(runner, reason), id=f"retry-{runner.cfg.key}",
                               replace_existing=True, run_date=_now() + timedelta(seconds=delay))

    def remove(self, name: str) -> None:
        with self._lock:
            self._leave(name)
        try:
            self.scheduler.remove_job(f"retry-{name}")
        except Exception:  # noqa: BLE001 - JobLookupError: no such job
            pass

    def next_runs(self) -> dict[str, datetime | None]:
        """When each app's next poll is due: the first run of its repository's job at which it is.

        All apps at once, reading each repository's job once under one hold of the lock: a
        status of 10,000 apps asked app by app took the lock and looked the job up 10,000 times."""
        out: dict[str, datetime | None] = {}
        with self._lock:
            now, mono = _now(), time.monotonic()
            for repo in self._repos.values():
                job = self.scheduler.get_job(repo.job_id)
                at = job.next_run_time if job is not None else None
                for name, runner in repo.runners.items():
                    out[name] = at and self._next_of(repo, runner, at=at, ahead=(at - now).total_seconds(),
                                                     mono=mono)
        return out

    @staticmethod
    def _next_of(repo: _Repo, runner: AppRunner, *, at: datetime, ahead: float, mono: float) -> datetime:
        elapsed = mono - repo.polled.get(runner.cfg.key, mono) + ahead
        missing = runner.cfg.interval - repo.interval / 2 - elapsed
        runs = max(0, math.ceil(missing / repo.interval)) if repo.interval else 0
        return at + timedelta(seconds=runs * repo.interval)

    def members(self, key: tuple[str, str]) -> list[AppRunner]:
        """The runners of a repository and ref (none when it has no app)."""
        with self._lock:
            repo = self._repos.get(key)
            return list(repo.runners.values()) if repo else []

    def unseen(self, runners: list[AppRunner], generation: float) -> list[AppRunner]:
        """The runners not woken since the repository's refresh `generation` (their runs fetch before it)."""
        with self._lock:
            return [r for r in runners if (w := self._woken.get(r.cfg.key)) is None or w < generation]

    def claim(self, runners: list[AppRunner], generation: float, *, poll: bool = False) -> list[AppRunner]:
        """Of `runners`, those not woken in `generation` yet, now marked woken in it (with `poll`, as
        their poll too: their interval starts again). The caller triggers them."""
        now = time.monotonic()
        with self._lock:
            claimed = [r for r in runners if (w := self._woken.get(r.cfg.key)) is None or w < generation]
            for r in claimed:
                self._woken[r.cfg.key] = generation
                repo = self._repos.get(repo_key(r.cfg.repo, r.cfg.ref))
                if poll and repo is not None:
                    repo.polled[r.cfg.key] = now
            return claimed

    # ------------------------------------------------------------ internals

    def _arm(self, repo: _Repo) -> None:
        """(Re)schedule the repository's job at the shortest interval of its apps; untouched if unchanged."""
        interval = min(r.cfg.interval for r in repo.runners.values())
        if interval == repo.interval and self.scheduler.get_job(repo.job_id) is not None:
            return
        repo.interval = interval
        self.scheduler.add_job(self._poll, "interval", args=(repo.key,), seconds=interval,
                               jitter=max(1, int(interval * 0.1)), id=repo.job_id, replace_existing=True,
                               next_run_time=_now() + timedelta(seconds=interval * random.uniform(0.9, 1.0)))

    def _leave(self, name: str) -> None:
        """Take the app out of its repository's job (lock held); the last one out removes the job."""
        key = self._repo_of.pop(name, None)
        repo = self._repos.get(key) if key else None
        if repo is None:
            return
        repo.runners.pop(name, None)
        repo.polled.pop(name, None)
        self._woken.pop(name, None)
        if repo.runners:
            self._arm(repo)
            return
        del self._repos[key]
        try:
            self.scheduler.remove_job(repo.job_id)
        except Exception:  # noqa: BLE001 - JobLookupError: no such job
            pass
        self._fetches.forget(keep=set(self._repos))

    def _poll(self, key: tuple[str, str]) -> None:
        """The job of one repository: refresh it once, wake the apps whose interval has come.

        More apps than the reconcile pool runs at once are woken spread over
        half the interval (`_pace`), not in one burst: a burst of a thousand
        drift checks would queue a push's reconcile behind them for seconds.
        """
        with self._lock:
            repo = self._repos.get(key)
            if repo is None:
                return
            now = time.monotonic()
            due = [r for r in repo.runners.values() if repo.due(r, now)]
            repo.polled.update({r.cfg.key: now for r in due})
            repo.paced += 1
            token, spread = repo.paced, repo.interval / 2
        if len(due) > self._pace_above:
            self._fetches.refresh(*key)
            threading.Thread(target=self._pace, args=(key, due, token, spread), daemon=True,
                             name=f"pace-{due[0].cfg.key}").start()
        elif due:
            self.wake(due, "poll")
        else:
            self._fetches.refresh(*key)

    def _pace(self, key: tuple[str, str], runners: list[AppRunner], token: int, spread: float) -> None:
        """Trigger `runners` one after the other, evenly over `spread` seconds (on a thread of its own).

        Each is marked woken as it is triggered, not before: a new commit found
        meanwhile wakes the apps it concerns at once (on_new_commit), whether
        their turn has come or not. Ends early at shutdown, when the
        repository leaves the schedule, or when its next poll begins.
        """
        step = spread / len(runners)
        for i, r in enumerate(runners):
            if i and self._stopped.wait(step):
                return
            generation = self._fetches.refreshed_at(*key)
            with self._lock:
                repo = self._repos.get(key)
                if repo is None or repo.paced != token:
                    return
                self._woken[r.cfg.key] = max(self._woken.get(r.cfg.key, generation), generation)
            r.trigger("poll")

    def _retry(self, runner: AppRunner, reason: str) -> None:
        # A new fetch only if the last one failed: the app may have failed after it (render, apply).
        self._fetches.retry(runner.cfg.repo, runner.cfg.ref)
        runner.trigger(reason)


class NewCommits:
    """Whom a new commit wakes, and the look at the repository a push starts; see the module docstring."""

    def __init__(self, schedule: Schedule, *, stopped: threading.Event, fetches: SharedFetches,
                 renders: RenderCache | None = None,
                 credentials: Callable[[AppConfig], source.Credentials | None] | None = None) -> None:
        """`renders` says which apps a commit leaves alone (without it every app is concerned);
        `credentials(cfg)` resolves an app's credentials for the fetch of a push."""
        self._schedule = schedule
        self._stopped = stopped
        self._fetches = fetches
        self._renders = renders
        self._credentials = credentials
        self._lock = threading.Lock()
        self._pushed: dict[tuple[str, str], tuple[float, str]] = {}     # (generation, reason) of the last push
        self._announced: dict[tuple[str, str], float] = {}              # generation of the last new commit
        self._concerned: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}   # its sha and apps woken

    def push(self, runners: list[AppRunner], reason: str, *, sha: str | None = None) -> None:
        """A push to the repositories of `runners`: look at each once, wake the apps it concerns.

        Returns at once; the look (one shared fetch) runs on a thread of its
        own. See the module docstring for whom it wakes.
        """
        by_repo: dict[tuple[str, str], list[AppRunner]] = {}
        for r in runners:
            by_repo.setdefault(repo_key(r.cfg.repo, r.cfg.ref), []).append(r)
        for key, pushed in by_repo.items():
            generation = self._fetches.pushed(*key)
            with self._lock:
                self._pushed[key] = (generation, reason)
            threading.Thread(target=self._look, args=(key, pushed, generation, reason, sha), daemon=True,
                             name=f"push-{pushed[0].cfg.key}").start()

    def on_new_commit(self, url: str, ref: str, checkout: source.Checkout) -> None:
        """A fetch found a new commit (SharedFetches calls this): wake the apps it concerns.

        See the module docstring. Called before the fetch's waiters get the
        commit, so a run under way that has not fetched yet is woken again
        only when the commit concerns it (it may be waiting on an older
        fetch), at the cost of one more reconcile.
        """
        sha = checkout.revision.sha
        key = (url, ref)
        generation = self._fetches.refreshed_at(url, ref)
        candidates = [r for r in self._schedule.unseen(self._schedule.members(key), generation)
                      if sha not in (r.current_sha, r.last_applied)]
        with self._lock:
            pushed = self._pushed.get(key)
        reason = pushed[1] if pushed and pushed[0] == generation else "poll"
        touched, unknown, left = self._concerned_by(candidates, checkout)
        runners = self._schedule.claim(touched + unknown, generation, poll=True)   # the touched ones first
        with self._lock:
            self._announced[key] = max(self._announced.get(key, generation), generation)
            self._concerned[key] = (sha, frozenset(r.cfg.key for r in runners))
        for r in runners:
            r.trigger(reason, sha=sha)
        log.info("new commit: woke the apps it concerns", repo=url, ref=ref, revision=sha[:12],
                 triggered=[r.cfg.key for r in runners], touched=len(touched), unknown=len(unknown),
                 unchanged=left)

    def _concerned_by(self, runners: list[AppRunner],
                      checkout: source.Checkout) -> tuple[list[AppRunner], list[AppRunner], int]:
        """(apps whose inputs the commit touches, apps whose inputs are unknown, how many it leaves alone)."""
        touched, unknown, left = [], [], 0
        for r in runners:
            # Self-heal off: every new commit is a new revision (and ends the hold on hand edits).
            unchanged = self._renders.unchanged_by(r.cfg.name, checkout) \
                if self._renders is not None and r.cfg.self_heal else None
            if unchanged is None:
                unknown.append(r)
            elif unchanged:
                left += 1
            else:
                touched.append(r)
        return touched, unknown, left

    def _look(self, key: tuple[str, str], runners: list[AppRunner], generation: float, reason: str,
              sha: str | None) -> None:
        """The fetch of one push (on its own thread); see `push`."""
        if self._stopped.is_set():
            return
        first = runners[0].cfg
        try:
            credentials = self._credentials(first) if self._credentials is not None else None
            checkout = self._fetches.fetch(first.repo, first.ref, credentials=credentials,
                                           timeout=first.fetch_timeout)
        except Exception as exc:  # noqa: BLE001 - each app's run reports it (a SourceError, a missing Secret)
            log.info("push: the repository could not be read; waking every app pushed to", repo=key[0],
                     ref=key[1], error=redact.scrub(str(exc)))
            self._wake_unseen(runners, reason, generation, sha=sha)
            return
        with self._lock:
            if self._announced.get(key, float("-inf")) >= generation:
                return   # a new commit: on_new_commit woke whom it concerns
            found, names = self._concerned.get(key, ("", frozenset()))
        now = checkout.revision.sha
        if found == now:
            runners = [r for r in runners if r.cfg.key in names]
        self._wake_unseen(runners, reason, generation, sha=now)

    def _wake_unseen(self, runners: list[AppRunner], reason: str, generation: float, *, sha: str | None) -> None:
        """Trigger each runner not woken in this generation yet."""
        for r in self._schedule.claim(runners, generation):
            r.trigger(reason, sha=sha)


class PushRouter:
    """Push webhooks to the runners they concern (the HTTP server calls on_push)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def on_push(self, event: PushEvent) -> list[str]:
        if self.daemon.elector is not None and not self.daemon._leading and not self.daemon._stop.is_set():
            return self._forward_to_leader(event)
        # Once per repository and ref, not per app: a monorepo's thousand apps name one (and
        # normalising a local repository's path resolves it on disk).
        pairs = {(r.cfg.repo, r.cfg.ref) for r in list(self.daemon.runners.values())}
        pushed = {pair for pair in pairs if matches(*pair, event)}
        hit = [r for r in list(self.daemon.runners.values()) if (r.cfg.repo, r.cfg.ref) in pushed]
        hit, elsewhere = self._by_owner(hit)
        self.daemon.schedule.commits.push(hit, "webhook", sha=event.after)   # one fetch per repository
        log.info("push received", provider=event.provider, ref=event.ref,
                 repo=normalize_repo_url(event.repo_urls[0]) if event.repo_urls else None,
                 triggered=[r.cfg.key for r in hit])
        return [r.cfg.key for r in hit] + self._forward_to_owners(event, elsewhere)

    def _by_owner(self, hit: list[AppRunner]) -> tuple[list[AppRunner], dict[str | None, list[str]]]:
        """The ownership check: with shards, the apps whose shard this replica holds, and the others
        by their owner's webhook URL (None: no live owner or no URL known)."""
        shards = self.daemon.shards
        if shards is None:
            return hit, {}
        mine, elsewhere = [], {}
        for r in hit:
            if shards.owner(r.cfg.key) == self.daemon.instance:
                mine.append(r)
            else:
                elsewhere.setdefault(shards.owner_url(r.cfg.key), []).append(r.cfg.key)
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
                    paths.setdefault(local, []).append(r.cfg.key)
            if not paths:
                self.daemon._stop.wait(2.0)
                continue
            snapshot = dict(paths)
            for changes in watch(*snapshot, stop_event=self.daemon._stop, debounce=100, step=30, rust_timeout=2000,
                                 yield_on_timeout=True):
                if changes:
                    touched = {p for p in snapshot if any(str(c[1]).startswith(str(p)) for c in changes)}
                    runners = [r for p in touched for name in snapshot[p]
                               if (r := self.daemon.runners.get(name)) is not None]
                    self.daemon.schedule.commits.push(runners, "watch")
                current = {_local_path(r.cfg.repo) for r in list(self.daemon.runners.values())} - {None}
                if current != set(snapshot):
                    break  # the app set changed: re-arm the watch


def _local_path(repo: str) -> Path | None:
    if repo.startswith("file://"):
        return Path(repo[len("file://"):])
    if repo.startswith("/"):
        return Path(repo)
    return None
