"""kstatus readiness rules and the health wait loop, as pure logic.

Objects are small dicts shaped like what the apiserver returns; `wait` runs
against a fake `get` the test mutates, with tiny intervals. Whether real
controllers produce these shapes is proven by the cluster tests of sync.
"""

from __future__ import annotations

import threading
import time

import pytest

from gitopsd.engine.health import REVISION_ANNOTATION, ObjectHealth, Reading, Status, compute, summarize, wait
from gitopsd.objects import ObjectRef, ref_of


def cond(type_: str, status: str = "True", reason: str = "", message: str = "", **extra) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, **extra}


def obj(api_version: str, kind: str, *, name: str = "x", generation: int | None = 1, spec: dict | None = None,
        status: dict | None = None, labels: dict | None = None, **meta) -> dict:
    metadata = {"name": name, "namespace": "app", **meta}
    if generation is not None:
        metadata["generation"] = generation
    if labels:
        metadata["labels"] = labels
    out = {"apiVersion": api_version, "kind": kind, "metadata": metadata}
    if spec is not None:
        out["spec"] = spec
    if status is not None:
        out["status"] = status
    return out


def deployment(*, spec_replicas: int = 3, replicas: int = 3, updated: int = 3, ready: int = 3, available: int = 3,
               conditions: list[dict] | None = None, generation: int = 1, observed: int = 1,
               name: str = "web") -> dict:
    if conditions is None:
        conditions = [cond("Available", reason="MinimumReplicasAvailable"),
                      cond("Progressing", reason="NewReplicaSetAvailable",
                           message=f'ReplicaSet "{name}-new" has successfully progressed.')]
    return obj("apps/v1", "Deployment", name=name, generation=generation, spec={"replicas": spec_replicas},
               status={"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": available, "conditions": conditions})


def statefulset(*, spec_replicas: int = 3, ready: int = 3, updated: int = 3, current_rev: str = "db-2",
                update_rev: str = "db-2", strategy: dict | None = None) -> dict:
    spec = {"replicas": spec_replicas}
    if strategy is not None:
        spec["updateStrategy"] = strategy
    return obj("apps/v1", "StatefulSet", name="db", spec=spec,
               status={"observedGeneration": 1, "replicas": spec_replicas, "readyReplicas": ready,
                       "updatedReplicas": updated, "currentRevision": current_rev, "updateRevision": update_rev})


def pod(*, name: str = "web-1", phase: str = "Running", ready: bool = False, waiting: str | None = None,
        container: str = "app", labels: dict | None = None, owner: str | None = None, **meta) -> dict:
    state = {"waiting": {"reason": waiting, "message": "back-off 5m0s restarting failed container"}} if waiting \
        else {"running": {}}
    p = obj("v1", "Pod", name=name, generation=None, labels=labels,
            status={"phase": phase, "conditions": [cond("Ready", "True" if ready else "False")],
                    "containerStatuses": [{"name": container, "ready": ready, "state": state}]}, **meta)
    if owner:
        p["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                                             "uid": f"{owner}-uid", "controller": True}]
    return p


# --- compute: the rules that matter, one test each ------------------------------------------------


def test_deployment_progress_deadline_exceeded_is_failed():
    d = deployment(ready=1, available=1, conditions=[
        cond("Available", "False", "MinimumReplicasUnavailable"),
        cond("Progressing", "False", "ProgressDeadlineExceeded", 'ReplicaSet "web-new" has timed out progressing.')])
    status, message = compute(d)
    assert status is Status.FAILED
    assert message.startswith("ProgressDeadlineExceeded: ")
    assert "web-new" in message


def test_deployment_rolling_update_in_progress_until_updated_replicas_available():
    # Mid-rollout: one new pod, old ones still around.
    assert compute(deployment(replicas=4, updated=1, ready=3, available=3))[0] is Status.IN_PROGRESS
    # All updated, but an old one still terminating.
    status, message = compute(deployment(replicas=4, updated=3, ready=3, available=3))
    assert (status, message) == (Status.IN_PROGRESS, "Deployment has 1 old replica pending termination")
    # All updated and ready, one not yet available (minReadySeconds).
    status, message = compute(deployment(updated=3, ready=3, available=2))
    assert (status, message) == (Status.IN_PROGRESS, "Deployment does not have minimum availability: 2/3 available")
    # Not enough ready.
    assert compute(deployment(ready=1, available=1)) == (
        Status.IN_PROGRESS, "Deployment does not have minimum availability: 1/3 ready")


def test_deployment_available_is_current():
    assert compute(deployment())[0] is Status.CURRENT
    # Counts match but the controller has not said Available: not done yet.
    status, message = compute(deployment(conditions=[cond("Available", "False", "MinimumReplicasUnavailable")]))
    assert status is Status.IN_PROGRESS and "MinimumReplicasUnavailable" in message


def test_deployment_replicas_default_to_one():
    d = deployment(replicas=1, updated=1, ready=1, available=1)
    del d["spec"]["replicas"]
    assert compute(d)[0] is Status.CURRENT


def test_generation_not_observed_is_in_progress():
    # A stale ProgressDeadlineExceeded from the previous commit must not fail the new one.
    d = deployment(generation=3, observed=2, conditions=[cond("Progressing", "False", "ProgressDeadlineExceeded")])
    status, message = compute(d)
    assert status is Status.IN_PROGRESS
    assert "generation 3" in message
    # Absent observedGeneration: the kind's own rule decides.
    cm = obj("v1", "ConfigMap", generation=5)
    assert compute(cm)[0] is Status.CURRENT


def test_terminating_object():
    d = deployment()
    d["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert compute(d)[0] is Status.TERMINATING
    ns = obj("v1", "Namespace", generation=None, status={"phase": "Terminating"})
    assert compute(ns)[0] is Status.TERMINATING


def test_statefulset_partition_rule():
    partitioned = {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}
    # Only ordinals >= 2 of 3 are updated; the old revision stays current on purpose.
    sts = statefulset(updated=1, current_rev="db-1", update_rev="db-2", strategy=partitioned)
    assert compute(sts)[0] is Status.CURRENT
    sts = statefulset(updated=0, current_rev="db-1", update_rev="db-2", strategy=partitioned)
    status, message = compute(sts)
    assert status is Status.IN_PROGRESS and "0/1 replicas updated (partition 2)" in message


def test_statefulset_waits_for_revision_without_partition():
    sts = statefulset(current_rev="db-1", update_rev="db-2",
                      strategy={"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
    assert compute(sts)[0] is Status.IN_PROGRESS
    assert compute(statefulset(ready=2))[0] is Status.IN_PROGRESS
    assert compute(statefulset())[0] is Status.CURRENT


def test_statefulset_on_delete_waits_only_for_readiness():
    on_delete = {"type": "OnDelete"}
    assert compute(statefulset(updated=0, current_rev="db-1", strategy=on_delete))[0] is Status.CURRENT
    assert compute(statefulset(ready=2, strategy=on_delete))[0] is Status.IN_PROGRESS


def test_job_failed_reports_reason():
    job = obj("batch/v1", "Job", status={"failed": 4, "conditions": [
        cond("Failed", reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")]})
    status, message = compute(job)
    assert status is Status.FAILED
    assert message == "Job failed: BackoffLimitExceeded: Job has reached the specified backoff limit"
    assert compute(obj("batch/v1", "Job", status={"active": 1}))[0] is Status.IN_PROGRESS
    assert compute(obj("batch/v1", "Job", status={"conditions": [cond("Complete")]}))[0] is Status.CURRENT


def test_crd_established():
    crd = obj("apiextensions.k8s.io/v1", "CustomResourceDefinition", generation=1,
              status={"conditions": [cond("NamesAccepted"), cond("Established")]})
    assert compute(crd)[0] is Status.CURRENT
    installing = obj("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                     status={"conditions": [cond("Established", "False", "Installing")]})
    assert compute(installing)[0] is Status.IN_PROGRESS
    assert compute(obj("apiextensions.k8s.io/v1", "CustomResourceDefinition"))[0] is Status.IN_PROGRESS


def test_crd_names_not_accepted():
    crd = obj("apiextensions.k8s.io/v1", "CustomResourceDefinition", status={"conditions": [
        cond("NamesAccepted", "False", "MultipleNamesNotAllowed", '"widgets" is already in use'),
        cond("Established", "False", "NotAccepted")]})
    status, message = compute(crd)
    assert status is Status.FAILED and "MultipleNamesNotAllowed" in message


@pytest.mark.parametrize("reason", ["CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                                    "CreateContainerConfigError"])
def test_pod_crashloopbackoff_is_failed_naming_container(reason):
    status, message = compute(pod(name="web-1", waiting=reason, container="app"))
    assert status is Status.FAILED
    assert message.startswith(f"Pod web-1 is in {reason} (container app)")


def test_pod_phases():
    assert compute(pod(ready=True))[0] is Status.CURRENT
    assert compute(pod(phase="Succeeded"))[0] is Status.CURRENT
    assert compute(pod(phase="Failed"))[0] is Status.FAILED
    assert compute(pod(phase="Pending"))[0] is Status.IN_PROGRESS
    # A transient waiting reason is not a failure.
    assert compute(pod(waiting="ContainerCreating"))[0] is Status.IN_PROGRESS


def test_pvc_bound():
    assert compute(obj("v1", "PersistentVolumeClaim", status={"phase": "Bound"}))[0] is Status.CURRENT
    assert compute(obj("v1", "PersistentVolumeClaim", status={"phase": "Pending"}))[0] is Status.IN_PROGRESS
    assert compute(obj("v1", "PersistentVolumeClaim"))[0] is Status.IN_PROGRESS


def test_object_without_status_is_current():
    assert compute(obj("v1", "ConfigMap", generation=None))[0] is Status.CURRENT
    assert compute(obj("example.com/v1", "Widget", status={}))[0] is Status.CURRENT


def test_ready_condition_followed_for_other_kinds():
    widget = obj("example.com/v1", "Widget", status={"conditions": [cond("Ready", "False", "Waiting", "db down")]})
    assert compute(widget) == (Status.IN_PROGRESS, "Widget is not Ready: Waiting: db down")
    widget["status"]["conditions"] = [cond("Ready")]
    assert compute(widget)[0] is Status.CURRENT
    # A Ready=True written for an older generation is not trusted.
    widget = obj("example.com/v1", "Widget", generation=2,
                 status={"conditions": [cond("Ready", observedGeneration=1)]})
    assert compute(widget)[0] is Status.IN_PROGRESS


def test_stalled_condition_is_failed_and_reconciling_in_progress():
    stalled = obj("example.com/v1", "Widget", status={"conditions": [cond("Stalled", reason="BadSpec", message="no")]})
    assert compute(stalled) == (Status.FAILED, "Stalled: BadSpec: no")
    reconciling = obj("example.com/v1", "Widget", status={"conditions": [cond("Reconciling"), cond("Ready")]})
    assert compute(reconciling)[0] is Status.IN_PROGRESS


# The remaining kinds, table-driven.
@pytest.mark.parametrize("case, expected", [
    (obj("apps/v1", "DaemonSet", status={"observedGeneration": 1, "desiredNumberScheduled": 2,
                                          "currentNumberScheduled": 2, "updatedNumberScheduled": 2,
                                          "numberReady": 2, "numberAvailable": 2}), Status.CURRENT),
    (obj("apps/v1", "DaemonSet", status={"observedGeneration": 1, "desiredNumberScheduled": 2,
                                          "currentNumberScheduled": 2, "updatedNumberScheduled": 1,
                                          "numberReady": 2, "numberAvailable": 2}), Status.IN_PROGRESS),
    (obj("apps/v1", "DaemonSet", status={"desiredNumberScheduled": 0}), Status.IN_PROGRESS),
    (obj("apps/v1", "ReplicaSet", spec={"replicas": 2},
         status={"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}), Status.CURRENT),
    (obj("apps/v1", "ReplicaSet", spec={"replicas": 2},
         status={"replicas": 2, "readyReplicas": 1, "availableReplicas": 1}), Status.IN_PROGRESS),
    (obj("batch/v1", "CronJob"), Status.CURRENT),
    (obj("batch/v1", "Job", status={"conditions": [cond("Suspended")]}), Status.CURRENT),
    (obj("v1", "Service", spec={"type": "ClusterIP"}), Status.CURRENT),
    (obj("v1", "Service", spec={"type": "LoadBalancer"}, status={"loadBalancer": {}}), Status.IN_PROGRESS),
    (obj("v1", "Service", spec={"type": "LoadBalancer"},
         status={"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}), Status.CURRENT),
    (obj("policy/v1", "PodDisruptionBudget", generation=2, status={"observedGeneration": 1}), Status.IN_PROGRESS),
    (obj("policy/v1", "PodDisruptionBudget", generation=2, status={"observedGeneration": 2}), Status.CURRENT),
    (obj("v1", "Namespace", generation=None, status={"phase": "Active"}), Status.CURRENT),
], ids=lambda v: v if isinstance(v, Status) else f"{v['kind']}")
def test_kind_rules(case, expected):
    assert compute(case)[0] is expected


# --- wait ----------------------------------------------------------------------------------------


class FakeCluster:
    """`get` over a dict the test mutates; counts calls per ref."""

    def __init__(self, *objs: dict) -> None:
        self.objects = {ref_of(o): o for o in objs}
        self.calls: dict[ObjectRef, int] = {}

    def get(self, ref: ObjectRef) -> dict | None:
        self.calls[ref] = self.calls.get(ref, 0) + 1
        return self.objects.get(ref)

    def put(self, o: dict) -> None:
        self.objects[ref_of(o)] = o


def later(seconds: float, fn) -> threading.Timer:
    timer = threading.Timer(seconds, fn)
    timer.start()
    return timer


def test_wait_returns_when_all_current():
    cm = obj("v1", "ConfigMap", name="cfg", generation=None)
    rolling = deployment(ready=1, available=1)
    cluster = FakeCluster(cm, rolling)
    later(0.05, lambda: cluster.put(deployment()))
    started = time.monotonic()
    results = wait([ref_of(cm), ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01)
    assert time.monotonic() - started < 1
    assert [r.status for r in results] == [Status.CURRENT, Status.CURRENT]
    assert [r.ref for r in results] == [ref_of(cm), ref_of(rolling)]
    # Settled objects are not polled again.
    assert cluster.calls[ref_of(cm)] == 1
    assert summarize(results) == (True, "all 2 objects are Current")


def test_wait_times_out_with_last_status():
    rolling = deployment(ready=1, available=1)
    missing = ObjectRef("", "ConfigMap", "app", "gone")
    cluster = FakeCluster(rolling)
    results = wait([ref_of(rolling), missing], get=cluster.get, timeout=0.05, interval=0.01)
    by_ref = {r.ref: r for r in results}
    assert by_ref[ref_of(rolling)].status is Status.IN_PROGRESS
    assert by_ref[ref_of(rolling)].message == (
        "timed out after 0.05s: Deployment does not have minimum availability: 1/3 ready")
    assert by_ref[missing].status is Status.NOT_FOUND
    assert by_ref[missing].message.startswith("timed out after 0.05s: ")
    healthy, reason = summarize(results)
    assert not healthy
    assert reason.startswith("2 of 2 objects not healthy: ")
    assert "Deployment.apps/app/web InProgress (timed out after 0.05s" in reason


def test_wait_polls_at_least_once_with_zero_timeout():
    cm = obj("v1", "ConfigMap", name="cfg", generation=None)
    assert wait([ref_of(cm)], get=FakeCluster(cm).get, timeout=0)[0].status is Status.CURRENT


def test_wait_is_cancelled_by_event():
    rolling = deployment(ready=1, available=1)
    cancel = threading.Event()
    later(0.05, cancel.set)
    started = time.monotonic()
    results = wait([ref_of(rolling)], get=FakeCluster(rolling).get, timeout=30, interval=10, cancel=cancel)
    assert time.monotonic() - started < 1  # the event interrupts the sleep, not just the next round
    assert results[0].status is Status.IN_PROGRESS
    assert results[0].message.startswith("cancelled: ")


def test_wait_cancelled_before_it_began_still_judges_what_the_apply_returned():
    # The daemon lost and regained its lease mid-apply: the cancel is already set.
    cm, rolling = obj("v1", "ConfigMap", name="cfg", generation=None), deployment(ready=1, available=1)
    cancel = threading.Event()
    cancel.set()
    results = wait([ref_of(cm), ref_of(rolling)], get=FakeCluster(rolling).get, timeout=30, cancel=cancel,
                   initial={ref_of(cm): cm})
    assert [r.status for r in results] == [Status.CURRENT, Status.IN_PROGRESS]
    assert results[1].message.startswith("cancelled: Deployment does not have minimum availability")


def test_wait_keeps_polling_others_after_one_fails():
    failed_job = obj("batch/v1", "Job", name="migrate",
                     status={"conditions": [cond("Failed", reason="DeadlineExceeded")]})
    rolling = deployment(ready=1, available=1)
    cluster = FakeCluster(failed_job, rolling)
    later(0.05, lambda: cluster.put(deployment()))
    results = wait([ref_of(failed_job), ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01)
    assert [r.status for r in results] == [Status.FAILED, Status.CURRENT]
    healthy, reason = summarize(results)
    assert not healthy
    assert reason == "1 of 2 objects not healthy: Job.batch/app/migrate Failed (Job failed: DeadlineExceeded)"


def test_wait_survives_a_failing_get():
    cm = obj("v1", "ConfigMap", name="cfg", generation=None)
    attempts = []

    def flaky(ref: ObjectRef) -> dict | None:
        attempts.append(ref)
        if len(attempts) == 1:
            raise ConnectionError("apiserver unavailable")
        return cm

    results = wait([ref_of(cm)], get=flaky, timeout=5, interval=0.01)
    assert results[0].status is Status.CURRENT and len(attempts) == 2


def rolling_out(revision: str, **counts) -> dict:
    """Deployment web mid-rollout of `revision`, as its controller annotates it."""
    d = deployment(**counts)
    d["metadata"].update(uid="web-uid", annotations={REVISION_ANNOTATION: revision})
    return d


def replicaset(name: str, revision: str, *, deployment_uid: str = "web-uid") -> dict:
    """A ReplicaSet of Deployment web (or of another, by uid) for the template numbered `revision`."""
    return obj("apps/v1", "ReplicaSet", name=name, uid=f"{name}-uid", annotations={REVISION_ANNOTATION: revision},
               ownerReferences=[{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                                 "uid": deployment_uid, "controller": True}])


def test_wait_reports_workload_failed_from_crashlooping_pod_of_the_new_replicaset():
    rolling = rolling_out("2", replicas=4, updated=1, ready=3, available=3)
    pods = [pod(name="web-new-abcde", waiting="CrashLoopBackOff", owner="web-new"),
            pod(name="web-old-1", ready=True, owner="web-old")]
    seen = []
    cluster = FakeCluster(rolling, replicaset("web-new", "2"), replicaset("web-old", "1"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01,
                   related_pods=lambda workload: seen.append(workload) or pods)
    assert results[0].status is Status.FAILED
    assert results[0].message.startswith(
        "Deployment rollout is failing: Pod web-new-abcde is in CrashLoopBackOff (container app)")
    assert seen == [rolling]  # the workload itself is handed to the caller, for its selector


def test_wait_ignores_crashlooping_pods_of_an_older_revision():
    # The commit being waited for fixes the crash loop: old pods still crash while
    # the new ones come up, and must not make the fix look failed.
    rolling = rolling_out("3", replicas=4, updated=1, ready=2, available=2)
    old_crashing = pod(name="web-bad-1", waiting="CrashLoopBackOff", owner="web-bad")
    new_ok = pod(name="web-fix-abcde", owner="web-fix")
    evicted = pod(name="web-fix-zzz", phase="Failed", waiting="CrashLoopBackOff", owner="web-fix")
    cluster = FakeCluster(rolling, replicaset("web-bad", "2"), replicaset("web-fix", "3"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=0.05, interval=0.01,
                   related_pods=lambda _: [old_crashing, new_ok, evicted])
    assert results[0].status is Status.IN_PROGRESS


def test_new_replicaset_is_found_by_its_revision_annotation_not_by_condition_text():
    # The Progressing condition still names the ReplicaSet of the previous rollout
    # (its message is prose, written when the controller last got that far).
    stale_message = [cond("Progressing", "True", "NewReplicaSetAvailable",
                          'ReplicaSet "web-bad" has successfully progressed.')]
    rolling = rolling_out("3", replicas=4, updated=1, ready=2, available=2, conditions=stale_message)
    bad = pod(name="web-bad-1", waiting="CrashLoopBackOff", owner="web-bad")
    fix = pod(name="web-fix-1", owner="web-fix")
    cluster = FakeCluster(rolling, replicaset("web-bad", "2"), replicaset("web-fix", "3"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=0.05, interval=0.01, related_pods=lambda _: [bad, fix])
    assert results[0].status is Status.IN_PROGRESS
    # Same pods, the other way round: the annotation says web-bad is the rollout.
    cluster.put(replicaset("web-bad", "3"))
    cluster.put(replicaset("web-fix", "2"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01, related_pods=lambda _: [bad, fix])
    assert results[0].status is Status.FAILED and "Pod web-bad-1 is in CrashLoopBackOff" in results[0].message


def test_a_replicaset_brought_back_by_a_rollback_is_the_new_revision():
    # Going back to an earlier template reuses its ReplicaSet, renumbered: its pods are the rollout.
    rolling = rolling_out("3", replicas=4, updated=1, ready=2, available=2)
    back = pod(name="web-v1-1", waiting="ImagePullBackOff", owner="web-v1")
    cluster = FakeCluster(rolling, replicaset("web-v1", "3"), replicaset("web-v2", "2"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01, related_pods=lambda _: [back])
    assert results[0].status is Status.FAILED and "web-v1-1 is in ImagePullBackOff" in results[0].message


def test_a_replicaset_of_another_deployment_is_never_the_new_revision():
    rolling = rolling_out("2", replicas=2, updated=1, ready=1, available=1)
    stray = pod(name="other-1", waiting="CrashLoopBackOff", owner="other")
    cluster = FakeCluster(rolling, replicaset("other", "2", deployment_uid="another-uid"))
    results = wait([ref_of(rolling)], get=cluster.get, timeout=0.05, interval=0.01, related_pods=lambda _: [stray])
    assert results[0].status is Status.IN_PROGRESS


def test_no_replicaset_is_read_while_no_pod_is_stuck():
    rolling = rolling_out("2", replicas=4, updated=1, ready=3, available=3)
    cluster = FakeCluster(rolling, replicaset("web-new", "2"), replicaset("web-old", "1"))
    pods = [pod(name="web-new-1", owner="web-new"), pod(name="web-old-1", ready=True, owner="web-old")]
    results = wait([ref_of(rolling)], get=cluster.get, timeout=0.1, interval=0.01, related_pods=lambda _: pods)
    assert results[0].status is Status.IN_PROGRESS
    assert not [ref for ref in cluster.calls if ref.kind == "ReplicaSet"]


def test_a_stuck_pods_replicaset_is_read_once_per_revision():
    # An old revision's crashing pod, over many rounds: its ReplicaSet is read once.
    rolling = rolling_out("3", replicas=4, updated=1, ready=3, available=3)
    cluster = FakeCluster(rolling, replicaset("web-bad", "2"))
    pods = [pod(name="web-bad-1", waiting="CrashLoopBackOff", owner="web-bad")]
    results = wait([ref_of(rolling)], get=cluster.get, timeout=0.2, interval=0.01, related_pods=lambda _: pods)
    assert results[0].status is Status.IN_PROGRESS
    assert cluster.calls[ref_of(rolling)] > 3, "polled for several rounds"
    assert {ref.name: n for ref, n in cluster.calls.items() if ref.kind == "ReplicaSet"} == {"web-bad": 1}


def test_a_replicaset_that_cannot_be_read_skips_the_pod_check_for_that_round():
    rolling = rolling_out("2", replicas=2, updated=1, ready=1, available=1)
    cluster = FakeCluster(rolling, replicaset("web-new", "2"))
    refused = []

    def get(ref: ObjectRef) -> dict | None:
        if ref.kind == "ReplicaSet" and not refused:
            refused.append(ref)
            raise PermissionError("replicasets.apps is forbidden")
        return cluster.get(ref)

    crashing = pod(name="web-new-1", waiting="CrashLoopBackOff", owner="web-new")
    results = wait([ref_of(rolling)], get=get, timeout=5, interval=0.01, related_pods=lambda _: [crashing])
    assert refused and results[0].status is Status.FAILED, "the next round read it and blamed the pod"


def test_wait_blames_statefulset_pods_of_the_update_revision_only():
    sts = statefulset(ready=2, updated=1, current_rev="db-1", update_rev="db-2")
    old = pod(name="db-0", waiting="CrashLoopBackOff", labels={"controller-revision-hash": "db-1"})
    new = pod(name="db-2", waiting="ImagePullBackOff", labels={"controller-revision-hash": "db-2"})
    results = wait([ref_of(sts)], get=FakeCluster(sts).get, timeout=0.05, interval=0.01,
                   related_pods=lambda _: [old])
    assert results[0].status is Status.IN_PROGRESS
    results = wait([ref_of(sts)], get=FakeCluster(sts).get, timeout=5, interval=0.01,
                   related_pods=lambda _: [old, new])
    assert results[0].status is Status.FAILED and "Pod db-2 is in ImagePullBackOff" in results[0].message


def test_wait_calls_related_pods_once_per_round_and_only_while_in_progress():
    rolling = rolling_out("2", replicas=3, updated=1, ready=1, available=1)
    cluster = FakeCluster(rolling)
    rounds = []
    later(0.05, lambda: cluster.put(deployment()))
    wait([ref_of(rolling)], get=cluster.get, timeout=5, interval=0.01,
         related_pods=lambda _: rounds.append(1) or [])
    # One call per poll that saw the workload InProgress; none for the final Current poll.
    assert len(rounds) == cluster.calls[ref_of(rolling)] - 1


def test_wait_calls_on_change_only_on_change():
    rolling = deployment(ready=1, available=1)
    cluster = FakeCluster(rolling)
    changes: list[ObjectHealth] = []
    later(0.04, lambda: cluster.put(deployment(ready=2, available=2)))
    later(0.08, lambda: cluster.put(deployment()))
    wait([ref_of(rolling)], get=cluster.get, timeout=5, interval=0.005, on_change=changes.append)
    assert cluster.calls[ref_of(rolling)] > 3  # polled repeatedly in each state...
    assert [(c.status, c.message) for c in changes] == [  # ...but told only of each change
        (Status.IN_PROGRESS, "Deployment does not have minimum availability: 1/3 ready"),
        (Status.IN_PROGRESS, "Deployment does not have minimum availability: 2/3 ready"),
        (Status.CURRENT, "Deployment is available: 3 replicas"),
    ]


def test_summarize_lists_failed_first():
    a = ObjectHealth(ObjectRef("", "ConfigMap", "app", "a"), Status.NOT_FOUND, "timed out after 1s: not found")
    b = ObjectHealth(ObjectRef("batch", "Job", "app", "b"), Status.FAILED, "Job failed:\n  boom")
    c = ObjectHealth(ObjectRef("", "ConfigMap", "app", "c"), Status.CURRENT, "ok")
    healthy, reason = summarize([a, b, c])
    assert not healthy
    assert reason == ("2 of 3 objects not healthy: Job.batch/app/b Failed (Job failed: boom); "
                      "ConfigMap/app/a NotFound (timed out after 1s: not found)")
    assert summarize([]) == (True, "no objects to wait for")


def test_wait_takes_the_first_reading_from_the_apply_responses():
    cm = obj("v1", "ConfigMap", name="cfg", generation=None)
    cluster = FakeCluster(cm)
    results = wait([ref_of(cm)], get=cluster.get, timeout=1, interval=0.01, initial={ref_of(cm): cm})
    assert [r.status for r in results] == [Status.CURRENT]
    assert cluster.calls.get(ref_of(cm), 0) == 0, "a ConfigMap is Current on sight: no read at all"


def test_wait_reads_a_round_with_get_many_and_falls_back_to_get():
    rolling = deployment(ready=1, available=1)
    cm = obj("v1", "ConfigMap", name="cfg", generation=None)
    cluster = FakeCluster(rolling, cm)
    batches = []

    def get_many(refs):
        batches.append(list(refs))
        return {ref: cluster.objects.get(ref) for ref in refs if ref.kind == "Deployment"}

    later(0.05, lambda: cluster.put(deployment()))
    results = wait([ref_of(rolling), ref_of(cm)], get=cluster.get, get_many=get_many, timeout=5, interval=0.01)
    assert [r.status for r in results] == [Status.CURRENT, Status.CURRENT]
    assert cluster.calls.get(ref_of(rolling), 0) == 0, "the Deployment was read only through get_many"
    assert cluster.calls[ref_of(cm)] == 1, "what get_many leaves out is read with get"
    assert len(batches) >= 2


# --- wait fed by a watch (the daemon's informers) -------------------------------------------------


class FakeWatch:
    """A LiveSource over a dict: `put` stores an object and wakes the wait, as a watch event does.
    Objects in `blind` are not covered (the wait must read them with `get`). resourceVersions
    compare as integers, as kube-apiserver's do."""

    def __init__(self, *objs: dict, blind: tuple[ObjectRef, ...] = ()) -> None:
        self.objects = {ref_of(o): o for o in objs}
        self.blind = set(blind)
        self.wake = None
        self.sessions = 0
        self.closed = False

    def session(self, refs, *, wake):
        self.sessions += 1
        self.wake = wake
        return self

    def read(self, ref: ObjectRef, *, after: dict | None) -> Reading:
        if ref in self.blind:
            return Reading(covered=False, fresh=False, obj=None)
        o = self.objects.get(ref)
        fresh = after is None or (o is not None and int(o["metadata"]["resourceVersion"])
                                  >= int(after["metadata"]["resourceVersion"]))
        return Reading(covered=True, fresh=fresh, obj=o)

    def pods(self, workload: dict) -> list[dict]:
        return []

    def close(self) -> None:
        self.closed = True

    def put(self, o: dict) -> None:
        self.objects[ref_of(o)] = o
        self.wake(ref_of(o))


def at(o: dict, rv: int) -> dict:
    o["metadata"]["resourceVersion"] = str(rv)
    return o


def never(ref: ObjectRef):
    raise AssertionError(f"the wait polled {ref} although a watch covers it")


def test_a_watched_wait_sleeps_until_an_event_and_never_polls():
    rolling = at(deployment(ready=1, available=1), 10)
    watch = FakeWatch(rolling)
    later(0.3, lambda: watch.put(at(deployment(), 11)))
    started = time.monotonic()
    results = wait([ref_of(rolling)], get=never, timeout=5, interval=0.01, live=watch)
    assert results[0].status is Status.CURRENT
    assert time.monotonic() - started < 2, "the event woke the wait"
    assert watch.closed, "the session ends with the wait"


def test_a_watched_wait_takes_no_reading_older_than_the_apply_response():
    # The watch still holds the Deployment from before the apply: Current, but of the old generation.
    old = at(deployment(), 10)
    applied = at(deployment(generation=2, observed=1), 12)
    watch = FakeWatch(old)
    results = wait([ref_of(applied)], get=never, timeout=0.2, live=watch, initial={ref_of(applied): applied})
    assert results[0].status is Status.IN_PROGRESS, "the stale cached copy must not pass for the rollout"
    later(0.05, lambda: watch.put(at(deployment(generation=2, observed=2), 13)))
    results = wait([ref_of(applied)], get=never, timeout=5, live=watch, initial={ref_of(applied): applied})
    assert results[0].status is Status.CURRENT


def test_a_watched_wait_sees_an_event_that_came_before_it_began():
    applied = at(deployment(ready=1, available=1), 10)
    watch = FakeWatch(at(deployment(), 11))   # the rollout finished before the wait listened
    results = wait([ref_of(applied)], get=never, timeout=5, live=watch, initial={ref_of(applied): applied})
    assert results[0].status is Status.CURRENT


def test_a_watched_wait_polls_only_what_no_watch_covers():
    watched = at(deployment(name="watched", ready=1, available=1), 10)
    blind = obj("example.com/v1", "Widget", name="w", status={"conditions": [cond("Ready", "False")]})
    cluster = FakeCluster(blind)
    watch = FakeWatch(watched, blind=(ref_of(blind),))
    later(0.1, lambda: watch.put(at(deployment(name="watched"), 11)))
    later(0.1, lambda: cluster.put(obj("example.com/v1", "Widget", name="w",
                                       status={"conditions": [cond("Ready", "True")]})))
    results = wait([ref_of(watched), ref_of(blind)], get=cluster.get, timeout=5, interval=0.01, live=watch)
    assert [r.status for r in results] == [Status.CURRENT, Status.CURRENT]
    assert ref_of(watched) not in cluster.calls and cluster.calls[ref_of(blind)] >= 2


def test_a_watched_wait_is_cancelled_promptly():
    rolling = at(deployment(ready=1, available=1), 10)
    cancel = threading.Event()
    later(0.1, cancel.set)
    started = time.monotonic()
    results = wait([ref_of(rolling)], get=never, timeout=30, cancel=cancel, live=FakeWatch(rolling))
    assert time.monotonic() - started < 1
    assert results[0].message.startswith("cancelled: ")
