"""Canary steps on the real control plane (issue 12, first part): the real Deployment controller,
EndpointSlices of a real Service, KWOK pods (`:crashloop` for a canary that fails)."""

from __future__ import annotations

import json

import pytest
from helpers import (
    app_entry,
    deployment,
    metric,
    post_generic,
    transitions,
    wait_for,
    wait_transition,
    write_config,
)

from gitopsd.daemon import status as status_mod
from gitopsd.engine.rollout import ROLLOUT_ANNOTATION, TRACK_LABEL

pytestmark = pytest.mark.cluster


def _web(image: str, *, steps: str = "[10, 50]", pause: str = "4s") -> dict:
    obj = deployment("web", replicas=10, image=image)
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: f"strategy: canary\nsteps: {steps}\npause: {pause}\n"}
    return obj


def _service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}}


def _replicas(kube, namespace: str) -> tuple[int | None, int | None]:
    deployments = kube.resource("apps/v1", "Deployment")
    got = [kube.get(deployments, name, namespace) for name in ("web", "web-canary")]
    return tuple(None if d is None else d["spec"]["replicas"] for d in got)


def _serving(kube, namespace: str) -> dict[str, int]:
    """Ready endpoints of Service web by track (stable: pods of Deployment web; canary: of web-canary)."""
    slices = kube.list(kube.resource("discovery.k8s.io/v1", "EndpointSlice"), namespace=namespace,
                       label_selector="kubernetes.io/service-name=web")
    out = {"stable": 0, "canary": 0}
    for s in slices:
        for e in s.get("endpoints") or []:
            if (e.get("conditions") or {}).get("ready") and (e.get("targetRef") or {}).get("kind") == "Pod":
                out["canary" if e["targetRef"]["name"].startswith("web-canary-") else "stable"] += 1
    return out


def _images(kube, namespace: str, name: str) -> str | None:
    d = kube.get(kube.resource("apps/v1", "Deployment"), name, namespace)
    return None if d is None else d["spec"]["template"]["spec"]["containers"][0]["image"]


@pytest.fixture
def canary_app(repo, kube, namespace, tmp_path, start_daemon):
    name = f"canary-{namespace[-6:]}"
    repo.write("web.yaml", [_web("nginx:1.0"), _service()])
    first = repo.commit("web 1.0")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="2m")])
    daemon = start_daemon(config, "--no-watch-local")   # pushes arrive by webhook only: one run each
    wait_transition(daemon, "1.0 Applied", 60, app=name, result="Applied", revision=first)
    wait_for("ten stable endpoints", lambda: _serving(kube, namespace) == {"stable": 10, "canary": 0}, 60)
    return name, daemon


def test_a_canary_runs_beside_the_stable_track_step_by_step_and_promotion_leaves_one_deployment(
        canary_app, repo, kube, namespace):
    name, daemon = canary_app
    repo.write("web.yaml", [_web("nginx:2.0"), _service()])
    new = repo.commit("web 2.0")
    post_generic(daemon, repo.url, new)

    # Step 1: 10 % = 1 canary + 9 stable; both tracks behind the Service.
    wait_for("step 1: 9 stable + 1 canary serving", lambda: _replicas(kube, namespace) == (9, 1)
             and _serving(kube, namespace) == {"stable": 9, "canary": 1}, 60)
    assert _images(kube, namespace, "web") == "nginx:1.0" and _images(kube, namespace, "web-canary") == "nginx:2.0"
    canary = kube.get(kube.resource("apps/v1", "Deployment"), "web-canary", namespace)
    assert canary["metadata"]["labels"]["applyset.kubernetes.io/part-of"]   # an ApplySet member: prune sees it
    assert canary["spec"]["selector"]["matchLabels"][TRACK_LABEL] == "canary"
    stored = wait_for("the status shows the step", lambda: status_mod.read_all(
        kube, namespace=namespace, app=name)[0].get("rollout"), 30)
    assert stored[0]["weight"] == 10 and stored[0]["step"] == 1 and stored[0]["steps"] == 3
    # Step 2: 50 %.
    wait_for("step 2: 5 + 5 serving", lambda: _replicas(kube, namespace) == (5, 5)
             and _serving(kube, namespace) == {"stable": 5, "canary": 5}, 60)
    # Promotion: one Deployment on the new template, the canary pruned.
    wait_for("promoted", lambda: _replicas(kube, namespace) == (10, None)
             and _images(kube, namespace, "web") == "nginx:2.0", 60)
    wait_for("ten endpoints on the new template", lambda: _serving(kube, namespace) == {"stable": 10, "canary": 0},
             60)
    promoted = wait_for("the promotion recorded", lambda: [t for t in transitions(daemon, name)
                                                          if (t.get("rollout") or {}).get("promoted")], 60)
    assert promoted[0]["result"] == "Applied" and promoted[0]["revision"] == new
    steps = [t for t in transitions(daemon, name) if t.get("rollout")]
    weights = [d["weight"] for t in steps for d in t["rollout"]["deployments"]]
    assert weights == [10, 50, 100], weights
    assert all(d["healthy"] for t in steps[:-1] for d in t["rollout"]["deployments"])   # each step judged
    assert promoted[0]["health"]["outcome"] == "Healthy"
    assert metric(daemon, "gitopsd_rollout_steps_total", app=name, strategy="canary", outcome="promoted") == 1
    assert metric(daemon, "gitopsd_rollout_steps_total", app=name, strategy="canary", outcome="healthy") >= 2
    assert any(o["name"] == "web-canary" and o["action"] == "pruned" for t in steps for o in t["plan"]["objects"])
    wait_for("the status shows no rollout", lambda: "rollout" not in status_mod.read_all(
        kube, namespace=namespace, app=name)[0], 30)


def test_a_crash_looping_canary_aborts_at_the_first_step_and_the_stable_track_keeps_serving(
        canary_app, repo, kube, namespace):
    name, daemon = canary_app
    repo.write("web.yaml", [_web("nginx:crashloop"), _service()])
    bad = repo.commit("web crashloop")
    post_generic(daemon, repo.url, bad)

    unhealthy = wait_transition(daemon, "the canary step Unhealthy", 60, app=name, result="Unhealthy", revision=bad)
    assert unhealthy["rollout"]["aborted"] and unhealthy["rollout"]["deployments"][0]["weight"] == 10
    assert "CrashLoopBackOff" in unhealthy["reason"]
    assert metric(daemon, "gitopsd_rollout_steps_total", app=name, strategy="canary", outcome="aborted") == 1
    rolled = wait_transition(daemon, "rolled back", 60, app=name, result="RolledBack")
    assert rolled["previous"] == bad and rolled["release"]["quarantined"] == bad
    wait_for("the stable track at full size, no canary", lambda: _replicas(kube, namespace) == (10, None)
             and _serving(kube, namespace) == {"stable": 10, "canary": 0}, 60)
    assert _images(kube, namespace, "web") == "nginx:1.0"
    # The stable track never stopped serving: 9 of its pods stayed behind the Service during the step.
    assert not [t for t in transitions(daemon, name) if t["result"] == "Applied" and t["revision"] == bad
                and not t.get("rollout")]


def test_self_heal_keeps_the_step_that_runs_and_reverts_a_hand_edit_of_either_track(
        canary_app, repo, kube, namespace):
    name, daemon = canary_app
    repo.write("web.yaml", [_web("nginx:2.0", pause="10m"), _service()])   # step 1 holds for the test
    post_generic(daemon, repo.url, repo.commit("web 2.0"))
    wait_for("step 1", lambda: _replicas(kube, namespace) == (9, 1), 60)
    deployments = kube.resource("apps/v1", "Deployment")
    edits = {"web-canary": {"spec": {"template": {"spec": {"containers": [{"name": "web",
                                                                           "image": "nginx:hand-edit"}]}}}},
             "web": {"spec": {"replicas": 10}}}
    for target, patch in edits.items():   # as `kubectl edit` / `kubectl scale` would (a strategic merge)
        kube.request("PATCH", deployments.path(namespace, target), body=patch,
                     content_type="application/strategic-merge-patch+json", query={"fieldManager": "kubectl-edit"})
    wait_for("both tracks put back as the step has them", lambda: _replicas(kube, namespace) == (9, 1)
             and _images(kube, namespace, "web-canary") == "nginx:2.0" and _images(kube, namespace, "web")
             == "nginx:1.0", 30)
    def corrected() -> list[dict]:
        return [e for e in daemon.events() if e.get("event") == "audit" and e.get("type") == "drift"]

    healed = wait_for("drift records of both tracks", lambda: {d["object"]["name"] for d in corrected()}
                      >= {"web", "web-canary"} and corrected(), 30)
    assert all(d["action"] == "corrected" for d in healed)


class _Gate:
    """A webhook gate on loopback whose answer the test sets (status code, or down: no answer)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.status, self.calls = 200, []
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):   # noqa: N802 - the stdlib's name
                gate.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(gate.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gate?token=s3cret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gate():
    g = _Gate()
    yield g
    g.close()


def _gated(image: str, url: str) -> dict:
    obj = _web(image, steps="[10]", pause="1s")
    obj["metadata"]["annotations"][ROLLOUT_ANNOTATION] += f"gates:\n  webhook: {{url: '{url}', timeout: 2s}}\n"
    return obj


def test_a_webhook_gate_that_refuses_aborts_the_canary_and_one_that_passes_promotes_it(
        canary_app, repo, kube, namespace, gate):
    name, daemon = canary_app
    gate.status = 500
    repo.write("web.yaml", [_gated("nginx:2.0", gate.url), _service()])
    refused = repo.commit("web 2.0, gated")
    post_generic(daemon, repo.url, refused)
    aborted = wait_for("the abort recorded", lambda: next((t for t in transitions(daemon, name)
                                                           if (t.get("rollout") or {}).get("aborted")), None), 60)
    assert aborted["rollout"]["gates"]["web"] == {"webhook": {"verdict": "fail", "url": gate.url.split("?")[0],
                                                              "status": 500}}
    assert "webhook" in aborted["reason"] and "500" in aborted["reason"]
    assert "s3cret" not in daemon.log_path.read_text(), "the gate URL's query is never logged"
    assert gate.calls[0]["deployment"] == "web" and gate.calls[0]["weight"] == 10
    wait_transition(daemon, "rolled back", 60, app=name, result="RolledBack")
    wait_for("stable at full size, no canary", lambda: _replicas(kube, namespace) == (10, None), 60)

    gate.status = 200
    repo.write("web.yaml", [_gated("nginx:3.0", gate.url), _service()])
    passed = repo.commit("web 3.0, gated")
    post_generic(daemon, repo.url, passed)
    wait_for("promoted", lambda: _replicas(kube, namespace) == (10, None)
             and _images(kube, namespace, "web") == "nginx:3.0", 60)
    assert [c["weight"] for c in gate.calls] == [10, 10]


def test_a_newer_commit_during_a_canary_supersedes_it_from_the_stable_track(canary_app, repo, kube, namespace):
    name, daemon = canary_app
    repo.write("web.yaml", [_web("nginx:2.0", pause="10m"), _service()])   # step 1 holds
    post_generic(daemon, repo.url, repo.commit("web 2.0"))
    wait_for("2.0 at step 1", lambda: _replicas(kube, namespace) == (9, 1)
             and _images(kube, namespace, "web-canary") == "nginx:2.0", 60)
    repo.write("web.yaml", [_web("nginx:3.0", pause="10m"), _service()])
    newer = repo.commit("web 3.0")
    post_generic(daemon, repo.url, newer)
    wait_for("3.0 is the canary now, beside the same stable track", lambda: _replicas(kube, namespace) == (9, 1)
             and _images(kube, namespace, "web-canary") == "nginx:3.0"
             and _serving(kube, namespace) == {"stable": 9, "canary": 1}, 60)
    assert _images(kube, namespace, "web") == "nginx:1.0", "the stable track never ran 2.0"
    started = [e for e in daemon.events() if e.get("event") == "canary started" and e.get("app") == name]
    assert len(started) == 2
    # 2.0's health wait, if the push cut it short, is recorded as cut short — no verdict, no rollback.
    assert not [t for t in transitions(daemon, name) if t["result"] == "RolledBack"
                or (t["result"] == "Unhealthy" and "cancelled" not in t["reason"]) or t.get("release")]


def _autoscaled(image: str) -> list[dict]:
    """web without spec.replicas, the count an HPA's (min 4: with no metrics, the HPA holds the minimum)."""
    web = _web(image, steps="[20, 50]", pause="2s")
    del web["spec"]["replicas"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": 4, "maxReplicas": 8}}
    return [web, _service(), hpa]


def _owners_of_replicas(kube, namespace: str) -> set[str]:
    web = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    return {m["manager"] for m in web["metadata"].get("managedFields") or []
            if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})}


def test_an_autoscaled_deployment_keeps_its_hpas_count_and_the_canary_runs_beside_it(
        repo, kube, namespace, tmp_path, start_daemon):
    name = f"hpa-{namespace[-6:]}"
    repo.write("web.yaml", _autoscaled("nginx:1.0"))
    first = repo.commit("web 1.0, scaled by its HPA")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="2m")])
    daemon = start_daemon(config, "--no-watch-local")
    wait_transition(daemon, "1.0 Applied", 60, app=name, result="Applied", revision=first)
    wait_for("the HPA scaled web to 4, all serving", lambda: _replicas(kube, namespace) == (4, None)
             and _serving(kube, namespace) == {"stable": 4, "canary": 0}, 90)

    repo.write("web.yaml", _autoscaled("nginx:2.0"))
    new = repo.commit("web 2.0")
    post_generic(daemon, repo.url, new)
    # 20 % beside 4 autoscaled pods: 1 canary (1 of 5); 50 %: 4 canaries beside the 4.
    wait_for("step 1: 4 stable + 1 canary serving", lambda: _replicas(kube, namespace) == (4, 1)
             and _serving(kube, namespace) == {"stable": 4, "canary": 1}, 60)
    stored = wait_for("the status shows the counts", lambda: (status_mod.read_all(
        kube, namespace=namespace, app=name)[0].get("rollout") or [{}])[0].get("replicas"), 30)
    assert stored == {"stable": 4, "canary": 1}
    wait_for("step 2: 4 + 4 serving", lambda: _replicas(kube, namespace) == (4, 4)
             and _serving(kube, namespace) == {"stable": 4, "canary": 4}, 60)
    wait_for("promoted: web on 2.0 at the HPA's 4, no canary", lambda: _replicas(kube, namespace) == (4, None)
             and _images(kube, namespace, "web") == "nginx:2.0", 60)
    wait_for("four endpoints on the new template", lambda: _serving(kube, namespace) == {"stable": 4, "canary": 0},
             60)
    assert "gitopsd" not in _owners_of_replicas(kube, namespace), "gitopsd never took the HPA's field"
