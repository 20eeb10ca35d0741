"""Steady state: reconciles of an unchanged 200-object app send no write and no read."""

from __future__ import annotations

import re

import pytest
from helpers import app_entry, configmap, wait_for, write_config

pytestmark = pytest.mark.cluster


def _counters(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = out.get(labels, 0) + float(value)
    return out


def _apiserver_writes_by(cluster, instance: str) -> list[str]:
    """Writes the apiserver's audit log attributes to this daemon (by its user agent)."""
    return [f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('name')}"
            for e in cluster.audit_events() if f"({instance})" in e.get("userAgent", "")]


def test_steady_state_reconciles_of_an_unchanged_200_object_app_send_zero_writes(
        repo, kube, namespace, tmp_path, start_daemon, cluster):
    repo.write("all.yaml", [configmap(f"cm-{i:03d}", {"i": str(i)}) for i in range(200)])
    repo.commit("200 objects")
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("steady", repo.url, namespace, interval="5s")])
    # A name of its own: the audit log of a shared cluster holds other tests' daemons too.
    instance = f"steady-{namespace}"
    daemon = start_daemon(cfg, "--no-leader-elect", "--no-watch-local", name=instance)
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied", "first sync", 60)

    def polls() -> float:
        text = daemon.get("/metrics")[1]
        return sum(v for k, v in _counters(text, "gitopsd_reconcile_total").items() if 'trigger="poll"' in k)

    wait_for("a first steady poll", lambda: polls() >= 1, 20)
    before_polls = polls()
    before = _counters(daemon.get("/metrics")[1], "gitopsd_apiserver_requests_total")
    before_server = _apiserver_writes_by(cluster, instance)
    assert before_server, "the audit log sees the daemon's first sync"

    wait_for("three more polls", lambda: polls() >= before_polls + 3, 40)

    after = _counters(daemon.get("/metrics")[1], "gitopsd_apiserver_requests_total")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    writes = {k: v for k, v in delta.items() if re.search(r'verb="(apply|post|put|delete)"', k)}
    assert writes == {}, f"steady-state reconciles wrote: {writes}"
    assert _apiserver_writes_by(cluster, instance) == before_server, "the apiserver's audit log shows writes"
    reads = {k: v for k, v in delta.items() if not k.startswith('{verb="watch"')}
    # The watch cache serves live state: a steady reconcile needs no request at all.
    assert reads == {}, f"steady-state reconciles read: {reads}"
