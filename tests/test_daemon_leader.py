"""Two daemons against one cluster: only the leader applies; killing it hands over."""

from __future__ import annotations

import signal
import time

import pytest
from helpers import app_entry, cm_data, configmap, post_generic, wait_for, write_config

pytestmark = pytest.mark.cluster

LEASE = ("--lease-duration", "3", "--lease-renew", "1", "--no-watch-local")


def _leader_events(daemon):
    return [e for e in daemon.events() if e.get("event") in ("leadership acquired", "leadership lost")]


def _applied_by(daemon):
    return [e for e in daemon.events() if e.get("event") == "audit" and e.get("result") == "Applied"]


def two_replicas(repo, kube, namespace, tmp_path, start_daemon):
    """replica-a leading, replica-b standing by, the app's first sync done."""
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    cfg = write_config(tmp_path / "config.yaml", [app_entry("shared", repo.url, namespace)])
    a = start_daemon(cfg, *LEASE, name="replica-a")
    wait_for("replica-a leads", lambda: _leader_events(a), 10)
    b = start_daemon(cfg, *LEASE, name="replica-b")
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    return a, b


def test_only_the_leader_applies_and_killing_it_hands_over(repo, kube, namespace, tmp_path, start_daemon):
    a, b = two_replicas(repo, kube, namespace, tmp_path, start_daemon)

    # b is a healthy standby: ready, never applying.
    assert b.get("/readyz")[0] == 200
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    post_generic(a, repo.url, sha)
    post_generic(b, repo.url, sha)
    wait_for("leader applies", lambda: cm_data(kube, namespace, "settings") == {"color": "green"}, 10)
    time.sleep(1)
    assert _applied_by(a) and not _applied_by(b), "only the leader applies"
    assert not _leader_events(b)

    # The leader dies without releasing its lease.
    a.stop(signal.SIGKILL)
    died = time.monotonic()
    wait_for("standby takes over", lambda: any(e["event"] == "leadership acquired" for e in _leader_events(b)), 10,
             interval=0.05)
    assert time.monotonic() - died <= 3 + 1 + 1, "within the lease duration (plus one renew period)"

    repo.write("cm.yaml", configmap("settings", {"color": "teal"}))
    sha = repo.commit("teal")
    post_generic(b, repo.url, sha)
    wait_for("new leader applies", lambda: cm_data(kube, namespace, "settings") == {"color": "teal"}, 10)


def test_sigterm_releases_the_lease_for_an_immediate_hand_over(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("shared", repo.url, namespace)])
    lease = ("--lease-duration", "15", "--lease-renew", "2", "--no-watch-local")
    a = start_daemon(cfg, *lease, name="replica-a")
    wait_for("replica-a leads", lambda: _leader_events(a), 10)
    b = start_daemon(cfg, *lease, name="replica-b")
    time.sleep(1)

    assert a.stop(signal.SIGTERM) == 0
    stopped = time.monotonic()
    wait_for("standby takes over", lambda: any(e["event"] == "leadership acquired" for e in _leader_events(b)), 10,
             interval=0.05)
    assert time.monotonic() - stopped < 5, "a released lease is taken at once, not after 15 s"
    assert any(e.get("event") == "lease released" for e in a.events())


def test_a_push_to_the_standby_is_forwarded_to_the_leader(repo, kube, namespace, tmp_path, start_daemon):
    a, b = two_replicas(repo, kube, namespace, tmp_path, start_daemon)
    time.sleep(1.5)  # b has read the lease (and the leader's address) at least once

    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    started = time.monotonic()
    code, body = post_generic(b, repo.url, sha)   # the Service sent the push to the standby
    assert code == 202 and "shared" in body
    wait_for("applied by the leader", lambda: cm_data(kube, namespace, "settings") == {"color": "green"}, 10,
             interval=0.02)
    assert time.monotonic() - started < 2.0
    assert any(e.get("event") == "push forwarded to the leader" for e in b.events())
    assert _applied_by(a) and not _applied_by(b)
