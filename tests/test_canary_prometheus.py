"""The Prometheus gate on a real Prometheus (the test bed's, scraping the test exporter) and the real
control plane: over the threshold aborts, under it promotes, no data holds the step (issue 12)."""

from __future__ import annotations

import pytest
from helpers import app_entry, deployment, post_generic, transitions, wait_for, wait_transition, write_config

from gitopsd.engine.rollout import ROLLOUT_ANNOTATION

pytestmark = pytest.mark.cluster


def _gated(image: str, *, app: str, address: str | None) -> dict:
    query = (f'sum(rate(http_requests_total{{app="{app}",track="canary",code="500"}}[5s])) / '
             f'sum(rate(http_requests_total{{app="{app}",track="canary"}}[5s]))')
    obj = deployment("web", replicas=10, image=image)
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: (
        "strategy: canary\nsteps: [10]\npause: 1s\ngates:\n  prometheus:\n"
        f"    query: '{query}'\n    max: 0.01\n    interval: 1s\n    count: 2\n"
        + (f"    address: {address}\n" if address else ""))}
    return obj


def _replicas(kube, namespace: str) -> tuple:
    deployments = kube.resource("apps/v1", "Deployment")
    return tuple(None if (d := kube.get(deployments, n, namespace)) is None else d["spec"]["replicas"]
                 for n in ("web", "web-canary"))


def _gate_answers(daemon, name: str) -> list[dict]:
    return [e for e in daemon.events() if e.get("event") == "rollout gate" and e.get("app") == name]


@pytest.fixture
def gated_app(repo, kube, namespace, tmp_path, start_daemon, prometheus):
    name = f"prom-{namespace[-6:]}"
    repo.write("web.yaml", _gated("nginx:1.0", app=namespace, address=prometheus.url))
    first = repo.commit("web 1.0")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="2m")])
    # Pushes arrive by webhook only (one run each); the gate of the second test names no address of its own.
    daemon = start_daemon(config, "--no-watch-local", "--prometheus-url", prometheus.url)
    wait_transition(daemon, "1.0 Applied", 60, app=name, result="Applied", revision=first)
    yield name, daemon
    prometheus.exporter.reset(app=namespace)


def test_an_error_rate_over_the_threshold_aborts_the_canary(gated_app, repo, kube, namespace, prometheus):
    name, daemon = gated_app
    prometheus.exporter.traffic(app=namespace, track="canary", per_second=100, error_share=0.05)
    repo.write("web.yaml", _gated("nginx:2.0", app=namespace, address=prometheus.url))
    bad = repo.commit("web 2.0")
    post_generic(daemon, repo.url, bad)
    aborted = wait_for("the abort", lambda: next((t for t in transitions(daemon, name)
                                                 if (t.get("rollout") or {}).get("aborted")), None), 90)
    answer = aborted["rollout"]["gates"]["web"]["prometheus"]
    assert answer["verdict"] == "fail" and answer["value"] == pytest.approx(0.05, abs=0.01)
    assert aborted["result"] == "Unhealthy" and "prometheus" in aborted["reason"]
    wait_transition(daemon, "rolled back", 60, app=name, result="RolledBack")
    wait_for("no canary, stable at full size", lambda: _replicas(kube, namespace) == (10, None), 60)


def test_an_error_rate_under_the_threshold_promotes_and_no_data_holds_the_step(
        gated_app, repo, kube, namespace, prometheus):
    name, daemon = gated_app
    repo.write("web.yaml", _gated("nginx:2.0", app=namespace, address=None))   # --prometheus-url's
    post_generic(daemon, repo.url, repo.commit("web 2.0"))
    wait_for("the gate has no data: inconclusive", lambda: any(
        a.get("verdict") == "inconclusive" for a in _gate_answers(daemon, name)), 60)
    assert _replicas(kube, namespace) == (9, 1), "the step holds while the gate cannot tell"
    prometheus.exporter.traffic(app=namespace, track="canary", per_second=100, error_share=0.0)
    wait_for("promoted", lambda: _replicas(kube, namespace) == (10, None), 90)
    passes = [a for a in _gate_answers(daemon, name) if a.get("verdict") == "pass"]
    assert len(passes) >= 2 and passes[-1]["value"] == 0
