"""Who may write for which app, and the fence on every write of a run.

Three modes behind one interface — the Daemon and its runners ask this,
never an elector:

- no election (`--no-leader-elect`): this process leads every app from
  start() until stop() has let running work end;
- one leader (`--shards 1`, the default): the Lease `gitopsd-leader` covers
  every app (gitopsd.daemon.leader);
- N shards: a Lease per shard, each app covered by its shard's
  (gitopsd.daemon.shards).

Gaining a lease re-reads the state of the apps it covers (another replica
may have written meanwhile) and triggers them; losing it cancels their
waits. Every write of a run passes `fence(term, app=...)` — the term the run
began in, of the lease that covers its app — so work begun under a lease
never writes once another replica may hold it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from gitopsd import metrics
from gitopsd.daemon.leader import FencedKube, LeaderElector, LeadershipLost
from gitopsd.daemon.shards import Shards
from gitopsd.kube import Kube

if TYPE_CHECKING:
    from gitopsd.daemon.runner import AppRunner


class Leadership:
    """The leases this replica holds and what they let it do (module docstring)."""

    def __init__(self, kube: Kube, *, namespace: str, instance: str, leader_elect: bool, shards: int,
                 lease_duration: float, lease_renew: float, advertise_url: str | None,
                 runners: Callable[[], dict[str, AppRunner]], stopped: threading.Event,
                 wake: Callable[[list[AppRunner], str], None]) -> None:
        self.kube = kube
        self._runners = runners
        self._wake = wake   # triggers.Schedule.wake: refresh each repository once, then trigger
        self._stopped = stopped
        self._leading = False     # one leader, or no election: set by _on_leading
        self.elector = (LeaderElector(kube, namespace=namespace, identity=instance, lease_duration=lease_duration,
                                      renew_interval=lease_renew, on_started_leading=self._on_leading,
                                      on_stopped_leading=self._on_standby, advertise_url=advertise_url)
                        if leader_elect and shards == 1 else None)
        self.shards = (Shards(kube, namespace=namespace, identity=instance, count=shards,
                              lease_duration=lease_duration, renew_interval=lease_renew,
                              on_gained=self._on_shard_gained, on_lost=self._on_shard_lost,
                              busy=self._shard_busy, advertise_url=advertise_url)
                       if shards > 1 else None)

    @property
    def leading(self) -> bool:
        """Whether this replica leads anything: the leader lease, or (with shards) any shard."""
        return bool(self.shards.held()) if self.shards else self._leading

    def start(self, *, advertise_url: Callable[[str | None], str | None]) -> None:
        """Campaign (or, without election, lead at once). `advertise_url` completes the webhook URL
        the leases publish, once the HTTP server knows its address."""
        if self.elector:
            self.elector.advertise_url = advertise_url(self.elector.advertise_url)
            self.elector.start()
        elif self.shards:
            self.shards.advertise_url = advertise_url(self.shards.advertise_url)
            self.shards.start()
        else:
            self._on_leading()

    def stop(self, *, release: bool) -> None:
        """Stop campaigning; release the leases only when `release` (no work of ours still running:
        otherwise they expire, so no other replica writes beside us)."""
        self._leading = False
        if self.elector:
            self.elector.stop(release=release)
        if self.shards:
            self.shards.stop(release=release)

    # ------------------------------------------------------------ the fence

    def may_write(self, term: int | None = None, *, app: str | None = None) -> bool:
        """The fencing rule (gitopsd.daemon.leader): may this replica write now — for `app`, in `term`?

        With leader election it is the elector's deadline; without, this
        process leads from start() until stop(). With shards it is the
        deadline of the app's shard; for no app in particular (the audit log's
        own fence, behind the runner's check of the app's term before each
        record) it is whether any shard is held.
        """
        if self.shards is not None:
            if app is None:
                return bool(self.shards.held())
            return self.shards.elector_for(app).may_write(term)
        if self.elector is None:
            return self._leading
        return self.elector.may_write(term)

    def fence(self, term: int | None = None, *, app: str | None = None) -> None:
        """The one check before every write: raises LeadershipLost when may_write says no."""
        if not self.may_write(term, app=app):
            raise LeadershipLost()

    def may_start(self, app: str | None = None) -> bool:
        """Whether new work (a reconcile, a self-heal) may begin — for `app`, if given. With shards:
        its shard is held here and not being handed over."""
        if self._stopped.is_set():
            return False
        if self.shards is not None and app is not None:
            return self.shards.may_start(app)
        return self.may_write()

    def writer(self, app: str | None = None, *, kube: Kube | None = None) -> FencedKube | None:
        """The Kube for one run of `app`'s work, fenced to the current term of its lease; None when
        no work may begin (with shards: always None without an app). A term that ends (even if this
        replica leads again at once) fences the run for good: it was planned under a lease another
        replica may have held since."""
        lease = self._lease_of(app)
        term = lease.term if lease else None
        if (self.shards is not None and app is None) or not self.may_start(app):
            return None
        return FencedKube(kube or self.kube, lambda: self.fence(term, app=app))

    def owner_url(self, app: str) -> str | None:
        """Where `app` runs when it does not run here: its shard holder's advertised URL, or the
        leader's for a standby (None: it runs here, nobody holds it, or no URL is published). The
        web view reads that replica's documents from there (gitopsd.web.views)."""
        if self.shards is not None:
            return self.shards.owner_url(app)
        if self.elector is None or self._leading:
            return None
        url = self.elector.leader_url
        return url if url and url != self.elector.advertise_url else None

    def _lease_of(self, app: str | None) -> LeaderElector | None:
        if self.shards is not None:
            return self.shards.elector_for(app) if app is not None else None
        return self.elector

    # ------------------------------------------------------------ what /readyz and /status say

    def describe(self) -> str:
        if self.shards:
            held = ",".join(map(str, self.shards.held())) or "none"
            return f"shards {held} of {self.shards.count}"
        return "leader" if self._leading else "standby"

    def status(self) -> dict:
        if not self.shards:
            return {"leader": self._leading}
        held = self.shards.held()
        return {"leader": bool(held), "shards": {"count": self.shards.count, "held": held}}

    def app_status(self, app: str) -> dict:
        """With shards: the app's shard and who holds it (None: nobody live, as far as we know)."""
        return {"shard": self.shards.shard_of(app), "owner": self.shards.owner(app)} if self.shards else {}

    # ------------------------------------------------------------ gaining and losing leases

    def _on_leading(self) -> None:
        self._leading = True
        self._count_held()
        _lead(list(self._runners().values()), self._wake)

    def _on_standby(self) -> None:
        self._leading = False
        self._count_held()
        _cancel(list(self._runners().values()))

    def _on_shard_gained(self, shard: int) -> None:
        self._count_held()
        _lead(self._runners_of(shard), self._wake)

    def _on_shard_lost(self, shard: int) -> None:
        self._count_held()
        _cancel(self._runners_of(shard))

    def _shard_busy(self, shard: int) -> bool:
        """Whether a reconcile or a self-heal of one of the shard's apps is in flight."""
        return any(r.running or r.exec_lock.locked() for r in self._runners_of(shard))

    def _runners_of(self, shard: int) -> list[AppRunner]:
        return [r for name, r in list(self._runners().items()) if self.shards.shard_of(name) == shard]

    def _count_held(self) -> None:
        held = len(self.shards.held()) if self.shards else int(self._leading)
        metrics.SHARDS_HELD.set(held)
        metrics.IS_LEADER.set(1 if held else 0)


def _lead(runners: list[AppRunner], wake: Callable[[list[AppRunner], str], None]) -> None:
    for r in runners:
        # Another replica may have led meanwhile: re-read the ApplySet parent,
        # rewrite status, and take the last applied commit from the audit trail
        # again (AppRunner._restore, before the next reconcile).
        r.inv, r.status_written, r.last_result, r.restored = None, None, None, False
    # Their repositories may have moved while another replica ran them: fetch again (once each).
    wake(runners, "leader")


def _cancel(runners: list[AppRunner]) -> None:
    for r in runners:
        r.cancel.set()
