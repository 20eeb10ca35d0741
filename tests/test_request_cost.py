"""What a sync costs the apiserver, request by request, on the real control plane.

On a fleet's first sync the apiserver, not gitopsd, is the bound (issue 10:
1,000 apps converge as fast as it answers), so every request per app
counts. The daemon's own counter (gitopsd_apiserver_requests_total, by
verb) is the measure: a real `gitopsd run` with three new apps of five
ConfigMaps each.

A new app's first sync, per app (17 requests; 35 before issue 10's fourth
part):
- GET the ApplySet parent and LIST its audit segments, once, when the
  runner takes the app over: the inventory, the last revision and the
  chain head all come from them;
- 5 dry-runs (every object validated before the first write) and nothing
  else to plan: the shared informers know there are no members, and a
  dry-run create says the object does not exist;
- 8 applies: the parent (widened once; the narrowing would write the same),
  the 5 objects, the chain head and the status on the parent;
- 2 POSTs: the audit segment and one Event on the parent.
The process pays once: discovery, its namespace, the informer's list and
watch of the kind.

The plan's shortcuts keep their guarantees, tested here too: an object
that exists without being a member is still read (its diff, its owner), and
one owned by another app is refused before anything is written.
"""

from __future__ import annotations

import pytest
from helpers import app_entry, configmap, list_pages, metric, post_generic, wait_for, write_config

from gitopsd.engine.inventory import PART_OF_LABEL
from gitopsd.engine.plan import Action

pytestmark = pytest.mark.cluster

APPS, OBJECTS = 3, 5
PER_APP = {"get": 1, "list": 1, "apply-dry-run": OBJECTS, "apply": OBJECTS + 3, "post": 2}
# Once per process: /api and /apis, gitopsd's namespace, the ConfigMap informer's list (one request per
# page: on a shared cluster other tests' managed ConfigMaps are listed too) and watch, and the list and
# watch of release requests (gitopsd.daemon.release: one for all apps).
PER_PROCESS = {"discovery": 2, "get": 1, "list": 2, "watch": 2}


def _requests(daemon) -> dict[str, int]:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = daemon.get("/metrics")
    assert code == 200, text
    return {s.labels["verb"]: int(s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "gitopsd_apiserver_requests_total" and s.value}


def _status_written(kube, namespace: str, app: str) -> bool:
    parent = kube.get(kube.resource("v1", "ConfigMap"), f"gitopsd-{app}", namespace)
    return bool(parent and "status" in (parent.get("data") or {}))


@pytest.fixture
def three_new_apps(repo, kube, namespace, tmp_path, start_daemon):
    """A daemon whose three new apps of five ConfigMaps each have had their first sync."""
    for a in range(APPS):
        repo.write(f"app-{a}/cms.yaml", [configmap(f"app-{a}-cm-{j}", {"j": str(j)}) for j in range(OBJECTS)])
    repo.commit("three apps")
    names = [f"cost-{a}" for a in range(APPS)]
    cfg = write_config(tmp_path / "config.yaml",
                       [app_entry(n, repo.url, namespace, path=f"app-{a}", interval="5s")
                        for a, n in enumerate(names)])
    daemon = start_daemon(cfg, "--no-leader-elect", "--no-watch-local")
    # The status is the last write of a first sync (after the audit record).
    wait_for("every app's first sync", lambda: all(_status_written(kube, namespace, n) for n in names), 60)
    return daemon


def test_first_sync_of_a_new_app_costs_at_most_17_requests(three_new_apps, kube):
    sent = _requests(three_new_apps)
    once = {**PER_PROCESS, "list": 1 + list_pages(kube, "v1", "ConfigMap", label_selector=PART_OF_LABEL)}
    per_app = {verb: (n - once.get(verb, 0)) / APPS for verb, n in sent.items()}

    over = {verb: n for verb, n in per_app.items() if n > PER_APP.get(verb, 0)}
    assert over == {}, f"per app by verb: {per_app}; allowed {PER_APP} (+ {once} per process)"
    assert sum(per_app.values()) <= 17


def test_a_reconcile_with_nothing_to_do_sends_no_request(three_new_apps, repo):
    """Polls of unchanged apps (each one a full drift check: fetch, render, plan) send nothing; nor
    does a push that changes no app's files, which wakes no app at all."""
    daemon = three_new_apps
    before = _requests(daemon)
    polls = metric(daemon, "gitopsd_reconcile_total", trigger="poll")
    wait_for("a poll of every app",
             lambda: metric(daemon, "gitopsd_reconcile_total", trigger="poll") >= polls + APPS, 60)
    repo.write("README.md", "no app's files change\n")
    sha = repo.commit("docs only")
    assert post_generic(daemon, repo.url, sha)[0] == 202
    looked = daemon.wait_event(lambda e: e.get("event") == "new commit: woke the apps it concerns"
                               and e.get("revision") == sha[:12], "the push's look at the new commit", 30)
    assert looked["triggered"] == [] and looked["unchanged"] == APPS, looked

    after = _requests(daemon)
    assert metric(daemon, "gitopsd_reconcile_total", trigger="webhook") == 0, "the push concerned no app"
    assert {v: after[v] - before.get(v, 0) for v in after if after[v] != before.get(v, 0)} == {}, \
        "no write, and no read the informers answer"


def test_an_existing_object_that_is_no_member_is_read_and_updated_with_its_diff(app, repo, kube, namespace):
    cms = kube.resource("v1", "ConfigMap")
    kube.apply(configmap("by-hand", {"k": "old", "mine": "x"}, namespace=namespace), field_manager="kubectl")
    repo.write("cm.yaml", [configmap("by-hand", {"k": "new"}), configmap("fresh", {"k": "1"})])
    repo.commit("take over a hand-made ConfigMap")

    result = app.sync()

    assert result.outcome.value == "Applied", result.reason
    actions = {c.ref.name: c for c in result.plan.changes}
    assert actions["fresh"].action == Action.CREATE
    adopted = actions["by-hand"]   # judged against the object as it was: an update, not a create
    assert adopted.action == Action.UPDATE
    assert "data.k" in adopted.diff.fields and "data.mine" not in adopted.diff.fields
    assert kube.get(cms, "by-hand", namespace)["metadata"]["labels"][PART_OF_LABEL]


def test_an_object_of_another_app_is_refused_before_any_write(app, repo, kube, namespace):
    from gitopsd.engine.sync import sync

    repo.write("a.yaml", configmap("shared", {"k": "first"}))
    repo.commit()
    assert sync(kube, app.spec(name="first"), cache_dir=app.cache_dir).outcome.value == "Applied"
    cms = kube.resource("v1", "ConfigMap")
    before = kube.get(cms, "shared", namespace)["metadata"]["resourceVersion"]
    repo.write("a.yaml", [configmap("shared", {"k": "second"}), configmap("second-only", {"k": "1"})])
    repo.commit("a second app claims the object")

    result = sync(kube, app.spec(name="second"), cache_dir=app.cache_dir)

    assert result.outcome.value == "Failed"
    assert any(e.startswith("a.yaml") and "already owned by another ApplySet" in e for e in result.errors), \
        result.errors
    assert kube.get(cms, "shared", namespace)["metadata"]["resourceVersion"] == before
    assert kube.get(cms, "second-only", namespace) is None, "nothing of the plan was written"
