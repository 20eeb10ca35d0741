"""A hopeless rollout is reported early, by the real Deployment and Job controllers.

The test bed's KWOK Stages (hack/testbed/stages.py) play a kubelet for
image tags `:crashloop`, `:pullfail` and `:slow-ready`, so these rollouts run
through the real controllers: new ReplicaSets, surge pods, old pods kept
until the new ones are available, a Job's backoff limit.

Every broken case syncs with a 300 s health timeout and asserts an Unhealthy
result whose message is the early verdict (the pod, its container and the
kubelet's reason): a timeout would say "timed out after 300s" instead, so
the verdict can only have come early — no wall clock needed.
"""

from __future__ import annotations

import pytest
from helpers import deployment

from gitopsd.engine.health import REVISION_ANNOTATION, Status
from gitopsd.engine.sync import sync

pytestmark = pytest.mark.cluster

TIMEOUT = 300.0
GOOD, NEXT_GOOD = "nginx:1.27", "nginx:1.28"


def web(image: str) -> dict:
    """Deployment web, two replicas: a rollout keeps the old pods until new ones are available."""
    return deployment("web", replicas=2, image=image)


def commit(repo, *docs: dict, message: str) -> str:
    repo.write("app.yaml", list(docs))
    return repo.commit(message)


def verdict(result, kind: str = "Deployment"):
    """The health verdict on the one object of `kind` in a sync result."""
    (found,) = [h for h in result.health if h.ref.kind == kind]
    return found


def assert_failed_early(result, *, reasons: tuple[str, ...], kind: str = "Deployment") -> str:
    """Unhealthy by the early verdict, not by the 300 s timeout; returns its message."""
    assert result.outcome.value == "Unhealthy", result.reason
    assert "timed out" not in result.reason, result.reason
    found = verdict(result, kind)
    assert found.status is Status.FAILED, found
    assert any(r in found.message for r in reasons), found.message
    return found.message


def owner_revision(kube, namespace: str, pod_name: str) -> str:
    """The deployment.kubernetes.io/revision of the ReplicaSet that owns pod `pod_name`."""
    pod = kube.get(kube.resource("v1", "Pod"), pod_name, namespace)
    (owner,) = [o for o in pod["metadata"]["ownerReferences"] if o.get("controller")]
    rs = kube.get(kube.resource("apps/v1", "ReplicaSet"), owner["name"], namespace)
    return rs["metadata"]["annotations"][REVISION_ANNOTATION]


def named_pod(message: str) -> str:
    """`Pod NAME is in ...` -> NAME."""
    return message.split("Pod ", 1)[1].split(" ", 1)[0]


@pytest.mark.parametrize("tag, reasons", [
    ("crashloop", ("CrashLoopBackOff",)),
    ("pullfail", ("ErrImagePull", "ImagePullBackOff")),
])
def test_a_rollout_to_a_broken_image_is_unhealthy_before_the_timeout(app, repo, kube, namespace, tag, reasons):
    commit(repo, web(GOOD), message="web on a good image")
    assert app.sync(timeout=TIMEOUT).outcome.value == "Applied"

    commit(repo, web(f"nginx:{tag}"), message=f"web on nginx:{tag}")
    result = app.sync(timeout=TIMEOUT)

    message = assert_failed_early(result, reasons=reasons)
    assert message.startswith("Deployment rollout is failing: Pod web-"), message
    assert "(container web)" in message
    # The pod blamed is the new revision's; the two pods of revision 1 still
    # run and are ready, and did not make the rollout healthy.
    live = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert live["metadata"]["annotations"][REVISION_ANNOTATION] == "2"
    assert owner_revision(kube, namespace, named_pod(message)) == "2"
    assert live["status"].get("readyReplicas") == 2


def test_a_fresh_deployment_of_a_crashlooping_image_is_unhealthy_before_the_timeout(app, repo):
    commit(repo, web("nginx:crashloop"), message="web, crashing from the start")
    result = app.sync(timeout=TIMEOUT)
    assert_failed_early(result, reasons=("CrashLoopBackOff",))


@pytest.mark.parametrize("fix", [NEXT_GOOD, GOOD], ids=["a-new-image", "back-to-the-good-image"])
def test_a_fix_after_a_crashloop_is_healthy(app, repo, kube, namespace, fix):
    """Going back to the good image reuses its ReplicaSet under the next revision
    number (3): that ReplicaSet is the new revision, the crashing one (2) is old."""
    commit(repo, web(GOOD), message="good")
    assert app.sync(timeout=TIMEOUT).outcome.value == "Applied"
    commit(repo, web("nginx:crashloop"), message="crashes")
    assert_failed_early(app.sync(timeout=TIMEOUT), reasons=("CrashLoopBackOff",))

    commit(repo, web(fix), message="fixed")
    result = app.sync(timeout=TIMEOUT)

    assert result.outcome.value == "Applied", result.reason
    assert verdict(result).status is Status.CURRENT
    live = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert live["metadata"]["annotations"][REVISION_ANNOTATION] == "3"


def test_a_slow_ready_rollout_is_in_progress_then_current(app, repo, kube):
    commit(repo, web("nginx:slow-ready"), message="web warms up for 5 s")
    seen = []
    result = sync(kube, app.spec(timeout=TIMEOUT), cache_dir=app.cache_dir, on_health=seen.append)

    assert result.outcome.value == "Applied", result.reason
    statuses = [h.status for h in seen if h.ref.kind == "Deployment"]
    assert Status.IN_PROGRESS in statuses and statuses[-1] is Status.CURRENT, seen
    assert statuses.index(Status.IN_PROGRESS) < len(statuses) - 1


def test_a_failed_job_is_unhealthy(app, repo):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never", "containers": [{"name": "migrate", "image": "migrate:crashloop"}]}}}}
    commit(repo, job, message="a migration that exits 1")
    result = app.sync(timeout=TIMEOUT)

    message = assert_failed_early(result, reasons=("BackoffLimitExceeded",), kind="Job")
    assert message.startswith("Job failed: ")
