"""gitopsd.kube against a scripted HTTP server on loopback: API Priority and
Fairness answers (429/503 with Retry-After) are waited out, not failed, by
the whole process at once, and only up to the retry cap.

A fake server is right here: the behaviour under test is the client's
reaction to a status line, which a healthy real apiserver will not produce
on demand. tests/test_budget.py shows the same against a real apiserver
throttling a real ServiceAccount.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import wait_for
from kubernetes import client

from gitopsd.budget import BACKOFF_BASE, BACKOFF_CAP, RequestGate
from gitopsd.errors import ClusterError
from gitopsd.kube import MAX_RETRIES, Kube, KubeApiError


class Scripted(BaseHTTPRequestHandler):
    script: list[tuple[int, dict, dict]] = []
    seen: list[float] = []

    def do_GET(self):  # noqa: N802 - http.server naming
        Scripted.seen.append(time.monotonic())
        status, headers, body = Scripted.script.pop(0) if Scripted.script else (200, {}, {"kind": "ConfigMap"})
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    Scripted.script, Scripted.seen = [], []
    yield srv
    srv.shutdown()
    srv.server_close()


def kube_for(srv) -> Kube:
    """A Kube with a budget of its own (the default size) for the scripted server."""
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{srv.server_address[1]}"
    return Kube(client.ApiClient(cfg))


def too_many(retry_after: str) -> tuple[int, dict, dict]:
    return (429, {"Retry-After": retry_after},
            {"kind": "Status", "reason": "TooManyRequests", "message": "too many requests, please try again later"})


def test_429_is_retried_after_the_servers_retry_after(server):
    Scripted.script = [too_many("1"), too_many("1")]
    kube = kube_for(server)

    started = time.monotonic()
    body = kube.request("GET", "/api/v1/namespaces/x/configmaps/y")

    assert body == {"kind": "ConfigMap"}
    assert len(Scripted.seen) == 3
    gaps = [b - a for a, b in zip(Scripted.seen, Scripted.seen[1:])]
    assert all(g >= 0.95 for g in gaps), f"waited as told (Retry-After: 1): {gaps}"
    assert time.monotonic() - started < 5
    assert kube.requests["get"] == 3


def test_503_without_retry_after_backs_off_exponentially_and_gives_up_clearly(server, monkeypatch):
    import gitopsd.kube

    slept: list[float] = []
    monkeypatch.setattr(gitopsd.kube.time, "sleep", slept.append)  # record the backoff, don't wait it out
    unavailable = (503, {}, {"kind": "Status", "reason": "ServiceUnavailable", "message": "apiserver is shutting down"})
    Scripted.script = [unavailable] * (MAX_RETRIES + 1)
    kube = kube_for(server)

    with pytest.raises(KubeApiError) as err:
        kube.request("GET", "/api/v1/namespaces/x/configmaps/y")

    assert err.value.status == 503 and "shutting down" in str(err.value)
    assert len(Scripted.seen) == MAX_RETRIES + 1
    assert len(slept) == MAX_RETRIES
    for attempt, pause in enumerate(slept):   # full jitter below a doubling ceiling
        assert 0 <= pause <= min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt), (attempt, slept)
    assert kube.budget.requests.throttles == 0, "a 503 without Retry-After is not a throttle: nobody else waits"


def test_a_request_still_throttled_after_the_retry_cap_fails_naming_it_and_the_overload(server):
    Scripted.script = [too_many("0")] * (MAX_RETRIES + 5)
    kube = kube_for(server)
    kube.budget.requests = RequestGate(limit=kube.budget.limit, rand=lambda: 0.0)   # no jitter: no waiting

    with pytest.raises(KubeApiError) as err:
        kube.request("GET", "/api/v1/namespaces/shop/configmaps/settings")

    assert len(Scripted.seen) == MAX_RETRIES + 1, "sent once, retried MAX_RETRIES times, no more"
    text = str(err.value)
    assert "/api/v1/namespaces/shop/configmaps/settings" in text and "429" in text
    assert "the apiserver is overloaded" in text and f"{MAX_RETRIES + 1} times" in text
    assert "--concurrency" in text, "a hint at the fix"


def test_one_throttle_pauses_every_request_of_the_process(server):
    """APF throttles per flow: the requests of other threads wait out the same pause
    instead of each discovering the 429 on its own."""
    Scripted.script = [too_many("1")]
    kube = kube_for(server)
    first = threading.Thread(target=kube.request, args=("GET", "/api/v1/namespaces/x/configmaps/a"))
    first.start()
    wait_for("the first request to be throttled", lambda: kube.budget.requests.throttles == 1, interval=0.01)

    kube.request("GET", "/api/v1/namespaces/x/configmaps/b")   # another thread's request, never refused itself
    first.join()

    refused_at = Scripted.seen[0]
    later = Scripted.seen[1:]
    assert len(later) == 2 and all(t - refused_at >= 0.95 for t in later), \
        f"every request waited out the Retry-After: {[round(t - refused_at, 2) for t in later]}"


def test_a_503_with_retry_after_is_a_throttle_too(server):
    Scripted.script = [(503, {"Retry-After": "1"}, {"kind": "Status", "reason": "ServiceUnavailable",
                                                    "message": "please try again later"})]
    kube = kube_for(server)

    assert kube.request("GET", "/api/v1/namespaces/x/configmaps/y") == {"kind": "ConfigMap"}

    assert kube.budget.requests.throttles == 1
    assert Scripted.seen[1] - Scripted.seen[0] >= 0.95


def test_exempt_requests_are_not_held_by_the_pause(server):
    """Lease renewals must not wait behind a throttled sync: their lateness costs leadership."""
    Scripted.script = [too_many("2")]
    kube = kube_for(server)
    refused = threading.Thread(target=kube.request, args=("GET", "/api/v1/namespaces/x/configmaps/a"))
    refused.start()
    wait_for("the first request to be throttled", lambda: kube.budget.requests.throttles == 1, interval=0.01)

    started = time.monotonic()
    kube.request("GET", "/apis/coordination.k8s.io/v1/namespaces/x/leases/l", exempt=True, max_retries=0)

    assert kube.budget.requests.paused_until > time.monotonic(), "sent while the pause still holds the others"
    assert time.monotonic() - started < 1
    refused.join()


def test_an_unreachable_apiserver_is_a_clear_error():
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"   # discard port: nothing listens
    kube = Kube(client.ApiClient(cfg))
    with pytest.raises(ClusterError) as err:
        kube.request("POST", "/api/v1/namespaces", body={})
    assert "cannot reach the apiserver" in str(err.value) and "hack/cluster status" in str(err.value)
