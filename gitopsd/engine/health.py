"""Health: has what we applied become ready?

A deploy is done when the new version is healthy, not when the objects are
written. This stage answers that with kstatus-style rules reimplemented on
plain dicts: `compute` judges one object as the apiserver returned it, `wait`
follows a set of objects until each has settled (Current or Failed), the
deadline passes, or the caller cancels. In the daemon the wait is fed by the
shared informers' watch (`LiveSource`): it reads from memory and sleeps until
an event, sending no request; the CLI, and objects no watch covers, poll.

Two things shape the rules beyond upstream kstatus:

- A *stale* verdict must never decide: every rule first checks that the
  controller has observed the current `metadata.generation`, so a
  ProgressDeadlineExceeded or Stalled left over from the previous (broken)
  commit cannot mark the fix as failed.
- A broken rollout should be reported quickly, not when the progress deadline
  fires ten minutes later: `wait` looks at the pods of an in-progress workload
  (only those of its new revision) and reports the workload Failed as soon as
  one of them is crash-looping or cannot pull its image. A Deployment's new
  revision is its ReplicaSet whose `deployment.kubernetes.io/revision`
  annotation equals the Deployment's, as the controller and `kubectl rollout`
  keep them: never the name quoted in a condition message, which is prose.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from gitopsd.objects import ObjectRef, ref_of


class Status(str, enum.Enum):
    """kstatus' vocabulary, plus NotFound for an object `get` did not return."""

    CURRENT = "Current"
    IN_PROGRESS = "InProgress"
    FAILED = "Failed"
    TERMINATING = "Terminating"
    NOT_FOUND = "NotFound"
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class ObjectHealth:
    """The verdict on one object, with the reason a human needs to act on it."""

    ref: ObjectRef
    status: Status
    message: str


# Statuses `wait` stops polling: the outcome for that object is decided.
_SETTLED = frozenset({Status.CURRENT, Status.FAILED})

# Container waiting reasons that do not fix themselves: the kubelet is backing
# off, or the pod spec points at something that does not exist. ErrImagePull is
# the first failed pull (ImagePullBackOff follows); we report it at once because
# a typo in an image tag is far more common than a registry blip.
_BROKEN_CONTAINER_REASONS = frozenset({
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
})

# Kinds whose pods `wait` inspects while they roll out.
_WORKLOAD_KINDS = frozenset({("apps", "Deployment"), ("apps", "StatefulSet"), ("apps", "ReplicaSet")})

# The Deployment controller numbers each template it rolls out and writes the
# number on the Deployment and on the ReplicaSet that runs that template (an
# older ReplicaSet brought back by a rollback gets the next number).
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


# --- reading plain dicts --------------------------------------------------------------------------


def _int(value: object, default: int) -> int:
    """An integer field, or `default` when absent or not an integer (bool is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _status(obj: dict) -> dict:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _spec(obj: dict) -> dict:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _conditions(obj: dict) -> list[dict]:
    """status.conditions, skipping malformed entries: CRDs can put anything there."""
    conditions = _status(obj).get("conditions")
    if not isinstance(conditions, list):
        return []
    return [c for c in conditions if isinstance(c, dict)]


def _condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in _conditions(obj) if c.get("type") == type_), None)


def _is_true(condition: dict | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _explain(condition: dict) -> str:
    """'Reason: message' from a condition, with whichever parts it has."""
    parts = [p for p in (condition.get("reason"), condition.get("message")) if p]
    return ": ".join(str(p) for p in parts) or f"{condition.get('type')}={condition.get('status')}"


def _condition_is_stale(obj: dict, condition: dict) -> bool:
    """True when a metav1.Condition says it was written for an older generation.

    Only conditions that carry `observedGeneration` can be judged; the rest are
    taken at face value (the object-level observedGeneration check covers them).
    """
    generation = (obj.get("metadata") or {}).get("generation")
    observed = condition.get("observedGeneration")
    return isinstance(generation, int) and isinstance(observed, int) and observed < generation


def _name(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name", "")


# --- rules every kind shares ----------------------------------------------------------------------


def _generic(obj: dict) -> tuple[Status, str] | None:
    """Rules that hold for any kind; None when they cannot decide.

    Order matters: a deleted object is Terminating whatever its status says; an
    unobserved generation makes every other field stale (`_lifecycle`); then
    the kstatus standard conditions. Stalled is checked before Reconciling
    because a controller that reports both has given up on *something*, and
    the user needs that reason more than a "still working".
    """
    lifecycle = _lifecycle(obj)
    if lifecycle is not None:
        return lifecycle
    stalled = _condition(obj, "Stalled")
    if _is_true(stalled) and not _condition_is_stale(obj, stalled):
        return Status.FAILED, f"Stalled: {_explain(stalled)}"
    reconciling = _condition(obj, "Reconciling")
    if _is_true(reconciling):
        return Status.IN_PROGRESS, f"Reconciling: {_explain(reconciling)}"
    return None


def _lifecycle(obj: dict) -> tuple[Status, str] | None:
    """Deleted (Terminating) or not yet observed by its controller (InProgress): what holds
    before any rule of a kind, custom ones (healthCheckExprs) included; None otherwise."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Status.TERMINATING, f"{obj.get('kind', 'object')} is being deleted"

    generation = meta.get("generation")
    observed = _status(obj).get("observedGeneration")
    # Absent observedGeneration means the kind does not report it (or its
    # controller has not written status yet): the kind's own rule decides.
    if isinstance(generation, int) and isinstance(observed, int) and observed != generation:
        return Status.IN_PROGRESS, (f"{obj.get('kind', 'object')} generation {generation} not yet observed "
                                    f"by its controller (observed {observed})")
    return None


# --- rules per kind -------------------------------------------------------------------------------

# The replica counts Deployment, StatefulSet and ReplicaSet report, each with how
# to say that it is short of spec.replicas.
_REPLICA_COUNTS = {
    "replicas": ("replicas", "is scaling up: {have}/{want} replicas"),
    "updated": ("updatedReplicas", "rollout in progress: {have}/{want} replicas updated"),
    "ready": ("readyReplicas", "does not have minimum availability: {have}/{want} ready"),
    "available": ("availableReplicas", "does not have minimum availability: {have}/{want} available"),
}


def _replica_shortfall(obj: dict, *, checks: Sequence[str]) -> tuple[Status, str] | None:
    """InProgress with the first of `checks` that falls short of spec.replicas.

    A check names a count in _REPLICA_COUNTS, or is "extra": more replicas than
    desired, i.e. old pods still terminating. spec.replicas defaults to 1, as
    the apiserver does. None when every check passes.
    """
    kind = obj.get("kind", "object")
    want = _int(_spec(obj).get("replicas"), 1)
    status = _status(obj)
    for check in checks:
        if check == "extra":
            extra = _int(status.get("replicas"), 0) - want
            if extra > 0:
                noun = "replica" if extra == 1 else "replicas"
                return Status.IN_PROGRESS, f"{kind} has {extra} old {noun} pending termination"
            continue
        field, phrase = _REPLICA_COUNTS[check]
        have = _int(status.get(field), 0)
        if want > have:
            return Status.IN_PROGRESS, f"{kind} " + phrase.format(have=have, want=want)
    return None


def _deployment(obj: dict) -> tuple[Status, str]:
    """A rollout is Current when every desired replica runs the new template and is
    available, no old replica is left, and the controller says Available.
    ProgressDeadlineExceeded is the controller's own verdict that it is stuck.

    Ready is checked before available so a slow rollout reads "1/3 ready";
    "available" then covers pods ready but still inside minReadySeconds.
    """
    progressing = _condition(obj, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Status.FAILED, f"ProgressDeadlineExceeded: {progressing.get('message') or 'rollout is stuck'}"
    shortfall = _replica_shortfall(obj, checks=("replicas", "updated", "extra", "ready", "available"))
    if shortfall is not None:
        return shortfall
    condition = _condition(obj, "Available")
    if not _is_true(condition):
        why = _explain(condition) if condition else "no Available condition yet"
        return Status.IN_PROGRESS, f"Deployment is not Available: {why}"
    return Status.CURRENT, f"Deployment is available: {_int(_status(obj).get('availableReplicas'), 0)} replicas"


def _statefulset(obj: dict) -> tuple[Status, str]:
    """Current when every replica is ready and runs the revision it should.

    StatefulSets set no useful conditions, so counts and revisions decide:
    - OnDelete: pods change only when the user deletes them, so readiness is all
      we can wait for.
    - RollingUpdate with partition P: only ordinals >= P are updated; the rest
      keep the old revision on purpose, so currentRevision never catches up and
      must not be waited for.
    """
    shortfall = _replica_shortfall(obj, checks=("replicas", "extra", "ready"))
    if shortfall is not None:
        return shortfall
    spec = _spec(obj)
    want = _int(spec.get("replicas"), 1)
    status = _status(obj)
    updated = _int(status.get("updatedReplicas"), 0)

    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type") == "OnDelete":
        return Status.CURRENT, f"StatefulSet is ready: {want} replicas (OnDelete: pods update when deleted)"

    partition = _int((strategy.get("rollingUpdate") or {}).get("partition"), 0)
    if partition > 0:
        expected = max(want - partition, 0)
        if updated < expected:
            return Status.IN_PROGRESS, (f"StatefulSet partitioned rollout in progress: "
                                        f"{updated}/{expected} replicas updated (partition {partition})")
        return Status.CURRENT, (f"StatefulSet partitioned rollout complete: {updated} replicas updated "
                                f"(partition {partition})")

    shortfall = _replica_shortfall(obj, checks=("updated",))
    if shortfall is not None:
        return shortfall
    current_rev, update_rev = status.get("currentRevision"), status.get("updateRevision")
    if current_rev != update_rev:
        return Status.IN_PROGRESS, f"StatefulSet rollout in progress: revision {current_rev} -> {update_rev}"
    return Status.CURRENT, f"StatefulSet is ready: {want} replicas"


def _daemonset(obj: dict) -> tuple[Status, str]:
    """Current when every node that should run a pod runs an updated, available one.

    Unlike the generic rule, a missing observedGeneration means "not yet seen":
    the DaemonSet controller always writes it, and before it does, the zeroed
    counts would otherwise read as "0 of 0 desired: done".
    """
    status = _status(obj)
    if "observedGeneration" not in status:
        return Status.IN_PROGRESS, "DaemonSet not yet observed by its controller"
    desired = status.get("desiredNumberScheduled")
    if not isinstance(desired, int):
        return Status.IN_PROGRESS, "DaemonSet has no desiredNumberScheduled yet"
    for field, what in (("currentNumberScheduled", "scheduled"), ("updatedNumberScheduled", "updated"),
                        ("numberReady", "ready"), ("numberAvailable", "available")):
        have = _int(status.get(field), 0)
        if desired > have:
            return Status.IN_PROGRESS, f"DaemonSet rollout in progress: {have}/{desired} {what}"
    return Status.CURRENT, f"DaemonSet is ready: {desired} pods scheduled, updated and available"


def _replicaset(obj: dict) -> tuple[Status, str]:
    """Counts decide; ReplicaFailure (quota, admission) keeps it InProgress with the
    reason, since the controller retries and a quota change can unblock it."""
    failure = _condition(obj, "ReplicaFailure")
    if _is_true(failure):
        return Status.IN_PROGRESS, f"ReplicaSet cannot create pods: {_explain(failure)}"
    shortfall = _replica_shortfall(obj, checks=("replicas", "ready", "available", "extra"))
    if shortfall is not None:
        return shortfall
    return Status.CURRENT, f"ReplicaSet is available: {_int(_status(obj).get('availableReplicas'), 0)} replicas"


def _job(obj: dict) -> tuple[Status, str]:
    """A Job applied from Git is usually a migration the next objects depend on, so
    we wait for it to finish (upstream kstatus calls a running Job Current).

    FailureTarget (Kubernetes >= 1.31) is the controller's decision to fail, set
    before it has finished terminating pods; we report it at once. A suspended
    Job is Current: it is parked on purpose and waiting would only time out.
    """
    for type_ in ("Failed", "FailureTarget"):
        failed = _condition(obj, type_)
        if _is_true(failed):
            return Status.FAILED, f"Job failed: {_explain(failed)}"
    if _is_true(_condition(obj, "Complete")):
        return Status.CURRENT, f"Job complete: {_int(_status(obj).get('succeeded'), 0)} succeeded"
    if _is_true(_condition(obj, "Suspended")):
        return Status.CURRENT, "Job is suspended"
    status = _status(obj)
    return Status.IN_PROGRESS, (f"Job running: {_int(status.get('active'), 0)} active, "
                                f"{_int(status.get('succeeded'), 0)} succeeded, {_int(status.get('failed'), 0)} failed")


def _crd(obj: dict) -> tuple[Status, str]:
    """Established means the new type is served; NamesAccepted=False (a plural or
    kind clash with another CRD) never resolves by waiting."""
    names = _condition(obj, "NamesAccepted")
    if names is not None and names.get("status") == "False":
        return Status.FAILED, f"CRD names not accepted: {_explain(names)}"
    established = _condition(obj, "Established")
    if _is_true(established):
        return Status.CURRENT, "CRD is established"
    if established is not None and established.get("status") == "False" and established.get("reason") != "Installing":
        return Status.FAILED, f"CRD not established: {_explain(established)}"
    return Status.IN_PROGRESS, "CRD is being installed"


def _broken_container(pod: dict) -> str | None:
    """The first container (init containers included) stuck in a state waiting will
    not fix, as 'Pod NAME is in REASON (container C): message'; None if none is."""
    status = _status(pod)
    for field in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(field) or []:
            waiting = ((container or {}).get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in _BROKEN_CONTAINER_REASONS:
                text = f"Pod {_name(pod)} is in {reason} (container {container.get('name', '?')})"
                return f"{text}: {waiting['message']}" if waiting.get("message") else text
    return None


def _pod(obj: dict) -> tuple[Status, str]:
    """Ready or Succeeded is Current, phase Failed is Failed, and so is a container
    the kubelet keeps backing off. Unlike upstream kstatus we call a Failed phase
    Failed: a pod applied directly from Git that died is not a success."""
    name = _name(obj)
    status = _status(obj)
    phase = status.get("phase")
    if phase == "Succeeded":
        return Status.CURRENT, f"Pod {name} has completed"
    if phase == "Failed":
        why = ": ".join(str(p) for p in (status.get("reason"), status.get("message")) if p)
        return Status.FAILED, f"Pod {name} failed" + (f": {why}" if why else "")
    if _is_true(_condition(obj, "Ready")):
        return Status.CURRENT, f"Pod {name} is ready"
    broken = _broken_container(obj)
    if broken:
        return Status.FAILED, broken
    scheduled = _condition(obj, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        return Status.IN_PROGRESS, f"Pod {name} is not scheduled: {_explain(scheduled)}"
    if not phase:
        return Status.IN_PROGRESS, f"Pod {name} has no phase yet"
    ready = _condition(obj, "Ready")
    why = f": {_explain(ready)}" if ready else ""
    return Status.IN_PROGRESS, f"Pod {name} is {phase} but not ready{why}"


def _pvc(obj: dict) -> tuple[Status, str]:
    """Bound is Current. A claim on a WaitForFirstConsumer class stays Pending
    until a pod uses it: wait for the pod alongside it, not for the claim alone."""
    phase = _status(obj).get("phase") or "Pending"
    if phase == "Bound":
        return Status.CURRENT, "PVC is Bound"
    if phase == "Lost":
        return Status.FAILED, "PVC lost its volume"
    return Status.IN_PROGRESS, f"PVC is {phase}"


def _service(obj: dict) -> tuple[Status, str]:
    if _spec(obj).get("type") == "LoadBalancer":
        ingress = (_status(obj).get("loadBalancer") or {}).get("ingress")
        if not ingress:
            return Status.IN_PROGRESS, "Service is waiting for a load balancer address"
        return Status.CURRENT, "Service has a load balancer address"
    return Status.CURRENT, "Service is ready"


def _always_current(obj: dict) -> tuple[Status, str]:
    """Kinds whose readiness the generic rules already decided (CronJob, PDB after
    its observedGeneration check)."""
    return Status.CURRENT, f"{obj.get('kind', 'object')} is current"


def _namespace(obj: dict) -> tuple[Status, str]:
    if _status(obj).get("phase") == "Terminating":
        return Status.TERMINATING, "Namespace is being deleted"
    return Status.CURRENT, "Namespace is active"


def _ready_condition(obj: dict) -> tuple[Status, str]:
    """Any other kind: follow a Ready condition if there is one; without one
    there is nothing to wait for (ConfigMaps, RBAC, most CRs without status)."""
    kind = obj.get("kind", "object")
    ready = _condition(obj, "Ready")
    if ready is None:
        return Status.CURRENT, f"{kind} has no readiness to wait for"
    if _condition_is_stale(obj, ready):
        return Status.IN_PROGRESS, f"{kind} Ready condition is from an older generation"
    if ready.get("status") == "True":
        return Status.CURRENT, f"{kind} is Ready"
    return Status.IN_PROGRESS, f"{kind} is not Ready: {_explain(ready)}"


_RULES: dict[tuple[str, str], Callable[[dict], tuple[Status, str]]] = {
    ("apps", "Deployment"): _deployment,
    ("apps", "StatefulSet"): _statefulset,
    ("apps", "DaemonSet"): _daemonset,
    ("apps", "ReplicaSet"): _replicaset,
    ("batch", "Job"): _job,
    ("batch", "CronJob"): _always_current,
    ("apiextensions.k8s.io", "CustomResourceDefinition"): _crd,
    ("", "Pod"): _pod,
    ("", "PersistentVolumeClaim"): _pvc,
    ("", "Service"): _service,
    ("policy", "PodDisruptionBudget"): _always_current,
    ("", "Namespace"): _namespace,
}


#: Custom rules by (group, kind): an app's healthCheckExprs, compiled (gitopsd.engine.health_exprs.rules_of).
Rules = Mapping[tuple[str, str], Callable[[dict], tuple[Status, str]]]


def compute(obj: dict, *, rules: Rules | None = None) -> tuple[Status, str]:
    """(status, human reason) of one object as the apiserver returned it.

    Pure: no clock, no I/O, so the same object always gets the same verdict.
    Shared rules (deletion, unobserved generation, Stalled/Reconciling) come
    first; then the kind's rule; kinds we know nothing about follow their Ready
    condition, and are Current without one. A custom rule for the kind in
    `rules` (the app's healthCheckExprs) replaces all but deletion and the
    unobserved generation: it is the kind's whole reading, as in Flux.
    """
    ref = ref_of(obj)
    custom = rules.get((ref.group, ref.kind)) if rules else None
    if custom is not None:
        return _lifecycle(obj) or custom(obj)
    generic = _generic(obj)
    if generic is not None:
        return generic
    return _RULES.get((ref.group, ref.kind), _ready_condition)(obj)


# --- waiting --------------------------------------------------------------------------------------


def _controller(obj: dict) -> dict:
    """The ownerReference marked controller (a pod's ReplicaSet, a ReplicaSet's Deployment); {} if none."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((o for o in owners if isinstance(o, dict) and o.get("controller")), {})


def _alive(pods: list[dict]) -> list[dict]:
    """Pods that can still hold up a rollout: not terminating, not finished
    (evicted pods linger as Failed and are never the rollout's problem)."""
    return [p for p in pods
            if not (p.get("metadata") or {}).get("deletionTimestamp")
            and _status(p).get("phase") not in ("Succeeded", "Failed")]


class _RolloutPods:
    """Which pod of the revision a workload is rolling out is stuck, for one wait.

    Why not any pod of the selector: when the commit being waited for *fixes* a
    crash loop, the old crashing pods are still there during the rollout, and
    blaming them would report the fix as failed. When the new revision cannot
    be told apart, no pod is blamed and the count rules take their course.

    - ReplicaSet: all its pods. StatefulSet: those labelled with its
      updateRevision (controller-revision-hash).
    - Deployment: those controlled by its new ReplicaSet, i.e. the ReplicaSet it
      controls whose revision annotation equals its own. Only a stuck pod's
      ReplicaSet is read, and each once per Deployment revision: one not new
      for revision N never becomes so (the next template gets N+1), and once
      the new one is known it is not read again. A rollout whose pods are all
      fine reads no ReplicaSet at all. A read that fails (an apiserver blip, no
      RBAC to get ReplicaSets) raises, and the caller skips the pod check for
      that round.
    """

    def __init__(self, *, pods: Callable[[dict], list[dict]], get: Callable[[ObjectRef], dict | None]) -> None:
        self._pods, self._get = pods, get
        self._new: dict[tuple[str, str], str] = {}          # (deployment uid, revision) -> its ReplicaSet's uid
        self._older: dict[tuple[str, str], set[str]] = {}   # (deployment uid, revision) -> ReplicaSet uids read, not it

    def broken(self, workload: dict) -> str | None:
        """Why the first stuck pod of `workload`'s new revision is stuck (_broken_container); None if none is."""
        for pod in _alive(self._pods(workload)):
            why = _broken_container(pod)
            if why and self._is_new(workload, pod):
                return why
        return None

    def _is_new(self, workload: dict, pod: dict) -> bool:
        kind = workload.get("kind")
        if kind == "ReplicaSet":
            return True
        if kind == "StatefulSet":
            revision = _status(workload).get("updateRevision")
            labels = (pod.get("metadata") or {}).get("labels") or {}
            return bool(revision) and labels.get("controller-revision-hash") == revision
        owner = _controller(pod)
        return kind == "Deployment" and owner.get("kind") == "ReplicaSet" and self._is_new_replicaset(workload, owner)

    def _is_new_replicaset(self, deployment: dict, owner: dict) -> bool:
        """Whether the ReplicaSet `owner` (a pod's ownerReference) runs `deployment`'s current revision."""
        meta = deployment.get("metadata") or {}
        revision = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
        if not revision or not meta.get("uid") or not owner.get("uid"):
            return False
        key = (meta["uid"], revision)
        if key in self._new:
            return self._new[key] == owner["uid"]
        older = self._older.setdefault(key, set())
        if owner["uid"] in older:
            return False
        rs = self._get(ObjectRef("apps", "ReplicaSet", meta.get("namespace") or "", owner.get("name") or ""))
        rs_meta = (rs or {}).get("metadata") or {}
        if rs_meta.get("uid") == owner["uid"] and _controller(rs).get("uid") == meta["uid"] \
                and (rs_meta.get("annotations") or {}).get(REVISION_ANNOTATION) == revision:
            self._new[key] = owner["uid"]
            return True
        older.add(owner["uid"])
        return False


def _observe(ref: ObjectRef, *, get: Callable[[ObjectRef], dict | None],
             rollout: _RolloutPods | None, rules: Rules | None = None) -> ObjectHealth:
    """One look at one object.

    A failing `get` (apiserver blip, RBAC) is reported as Unknown with the error
    and polled again, rather than aborting the whole wait: a rollout that takes
    minutes should survive a transient error. The pods of a rollout are an
    optimisation, so their errors only skip the pod check for this round.
    """
    try:
        obj = get(ref)
    except Exception as exc:  # noqa: BLE001 - reported, retried next round
        return ObjectHealth(ref, Status.UNKNOWN, f"could not read {ref}: {exc}")
    if obj is None:
        return ObjectHealth(ref, Status.NOT_FOUND, f"{ref} not found")
    status, message = compute(obj, rules=rules)
    if status is Status.IN_PROGRESS and rollout is not None and (ref.group, ref.kind) in _WORKLOAD_KINDS \
            and _pods_can_tell(obj):
        try:
            broken = rollout.broken(obj)
        except Exception:  # noqa: BLE001 - the count rules still decide
            broken = None
        if broken:
            return ObjectHealth(ref, Status.FAILED, f"{ref.kind} rollout is failing: {broken}")
    return ObjectHealth(ref, status, message)


def _pods_can_tell(obj: dict) -> bool:
    """Pods say something new only once the controller has seen this generation
    and wants replicas: before that, listing them is a wasted request."""
    meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    observed = st.get("observedGeneration")
    if observed is None or observed != meta.get("generation"):
        return False
    return spec.get("replicas", 1) != 0


def _annotate(latest: dict[ObjectRef, ObjectHealth], prefix: str) -> list[ObjectHealth]:
    """The final list: settled objects as they are, the rest with `prefix` on
    their last message so the reader sees why the wait ended."""
    return [h if h.status in _SETTLED else ObjectHealth(h.ref, h.status, f"{prefix}: {h.message}")
            for h in latest.values()]


class Reading(NamedTuple):
    """What watch-fed state says about one object (LiveSession.read)."""

    covered: bool          # False: nothing watches it (or its age cannot be told): read it from the apiserver
    fresh: bool            # not older than the reading the caller has (False: nothing newer has arrived yet)
    obj: dict | None       # the object; None = absent


@runtime_checkable
class LiveSession(Protocol):
    """One wait's window on watch-fed state (the daemon's informers)."""

    def read(self, ref: ObjectRef, *, after: dict | None) -> Reading: ...

    def pods(self, workload: dict) -> list[dict]: ...

    def close(self) -> None: ...


@runtime_checkable
class LiveSource(Protocol):
    """Watch-fed state a wait can read instead of polling: `wake(ref)` is called
    whenever `ref` (or a pod of the workload `ref`) may have changed."""

    def session(self, refs: Sequence[ObjectRef], *, wake: Callable[[ObjectRef], None]) -> LiveSession: ...


# How often a wait that sleeps until an event looks at `cancel` (a local flag, no request).
CANCEL_TICK = 0.1


class _Wakeups:
    """The refs the watch said changed since the last round, and something to sleep on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: set[ObjectRef] = set()
        self._event = threading.Event()

    def __call__(self, ref: ObjectRef) -> None:
        with self._lock:
            self._refs.add(ref)
            self._event.set()

    def take(self) -> set[ObjectRef]:
        """The refs woken since the last take; cleared before the round reads, so none is lost."""
        with self._lock:
            refs, self._refs = self._refs, set()
            self._event.clear()
        return refs

    def sleep(self, seconds: float, cancel: threading.Event) -> None:
        """Until a wake-up, `cancel`, or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while not cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._event.wait(min(left, CANCEL_TICK)):
                return


def wait(refs: Sequence[ObjectRef], *, get: Callable[[ObjectRef], dict | None], timeout: float,
         interval: float = 0.5, cancel: threading.Event | None = None,
         on_change: Callable[[ObjectHealth], None] | None = None,
         related_pods: Callable[[dict], list[dict]] | None = None,
         initial: Mapping[ObjectRef, dict] | None = None,
         parallel: Callable[[Callable, Sequence], Iterable] | None = None,
         get_many: Callable[[list[ObjectRef]], Mapping[ObjectRef, dict | None]] | None = None,
         live: LiveSource | None = None, rules: Rules | None = None) -> list[ObjectHealth]:
    """Watch `refs` until every one has settled, the timeout passes, or `cancel` is set.

    Returns one ObjectHealth per distinct ref, in the order given.

    - Settled means Current or Failed; settled objects are not looked at again.
      One Failed object does not end the wait for the others: the audit record
      should say what became of each. What keeps a stuck object from blocking
      the next fix is `cancel`, which the daemon sets when a new commit arrives.
    - NotFound (`get` returned None), Terminating and Unknown are not ready:
      they are looked at until the deadline.
    - On timeout the unsettled objects keep their last status, their message
      prefixed "timed out after Ns: "; on cancel, prefixed "cancelled: ".
    - `on_change` sees every observed change of (status, message), including the
      first observation; not the timeout/cancel annotations, which are in the
      return value.
    - `related_pods(workload)` returns the pods of an in-progress Deployment,
      StatefulSet or ReplicaSet (the caller lists them by its selector); it is
      called at most once per round per workload. A pod of the new revision
      that is crash-looping or cannot pull its image fails the workload at once.
      Whether a stuck pod is of a Deployment's new revision its ReplicaSet
      says: `get` reads it, once per revision (_RolloutPods).
    - Every object is looked at at least once, even with timeout 0.
    - `initial` holds objects as the apply just returned them: the first round
      reads them instead of asking again (a ConfigMap is Current on sight).
    - `live` (the daemon's informers): objects a synced watch covers are read
      from memory, and the wait sleeps until the watch reports a change of one
      of them (or of a rolling workload's pods, which `live` then provides
      instead of `related_pods`): no polling, beyond reading the ReplicaSet
      of a stuck pod once (above). A reading older than the
      one the wait has (the watch trails the apply) is not taken. Objects no
      watch covers are polled as below.
    - Polling: `get` per object, in parallel through `parallel` (the process's
      one fan-out, gitopsd.budget's `map`; in order when None); rounds start 0.1 s
      apart and back off to `interval`, so a quick rollout is seen quickly and
      a slow one is not polled needlessly often. `get_many(refs)` reads a
      whole round at once (the caller can LIST per kind and namespace instead
      of a GET per object); an object it leaves out is read with `get`.
    - `rules`: custom health rules per kind (the app's healthCheckExprs), as
      `compute` takes them.
    """
    cancel = cancel if cancel is not None else threading.Event()
    latest = {ref: ObjectHealth(ref, Status.UNKNOWN, "not checked yet") for ref in refs}
    deadline = time.monotonic() + timeout
    first = dict(initial or {})
    pause = min(0.1, interval)
    woken = _Wakeups()
    session = live.session(list(latest), wake=woken) if live is not None else None
    pods = (session.pods if session is not None else related_pods) if related_pods is not None else None
    # Owners (a Deployment's ReplicaSets) are read from the apiserver: no watch holds them.
    rollout = _RolloutPods(pods=pods, get=get) if pods is not None else None
    known: dict[ObjectRef, dict | None] = {}    # the newest reading of each object
    polled: set[ObjectRef] = set()             # live mode: read from the apiserver, no watch covers them

    def fetch(ref: ObjectRef) -> dict | None:
        known[ref] = obj = get(ref)
        return obj

    def look(ref: ObjectRef) -> ObjectHealth:
        read = ref in first   # already read this round (apply response or get_many); None = absent
        if read:
            known[ref] = first.pop(ref)
        if session is not None:
            # Also after a first reading: the watch may already hold something newer
            # (its event came before this wait began listening), or not cover it at all.
            reading = session.read(ref, after=known.get(ref))
            if reading.covered:
                polled.discard(ref)
                if reading.fresh:
                    known[ref] = reading.obj
                read = True
            else:
                polled.add(ref)
        return _observe(ref, get=(lambda _ref: known.get(ref)) if read else fetch, rollout=rollout, rules=rules)

    rounds = 0
    try:
        while True:
            # A cancel set before the wait began (the daemon lost and regained its
            # lease mid-apply) still gets the first look: what the apply returned
            # ready is Current, not "cancelled: not checked yet".
            if cancel.is_set() and rounds:
                return _annotate(latest, "cancelled")
            rounds += 1
            changed = woken.take()
            todo = [ref for ref, h in latest.items() if h.status not in _SETTLED
                    and (session is None or rounds == 1 or ref in changed or ref in polled)]
            if get_many is not None:
                batch = [ref for ref in todo if ref not in first and (session is None or ref in polled)]
                try:
                    first.update({ref: obj for ref, obj in get_many(batch).items() if ref in latest})
                except Exception:  # noqa: BLE001 - fall back to one read per object this round
                    pass
            seen = list(parallel(look, todo)) if parallel else [look(ref) for ref in todo]
            for now in seen:
                before = latest[now.ref]
                if (now.status, now.message) != (before.status, before.message):
                    latest[now.ref] = now
                    if on_change is not None:
                        on_change(now)
            if all(h.status in _SETTLED for h in latest.values()):
                return list(latest.values())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _annotate(latest, f"timed out after {timeout:g}s")
            if session is None:
                cancel.wait(min(pause, remaining))
            elif any(latest[ref].status not in _SETTLED for ref in polled):
                woken.sleep(min(pause, remaining), cancel)
            else:
                woken.sleep(remaining, cancel)   # until the watch reports a change
            pause = min(pause * 2, interval)
    finally:
        if session is not None:
            session.close()


def summarize(results: Sequence[ObjectHealth]) -> tuple[bool, str]:
    """(healthy, one line saying why): healthy only when every object is Current.

    The line lists what is not Current, Failed first, each as
    'REF STATUS (message)', so a CLI or audit record can show it as it is.
    """
    if not results:
        return True, "no objects to wait for"
    bad = [r for r in results if r.status is not Status.CURRENT]
    if not bad:
        return True, f"all {len(results)} objects are Current"
    bad.sort(key=lambda r: r.status is not Status.FAILED)  # stable: Failed first, else as given
    details = "; ".join(f"{r.ref} {r.status.value} ({' '.join(r.message.split())})" for r in bad)
    return False, f"{len(bad)} of {len(results)} objects not healthy: {details}"
