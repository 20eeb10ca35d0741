"""Sharding: several replicas split the apps, with Kubernetes Leases as the only coordination.

`gitopsd run --shards N`. With N = 1 (the default) nothing here runs: one
Lease `gitopsd-leader`, one leader reconciles every app (gitopsd.daemon.leader).
With N > 1:

- An app belongs to shard sha256(app name) mod N (`shard_of`): stable across
  processes, versions and restarts (Python's hash() is salted per process).
- Shard i is the Lease `gitopsd-shard-<i>-of-<N>` in gitopsd's namespace,
  held by at most one replica at a time under the leader election rules
  (optimistic lock, renewals, expiry judged on the local monotonic clock), and
  every write of a run for an app is fenced by its shard's term (FencedKube):
  two replicas never write for the same app, even across a pause. The shard
  count is in the name so that replicas configured with different counts
  never share a Lease that would mean different apps to each.
- Membership: each replica renews a Lease of its own, `gitopsd-member-<identity>`
  (its shard count in an annotation), and lists gitopsd's Leases once per
  renewal interval (`LeaseView`). A member is live while its record keeps
  changing within its lease duration, by our clock; a clean shutdown deletes
  it at once; a dead one is deleted by a survivor later (with a
  resourceVersion precondition, so a renewal in between wins).
- Balance without consensus: every replica computes the same assignment
  from the same list (`preferred_owners`): rendezvous hashing (the pair
  (shard, member) scores sha256(member/shard); the highest score wins) with
  a capacity of ⌊N/M⌋ or ⌈N/M⌉ shards per member, so M members hold N
  shards within one of each other. Pure highest-score rendezvous would be
  simpler but is binomially unbalanced (2 members, 8 shards: an even split
  only 27% of the time); the capacity costs a few extra moves when the
  membership changes.
- A replica campaigns for shard i only when it is the shard's preferred
  owner, or when the shard has been free (released, absent, or expired by
  our clock) for a whole lease duration — its preferred owner did not take
  it, so availability wins over balance. A replica holding a shard whose
  preferred owner is another member hands it over: it starts no new run of
  the shard's apps, and once none is in flight it ends the term and
  releases the Lease, which the preferred owner takes within half a renewal
  interval. A shard taken by that fallback is kept for FALLBACK_HOLD lease
  durations before being handed over again, so a member that stays live but
  never takes its shards (a stale view, a broken RBAC rule) cannot make a
  shard bounce every lease duration. Hand-overs wait for running reconciles
  (a health wait may take the app's timeout); failovers do not wait.
- So a replica that dies loses its shards within the lease duration (its
  terms are fenced before that), the survivors take them at their next
  round after expiry, and a replica that joins takes its share by hand-over.
  A replica judges every Lease it sees for the first time live (its clock
  has not watched it age), so one that starts beside the Leases of replicas
  that died waits a lease duration before counting them dead — as a
  client-go candidate does.
- Mixed configurations (a rolling update that changes --shards, or moves
  from one leader to shards): the configuration of the oldest live member
  (by its member Lease's creationTimestamp, set by the apiserver) is the
  active one; a member with another shard count campaigns for nothing and
  hands over whatever it holds. While a one-shard replica holds
  `gitopsd-leader` live, no sharded replica holds a shard at all, so an
  upgrade from one leader to shards never has two writers for an app. The
  reverse (lowering to --shards 1) cannot be closed from this side: a
  one-shard replica keeps today's behaviour exactly and does not look for
  members, so the sharded replicas step down within a renewal interval of
  seeing it lead — scale the sharded Deployment to 0 first if even that
  overlap matters.
- Work: a runner reconciles only while this replica holds its app's shard
  (Daemon.writer(app)); gaining a shard does for its apps what gaining the
  leader lease does for all (re-read the ApplySet parent, restore from the
  audit trail, trigger), losing it cancels their waits. Apps of other shards
  stay configured, idle, so /status can name their owner.
- Pushes (gitopsd.daemon.triggers): a push triggers the matching apps this
  replica owns and is forwarded once to each other replica that holds a
  shard with a matching app, at the webhook URL its shard Lease carries;
  a forwarded push is never forwarded again.

Cost: one LIST of gitopsd's Leases per renewal interval per replica, plus a
GET and a PUT per renewal of each Lease held (the member Lease and about N/M
shards). A standby shard elector that may not campaign sends nothing.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from gitopsd.daemon.leader import LeaderElector, Sighting
from gitopsd.errors import ClusterError
from gitopsd.kube import Kube, KubeApiError

log = structlog.get_logger("gitopsd.daemon.shards")

LEADER_LEASE = "gitopsd-leader"
MEMBER_PREFIX = "gitopsd-member-"
SHARD_PREFIX = "gitopsd-shard-"
SHARDS_ANNOTATION = "gitopsd.io/shards"
FALLBACK_HOLD = 10       # lease durations a shard taken by the fallback is kept before a hand-over
GC_AFTER = 4             # lease durations (at least a minute) a dead member's Lease is left before deletion


def shard_of(app: str, shards: int) -> int:
    """The shard of an app: sha256 of its name, mod the shard count (stable everywhere)."""
    return int.from_bytes(hashlib.sha256(app.encode()).digest()[:8], "big") % shards


def shard_lease_name(shard: int, shards: int) -> str:
    return f"{SHARD_PREFIX}{shard}-of-{shards}"


def member_lease_name(identity: str) -> str:
    """`gitopsd-member-<identity>`, made a valid object name; a hash keeps altered identities apart."""
    slug = re.sub(r"[^a-z0-9-]+", "-", identity.lower()).strip("-")[:200]
    if slug != identity:
        slug = f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}".strip("-")
    return MEMBER_PREFIX + slug


def _score(member: str, shard: int) -> bytes:
    return hashlib.sha256(f"{member}/{shard}".encode()).digest()


@functools.lru_cache(maxsize=64)
def _assign(shards: int, members: frozenset[str]) -> dict[int, str]:
    if not members:
        return {}
    base, extra = divmod(shards, len(members))
    load = dict.fromkeys(members, 0)
    owners: dict[int, str] = {}
    pairs = sorted(((_score(m, s), s, m) for s in range(shards) for m in members), reverse=True)
    for _, shard, member in pairs:
        if shard in owners:
            continue
        if load[member] < base or (load[member] == base and extra > 0):
            if load[member] == base:
                extra -= 1
            load[member] += 1
            owners[shard] = member
    return owners


def preferred_owners(shards: int, members: Iterable[str]) -> dict[int, str]:
    """{shard: member}: rendezvous hashing with ⌊N/M⌋..⌈N/M⌉ shards per member (module docstring).

    The strongest (shard, member) scores are served first, so each member gets
    the shards it scores highest on as far as capacity allows. Every replica
    that sees the same members computes the same answer, whatever their order.
    """
    return dict(_assign(shards, frozenset(members)))


@dataclass(frozen=True)
class Member:
    """A live replica as its member Lease shows it."""

    identity: str
    shards: int      # its --shards (0 when unreadable: another configuration)
    created: str     # the Lease's creationTimestamp (RFC 3339, sorts as text); "~" while not yet seen


def eligible(members: Iterable[Member], *, leader_held: bool) -> set[str]:
    """The members that may hold shards: those running the oldest live member's shard count,
    and none while a one-shard replica holds the leader Lease (module docstring)."""
    members = list(members)
    if leader_held or not members:
        return set()
    oldest = min(members, key=lambda m: (m.created, m.identity))
    return {m.identity for m in members if m.shards == oldest.shards}


def may_campaign(*, shard: int, me: str, members: set[str], owners: dict[int, str], vacant_for: float,
                 grace: float) -> bool:
    """Whether `me` may try to take `shard`: as its preferred owner, or when it has been free for `grace`."""
    if me not in members:
        return False
    return owners.get(shard) == me or vacant_for >= grace


def should_hand_over(*, shard: int, me: str, members: set[str], owners: dict[int, str], busy: bool,
                     keep: bool = False) -> bool:
    """Whether the holder `me` releases `shard` now: its preferred owner is another member (or `me`
    may hold none), no run of the shard is in flight, and it is not kept after a fallback."""
    if busy or (keep and me in members):
        return False
    return owners.get(shard) != me


class LeaseView:
    """What this replica knows of the others: one LIST of gitopsd's Leases per renewal interval.

    Shard Leases feed their electors' expiry clocks (LeaderElector.observe);
    member Leases and the leader Lease get a Sighting here. Leases of ours
    that nobody renews any more (dead members, shard Leases of another
    count, a leader Lease left behind by an upgrade) are deleted once free
    for `gc_after`.
    """

    def __init__(self, kube: Kube, *, namespace: str, own_member: str, electors: dict[str, LeaderElector],
                 lease_duration: float, clock: Callable[[], float]) -> None:
        self.kube, self.namespace, self.own_member = kube, namespace, own_member
        self._electors = electors
        self._duration, self._clock = lease_duration, clock
        self._gc_after = max(60.0, GC_AFTER * lease_duration)
        self._sightings: dict[str, Sighting] = {}
        self._members: dict[str, Member] = {}
        self._lock = threading.Lock()
        self.listed = threading.Event()     # set after the first complete LIST
        self._failure: str | None = None
        self._undeletable: set[str] = set()   # stale Leases whose deletion failed (said once each)

    def refresh(self) -> None:
        res = self.kube.resource("coordination.k8s.io/v1", "Lease")
        try:
            leases = self.kube.list(res, namespace=self.namespace)
        except (ClusterError, OSError) as exc:
            if str(exc) != self._failure:
                log.warning("cannot list leases", namespace=self.namespace, error=str(exc))
            self._failure = str(exc)
            return
        self._failure = None
        found = {lease["metadata"]["name"]: lease for lease in leases}
        for name, elector in self._electors.items():
            elector.observe(found.get(name))
        with self._lock:
            for name in set(self._sightings) - set(found):
                del self._sightings[name]
                self._members.pop(name, None)
            for name, lease in found.items():
                if name in self._electors or not (name == LEADER_LEASE or name.startswith((MEMBER_PREFIX,
                                                                                              SHARD_PREFIX))):
                    continue
                self._sightings.setdefault(name, Sighting(self._clock, default_duration=self._duration)).see(lease)
                if name.startswith(MEMBER_PREFIX):
                    self._members[name] = _member(lease)
        self.listed.set()
        self._collect(found)

    def members(self) -> list[Member]:
        """The live members other than this replica."""
        with self._lock:
            return [m for name, m in self._members.items()
                    if name != self.own_member and self._sightings[name].held()]

    def own_created(self) -> str:
        with self._lock:
            member = self._members.get(self.own_member)
        return member.created if member else "~"

    def leader_held(self) -> bool:
        with self._lock:
            sighting = self._sightings.get(LEADER_LEASE)
        return sighting is not None and sighting.held()

    def _collect(self, found: dict[str, dict]) -> None:
        with self._lock:
            stale = [name for name, s in self._sightings.items()
                     if name != self.own_member and s.vacant_for() >= self._gc_after]
        for name in stale:
            meta = found[name]["metadata"]
            try:
                self.kube.request("DELETE", self.kube.resource("coordination.k8s.io/v1", "Lease").path(
                    self.namespace, name), body={"kind": "DeleteOptions", "apiVersion": "v1",
                                                 "preconditions": {"resourceVersion": meta["resourceVersion"]}})
                log.info("stale lease deleted", lease=f"{self.namespace}/{name}")
            except KubeApiError as exc:
                if exc.status not in (404, 409):
                    self._cannot_delete(name, exc)
            except (ClusterError, OSError) as exc:
                self._cannot_delete(name, exc)

    def _cannot_delete(self, name: str, exc: Exception) -> None:
        if name not in self._undeletable:
            self._undeletable.add(name)
            log.warning("cannot delete a stale lease", lease=f"{self.namespace}/{name}", error=str(exc),
                        hint="gitopsd's Role needs delete on leases (deploy/base/rbac.yaml)")


def _member(lease: dict) -> Member:
    meta, spec = lease["metadata"], lease.get("spec") or {}
    try:
        shards = int((meta.get("annotations") or {}).get(SHARDS_ANNOTATION, "0"))
    except ValueError:
        shards = 0
    return Member(identity=spec.get("holderIdentity") or "", shards=shards, created=meta.get("creationTimestamp", "~"))


class Shards:
    """This replica's part in sharding: an elector per shard, its member Lease, the view, the rules.

    The daemon asks `elector_for(app)` (the term that fences the app's
    writes), `may_start(app)`, `held()`, `owner(app)` and `owner_url(app)`;
    it is told through `on_gained(shard)` / `on_lost(shard)` (from an
    elector's thread) and answers `busy(shard)`: whether a run of the
    shard's apps is in flight.
    """

    def __init__(self, kube: Kube, *, namespace: str, identity: str, count: int, lease_duration: float,
                 renew_interval: float, on_gained: Callable[[int], None], on_lost: Callable[[int], None],
                 busy: Callable[[int], bool], advertise_url: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count, self.identity, self.renew_interval = count, identity, renew_interval
        self._on_gained, self._on_lost, self._busy = on_gained, on_lost, busy
        self._clock = clock
        self._grace = lease_duration
        self._kept_until = [0.0] * count    # a shard taken by the fallback is kept until then
        self.electors = [LeaderElector(
            kube, namespace=namespace, name=shard_lease_name(i, count), identity=identity,
            lease_duration=lease_duration, renew_interval=renew_interval, clock=clock, role="shard",
            on_started_leading=functools.partial(self._gained, i), on_stopped_leading=functools.partial(on_lost, i),
            may_acquire=functools.partial(self._may_acquire, i), should_release=functools.partial(self._release, i))
            for i in range(count)]
        self.member = LeaderElector(
            kube, namespace=namespace, name=member_lease_name(identity), identity=identity,
            lease_duration=lease_duration, renew_interval=renew_interval, clock=clock, role="membership",
            annotations={SHARDS_ANNOTATION: str(count)}, on_started_leading=lambda: None,
            on_stopped_leading=lambda: None)
        self.view = LeaseView(kube, namespace=namespace, own_member=self.member.name, lease_duration=lease_duration,
                              electors={e.name: e for e in self.electors}, clock=clock)
        self.advertise_url = advertise_url
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the daemon's questions

    def shard_of(self, app: str) -> int:
        return shard_of(app, self.count)

    def elector_for(self, app: str) -> LeaderElector:
        return self.electors[self.shard_of(app)]

    def held(self) -> list[int]:
        return [i for i, e in enumerate(self.electors) if e.may_write()]

    def may_start(self, app: str) -> bool:
        """Whether a run of `app` may begin here: its shard held, and not being handed over."""
        shard = self.shard_of(app)
        if not self.electors[shard].may_write():
            return False
        members, owners = self._assignment()
        return not should_hand_over(shard=shard, me=self.identity, members=members, owners=owners, busy=False,
                                    keep=self._kept(shard))

    def owner(self, app: str) -> str | None:
        """Who holds the app's shard, as far as this replica knows (None: nobody live)."""
        elector = self.elector_for(app)
        if elector.may_write():
            return self.identity
        return elector.sighting.holder if elector.sighting.held() else None

    def owner_url(self, app: str) -> str | None:
        """Where the app's shard holder takes webhooks (None: held here, by nobody, or no URL)."""
        elector = self.elector_for(app)
        if elector.may_write() or not elector.sighting.held() or elector.sighting.holder == self.identity:
            return None
        return elector.sighting.url

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for elector in (self.member, *self.electors):
            elector.advertise_url = self.advertise_url
        self.member.start()
        self._thread = threading.Thread(target=self._loop, name="lease-view", daemon=True)
        self._thread.start()
        for elector in self.electors:
            elector.start()

    def stop(self, *, release: bool) -> None:
        """Leave: delete the member Lease first (the others then see this replica gone and take its
        shards as it releases them), then stop every elector — releasing only when `release`."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.renew_interval + 5)
        self.member.stop(release=False)
        try:
            self.member.kube.delete(self.member.kube.resource("coordination.k8s.io/v1", "Lease"), self.member.name,
                                    self.member.namespace)
            log.info("member lease deleted", lease=f"{self.member.namespace}/{self.member.name}")
        except (ClusterError, OSError) as exc:
            log.warning("cannot delete the member lease", lease=self.member.name, error=str(exc))
        for elector in self.electors:
            elector.stop(release=release)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.view.refresh()
            self._stop.wait(self.renew_interval)

    # ------------------------------------------------------------ the rules, per elector round

    def _assignment(self) -> tuple[set[str], dict[int, str]]:
        me = Member(identity=self.identity, shards=self.count, created=self.view.own_created())
        members = eligible([*self.view.members(), me], leader_held=self.view.leader_held())
        return members, preferred_owners(self.count, members)

    def _kept(self, shard: int) -> bool:
        return self._clock() < self._kept_until[shard]

    def _may_acquire(self, shard: int) -> bool:
        if self._stop.is_set() or not self.view.listed.is_set():
            return False   # never before the first LIST: the others' shares are not known yet
        members, owners = self._assignment()
        return may_campaign(shard=shard, me=self.identity, members=members, owners=owners,
                            vacant_for=self.electors[shard].sighting.vacant_for(), grace=self._grace)

    def _release(self, shard: int) -> bool:
        members, owners = self._assignment()
        return should_hand_over(shard=shard, me=self.identity, members=members, owners=owners,
                                busy=self._busy(shard), keep=self._kept(shard))

    def _gained(self, shard: int) -> None:
        members, owners = self._assignment()
        if owners.get(shard) != self.identity:
            self._kept_until[shard] = self._clock() + FALLBACK_HOLD * self._grace
        self._on_gained(shard)
