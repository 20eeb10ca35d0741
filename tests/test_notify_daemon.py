"""Notifications from `gitopsd run` on the real control plane: a push, a bad commit and a hand edit,
told to local receivers that check each request against the provider's documented API (tests/receivers.py).

Tokens and the Slack URL are Secrets in the daemon's namespace, read by the
daemon as in production; the daemon's whole log is searched for the token.
"""

from __future__ import annotations

import threading

import pytest
import yaml
from helpers import (
    app_entry,
    cm_data,
    configmap,
    metric,
    post_generic,
    put_secret,
    wait_for,
    wait_transition,
)
from receivers import Receiver

pytestmark = pytest.mark.cluster

TOKEN = "ghp_e2eNotifyToken_9f8e7d6c5b4a"
SIGNING_KEY = "hook-signing-key-0c7d1f"
UI = "https://gitopsd.example.test"


def _config(path, *, app: dict, notifiers: dict, notify: list[str]):
    path.write_text(yaml.safe_dump({"notifiers": notifiers, "notify": notify, "apps": [app]}, sort_keys=False))
    return path


def _github(receiver: Receiver) -> dict:
    return {"provider": "github", "address": receiver.url, "repository": "org/fleet",
            "tokenFrom": {"secretRef": {"name": "github-token", "key": "token"}}}


def test_a_push_a_hand_edit_and_a_bad_commit_are_told_to_the_forge_the_chat_and_the_webhook(
        repo, kube, namespace, tmp_path, start_daemon, receivers):
    github = receivers("github", token=TOKEN)
    chat = receivers("slack")
    hook = receivers("webhook", token=SIGNING_KEY)
    put_secret(kube, namespace, "github-token", {"token": TOKEN})
    put_secret(kube, namespace, "team-chat", {"address": f"{chat.url}/services/T000/B000/XXXX"})
    put_secret(kube, namespace, "hook-key", {"signingKey": SIGNING_KEY})
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    first = repo.commit("blue")
    config = _config(tmp_path / "config.yaml", app=app_entry("shop", repo.url, namespace, notify=["github"]),
                     notifiers={"github": _github(github),
                                "chat": {"provider": "slack", "addressFrom": {"secretRef": {"name": "team-chat"}}},
                                "hook": {"provider": "webhook", "address": f"{hook.url}/gitopsd",
                                         "signingKeyFrom": {"secretRef": {"name": "hook-key"}}}},
                     notify=["chat", "hook"])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local", "--ui-url", UI)
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    github.wait_for(lambda a: a.sha == first and a.json["state"] == "success", what="first commit's success")

    # A push: pending when the run begins, success with the history link when it is applied.
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    green = repo.commit("Paint it green\n\nThe shop looks better in green.")
    post_generic(daemon, repo.url, green)
    applied = wait_transition(daemon, "green applied", revision=green, result="Applied")
    success = github.wait_for(lambda a: a.sha == green and a.json["state"] == "success", what="green's success")
    assert github.statuses(green) == ["pending", "success"]
    assert success.path == f"/repos/org/fleet/statuses/{green}"
    assert success.json["context"] == "gitopsd/shop"
    assert success.json["target_url"] == f"{UI}/apps/shop/history/{applied['seq']}"
    message = chat.wait_for(lambda a: green[:12] in a.json["text"], what="green's message")
    assert "Paint it green" in message.json["text"] and "Ada Author" in message.json["text"]
    body = hook.wait_for(lambda a: a.json["revision"] == green and a.json["phase"] == "finished").json
    assert (body["kind"], body["result"], body["health"], body["seq"], body["hash"]) == (
        "transition", "Applied", "Healthy", applied["seq"], applied["hash"])
    assert body["commit"]["subject"] == "Paint it green" and body["cluster"] == "in-cluster"

    # A hand edit: self-heal reverts it, and the chat and the webhook hear who did it.
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "settings", namespace)
    live["data"]["color"] = "hand-painted"
    kube.request("PUT", cms.path(namespace, "settings"), body=live, query={"fieldManager": "kubectl-edit"})
    drift = chat.wait_for(lambda a: "drift" in a.json["text"], what="a drift message")
    assert f"ConfigMap/{namespace}/settings" in drift.json["text"] and "data.color" in drift.json["text"]
    assert "changed by kubectl-edit (Update)" in drift.json["text"]
    told = hook.wait_for(lambda a: a.json["kind"] == "drift").json
    assert (told["result"], told["fields"], told["managers"]) == (
        "corrected", ["data.color"], ["kubectl-edit (Update)"])
    assert github.statuses(green) == ["pending", "success"], "drift is no commit status"

    # A bad commit: failure on the forge, a failure message in the chat.
    repo.write("cm.yaml", "data: [unclosed\n")
    broken = repo.commit("Break the shop")
    post_generic(daemon, repo.url, broken)
    failure = github.wait_for(lambda a: a.sha == broken and a.json["state"] == "failure", what="a failure")
    assert github.statuses(broken) == ["pending", "failure"]
    assert failure.json["description"].startswith("Failed")
    chat.wait_for(lambda a: broken[:12] in a.json["text"] and ":x:" in a.json["text"], what="a failure message")
    assert cm_data(kube, namespace, "settings") == {"color": "green"}

    assert github.problems == chat.problems == hook.problems == []
    assert all(a.headers["Authorization"] == f"Bearer {TOKEN}" for a in github.arrivals)
    log_text = daemon.log_path.read_text()
    assert TOKEN not in log_text and "XXXX" not in log_text and SIGNING_KEY not in log_text


def test_a_hanging_receiver_never_holds_up_a_deploy_and_a_dead_forge_is_given_up_logged_and_counted(
        repo, kube, namespace, tmp_path, start_daemon, receivers):
    hold = threading.Event()
    hanging = receivers("webhook", hold=hold)
    dead = receivers("github", token=TOKEN, fail=10**6, fail_body="the forge is down")
    put_secret(kube, namespace, "github-token", {"token": TOKEN})
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit("blue")
    config = _config(tmp_path / "config.yaml", app=app_entry("shop", repo.url, namespace),
                     notifiers={"forge": _github(dead), "slow": {"provider": "webhook", "address": hanging.url}},
                     notify=["forge", "slow"])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    hanging.wait_arrivals(1)   # the transition's start is out, and held there

    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    green = repo.commit("green")
    post_generic(daemon, repo.url, green)
    wait_for("green applied while the receiver hangs",
             lambda: cm_data(kube, namespace, "settings") == {"color": "green"}, 15, interval=0.05)
    assert not hold.is_set()

    failed = daemon.wait_event(lambda e: e.get("event") == "notification failed", "a given-up notification", 60)
    assert failed["level"] == "error"
    assert (failed["notifier"], failed["app"], failed["status"]) == ("forge", "shop", 500)
    assert failed["revision"] and "the forge is down" in failed["answer"]
    assert metric(daemon, "gitopsd_notifications_total", notifier="forge", result="failed") >= 1
    assert metric(daemon, "gitopsd_notifications_total", notifier="forge", result="retried") >= 4
    hold.set()
    assert TOKEN not in daemon.log_path.read_text()


def test_a_restart_tells_nothing_about_the_commit_already_live(repo, kube, namespace, tmp_path, start_daemon,
                                                              receivers):
    github = receivers("github", token=TOKEN)
    put_secret(kube, namespace, "github-token", {"token": TOKEN})
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    first = repo.commit("blue")
    config = _config(tmp_path / "config.yaml", app=app_entry("shop", repo.url, namespace),
                     notifiers={"github": _github(github)}, notify=["github"])
    before = start_daemon(config, "--no-leader-elect", "--no-watch-local", name="before")
    github.wait_for(lambda a: a.sha == first and a.json["state"] == "success", what="the first success")
    before.stop()

    after = start_daemon(config, "--no-leader-elect", "--no-watch-local", name="after")
    wait_transition(after, "the run after the restart", revision=first, result="NoChange")
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    green = repo.commit("green")
    post_generic(after, repo.url, green)
    github.wait_for(lambda a: a.sha == green and a.json["state"] == "success", what="green's success")
    # One lane per notifier and app, in order: a status of the restart would have come before green's.
    assert [(a.sha, a.json["state"]) for a in github.arrivals] == [
        (first, "pending"), (first, "success"), (green, "pending"), (green, "success")]
