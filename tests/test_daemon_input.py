"""The real `gitopsd run` under hostile input and unlucky operators.

Each test runs the daemon as a process against the real control plane and
waits on what it logs, records or counts. The input here is what reaches the
daemon itself: its config file (deleted, emptied, garbled, swapped by an
editor or a ConfigMap volume), its HTTP port (slow clients, clients that hang
up, replayed webhooks, a secret sent where it does not belong), and its
memory of an app across reloads and restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import (
    app_entry,
    blue_app_running,
    cm_data,
    configmap,
    github_push,
    metric,
    post_generic,
    post_github,
    replace_file,
    transitions,
    wait_for,
    wait_transition,
    write_config,
)

pytestmark = pytest.mark.cluster

REJECTED = "config change rejected; the previous config keeps running"


def _rejected(daemon, config: Path, reason: str) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == REJECTED and reason in e.get("error", ""),
                             f"rejection ({reason})", 10)


def _still_reconciles(daemon, repo, kube, namespace, color: str) -> None:
    """The running app still deploys a new commit (pushed, then announced by webhook)."""
    repo.write("cm.yaml", configmap("settings", {"color": color}))
    sha = repo.commit(color)
    code, body = post_generic(daemon, repo.url, sha)
    assert code == 202 and json.loads(body)["triggered"], body
    wait_for(f"the app still reconciles ({color})", lambda: cm_data(kube, namespace, "settings") == {"color": color},
             15)


def _status_apps(daemon) -> list[str]:
    code, body = daemon.get("/status")
    assert code == 200, body
    return [a["app"] for a in json.loads(body)["apps"]]


def _hand_edit(kube, namespace: str, color: str) -> None:
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = color
    kube.request("PUT", cms.path(namespace, "settings"), body=live)


def _no_traceback(daemon) -> None:
    text = daemon.log_path.read_text()
    for word in ("Traceback", "BrokenPipeError", "ConnectionResetError"):
        assert word not in text, f"{word} in the daemon log:\n{text[-3000:]}"


def _connections_ended(daemon) -> float:
    return metric(daemon, "gitopsd_http_connections_total")


def _wait_connections_ended(daemon, base: float, count: int) -> None:
    """Wait until `count` connections opened after `base` was read have ended.

    Every scrape is itself a connection, counted once it has ended; subtracting
    all scrapes made so far can only undercount, so this never returns early.
    """
    scrapes = [1]   # the one that read `base`

    def ended() -> bool:
        total = _connections_ended(daemon)
        done = total - base - scrapes[0] >= count
        scrapes[0] += 1
        return done
    wait_for(f"{count} connections handled", ended, 30, interval=0.1)


def _reset(sock: socket.socket) -> None:
    """Hang up as a vanished client does: a TCP reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------- the config file


def test_config_file_deleted_keeps_running_apps(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "steady", "--no-leader-elect",
                              "--no-watch-local")
    config = tmp_path / "config.yaml"

    config.unlink()
    rejected = _rejected(daemon, config, "missing")
    assert rejected["path"] == str(config) and rejected["running"] == ["steady"]
    assert "apps: []" in rejected["hint"]
    assert _status_apps(daemon) == ["steady"]
    _still_reconciles(daemon, repo, kube, namespace, "violet")
    assert not [e for e in daemon.events() if e.get("event") == "config reloaded"]
    _no_traceback(daemon)


def test_config_file_emptied_keeps_running_apps(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "steady", "--no-leader-elect",
                              "--no-watch-local")
    config = tmp_path / "config.yaml"

    config.write_text("")   # truncated: a failed save, a full disk, `> apps.yaml`
    rejected = _rejected(daemon, config, "empty")
    assert rejected["path"] == str(config) and "apps: []" in rejected["hint"]
    config.write_text("\n  \n")   # whitespace only is no better
    _still_reconciles(daemon, repo, kube, namespace, "indigo")
    assert _status_apps(daemon) == ["steady"]
    assert len([e for e in daemon.events() if e.get("event") == REJECTED]) <= 2   # once per state, not per event
    _no_traceback(daemon)


def test_config_path_turned_into_a_directory_keeps_running_apps(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "steady", "--no-leader-elect",
                              "--no-watch-local")
    config = tmp_path / "config.yaml"

    config.unlink()
    config.mkdir()   # a volume mounted at the wrong path looks like this
    _rejected(daemon, config, "Is a directory")
    _still_reconciles(daemon, repo, kube, namespace, "olive")
    assert _status_apps(daemon) == ["steady"]
    _no_traceback(daemon)


def test_config_file_recreated_is_picked_up(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "steady", "--no-leader-elect",
                              "--no-watch-local")
    config = tmp_path / "config.yaml"
    repo.write("extra/cm.yaml", configmap("extra", {"k": "v"}))
    repo.commit("an extra app's files")

    config.unlink()
    _rejected(daemon, config, "missing")
    replace_file(config, b"apps:\n  - name: \xff\xfe\n")   # garbage, not UTF-8
    _rejected(daemon, config, "not UTF-8")

    # Re-created the way an editor saves: a new file renamed over the path.
    replace_file(config, write_config(tmp_path / "next.yaml", [
        app_entry("steady", repo.url, namespace), app_entry("extra", repo.url, namespace, path="extra"),
    ]).read_text())
    reloaded = daemon.wait_event(lambda e: e.get("event") == "config reloaded", "the new file picked up", 10)
    assert reloaded["added"] == ["extra"] and reloaded["removed"] == []
    wait_for("the added app synced", lambda: cm_data(kube, namespace, "extra") == {"k": "v"}, 30)
    assert _status_apps(daemon) == ["extra", "steady"]
    _no_traceback(daemon)


def test_configmap_volume_swap_is_picked_up_every_time(repo, kube, namespace, tmp_path, start_daemon):
    """A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>/,
    and an update swaps ..data atomically (the kubelet's AtomicWriter)."""
    repo.write("a/cm.yaml", configmap("from-a", {"k": "a"}))
    repo.write("b/cm.yaml", configmap("from-b", {"k": "b"}))
    repo.commit()
    volume = tmp_path / "volume"
    volume.mkdir()

    def publish(version: str, apps: list[dict]) -> None:
        data = volume / f"..{version}"
        data.mkdir()
        write_config(data / "config.yaml", apps)
        (volume / "..data_tmp").symlink_to(data.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        for old in volume.glob("..2*"):
            if old != data:
                shutil.rmtree(old)

    publish("2026_01", [app_entry("app-a", repo.url, namespace, path="a")])
    (volume / "config.yaml").symlink_to("..data/config.yaml")
    daemon = start_daemon(volume / "config.yaml", "--no-leader-elect", "--no-watch-local")
    wait_for("app-a synced", lambda: cm_data(kube, namespace, "from-a") is not None, 30)

    publish("2026_02", [app_entry("app-a", repo.url, namespace, path="a"),
                        app_entry("app-b", repo.url, namespace, path="b")])
    wait_for("app-b added by the first swap", lambda: cm_data(kube, namespace, "from-b") is not None, 15)
    publish("2026_03", [app_entry("app-b", repo.url, namespace, path="b")])
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("removed") == ["app-a"],
                      "app-a removed by the second swap", 10)
    assert _status_apps(daemon) == ["app-b"]
    _no_traceback(daemon)


def test_explicit_empty_app_list_removes_apps(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "leaving", "--no-leader-elect",
                              "--no-watch-local")

    replace_file(tmp_path / "config.yaml", "# every app removed on purpose\napps: []\n")
    reloaded = daemon.wait_event(lambda e: e.get("event") == "config reloaded", "reload", 10)
    assert reloaded["removed"] == ["leaving"] and reloaded["added"] == []
    assert _status_apps(daemon) == []
    assert daemon.get("/readyz")[0] == 200
    assert not [e for e in daemon.events() if e.get("event") == REJECTED]


# ---------------------------------------------------------------- the HTTP port


def test_slow_clients_never_delay_a_push_webhook(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "hooked", "--no-leader-elect",
                              "--no-watch-local")
    wait_transition(daemon, "first audit", result="Applied")
    base = _connections_ended(daemon)
    address = ("127.0.0.1", daemon.port)

    # 60 that connect and say nothing, 60 that send a request head a byte at a
    # time (slowloris), 30 that promise a large body and send a few bytes of it.
    silent = [socket.create_connection(address) for _ in range(60)]
    dripping = [socket.create_connection(address) for _ in range(60)]
    stalled = []
    for _ in range(30):
        sock = socket.create_connection(address)
        sock.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: gitopsd\r\nContent-Length: 100000\r\n\r\n{\"ref\":")
        stalled.append(sock)
    stop = threading.Event()

    def drip() -> None:
        head = b"POST /hooks/github HTTP/1.1\r\nHost: gitopsd\r\nX-Padding: " + b"x" * 100_000
        sent = 0
        while not stop.is_set():
            for sock in dripping:
                try:
                    sock.send(head[sent:sent + 1])
                except OSError:
                    pass   # cut by the server's deadline: that is its job
            sent += 1
            stop.wait(0.05)
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        repo.write("cm.yaml", configmap("settings", {"color": "green"}))
        sha = repo.commit("green, past the slow clients")
        started = time.monotonic()
        code, body = post_github(daemon, github_push(repo.url, sha))
        answered = time.monotonic() - started
        assert code == 202 and json.loads(body)["triggered"] == ["hooked"], body
        assert answered < 2.0, f"the webhook took {answered:.2f}s to answer"
        wait_transition(daemon, "the pushed commit recorded", 15, revision=sha, trigger="webhook", result="Applied")
        assert cm_data(kube, namespace, "settings") == {"color": "green"}
    finally:
        stop.set()
        dripper.join()
        for sock in silent + dripping + stalled:
            _reset(sock)
    _wait_connections_ended(daemon, base, len(silent) + len(dripping) + len(stalled))
    assert daemon.get("/healthz")[0] == 200
    _no_traceback(daemon)


def test_client_hanging_up_logs_no_traceback(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "hooked", "--no-leader-elect",
                              "--no-watch-local")
    base = _connections_ended(daemon)
    gone_before = metric(daemon, "gitopsd_http_connections_total", ended="client_gone")
    requests = [
        b"GET /metrics HTTP/1.1\r\nHost: gitopsd\r\n\r\n",                     # hangs up before the answer
        b"GET /status HTTP/1.1\r\nHost: gitopsd\r\n\r\n",
        b"POST /hooks/github HTTP/1.1\r\nHost: gitopsd\r\nContent-Length: 4096\r\n\r\n{\"ref\":",   # mid-body
        b"GET /heal",                                                          # mid-request-line
        b"",                                                                   # before a word
    ]
    for i in range(150):
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        sock.sendall(requests[i % len(requests)])
        _reset(sock)
    _wait_connections_ended(daemon, base, 150)

    assert metric(daemon, "gitopsd_http_connections_total", ended="client_gone") > gone_before
    assert daemon.get("/healthz")[0] == 200
    _no_traceback(daemon)
    # A client that went away is a debug line at most: nothing at info or above.
    assert not [e for e in daemon.events() if "client" in e.get("event", "")]


def test_the_webhook_secret_never_reaches_the_daemon_log(repo, kube, namespace, tmp_path, start_daemon):
    """A sender that puts the shared secret where a signature, a URL or a delivery id goes. The
    refused deliveries are logged without it, and so is a signed one whose delivery id is the secret
    (a CI job that templated the wrong variable): the daemon knows its own secret as a secret value."""
    import hashlib
    import hmac

    from helpers import SECRET

    from gitopsd.redact import REDACTED

    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "hooked", "--no-leader-elect",
                              "--no-watch-local")
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    body = json.dumps({"repo": repo.url, "ref": "main", "after": sha}).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    json_type = {"Content-Type": "application/json"}

    wrong = {**json_type, "X-Gitopsd-Signature": "sha256=" + "0" * 64, "X-Gitopsd-Delivery": SECRET}
    assert daemon.post(f"/hooks/generic?secret={SECRET}", body, wrong)[0] == 401
    assert daemon.post("/hooks/generic", body, {**json_type, "X-Gitopsd-Signature": SECRET})[0] == 401
    assert daemon.post("/hooks/gitlab", body, {**json_type, "X-Gitlab-Event": "Push Hook",
                                               "X-Gitlab-Token": f"{SECRET}-rotated"})[0] == 401
    signed = {**json_type, "X-Gitopsd-Signature": signature, "X-Gitopsd-Delivery": SECRET}
    assert daemon.post("/hooks/generic", body, signed)[0] == 202

    received = daemon.wait_event(lambda e: e.get("event") == "webhook received", "the signed delivery logged")
    assert received["delivery"] == REDACTED
    refused = [e for e in daemon.events() if e.get("event") == "webhook refused"]
    assert len(refused) == 3, refused
    wait_for("the push applied", lambda: cm_data(kube, namespace, "settings") == {"color": "green"}, 15)
    assert SECRET not in daemon.log_path.read_text()


# ---------------------------------------------------------------- replays and no-change webhooks


def test_replayed_webhook_delivery_is_recorded_once(repo, kube, namespace, tmp_path, start_daemon):
    from gitopsd import audit

    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "hooked", "--no-leader-elect",
                              "--no-watch-local")
    wait_transition(daemon, "first audit", result="Applied")
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    body, delivery = github_push(repo.url, sha), str(uuid.uuid4())

    code, answer = post_github(daemon, body, delivery=delivery)
    assert code == 202 and json.loads(answer)["triggered"] == ["hooked"]
    wait_transition(daemon, "the push recorded", 15, revision=sha)

    for _ in range(50):
        code, answer = post_github(daemon, body, delivery=delivery)
        assert (code, json.loads(answer)) == (200, {"duplicate": True, "delivery": delivery, "triggered": []})
    assert metric(daemon, "gitopsd_webhook_requests_total", provider="github", result="duplicate") == 50
    # The same body under a forged fresh id gets through the id check: it costs
    # one reconcile that changes nothing, which is counted, not recorded.
    assert post_github(daemon, body)[0] == 202
    wait_for("the replay's reconcile counted", lambda: metric(
        daemon, "gitopsd_reconcile_total", app="hooked", trigger="webhook", outcome="NoChange") == 1, 15)

    records = transitions(daemon, "hooked")
    assert [r["revision"] for r in records][-1] == sha and len(records) == 2, [r["result"] for r in records]
    stored = [r for r in audit.history(kube, namespace=namespace, app="hooked") if r["type"] == "transition"]
    assert len(stored) == 2
    assert len([e for e in daemon.events() if e.get("event") == "webhook duplicate ignored"]) == 50


def test_webhook_reconcile_with_no_change_is_a_counter(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "hooked", "--no-leader-elect",
                              "--no-watch-local")
    first = wait_transition(daemon, "first audit", result="Applied")
    sha = first["revision"]

    for n in (1, 2, 3):   # a CI job announcing the same commit again and again
        assert post_generic(daemon, repo.url, sha)[0] == 202
        wait_for(f"webhook reconcile {n} counted", lambda: metric(
            daemon, "gitopsd_reconcile_total", app="hooked", trigger="webhook", outcome="NoChange") == n, 15)
    assert len(transitions(daemon, "hooked")) == 1

    # A real change announced by webhook is still a transition, recorded.
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    new = repo.commit("green")
    post_generic(daemon, repo.url, new)
    rec = wait_transition(daemon, "the change", 15, revision=new)
    assert rec["result"] == "Applied" and rec["previous"] == sha and rec["trigger"] == "webhook"


def test_commit_that_changes_nothing_live_is_recorded_so_a_restart_keeps_hand_edits(
        repo, kube, namespace, tmp_path, start_daemon):
    # No webhook here: the commit is picked up by the local-repository watch,
    # a trigger whose NoChange reconciles are otherwise steady state.
    first_daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "manual", "--no-leader-elect",
                                    selfHeal=False)
    applied = wait_transition(first_daemon, "first audit", result="Applied")
    repo.write("NOTES.txt", "not a manifest\n")
    docs_only = repo.commit("docs only")
    rec = wait_transition(first_daemon, "the docs-only commit recorded", 15, revision=docs_only)
    assert rec["result"] == "NoChange" and rec["previous"] == applied["revision"] and rec["trigger"] == "watch"

    _hand_edit(kube, namespace, "hand-painted")
    first_daemon.wait_event(lambda e: e.get("event") == "drift detected", "drift reported", 10)
    first_daemon.stop()
    second = start_daemon(tmp_path / "config.yaml", "--no-leader-elect", name="second")
    rec = wait_transition(second, "first record", app="manual")
    assert rec["previous"] == docs_only and rec["result"] == "DryRun", rec
    assert cm_data(kube, namespace, "settings") == {"color": "hand-painted"}


# ---------------------------------------------------------------- memory across reloads and restarts


def test_app_readded_by_reload_remembers_last_revision(repo, kube, namespace, tmp_path, start_daemon):
    daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "manual", "--no-leader-elect",
                              "--no-watch-local", selfHeal=False)
    applied = wait_transition(daemon, "first audit", result="Applied")
    _hand_edit(kube, namespace, "hand-painted")
    daemon.wait_event(lambda e: e.get("event") == "drift detected", "drift reported", 10)
    config = tmp_path / "config.yaml"
    entry = app_entry("manual", repo.url, namespace, selfHeal=False)

    replace_file(config, "apps: []\n")
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("removed") == ["manual"], "removed", 10)
    replace_file(config, write_config(tmp_path / "again.yaml", [entry]).read_text())
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("added") == ["manual"], "re-added", 10)

    rec = wait_for("the re-added app's first record", lambda: transitions(daemon, "manual")[1:], 30)[0]
    assert rec["previous"] == applied["revision"], rec
    assert rec["result"] == "DryRun" and rec["trigger"] == "config"
    assert cm_data(kube, namespace, "settings") == {"color": "hand-painted"}
    status = json.loads(daemon.get("/status")[1])["apps"][0]
    assert status["revision"] == applied["revision"]


def test_restart_remembers_last_revision_with_selfheal_off(repo, kube, namespace, tmp_path, start_daemon):
    first_daemon = blue_app_running(repo, kube, namespace, tmp_path, start_daemon, "manual", "--no-leader-elect",
                                    "--no-watch-local", selfHeal=False)
    applied = wait_transition(first_daemon, "first audit", result="Applied")
    first_daemon.stop()
    _hand_edit(kube, namespace, "edited-while-down")

    second = start_daemon(tmp_path / "config.yaml", "--no-leader-elect", "--no-watch-local", name="second")
    rec = wait_transition(second, "first record", app="manual")
    assert rec["previous"] == applied["revision"] and rec["result"] == "DryRun", rec
    drift = second.wait_event(lambda e: e.get("event") == "drift detected", "the hand edit reported", 10)
    assert "data.color" in drift["fields"]
    assert cm_data(kube, namespace, "settings") == {"color": "edited-while-down"}
