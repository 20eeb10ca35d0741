"""The canary's shape (gitopsd.engine.rollout): pure logic of what each step applies (issue 12, first part)."""

from __future__ import annotations

import pytest
from helpers import deployment

from gitopsd.engine.render import Manifest
from gitopsd.engine.rollout import (
    CANARY_OF_ANNOTATION,
    ROLLOUT_ANNOTATION,
    TRACK_LABEL,
    Canary,
    PrometheusGate,
    RolloutError,
    WebhookGate,
    beside,
    parse,
    shape,
    split,
    template_hash,
)


def _declared(value: str, **kw) -> dict:
    obj = deployment("web", replicas=10, **kw)
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: value}
    return obj


def test_a_canary_is_read_from_the_deployments_annotation():
    canary = parse(_declared("strategy: canary\nsteps: [10, 50, 100]\npause: 30s\n"), source="web.yaml")
    assert canary == Canary(steps=(10, 50), pause=30.0)
    assert [canary.weight(i) for i in range(3)] == [10, 50, 100]
    assert parse(deployment("web"), source="web.yaml") is None
    assert parse(_declared('{"strategy": "canary", "steps": [25]}'), source="x").pause == 0.0


@pytest.mark.parametrize("value, why", [
    ("strategy: linear\nsteps: [10]", "strategy must be one of canary"),
    ("strategy: canary\nsteps: []", "steps must be a list"),
    ("strategy: canary\nsteps: [50, 10]", "steps must rise"),
    ("strategy: canary\nsteps: [10, 10]", "steps must rise"),
    ("strategy: canary\nsteps: [0]", "steps must be a list"),
    ("strategy: canary\nsteps: [10, 150]", "steps must be a list"),
    ("strategy: canary\nsteps: [10]\npause: soon", "pause must be a duration"),
    ("strategy: canary\nsteps: [10]\nweights: [1]", "unknown field 'weights'"),
    ("[canary]", "must be a mapping"),
    ("strategy: [", "is not YAML"),
])
def test_a_rollout_annotation_gitopsd_cannot_follow_names_the_file_object_and_field(value, why):
    with pytest.raises(RolloutError, match=why) as info:
        parse(_declared(value), source="apps/web.yaml")
    assert "apps/web.yaml: Deployment 'web'" in info.value.message


def test_the_annotation_on_another_kind_is_an_error():
    obj = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {
        "name": "db", "annotations": {ROLLOUT_ANNOTATION: "strategy: canary\nsteps: [10]"}}}
    with pytest.raises(RolloutError, match="only read on apps/v1 Deployments"):
        parse(obj, source="db.yaml")


@pytest.mark.parametrize("total, weight, expected", [
    (10, 10, (9, 1)), (10, 50, (5, 5)), (10, 25, (7, 3)), (3, 10, (2, 1)), (1, 50, (1, 1)),
    (10, 100, (0, 10)), (0, 10, (0, 0)),
])
def test_replicas_are_split_by_the_canarys_share_keeping_the_total(total, weight, expected):
    assert split(total, weight) == expected


def test_a_step_runs_the_new_template_beside_the_stable_one_and_the_service_selects_both():
    old = deployment("web", replicas=10, image="nginx:1.0")
    new = _declared("strategy: canary\nsteps: [10, 50]", image="nginx:2.0")
    canary = parse(new, source="web.yaml")
    stable, beside = shape(Manifest(obj=new, source="web.yaml"), canary=canary, step=0,
                           stable_template=old["spec"]["template"])

    assert stable.obj["metadata"]["name"] == "web" and stable.obj["spec"]["replicas"] == 9
    assert stable.obj["spec"]["template"] == old["spec"]["template"]
    assert stable.obj["metadata"]["annotations"][ROLLOUT_ANNOTATION]   # still declared: the next commit reads it
    c = beside.obj
    assert c["metadata"]["name"] == "web-canary" and c["spec"]["replicas"] == 1
    assert c["metadata"]["annotations"] == {CANARY_OF_ANNOTATION: "web"}
    assert c["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:2.0"
    assert c["spec"]["selector"]["matchLabels"] == {"app": "web", TRACK_LABEL: "canary"}
    # The stable selector (and so the Service, which selects the same labels) matches the canary's pods too.
    pod_labels = c["spec"]["template"]["metadata"]["labels"]
    assert stable.obj["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "canary of web, step 1: 10%" in beside.source
    assert new["spec"]["replicas"] == 10 and new["metadata"]["name"] == "web"   # the commit's object untouched

    _, half = shape(Manifest(obj=new, source="web.yaml"), canary=canary, step=1,
                    stable_template=old["spec"]["template"])
    assert half.obj["spec"]["replicas"] == 5


@pytest.mark.parametrize("stable, weight, expected", [(4, 20, 1), (4, 50, 4), (9, 10, 1), (10, 25, 4), (1, 50, 1),
                                                      (0, 50, 0)])
def test_beside_an_autoscaled_stable_track_the_canary_takes_at_least_its_share(stable, weight, expected):
    assert beside(stable, weight) == expected
    if stable:
        assert expected / (stable + expected) >= weight / 100


def test_a_deployment_without_replicas_keeps_the_count_its_autoscaler_gives_the_stable_track():
    old = deployment("web", image="nginx:1.0")
    new = _declared("strategy: canary\nsteps: [20, 50]", image="nginx:2.0")
    del new["spec"]["replicas"]   # an HPA owns the count
    canary = parse(new, source="web.yaml")
    stable, added = shape(Manifest(obj=new, source="web.yaml"), canary=canary, step=0,
                          stable_template=old["spec"]["template"], live_replicas=4)
    assert "replicas" not in stable.obj["spec"], "gitopsd never takes the HPA's field"
    assert added.obj["spec"]["replicas"] == 1
    _, half = shape(Manifest(obj=new, source="web.yaml"), canary=canary, step=1,
                    stable_template=old["spec"]["template"], live_replicas=6)
    assert half.obj["spec"]["replicas"] == 6


def test_promotion_is_the_deployment_as_the_commit_has_it_and_no_canary():
    new = _declared("strategy: canary\nsteps: [10, 50]", image="nginx:2.0")
    canary = parse(new, source="web.yaml")
    manifest = Manifest(obj=new, source="web.yaml")
    assert shape(manifest, canary=canary, step=2, stable_template={}) == [manifest]


def test_a_template_is_identified_by_its_content_not_by_replicas():
    a = deployment("web", replicas=3, image="nginx:1.0")
    b = deployment("web", replicas=7, image="nginx:1.0")
    c = deployment("web", replicas=3, image="nginx:2.0")
    assert template_hash(a) == template_hash(b) != template_hash(c)


def test_a_webhook_gate_is_read_with_the_strategy_and_checked():
    canary = parse(_declared("strategy: canary\nsteps: [10]\ngates:\n  webhook: {url: 'https://ci.example/gate', "
                             "timeout: 5s}\n"), source="web.yaml")
    assert canary.gates.webhook == WebhookGate(url="https://ci.example/gate", timeout=5.0)
    green = parse(_declared("strategy: blueGreen\nservice: web\ngates: {webhook: {url: 'http://h/x'}}"), source="x")
    assert green.gates.webhook.url == "http://h/x" and green.service == "web" and green.scale_down_delay == 30.0
    for gates, why in (("{webhook: {url: 'ftp://h'}}", "gates.webhook must be"),
                       ("{prometheus: {query: up}}", "give max and/or min"),
                       ("{prometheus: {query: up, max: 1, count: 0}}", "count"),
                       ("{grafana: {}}", "gates must be a mapping of webhook"),
                       ("{webhook: {url: 'http://h', method: GET}}", "gates.webhook must be")):
        with pytest.raises(RolloutError, match=why):
            parse(_declared(f"strategy: canary\nsteps: [10]\ngates: {gates}"), source="web.yaml")


def test_blue_green_names_its_service():
    with pytest.raises(RolloutError, match="service must name a Service"):
        parse(_declared("strategy: blueGreen\npreviewService: p"), source="web.yaml")


def test_a_prometheus_gate_is_read_with_its_bounds_and_schedule():
    canary = parse(_declared(
        "strategy: canary\nsteps: [10]\ngates:\n  prometheus:\n    query: sum(rate(errors[1m]))\n    max: 0.01\n"
        "    interval: 5s\n    count: 3\n    failureLimit: 1\n    address: http://127.0.0.1:9090\n"), source="x")
    assert canary.gates.prometheus == PrometheusGate(query="sum(rate(errors[1m]))", max=0.01, interval=5.0, count=3,
                                                     failure_limit=1, address="http://127.0.0.1:9090")


def test_the_hpa_of_a_blue_green_deployment_follows_the_active_colour_and_sizes_the_first_one():
    from gitopsd.daemon.rollouts import RolloutControl
    web = _declared("strategy: blueGreen\nservice: web")
    del web["spec"]["replicas"]   # the HPA's
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    web["metadata"]["namespace"] = "shop"
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "web-hpa", "namespace": "shop"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": 3, "maxReplicas": 6}}
    other = {**hpa, "metadata": {"name": "api", "namespace": "shop"},
             "spec": {**hpa["spec"], "scaleTargetRef": {"kind": "Deployment", "name": "api"}}}
    control = RolloutControl("shop", live=lambda ref: None)   # nothing live yet: the first deployment
    shaped = {m.obj["metadata"]["name"]: m.obj for m in control.shape(
        [Manifest(obj=o, source=f"{o['metadata']['name']}.yaml") for o in (web, service, hpa, other)])}
    assert shaped["web-blue"]["spec"]["replicas"] == 3, "a new colour starts at the HPA's minimum: full size"
    assert shaped["web-hpa"]["spec"]["scaleTargetRef"]["name"] == "web", "nothing serves yet: the HPA as written"
    assert shaped["api"]["spec"]["scaleTargetRef"]["name"] == "api"   # an HPA of another Deployment is no matter
