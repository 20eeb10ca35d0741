"""gitopsd against a real forge: Gitea v1.27 (the test bed's, tests/conftest.py `gitea`).

A `git push` to a private Gitea repository makes Gitea send its own push
webhook (its headers, payload and HMAC signature, not ours) to the daemon's
receiver; the daemon fetches the pushed commit over http with the token from
a Secret and applies it. No test here posts a webhook by hand.

Gitea sends GitHub's headers (X-GitHub-Event, X-Hub-Signature-256,
X-GitHub-Delivery) beside its own X-Gitea-* ones, on every hook type, so its
hooks point at /hooks/github.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from helpers import (
    GIT_ENV,
    SECRET,
    GitRepo,
    app_entry,
    cm_data,
    configmap,
    metric,
    put_secret,
    wait_for,
    wait_transition,
)

from testbed.forge import Repo

pytestmark = pytest.mark.cluster


def _forge_repo(gitea, kube, namespace: str, tmp_path) -> tuple[Repo, GitRepo]:
    """A private Gitea repository named after the test, a working clone pushing
    to it, and the daemon's git credentials for it in the Secret `forge-git`."""
    repo = gitea.create_repo(namespace)
    put_secret(kube, namespace, "forge-git", {"username": gitea.user, "token": gitea.token})
    return repo, GitRepo(tmp_path / "git", remote=gitea.push_url(repo))


def _config(path, *, app: dict, **top):
    path.write_text(yaml.safe_dump({**top, "apps": [app]}, sort_keys=False))
    return path


def _hook_events(daemon, message: str) -> list[dict]:
    return [e for e in daemon.events() if e.get("event") == message]


def test_a_push_to_gitea_is_applied_from_its_own_signed_webhook_and_a_wrongly_signed_one_is_refused(
        gitea, kube, namespace, tmp_path, start_daemon):
    repo, work = _forge_repo(gitea, kube, namespace, tmp_path)
    work.write("cm.yaml", configmap("settings", {"color": "blue"}))
    blue = work.commit("blue")
    anonymous = subprocess.run(["git", "ls-remote", repo.clone_url], capture_output=True, text=True, timeout=30,
                               env={**os.environ, **GIT_ENV, "GIT_TERMINAL_PROMPT": "0"})
    assert anonymous.returncode != 0, f"the repository is private: a fetch needs the Secret's token\n{anonymous}"
    # interval 1h: after the first sync only a webhook can bring the next commit.
    app = app_entry(namespace, repo.clone_url, namespace, credentials={"secretRef": {"name": "forge-git"}})
    daemon = start_daemon(_config(tmp_path / "config.yaml", app=app), "--no-leader-elect")
    wait_transition(daemon, "blue fetched over http with the Secret's token and applied", revision=blue,
                    result="Applied")
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}

    gitea.add_webhook(repo, url=f"{daemon.url}/hooks/github", secret=SECRET)
    gitea.add_webhook(repo, url=f"{daemon.url}/hooks/github", secret="not-the-daemons-secret")
    work.write("cm.yaml", configmap("settings", {"color": "green"}))
    green = work.commit("green")

    applied = wait_transition(daemon, "green applied from the webhook", revision=green, trigger="webhook",
                              result="Applied")
    assert cm_data(kube, namespace, "settings") == {"color": "green"}
    received = [e for e in _hook_events(daemon, "webhook received") if e.get("after") == green]
    assert len(received) == 1, received
    assert received[0]["provider"] == "github" and received[0]["ref"] == "refs/heads/main"
    assert received[0]["repo"] == f"127.0.0.1:{gitea.port}/{repo.full_name}"
    assert received[0]["triggered"] == [namespace] and received[0]["delivery"], received[0]
    wait_for("the wrongly signed delivery refused and counted",
             lambda: metric(daemon, "gitopsd_webhook_requests_total", provider="github", result="unauthorized"), 15)
    refused = _hook_events(daemon, "webhook refused")
    assert len(refused) == 1 and "X-Hub-Signature-256 does not match" in refused[0]["reason"], refused
    assert metric(daemon, "gitopsd_webhook_requests_total", provider="github", result="triggered") == 1
    assert applied["previous"] == blue
    assert gitea.token not in daemon.log_path.read_text()


UI = "https://gitopsd.example.test"


def _states(gitea, repo, sha: str, context: str) -> list[str]:
    return [s["status"] for s in gitea.statuses(repo, sha) if s["context"] == context]


def test_the_notifier_sets_pending_then_success_on_a_pushed_commit_and_failure_on_a_bad_one_in_gitea(
        gitea, kube, namespace, tmp_path, start_daemon):
    repo, work = _forge_repo(gitea, kube, namespace, tmp_path)
    put_secret(kube, namespace, "forge-token", {"token": gitea.token})
    work.write("cm.yaml", configmap("settings", {"color": "blue"}))
    blue = work.commit("blue")
    context = f"gitopsd/{namespace}"
    app = app_entry(namespace, repo.clone_url, namespace, credentials={"secretRef": {"name": "forge-git"}})
    notifiers = {"forge": {"provider": "gitea", "address": gitea.url,
                           "tokenFrom": {"secretRef": {"name": "forge-token", "key": "token"}}}}
    config = _config(tmp_path / "config.yaml", app=app, notifiers=notifiers, notify=["forge"])
    daemon = start_daemon(config, "--no-leader-elect", "--ui-url", UI)
    wait_for("blue's success in Gitea", lambda: "success" in _states(gitea, repo, blue, context), 60)
    gitea.add_webhook(repo, url=f"{daemon.url}/hooks/github", secret=SECRET)

    # A push: Gitea's webhook wakes the daemon; pending when the run begins, success when applied.
    work.write("cm.yaml", configmap("settings", {"color": "green"}))
    green = work.commit("Paint it green")
    applied = wait_transition(daemon, "green applied", revision=green, trigger="webhook", result="Applied")
    wait_for("green's success in Gitea", lambda: "success" in _states(gitea, repo, green, context), 30)
    assert _states(gitea, repo, green, context) == ["pending", "success"]
    told = [s for s in gitea.statuses(repo, green) if s["context"] == context]
    assert told[-1]["target_url"] == f"{UI}/apps/{namespace}/history/{applied['seq']}"
    assert told[-1]["creator"]["login"] == gitea.user
    combined = gitea.api("GET", f"/repos/{repo.full_name}/commits/{green}/status")
    assert combined["state"] == "success", combined

    # A bad commit: pending, then failure; the cluster keeps green.
    work.write("cm.yaml", "data: [unclosed\n")
    broken = work.commit("Break the shop")
    wait_for("the bad commit's failure in Gitea", lambda: "failure" in _states(gitea, repo, broken, context), 30)
    assert _states(gitea, repo, broken, context) == ["pending", "failure"]
    failure = [s for s in gitea.statuses(repo, broken) if s["context"] == context][-1]
    assert failure["description"].startswith("Failed"), failure
    assert cm_data(kube, namespace, "settings") == {"color": "green"}

    assert metric(daemon, "gitopsd_notifications_total", notifier="forge", result="failed") == 0
    assert gitea.token not in daemon.log_path.read_text()
