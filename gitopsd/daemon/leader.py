"""Leader election with a coordination.k8s.io/v1 Lease, and the write fence.

Only the leader reconciles, so two replicas never apply at once. The rules
follow client-go's leaderelection: a holder renews the lease every
`renew_interval`; a lease whose renewTime + leaseDurationSeconds has passed
may be taken over by anyone, using the resourceVersion as an optimistic lock
(a lost race is a 409 and simply means someone else won).

Clocks: expiry is judged the way client-go does it, on this process's own
monotonic clock — a lease is expired when its record (holder, renewTime,
transitions) has not changed for leaseDurationSeconds since *we* last saw it
change — so a skewed wall clock on one node cannot steal a live lease. A
leader that reads another holder on the lease steps down at once. Lease
requests have a short timeout and no retries: a renewal must never outlast
the time the lease buys, and a decision taken on a read older than that time
is not acted on (the lease may have moved meanwhile: read it again).

The fence. Leader election alone does not stop a leader that has stopped
noticing time — a process paused (SIGSTOP, a frozen VM, a long GC) past its
lease wakes up mid-apply while a standby already leads; client-go's docs
warn of exactly this. So every write checks one rule just before it is sent
(`LeaderElector.may_write`):

    monotonic now < start of our last successful renewal + lease duration − margin

The renewal is timed from before its request left, so the apiserver (and any
standby watching the lease) saw it no earlier; CLOCK_MONOTONIC keeps counting
while the process is stopped, so after a pause the rule fails at once, before
any renewal is tried; the margin (by default one renewal interval, which is
client-go's RenewDeadline at its defaults) covers the time a checked request
takes to arrive and a standby's clock running a little fast. What no client
can close is the instant between the check and the bytes leaving: Kubernetes
has no fencing token a server could check across objects.

Leadership comes in terms: a term ends when the rule fails, and a renewal
after that starts a new term (with the daemon's start-of-leadership work)
rather than reviving the old one, so work begun in an old term never writes
in a new one (FencedKube).

Renewals are writes to the Lease, not to any app's objects; they are the
price of running two replicas and are counted apart from reconcile traffic.
They go through the plain Kube: the fence guards everything else.

Sharding (gitopsd.daemon.shards) runs one elector per shard Lease, with the
same rules, plus two hooks that only ever make an elector *less* eager:
`may_acquire` (asked before campaigning for a lease it does not hold; no
request is sent when it says no) and `should_release` (asked while leading;
yes ends the term and releases the lease: a hand-over). Reads of the lease
made elsewhere (the shard view's LIST) feed the same expiry clock through
`observe`, so a lease the view has watched expire is not waited on a second
time; a read can only move the moment a record was last seen to change
later, never earlier, so no feed makes a live lease look expired.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from gitopsd.errors import ClusterError, LeadershipLost  # noqa: F401 - re-exported: the fence raises it
from gitopsd.kube import Kube, KubeApiError, Resource, ServiceAccount

log = structlog.get_logger("gitopsd.daemon.leader")
WEBHOOK_URL_ANNOTATION = "gitopsd.io/webhook-url"
# A lease request that keeps failing the same way (revoked credentials, an
# apiserver down for an hour) is logged once, then again at most this often
# with a count, instead of at every retry.
REPEAT_LOG_INTERVAL = 60.0


class FencedKube:
    """A Kube whose every write first passes `fence` (which raises LeadershipLost).

    Reads, watches and dry runs pass untouched; so does everything else, by
    delegation. The check runs before the request is built and again inside
    Kube.request just before the bytes are sent (and before every retry), which
    keeps the window between check and send as small as a client can make it. Like controller-runtime's client wrappers (WithFieldOwner,
    NewDryRunClient), it wraps the client every write path already uses:
    apply, prune, the ApplySet parent, audit segments, Events, status and
    self-heal are fenced without each having to remember to check.
    """

    def __init__(self, kube: Kube, fence: Callable[[], None]) -> None:
        self._kube = kube
        self.check = fence

    def __getattr__(self, name: str):
        return getattr(self._kube, name)

    def impersonating(self, account: ServiceAccount) -> "FencedKube":
        """The wrapped Kube as `account` (an app's ServiceAccount), fenced the same: an app's writes
        made as its account are leader writes too. (Delegated blindly, the view would be unfenced.)"""
        return FencedKube(self._kube.impersonating(account), self.check)

    def request(self, method: str, path: str, *, query: dict | list | None = None, **kwargs) -> dict:
        if method != "GET" and not _dry_run(query):
            self.check()
            kwargs["fence"] = self.check
        return self._kube.request(method, path, query=query, **kwargs)

    def apply(self, obj: dict, *, dry_run: bool = False, **kwargs) -> dict:
        if not dry_run:
            self.check()
            kwargs["fence"] = self.check
        return self._kube.apply(obj, dry_run=dry_run, **kwargs)

    def json_patch(self, res: Resource, name: str, namespace: str | None, operations: list[dict], **kwargs) -> dict:
        self.check()
        return self._kube.json_patch(res, name, namespace, operations, fence=self.check, **kwargs)

    def create(self, res: Resource, obj: dict, **kwargs) -> dict:
        self.check()
        return self._kube.create(res, obj, fence=self.check, **kwargs)

    def delete(self, res: Resource, name: str, namespace: str | None = None, *, dry_run: bool = False,
               **kwargs) -> bool:
        if not dry_run:
            self.check()
            kwargs["fence"] = self.check
        return self._kube.delete(res, name, namespace, dry_run=dry_run, **kwargs)


def _dry_run(query: dict | list | None) -> bool:
    return bool(query) and "dryRun" in (query if isinstance(query, dict) else dict(query))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Sighting:
    """When this process last saw a Lease's record change, on its own monotonic clock: the expiry rule.

    The record is (holder, renewTime, transitions); an absent Lease is a record too (no holder). A
    holder is live while its record has not changed for less than the lease's duration since *we*
    saw it change — never judged on the wall-clock renewTime, so a skewed node cannot steal a lease.
    Thread-safe: an elector's GET and the shard view's LIST both report here.
    """

    def __init__(self, clock: Callable[[], float], *, default_duration: float) -> None:
        self._clock = clock
        self._default = default_duration
        self._lock = threading.Lock()
        self.record: tuple | None = None
        self.since = 0.0
        self.duration = default_duration
        self.url: str | None = None          # the holder's webhook URL (WEBHOOK_URL_ANNOTATION)

    def see(self, lease: dict | None) -> None:
        spec = (lease or {}).get("spec") or {}
        record = (spec.get("holderIdentity") or "", spec.get("renewTime"), int(spec.get("leaseTransitions") or 0),
                  lease is None)
        annotations = ((lease or {}).get("metadata") or {}).get("annotations") or {}
        with self._lock:
            if record != self.record:
                self.record, self.since = record, self._clock()
            self.duration = float(spec.get("leaseDurationSeconds") or self._default)
            self.url = annotations.get(WEBHOOK_URL_ANNOTATION) or None

    @property
    def holder(self) -> str:
        return self.record[0] if self.record else ""

    def held(self) -> bool:
        """A holder that renewed within the lease duration, by our clock (unseen: not held)."""
        with self._lock:
            return bool(self.record and self.record[0]) and self._clock() - self.since < self.duration

    def vacant_for(self) -> float:
        """Seconds the lease has been free to take, by our clock (≤ 0 while held; 0 when never seen):
        since it was seen released or absent, or since its holder's duration ran out."""
        with self._lock:
            if self.record is None:
                return 0.0
            elapsed = self._clock() - self.since
            return elapsed if not self.record[0] else elapsed - self.duration


class LeaderElector:
    """Campaign for a Lease in a background thread; call back on gain and loss.

    `clock` is the monotonic clock every deadline is judged on (injectable
    for tests); `margin` is how long before the lease could pass to another
    replica this one stops writing. By default it is one renewal interval
    (client-go's RenewDeadline at its defaults: 15 s lease, writes for 10 s
    after a renewal), but never more than half the time between a renewal
    and the lease's end, so the next renewal always has that much room to
    land before the fence closes (a 3 s lease renewed every 2 s: margin 0.5 s).
    """

    def __init__(self, kube: Kube, *, namespace: str, name: str = "gitopsd-leader", identity: str,
                 lease_duration: float = 15.0, renew_interval: float = 5.0,
                 on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
                 advertise_url: str | None = None, margin: float | None = None,
                 clock: Callable[[], float] = time.monotonic, role: str = "leadership",
                 annotations: dict[str, str] | None = None,
                 may_acquire: Callable[[], bool] | None = None,
                 should_release: Callable[[], bool] | None = None) -> None:
        if renew_interval >= lease_duration:
            raise ValueError("renew_interval must be shorter than lease_duration")
        if margin is not None and not 0 <= margin < lease_duration - renew_interval:
            raise ValueError("margin must leave time to renew: 0 <= margin < lease_duration - renew_interval")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self.margin = min(renew_interval, (lease_duration - renew_interval) / 2) if margin is None else margin
        self._clock = clock
        self._on_start = on_started_leading
        self._on_stop = on_stopped_leading
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False
        self.term = 0                # counts leadership terms; work carries the term it began in
        self._last_renew = 0.0   # monotonic start time of our last successful acquire/renew
        self.sighting = Sighting(clock, default_duration=lease_duration)   # the expiry clock of the lease
        self._lost_to_other = False
        self._res = None
        self._failure: str | None = None     # the last lease request error, as logged
        self._failure_logged = 0.0
        self._failure_repeats = 0
        # Where this replica takes webhooks; the leader publishes it on the Lease
        # (in the same write as a renewal) so a standby can forward pushes to it.
        self.advertise_url = advertise_url
        self.leader_url: str | None = None
        self.role = role                      # names the lease's job in log lines: "leadership acquired"
        self.annotations = dict(annotations or {})   # written on the lease with every renewal
        self._may_acquire = may_acquire
        self._should_release = should_release

    @property
    def _lease_seconds(self) -> int:
        """The duration written on the Lease: what the other replicas wait for."""
        return max(1, int(round(self.lease_duration)))

    def may_write(self, term: int | None = None) -> bool:
        """The fencing rule (module docstring): may this replica write now — in `term`, if given?

        Judged on every call, not by the election thread, so neither a renewal
        stuck in a slow request nor a pause of the whole process leaves a write
        through after the lease could have passed to another replica.
        """
        if not self._leading or (term is not None and term != self.term):
            return False
        return self._clock() < self._last_renew + self._window

    def observe(self, lease: dict | None) -> None:
        """A read of this elector's Lease made elsewhere (None: absent): the same expiry clock."""
        self.sighting.see(lease)

    def start(self) -> None:
        self._res = self.kube.resource("coordination.k8s.io/v1", "Lease")
        thread = "leader-election" if self.role == "leadership" else f"lease-{self.name}"
        self._thread = threading.Thread(target=self._loop, name=thread, daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop campaigning; a leader releases the lease so a standby takes over at once."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.renew_interval + 5)
        if self._leading:
            self._set_leading(False)
            if release:
                self._release()

    # ------------------------------------------------------------ internals

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.renew_interval if self._leading else self.renew_interval / 2)

    def run_once(self) -> None:
        """One round of the campaign: end a lapsed term, then acquire or renew the lease.

        The background thread calls it every renew interval (half that as a
        standby); tests call it directly.
        """
        if self._leading and not self.may_write():
            # The fence has closed (no renewal in time, or the process was paused):
            # this term is over whatever the renewal below finds.
            self._set_leading(False)
        if self._leading and self._should_release is not None and self._should_release():
            self._set_leading(False)
            self._release()
            return
        if not self._leading and self._may_acquire is not None and not self._may_acquire():
            return   # not campaigning for this lease now: no request
        attempt = self._clock()
        try:
            ok = self._try_acquire_or_renew()
        except Exception as exc:  # noqa: BLE001 - the election must outlive any error
            self._complain(exc)
            ok = False
        else:
            self._failure = None
        if ok:
            self._last_renew = attempt
            if not self._leading:
                self._set_leading(True)
        elif self._leading and (self._lost_to_other or not self.may_write()):
            # Another holder, or no renewal for too long: give up before the
            # lease can expire for the others. Never two leaders.
            self._set_leading(False)

    def _complain(self, exc: Exception) -> None:
        """Log a failed lease request; the same error again only every REPEAT_LOG_INTERVAL, with a count."""
        error = str(exc)
        if isinstance(exc, KubeApiError) and exc.status == 401:
            # The first request a running daemon makes after its token was revoked is usually this one.
            error += ("\n  hint: the apiserver no longer accepts gitopsd's credentials (a revoked or expired "
                      "token, a deleted ServiceAccount?)")
        now = self._clock()
        if error == self._failure and now - self._failure_logged < REPEAT_LOG_INTERVAL:
            self._failure_repeats += 1
            return
        repeated = {"repeated": self._failure_repeats} if error == self._failure else {}
        log.warning("lease request failed", lease=self.name, error=error, **repeated)
        self._failure, self._failure_logged, self._failure_repeats = error, now, 0

    def _set_leading(self, leading: bool) -> None:
        if leading:
            self.term += 1
        self._leading = leading
        log.info(self.role + (" acquired" if leading else " lost"), lease=f"{self.namespace}/{self.name}",
                 identity=self.identity)
        (self._on_start if leading else self._on_stop)()

    def _spec(self, *, transitions: int, acquire_time: str) -> dict:
        now = _fmt(_now())
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self._lease_seconds,
                "acquireTime": acquire_time or now, "renewTime": now, "leaseTransitions": transitions}

    def _advertise(self, lease: dict) -> None:
        annotations = lease["metadata"].setdefault("annotations", {}) or {}
        lease["metadata"]["annotations"] = annotations
        annotations.update(self.annotations)
        if self.advertise_url:
            annotations[WEBHOOK_URL_ANNOTATION] = self.advertise_url
        else:
            annotations.pop(WEBHOOK_URL_ANNOTATION, None)

    def _get_lease(self) -> dict | None:
        try:
            return self.kube.request("GET", self._res.path(self.namespace, self.name),
                                     timeout=self._request_timeout, max_retries=0, exempt=True)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    @property
    def _request_timeout(self) -> float:
        return max(1.0, self.renew_interval)

    def _try_acquire_or_renew(self) -> bool:
        self._lost_to_other = False
        read_at = self._clock()
        lease = self._get_lease()
        self.observe(lease)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(transitions=0, acquire_time="")}
            self._advertise(body)
            if self._stale(read_at):
                return False
            try:
                self.kube.request("POST", self._res.path(self.namespace), body=body,
                                  timeout=self._request_timeout, max_retries=0, exempt=True)
                return True
            except KubeApiError as exc:
                if exc.status == 409:
                    return False
                raise
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = self._spec(transitions=transitions, acquire_time=spec.get("acquireTime", ""))
        else:
            self._lost_to_other = bool(holder)
            if self.sighting.held():
                self.leader_url = self.sighting.url
                return False  # held by a leader that renewed within the lease duration, by our clock
            new_spec = self._spec(transitions=transitions + 1, acquire_time="")
        lease["spec"] = new_spec
        self._advertise(lease)
        self.leader_url = None
        if self._stale(read_at):
            return False
        try:
            self.kube.request("PUT", self._res.path(self.namespace, self.name), body=lease,
                              timeout=self._request_timeout, max_retries=0, exempt=True)
            self._lost_to_other = False
            return True
        except KubeApiError as exc:
            if exc.status == 409:  # someone else renewed or took it first
                return False
            raise

    def _stale(self, read_at: float) -> bool:
        """Whether a lease read begun at `read_at` is too old to act on: older than the time a
        renewal buys (a pause since, not a slow GET — a GET times out well before). The lease may
        have moved meanwhile: read it again next round instead of sending a write that can only fail."""
        return self._clock() - read_at >= self._window

    @property
    def _window(self) -> float:
        """How long after a renewal began this replica may write."""
        return min(self.lease_duration, self._lease_seconds) - self.margin

    def _release(self) -> None:
        try:
            lease = self.kube.get(self._res, self.name, self.namespace)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            lease["spec"]["renewTime"] = _fmt(_now() - timedelta(seconds=60))
            self.kube.request("PUT", self._res.path(self.namespace, self.name), body=lease)
            log.info("lease released", lease=f"{self.namespace}/{self.name}", identity=self.identity)
        except (ClusterError, OSError) as exc:
            log.warning("lease release failed", lease=self.name, error=str(exc))
