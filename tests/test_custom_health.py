"""Custom health checks in CEL (healthCheckExprs) against the real control plane.

Each test installs a real CRD whose custom resource reports `status.phase`
(a convention kstatus cannot read: without a rule such an object is Current on
sight), syncs a Widget from Git with a rule for its kind, and plays the
widget's controller: it writes the status subresource while the sync waits.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from helpers import app_entry, gitopsd, wait_for, wait_transition, write_config

from gitopsd.config import HealthCheckExpr
from gitopsd.engine.health import Status
from gitopsd.engine.sync import sync

pytestmark = pytest.mark.cluster

CRDS = "apiextensions.k8s.io/v1"


@pytest.fixture
def widget_kind(kube):
    """A fresh Widget CRD (cluster-wide, so its group is unique), with a status subresource; deleted after."""
    group = f"w{uuid.uuid4().hex[:6]}.gitopsd.io"
    kube.apply({
        "apiVersion": CRDS, "kind": "CustomResourceDefinition", "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
    }, field_manager="test")
    crds = kube.resource(CRDS, "CustomResourceDefinition")
    wait_for("CRD established", lambda: any(
        c.get("type") == "Established" and c.get("status") == "True"
        for c in ((kube.get(crds, f"widgets.{group}") or {}).get("status") or {}).get("conditions") or []), 30)
    kube.discover()
    yield group
    kube.delete(crds, f"widgets.{group}")


def rule(group: str) -> HealthCheckExpr:
    return HealthCheckExpr(api_version=f"{group}/v1", kind="Widget", current="status.phase == 'Ready'",
                           in_progress="status.phase in ['Pending', 'Provisioning']",
                           failed="status.phase == 'Failed'")


def set_phase(kube, group: str, namespace: str, phase: str) -> None:
    """What the widget's controller would do: write its status subresource."""
    kube.request("PATCH", f"/apis/{group}/v1/namespaces/{namespace}/widgets/w1/status",
                 body={"status": {"phase": phase}}, content_type="application/merge-patch+json")


def sync_in_background(kube, app, group: str, **overrides):
    """Start a sync of the Widget with the rule; returns (thread, box with the result, health changes seen)."""
    box, seen = {}, []
    spec = app.spec(health_check_exprs=(rule(group),), **overrides)

    def run():
        box["result"] = sync(kube, spec, cache_dir=app.cache_dir, on_health=seen.append)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box, seen


def test_a_cel_rule_marking_a_custom_resource_failed_makes_the_sync_unhealthy_with_its_message(
        app, repo, kube, namespace, widget_kind):
    repo.write("widget.yaml", {"apiVersion": f"{widget_kind}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                               "spec": {"size": 3}})
    repo.commit()
    thread, box, seen = sync_in_background(kube, app, widget_kind)
    # Before its controller writes a phase the rule cannot be evaluated: Unknown, and the wait goes on.
    wait_for("the widget judged Unknown", lambda: any(h.status is Status.UNKNOWN for h in seen), 30)

    set_phase(kube, widget_kind, namespace, "Failed")
    thread.join(60)

    result = box["result"]
    assert result.outcome.value == "Unhealthy", (result.reason, result.errors)
    assert f"Widget.{widget_kind}/{namespace}/w1 Failed (Widget w1 is Failed by its healthCheckExprs " \
           "(failed: status.phase == 'Failed'))" in result.reason
    assert "timed out" not in result.reason   # Failed settles the wait at once


def test_in_progress_keeps_waiting_and_current_makes_the_custom_resource_healthy(
        app, repo, kube, namespace, widget_kind):
    repo.write("widget.yaml", {"apiVersion": f"{widget_kind}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                               "spec": {"size": 3}})
    repo.commit()
    thread, box, seen = sync_in_background(kube, app, widget_kind)
    wait_for("the widget applied", lambda: kube.get(kube.resource(f"{widget_kind}/v1", "Widget"), "w1", namespace),
             30)

    set_phase(kube, widget_kind, namespace, "Pending")
    wait_for("the widget judged in progress by the rule", lambda: any(
        h.status is Status.IN_PROGRESS and "inProgress: status.phase in" in h.message for h in seen), 30)
    assert thread.is_alive() and "result" not in box   # in progress: the sync goes on waiting

    set_phase(kube, widget_kind, namespace, "Ready")
    thread.join(60)

    result = box["result"]
    assert result.outcome.value == "Applied", (result.reason, result.errors)
    [widget] = [h for h in result.health if h.ref.kind == "Widget"]
    assert (widget.status, widget.message) == (
        Status.CURRENT, "Widget w1 is Current by its healthCheckExprs (current: status.phase == 'Ready')")


def test_without_a_rule_the_phase_is_not_read_and_the_widget_is_current_on_sight(
        app, repo, kube, namespace, widget_kind):
    # What the rule is for: kstatus' generic reading knows no phase.
    repo.write("widget.yaml", {"apiVersion": f"{widget_kind}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                               "spec": {"size": 3}})
    repo.commit()
    result = app.sync()
    assert result.outcome.value == "Applied"
    [widget] = [h for h in result.health if h.ref.kind == "Widget"]
    assert widget.status is Status.CURRENT and "no readiness to wait for" in widget.message


def test_the_daemon_judges_a_custom_resource_by_its_apps_rule(
        repo, kube, namespace, tmp_path, widget_kind, start_daemon):
    # The daemon's health wait reads the widget from its informers' watch, not by polling: same rule.
    repo.write("widget.yaml", {"apiVersion": f"{widget_kind}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                               "spec": {"size": 3}})
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry("widgets", repo.url, namespace, timeout="2m",
                                                               healthCheckExprs=[{
        "apiVersion": f"{widget_kind}/v1", "kind": "Widget", "current": "status.phase == 'Ready'",
        "inProgress": "status.phase in ['Pending', 'Provisioning']", "failed": "status.phase == 'Failed'"}])])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")
    wait_for("the widget applied", lambda: kube.get(kube.resource(f"{widget_kind}/v1", "Widget"), "w1", namespace),
             30)

    set_phase(kube, widget_kind, namespace, "Failed")

    record = wait_transition(daemon, "the Unhealthy verdict", timeout=60, app="widgets", result="Unhealthy")
    [widget] = record["health"]["objects"]
    assert (widget["kind"], widget["status"]) == ("Widget", "Failed")
    assert widget["message"] == "Widget w1 is Failed by its healthCheckExprs (failed: status.phase == 'Failed')"


def test_a_bad_expression_is_a_config_error_of_the_daemon(tmp_path, kubeconfig, source_cache):
    config = tmp_path / "config.yaml"
    config.write_text("apps:\n  - name: web\n    repo: https://git.example.com/fleet.git\n    healthCheckExprs:\n"
                      "      - {apiVersion: example.com/v1, kind: Widget, current: \"status.phase = 'Ready'\"}\n")
    proc = gitopsd("run", "--config", str(config), "--no-leader-elect", "--http-port", "0",
                   kubeconfig=kubeconfig, cache=source_cache, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "apps[0] (web).healthCheckExprs[0].current: is not a valid CEL expression: line 1, column 14" in out
    assert "Traceback" not in out
