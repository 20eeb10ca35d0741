"""gitopsd.kube against a scripted HTTP server on loopback: API Priority and
Fairness answers (429/503 with Retry-After) are waited out, not failed.

A fake server is right here: the behaviour under test is the client's
reaction to a status line, which a healthy real apiserver will not produce
on demand.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

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
    assert slept == sorted(slept) and slept[0] < slept[-1] <= 5.0, slept


def test_an_unreachable_apiserver_is_a_clear_error():
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"   # discard port: nothing listens
    kube = Kube(client.ApiClient(cfg))
    with pytest.raises(ClusterError) as err:
        kube.request("POST", "/api/v1/namespaces", body={})
    assert "cannot reach the apiserver" in str(err.value) and "hack/cluster status" in str(err.value)
