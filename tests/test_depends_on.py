"""dependsOn against the real control plane: an app waits for the apps it depends on.

The classic case: one app brings a CRD, another the custom resources of it.
Without the wait the second app's first sync fails ("no kind Gadget is
served"); with it, it never runs before the first is Applied and Healthy, its
status says what it waits for, and it runs the moment the first is ready —
an event, not its next poll (the apps here poll hourly).
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from helpers import (
    GitRepo,
    app_entry,
    cm_data,
    configmap,
    gitopsd,
    post_generic,
    replace_file,
    transitions,
    wait_for,
    write_config,
)

from gitopsd.daemon.shards import shard_of

pytestmark = pytest.mark.cluster


def crd(group: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"gadgets.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "properties": {"spec": {"type": "object",
                                                                   "x-kubernetes-preserve-unknown-fields": True}}}}}]}}


@pytest.fixture
def group(kube):
    group = f"d{uuid.uuid4().hex[:6]}.gitopsd.io"
    yield group
    kube.delete(kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition"), f"gadgets.{group}")


def status_of(app: str, *, namespace: str, kubeconfig, cache) -> dict:
    """`gitopsd status APP -o json`'s row; {} while the app has reported none."""
    proc = gitopsd("status", app, "--namespace", namespace, "-o", "json", kubeconfig=kubeconfig, cache=cache)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else {}


def test_the_dependent_custom_resource_is_applied_only_after_the_crd_app_is_healthy(
        repo, kube, namespace, tmp_path, group, start_daemon, kubeconfig, source_cache):
    # The CRD app's first commit is broken (an invalid object): it fails, and applies nothing.
    repo.write("crds/crd.yaml", crd(group))
    repo.write("crds/broken.yaml", configmap("Not_A_Name", {"k": "v"}))
    repo.write("gadgets/gadget.yaml", {"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": "g1"},
                                       "spec": {"color": "red"}})
    repo.commit("a CRD app (broken) and an app of its custom resources")
    config = write_config(tmp_path / "config.yaml", [
        app_entry("crds", repo.url, namespace, path="crds"),
        app_entry("gadgets", repo.url, namespace, path="gadgets", dependsOn=["crds"]),
    ])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")

    failed = wait_transition_of(daemon, "crds", "Failed")
    assert "broken.yaml" in failed["reason"]

    # The dependent waits, and says why: the status record and the table.
    waiting = wait_for("gadgets waiting for the failed crds app", lambda: (
        s := status_of("gadgets", namespace=namespace, kubeconfig=kubeconfig, cache=source_cache)
    ).get("result") == "Waiting" and "Failed" in s["reason"] and s, 30)
    assert waiting["waitingFor"] == ["crds"]
    assert waiting["reason"].startswith("waiting for crds: Failed: invalid object: ") and "broken.yaml" in \
        waiting["reason"], waiting["reason"]
    table = gitopsd("status", "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache).stdout
    row = next(line for line in table.splitlines() if line.startswith("gadgets "))
    assert " Waiting " in row and "waiting for crds: Failed" in row, table
    assert transitions(daemon, "gadgets") == []   # it never ran: no "unknown kind" failure
    assert kube.resource_for_group_kind(group, "Gadget") is None

    # The fix: the CRD app applies and becomes healthy; the dependent runs at once (its poll is an hour away).
    repo.remove("crds/broken.yaml")
    sha = repo.commit("fix the CRD app")
    assert post_generic(daemon, repo.url, sha)[0] == 202
    applied = wait_transition_of(daemon, "gadgets", "Applied", timeout=60)

    crds_done = next(t for t in transitions(daemon, "crds") if t["result"] == "Applied")
    assert crds_done["health"]["outcome"] == "Healthy"
    assert [t["result"] for t in transitions(daemon, "gadgets")] == ["Applied"], "the dependent never failed"
    assert applied["trigger"] == "dependency", "woken by the end of the CRD app's run, not by a poll"
    assert daemon.events().index(crds_done) < daemon.events().index(applied), "the CRD app first"
    kube.discover()
    gadget = kube.get(kube.resource(f"{group}/v1", "Gadget"), "g1", namespace)
    assert gadget["spec"] == {"color": "red"}
    ready = status_of("gadgets", namespace=namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert (ready["result"], ready["health"], "waitingFor" in ready) == ("Applied", "Healthy", False)


def test_an_app_waits_for_a_suspended_dependency_and_runs_once_a_reload_resumes_it(
        repo, kube, namespace, tmp_path, start_daemon, kubeconfig, source_cache):
    repo.write("base/cm.yaml", configmap("base", {"k": "v"}))
    repo.write("top/cm.yaml", configmap("top", {"k": "v"}))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [
        app_entry("base", repo.url, namespace, path="base", suspend=True),
        app_entry("top", repo.url, namespace, path="top", dependsOn=["base"]),
    ])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")

    waiting = wait_for("top waiting", lambda: (
        s := status_of("top", namespace=namespace, kubeconfig=kubeconfig, cache=source_cache)
    ).get("result") == "Waiting" and s, 30)
    assert waiting["reason"] == "waiting for base: suspended"
    assert kube.get(kube.resource("v1", "ConfigMap"), "top", namespace) is None

    # A reload that resumes the dependency: it runs (a changed app), and its end starts the waiting app.
    replace_file(config, yaml.safe_dump({"apps": [
        app_entry("base", repo.url, namespace, path="base"),
        app_entry("top", repo.url, namespace, path="top", dependsOn=["base"])]}))
    applied = wait_transition_of(daemon, "top", "Applied")
    assert applied["trigger"] == "dependency"
    assert cm_data(kube, namespace, "top") == {"k": "v"}
    wait_for("top's status no longer waiting", lambda: status_of(
        "top", namespace=namespace, kubeconfig=kubeconfig, cache=source_cache).get("result") == "Applied", 30)


def test_a_dependency_of_another_replicas_shard_is_followed_through_its_status_record(
        repo, kube, namespace, tmp_path, start_daemon, kubeconfig, source_cache):
    from test_sharding import CALM, wait_split

    # With two shards, `platform` is shard 1 (replica-b's) and `apps` shard 0 (replica-a's).
    assert (shard_of("platform", 2), shard_of("apps", 2)) == (1, 0)
    # `apps` lives in a repository of its own: the fix's push then reaches only `platform`, and
    # nothing but platform's new status record can wake `apps` (with one repository, the push's
    # webhook, forwarded to replica-a, may reach `apps` after platform has applied).
    apps_repo = GitRepo(tmp_path / "apps-git")
    repo.write("platform/cm.yaml", configmap("platform", {"k": "v"}))
    repo.write("platform/broken.yaml", configmap("Not_A_Name", {"k": "v"}))
    repo.commit("platform (broken)")
    apps_repo.write("apps/cm.yaml", configmap("apps", {"k": "v"}))
    apps_repo.commit("the apps on platform")
    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    a = start_daemon(config, *CALM, "--shards", "2", name="replica-a")
    b = start_daemon(config, *CALM, "--shards", "2", name="replica-b")
    assert wait_split([a, b], 2) == {"replica-a": [0], "replica-b": [1]}
    replace_file(config, yaml.safe_dump({"apps": [
        app_entry("platform", repo.url, namespace, path="platform"),
        app_entry("apps", apps_repo.url, namespace, path="apps", dependsOn=["platform"])]}))

    wait_transition_of(b, "platform", "Failed")
    waiting = wait_for("apps waiting for platform's recorded failure", lambda: (
        s := status_of("apps", namespace=namespace, kubeconfig=kubeconfig, cache=source_cache)
    ).get("result") == "Waiting" and "Failed" in s["reason"] and s, 30)
    assert waiting["reason"].startswith("waiting for platform: Failed: invalid object: "), waiting["reason"]
    assert transitions(a, "apps") == [] and transitions(b, "apps") == []

    repo.remove("platform/broken.yaml")
    sha = repo.commit("fix platform")
    assert post_generic(b, repo.url, sha)[0] == 202
    applied = wait_transition_of(a, "apps", "Applied", timeout=60)
    assert applied["trigger"] == "dependency", "woken by platform's new status record, not by a poll"
    assert [t["result"] for t in transitions(b, "platform")] == ["Failed", "Applied"]
    assert cm_data(kube, namespace, "apps") == {"k": "v"}


def wait_transition_of(daemon, app: str, result: str, timeout: float = 30.0) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("type") == "transition"
                             and e.get("app") == app and e.get("result") == result,
                             f"a {result} transition of {app}", timeout)
