"""The process's one concurrency budget (gitopsd.budget) and how gitopsd
behaves when the apiserver's API Priority and Fairness throttles it.

Pure logic first (the backoff schedule, the pause and window of the request
gate, the fan-out's deadlock freedom), with a fake clock and plain threads.
Then the real control plane: N requests in flight at most from several syncs
of one process, and a real APF throttle — a ServiceAccount whose FlowSchema
points at a PriorityLevelConfiguration of one nominal share, one queue of
one — under which a sync of a few hundred objects is refused with 429s,
slows down, never retries a request past the cap, and still converges.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import structlog
from helpers import (
    configmaps,
    delete_service_account_rbac,
    service_account_kubeconfig,
    wait_for,
)

from gitopsd import cli
from gitopsd.budget import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_CONCURRENCY,
    GROWTH_HOLD,
    RETRY_AFTER_MAX,
    Budget,
    Lane,
    ReconcilePool,
    RequestGate,
    full_jitter,
)
from gitopsd.engine.sync import AppSpec, sync
from gitopsd.kube import MAX_RETRIES, Kube
from gitopsd.metrics import REGISTRY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finishes(what: str, fn, timeout: float = 20.0):
    """Run fn on a daemon thread; fail (instead of hanging the run) if it does not return in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} did not finish within {timeout}s: a deadlock"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------- the backoff schedule

def test_full_jitter_stays_below_a_doubling_ceiling_and_the_cap():
    for attempt in range(12):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)
        assert full_jitter(attempt, rand=lambda: 0.0) == 0.0
        assert full_jitter(attempt, rand=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
        draws = [full_jitter(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert len(set(draws)) > 100, "jittered, not a fixed schedule"
    assert full_jitter(10_000) <= BACKOFF_CAP, "no overflow, still capped"


def test_a_throttle_pauses_for_retry_after_plus_jitter_and_the_pause_grows_to_the_cap():
    clock = Clock()
    gate = RequestGate(limit=16, clock=clock, rand=lambda: 1.0)

    pauses = []
    for _ in range(10):
        generation = gate.generation   # a request sent now, after the last pause
        gate.throttled(generation, retry_after=1.0, what="GET /x")
        pauses.append(gate.paused_until - clock.now)
        clock.now = gate.paused_until
    assert pauses[:3] == pytest.approx([1 + BACKOFF_BASE, 1 + 2 * BACKOFF_BASE, 1 + 4 * BACKOFF_BASE])
    assert max(pauses) == pytest.approx(1 + BACKOFF_CAP), "capped"

    gate.throttled(gate.generation, retry_after=3600.0, what="GET /x")
    assert gate.paused_until - clock.now <= RETRY_AFTER_MAX + BACKOFF_CAP, "an absurd Retry-After is bounded"


def test_a_success_ends_the_escalation():
    clock = Clock()
    gate = RequestGate(limit=16, clock=clock, rand=lambda: 1.0)
    for _ in range(4):
        gate.throttled(gate.generation, retry_after=None, what="GET /x")
    clock.now = gate.paused_until
    gate.leave(gate.enter(), ok=True)

    gate.throttled(gate.generation, retry_after=None, what="GET /x")

    assert gate.paused_until - clock.now == pytest.approx(BACKOFF_BASE), "back to the first step"


def test_refusals_of_requests_sent_before_the_pause_neither_extend_it_nor_halve_the_window_again():
    """Sixteen requests in flight are refused together: one reaction, not sixteen."""
    clock = Clock()
    gate = RequestGate(limit=16, clock=clock, rand=lambda: 1.0)
    generations = [gate.enter() for _ in range(16)]

    for g in generations:
        gate.throttled(g, retry_after=1.0, what="PATCH /x")
        gate.leave(g, ok=False)

    assert gate.throttles == 16
    assert gate.window == 8, "halved once"
    assert gate.paused_until - clock.now == pytest.approx(1 + BACKOFF_BASE), "paused once"


def test_the_window_halves_on_each_throttle_and_grows_back_with_successes():
    clock = Clock()
    gate = RequestGate(limit=16, clock=clock, rand=lambda: 0.0)
    for expected in (8, 4, 2, 1, 1):
        gate.throttled(gate.generation, retry_after=None, what="GET /x")
        assert gate.window == expected

    for _ in range(50):
        gate.leave(gate.enter(), ok=True)
    assert gate.window == 1, f"held for {GROWTH_HOLD} s after the throttle: probing at once earns the next one"

    clock.now += GROWTH_HOLD
    successes = 0
    while gate.window < 16 and successes < 1000:
        gate.leave(gate.enter(), ok=True)
        successes += 1
    assert 16 < successes < 200, "additive increase: about one more slot per window of successes"


def test_requests_in_flight_never_exceed_the_window():
    gate = RequestGate(limit=3)
    gate.throttled(gate.generation, retry_after=0.0, what="GET /x")   # window 1.5: one at a time
    held = gate.enter()
    second = threading.Thread(target=lambda: gate.leave(gate.enter(), ok=True))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the second request waits for the slot"
    gate.leave(held, ok=True)
    second.join(5)
    assert not second.is_alive() and gate.peak == 1


# ---------------------------------------------------------------- the shared fan-out

def test_a_fan_out_completes_while_every_shared_worker_is_busy():
    """Every thread of the shared executor is taken by work that waits for the
    fan-out to finish: the caller runs the items itself."""
    budget = Budget(limit=3)
    release = threading.Event()
    blockers = [budget._executor().submit(release.wait) for _ in range(3)]

    results = finishes("a fan-out on a busy pool", lambda: list(budget.map(lambda x: x * 2, range(10))))

    assert results == [x * 2 for x in range(10)]
    release.set()
    for b in blockers:
        b.result(5)


def test_a_nested_fan_out_does_not_wait_on_itself():
    """A reconcile fans out, and its items fan out again, three levels deep, on a
    pool far smaller than the work: it finishes."""
    budget = Budget(limit=2)
    threads: set[str] = set()

    def leaf(x: int) -> int:
        threads.add(threading.current_thread().name)
        time.sleep(0.001)   # the work itself: an item that takes time, so items overlap
        return x

    def middle(x: int) -> int:
        return sum(budget.map(leaf, range(x, x + 5)))

    def top(x: int) -> int:
        return sum(budget.map(middle, range(x, x + 4)))

    reconciles = budget.reconciles()
    futures = [reconciles.submit(lambda i=i: list(budget.map(top, range(i, i + 3)))) for i in range(8)]
    results = finishes("nested fan-outs", lambda: [f.result() for f in futures])

    assert results == [[sum(sum(range(m, m + 5)) for m in range(j, j + 4)) for j in range(i, i + 3)]
                       for i in range(8)]
    assert any(name.startswith("fanout") for name in threads), "the shared executor helped"


def test_a_budget_of_one_runs_a_fan_out_on_the_callers_thread_in_order():
    budget = Budget(limit=1)
    seen = []

    list(budget.map(lambda x: seen.append((x, threading.current_thread().name)), range(5)))

    assert [x for x, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {threading.current_thread().name}


def test_fan_out_results_come_in_input_order_and_an_error_is_raised_at_its_item():
    budget = Budget(limit=4)

    def slow_first(x: int) -> int:
        time.sleep(0.05 if x == 0 else 0)   # the work itself: the first item finishes last
        if x == 3:
            raise ValueError("item 3")
        return x

    out = []
    with pytest.raises(ValueError, match="item 3"):
        for value in budget.map(slow_first, range(8)):
            out.append(value)
    assert out == [0, 1, 2]


def test_a_fan_out_never_uses_more_threads_than_the_budget():
    budget = Budget(limit=3)
    running, peak, lock = [0], [0], threading.Lock()

    def work(_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)   # the work itself: long enough for items to run at once
        with lock:
            running[0] -= 1

    list(budget.map(work, range(30)))
    assert peak[0] == 3


# ---------------------------------------------------------------- the reconcile pool

def test_a_heal_overtakes_the_queued_polls_and_a_new_commit_the_rest_of_them():
    """All threads busy, a poll round queued: a heal submitted last runs first,
    then the webhook's run, then the polls in the order they came."""
    pool = ReconcilePool(1)
    started, release, ran = threading.Event(), threading.Event(), []
    try:
        busy = pool.submit(lambda: (started.set(), release.wait(20)))
        started.wait(20)
        futures = [pool.submit(ran.append, f"poll-{i}", lane=Lane.of("poll")) for i in range(5)]
        futures.append(pool.submit(ran.append, "webhook", lane=Lane.of("webhook")))
        futures.append(pool.submit(ran.append, "heal", lane=Lane.HEAL))
        assert pool.queued == 7
        release.set()
        busy.result(20)
        for f in futures:
            f.result(20)
    finally:
        pool.shutdown()
    assert ran == ["heal", "webhook", "poll-0", "poll-1", "poll-2", "poll-3", "poll-4"]


def test_every_trigger_but_a_poll_is_waited_for():
    assert Lane.of("poll") is Lane.POLL
    assert {Lane.of(r) for r in ("webhook", "watch", "config", "leader", "retry")} == {Lane.COMMIT}
    assert Lane.HEAL < Lane.COMMIT < Lane.POLL


def test_the_reconcile_pool_runs_at_most_its_threads_at_once_and_reports_errors_to_the_caller():
    pool = ReconcilePool(3)
    running, peak, lock, gate = [0], [0], threading.Lock(), threading.Barrier(3, timeout=20)

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < 3:
            gate.wait()   # the first three meet: three threads did run at once
        with lock:
            running[0] -= 1
        if i == 7:
            raise ValueError("item 7")
        return i

    try:
        futures = [pool.submit(work, i) for i in range(12)]
        with pytest.raises(ValueError, match="item 7"):
            futures[7].result(20)
        assert [f.result(20) for i, f in enumerate(futures) if i != 7] == [i for i in range(12) if i != 7]
    finally:
        pool.shutdown()
    assert peak[0] == 3


def test_shutting_the_reconcile_pool_down_cancels_what_is_queued_and_refuses_more():
    pool = ReconcilePool(1)
    started, release = threading.Event(), threading.Event()
    running = pool.submit(lambda: (started.set(), release.wait(20)))
    started.wait(20)
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    release.set()
    running.result(20)


def test_the_cli_default_concurrency_is_the_budgets():
    assert cli.DEFAULT_CONCURRENCY == DEFAULT_CONCURRENCY
    assert Budget(limit=DEFAULT_CONCURRENCY).connection_pool_size >= DEFAULT_CONCURRENCY


# ---------------------------------------------------------------- the real control plane

@pytest.mark.cluster
def test_the_whole_process_never_has_more_requests_in_flight_than_the_budget(kubeconfig, kube, namespace, repo,
                                                                             source_cache):
    """Three syncs at once (three apps of one process) share four request slots."""
    budget = Budget(limit=4)
    shared = Kube.connect(kubeconfig=kubeconfig, budget=budget)
    for i in range(3):
        repo.write(f"app{i}/cms.yaml", configmaps(40, prefix=f"app{i}-cm"))
    repo.commit()

    def run(i: int):
        spec = AppSpec(name=f"app{i}-{namespace[-5:]}", repo=repo.url, ref="main", path=f"app{i}",
                       namespace=namespace, inventory_namespace=namespace, timeout=60.0)
        return sync(shared, spec, cache_dir=source_cache / str(i))

    reconciles = budget.reconciles()   # as the daemon runs its apps
    try:
        futures = [reconciles.submit(run, i) for i in range(3)]
        results = finishes("three syncs", lambda: [f.result() for f in futures], timeout=180)
    finally:
        shared.close()

    assert [r.outcome.value for r in results] == ["Applied"] * 3, [r.errors for r in results]
    assert len(kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace,
                         label_selector=None)) >= 120
    assert budget.requests.peak == 4, f"at most (and here exactly) 4 in flight, saw {budget.requests.peak}"
    assert shared.requests["apply-dry-run"] >= 120 and shared.requests["apply"] >= 120


FLOWCONTROL = "/apis/flowcontrol.apiserver.k8s.io/v1"


@pytest.fixture
def throttled_identity(kube, kubeconfig, namespace, tmp_path):
    """A kubeconfig for a ServiceAccount that API Priority and Fairness holds to a
    tiny priority level: one nominal share (a seat or two), no borrowing, one
    queue of length one. Everything cluster-scoped is deleted afterwards."""
    name = f"{namespace[:40]}-apf-{uuid.uuid4().hex[:4]}"
    path = service_account_kubeconfig(kube, kubeconfig, namespace, tmp_path, name=name, rules=[
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    ])
    kube.request("POST", f"{FLOWCONTROL}/prioritylevelconfigurations", body={
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
        "metadata": {"name": name},
        "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Queue", "queuing": {"queues": 1, "handSize": 1, "queueLengthLimit": 1}}}}})
    kube.request("POST", f"{FLOWCONTROL}/flowschemas", body={
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema", "metadata": {"name": name},
        "spec": {"priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 1000,
                 "distinguisherMethod": {"type": "ByUser"},
                 "rules": [{"subjects": [{"kind": "ServiceAccount",
                                          "serviceAccount": {"name": name, "namespace": namespace}}],
                            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                               "namespaces": ["*"], "clusterScope": True}],
                            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}})

    def in_force():
        status = kube.request("GET", f"{FLOWCONTROL}/flowschemas/{name}").get("status") or {}
        return any(c["type"] == "Dangling" and c["status"] == "False" for c in status.get("conditions") or [])
    wait_for("the apiserver to take up the FlowSchema", in_force)
    yield path
    for kind in ("flowschemas", "prioritylevelconfigurations"):
        kube.request("DELETE", f"{FLOWCONTROL}/{kind}/{name}")
    delete_service_account_rbac(kube, name)


class SendLog:
    """Wraps a Kube's connection pool: when each request was sent and answered, and how."""

    def __init__(self, pool) -> None:
        self._pool = pool
        self.sent: list[float] = []
        self.answers: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def request(self, *args, **kwargs):
        with self._lock:
            self.sent.append(time.monotonic())
        resp = self._pool.request(*args, **kwargs)
        with self._lock:
            self.answers.append((time.monotonic(), resp.status))
        return resp

    def __getattr__(self, name):
        return getattr(self._pool, name)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


@pytest.mark.cluster
def test_a_sync_throttled_by_priority_and_fairness_slows_down_stays_within_the_retry_cap_and_converges(
        throttled_identity, app, repo, kube, namespace, source_cache):
    objects = 200
    repo.write("cms.yaml", configmaps(objects))
    repo.commit()
    budget = Budget(limit=16)
    identity = Kube.connect(kubeconfig=throttled_identity, budget=budget)
    sends = SendLog(identity._pool)
    identity._pool = sends
    attempts_before = {le: sample("gitopsd_apiserver_request_attempts_bucket", le=le)
                       for le in (f"{float(MAX_RETRIES + 1)}", "+Inf")}
    paused_before = sample("gitopsd_apiserver_throttle_pause_seconds_total")
    throttled_before = sum(sample("gitopsd_apiserver_throttled_total", verb=v)
                           for v in ("apply", "apply-dry-run", "get", "list", "discovery"))

    try:
        with structlog.testing.capture_logs() as logs:
            result = sync(identity, app.spec(), cache_dir=source_cache)
    finally:
        identity.close()

    # It converged: every object is there, as the commit says.
    assert result.outcome.value == "Applied", (result.reason, result.errors[:5])
    live = {o["metadata"]["name"] for o in kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace)}
    assert {f"cm-{i:03d}" for i in range(objects)} <= live

    # The apiserver did throttle it, and every refusal was counted.
    refused = [t for t, status in sends.answers if status == 429]
    assert refused, "the tiny priority level refused some requests (429)"
    throttled = sum(sample("gitopsd_apiserver_throttled_total", verb=v)
                    for v in ("apply", "apply-dry-run", "get", "list", "discovery")) - throttled_before
    assert throttled == len(refused) == budget.requests.throttles
    assert sample("gitopsd_apiserver_throttle_pause_seconds_total") - paused_before >= 1.0, \
        "the process paused at least the Retry-After (APF says 1 s)"

    # The first 429 (Retry-After: 1) held back every request of the process for
    # that second; then fewer ran at once, so that few more were refused: it
    # did not hammer. (Sixteen threads sending at once against this priority
    # level with no pause and no window were refused three times in four.)
    first = refused[0]
    in_pause = [t - first for t in sends.sent if first + 0.05 < t < first + 0.95]
    share = len(refused) / len(sends.answers)
    figures = (f"{len(sends.answers)} answers, {len(refused)} of them 429 ({share:.0%}); "
               f"{budget.requests.generation} pauses; window {budget.requests.window:.1f} of 16 at the end")
    print(figures)   # shown with -s
    assert in_pause == [], f"requests sent during the pause after the first 429: {in_pause}"
    assert share < 0.25, figures
    assert budget.requests.peak <= 16

    # No request was sent more than the cap allows (1 + MAX_RETRIES), and some were retried.
    within = sample("gitopsd_apiserver_request_attempts_bucket", le=f"{float(MAX_RETRIES + 1)}")
    total = sample("gitopsd_apiserver_request_attempts_bucket", le="+Inf")
    assert within - attempts_before[f"{float(MAX_RETRIES + 1)}"] == total - attempts_before["+Inf"]
    assert len(sends.answers) > total - attempts_before["+Inf"], "retries happened"

    # One log line for the episode, not one per refusal.
    episodes = [e for e in logs if "throttling gitopsd" in e["event"]]
    assert len(episodes) == 1 < len(refused), episodes


@pytest.mark.cluster
def test_the_daemons_concurrency_flag_sizes_its_one_budget(start_daemon, tmp_path):
    from helpers import metric, write_config

    daemon = start_daemon(write_config(tmp_path / "apps.yaml", []), "--concurrency", "3", "--no-leader-elect")

    assert metric(daemon, "gitopsd_apiserver_concurrency_window") == 3
    assert metric(daemon, "gitopsd_apiserver_requests_in_flight") <= 3
