"""Shared informers: one watch per kind for every app, managed objects only, no edit lost,
and a health wait that the watch feeds instead of polling.

Cluster behaviour runs against the real control plane: a real `gitopsd run`
for what the daemon shows from outside (its metrics, its TCP connections,
the apiserver restarted under it), the informers and the real sync
pipeline in-process where a test must count requests by verb within one
health wait. The relist-after-410 diff and the stream's resume are pure
logic, tested with a fake apiserver.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter

import pytest
from helpers import (
    app_entry,
    cm_data,
    configmap,
    deployment,
    list_pages,
    metric,
    wait_audit,
    wait_for,
    write_config,
)

from gitopsd.daemon.informers import Informers
from gitopsd.daemon.reflector import Reflector
from gitopsd.engine.inventory import PART_OF_LABEL, applyset_id, parent_name
from gitopsd.engine.sync import AppSpec, Outcome, sync
from gitopsd.errors import ClusterError
from gitopsd.kube import Kube, KubeApiError, Resource
from gitopsd.objects import ref_of

pytestmark = pytest.mark.cluster

NOWHERE = {"gitopsd.io/no-such-node": "true"}   # no node has it: the pods stay Pending


def owned_by(name: str, namespace: str, owner: str) -> dict:
    """A ConfigMap carrying the ApplySet label of `owner` (an app id, or another tool's id)."""
    return configmap(name, {"k": "v"}, namespace=namespace, labels={PART_OF_LABEL: owner})


def app_id(app: str, namespace: str) -> str:
    return applyset_id(name=parent_name(app), namespace=namespace)


def apiserver_connections(pid: int, port: int) -> int:
    """The process's ESTABLISHED TCP connections to the apiserver's port (from /proc)."""
    from fleet_bench import tcp_connections

    return tcp_connections(pid, port)["to_apiserver"]


# ---------------------------------------------------------------- one watch per kind, managed objects only

def test_twelve_apps_share_one_watch_per_kind(repo, kube, namespace, tmp_path, start_daemon, cluster):
    apps = [f"app{i}" for i in range(12)]
    for i, name in enumerate(apps):
        repo.write(f"{name}/settings.yaml", configmap(f"settings-{i}", {"i": str(i)}))
    repo.commit("twelve apps, one ConfigMap each")
    kube.apply(owned_by("foreign", namespace, "applyset-another-tool-v1"))   # same label key, other value
    config = write_config(tmp_path / "config.yaml",
                          [app_entry(name, repo.url, namespace, path=name) for name in apps])
    # A client pool of 8 connections (concurrency 2: max(2 + 4, 8)) below the number of apps, so
    # the TCP count shows whether watches grow with the apps: one watch each would need 12.
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local", "--concurrency", "2")
    # From /status, not the log: lines written at the same moment by two threads can run together.
    wait_for("the twelve apps applied", lambda: [a["result"] for a in json.loads(daemon.get("/status")[1])["apps"]]
             == ["Applied"] * len(apps))
    wait_for("the ConfigMap informer to hold the twelve apps' objects",
             lambda: metric(daemon, "gitopsd_informer_objects", kind="ConfigMap") == len(apps))

    assert metric(daemon, "gitopsd_informer_watches", kind="ConfigMap") == 1
    # Besides it, only the watch of release requests (gitopsd hold/resume/rollback): one for all apps.
    assert metric(daemon, "gitopsd_informer_watches", kind="release-requests") == 1
    assert metric(daemon, "gitopsd_informer_watches") == 2, "no other watch is open"
    # Two watch requests in all: not one per app.
    assert metric(daemon, "gitopsd_apiserver_requests_total", verb="watch") == 2
    port = int(cluster.server.rsplit(":", 1)[1])
    connections = apiserver_connections(daemon.proc.pid, port)
    # At most the pool's 8 idle connections plus the two watches it has checked out.
    assert 2 <= connections <= 8 + 2 < len(apps), f"{connections} connections to the apiserver for {len(apps)} apps"


def test_foreign_applyset_objects_are_not_cached(kubeconfig, kube, namespace):
    own = Kube.connect(kubeconfig=kubeconfig)
    informers = Informers(own)
    try:
        mine = app_id("mine", namespace)
        view = informers.view(app_id=mine, on_event=lambda *_: None)
        kube.apply(owned_by("foreign", namespace, "applyset-another-tool-v1"))
        kube.apply(owned_by("mine", namespace, mine))
        view.ensure({(own.resource("v1", "ConfigMap"), namespace)})
        assert set(view.members()) == {ref_of(owned_by("mine", namespace, mine))}
        # Events arrive in order: once a later object is in, the earlier foreign one was seen and dropped.
        kube.apply(owned_by("later", namespace, mine))
        wait_for("the later object", lambda: len(view.members() or {}) == 2, 10)
        kube.apply(owned_by("foreign-later", namespace, "applyset-another-tool-v1"))
        kube.apply(owned_by("last", namespace, mine))
        wait_for("the last object", lambda: len(view.members() or {}) == 3, 10)
        assert informers.cached() == {mine: 3}, "only the registered app's objects are in memory"
    finally:
        informers.stop()
        own.close()


def test_informer_store_gives_the_planner_the_exact_live_object(kubeconfig, kube, namespace):
    """The store keeps objects compactly (their JSON) and hands out exact, independent copies:
    managedFields of every manager included (the ownership fast path and the drift report's
    "who changed it" read them), and a reader that changes its copy changes nothing stored."""
    own = Kube.connect(kubeconfig=kubeconfig)
    informers = Informers(own)
    try:
        mine = app_id("exact", namespace)
        view = informers.view(app_id=mine, on_event=lambda *_: None)
        obj = owned_by("exact", namespace, mine)
        kube.apply(obj)
        cms = own.resource("v1", "ConfigMap")
        edited = kube.get(cms, "exact", namespace)
        edited["data"] = {"k": "edited by hand", "nested": json.dumps({"a": [1, 2.5, None, True]})}
        kube.request("PUT", cms.path(namespace, "exact"), body=edited, query={"fieldManager": "kubectl-edit"})
        view.ensure({(cms, namespace)})
        ref = ref_of(obj)

        def current():
            live = kube.get(cms, "exact", namespace)
            cached = (view.members() or {}).get(ref)
            return cached if cached == live else None

        cached = wait_for("the cached object equal to a GET", current, 10)
        managers = {m["manager"] for m in cached["metadata"]["managedFields"]}
        assert {"gitopsd", "kubectl-edit"} <= managers, managers
        cached["data"]["k"] = "changed by a reader"
        cached["metadata"]["managedFields"].clear()
        again = view.members()[ref]
        assert again["data"]["k"] == "edited by hand" and len(again["metadata"]["managedFields"]) >= 2
        assert view.read(ref, after=None).obj == again
    finally:
        informers.stop()
        own.close()


def test_an_app_added_later_reads_its_members_from_memory_after_one_relist(kubeconfig, kube, namespace):
    own = Kube.connect(kubeconfig=kubeconfig)
    informers = Informers(own)
    cms = {(own.resource("v1", "ConfigMap"), namespace)}
    try:
        first, late = app_id("first", namespace), app_id("late", namespace)
        kube.apply(owned_by("a", namespace, first))
        kube.apply(owned_by("b", namespace, late))   # exists before its app registers: dropped at the list
        informers.view(app_id=first, on_event=lambda *_: None).ensure(cms)
        heard = []
        view = informers.view(app_id=late, on_event=lambda kind, obj: heard.append((kind, obj["metadata"]["name"])))
        before = Counter(own.requests)
        view.ensure(cms)
        assert set(view.members()) == {ref_of(owned_by("b", namespace, late))}
        assert ("ADDED", "b") in heard, "the app is told of its members once"
        pages = list_pages(kube, "v1", "ConfigMap", label_selector=PART_OF_LABEL)
        assert Counter(own.requests) - before == Counter({"list": pages, "watch": 1}), "one relist, shared"
    finally:
        informers.stop()
        own.close()


def test_informers_fall_back_to_one_watch_per_namespace_where_rbac_forbids_a_cluster_wide_one(
        kube, namespace, tmp_path, cluster):
    path = namespaced_kubeconfig(kube, cluster, namespace, tmp_path)
    own = Kube.connect(kubeconfig=path)
    informers = Informers(own)
    try:
        mine = app_id("tenant", namespace)
        kube.apply(owned_by("tenant-settings", namespace, mine))
        view = informers.view(app_id=mine, on_event=lambda *_: None)
        view.ensure({(kube.resource("v1", "ConfigMap"), namespace)})
        assert set(view.members() or {}) == {ref_of(owned_by("tenant-settings", namespace, mine))}
        stream = informers.covering("", "ConfigMap", namespace)
        assert stream.namespace == namespace, "a reflector of the namespace replaced the cluster-wide one"
    finally:
        informers.stop()
        own.close()


def namespaced_kubeconfig(kube, cluster, namespace: str, tmp_path):
    """A ServiceAccount that may read ConfigMaps in `namespace` only (a Role, no ClusterRole)."""
    import json

    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", "namespace": namespace}})
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "read-configmaps", "namespace": namespace},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]})
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "tenant-reads-configmaps", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]})
    token = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/tenant/token",
                         body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": 3600}})["status"]["token"]
    path = tmp_path / "tenant.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "tenant",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                               "certificate-authority": str(cluster.dir / "pki" / "ca.crt")}}],
        "users": [{"name": "tenant", "user": {"token": token}}],
        "contexts": [{"name": "tenant", "context": {"cluster": "c", "user": "tenant"}}]}))
    return path


# ---------------------------------------------------------------- the health wait, fed by the watch

class _Pipeline:
    """The real sync pipeline with the shared informers, on a Kube of its own (its counters are
    the pipeline's requests alone)."""

    def __init__(self, kubeconfig, repo, namespace: str, cache_dir) -> None:
        self.kube = Kube.connect(kubeconfig=kubeconfig)
        self.informers = Informers(self.kube)
        self.spec = AppSpec(name=namespace, repo=repo.url, ref="main", path=".", namespace=namespace,
                            inventory_namespace=namespace, timeout=60.0)
        self.view = self.informers.view(app_id=app_id(namespace, namespace), on_event=lambda *_: None)
        self.cache_dir = cache_dir
        self.wait_began: Counter | None = None

    def sync(self, **spec):
        self.wait_began = None

        def first_reading(_health) -> None:   # the wait's first look (at the apply responses)
            if self.wait_began is None:
                self.wait_began = Counter(self.kube.requests)

        result = sync(self.kube, dataclasses.replace(self.spec, **spec), cache_dir=self.cache_dir, cache=self.view,
                      on_health=first_reading)
        if result.plan is not None and not result.plan.errors:
            self.view.ensure(result.plan.targets)
        return result

    def during_wait(self) -> Counter:
        """Requests of the last sync's health wait, from its first reading on."""
        return Counter(self.kube.requests) - self.wait_began

    def close(self) -> None:
        self.informers.stop()
        self.kube.close()


@pytest.fixture
def pipeline(kubeconfig, repo, namespace, source_cache):
    p = _Pipeline(kubeconfig, repo, namespace, source_cache)
    yield p
    p.close()


def stuck(name: str = "web") -> dict:
    d = deployment(name)
    d["spec"]["template"]["spec"]["nodeSelector"] = NOWHERE
    return d


def test_health_wait_of_a_rollout_that_never_becomes_ready_sends_no_list_or_get(pipeline, repo):
    repo.write("web.yaml", deployment("web"))
    repo.commit("a ready Deployment")
    assert pipeline.sync().outcome is Outcome.APPLIED
    repo.write("web.yaml", stuck())
    repo.commit("a rollout that never becomes ready")

    started = time.monotonic()
    result = pipeline.sync(timeout=5.0)
    waited = time.monotonic() - started

    assert result.outcome is Outcome.UNHEALTHY, result.reason
    assert "timed out after 5s" in result.reason and "Deployment.apps" in result.reason
    assert waited >= 5.0
    during = pipeline.during_wait()
    assert during["list"] == 0 and during["get"] == 0, f"the wait polled: {dict(during)}"
    assert during["watch"] <= 1, f"at most the temporary watch of the new pods: {dict(during)}"


def test_health_wait_fails_a_rollout_early_from_a_pod_event_without_polling(pipeline, repo, kube, namespace):
    repo.write("web.yaml", deployment("web"))
    repo.commit("a ready Deployment")
    assert pipeline.sync().outcome is Outcome.APPLIED
    repo.write("web.yaml", stuck())
    repo.commit("a rollout whose image cannot be pulled")

    results = []
    syncing = threading.Thread(target=lambda: results.append(pipeline.sync(timeout=60.0)))
    started = time.monotonic()
    syncing.start()
    pod = wait_for("the new revision's pod", lambda: next(
        (p for p in kube.list(kube.resource("v1", "Pod"), namespace=namespace)
         if (p["spec"].get("nodeSelector") or {}) == NOWHERE), None), 30)
    # What the kubelet reports for an image it cannot pull.
    kube.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status",
                 content_type="application/strategic-merge-patch+json",
                 body={"status": {"containerStatuses": [{
                     "name": "web", "image": "nginx:1.27", "imageID": "", "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": "ImagePullBackOff",
                                           "message": 'Back-off pulling image "nginx:1.27"'}}}]}})
    syncing.join(60)
    waited = time.monotonic() - started

    (result,) = results
    assert result.outcome is Outcome.UNHEALTHY, result.reason
    (verdict,) = [h for h in result.health if h.ref.kind == "Deployment"]
    assert verdict.status.value == "Failed" and "ImagePullBackOff" in verdict.message, verdict
    assert waited < 30, f"the early verdict took {waited:.1f}s"
    during = pipeline.during_wait()
    # The one GET: the stuck pod's ReplicaSet, whose revision annotation says the
    # pod is of the rollout (engine/health.py, _RolloutPods); no poll.
    assert during["list"] == 0 and during["get"] == 1, f"the wait polled: {dict(during)}"


# ---------------------------------------------------------------- resync: nothing lost across a break

class FakeApiserver:
    """Scripted answers to Reflector's list_with_version and watch calls."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.watched_from: list[str] = []
        self.done = threading.Event()
        self.released = threading.Event()

    def list_with_version(self, res, *, namespace=None, label_selector=None):
        return self._next("list")

    def watch(self, res, *, namespace=None, label_selector=None, resource_version="", timeout_seconds=300,
              on_open=None):
        self.watched_from.append(resource_version)
        step = self._next("watch")
        if on_open is not None:
            on_open(lambda: None)
        for item in step:
            if isinstance(item, Exception):
                raise item
            yield item

    def _next(self, verb: str):
        if not self.script:
            self.done.set()
            self.released.wait(10)   # the reflector is stopped meanwhile
            raise ClusterError("script over")
        want, answer = self.script.pop(0)
        assert want == verb, f"expected {want}, the reflector asked for {verb}"
        return answer


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def keeps(self, bucket: str) -> bool:
        return bucket == "app"

    def wanted(self, taken):
        taken(frozenset({"app"}))
        return frozenset({"app"})

    def on_event(self, stream, kind, bucket, obj):
        self.events.append((kind, obj["metadata"]["name"]))

    def on_synced(self, stream, buckets):
        pass

    def on_forbidden(self, stream):
        return False


CM = Resource(group="", version="v1", kind="ConfigMap", plural="configmaps", namespaced=True)


def cm(name: str, rv: str, owner: str = "app") -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "labels": {PART_OF_LABEL: owner}}}


def run_reflector(script: list) -> tuple[Reflector, RecordingSink, FakeApiserver]:
    api, sink = FakeApiserver(script), RecordingSink()
    stream = Reflector(api, CM, None, selector=PART_OF_LABEL,
                       bucket_of=lambda o: o["metadata"]["labels"][PART_OF_LABEL], sink=sink).start()
    assert api.done.wait(10), "the reflector did not play the script"
    stream.stop()
    api.released.set()
    return stream, sink, api


def test_relist_after_410_reports_a_deletion_that_happened_in_the_gap():
    expired = KubeApiError(status=410, reason="Expired", message="too old resource version", method="WATCH",
                           path="/api/v1/configmaps")
    stream, sink, _ = run_reflector([
        ("list", ([cm("kept", "10"), cm("edited", "11"), cm("deleted", "12")], "12")),
        ("watch", [expired]),
        ("list", ([cm("kept", "10"), cm("edited", "20"), cm("created", "21")], "21")),
    ])
    assert sorted(sink.events) == [("ADDED", "created"), ("DELETED", "deleted"), ("MODIFIED", "edited")]
    assert set(stream.bucket("app")) == {ref_of(cm(n, "0")) for n in ("kept", "edited", "created")}


def test_a_broken_watch_resumes_from_the_last_resource_version_and_keeps_foreign_objects_out():
    stream, sink, api = run_reflector([
        ("list", ([cm("a", "10")], "10")),
        ("watch", [("MODIFIED", cm("a", "11")), ("ADDED", cm("foreign", "12", owner="other")),
                   ("BOOKMARK", {"metadata": {"resourceVersion": "15"}}), ClusterError("stream broke")]),
        ("watch", [("DELETED", cm("a", "16"))]),
    ])
    assert api.watched_from[:2] == ["10", "15"], "resumed from the bookmark, not re-listed"
    assert sink.events == [("MODIFIED", "a"), ("DELETED", "a")], "the foreign object was never reported"
    assert stream.bucket("app") == {} and stream.buckets() == []


def test_a_sink_that_raises_is_logged_and_the_stream_lists_again_instead_of_dying():
    class BrokenOnce(RecordingSink):
        def on_event(self, stream, kind, bucket, obj):
            if not self.events:
                self.events.append(("RAISED", obj["metadata"]["name"]))
                raise KeyError("a bug in the callback")
            super().on_event(stream, kind, bucket, obj)

    api, sink = FakeApiserver([
        ("list", ([cm("a", "10")], "10")),
        ("watch", [("MODIFIED", cm("a", "11"))]),
        ("list", ([cm("a", "11")], "11")),
        ("watch", [("DELETED", cm("a", "12"))]),
    ]), BrokenOnce()
    stream = Reflector(api, CM, None, selector=PART_OF_LABEL,
                       bucket_of=lambda o: o["metadata"]["labels"][PART_OF_LABEL], sink=sink).start()
    assert api.done.wait(10), "the stream stopped at the error instead of listing again"
    stream.stop()
    api.released.set()
    assert sink.events == [("RAISED", "a"), ("DELETED", "a")]
    assert stream.bucket("app") == {}


def test_informer_store_holds_an_object_in_less_than_its_json():
    """Memory grows with what gitopsd manages: a cached object costs less than its JSON (packed
    against its neighbours), not the 5.5 times more of a dict of dicts."""
    import tracemalloc

    import orjson

    def managed(i: int) -> dict:
        obj = cm(f"cm-{i:04d}", str(100 + i))
        obj["data"] = {"value": str(i), "app": "app-0001", "index": str(i % 5)}
        fields = {"f:data": {"f:value": {}, "f:app": {}, "f:index": {}},
                  "f:metadata": {"f:labels": {f"f:{PART_OF_LABEL}": {}}, "f:annotations": {"f:gitopsd.io/hash": {}}}}
        obj["metadata"].update(uid=f"5d6c1e2a-0000-4000-8000-{i:012d}", creationTimestamp="2026-12-01T10:00:00Z",
                               annotations={"gitopsd.io/hash": f"{i:064x}"},
                               managedFields=[{"manager": "gitopsd", "operation": "Apply", "apiVersion": "v1",
                                               "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
                                               "fieldsV1": fields}])
        return obj

    class JsonApiserver(FakeApiserver):   # decodes its answer as Kube does: while traced
        def list_with_version(self, res, *, namespace=None, label_selector=None):
            items, rv = super().list_with_version(res)
            return [orjson.loads(raw) for raw in items], rv

    raws = [orjson.dumps(managed(i)) for i in range(500)]
    json_bytes = sum(len(raw) for raw in raws)
    api, sink = JsonApiserver([("list", (raws, "600"))]), RecordingSink()
    del raws
    tracemalloc.start()
    try:
        stream = Reflector(api, CM, None, selector=PART_OF_LABEL,
                           bucket_of=lambda o: o["metadata"]["labels"][PART_OF_LABEL], sink=sink).start()
        assert api.done.wait(10), "the reflector did not list"
        held = tracemalloc.get_traced_memory()[0]
        assert len(stream.bucket("app")) == 500
    finally:
        tracemalloc.stop()
        stream.stop()
        api.released.set()
    # Packed objects, their keys (ObjectRef) and index entries; as dicts it was 5.5 times the JSON.
    assert held < json_bytes, f"{held} bytes held for {json_bytes} bytes of JSON"


def test_packed_objects_come_back_exactly_whatever_their_shape():
    """The store's packing is lossless for any JSON the apiserver sends, however unlike the
    object that became its dictionary: other kinds, unicode, big and float numbers, nulls."""
    from gitopsd.daemon.reflector import Packer

    packer = Packer()
    first = cm("first", "1")
    others = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "generation": 2 ** 62},
         "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "args": ["a", "", None]}]}}},
         "status": {"conditions": [{"type": "Available", "status": "True"}], "ratio": 0.125}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "c2VjcmV0" * 4000}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ünïcødé", "labels": {}},
         "data": {"emoji": "\u2603 \U0001F600", "empty": "", "json": '{"a": [1, 2]}'}},
        {},
    ]
    stored = [packer.pack(o) for o in [first, *others]]
    assert [packer.unpack(s) for s in stored] == [first, *others]
    again = packer.unpack(stored[1])
    again["spec"]["replicas"] = 0
    assert packer.unpack(stored[1])["spec"]["replicas"] == 3, "each read is the caller's own copy"


# ---------------------------------------------------------------- the apiserver restarted under the daemon

def test_watch_broken_by_an_apiserver_restart_loses_no_edit(own_cluster, own_kube, own_kubeconfig, repo,
                                                           tmp_path, source_cache, request):
    from helpers import SECRET, DaemonProcess
    from testbed import cluster as tb

    kube, namespace = own_kube, f"restart-{int(time.time())}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    repo.write("settings.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry("healer", repo.url, namespace)])
    daemon = DaemonProcess(config=config, kubeconfig=own_kubeconfig, namespace=namespace, workdir=tmp_path,
                           cache=source_cache, extra=("--no-leader-elect", "--no-watch-local"),
                           env={"GITOPSD_WEBHOOK_SECRET": SECRET})
    request.addfinalizer(daemon.stop)
    daemon.wait_ready()
    wait_audit(daemon, "the first sync", app="healer", result="Applied")
    wait_for("the ConfigMap watch", lambda: metric(daemon, "gitopsd_informer_watches", kind="ConfigMap") == 1)

    tb.kill(own_cluster, "kube-apiserver")
    try:
        # Down long enough for the reflector's backoff to outlast the apiserver's start.
        # (The ConfigMap informer's: the release requests' watch backs off on its own schedule.)
        daemon.wait_event(lambda e: e.get("event") == "watch interrupted; resuming" and e.get("retry_in", 0) >= 8
                          and e.get("kind") == "ConfigMap", "the ConfigMap reflector backing off for 8 s or more", 60)
    finally:
        tb.start_component(own_cluster, "kube-apiserver")
    cms = kube.resource("v1", "ConfigMap")
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
                "data": {"color": "red"}}, field_manager="kubectl-edit")
    assert metric(daemon, "gitopsd_informer_watches", kind="ConfigMap") == 0, \
        "the edit was made while the watch was broken"

    wait_for("the edit reverted once the watch is back", lambda: cm_data(kube, namespace, "settings") ==
             {"color": "blue"}, 60)
    corrected = daemon.wait_event(lambda e: e.get("event") == "drift corrected", "a drift report", 10)
    assert corrected["object"] == f"ConfigMap/{namespace}/settings" and "kubectl-edit" in str(corrected["managers"])
    assert kube.get(cms, "settings", namespace)["data"] == {"color": "blue"}
