"""Notifications in-process: what is told, in which provider's words, and how delivery copes with receivers.

Real parts throughout: the Notifier listens to a real Feed, reads its tokens
through a real CredentialStore (from files here; from a Secret in
test_notify_daemon.py), and sends over real HTTP to local receivers
(tests/receivers.py) that check each request against the provider's
documented API. Only the control plane is absent: the cluster side is
test_notify_daemon.py's.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from helpers import wait_for
from receivers import ForwardProxy, Receiver, TLSFiles

from gitopsd import config as config_mod
from gitopsd import log as log_mod
from gitopsd import metrics, redact
from gitopsd.daemon.credentials import CredentialStore
from gitopsd.daemon.feed import Event, Feed
from gitopsd.engine.source import Revision
from gitopsd.notify import payloads
from gitopsd.notify.delivery import Deliveries, Delivery, Policy, retry_after
from gitopsd.notify.notice import Memory, Notice, of_record, of_revision
from gitopsd.notify.notifier import Notifier

SHA1, SHA2 = "1" * 40, "2" * 40
TOKEN = "ghp_notify-test-token-0123456789"
FAST = Policy(workers=2, base=0.01, cap=0.05, attempts=4, grace=2.0)


@pytest.fixture(autouse=True)
def _token_known():
    """The token registered with the redactor, as CredentialStore.value does with every token it reads. Per
    test, not at import: other modules' tests empty the registry (redact.forget_all) before these run."""
    redact.remember((TOKEN,))


@pytest.fixture
def lines():
    """JSON logging to a buffer through gitopsd's real chain (scrubbing included); call for the lines so far."""
    out = io.StringIO()
    log_mod.configure(fmt="json", level="debug", stream=out)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    log_mod.configure(fmt="json", stream=io.StringIO())


def _count(notifier: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value("gitopsd_notifications_total",
                                             {"notifier": notifier, "provider": "github", "result": result}) or 0.0


def _transition(result: str, *, revision: str = SHA2, previous: str | None = SHA1, seq: int = 7, **extra) -> dict:
    return {"type": "transition", "app": "web", "revision": revision, "previous": previous, "result": result,
            "reason": extra.pop("reason", ""), "health": {"outcome": extra.pop("health", "Healthy")},
            "commit": {"author": "Ada Author <ada@example.com>", "message": "Scale web\n\nmore replicas"},
            "seq": seq, "hash": "ab" * 32, **extra}


def _revision(sha: str = SHA2) -> Revision:
    return Revision(sha=sha, author="Ada Author <ada@example.com>", committer="Cy", message="Scale web\n",
                    time=datetime.now(UTC), url="https://github.com/org/fleet.git", ref="main")


def _status(provider: str, notice: Notice, receiver: Receiver, **kw) -> Delivery:
    """A commit status delivery to `receiver`, as the notifier builds one."""
    return Delivery(notifier=kw.pop("notifier", f"{provider}-{id(receiver)}"), provider=provider, notice=notice,
                    supersedes=kw.pop("supersedes", None),
                    build=lambda: payloads.commit_status(provider=provider, notice=notice, token=TOKEN,
                                                         address=kw.get("address", receiver.url),
                                                         repository=kw.get("repository"),
                                                         ui_url="https://gitopsd.example.com"))


# ---------------------------------------------------------------- what is news


def test_a_steady_no_change_is_not_news_but_a_recovery_and_a_new_commit_are() -> None:
    memory = Memory()

    def told(notice: Notice) -> bool:
        return memory.news(notice) is not None

    def record(result: str, **kw) -> Notice:
        return of_record(target="web", record=_transition(result, **kw), repo="")

    begun = of_revision(target="web", revision=_revision(SHA2), previous=SHA1, repo="")
    assert not told(record("NoChange", revision=SHA1, previous=SHA1)), "the first run after a restart tells nothing"
    assert told(begun)
    assert told(record("Failed", reason="bad yaml"))
    assert not told(begun), "the retries of the failed commit begin again and again: no pending over the failure"
    assert told(record("NoChange", revision=SHA1, previous=SHA1)), "the live commit is fine again: news"
    assert not told(record("NoChange", revision=SHA1, previous=SHA1))
    assert told(record("NoChange", revision=SHA2, previous=SHA1)), "a commit that changed nothing is deployed"
    assert not told(record("DryRun"))


def test_a_render_failure_without_a_commit_ends_the_transition_its_run_began() -> None:
    memory = Memory()
    memory.news(of_revision(target="web", revision=_revision(SHA2), previous=SHA1, repo=""))
    failed = memory.news(of_record(target="web", repo="", record=_transition(
        "Failed", revision=None, commit=None, reason="rendering failed: cm.yaml: invalid YAML")))
    assert (failed.revision, failed.subject, failed.failed) == (SHA2, "Scale web", True)
    assert None is memory.news(of_revision(target="web", revision=_revision(SHA2), previous=SHA1, repo="")), \
        "its retries begin again without news"


def test_a_reload_forgets_what_was_told_of_the_apps_it_removed(tmp_path: Path) -> None:
    text = """
notifiers:
  hook: {provider: webhook, address: "http://127.0.0.1:9/x"}
apps:
  - {name: web, repo: "https://github.com/org/fleet.git", notify: [hook]}
  - {name: gone, repo: "https://github.com/org/fleet.git", notify: [hook]}
"""
    running = {"config": config_mod.parse(text, base_dir=tmp_path)}
    notifier = Notifier(config=lambda: running["config"], credentials=CredentialStore(None, namespace="gitopsd"),
                        ui_url=None, policy=FAST)   # not started: nothing is sent, what is news is decided
    memory = notifier._memory
    gone = running["config"].target("gone")
    notifier.listen(Event(kind="record", target="gone", cfg=gone, record=_transition("Failed", reason="bad")))
    steady = of_record(target="gone", record=_transition("NoChange", revision=SHA1, previous=SHA1), repo="")
    running["config"] = config_mod.parse(text.replace("  - {name: gone", "  # - {name: gone"), base_dir=tmp_path)
    notifier.listen(Event(kind="status", target="web", cfg=running["config"].target("web")))
    assert memory.news(steady) is None, "a steady NoChange of an app seen afresh is no news (no failure known)"
    kept = Memory()
    kept.news(of_record(target="gone", record=_transition("Failed", reason="bad"), repo=""))
    assert kept.news(steady) is not None, "while the app is configured, the same NoChange ends a failure told"


def test_rollbacks_and_holds_are_transitions_and_release_events() -> None:
    rolled = of_record(target="web@eu-1", record=_transition("RolledBack"), repo="")
    assert rolled.events == {"transition", "release"}
    assert (rolled.app, rolled.cluster) == ("web", "eu-1")
    drift = of_record(target="web", repo="", record={
        "type": "drift", "app": "web", "object": {"group": "apps", "kind": "Deployment", "namespace": "prod",
                                                   "name": "web"},
        "fields": ["spec.replicas"], "managers": ["kubectl-edit"], "action": "corrected", "revision": SHA1,
        "seq": 3, "hash": "cd" * 32})
    assert drift.events == {"drift"}
    body = drift.as_json(ui_url="https://ui.example.com")
    assert body["object"] == "Deployment.apps/prod/web" and body["managers"] == ["kubectl-edit"]
    assert body["link"] == "https://ui.example.com/apps/web/history/3"


# ---------------------------------------------------------------- payloads


@pytest.mark.parametrize(("provider", "started", "failed", "held"), [
    ("github", "pending", "failure", "pending"),
    ("gitlab", "running", "failed", "pending"),
    ("gitea", "pending", "failure", "pending"),
])
def test_commit_states_in_each_forges_words(provider, started, failed, held) -> None:
    begun = of_revision(target="web", revision=_revision(), previous=SHA1, repo="")
    assert payloads.state(provider, begun) == started
    for result, want in (("Applied", "success"), ("NoChange", "success"), ("RolledBack", "success"),
                         ("Failed", failed), ("Unhealthy", failed), ("Refused", failed), ("Held", held)):
        notice = of_record(target="web", record=_transition(result), repo="")
        assert payloads.state(provider, notice) == want, result


def test_commit_status_context_link_and_description_follow_the_forges_rules(receivers) -> None:
    reason = "apply failed: " + "x" * 300
    notice = of_record(target="web@eu-1", record=_transition("Failed", reason=reason),
                       repo="git@github.com:Org/Fleet.git")
    request = payloads.commit_status(provider="github", notice=notice, token=TOKEN, address=None, repository=None,
                                     ui_url="https://gitopsd.example.com")
    assert request.url == f"https://api.github.com/repos/org/fleet/statuses/{SHA2}"
    body = json.loads(request.body)
    assert body["context"] == "gitopsd/web@eu-1"
    assert body["target_url"] == "https://gitopsd.example.com/apps/web@eu-1/history/7"
    assert len(body["description"]) == 140 and body["description"].startswith("Failed on eu-1: apply failed")

    without_ui = payloads.commit_status(provider="github", notice=notice, token=TOKEN, address=None,
                                        repository=None, ui_url=None)
    assert "target_url" not in json.loads(without_ui.body), "no web view: no link (an empty one is refused)"

    gitlab = payloads.commit_status(provider="gitlab", notice=notice, token=TOKEN, address="https://git.corp",
                                    repository=None, ui_url=None)
    assert gitlab.url == f"https://git.corp/api/v4/projects/org%2Ffleet/statuses/{SHA2}"
    assert json.loads(gitlab.body)["name"] == "gitopsd/web@eu-1"

    local = of_record(target="web", record=_transition("Applied"), repo="file:///srv/fleet.git")
    with pytest.raises(payloads.PayloadError, match="set the notifier's repository"):
        payloads.commit_status(provider="github", notice=local, token=TOKEN, address=None, repository=None,
                               ui_url=None)


def test_a_slack_message_escapes_what_the_commit_says() -> None:
    record = _transition("Applied", commit={"author": "Eve <eve@example.com>",
                                            "message": "<!channel> see <https://evil|here> & more"})
    notice = of_record(target="web", record=record, repo="")
    body = json.loads(payloads.slack(notice=notice, address="https://hooks.example.com/x", ui_url=None).body)
    assert "<!channel>" not in body["text"] and "&lt;!channel&gt;" in body["text"]
    assert "Eve &lt;eve@example.com&gt;" in body["text"]
    assert body["blocks"][0]["text"]["text"] == body["text"]


# ---------------------------------------------------------------- delivery against receivers


@pytest.mark.parametrize("provider", ["github", "gitlab", "gitea"])
def test_each_forge_gets_pending_then_success_in_its_documented_shape(receivers, provider) -> None:
    forge = receivers(provider, token=TOKEN)
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        for notice in (of_revision(target="web", revision=_revision(), previous=SHA1, repo=""),
                       of_record(target="web", record=_transition("Applied"), repo="")):
            deliveries.put(_status(provider, notice, forge, repository="org/fleet"))
        forge.wait_arrivals(2)
    finally:
        deliveries.stop()
    assert forge.problems == []
    assert forge.statuses(SHA2) == ["running" if provider == "gitlab" else "pending", "success"]


def test_a_receiver_failing_twice_gets_the_status_on_the_third_attempt_in_order(receivers) -> None:
    forge = receivers("github", token=TOKEN, fail=2)
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    name = "flaky"
    try:
        deliveries.put(_status("github", of_revision(target="web", revision=_revision(), previous=SHA1, repo=""),
                               forge, notifier=name, repository="org/fleet"))
        forge.wait_arrivals(1)   # the pending one is out (its first attempt is refused)
        deliveries.put(_status("github", of_record(target="web", record=_transition("Applied"), repo=""), forge,
                               notifier=name, repository="org/fleet"))
        wait_for("the success delivered", lambda: _count(name, "delivered") + _count(name, "superseded") == 2, 30)
    finally:
        deliveries.stop()
    # The pending one goes first and is retried; the success comes after it, never before. Whether the
    # pending one is still tried again once the success is queued depends on where it is when that
    # happens: out on an attempt (then it is retried: pending x3, success), or waiting out its
    # backoff in the queue (then the success replaces it: pending, then success x2).
    statuses = forge.statuses()
    assert statuses in (["pending", "pending", "pending", "success"], ["pending", "success", "success"]), statuses
    superseded = statuses.count("pending") == 1
    assert (_count(name, "retried"), _count(name, "delivered"), _count(name, "superseded"), _count(name, "failed")) \
        == (2, 1 if superseded else 2, 1 if superseded else 0, 0)


def test_a_receiver_answering_500_forever_is_given_up_logged_and_counted(receivers, lines) -> None:
    forge = receivers("github", token=TOKEN, fail=10**6, fail_body=f"boom, your token was {TOKEN}")
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        notice = of_record(target="web", record=_transition("Applied"), repo="")
        deliveries.put(_status("github", notice, forge, notifier="down", repository="org/fleet"))
        forge.wait_arrivals(FAST.attempts)
        failed = _wait_log(lines, "notification failed")
    finally:
        deliveries.stop()
    assert len(forge.arrivals) == FAST.attempts
    assert failed["level"] == "error"
    assert (failed["notifier"], failed["app"], failed["revision"], failed["status"]) == ("down", "web", SHA2[:12], 500)
    assert "boom" in failed["answer"]
    assert TOKEN not in json.dumps(lines()), "the token a receiver echoes is scrubbed (registered by the reader)"
    exposition = generate_latest(metrics.REGISTRY).decode()
    assert 'gitopsd_notifications_total{notifier="down",provider="github",result="failed"} 1.0' in exposition
    assert _count("down", "retried") == FAST.attempts - 1


PROXY_PASSWORD = "proxy-pass-7f3a9c2e"


@pytest.fixture
def proxy(monkeypatch):
    """A forward proxy on loopback, and an environment that names no other (set HTTP(S)_PROXY per test)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    made = ForwardProxy()
    yield made
    made.close()


def test_an_https_status_goes_through_https_proxy_in_a_tunnel_with_the_proxys_credentials(
        receivers, proxy, tmp_path, monkeypatch, lines) -> None:
    tls = TLSFiles.make(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))    # trust the receiver's CA
    monkeypatch.setenv("HTTPS_PROXY", f"http://bot:{PROXY_PASSWORD}@{proxy.address}")
    forge = receivers("github", token=TOKEN, tls=tls)
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        deliveries.put(_status("github", of_record(target="web", record=_transition("Applied"), repo=""), forge,
                               notifier="proxied", repository="org/fleet"))
        forge.wait_arrivals(1)
    finally:
        deliveries.stop()
    assert forge.problems == [] and forge.statuses(SHA2) == ["success"]
    port = forge.url.rpartition(":")[2]
    assert [(s.method, s.target) for s in proxy.seen] == [("CONNECT", f"localhost:{port}")]
    assert proxy.seen[0].proxy_authorization == "Basic " + base64.b64encode(f"bot:{PROXY_PASSWORD}".encode()).decode()
    assert TOKEN not in json.dumps([s.headers for s in proxy.seen]), "the forge's token crosses the proxy encrypted"
    assert _count("proxied", "delivered") == 1
    assert PROXY_PASSWORD not in json.dumps(lines())


def test_plain_http_goes_through_http_proxy_and_no_proxy_hosts_go_direct(receivers, proxy, monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://{proxy.address}")
    monkeypatch.setenv("NO_PROXY", "example.org,localhost")
    via, direct = receivers("github", token=TOKEN), receivers("github", token=TOKEN)
    direct_url = direct.url.replace("127.0.0.1", "localhost")
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        notice = of_record(target="web", record=_transition("Applied"), repo="")
        deliveries.put(_status("github", notice, via, notifier="via-proxy", repository="org/fleet"))
        deliveries.put(_status("github", notice, direct, notifier="direct", repository="org/fleet",
                               address=direct_url))
        via.wait_arrivals(1)
        direct.wait_arrivals(1)
    finally:
        deliveries.stop()
    assert via.problems == [] and direct.problems == []
    assert [(s.method, s.target) for s in proxy.seen] == [
        ("POST", f"{via.url}/repos/org/fleet/statuses/{SHA2}")], "only the host NO_PROXY does not name is proxied"


def test_a_proxy_that_is_down_fails_the_delivery_without_its_password_in_any_line(receivers, proxy, monkeypatch,
                                                                                  lines) -> None:
    address = proxy.address
    proxy.close()                                   # nothing listens there any more
    monkeypatch.setenv("HTTP_PROXY", f"http://bot:{PROXY_PASSWORD}@{address}")
    forge = receivers("github", token=TOKEN)
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        deliveries.put(_status("github", of_record(target="web", record=_transition("Applied"), repo=""), forge,
                               notifier="no-proxy-there", repository="org/fleet"))
        failed = _wait_log(lines, "notification failed")
    finally:
        deliveries.stop()
    assert forge.arrivals == [], "never sent around the proxy"
    assert failed["notifier"] == "no-proxy-there" and failed["status"] is None
    assert _count("no-proxy-there", "failed") == 1
    assert PROXY_PASSWORD not in json.dumps(lines())


def test_a_receiver_a_private_ca_signed_is_reached_with_the_notifiers_ca_and_refused_without_it(
        receivers, tmp_path: Path, lines) -> None:
    tls = TLSFiles.make(tmp_path / "tls")           # not among the system's CAs
    forge = receivers("github", token=TOKEN, tls=tls)
    (tmp_path / "token").write_text(TOKEN + "\n")
    text = f"""
notifiers:
  trusting: {{provider: github, address: "{forge.url}", repository: org/fleet, tokenFrom: {{file: token}},
             caFrom: {{file: {tls.ca}}}}}
  system-cas: {{provider: github, address: "{forge.url}", repository: org/fleet, tokenFrom: {{file: token}}}}
  key-as-ca: {{provider: github, address: "{forge.url}", repository: org/fleet, tokenFrom: {{file: token}},
              caFrom: {{file: {tls.key}}}}}
apps:
  - {{name: web, repo: "https://github.com/org/fleet.git", notify: [trusting, system-cas, key-as-ca]}}
"""
    config = config_mod.parse(text, base_dir=tmp_path)
    notifier = Notifier(config=lambda: config, credentials=CredentialStore(None, namespace="gitopsd"),
                        ui_url=None, policy=FAST)
    notifier.start()
    try:
        notifier.listen(Event(kind="record", target="web", cfg=config.target("web"), record=_transition("Applied")))
        forge.wait_arrivals(1)
        failed = wait_for("both others given up", lambda: (lambda f: f if len(f) == 2 else None)(
            {e["notifier"]: e for e in lines() if e.get("event") == "notification failed"}), 10, interval=0.02)
    finally:
        notifier.stop()
    assert forge.problems == [] and forge.statuses(SHA2) == ["success"] and len(forge.arrivals) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in failed["system-cas"]["answer"]
    assert "caFrom" in failed["system-cas"]["hint"] and failed["system-cas"]["attempts"] == FAST.attempts
    assert "holds a private key" in failed["key-as-ca"]["answer"] and failed["key-as-ca"]["attempts"] == 1
    assert "PRIVATE KEY" not in json.dumps(lines())


def test_a_4xx_answer_is_not_retried(receivers, lines) -> None:
    forge = receivers("github", token="another-token-entirely")   # so ours is refused: 422
    deliveries = Deliveries(policy=FAST)
    deliveries.start()
    try:
        deliveries.put(_status("github", of_record(target="web", record=_transition("Applied"), repo=""), forge,
                               notifier="refused", repository="org/fleet"))
        failed = _wait_log(lines, "notification failed")
    finally:
        deliveries.stop()
    assert len(forge.arrivals) == 1 and failed["status"] == 422
    assert _count("refused", "retried") == 0 and _count("refused", "failed") == 1


def test_429_with_retry_after_waits_as_long_as_the_server_asks(receivers) -> None:
    forge = receivers("github", token=TOKEN, fail=1, fail_status=429, retry_after="1")
    deliveries = Deliveries(policy=FAST)   # its own backoff is 10 ms: only Retry-After explains a 1 s gap
    deliveries.start()
    try:
        deliveries.put(_status("github", of_record(target="web", record=_transition("Applied"), repo=""), forge,
                               notifier="throttled", repository="org/fleet"))
        first, second = forge.wait_arrivals(2)
    finally:
        deliveries.stop()
    assert second.at - first.at >= 0.95
    assert _count("throttled", "delivered") == 1


def test_a_newer_status_of_the_same_commit_supersedes_a_waiting_one_and_a_full_queue_drops_the_oldest(
        receivers, lines) -> None:
    hold = threading.Event()
    slow = receivers("github", token=TOKEN, hold=hold)
    deliveries = Deliveries(policy=Policy(workers=1, queue=2, base=0.01, grace=2.0))
    deliveries.start()
    try:
        def status(target: str, notice_of) -> Delivery:
            notice = notice_of(target)
            return _status("github", notice, slow, notifier="busy", repository="org/fleet",
                           supersedes=("busy", payloads.context(notice), notice.revision))

        started = lambda t: of_revision(target=t, revision=_revision(), previous=SHA1, repo="")  # noqa: E731
        applied = lambda t: of_record(target=t, record=_transition("Applied"), repo="")          # noqa: E731
        deliveries.put(status("a", started))          # out, held by the receiver
        slow.wait_arrivals(1)
        deliveries.put(status("b", started))          # waits
        deliveries.put(status("b", applied))          # replaces b's pending: same context and commit
        deliveries.put(status("c", applied))          # the queue holds 2: b's success and this
        deliveries.put(status("d", applied))          # full: b's success, the oldest, is dropped
        dropped = _wait_log(lines, "notification dropped: the queue is full")
        hold.set()
        slow.wait_arrivals(3)
    finally:
        deliveries.stop()
    assert dropped["app"] == "b" and dropped["level"] == "error"
    assert [(a.json["context"], a.json["state"]) for a in slow.arrivals] == [
        ("gitopsd/a", "pending"), ("gitopsd/c", "success"), ("gitopsd/d", "success")]
    assert _count("busy", "superseded") == 1 and _count("busy", "dropped") == 1


def test_stop_gives_a_short_grace_then_drops_and_counts_what_is_left(receivers, lines) -> None:
    slow = receivers("github", token=TOKEN, hold=threading.Event())   # never answers while the test runs
    deliveries = Deliveries(policy=Policy(workers=1, grace=0.5, timeout=(1.0, 30.0)))
    deliveries.start()
    for target in ("a", "b"):
        deliveries.put(_status("github", of_record(target=target, record=_transition("Applied"), repo=""), slow,
                               notifier="stuck", repository="org/fleet"))
    slow.wait_arrivals(1)
    began = time.monotonic()
    deliveries.stop()
    assert time.monotonic() - began < 5.0   # the grace, not the receiver's 60 s hold
    assert _count("stuck", "dropped") == 1
    assert any(e["event"] == "notifications dropped: gitopsd is stopping" for e in lines())


def test_backoff_doubles_within_its_cap_and_reads_retry_after() -> None:
    policy = Policy(base=1.0, cap=30.0)
    assert [policy.delay(n, retry_after=None, rand=lambda: 1.0) for n in (1, 2, 3, 6, 9)] == [1, 2, 4, 30, 30]
    assert [policy.delay(n, retry_after=None, rand=lambda: 0.0) for n in (1, 2, 3)] == [0.5, 1, 2]
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert retry_after("120") == 120.0 and retry_after("soon") is None and retry_after(None) is None
    assert 0 <= retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# ---------------------------------------------------------------- the notifier on a feed


def test_the_notifier_reads_the_running_config_and_each_notifier_hears_what_it_asked_for(
        receivers, tmp_path: Path) -> None:
    github, chat, hook = receivers("github", token=TOKEN), receivers("slack"), receivers("webhook", token="sign-key-1")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "slack").write_text(chat.url + "/services/T0/B0/secret")
    (tmp_path / "key").write_text("sign-key-1")
    text = f"""
notifiers:
  github: {{provider: github, address: "{github.url}", repository: org/fleet, tokenFrom: {{file: token}}}}
  chat: {{provider: slack, addressFrom: {{file: slack}}, events: [drift, release]}}
  hook: {{provider: webhook, address: "{hook.url}/gitopsd", signingKeyFrom: {{file: key}}}}
notify: [hook]
apps:
  - {{name: web, repo: "https://github.com/org/fleet.git", notify: [github, chat]}}
  - {{name: quiet, repo: "https://github.com/org/fleet.git"}}
"""
    running = {"config": config_mod.parse(text, base_dir=tmp_path)}
    feed = Feed()
    notifier = Notifier(config=lambda: running["config"], credentials=CredentialStore(None, namespace="gitopsd"),
                        ui_url="https://gitopsd.example.com", policy=FAST)
    feed.listen(notifier.listen)
    notifier.start()
    try:
        web = running["config"].target("web")
        feed.publish(Event(kind="revision", target="web", cfg=web, revision=_revision()))
        github.wait_arrivals(1)   # else the success would supersede the pending still queued (both are fine)
        feed.publish(Event(kind="record", target="web", cfg=web, record=_transition("Applied")))
        feed.publish(Event(kind="record", target="web", cfg=web,
                           record=_transition("RolledBack", revision=SHA1, previous=SHA2, seq=8)))
        github.wait_arrivals(3)
        hook.wait_arrivals(3)
        chat.wait_arrivals(1)
        # A reload that takes `chat` off the app counts from the next event.
        running["config"] = config_mod.parse(text.replace("[github, chat]", "[github]"), base_dir=tmp_path)
        feed.publish(Event(kind="record", target="web", cfg=web, record={
            "type": "drift", "app": "web", "object": {"group": "", "kind": "ConfigMap", "namespace": "d",
                                                       "name": "s"}, "fields": ["data.x"],
            "managers": ["kubectl-edit"], "action": "corrected", "revision": SHA2, "seq": 9}))
        hook.wait_arrivals(4)
    finally:
        notifier.stop()
    assert github.problems == hook.problems == chat.problems == []
    assert [(a.sha, a.json["state"]) for a in github.arrivals] == [(SHA2, "pending"), (SHA2, "success"),
                                                                    (SHA1, "success")]
    assert [a.json["kind"] for a in hook.arrivals] == ["transition", "transition", "transition", "drift"]
    assert [a.json["phase"] for a in hook.arrivals[:2]] == ["started", "finished"]
    body = hook.arrivals[1].json
    assert body["commit"] == {"subject": "Scale web", "author": "Ada Author <ada@example.com>"}
    assert (body["result"], body["health"], body["seq"], body["link"]) == (
        "Applied", "Healthy", 7, "https://gitopsd.example.com/apps/web/history/7")
    assert hook.arrivals[0].headers["X-Gitopsd-Event"] == "transition"
    # chat asked for drift and release: it heard the rollback only, and the drift no more once taken off.
    assert len(chat.arrivals) == 1 and ":rewind:" in chat.arrivals[0].json["text"]
    assert chat.arrivals[0].path == "/services/T0/B0/secret"


def _wait_log(lines, event: str, timeout: float = 10.0) -> dict:
    """The first log line with this event (the worker writes it after the receiver's answer)."""
    return wait_for(f"log line {event!r}", lambda: next((e for e in lines() if e.get("event") == event), None),
                    timeout, interval=0.02)
