"""A new commit wakes the apps it concerns, not every app of its repository.

The first half asks the rule itself (gitopsd.engine.render_cache
`unchanged_by`, over gitopsd.engine.source `changed_paths`) about real
commits of a real repository rendered by the real renderers: which changes
touch an app (its own files, a new file in its directory, a rename, a
deletion, a path become a symlink, a kustomize base, a `.gitattributes`),
which leave it alone, and which apps are unknown and so always concerned.
The second half runs the real daemon on the real control plane and counts
its reconciles per app (gitopsd_reconcile_total) after pushes.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from helpers import configmap, metric, post_generic, wait_for, write_config
from test_fetch_sharing import app_behind_a_symlink, commit, fetch
from test_source import Upstream, cache, git_identity, upstream  # noqa: F401

from gitopsd.engine import source
from gitopsd.engine.render_cache import RenderCache, touches
from gitopsd.errors import RenderError


@pytest.fixture
def two_apps(upstream, cache):
    """apps/a and apps/b (plain), each built once by the render cache under its app name."""
    commit(upstream, {"apps/a/cm.yaml": configmap("a", {"v": "1"}), "apps/b/cm.yaml": configmap("b", {"v": "1"}),
                      "README.md": "fleet\n"})
    renders = RenderCache()
    checkout = fetch(upstream, cache)
    for app in ("a", "b"):
        renders.render(checkout, f"apps/{app}", app=app)
    return renders


def after(upstream, cache, renders: RenderCache, change) -> dict[str, bool | None]:
    """Commit `change(work)` and ask, for each app, whether the new commit leaves it unchanged."""
    change(upstream.work)
    upstream.commit({})
    checkout = fetch(upstream, cache)
    return {app: renders.unchanged_by(app, checkout) for app in ("a", "b")}


def write(path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text or yaml.safe_dump(configmap(path.stem, {"v": "new"})))


# -------------------------------------------------------------------------- the rule, over real commits


def test_a_commit_to_another_app_leaves_an_app_unchanged(upstream, cache, two_apps):
    assert after(upstream, cache, two_apps, lambda w: write(w / "apps/b/cm.yaml")) == {"a": True, "b": False}


def test_a_commit_outside_every_app_leaves_them_all_unchanged(upstream, cache, two_apps):
    assert after(upstream, cache, two_apps, lambda w: write(w / "README.md", "more\n")) == {"a": True, "b": True}


def test_new_file_in_an_apps_directory_touches_it(upstream, cache, two_apps):
    """A plain app reads every file under its path: its directory is its input, not the files it found."""
    assert after(upstream, cache, two_apps, lambda w: write(w / "apps/a/deeper/new.yaml"))["a"] is False


def test_renamed_input_touches_the_app(upstream, cache, two_apps):
    assert after(upstream, cache, two_apps,
                 lambda w: os.rename(w / "apps/a/cm.yaml", w / "apps/a/cm.txt"))["a"] is False


def test_deleted_app_directory_touches_the_app(upstream, cache, two_apps):
    assert after(upstream, cache, two_apps, lambda w: (w / "apps/a/cm.yaml").unlink())["a"] is False


def test_an_app_directory_become_a_symlink_touches_the_app(upstream, cache, two_apps):
    def relink(work):
        write(work / "elsewhere/cm.yaml")
        (work / "apps/a/cm.yaml").unlink()
        (work / "apps/a").rmdir()
        os.symlink("../elsewhere", work / "apps/a")

    assert after(upstream, cache, two_apps, relink)["a"] is False


def test_a_change_behind_an_apps_symlink_touches_it(upstream, cache):
    """The link is an input, and so is what it leads to: the target's change concerns the app."""
    app_behind_a_symlink(upstream)
    renders = RenderCache()
    renders.render(fetch(upstream, cache), "apps/web", app="web")

    commit(upstream, {"shared/cm.yaml": configmap("web", {"color": "green"})})

    assert renders.unchanged_by("web", fetch(upstream, cache)) is False


def test_a_change_to_a_kustomize_base_touches_the_overlay(upstream, cache):
    commit(upstream, {"base/kustomization.yaml": {"resources": ["cm.yaml"]},
                      "base/cm.yaml": configmap("shared", {"v": "1"}),
                      "apps/web/kustomization.yaml": {"namePrefix": "web-", "resources": ["../../base"]},
                      "apps/other/cm.yaml": configmap("other", {"v": "1"})})
    renders = RenderCache()
    renders.render(fetch(upstream, cache), "apps/web", app="web")

    commit(upstream, {"apps/other/cm.yaml": configmap("other", {"v": "2"})})
    assert renders.unchanged_by("web", fetch(upstream, cache)) is True
    commit(upstream, {"base/cm.yaml": configmap("shared", {"v": "2"})})
    assert renders.unchanged_by("web", fetch(upstream, cache)) is False


def test_a_gitattributes_change_touches_every_app(upstream, cache, two_apps):
    """It may change how files are checked out without changing their blobs."""
    assert after(upstream, cache, two_apps,
                 lambda w: write(w / "docs/.gitattributes", "*.yaml text eol=crlf\n")) == {"a": False, "b": False}


def test_an_unrelated_commit_moves_the_commit_an_apps_inputs_are_checked_at(upstream, cache, two_apps):
    """The next commit is compared with the last one checked, not with the app's last build: one diff per
    push for the fleet. A change made before the move is still seen when the app's build is older."""
    assert after(upstream, cache, two_apps, lambda w: write(w / "apps/b/cm.yaml"))["a"] is True
    unrelated = fetch(upstream, cache).revision.sha
    assert two_apps._since["a"].at == unrelated
    assert after(upstream, cache, two_apps, lambda w: write(w / "apps/a/cm.yaml"))["a"] is False
    assert two_apps._since["a"].at == unrelated   # touched: stays where it was, so every later diff covers it
    assert after(upstream, cache, two_apps, lambda w: write(w / "README.md", "again\n"))["a"] is False


def test_apps_whose_inputs_are_unknown_are_concerned_by_every_commit(upstream, cache):
    commit(upstream, {"apps/ok/cm.yaml": configmap("ok", {"v": "1"}),
                      "apps/broken/cm.yaml": "kind: ConfigMap\nmetadata: {name: broken}\n",   # no apiVersion
                      "apps/remote/kustomization.yaml": {"resources": ["cm.yaml"]},
                      "apps/remote/cm.yaml": configmap("remote", {"v": "1"})})
    renders = RenderCache()
    checkout = fetch(upstream, cache)
    renders.render(checkout, "apps/ok", app="ok")
    renders.render(checkout, "apps/remote", app="remote", allow_remote_bases=True)
    with pytest.raises(RenderError):
        renders.render(checkout, "apps/broken", app="broken")

    commit(upstream, {"README.md": "unrelated\n"})
    checkout = fetch(upstream, cache)

    assert {app: renders.unchanged_by(app, checkout) for app in ("ok", "broken", "remote", "never-built")} == {
        "ok": True, "broken": None, "remote": None, "never-built": None}


def test_an_app_is_unknown_when_git_cannot_say_what_changed(upstream, cache, two_apps):
    commit(upstream, {"apps/b/cm.yaml": configmap("b", {"v": "2"})})
    checkout = fetch(upstream, cache)

    assert two_apps.unchanged_by("a", source.Checkout(revision=checkout.revision, path=checkout.path)) is None


@pytest.mark.parametrize(("changed", "inputs", "touched"), [
    ({"apps/a/x.yaml"}, ("apps/a",), True),           # below an input
    ({"apps/a"}, ("apps/a/x.yaml",), True),           # above: a directory become a file or a link
    ({"apps/ab/x.yaml"}, ("apps/a",), False),         # a sibling sharing a prefix
    ({"apps/b/x.yaml"}, ("apps/a", "base"), False),
    ({"base/cm.yaml"}, ("apps/a", "base"), True),
    ({"README.md"}, (".",), True),                    # the root reads everything
    (set(), (".",), False),                           # the same tree
    ({"x/.gitattributes"}, ("apps/a",), True),
])
def test_which_changed_paths_touch_which_inputs(changed, inputs, touched):
    assert touches(frozenset(changed), inputs) is touched


# -------------------------------------------------------------------------- the daemon

APPS = 20


def reconciles(daemon, app: str) -> float:
    return metric(daemon, "gitopsd_reconcile_total", app=app)


def idle(daemon, apps: int) -> bool:
    status = json.loads(daemon.get("/status")[1])
    return len(status["apps"]) == apps and all(a["result"] != "Pending" and not a["running"]
                                               for a in status["apps"])


def cm_value(kube, namespace: str, name: str) -> str | None:
    obj = kube.get(kube.resource("v1", "ConfigMap"), name, namespace)
    return None if obj is None else (obj.get("data") or {}).get("value")


def fleet(repo, kube, namespace, tmp_path, start_daemon, extra: list[dict] = ()):
    """APPS plain apps under apps/app-NN of one repository (plus `extra` app configs), all synced and idle."""
    for n in range(APPS):
        repo.write(f"apps/app-{n:02d}/cm.yaml", configmap(f"app-{n:02d}", {"value": "0"}))
    repo.commit("a fleet on one repository")
    apps = [{"name": f"app-{n:02d}", "repo": repo.url, "ref": "main", "path": f"apps/app-{n:02d}",
             "namespace": namespace, "interval": "1h"} for n in range(APPS)] + list(extra)
    daemon = start_daemon(write_config(tmp_path / "config.yaml", apps), "--no-leader-elect", "--no-watch-local")
    wait_for("the first sync of every app", lambda: idle(daemon, len(apps)), 120, 0.5)
    return daemon, {a["name"]: reconciles(daemon, a["name"]) for a in apps}


def pushed(daemon, repo, sha: str) -> dict:
    """Post the push webhook; the daemon's line naming whom the new commit woke."""
    assert post_generic(daemon, repo.url, sha)[0] == 202
    return daemon.wait_event(lambda e: e.get("event") == "new commit: woke the apps it concerns"
                             and e.get("revision") == sha[:12], "the new commit's wake-up", 30)


def woken_since(daemon, before: dict[str, float]) -> dict[str, float]:
    return {app: n for app in before if (n := reconciles(daemon, app) - before[app])}


@pytest.mark.cluster
def test_push_to_one_app_of_a_monorepo_reconciles_only_that_app(repo, kube, namespace, tmp_path, start_daemon):
    daemon, before = fleet(repo, kube, namespace, tmp_path, start_daemon)
    fetches = metric(daemon, "gitopsd_git_fetches_total")

    repo.write("apps/app-07/cm.yaml", configmap("app-07", {"value": "1"}))
    woke = pushed(daemon, repo, repo.commit("one line in one app"))
    wait_for("the change applied", lambda: cm_value(kube, namespace, "app-07") == "1", 30, 0.05)
    wait_for("its reconcile counted", lambda: woken_since(daemon, before), 30)

    assert woke["triggered"] == ["app-07"] and woke["unchanged"] == APPS - 1
    assert woken_since(daemon, before) == {"app-07": 1}
    assert metric(daemon, "gitopsd_git_fetches_total") - fetches == 1


@pytest.mark.cluster
def test_app_whose_inputs_are_unknown_is_woken_by_every_new_commit(repo, kube, namespace, tmp_path, start_daemon):
    """allowRemoteBases: its build reads outside the commit, so it is never cached, so what it read is unknown."""
    repo.write("remote/kustomization.yaml", {"resources": ["cm.yaml"]})
    repo.write("remote/cm.yaml", configmap("remote", {"value": "0"}))
    daemon, before = fleet(repo, kube, namespace, tmp_path, start_daemon, extra=[
        {"name": "remote", "repo": repo.url, "ref": "main", "path": "remote", "namespace": namespace,
         "interval": "1h", "allowRemoteBases": True}])

    repo.write("apps/app-03/cm.yaml", configmap("app-03", {"value": "1"}))
    woke = pushed(daemon, repo, repo.commit("a change to app-03"))
    wait_for("both reconciles counted", lambda: len(woken_since(daemon, before)) == 2, 30)

    assert woke["triggered"] == ["app-03", "remote"]   # the touched app first
    assert woken_since(daemon, before) == {"app-03": 1, "remote": 1}


@pytest.mark.cluster
def test_new_file_in_an_apps_directory_wakes_it(repo, kube, namespace, tmp_path, start_daemon):
    daemon, before = fleet(repo, kube, namespace, tmp_path, start_daemon)

    repo.write("apps/app-05/more/extra.yaml", configmap("app-05-extra", {"value": "new"}))
    woke = pushed(daemon, repo, repo.commit("a new file in app-05"))
    wait_for("the new object applied", lambda: cm_value(kube, namespace, "app-05-extra") == "new", 30, 0.05)

    assert woke["triggered"] == ["app-05"]
    assert woken_since(daemon, before) == {"app-05": 1}


@pytest.mark.cluster
def test_renamed_input_wakes_the_app(repo, kube, namespace, tmp_path, start_daemon):
    """cm.yaml renamed to cm.txt: no manifest any more, so its object is pruned (a second object keeps the
    prune guard, which refuses pruning all of an app, out of the way)."""
    repo.write("apps/app-11/keep.yaml", configmap("app-11-keep", {"value": "0"}))
    daemon, before = fleet(repo, kube, namespace, tmp_path, start_daemon)

    os.rename(repo.work / "apps/app-11/cm.yaml", repo.work / "apps/app-11/cm.txt")
    woke = pushed(daemon, repo, repo.commit("rename app-11's manifest"))
    wait_for("the renamed-away object pruned", lambda: kube.get(kube.resource("v1", "ConfigMap"), "app-11",
                                                                namespace) is None, 30, 0.05)

    assert woke["triggered"] == ["app-11"]
    assert woken_since(daemon, before) == {"app-11": 1}


# -------------------------------------------------------------------------- the poll of a big repository


@pytest.fixture
def paced_schedule(tmp_path):
    """A started Schedule that paces polls of more than 10 due apps (the daemon: its reconcile workers)."""
    import threading

    from gitopsd.daemon.triggers import Schedule
    from gitopsd.engine.source_share import SharedFetches

    started = Schedule(threading.Event(), fetches=SharedFetches(cache_dir=tmp_path), pace_above=10)
    started.start()
    yield started
    started.shutdown()


def run_poll(schedule) -> None:
    [job] = [j for j in schedule.scheduler.get_jobs() if j.id.startswith("poll-")]
    job.func(*job.args)


def test_a_poll_of_many_apps_wakes_them_spread_over_half_the_interval(paced_schedule):
    import time

    from test_fetch_sharing import FakeRunner

    class Timed(FakeRunner):
        def trigger(self, reason: str, *, sha: str | None = None) -> None:
            super().trigger(reason, sha=sha)
            self.at = time.monotonic()

    fleet = [Timed(f"app-{n:02d}", "file:///r/mono.git", interval=5) for n in range(40)]
    for r in fleet:
        paced_schedule.poll(r)
    for r in fleet:   # as if their interval had come
        paced_schedule._repos[("file:///r/mono.git", "main")].polled[r.cfg.name] -= 5
    started = time.monotonic()

    run_poll(paced_schedule)
    assert sum(bool(r.triggered) for r in fleet) < len(fleet)   # not all at once
    wait_for("every app woken once", lambda: all(r.triggered for r in fleet), 10, 0.05)

    assert all(r.triggered == [("poll", None)] for r in fleet)
    assert [r.cfg.name for r in sorted(fleet, key=lambda r: r.at)] == [r.cfg.name for r in fleet]   # in order
    assert fleet[-1].at - started >= 2.0      # spread over half the interval (2.5 s), less one step


def test_a_small_poll_wakes_every_due_app_at_once(paced_schedule):
    from test_fetch_sharing import FakeRunner

    few = [FakeRunner(f"app-{n}", "file:///r/mono.git", interval=5) for n in range(10)]
    for r in few:
        paced_schedule.poll(r)
        paced_schedule._repos[("file:///r/mono.git", "main")].polled[r.cfg.name] -= 5

    run_poll(paced_schedule)

    assert all(r.triggered == [("poll", None)] for r in few)
