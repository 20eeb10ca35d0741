"""The daemon's HTTP port, tested over real HTTP on 127.0.0.1 with urllib."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from helpers import wait_for

from gitopsd import metrics
from gitopsd.daemon import server, webhook
from gitopsd.daemon.server import Server
from gitopsd.daemon.webhook import PushEvent

SECRET = b"s3cret-for-tests"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
APPS = {  # name -> (repo as configured, ref)
    "web": ("git@github.com:Codertocat/Hello-World.git", "main"),
    "web-head": ("https://github.com/codertocat/hello-world", "HEAD"),
    "web-pinned": ("https://github.com/Codertocat/Hello-World", SHA),
    "web-release": ("https://github.com/Codertocat/Hello-World", "v1"),
    "other": ("https://github.com/Codertocat/Other.git", "main"),
}
PUSH = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": SHA,
    "head_commit": {"id": SHA, "message": "Update README.md"},
    "repository": {
        "name": "Hello-World",
        "full_name": "Codertocat/Hello-World",
        "html_url": "https://github.com/Codertocat/Hello-World",
        "url": "https://github.com/Codertocat/Hello-World",
        "git_url": "git://github.com/Codertocat/Hello-World.git",
        "ssh_url": "git@github.com:Codertocat/Hello-World.git",
        "clone_url": "https://github.com/Codertocat/Hello-World.git",
        "default_branch": "main",
    },
    "pusher": {"name": "Codertocat"},
}


class ListLog:
    """A structlog-like logger that keeps every event for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def _record(self, level: str):
        return lambda event, **kw: self.events.append((level, event, kw))

    def __getattr__(self, level: str):
        if level in ("debug", "info", "warning", "error", "exception"):
            return self._record(level)
        raise AttributeError(level)

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


class Harness:
    """A started Server plus what it was given and what it did."""

    def __init__(self, **overrides) -> None:
        self.secret = SECRET
        self.pushes: list[PushEvent] = []
        self.readiness = (True, "ok")
        self.log = ListLog()
        options = dict(
            host="127.0.0.1", port=0, on_push=self._on_push, webhook_secret=lambda: self.secret,
            ready=lambda: self.readiness, log=self.log,
        )
        options.update(overrides)
        self.server = Server(**options)

    def _on_push(self, event: PushEvent) -> list[str]:
        self.pushes.append(event)
        return [name for name, (repo, ref) in APPS.items() if webhook.matches(app_repo=repo, app_ref=ref, event=event)]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"

    def request(self, path: str, *, body: bytes | None = None, headers: dict | None = None,
                method: str | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url(path), data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()

    def github(self, payload: dict, *, secret: bytes | None = None, event: str = "push",
               delivery: str | None = None) -> tuple[int, dict, bytes]:
        """A GitHub delivery; each call is a new one (fresh id) unless ``delivery`` repeats one."""
        body = json.dumps(payload).encode()
        sig = "sha256=" + hmac.new(self.secret if secret is None else secret, body, hashlib.sha256).hexdigest()
        return self.request("/hooks/github", body=body, headers={
            "Content-Type": "application/json", "X-GitHub-Event": event, "X-Hub-Signature-256": sig,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4())})


@pytest.fixture
def make() -> Iterator:
    started: list[Harness] = []

    def _make(**overrides) -> Harness:
        h = Harness(**overrides)
        h.server.start()
        started.append(h)
        return h

    yield _make
    for h in started:
        h.server.stop()


def _count(provider: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "gitopsd_webhook_requests_total", {"provider": provider, "result": result}) or 0.0


def _ended(how: str) -> float:
    return metrics.REGISTRY.get_sample_value("gitopsd_http_connections_total", {"ended": how}) or 0.0


def _reset(sock: socket.socket) -> None:
    """Hang up the way a vanished client does: a TCP reset, not a polite close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_valid_github_push_triggers_matching_apps(make):
    h = make()
    before = _count("github", "triggered")
    status, headers, body = h.github(PUSH)
    assert status == 202
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"triggered": ["web", "web-head"]}  # not the pinned, the tag or the other repo
    assert len(h.pushes) == 1 and h.pushes[0].after == SHA
    assert _count("github", "triggered") == before + 1
    [line] = h.log.named("webhook received")
    assert line["triggered"] == ["web", "web-head"] and line["provider"] == "github"

    # A push nobody follows is accepted, triggers nothing, and is counted as such.
    status, _, body = h.github({**PUSH, "ref": "refs/tags/v2"})
    assert (status, json.loads(body)) == (202, {"triggered": []})
    assert _count("github", "no_match") >= 1

    # A ping (sent when the hook is created) is answered 202 and ignored.
    status, _, body = h.github({"zen": "Design for failure.", "hook_id": 1}, event="ping")
    assert status == 202 and "ping" in json.loads(body)["ignored"]
    assert len(h.pushes) == 2


def test_bad_signature_gets_401_and_never_triggers(make):
    h = make()
    before = _count("github", "unauthorized")
    status, _, body = h.github(PUSH, secret=b"guessed")
    assert status == 401 and "error" in json.loads(body)
    status, _, _ = h.request("/hooks/github", body=json.dumps(PUSH).encode(), headers={"X-GitHub-Event": "push"})
    assert status == 401
    assert h.pushes == []
    assert _count("github", "unauthorized") == before + 2

    refused = h.log.named("webhook refused")
    assert len(refused) == 2
    assert all(r["provider"] == "github" and r["remote"] == "127.0.0.1" and r["reason"] for r in refused)
    # Neither the secret nor any signature is in anything we logged.
    logged = repr(h.log.events)
    assert SECRET.decode() not in logged and "sha256=" not in logged

    # GitLab and generic hooks are guarded the same way.
    status, _, _ = h.request("/hooks/gitlab", body=b"{}", headers={"X-Gitlab-Token": "nope",
                                                                   "X-Gitlab-Event": "Push Hook"})
    assert status == 401
    status, _, _ = h.request("/hooks/generic", body=b'{"repo": "x", "ref": "main"}')
    assert status == 401
    assert h.pushes == []


def test_missing_secret_disables_webhooks(make):
    h = make()
    h.secret = b""
    status, _, body = h.github(PUSH, secret=b"")
    assert (status, json.loads(body)) == (401, {"error": "webhook secret not configured"})
    assert h.pushes == []
    # The secret is read per request: configuring one (hot reload) enables hooks at once.
    h.secret = b"now-configured"
    status, _, _ = h.github(PUSH)
    assert status == 202 and len(h.pushes) == 1


def test_healthz_and_readyz(make):
    h = make(live=lambda: (False, "scheduler thread died"))
    assert h.request("/readyz")[::2] == (200, b"ok\n")
    h.readiness = (False, "initial sync not finished")
    status, headers, body = h.request("/readyz")
    assert (status, body) == (503, b"initial sync not finished\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert h.request("/healthz")[::2] == (503, b"scheduler thread died\n")

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    h2 = make(ready=broken)
    status, _, body = h2.request("/readyz")
    assert status == 503 and b"RuntimeError" in body
    assert h2.request("/healthz")[::2] == (200, b"ok\n")
    # Probes answer only GET/HEAD.
    status, headers, _ = h.request("/healthz", body=b"", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_metrics_endpoint_exposes_prometheus_text(make):
    h = make()
    h.github(PUSH)
    status, headers, body = h.request("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    text = body.decode()
    assert "# TYPE gitopsd_webhook_requests_total counter" in text
    assert 'gitopsd_webhook_requests_total{provider="github",result="triggered"}' in text


def test_status_endpoint_returns_json(make):
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    h = make(status=lambda: {"apps": {"web": {"revision": SHA, "synced_at": when}}})
    status, headers, body = h.request("/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"apps": {"web": {"revision": SHA, "synced_at": str(when)}}}
    # Without a status callable there is no such route.
    assert make().request("/status")[0] == 404


def test_status_summary_param_answers_the_counts_not_the_rows(make):
    h = make(status=lambda: {"apps": [{"app": "web"}]}, status_summary=lambda: {"summary": {"apps": 1}})
    for path in ("/status?summary", "/status?summary=1", "/status?x=y&summary"):
        status, _, body = h.request(path)
        assert (status, json.loads(body)) == (200, {"summary": {"apps": 1}}), path
    for path in ("/status", "/status?summaryx", "/status?x=summary"):
        assert json.loads(h.request(path)[2]) == {"apps": [{"app": "web"}]}, path
    # A server without a summary answers the full status, not a 404.
    plain = make(status=lambda: {"apps": []})
    assert json.loads(plain.request("/status?summary")[2]) == {"apps": []}


def test_oversized_body_is_refused(make):
    h = make()
    before = _count("generic", "too_large")
    big = b"{" + b" " * (server.MAX_BODY + 1024) + b"}"
    status, _, body = h.request("/hooks/generic", body=big, headers={"X-Gitopsd-Signature": "sha256=" + "0" * 64})
    assert status == 413 and "larger" in json.loads(body)["error"]
    assert h.pushes == []
    assert _count("generic", "too_large") == before + 1
    # The server is still fine afterwards.
    assert h.request("/healthz")[0] == 200


def test_unknown_path_404(make):
    h = make()
    assert h.request("/")[0] == 404
    assert h.request("/hooks/bitbucket", body=b"{}")[0] == 404
    assert h.request("/healthz/extra")[0] == 404
    status, headers, _ = h.request("/hooks/github")  # GET on a hook
    assert status == 405 and headers["Allow"] == "POST"
    # Query strings do not change the route.
    assert h.request("/healthz?verbose=1")[0] == 200


def test_on_push_failure_is_a_500_with_a_log_line(make):
    def explode(event: PushEvent) -> list[str]:
        raise RuntimeError("queue closed")

    h = make(on_push=explode)
    status, _, body = h.github(PUSH)
    assert status == 500 and "internal error" in json.loads(body)["error"]
    [line] = h.log.named("webhook failed")
    assert "queue closed" in line["error"] and line["provider"] == "github"


def test_stop_releases_the_port():
    h = Harness()
    h.server.start()
    port = h.server.port
    assert port != 0
    h.server.stop()
    h.server.stop()  # idempotent
    again = Harness(port=port)
    again.server.start()  # the port is free again
    try:
        assert again.server.port == port
    finally:
        again.server.stop()


def test_a_redelivered_push_is_answered_as_a_duplicate_and_not_dispatched(make):
    h = make()
    before = _count("github", "duplicate")
    assert h.github(PUSH, delivery="d-1")[0] == 202
    for _ in range(5):
        status, _, body = h.github(PUSH, delivery="d-1")
        assert (status, json.loads(body)) == (200, {"duplicate": True, "delivery": "d-1", "triggered": []})
    assert len(h.pushes) == 1
    assert _count("github", "duplicate") == before + 5
    assert len(h.log.named("webhook duplicate ignored")) == 5
    # Another delivery of the same push (a fresh id) is acted on: only the id makes a duplicate.
    assert h.github(PUSH, delivery="d-2")[0] == 202 and len(h.pushes) == 2


def test_copies_of_one_delivery_arriving_at_once_dispatch_once(make):
    h = make()
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(h.github(PUSH, delivery="same")[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [200] * 7 + [202]
    assert len(h.pushes) == 1


def test_a_delivery_whose_dispatch_failed_is_accepted_on_retry(make):
    failing = [True]
    pushes: list[PushEvent] = []

    def on_push(event: PushEvent) -> list[str]:
        if failing[0]:
            raise RuntimeError("queue closed")
        pushes.append(event)
        return ["web"]

    h = make(on_push=on_push)
    assert h.github(PUSH, delivery="retry-me")[0] == 500
    failing[0] = False
    status, _, body = h.github(PUSH, delivery="retry-me")   # the provider's retry
    assert (status, json.loads(body)) == (202, {"triggered": ["web"]})
    assert [p.delivery for p in pushes] == ["retry-me"]


def test_clients_that_hang_up_are_a_debug_line_not_a_traceback(make, capfd):
    h = make()
    gone_before = _ended("client_gone")
    kinds = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
             b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"ref\":",
             b"GET /hea", b""]
    for i in range(40):
        sock = socket.create_connection(("127.0.0.1", h.server.port))
        sock.sendall(kinds[i % len(kinds)])
        _reset(sock)
    wait_for("every hang-up handled", lambda: _ended("client_gone") - gone_before >= 40)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Error" not in out + err
    gone = h.log.named("http client went away")
    assert len(gone) >= 40 and all(g["error"] in ("ConnectionResetError", "BrokenPipeError") for g in gone)
    assert not [e for e in h.log.events if e[0] != "debug" and e[1] != "http server listening"]
    assert h.request("/healthz")[0] == 200


def test_a_request_dripping_in_byte_by_byte_is_cut_at_the_deadline(make):
    h = make(request_deadline=1.0)
    gone_before = _ended("client_gone")
    sock = socket.create_connection(("127.0.0.1", h.server.port))
    sock.settimeout(0.2)
    started = time.monotonic()
    closed = False
    for byte in b"POST /hooks/github HTTP/1.1\r\nHost: gitopsd\r\nX-Padding: " + b"x" * 200:
        try:
            sock.sendall(bytes([byte]))
            closed = sock.recv(100) == b""   # each read waits 0.2 s: the drip rate
        except socket.timeout:
            continue
        except OSError:
            closed = True
        if closed:
            break
    elapsed = time.monotonic() - started
    sock.close()
    assert closed and 0.9 <= elapsed < 3.0, elapsed   # well before 200 bytes x 0.2 s
    wait_for("the cut counted", lambda: _ended("client_gone") > gone_before)
    assert h.log.named("http client too slow; connection cut")
    assert h.pushes == [] and h.request("/healthz")[0] == 200


def test_a_request_that_arrives_in_time_is_not_cut(make):
    h = make(request_deadline=1.0)
    # One keep-alive connection, idle between requests for less than the deadline each time.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", h.server.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        # The behaviour under test is idleness itself: half the deadline with
        # nothing sent. There is no event to wait for, only time to let pass.
        time.sleep(0.5)
    conn.close()


def test_a_bug_in_a_handler_is_one_error_line_with_its_traceback(make, monkeypatch):
    h = make()
    errors_before = _ended("error")

    def broken(self) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(server._Handler, "_get_metrics", broken)
    with pytest.raises(OSError):   # the connection closes without an answer
        h.request("/metrics")
    wait_for("the failure counted", lambda: _ended("error") == errors_before + 1)
    [line] = [e for e in h.log.events if e[0] == "exception"]
    assert line[1] == "http request failed" and line[2]["remote"] == "127.0.0.1"
    assert h.request("/healthz")[0] == 200


def _signed(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _raw(h: Harness, request: bytes) -> bytes:
    """Send bytes as they are (no client library tidying them); read until the server closes."""
    with socket.create_connection(("127.0.0.1", h.server.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


_JSON_PUSH = json.dumps(PUSH).encode()
_DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = {
    # name: (path, headers, body, expected status, a word the answer must carry)
    "signed but not JSON": ("/hooks/github", {"X-GitHub-Event": "push", "Content-Type": "application/json"},
                            b"ref=main&after=x", 400, "JSON"),
    "signed JSON nested 100000 deep": ("/hooks/generic", {}, _DEEP, 400, "JSON"),
    "signed JSON that is a list": ("/hooks/generic", {}, b"[1, 2]", 400, "object"),
    "form-encoded without payload": ("/hooks/github", {"X-GitHub-Event": "push",
                                                       "Content-Type": "application/x-www-form-urlencoded"},
                                     b"other=1", 400, "payload"),
    "text/plain content type, not a push": ("/hooks/github", {"X-GitHub-Event": "push", "Content-Type": "text/plain"},
                                            b"just some text", 400, "JSON"),
    "unknown GitHub event": ("/hooks/github", {"X-GitHub-Event": "deployment_status"}, _JSON_PUSH, 202, "ignored"),
    "no event header": ("/hooks/github", {}, _JSON_PUSH, 400, "X-GitHub-Event"),
    "GitLab merge request hook": ("/hooks/gitlab", {"X-Gitlab-Event": "Merge Request Hook"},
                                  b'{"object_kind": "merge_request"}', 202, "ignored"),
    "invalid UTF-8": ("/hooks/generic", {}, b'{"repo": "\xff\xfe", "ref": "main"}', 400, "JSON"),
    "no repository in the push": ("/hooks/github", {"X-GitHub-Event": "push"},
                                  json.dumps({**PUSH, "repository": None}).encode(), 400, "repository"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_delivery_gets_a_clear_answer_and_triggers_nothing(make, case):
    path, headers, body, expected, word = MALFORMED[case]
    h = make()
    auth = {"X-Gitlab-Token": SECRET.decode()} if path == "/hooks/gitlab" else (
        {"X-Hub-Signature-256": _signed(body)} if path == "/hooks/github" else {"X-Gitopsd-Signature": _signed(body)})
    # (urllib would call every POST body form-encoded; say what is sent)
    status, _, answer = h.request(path, body=body, headers={"Content-Type": "application/json", **headers, **auth})
    assert status == expected, answer
    assert word.lower() in answer.decode().lower()
    assert h.pushes == []
    assert h.request("/healthz")[0] == 200


def test_a_body_without_a_length_or_with_a_false_one_is_refused(make):
    h = make(request_deadline=1.0)
    chunked = _raw(h, b"POST /hooks/generic HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411") and b"Content-Length required" in chunked
    negative = _raw(h, b"POST /hooks/generic HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert negative.startswith(b"HTTP/1.1 400") and b"invalid Content-Length" in negative
    # Promising 50 bytes and sending 2 holds nothing for long: the deadline cuts it, unanswered.
    started = time.monotonic()
    assert _raw(h, b"POST /hooks/generic HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}") == b""
    assert time.monotonic() - started < 3.0
    assert h.pushes == [] and h.request("/healthz")[0] == 200
