"""Health after apply: a rollout that never becomes ready is Unhealthy, within the timeout."""

from __future__ import annotations

import time

import pytest
from helpers import deployment

pytestmark = pytest.mark.cluster


def test_deployment_that_never_becomes_ready_is_unhealthy_within_timeout(app, repo, namespace):
    stuck = deployment("stuck", replicas=2, progressDeadlineSeconds=3)
    # No node has this label: the pods stay Pending and the rollout never progresses.
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    repo.write("stuck.yaml", stuck)
    repo.commit()

    started = time.monotonic()
    result = app.sync(timeout=30.0)
    elapsed = time.monotonic() - started

    assert result.outcome.value == "Unhealthy"
    assert "stuck" in result.reason
    assert "ProgressDeadlineExceeded" in result.reason or "timed out" in result.reason
    assert elapsed < 40, f"took {elapsed:.0f}s for a 30s timeout"


def test_health_timeout_reports_the_last_status(app, repo, namespace):
    stuck = deployment("slow", replicas=1)
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    repo.write("slow.yaml", stuck)
    repo.commit()

    started = time.monotonic()
    result = app.sync(timeout=3.0)

    assert time.monotonic() - started < 15
    assert result.outcome.value == "Unhealthy"
    assert "timed out after 3" in result.reason
