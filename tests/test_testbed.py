"""The test bed itself: a real control plane whose controllers really run.

Every later cluster test relies on these behaviours, so they are proven
first and on their own.
"""

from __future__ import annotations

import pytest
from helpers import wait_for
from kubernetes import client
from kubernetes.dynamic import DynamicClient

pytestmark = pytest.mark.cluster


def _fake_nodes(api_client):
    """KWOK's nodes: under xdist a real node (tests/test_testbed_node.py) may come and go meanwhile."""
    return [n for n in client.CoreV1Api(api_client).list_node().items
            if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"]


def test_nodes_are_ready(api_client):
    nodes = _fake_nodes(api_client)
    assert len(nodes) >= 3
    for node in nodes:
        ready = {c.type: c.status for c in node.status.conditions}
        assert ready.get("Ready") == "True", node.metadata.name
    zones = {n.metadata.labels["topology.kubernetes.io/zone"] for n in nodes}
    assert len(zones) == 3, "fake nodes are spread over three zones for topology tests"


def test_fake_nodes_renew_their_leases(api_client):
    """The node lifecycle controller judges liveness by the node Lease; KWOK
    must renew one per node, or every node turns NotReady once the grace
    period after its last status update runs out (and every pod with it)."""
    from kubernetes import watch

    coord = client.CoordinationV1Api(api_client)
    nodes = [n.metadata.name for n in _fake_nodes(api_client)]
    leases = coord.list_namespaced_lease("kube-node-lease")
    first = {lease.metadata.name: lease.spec.renew_time for lease in leases.items}
    assert set(nodes) <= set(first), f"nodes without a Lease: {sorted(set(nodes) - set(first))}"
    renewed: set[str] = set()
    for event in watch.Watch().stream(coord.list_namespaced_lease, "kube-node-lease",
                                      resource_version=leases.metadata.resource_version, timeout_seconds=90):
        lease = event["object"]
        if lease.metadata.name in first and lease.spec.renew_time > first[lease.metadata.name]:
            renewed.add(lease.metadata.name)
        if renewed >= set(nodes):
            break
    assert renewed >= set(nodes), f"leases not renewed within 90 s: {sorted(set(nodes) - renewed)}"


def test_deployment_becomes_available(api_client, namespace):
    apps = client.AppsV1Api(api_client)
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}},
        },
    })

    def available():
        d = apps.read_namespaced_deployment("web", namespace)
        conds = {c.type: c.status for c in (d.status.conditions or [])}
        return d.status.available_replicas == 3 and conds.get("Available") == "True"

    wait_for("Deployment web Available with 3 replicas", available)
    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    for pod in pods:
        assert pod.status.phase == "Running"
        assert pod.spec.node_name.startswith("kwok-node-")


def test_namespace_deletion_completes(api_client):
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", {"metadata": {"name": "cm"}, "data": {"a": "b"}})
    core.delete_namespace("doomed")

    def gone():
        try:
            core.read_namespace("doomed")
            return False
        except client.ApiException as exc:
            return exc.status == 404

    wait_for("namespace doomed to be finalized and removed", gone)


def test_server_side_apply_creates_then_updates_with_field_manager(api_client, namespace):
    dyn = DynamicClient(api_client)
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "namespace": namespace},
            "data": {"color": "blue"}}

    created = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert created.data.color == "blue"
    managers = [m.manager for m in created.metadata.managedFields]
    assert managers == ["gitopsd"]

    body["data"]["color"] = "green"
    updated = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert updated.data.color == "green"
    assert updated.metadata.resourceVersion != created.metadata.resourceVersion

    again = cms.server_side_apply(body=body, namespace=namespace, field_manager="gitopsd")
    assert again.metadata.resourceVersion == updated.metadata.resourceVersion, \
        "an identical apply must be a no-op on the server"


def test_crd_becomes_established_and_custom_resource_can_be_created(api_client, namespace):
    ext = client.ApiextensionsV1Api(api_client)
    ext.create_custom_resource_definition({
        "metadata": {"name": "widgets.testbed.gitopsd.io"},
        "spec": {
            "group": "testbed.gitopsd.io",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
            }}}],
        },
    })
    try:
        def established():
            crd = ext.read_custom_resource_definition("widgets.testbed.gitopsd.io")
            return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

        wait_for("CRD Established", established)
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object("testbed.gitopsd.io", "v1", namespace, "widgets", {
            "apiVersion": "testbed.gitopsd.io/v1", "kind": "Widget",
            "metadata": {"name": "w1"}, "spec": {"size": 3},
        })
        got = custom.get_namespaced_custom_object("testbed.gitopsd.io", "v1", namespace, "widgets", "w1")
        assert got["spec"]["size"] == 3
    finally:
        ext.delete_custom_resource_definition("widgets.testbed.gitopsd.io")


def test_token_request_authenticates_and_rbac_denies_what_was_not_granted(api_client, namespace, cluster):
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })
    tr = core.create_namespaced_service_account_token("reader", namespace, {
        "spec": {"expirationSeconds": 600},
    })
    token = tr.status.token
    assert token.count(".") == 2, "a JWT"

    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = str(cluster.dir / "pki" / "ca.crt")
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    as_sa = client.CoreV1Api(client.ApiClient(cfg))

    # Authenticates: the RBAC grant works ...
    assert as_sa.list_namespaced_config_map(namespace).items is not None
    # ... and what was not granted is denied by RBAC (403), not unauthenticated (401).
    with pytest.raises(client.ApiException) as denied:
        as_sa.list_namespaced_secret(namespace)
    assert denied.value.status == 403
    assert "system:serviceaccount:%s:reader" % namespace in denied.value.body
    with pytest.raises(client.ApiException) as denied_write:
        as_sa.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}})
    assert denied_write.value.status == 403


# ---------------------------------------------------------------- KWOK Stages for failing images
#
# hack/testbed/kwok-stages/ plays a kubelet for three image tags; every other
# image keeps KWOK's fast path (Running and Ready at once).

def _pod(name: str, image: str, *, restart: str = "Always") -> dict:
    return {"metadata": {"name": name},
            "spec": {"restartPolicy": restart, "containers": [{"name": "app", "image": image}]}}


def _watch_pod(api_client, namespace: str, name: str, until, *, timeout: int = 60) -> list[dict]:
    """Every state of pod `name` (as dicts) from its creation until `until(pod)` holds."""
    from kubernetes import watch

    seen: list[dict] = []
    for event in watch.Watch().stream(client.CoreV1Api(api_client).list_namespaced_pod, namespace,
                                      field_selector=f"metadata.name={name}", timeout_seconds=timeout):
        seen.append(event["raw_object"])
        if until(seen[-1]):
            return seen
    raise AssertionError(f"pod {name} did not get there within {timeout}s; last status: "
                         f"{(seen[-1] if seen else {}).get('status')}")


def _container(pod: dict) -> dict:
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]


def _condition(pod: dict, type_: str) -> str | None:
    return next((c["status"] for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_a_crashloop_pod_crash_loops_with_its_restart_count_climbing(api_client, namespace):
    client.CoreV1Api(api_client).create_namespaced_pod(namespace, _pod("crasher", "web:crashloop"))
    seen = _watch_pod(api_client, namespace, "crasher", lambda p: _container(p).get("restartCount", 0) >= 3)

    pod = seen[-1]
    assert pod["status"]["phase"] == "Running" and pod["status"]["podIP"]
    assert _condition(pod, "Ready") == "False"
    container = _container(pod)
    assert container["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert container["lastState"]["terminated"]["exitCode"] == 1
    assert container["ready"] is False
    counts = [_container(p).get("restartCount") for p in seen if _container(p)]
    assert counts == sorted(counts) and counts[0] < counts[-1], f"restarts climb one by one: {counts}"


def test_a_crashloop_pod_that_never_restarts_fails(api_client, namespace):
    client.CoreV1Api(api_client).create_namespaced_pod(namespace, _pod("once", "web:crashloop", restart="Never"))
    pod = _watch_pod(api_client, namespace, "once", lambda p: (p.get("status") or {}).get("phase") == "Failed")[-1]
    assert _container(pod)["state"]["terminated"]["exitCode"] == 1


def test_a_pullfail_pod_shows_err_image_pull_then_image_pull_back_off(api_client, namespace):
    client.CoreV1Api(api_client).create_namespaced_pod(namespace, _pod("unpullable", "web:pullfail"))
    seen = _watch_pod(api_client, namespace, "unpullable",
                      lambda p: (_container(p).get("state") or {}).get("waiting", {}).get("reason") == "ImagePullBackOff")

    reasons = [r for p in seen if (r := (_container(p).get("state") or {}).get("waiting", {}).get("reason"))]
    assert reasons[0] == "ErrImagePull" and reasons[-1] == "ImagePullBackOff", reasons
    pod = seen[-1]
    assert pod["status"]["phase"] == "Pending" and _condition(pod, "Ready") == "False"
    assert '"web:pullfail"' in _container(pod)["state"]["waiting"]["message"]


def test_a_slow_ready_pod_runs_unready_and_becomes_ready_5s_later(api_client, namespace):
    from datetime import datetime

    client.CoreV1Api(api_client).create_namespaced_pod(namespace, _pod("warming", "web:slow-ready"))
    seen = _watch_pod(api_client, namespace, "warming", lambda p: _condition(p, "Ready") == "True")

    running_unready = [p for p in seen if p["status"].get("phase") == "Running" and _condition(p, "Ready") == "False"]
    assert running_unready and running_unready[0]["status"]["podIP"], "Running with an IP, not yet ready"
    pod = seen[-1]
    ready_at = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "Ready")
    warmed = datetime.fromisoformat(ready_at) - datetime.fromisoformat(pod["status"]["startTime"])
    assert warmed.total_seconds() >= 4, f"ready {warmed} after start (the stage waits 5 s)"
    assert _container(pod)["ready"] is True and _container(pod)["state"]["running"]


@pytest.mark.parametrize("image", ["nginx:1.27", "registry.example.com/crashloop:v1", "web:pullfail-fixed"])
def test_other_images_are_ready_at_once(api_client, namespace, image):
    client.CoreV1Api(api_client).create_namespaced_pod(namespace, _pod("plain", image))
    pod = _watch_pod(api_client, namespace, "plain", lambda p: _condition(p, "Ready") == "True")[-1]
    assert pod["status"]["phase"] == "Running" and pod["status"]["podIP"]
    assert _container(pod)["restartCount"] == 0


def test_a_crashlooping_job_pod_is_never_completed_and_the_job_fails(api_client, namespace):
    # restartPolicy OnFailure restarts in place; KWOK's pod-complete (adapted to
    # wait for Ready) must not complete the pod, and the Job controller fails
    # the Job once the restarts pass its backoffLimit.
    batch = client.BatchV1Api(api_client)
    batch.create_namespaced_job(namespace, {
        "metadata": {"name": "migrate"},
        "spec": {"backoffLimit": 2, "template": {"spec": {
            "restartPolicy": "OnFailure", "containers": [{"name": "migrate", "image": "migrate:crashloop"}]}}}})

    def finished() -> dict | None:
        conditions = batch.read_namespaced_job_status("migrate", namespace).status.conditions or []
        found = {c.type: c.status for c in conditions}
        return found if "True" in (found.get("Failed"), found.get("Complete")) else None

    conditions = wait_for("Job migrate to finish", finished, 60)
    assert conditions.get("Failed") == "True" and conditions.get("Complete") != "True", conditions


def test_a_kwok_default_stage_without_its_anchor_is_refused():
    from testbed import stages

    with pytest.raises(RuntimeError, match="pod-ready.yaml no longer has one `matchExpressions:` line"):
        stages.adapt("kind: Stage\nspec:\n  selector: {}\n", expression="    - key: x\n", name="pod-ready.yaml")


def test_our_stage_files_are_named_after_the_image_tags_they_handle():
    from testbed import stages

    assert stages.tags() == ["crashloop", "pullfail", "slow-ready"]
    for tag in stages.tags():
        assert f'endswith(":{tag}")' in (stages.OURS / f"{tag}.yaml").read_text(), tag


# ---------------------------------------------------------------- a real Prometheus and the test exporter
#
# Progressive-delivery gates query Prometheus; these prove the test bed's
# Prometheus (hack/testbed/prometheus.py) answers as a gate will ask, over
# counters the test sets on the exporter (hack/testbed/exporter.py). No
# apiserver is involved. Series are named after the test (app=<uuid>) because
# the exporter is shared by the session.

ERROR_RATE = ('sum(rate(http_requests_total{{app="{app}",code="500"{extra}}}[10s]))'
              ' / sum(rate(http_requests_total{{app="{app}"{extra}}}[10s]))')


def _app() -> str:
    import uuid

    return f"app-{uuid.uuid4().hex[:8]}"


def _error_rate(prometheus, app: str, *, track: str | None = None) -> list[dict]:
    extra = f',track="{track}"' if track else ""
    return prometheus.query(ERROR_RATE.format(app=app, extra=extra))["result"]


def _settles_at(prometheus, app: str, expected: float, *, track: str | None = None, tolerance: float = 0.002):
    """Wait (polling the query API, bounded) until the error-rate query answers `expected`."""
    def close():
        result = _error_rate(prometheus, app, track=track)
        return result if result and abs(float(result[0]["value"][1]) - expected) <= tolerance else None
    return float(wait_for(f"the error rate of {app} to read {expected}", close, timeout=60)[0]["value"][1])


def test_prometheus_reports_the_pinned_version(prometheus):
    import json
    import urllib.request

    from testbed import build

    with urllib.request.urlopen(f"{prometheus.url}/api/v1/status/buildinfo", timeout=10) as resp:
        info = json.loads(resp.read())["data"]
    assert build.PROMETHEUS == "v0.316.0" and build.prometheus_release() == "3.16.0"
    assert info["version"] == "3.16.0", info



def test_gitea_reports_the_pinned_version_and_refuses_a_request_without_its_token(gitea):
    from testbed import build

    assert gitea.api("GET", "/version") == {"version": build.GITEA.lstrip("v")}
    assert gitea.api("GET", "/user")["login"] == gitea.user
    assert gitea.request("GET", "/user", token="not-a-token")[0] == 401

def test_prometheus_answers_a_query_over_the_exporters_series(prometheus):
    app = _app()
    prometheus.exporter.inc(app=app, track="stable", code="200", by=7)

    result = wait_for(f"http_requests_total of {app} in Prometheus",
                      lambda: prometheus.query(f'http_requests_total{{app="{app}"}}')["result"], timeout=30)
    assert len(result) == 1
    sample = result[0]
    assert sample["metric"] == {"__name__": "http_requests_total", "app": app, "track": "stable", "code": "200",
                                "job": "exporter", "instance": prometheus.exporter_url.removeprefix("http://")}
    assert float(sample["value"][1]) == 7.0


def test_the_error_rate_query_reflects_the_rate_set_on_the_exporter(prometheus):
    app = _app()
    prometheus.exporter.traffic(app=app, track="stable", per_second=90)
    prometheus.exporter.traffic(app=app, track="canary", per_second=10, error_share=0.05)

    assert _settles_at(prometheus, app, 0.05, track="canary") == pytest.approx(0.05, abs=0.002)
    assert _settles_at(prometheus, app, 0.005) == pytest.approx(0.005, abs=0.002)  # 0.5 of 100 requests a second

    # The canary goes bad mid-analysis: the 10 s window slides onto the new rate.
    prometheus.exporter.traffic(app=app, track="canary", per_second=10, error_share=0.2)
    assert _settles_at(prometheus, app, 0.2, track="canary") == pytest.approx(0.2, abs=0.002)


def test_a_query_with_no_data_returns_an_empty_vector(prometheus):
    # What a gate sees for an app that serves nothing yet: inconclusive, not 0 %.
    data = prometheus.query(ERROR_RATE.format(app=_app(), extra=""))
    assert data == {"resultType": "vector", "result": []}


def test_an_app_whose_series_were_reset_has_no_data_again(prometheus):
    app = _app()
    prometheus.exporter.traffic(app=app, track="canary", per_second=10, error_share=0.5)
    wait_for(f"series of {app} in Prometheus",
             lambda: prometheus.query(f'http_requests_total{{app="{app}"}}')["result"], timeout=30)

    assert prometheus.exporter.reset(app=app) == []
    # Gone from the scrape = a staleness marker: instant queries stop seeing it at once.
    wait_for(f"series of {app} to go stale",
             lambda: prometheus.query(f'http_requests_total{{app="{app}"}}')["result"] == [], timeout=30)


def test_an_app_that_serves_no_requests_has_an_error_rate_of_nan(prometheus):
    # The other inconclusive answer: series exist but are flat, so 0 / 0.
    app = _app()
    prometheus.exporter.rate(app=app, track="canary", code="200", per_second=0)
    prometheus.exporter.rate(app=app, track="canary", code="500", per_second=0)

    result = wait_for(f"the error rate of {app} to be evaluated",
                      lambda: _error_rate(prometheus, app), timeout=30)
    assert result[0]["value"][1] == "NaN"


def test_a_bad_query_is_refused_naming_prometheus_error(prometheus):
    from testbed.prometheus import PrometheusError

    with pytest.raises(PrometheusError, match=r"query 'sum\(': bad_data: .*unclosed left parenthesis"):
        prometheus.query("sum(")


def test_the_exporter_refuses_a_bad_control_request_naming_the_field(prometheus):
    from testbed.exporter import ExporterError

    with pytest.raises(ExporterError, match="field 'per_second' must be >= 0"):
        prometheus.exporter.traffic(app=_app(), track="canary", per_second=-1)
    with pytest.raises(ExporterError, match="field 'error_share' must be between 0 and 1, got 5.0"):
        prometheus.exporter.traffic(app=_app(), track="canary", per_second=1, error_share=5)
    with pytest.raises(ExporterError, match="field 'code' is required"):
        prometheus.exporter._call("POST", "/rate", {"app": "a", "track": "b", "per_second": 1})


def test_exporter_counters_grow_at_the_set_rate_and_never_go_down():
    from testbed.exporter import Counters

    now = [100.0]
    counters = Counters(clock=lambda: now[0])
    key = ("web", "canary", "500")
    counters.set_rates({key: 5.0})
    now[0] += 2
    assert counters.snapshot()[0]["value"] == 10.0
    counters.set_rates({key: 1.0})  # the growth so far is kept
    now[0] += 3
    counters.inc(key, 0.5)
    assert counters.snapshot()[0] == {"app": "web", "track": "canary", "code": "500", "value": 13.5, "per_second": 1.0}
    assert counters.exposition().splitlines()[-1] == 'http_requests_total{app="web",track="canary",code="500"} 13.5'


def test_restarting_the_control_plane_keeps_the_prometheus_under_its_name(tmp_path):
    from testbed import cluster

    (tmp_path / "pki").mkdir()
    (tmp_path / "pids.json").write_text("{}")
    (tmp_path / cluster.PROMETHEUS_SUBDIR / "data").mkdir(parents=True)

    cluster._clear(tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == [cluster.PROMETHEUS_SUBDIR]
    assert (tmp_path / cluster.PROMETHEUS_SUBDIR / "data").is_dir()


def test_hack_cluster_prometheus_up_serves_and_down_stops_it(tmp_path):
    """The command-line face: `prometheus up NAME` prints the URLs of a
    Prometheus that has scraped its exporter; `hack/cluster down NAME` (the
    cluster's own verb) stops it too and leaves nothing behind."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from testbed import cluster, procs, prometheus

    hack = Path(__file__).resolve().parent.parent / "hack" / "cluster"
    name = f"cli-prom-{os.getpid()}"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(hack), *args], capture_output=True, text=True, timeout=300)

    try:
        started = run("prometheus", "up", name)
        assert started.returncode == 0, started.stderr
        urls = dict(line.split("=", 1) for line in started.stdout.splitlines())
        assert set(urls) == {"PROMETHEUS_URL", "EXPORTER_URL"}
        query = f"{urls['PROMETHEUS_URL']}/api/v1/query?query=up"
        with urllib.request.urlopen(query, timeout=10) as resp:
            up = json.loads(resp.read())["data"]["result"]
        assert [(s["metric"]["job"], s["value"][1]) for s in up] == [("exporter", "1")]
        status = json.loads(run("status", name).stdout)[0]
        assert status["state"] == "absent" and status["prometheus"]["url"] == urls["PROMETHEUS_URL"]
        pids = prometheus.load(name).pids
        assert set(pids) == {"exporter", "prometheus"}

        stopped = run("down", name)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped: prometheus, exporter" in stopped.stderr
        assert not any(procs.is_ours(pid, prometheus.prometheus_dir(name)) for pid in pids.values())
        assert not cluster.state_dir(name).exists()
    finally:
        prometheus.down(name)
