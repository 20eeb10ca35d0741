"""Leader election with a coordination.k8s.io/v1 Lease.

Only the leader reconciles, so two replicas never apply at once. The rules
follow client-go's leaderelection: a holder renews the lease every
`renew_interval`; a lease whose renewTime + leaseDurationSeconds has passed
may be taken over by anyone, using the resourceVersion as an optimistic lock
(a lost race is a 409 and simply means someone else won). A leader that
cannot renew within `lease_duration` stops leading *before* the lease could
be taken by another replica, because it measures from its own last
successful renewal on its own clock.

Clocks: expiry is judged the way client-go does it, on this process's own
monotonic clock — a lease is expired when its record (holder, renewTime,
transitions) has not changed for leaseDurationSeconds since *we* last saw it
change — so a skewed wall clock on one node cannot steal a live lease. A
leader that reads another holder on the lease steps down at once. Lease
requests have a short timeout and no retries: a renewal must never outlast
the time the lease buys.

Renewals are writes to the Lease, not to any app's objects; they are the
price of running two replicas and are counted apart from reconcile traffic.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from gitopsd.errors import ClusterError
from gitopsd.kube import Kube, KubeApiError
from gitopsd.metrics import IS_LEADER

log = structlog.get_logger("gitopsd.leader")
WEBHOOK_URL_ANNOTATION = "gitopsd.io/webhook-url"
# A lease request that keeps failing the same way (revoked credentials, an
# apiserver down for an hour) is logged once, then again at most this often
# with a count, instead of at every retry.
REPEAT_LOG_INTERVAL = 60.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for a Lease in a background thread; call back on gain and loss."""

    def __init__(self, kube: Kube, *, namespace: str, name: str = "gitopsd-leader", identity: str,
                 lease_duration: float = 15.0, renew_interval: float = 5.0,
                 on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
                 advertise_url: str | None = None) -> None:
        if renew_interval >= lease_duration:
            raise ValueError("renew_interval must be shorter than lease_duration")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self._on_start = on_started_leading
        self._on_stop = on_stopped_leading
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False
        self._last_renew = 0.0   # monotonic start time of our last successful acquire/renew
        self._observed: tuple | None = None   # (holder, renewTime, transitions) last read
        self._observed_at = 0.0               # monotonic time that record last changed
        self._lost_to_other = False
        self._res = None
        self._failure: str | None = None     # the last lease request error, as logged
        self._failure_logged = 0.0
        self._failure_repeats = 0
        # Where this replica takes webhooks; the leader publishes it on the Lease
        # (in the same write as a renewal) so a standby can forward pushes to it.
        self.advertise_url = advertise_url
        self.leader_url: str | None = None

    @property
    def is_leader(self) -> bool:
        """Leading, and our last renewal is recent enough that nobody else can hold
        the lease: checked on every call, so a renewal stuck in a slow request
        cannot leave us writing after the lease has passed to another replica."""
        return self._leading and time.monotonic() - self._last_renew < self.lease_duration - self.renew_interval

    def start(self) -> None:
        self._res = self.kube.resource("coordination.k8s.io/v1", "Lease")
        self._thread = threading.Thread(target=self._loop, name="leader-election", daemon=True)
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
            attempt = time.monotonic()
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
            elif self._leading and (self._lost_to_other or not self.is_leader):
                # Another holder, or no renewal for too long: give up before the
                # lease can expire for the others. Never two leaders.
                self._set_leading(False)
            self._stop.wait(self.renew_interval if self._leading else self.renew_interval / 2)

    def _complain(self, exc: Exception) -> None:
        """Log a failed lease request; the same error again only every REPEAT_LOG_INTERVAL, with a count."""
        error = str(exc)
        if isinstance(exc, KubeApiError) and exc.status == 401:
            # The first request a running daemon makes after its token was revoked is usually this one.
            error += ("\n  hint: the apiserver no longer accepts gitopsd's credentials (a revoked or expired "
                      "token, a deleted ServiceAccount?)")
        now = time.monotonic()
        if error == self._failure and now - self._failure_logged < REPEAT_LOG_INTERVAL:
            self._failure_repeats += 1
            return
        repeated = {"repeated": self._failure_repeats} if error == self._failure else {}
        log.warning("lease request failed", lease=self.name, error=error, **repeated)
        self._failure, self._failure_logged, self._failure_repeats = error, now, 0

    def _set_leading(self, leading: bool) -> None:
        self._leading = leading
        IS_LEADER.set(1 if leading else 0)
        log.info("leadership " + ("acquired" if leading else "lost"), lease=f"{self.namespace}/{self.name}",
                 identity=self.identity)
        (self._on_start if leading else self._on_stop)()

    def _spec(self, *, transitions: int, acquire_time: str) -> dict:
        now = _fmt(_now())
        return {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, int(round(self.lease_duration))),
                "acquireTime": acquire_time or now, "renewTime": now, "leaseTransitions": transitions}

    def _advertise(self, lease: dict) -> None:
        annotations = lease["metadata"].setdefault("annotations", {}) or {}
        lease["metadata"]["annotations"] = annotations
        if self.advertise_url:
            annotations[WEBHOOK_URL_ANNOTATION] = self.advertise_url
        else:
            annotations.pop(WEBHOOK_URL_ANNOTATION, None)

    def _get_lease(self) -> dict | None:
        try:
            return self.kube.request("GET", self._res.path(self.namespace, self.name),
                                     timeout=self._request_timeout, max_retries=0)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    @property
    def _request_timeout(self) -> float:
        return max(1.0, self.renew_interval)

    def _try_acquire_or_renew(self) -> bool:
        self._lost_to_other = False
        lease = self._get_lease()
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(transitions=0, acquire_time="")}
            self._advertise(body)
            try:
                self.kube.request("POST", self._res.path(self.namespace), body=body,
                                  timeout=self._request_timeout, max_retries=0)
                return True
            except KubeApiError as exc:
                if exc.status == 409:
                    return False
                raise
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        record = (holder, spec.get("renewTime"), transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        if holder == self.identity:
            new_spec = self._spec(transitions=transitions, acquire_time=spec.get("acquireTime", ""))
        else:
            self._lost_to_other = bool(holder)
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if holder and time.monotonic() - self._observed_at < duration:
                self.leader_url = ((lease["metadata"].get("annotations") or {}).get(WEBHOOK_URL_ANNOTATION)
                                   or None)
                return False  # held by a leader that renewed within the lease duration, by our clock
            new_spec = self._spec(transitions=transitions + 1, acquire_time="")
        lease["spec"] = new_spec
        self._advertise(lease)
        self.leader_url = None
        try:
            self.kube.request("PUT", self._res.path(self.namespace, self.name), body=lease,
                              timeout=self._request_timeout, max_retries=0)
            self._lost_to_other = False
            return True
        except KubeApiError as exc:
            if exc.status == 409:  # someone else renewed or took it first
                return False
            raise

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
