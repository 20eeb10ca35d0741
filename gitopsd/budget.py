"""The process's one concurrency budget: how hard gitopsd may push the apiserver.

One `Budget` is made once, from `--concurrency`, and handed to the Kube
(`Kube.connect(budget=...)`), which every stage and the daemon already
receive; nothing else makes threads or limits of its own. It bounds three
things, all derived from that one number N:

- requests in flight to the apiserver from the whole process (all
  reconciles, applies, dry-runs, LISTs together): at most N (`RequestGate`).
  Watches are long-lived streams, not requests; they are not counted, nor
  are lease renewals (Kube.request(exempt=True)), whose lateness would cost
  leadership while ordinary work queues for a slot;
- parallel fan-out (the dry-runs of a plan, the applies of a stage, the
  LISTs of members): one shared executor (`Budget.map`), never an executor
  per call;
- concurrent reconciles in the daemon: `reconcile_workers` threads. A
  reconcile mostly waits (Git, the renderer, a health wait), so there are
  more of them than request slots; the request slots are what bound the
  load on the apiserver. Work waiting for one of these threads is taken by
  lane, not by arrival (`ReconcilePool`): a heal first (someone's hand edit
  is live now), then a new commit (someone is waiting for their push), then
  the polls, which only confirm that nothing changed. In a fleet a poll
  round queues hundreds of runs; a heal queued behind them would wait for
  all of them.

Deadlock freedom of the fan-out. A reconcile on a pool thread may fan out,
and an item of a fan-out may fan out again. So the caller of `map` works on
its own items instead of only waiting, helpers are extra hands that may or
may not come, and the caller only ever waits for items a running thread has
already claimed. A helper still queued when the items run out finds nothing
to do (or is cancelled). Request slots are held only for the duration of one
HTTP exchange, never while waiting for anything else. Hence no cycle: every
wait is for work in progress on a live thread.

API Priority and Fairness. APF throttles per flow (our identity): answering
a 429 by hammering in parallel is exactly what it punishes. So a 429 (or a
503 with Retry-After) closes one gate for the whole process: every request,
not only the refused one, waits out the same pause, the server's Retry-After
plus a jittered exponential backoff that grows while refusals continue and
is capped. The number of requests in flight is halved at the same time and
grows back by one per window of successes (AIMD, as TCP does), so the rate
after a throttle is lower than the rate that caused it. Refusals of requests
sent before the gate closed (in flight at the time) neither escalate the
backoff nor halve the window again: one reaction per round trip. One log
line per throttle episode (refusals less than EPISODE_QUIET apart), counters
for the rest (gitopsd.metrics).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from enum import IntEnum
from typing import TypeVar

import structlog

from gitopsd.metrics import (
    APISERVER_IN_FLIGHT,
    APISERVER_THROTTLE_PAUSE,
    APISERVER_WINDOW,
)

log = structlog.get_logger("gitopsd.budget")

T = TypeVar("T")
R = TypeVar("R")

#: The default of --concurrency, for a gitopsd pod of about two cores.
DEFAULT_CONCURRENCY = 16
#: Reconciles that may run at once, per request slot (they mostly wait).
RECONCILES_PER_SLOT = 4
#: Backoff of the throttle gate and of per-request retries: the first ceiling
#: and the cap, seconds (full jitter: a uniform draw below the ceiling).
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0
#: A Retry-After longer than this is not believed (a proxy's "come back in an hour").
RETRY_AFTER_MAX = 60.0
#: After a throttle the narrowed window holds this long before it grows again:
#: probing for more at once only earns the next refusal and its pause.
GROWTH_HOLD = 2.0
#: Refusals closer together than this are one throttle episode (one log line).
EPISODE_QUIET = 30.0


def full_jitter(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (0-based): uniform in
    [0, min(cap, base * 2**attempt)] ("full jitter", so that clients refused
    together do not come back together)."""
    return rand() * min(cap, base * 2 ** min(attempt, 32))


class RequestGate:
    """At most `limit` requests in flight, fewer while the apiserver throttles;
    and the process-wide pause after a refusal. See the module docstring."""

    def __init__(self, *, limit: int, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.limit = limit
        self.window = float(limit)        # AIMD: in flight allowed now, 1..limit
        self.in_flight = 0
        self.peak = 0                     # most requests ever in flight at once
        self.paused_until = 0.0
        self.generation = 0               # bumped by every pause: a request knows what it was sent under
        self.streak = 0                   # pauses since the last success: the backoff exponent
        self.throttles = 0
        self._last_throttle = float("-inf")
        self._clock, self._rand = clock, rand
        self._cond = threading.Condition()
        APISERVER_WINDOW.set(limit)

    def enter(self) -> int:
        """Wait for the gate to open and a slot to be free; take the slot.
        Returns the generation to hand back to `leave`."""
        with self._cond:
            while True:
                wait = self.paused_until - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                elif self.in_flight >= max(1, int(self.window)):
                    self._cond.wait()
                else:
                    break
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            APISERVER_IN_FLIGHT.inc()
            return self.generation

    def wait_open(self) -> int:
        """Wait out a pause without taking a slot (a watch opening); returns the generation."""
        with self._cond:
            while (wait := self.paused_until - self._clock()) > 0:
                self._cond.wait(wait)
            return self.generation

    def leave(self, generation: int, *, ok: bool) -> None:
        """Give the slot back. `ok`: the apiserver accepted the request (any
        answer but a throttle), which widens the window again."""
        with self._cond:
            self.in_flight -= 1
            APISERVER_IN_FLIGHT.dec()
            if ok and generation == self.generation:
                self.streak = 0
                if self._clock() - self._last_throttle >= GROWTH_HOLD:
                    self.window = min(float(self.limit), self.window + 1.0 / self.window)
                    APISERVER_WINDOW.set(self.window)
            self._cond.notify_all()

    def throttled(self, generation: int, *, retry_after: float | None, what: str) -> None:
        """A request sent under `generation` was refused (429, or 503 with
        Retry-After): pause every request of the process and narrow the
        window, once per generation. The caller gives its slot back with
        leave(ok=False) and goes through enter() again."""
        with self._cond:
            now = self._clock()
            self.throttles += 1
            if now - self._last_throttle >= EPISODE_QUIET:
                log.warning("the apiserver is throttling gitopsd (API Priority and Fairness): every request "
                            "pauses and fewer run at once until it recovers", first=what,
                            retry_after=retry_after, in_flight=self.in_flight, limit=self.limit)
            self._last_throttle = now
            if generation != self.generation:
                return   # sent before the current pause began: already answered by it
            pause = min(retry_after or 0.0, RETRY_AFTER_MAX) + full_jitter(self.streak, rand=self._rand)
            self.streak += 1
            self.generation += 1
            self.window = max(1.0, self.window / 2)
            APISERVER_WINDOW.set(self.window)
            until = now + pause
            APISERVER_THROTTLE_PAUSE.inc(max(0.0, until - max(now, self.paused_until)))
            self.paused_until = max(self.paused_until, until)
            self._cond.notify_all()


class _Batch:
    """The items of one `Budget.map` call, claimed in order by whoever runs them."""

    def __init__(self, fn: Callable[[T], R], items: list[T]) -> None:
        self.fn, self.items = fn, items
        self.claimed = 0
        self.outcomes: list[tuple[bool, object] | None] = [None] * len(items)
        self.closed = False
        self.cond = threading.Condition()

    def claim(self) -> int | None:
        with self.cond:
            if self.closed or self.claimed >= len(self.items):
                return None
            self.claimed += 1
            return self.claimed - 1

    def run(self, i: int) -> None:
        try:
            outcome = (True, self.fn(self.items[i]))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            outcome = (False, exc)
        with self.cond:
            self.outcomes[i] = outcome
            self.cond.notify_all()

    def drain(self) -> None:
        """A helper's whole job: run unclaimed items until there are none."""
        while (i := self.claim()) is not None:
            self.run(i)

    def outcome(self, i: int) -> tuple[bool, object]:
        """Item i's outcome; the caller runs unclaimed items while it is not there."""
        while True:
            with self.cond:
                if self.outcomes[i] is not None:
                    return self.outcomes[i]
            j = self.claim()
            if j is None:
                with self.cond:
                    self.cond.wait_for(lambda: self.outcomes[i] is not None)
                    return self.outcomes[i]
            self.run(j)

    def close(self) -> None:
        """Hand out nothing more; wait for what running threads have claimed."""
        with self.cond:
            self.closed = True
            self.cond.wait_for(lambda: all(o is not None for o in self.outcomes[:self.claimed]))


class Lane(IntEnum):
    """Which queued reconcile runs first: the lower lane (see the module docstring)."""

    HEAL = 0
    COMMIT = 1
    POLL = 2

    @classmethod
    def of(cls, reason: str) -> Lane:
        """The lane of a reconcile by its trigger: a poll is only a poll; a webhook,
        a watched commit, a config edit, a new owner or a retry are waited for."""
        return cls.POLL if reason == "poll" else cls.COMMIT


class ReconcilePool:
    """At most `max_workers` threads running submitted work; queued work is taken
    by lane, then in order of submission. Threads start as work arrives, up to
    the bound, and stay (they are what a fleet's poll round needs again)."""

    def __init__(self, max_workers: int, *, name: str = "reconcile") -> None:
        self.max_workers, self.name = max_workers, name
        self._queue: list[tuple[int, int, Future, Callable, tuple]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False
        # As concurrent.futures does: at interpreter exit idle threads end and
        # running work finishes (the threads are not daemons: an apply is not cut).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            ref = weakref.ref(self)
            register(lambda: (pool := ref()) is not None and pool._exit())

    def submit(self, fn: Callable[..., R], *args, lane: Lane = Lane.POLL) -> Future:
        future: Future = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            heapq.heappush(self._queue, (int(lane), next(self._order), future, fn, args))
            if self._idle < len(self._queue) and len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._work, daemon=False,
                                     name=f"{self.name}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
            self._cond.notify()
        return future

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._shutdown:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - the future's caller sees it
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args

    def _exit(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for _, _, future, _, _ in self._queue:
                    future.cancel()
                self._queue.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()


class Budget:
    """The one concurrency setting of the process and what it sizes; see the module docstring."""

    def __init__(self, *, limit: int = DEFAULT_CONCURRENCY) -> None:
        if limit < 1:
            raise ValueError(f"concurrency must be at least 1, not {limit}")
        self.limit = limit
        self.requests = RequestGate(limit=limit)
        self.reconcile_workers = RECONCILES_PER_SLOT * limit
        self._lock = threading.Lock()
        self._fanout: ThreadPoolExecutor | None = None
        self._reconciles: ReconcilePool | None = None

    @property
    def connection_pool_size(self) -> int:
        """Pooled connections to keep: one per request slot, plus room for the
        long-lived watches and lease renewals, which are not counted as slots."""
        return self.limit + 16

    def reconciles(self) -> ReconcilePool:
        """The daemon's pool for reconciles and heals (created on first use)."""
        with self._lock:
            if self._reconciles is None:
                self._reconciles = ReconcilePool(self.reconcile_workers)
            return self._reconciles

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items, in parallel on the shared executor; results in input
        order, as they become available (an exception is raised at its item,
        like Executor.map). At most `limit` threads work on one call, the
        caller included; with limit 1, the caller alone, in order.

        Safe to call from an item of another map (see the module docstring).
        Closing the iterator early runs nothing more and waits for what is
        already running.
        """
        batch = _Batch(fn, list(items))
        helpers = min(len(batch.items), self.limit) - 1
        futures = [self._executor().submit(batch.drain) for _ in range(helpers)] if helpers > 0 else []
        return self._results(batch, futures)

    @staticmethod
    def _results(batch: _Batch, futures: list[Future]) -> Iterator:
        try:
            for i in range(len(batch.items)):
                ok, value = batch.outcome(i)
                if not ok:
                    raise value
                yield value
        finally:
            batch.close()
            for f in futures:
                f.cancel()   # still queued behind other work: nothing left for it

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._fanout is None:
                self._fanout = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="fanout")
            return self._fanout

    def close(self) -> None:
        with self._lock:
            for pool in (self._fanout, self._reconciles):
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            self._fanout = self._reconciles = None
