"""Blue-green switches on the real control plane (issue 12, first part): colour Deployments, a Service whose
selector flips only once the new colour is Ready, a preview Service, the old colour kept for the delay."""

from __future__ import annotations

import pytest
from helpers import (
    app_entry,
    audit_events,
    configmap,
    deployment,
    metric,
    post_generic,
    release_cli,
    transitions,
    wait_for,
    wait_transition,
    write_config,
)

from gitopsd.engine.rollout import COLOR_LABEL, ROLLOUT_ANNOTATION

pytestmark = pytest.mark.cluster


def _web(image: str, *, delay: str = "4s") -> dict:
    obj = deployment("web", replicas=3, image=image)
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: "strategy: blueGreen\nservice: web\n"
                                                          f"previewService: web-preview\nscaleDownDelay: {delay}\n"}
    return obj


def _service(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}}


def _commit(repo, image: str, message: str, *, delay: str = "4s") -> str:
    repo.write("web.yaml", [_web(image, delay=delay), _service("web"), _service("web-preview")])
    return repo.commit(message)


def _selects(kube, namespace: str, service: str) -> str | None:
    svc = kube.get(kube.resource("v1", "Service"), service, namespace)
    return None if svc is None else (svc["spec"].get("selector") or {}).get(COLOR_LABEL)


def _deployment(kube, namespace: str, name: str) -> dict | None:
    return kube.get(kube.resource("apps/v1", "Deployment"), name, namespace)


def _serving(kube, namespace: str, service: str) -> dict[str, int]:
    """Ready endpoints of `service` by the Deployment (colour) their pods belong to."""
    slices = kube.list(kube.resource("discovery.k8s.io/v1", "EndpointSlice"), namespace=namespace,
                       label_selector=f"kubernetes.io/service-name={service}")
    out: dict[str, int] = {}
    for s in slices:
        for e in s.get("endpoints") or []:
            ref = e.get("targetRef") or {}
            if (e.get("conditions") or {}).get("ready") and ref.get("kind") == "Pod":
                color = "green" if ref["name"].startswith("web-green-") else "blue" \
                    if ref["name"].startswith("web-blue-") else "other"
                out[color] = out.get(color, 0) + 1
    return out


@pytest.fixture
def blue_app(repo, kube, namespace, tmp_path, start_daemon):
    name = f"bg-{namespace[-6:]}"
    first = _commit(repo, "nginx:1.0", "web 1.0")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="2m")])
    daemon = start_daemon(config, "--no-watch-local")   # pushes arrive by webhook only: one run each
    wait_for("blue serves, alone", lambda: _selects(kube, namespace, "web") == "blue"
             and _serving(kube, namespace, "web") == {"blue": 3}, 60)
    assert _deployment(kube, namespace, "web") is None   # the colours replace the uncoloured Deployment
    return name, daemon, first


def test_the_service_switches_to_the_new_colour_only_once_it_is_ready_and_the_old_one_goes_after_the_delay(
        blue_app, repo, kube, namespace):
    name, daemon, _ = blue_app
    new = _commit(repo, "nginx:2.0", "web 2.0")
    post_generic(daemon, repo.url, new)

    seen_before_switch = wait_for("green deployed, the preview on it, web still on blue", lambda: (
        _selects(kube, namespace, "web-preview") == "green" and _selects(kube, namespace, "web") == "blue"
        and _serving(kube, namespace, "web") == {"blue": 3}) or _selects(kube, namespace, "web") == "green", 60)
    assert seen_before_switch is True or seen_before_switch   # (the switch may already have happened)
    wait_for("web switched to green", lambda: _selects(kube, namespace, "web") == "green", 60)
    green = _deployment(kube, namespace, "web-green")
    assert green["status"].get("readyReplicas") == 3, "switched only once the new colour was Ready"
    assert green["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:2.0"
    assert _deployment(kube, namespace, "web-blue") is not None, "the old colour is kept for the delay"
    wait_for("green serves alone", lambda: _serving(kube, namespace, "web") == {"green": 3}, 60)
    wait_for("blue scaled down after the delay", lambda: _deployment(kube, namespace, "web-blue") is None, 60)
    # The record comes once the run that pruned it has ended (its health wait), after the object is gone.
    pruned = wait_for("the old colour's prune recorded", lambda: [
        o for t in transitions(daemon, name) for o in t["plan"]["objects"]
        if o["name"] == "web-blue" and o["action"] == "pruned"], 60)
    assert pruned, "the old colour left as an ApplySet member does: pruned"
    assert metric(daemon, "gitopsd_rollout_steps_total", app=name, strategy="blueGreen", outcome="switched") == 2
    assert metric(daemon, "gitopsd_rollout_steps_total", app=name, strategy="blueGreen", outcome="scaledDown") == 2


def test_a_new_colour_that_crash_loops_is_never_switched_to_and_is_rolled_back(blue_app, repo, kube, namespace):
    name, daemon, first = blue_app
    bad = _commit(repo, "nginx:crashloop", "web crashloop")
    post_generic(daemon, repo.url, bad)
    unhealthy = wait_transition(daemon, "green Unhealthy", 60, app=name, result="Unhealthy", revision=bad)
    assert "CrashLoopBackOff" in unhealthy["reason"] and unhealthy["rollout"]["aborted"]
    wait_transition(daemon, "rolled back", 60, app=name, result="RolledBack")
    wait_for("green gone, blue serving", lambda: _deployment(kube, namespace, "web-green") is None
             and _serving(kube, namespace, "web") == {"blue": 3}, 60)
    assert _selects(kube, namespace, "web") == "blue"
    assert not [t for t in transitions(daemon, name) if t.get("revision") == bad
                and any(d.get("phase") == "switched" for d in (t.get("rollout") or {}).get("deployments", []))]


def _pods(kube, namespace: str, prefix: str) -> set[str]:
    return {p["metadata"]["name"] for p in kube.list(kube.resource("v1", "Pod"), namespace=namespace)
            if p["metadata"]["name"].startswith(prefix) and not p["metadata"].get("deletionTimestamp")}


def test_a_rollback_after_the_switch_flips_back_to_the_kept_colour_in_one_run_without_new_pods(
        blue_app, repo, kube, kubeconfig, namespace):
    name, daemon, first = blue_app
    blue_pods = _pods(kube, namespace, "web-blue-")
    new = _commit(repo, "nginx:2.0", "web 2.0, blue kept for 5 minutes", delay="5m")
    post_generic(daemon, repo.url, new)
    wait_for("web switched to green", lambda: _selects(kube, namespace, "web") == "green", 60)
    assert _deployment(kube, namespace, "web-blue") is not None, "blue kept for the delay"

    done = release_cli(kubeconfig, namespace, "rollback", name, "-o", "json")
    assert done.returncode == 0, done.stderr
    rolled = wait_transition(daemon, "RolledBack", 60, app=name, result="RolledBack")
    assert rolled["revision"] != new
    assert _selects(kube, namespace, "web") == "blue", "the rollback run itself switched the Service back"
    assert _selects(kube, namespace, "web-preview") == "blue"
    (back,) = rolled["rollout"]["deployments"]
    assert back["phase"] == "switched" and back["active"] == "blue", back   # switched by this one run
    wait_for("green gone at once, blue serving with the pods it had", lambda: _deployment(
        kube, namespace, "web-green") is None and _serving(kube, namespace, "web") == {"blue": 3}, 60)
    assert _pods(kube, namespace, "web-blue-") == blue_pods, "no pod of blue was replaced"


def _autoscaled(repo, image: str, min_replicas: int, message: str, *extra: dict) -> str:
    """web without spec.replicas, scaled by an HPA (with no metrics, a real HPA holds its minimum)."""
    web = _web(image, delay="2s")
    del web["spec"]["replicas"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": min_replicas, "maxReplicas": 8}}
    repo.write("web.yaml", [web, _service("web"), _service("web-preview"), hpa, *extra])
    return repo.commit(message)


def _hpa_target(kube, namespace: str) -> str | None:
    hpa = kube.get(kube.resource("autoscaling/v2", "HorizontalPodAutoscaler"), "web", namespace)
    return None if hpa is None else hpa["spec"]["scaleTargetRef"]["name"]


def test_the_hpa_follows_the_active_colour_which_starts_at_full_size_and_keeps_the_hpas_count(
        repo, kube, namespace, tmp_path, start_daemon):
    name = f"bghpa-{namespace[-6:]}"
    _autoscaled(repo, "nginx:1.0", 3, "web 1.0, HPA min 3")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="2m")])
    daemon = start_daemon(config, "--no-watch-local")
    wait_for("blue serves at the HPA's minimum, the HPA on blue", lambda: _selects(kube, namespace, "web") == "blue"
             and _serving(kube, namespace, "web") == {"blue": 3} and _hpa_target(kube, namespace) == "web-blue", 90)

    new = _autoscaled(repo, "nginx:2.0", 3, "web 2.0")
    post_generic(daemon, repo.url, new)
    wait_for("green serves alone at blue's size, the HPA on green", lambda: _serving(
        kube, namespace, "web") == {"green": 3} and _hpa_target(kube, namespace) == "web-green"
        and _deployment(kube, namespace, "web-blue") is None, 90)

    # Now the HPA decides: a higher minimum, the HPA scales green, and gitopsd leaves its count alone.
    more = _autoscaled(repo, "nginx:2.0", 5, "HPA min 5")
    post_generic(daemon, repo.url, more)
    wait_for("the HPA scaled green to 5", lambda: _serving(kube, namespace, "web") == {"green": 5}, 90)
    owners = {f["manager"] for f in _deployment(kube, namespace, "web-green")["metadata"]["managedFields"]
              if "f:replicas" in ((f.get("fieldsV1") or {}).get("f:spec") or {})}
    assert "kube-controller-manager" in owners and "gitopsd" not in owners, owners
    # A later commit applies the Deployment again: the HPA's count stays (never reset to 1, never reverted).
    again = _autoscaled(repo, "nginx:2.0", 5, "web 2.0, and a ConfigMap", configmap("settings", {"v": "1"}))
    post_generic(daemon, repo.url, again)
    wait_transition(daemon, "the later commit applied", 60, app=name, revision=again, result="Applied")
    assert _deployment(kube, namespace, "web-green")["spec"]["replicas"] == 5
    assert not [d for d in audit_events(daemon, name, type="drift") if "spec.replicas" in str(d)]
