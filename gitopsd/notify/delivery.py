"""Delivery: a bounded queue, worker threads, retries. Never on a reconcile's thread, never lost silently.

- **Queue.** `Lanes` holds at most `Policy.queue` deliveries. A lane is one
  notifier and one target (app or app@cluster): its deliveries go out one at
  a time, in order, so a commit's pending status arrives before its success
  even when the pending one had to be retried. Lanes go out in parallel, on
  `Policy.workers` threads: a forge that hangs holds up its own lanes only.
  A full queue drops its oldest delivery, with an error line and
  `gitopsd_notifications_total{result="dropped"}`.
- **Coalescing.** A commit status still waiting is replaced by a newer one of
  the same notifier, context and commit (result "superseded"): a success
  queued behind a pending that is backing off makes the pending pointless.
- **Retries.** A connection error, a timeout, a 5xx and a 429 are tried again
  after an exponential backoff with jitter (`Policy.delay`: base·2^n, at most
  `cap`, each drawn from its upper half so that many lanes failing together
  do not come back together); a Retry-After (seconds or an HTTP date, on 429
  and 503) is honoured instead. Another 4xx is an answer about the request
  (a bad token, an unknown repository): retrying would not change it, so it
  fails at once. After `attempts` attempts, or when the next one would come
  later than `give_up_after` seconds after the first, the delivery is given up:
  one error line naming notifier, app, revision and the last HTTP status
  with the start of the answer (scrubbed of secret values, gitopsd.redact),
  and `result="failed"`. Flux's notification-controller retries likewise
  (go-retryablehttp: 4 retries, 1 s to 30 s).
- **Timeouts** on every request (`Policy.timeout`: connect, then read), and no
  redirects followed (a token must not follow a 302 to another host).
- **Proxies** from the environment, as git and curl read them: HTTPS_PROXY
  for https receivers (a CONNECT tunnel: the proxy sees the host, never the
  token), HTTP_PROXY for http ones, NO_PROXY (host names, domain suffixes,
  `*`) to go direct. A user:password in the proxy's URL becomes a
  Proxy-Authorization header and is treated as a secret value.
- **A private CA** (`caFrom`): the receiver's certificate must chain to the
  notifier's CA bundle instead of the system's (a forge a company CA signed).
- **Shutdown** (`Deliveries.stop`): what is queued gets `grace` seconds;
  what is left then is dropped and counted, with one line.

The request itself is built when it is sent (`Delivery.build`): tokens are
read at that moment (a rotated one is used at once) and never sit in the
queue, a log line or an exception.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import random
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import urllib3

from gitopsd import metrics, redact
from gitopsd.errors import GitopsdError
from gitopsd.notify.notice import Notice
from gitopsd.notify.payloads import PayloadError, Request

log = structlog.get_logger("gitopsd.notify")

#: How much of an answer a log line quotes.
ANSWER_CHARS = 300


@dataclass(frozen=True)
class Policy:
    """How deliveries are sent and retried (the module docstring says why)."""

    workers: int = 2
    queue: int = 1000
    attempts: int = 5
    base: float = 1.0
    cap: float = 30.0
    give_up_after: float = 300.0
    timeout: tuple[float, float] = (5.0, 10.0)    # connect, read
    grace: float = 5.0

    def delay(self, attempt: int, *, retry_after: float | None, rand: Callable[[], float] = random.random) -> float:
        """Seconds before attempt `attempt + 1`: the server's Retry-After, else base·2^(attempt-1) (at most
        `cap`), jittered within its upper half."""
        if retry_after is not None:
            return max(0.0, retry_after)
        full = min(self.cap, self.base * 2 ** (attempt - 1))
        return full / 2 + rand() * full / 2


@dataclass
class Delivery:
    """One notice for one notifier. `build` makes the request (reading tokens); PayloadError: never sendable."""

    notifier: str
    provider: str
    notice: Notice
    build: Callable[[], Request]
    supersedes: tuple | None = None   # (notifier, context, sha): a newer one of these replaces a waiting one
    attempt: int = 0
    first: float = field(default_factory=time.monotonic)

    @property
    def lane(self) -> tuple[str, str]:
        return self.notifier, self.notice.target

    def fields(self) -> dict:
        """What a log line names: notifier, app, revision, event."""
        n = self.notice
        return {"notifier": self.notifier, "provider": self.provider, "app": n.target,
                "revision": n.revision[:12] if n.revision else None, "kind": n.kind, "phase": n.phase}


@dataclass(frozen=True)
class Answer:
    """What one attempt got: an HTTP status and the start of the body, or an error before any answer."""

    status: int | None
    text: str = ""
    retry_after: float | None = None


def verdict(provider: str, answer: Answer) -> str:
    """delivered, retry or failed (module docstring)."""
    status = answer.status
    if status is not None and 200 <= status < 300:
        return "delivered"
    if provider == "gitlab" and status == 400 and "Cannot transition status" in answer.text:
        return "delivered"   # already in that state (a pending sent twice)
    if status is None or status == 429 or status >= 500:
        return "retry"
    return "failed"


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Sender:
    """HTTP for notifications: one connection pool (and one per proxy and CA bundle), no retries or
    redirects of its own, timeouts always. ``proxies`` as urllib.request.getproxies_environment gives
    them ({"https": URL, "http": URL, "no": "host,.domain"}); default: this process's environment."""

    #: Pools kept for proxies and CA bundles; a rotated CA makes a new one, the least recently used goes.
    POOLS = 16

    def __init__(self, policy: Policy, *, proxies: dict[str, str] | None = None) -> None:
        connect, read = policy.timeout
        self._pool_kw = {"num_pools": 20, "maxsize": policy.workers, "retries": False,
                         "timeout": urllib3.Timeout(connect=connect, read=read)}
        self._http = urllib3.PoolManager(**self._pool_kw)
        self._proxies = urllib.request.getproxies_environment() if proxies is None else dict(proxies)
        self._via: collections.OrderedDict[tuple[str, str], urllib3.PoolManager] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _pool(self, url: str, *, ca: str | None = None) -> urllib3.PoolManager:
        """The pool a request to `url` goes out through: its scheme's proxy unless NO_PROXY names the host,
        verifying with `ca` (PEM) when given."""
        parts = urllib.parse.urlsplit(url)
        proxy = self._proxies.get(parts.scheme) or ""
        if proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            proxy = ""
        if not proxy and ca is None:
            return self._http
        key = (proxy, hashlib.sha256(ca.encode()).hexdigest() if ca is not None else "")
        with self._lock:
            pool = self._via.get(key)
            if pool is None:
                kw = self._pool_kw if ca is None else {**self._pool_kw, "cert_reqs": "CERT_REQUIRED",
                                                        "ca_cert_data": ca}
                pool = self._via[key] = _proxy_manager(proxy, kw) if proxy else urllib3.PoolManager(**kw)
                while len(self._via) > self.POOLS:
                    self._via.popitem(last=False)[1].clear()
            self._via.move_to_end(key)
            return pool

    def send(self, request: Request) -> Answer:
        try:
            pool = self._pool(request.url, ca=request.ca)
            response = pool.request(request.method, request.url, body=request.body, headers=request.headers,
                                    redirect=False, preload_content=False)
        except (urllib3.exceptions.HTTPError, ValueError) as exc:   # ValueError: a proxy URL urllib3 refuses
            return Answer(status=None, text=_why(exc))
        try:
            text = response.read(4 * ANSWER_CHARS, decode_content=True).decode(errors="replace")
        except urllib3.exceptions.HTTPError as exc:
            text = f"(answer cut: {_why(exc)})"
        finally:
            response.release_conn()
        after = retry_after(response.headers.get("Retry-After")) if response.status in (429, 503) else None
        return Answer(status=response.status, text=text, retry_after=after)

    def close(self) -> None:
        self._http.clear()
        with self._lock:
            for pool in self._via.values():
                pool.clear()


def _proxy_manager(proxy: str, pool_kw: dict) -> urllib3.ProxyManager:
    """A pool through `proxy` (http://[user:password@]host:port; a bare host:port is taken as http): its
    credentials, when it has some, go in a Proxy-Authorization header and are remembered as secret values."""
    if "://" not in proxy:
        proxy = "http://" + proxy
    parts = urllib.parse.urlsplit(proxy)
    headers = {}
    if parts.username is not None:
        user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        redact.remember((password,) if password else ())
        headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
        proxy = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_kw)


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


class Lanes:
    """The queue: FIFO within a lane, lanes in parallel; a lane waits while its head is out or backing off."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._items: collections.deque[Delivery] = collections.deque()
        self._busy: set[tuple[str, str]] = set()
        self._resume: dict[tuple[str, str], float] = {}
        self._cond = threading.Condition()
        self._closed = False

    def put(self, delivery: Delivery) -> tuple[list[Delivery], list[Delivery]]:
        """Queue `delivery`; returns (superseded, dropped) deliveries, for the caller to count and log."""
        with self._cond:
            superseded = [d for d in self._items if delivery.supersedes is not None
                          and d.supersedes == delivery.supersedes]
            for d in superseded:
                self._items.remove(d)
            dropped = []
            while len(self._items) >= self._limit:
                dropped.append(self._items.popleft())
            self._items.append(delivery)
            self._changed()
            return superseded, dropped

    def take(self) -> Delivery | None:
        """The next delivery whose lane is free (blocks); None once closed."""
        with self._cond:
            while not self._closed:
                now, wake = time.monotonic(), None
                for d in self._items:
                    if d.lane in self._busy:
                        continue
                    at = self._resume.get(d.lane, 0.0)
                    if at > now:
                        wake = at if wake is None else min(wake, at)
                        continue
                    self._items.remove(d)
                    self._busy.add(d.lane)
                    self._changed()
                    return d
                self._cond.wait(None if wake is None else wake - now)
            return None

    def done(self, delivery: Delivery, *, again_at: float | None = None) -> bool:
        """The attempt of `delivery` ended; `again_at`: put it back at the head of its lane until then.
        False when it was to be tried again but the queue is closed (the caller counts it dropped)."""
        with self._cond:
            self._busy.discard(delivery.lane)
            requeued = again_at is not None and not self._closed
            if requeued:
                self._resume[delivery.lane] = again_at
                self._items.appendleft(delivery)
            else:
                self._resume.pop(delivery.lane, None)
            self._changed()
            return requeued or again_at is None

    def wait_idle(self, timeout: float) -> bool:
        """Whether everything was sent (or given up) within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout=timeout)

    def close(self) -> list[Delivery]:
        """Stop the workers; returns what was still queued."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._changed()
            return left

    def _changed(self) -> None:
        metrics.NOTIFICATION_QUEUE.set(len(self._items))
        self._cond.notify_all()


class Deliveries:
    """The workers that empty the queue (module docstring)."""

    def __init__(self, *, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._lanes = Lanes(limit=self.policy.queue)
        self._sender = Sender(self.policy)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.policy.workers):
            t = threading.Thread(target=self._work, name=f"notify-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def put(self, delivery: Delivery) -> None:
        """Queue it (never blocks: called on a reconcile's thread)."""
        superseded, dropped = self._lanes.put(delivery)
        for d in superseded:
            _count(d, "superseded")
        for d in dropped:
            _count(d, "dropped")
            log.error("notification dropped: the queue is full", **d.fields(), queue=self.policy.queue,
                      hint="a notifier is slow or down; see gitopsd_notifications_total")

    def stop(self) -> None:
        """Give what is queued `policy.grace` seconds, then drop the rest (counted, one line)."""
        self._lanes.wait_idle(self.policy.grace)
        left = self._lanes.close()
        for d in left:
            _count(d, "dropped")
        if left:
            log.error("notifications dropped: gitopsd is stopping", count=len(left),
                      notifiers=sorted({d.notifier for d in left}))
        for t in self._threads:
            t.join(timeout=0.5)
        self._sender.close()

    def _work(self) -> None:
        while (d := self._lanes.take()) is not None:
            try:
                again_at = self._attempt(d)
            except Exception:  # noqa: BLE001 - a bug must not stop the other notifications
                log.exception("notification crashed", **d.fields())
                _count(d, "failed")
                again_at = None
            if not self._lanes.done(d, again_at=again_at):
                _count(d, "dropped")
                log.error("notification dropped: gitopsd stopped before its next attempt", **d.fields(),
                          attempts=d.attempt)

    def _attempt(self, d: Delivery) -> float | None:
        """Send `d` once; returns when to try again, or None when it is done (delivered or given up)."""
        d.attempt += 1
        try:
            answer = self._sender.send(d.build())
        except PayloadError as exc:
            return self._give_up(d, status=None, answer=str(exc))
        except GitopsdError as exc:   # a token that cannot be read (yet): like a connection error
            answer = Answer(status=None, text=str(exc))
        outcome = verdict(d.provider, answer)
        if outcome == "delivered":
            _count(d, "delivered")
            log.debug("notification delivered", **d.fields(), status=answer.status, attempts=d.attempt)
            return None
        if outcome == "failed":
            return self._give_up(d, status=answer.status, answer=answer.text)
        delay = self.policy.delay(d.attempt, retry_after=answer.retry_after)
        if d.attempt >= self.policy.attempts or time.monotonic() + delay - d.first > self.policy.give_up_after:
            return self._give_up(d, status=answer.status, answer=answer.text)
        _count(d, "retried")
        log.info("notification retried", **d.fields(), status=answer.status, answer=_quote(answer.text),
                 attempt=d.attempt, retry_in=round(delay, 2))
        return time.monotonic() + delay

    def _give_up(self, d: Delivery, *, status: int | None, answer: str) -> None:
        _count(d, "failed")
        log.error("notification failed", **d.fields(), status=status, answer=_quote(answer), attempts=d.attempt,
                  hint=_hint(status, answer))
        return None


def _count(d: Delivery, result: str) -> None:
    metrics.NOTIFICATIONS.labels(notifier=d.notifier, provider=d.provider, result=result).inc()


def _quote(text: str) -> str:
    text = redact.scrub(" ".join(text.split()))
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + "..."


def _hint(status: int | None, answer: str = "") -> str:
    if status is None and "CERTIFICATE_VERIFY_FAILED" in answer:
        return ("the receiver's TLS certificate does not chain to a CA gitopsd trusts: give the CA that signed "
                "it as the notifier's caFrom (a Secret's ca.crt)")
    if status in (401, 403):
        return "check the token (tokenFrom): is it valid, and may it set commit statuses on this repository?"
    if status == 404:
        return "check the address and repository (the token may also lack access to the repository)"
    if status is None:
        return "is the address reachable from gitopsd?"
    return "see the answer; the notification was not sent"
