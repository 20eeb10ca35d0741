"""The leader lease and the write fence, as pure logic.

The elector runs against a fake Lease API and an injected monotonic clock
that the test moves by hand: a "pause" is the clock jumping while one
replica runs no round, exactly what SIGSTOP looks like from inside (Linux's
CLOCK_MONOTONIC keeps counting while a process is stopped). That a real
paused daemon sends nothing after waking is proven against the real control
plane by tests/test_faults.py::test_paused_leader_starts_no_write_after_waking_once_a_standby_took_over.
"""

from __future__ import annotations

import copy

import pytest

from gitopsd.budget import Budget
from gitopsd.daemon.leader import FencedKube, LeaderElector, LeadershipLost
from gitopsd.engine.apply import apply_plan
from gitopsd.engine.inventory import PART_OF_LABEL, Inventory
from gitopsd.engine.plan import Action, ObjectChange, Plan
from gitopsd.errors import GitopsdError
from gitopsd.kube import KubeApiError, Resource
from gitopsd.objects import ObjectRef

LEASE = Resource(group="coordination.k8s.io", version="v1", kind="Lease", plural="leases", namespaced=True)
CONFIGMAP = Resource(group="", version="v1", kind="ConfigMap", plural="configmaps", namespaced=True)
NAMESPACE = Resource(group="", version="v1", kind="Namespace", plural="namespaces", namespaced=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseApi:
    """One Lease in memory with the apiserver's optimistic lock; every request is logged
    as (who, method), and `on_get` lets a test act between a replica's read and its write."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0
        self.log: list[tuple[str, str]] = []
        self.on_get = None

    def client(self, who: str) -> "LeaseClient":
        return LeaseClient(self, who)


class LeaseClient:
    def __init__(self, api: LeaseApi, who: str) -> None:
        self.api, self.who = api, who

    def resource(self, api_version: str, kind: str) -> Resource:
        assert (api_version, kind) == ("coordination.k8s.io/v1", "Lease")
        return LEASE

    def request(self, method: str, path: str, *, body=None, **_) -> dict:
        api = self.api
        api.log.append((self.who, method))
        if method == "GET":
            lease = copy.deepcopy(api.lease)
            if api.on_get:
                api.on_get(self.who)
            if lease is None:
                raise KubeApiError(status=404, reason="NotFound", message="", method=method, path=path)
            return lease
        if method == "POST" and api.lease is not None or \
                method == "PUT" and body["metadata"].get("resourceVersion") != api.lease["metadata"]["resourceVersion"]:
            raise KubeApiError(status=409, reason="Conflict", message="", method=method, path=path)
        api.version += 1
        api.lease = copy.deepcopy(body)
        api.lease["metadata"]["resourceVersion"] = str(api.version)
        return copy.deepcopy(api.lease)

    def get(self, res, name, namespace=None) -> dict | None:
        try:
            return self.request("GET", res.path(namespace, name))
        except KubeApiError:
            return None

    def writes_by(self, who: str) -> list[str]:
        return [m for w, m in self.api.log if w == who and m != "GET"]


class Replica:
    """An elector plus the leadership callbacks it made, in order, and how many lease
    requests (of anyone) had been sent at each."""

    def __init__(self, api: LeaseApi, clock: Clock, name: str, *, lease: float = 15, renew: float = 5) -> None:
        self.calls: list[str] = []
        self.requests_at: list[int] = []

        def call(what: str) -> None:
            self.calls.append(what)
            self.requests_at.append(len(api.log))
        self.elector = LeaderElector(api.client(name), namespace="gitopsd-system", identity=name,
                                     lease_duration=lease, renew_interval=renew, clock=clock,
                                     on_started_leading=lambda: call("started"),
                                     on_stopped_leading=lambda: call("stopped"))
        self.elector._res = LEASE   # what start() looks up, without starting the thread

    def round(self) -> None:
        self.elector.run_once()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api() -> LeaseApi:
    return LeaseApi()


# ---------------------------------------------------------------- the rule

def test_a_leader_may_write_until_its_renewal_plus_lease_duration_minus_margin(api, clock):
    a = Replica(api, clock, "a", lease=15, renew=5)
    started = clock.now
    api.on_get = lambda who: setattr(clock, "now", clock.now + 0.5)   # the round trip takes half a second
    a.round()
    api.on_get = None
    assert a.calls == ["started"]
    assert a.elector.margin == 5

    clock.now = started + 9.99
    assert a.elector.may_write()
    clock.now = started + 10.0
    assert not a.elector.may_write(), "timed from before the renewal was sent, not from its answer"


def test_each_renewal_moves_the_fence_on(api, clock):
    a = Replica(api, clock, "a", lease=15, renew=5)
    a.round()
    clock.now += 5
    a.round()
    clock.now += 9.9
    assert a.elector.may_write()
    assert a.calls == ["started"], "one term"


def test_a_renewal_that_keeps_failing_closes_the_fence_before_the_lease_expires_for_others(api, clock):
    a = Replica(api, clock, "a", lease=3, renew=1)
    a.round()
    renewed = clock.now

    def down(method, path, **_):
        raise KubeApiError(status=503, reason="ServiceUnavailable", message="", method=method, path=path)

    a.elector.kube.request = down
    for _ in range(3):
        clock.now += 1
        a.round()
    assert not a.elector.may_write()
    assert a.calls == ["started", "stopped"]
    assert clock.now < renewed + 3 + 0.01, "stepped down no later than the lease could pass to a standby"


def test_the_default_margin_leaves_the_next_renewal_room_to_land(api, clock):
    for lease, renew, margin in ((15, 5, 5), (3, 1, 1), (3, 2, 0.5), (15, 10, 2.5)):
        elector = Replica(api, clock, "a", lease=lease, renew=renew).elector
        assert elector.margin == margin, (lease, renew)
        assert lease - margin - renew >= margin, "a renewal sent on time has at least a margin to spare"
    with pytest.raises(ValueError, match="margin must leave time to renew"):
        LeaderElector(api.client("a"), namespace="x", identity="a", lease_duration=3, renew_interval=1, margin=2,
                      on_started_leading=lambda: None, on_stopped_leading=lambda: None)


# ---------------------------------------------------------------- a pause

def test_a_paused_leader_is_fenced_the_moment_it_wakes_before_any_renewal(api, clock):
    a, b = Replica(api, clock, "a", lease=3, renew=1), Replica(api, clock, "b", lease=3, renew=1)
    a.round()
    b.round()
    term = a.elector.term
    assert a.elector.may_write(term) and b.calls == []

    # a is stopped: its clock runs on, its rounds do not; b sees the lease unchanged and takes it.
    for _ in range(8):
        clock.now += 0.5
        b.round()
    assert b.calls == ["started"]

    # a wakes up: whatever thread of it runs first, the fence is already closed.
    woke = len(api.log)
    assert not a.elector.may_write() and not a.elector.may_write(term)
    a.round()
    assert a.calls == ["started", "stopped"]
    assert a.requests_at[-1] == woke, "the term ended before the lease was even read"
    assert api.log[woke:] == [("a", "GET")], "and a sent no write to the lease either"
    assert b.elector.may_write()


def test_a_renewal_after_the_fence_closed_starts_a_new_term_that_old_work_cannot_write_in(api, clock):
    a = Replica(api, clock, "a", lease=15, renew=5)
    a.round()
    old = a.elector.term
    clock.now += 11   # paused past the fence, but nobody took the lease meanwhile

    a.round()
    assert a.calls == ["started", "stopped", "started"], "a new term, with the daemon's start-of-term work"
    assert a.elector.may_write()
    assert not a.elector.may_write(old), "work begun in the old term stays fenced"
    assert a.elector.may_write(a.elector.term)


def test_a_lease_read_older_than_the_fence_window_is_not_acted_on(api, clock):
    a, b = Replica(api, clock, "a", lease=3, renew=1), Replica(api, clock, "b", lease=3, renew=1)
    a.round()
    b.round()
    clock.now += 3.5   # a is gone: the lease has been unchanged for longer than its duration
    # b reads the lease, then is paused before it can write: it must read again, not act on that read.
    api.on_get = lambda who: setattr(clock, "now", clock.now + 2)
    b.round()
    api.on_get = None
    assert b.calls == [] and LeaseClient(api, "b").writes_by("b") == []
    b.round()
    assert b.calls == ["started"], "the next round, on a fresh read, takes the lease"


# ---------------------------------------------------------------- the hooks sharding uses

def test_an_elector_that_may_not_acquire_sends_no_request():
    api, clock = LeaseApi(), Clock()
    allowed = [False]
    a = Replica(api, clock, "a", lease=3, renew=1)
    a.elector._may_acquire = lambda: allowed[0]
    a.round()
    assert api.log == [] and a.calls == []
    allowed[0] = True
    a.round()
    assert a.calls == ["started"]


def test_should_release_ends_the_term_and_hands_the_lease_to_a_standby_at_once(api, clock):
    a, b = Replica(api, clock, "a", lease=15, renew=5), Replica(api, clock, "b", lease=15, renew=5)
    a.round()
    b.round()
    term = a.elector.term
    a.elector._should_release = lambda: True
    a.round()
    assert a.calls == ["started", "stopped"] and not a.elector.may_write(term)
    assert api.lease["spec"]["holderIdentity"] == ""
    clock.now += 0.1
    b.round()
    assert b.calls == ["started"], "a released lease is taken without waiting for it to expire"


def test_a_read_made_elsewhere_runs_the_same_expiry_clock(api, clock):
    a, b = Replica(api, clock, "a", lease=3, renew=1), Replica(api, clock, "b", lease=3, renew=1)
    a.round()
    b.elector.observe(LeaseClient(api, "view").request("GET", "lease"))   # the shard view's LIST
    clock.now += 3   # a is gone; b's elector has sent nothing of its own meanwhile
    b.round()
    assert b.calls == ["started"], "expired by the view's sighting: no second lease duration to wait"


def test_a_stale_read_fed_in_only_delays_expiry(api, clock):
    a, b = Replica(api, clock, "a", lease=3, renew=1), Replica(api, clock, "b", lease=3, renew=1)
    a.round()
    old = LeaseClient(api, "view").request("GET", "lease")
    clock.now += 1
    a.round()               # a renews, then dies
    b.round()               # b sees the renewal
    clock.now += 1
    b.elector.observe(old)  # a LIST sent before the renewal, answered after
    clock.now += 2.2        # 3.2 s since b saw the renewal: expired, had the stale read not come in
    b.round()
    assert b.calls == [], "the stale record counts as a change: b waits a whole lease duration more"
    clock.now += 3
    b.round()
    assert b.calls == ["started"]


# ---------------------------------------------------------------- the fenced client

class RecordingKube:
    max_workers = 2

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def request(self, method, path, *, query=None, **_):
        self.sent.append((method, path, query))
        return {}

    def apply(self, obj, *, dry_run=False, **_):
        self.sent.append(("apply", obj["metadata"]["name"], dry_run))
        return obj

    def delete(self, res, name, namespace=None, *, dry_run=False, **_):
        self.sent.append(("delete", name, dry_run))
        return True

    def get(self, res, name, namespace=None):
        self.sent.append(("get", name))
        return {"metadata": {"name": name}}


def test_a_fenced_kube_refuses_every_write_before_sending_it_and_passes_reads_and_dry_runs():
    inner, open_ = RecordingKube(), [False]

    def fence():
        if not open_[0]:
            raise LeadershipLost()
    kube = FencedKube(inner, fence)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns"}}

    for write in (lambda: kube.apply(cm), lambda: kube.delete(CONFIGMAP, "x", "ns"),
                  *(lambda m=m: kube.request(m, "/api/v1/namespaces/ns/configmaps") for m in
                    ("POST", "PUT", "PATCH", "DELETE"))):
        with pytest.raises(LeadershipLost):
            write()
    assert inner.sent == [], "nothing reached the client"

    kube.get(CONFIGMAP, "x", "ns")
    kube.request("GET", "/api/v1/namespaces/ns/configmaps/x")
    kube.apply(cm, dry_run=True)
    kube.delete(CONFIGMAP, "x", "ns", dry_run=True)
    kube.request("PATCH", "/api/v1/namespaces/ns/configmaps/x", query={"dryRun": "All"})
    assert len(inner.sent) == 5 and kube.max_workers == 2, "reads, dry runs and attributes pass through"

    open_[0] = True
    kube.apply(cm)
    assert inner.sent[-1] == ("apply", "x", False)


def test_leadership_lost_says_how_many_writes_were_not_sent():
    assert str(LeadershipLost(3)) == "leadership lost mid-reconcile; 3 writes not sent"
    assert str(LeadershipLost(1)) == "leadership lost mid-reconcile; 1 write not sent"
    assert not isinstance(LeadershipLost(), GitopsdError), "no handler of user errors records or retries it"


# ---------------------------------------------------------------- apply at a closing fence

def test_apply_stops_at_a_closed_fence_sends_nothing_more_and_counts_what_it_did_not_send():
    inv = Inventory(app="big", namespace="gitopsd-system", group_kinds={"ConfigMap"},
                    namespaces={"gitopsd-system", "ns"}, exists=True)

    def cm(name: str, **meta) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ns", **meta}}
    creates = [ObjectChange(ref=ObjectRef("", "ConfigMap", "ns", f"cm-{i:02d}"), action=Action.CREATE,
                            source="cms.yaml", desired=cm(f"cm-{i:02d}"), resource=CONFIGMAP) for i in range(20)]
    prunes = [ObjectChange(ref=ObjectRef("", "ConfigMap", "ns", f"old-{i}"), action=Action.PRUNE, resource=CONFIGMAP,
                           live=cm(f"old-{i}", uid=f"u{i}", labels={PART_OF_LABEL: inv.id})) for i in range(3)]
    plan = Plan(app="big", inventory=inv, changes=creates + prunes, members=3)

    inner = RecordingKube()
    inner.budget = Budget(limit=1)   # one write at a time: the fence closes between two known writes
    inner.resource = lambda api_version, kind: NAMESPACE if kind == "Namespace" else CONFIGMAP

    def fence():
        if len([s for s in inner.sent if s[0] == "apply"]) >= 1 + 7:   # the widened parent, then 7 objects
            raise LeadershipLost()
    with pytest.raises(LeadershipLost) as lost:
        apply_plan(FencedKube(inner, fence), plan)

    applied = [s[1] for s in inner.sent if s[0] == "apply"]
    assert applied == ["gitopsd-big"] + [f"cm-{i:02d}" for i in range(7)]
    assert not [s for s in inner.sent if s[0] == "delete"], "no prune after a fenced stage"
    assert lost.value.unsent == 13 + 3
