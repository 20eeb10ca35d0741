"""The daemon's HTTP port, tested over real HTTP on 127.0.0.1 with urllib."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from gitopsd import metrics, server, webhook
from gitopsd.server import Server
from gitopsd.webhook import PushEvent

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
        if level in ("debug", "info", "warning", "error"):
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
