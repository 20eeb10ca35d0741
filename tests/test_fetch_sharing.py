"""One fetch per repository, and renders reused while their files are unchanged.

The first half drives gitopsd.engine.source_share and gitopsd.engine.render_cache
directly, over real Git repositories (file:// and smart HTTP with Basic auth)
and the real renderers; the second half runs the real daemon with fifty apps
on one repository against the real control plane and counts its fetches,
wake-ups and renders through /metrics.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from helpers import configmap, metric, post_generic, wait_for, write_config
from test_source import TOKEN, WRONG_TOKEN, Upstream, cache, git_identity, http_server, upstream  # noqa: F401

from gitopsd import redact
from gitopsd.engine import render, source
from gitopsd.engine.render_cache import RenderCache
from gitopsd.engine.source import Checkout, Credentials
from gitopsd.engine.source_share import SharedFetches
from gitopsd.errors import RenderError, SourceError


class Counted(SharedFetches):
    """SharedFetches that counts the fetches that went to the remote and the new commits it heard of."""

    def __init__(self, cache_dir: Path) -> None:
        self.fetched: list[str] = []
        self.new_commits: list[str] = []
        super().__init__(cache_dir=cache_dir, timeout=30, on_fetch=lambda key: self.fetched.append(key.url),
                         on_new_commit=lambda url, ref, checkout: self.new_commits.append(checkout.revision.sha))


def in_threads(count: int, work) -> list:
    """Run work(i) in `count` threads started together; their results (or exceptions) in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - returned for the test to judge
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# --------------------------------------------------------------------------
# one fetch per repository


def test_fifty_concurrent_fetches_of_one_repository_cost_one_fetch(upstream, cache):
    sha = upstream.commit({"apps/a/cm.yaml": "a"})
    shared = Counted(cache)

    results = in_threads(50, lambda i: shared.fetch(upstream.url, "main"))

    assert [r.revision.sha for r in results] == [sha] * 50
    assert shared.fetched == [upstream.url]


def test_a_fetch_is_reused_until_the_repository_is_refreshed(upstream, cache):
    first = upstream.commit({"f": "1"})
    shared = Counted(cache)
    assert shared.fetch(upstream.url, "main").revision.sha == first

    second = upstream.commit({"f": "2"})
    assert shared.fetch(upstream.url, "main").revision.sha == first   # same generation: no new fetch
    shared.refresh(upstream.url, "main")

    assert shared.fetch(upstream.url, "main").revision.sha == second
    assert len(shared.fetched) == 2
    assert shared.new_commits == [second]


def test_a_refresh_while_a_fetch_runs_gets_a_fetch_of_its_own(upstream, cache, monkeypatch):
    first = upstream.commit({"f": "1"})
    shared = Counted(cache)
    fetched, release = threading.Event(), threading.Event()
    real = source.fetch

    def slow(*args, **kwargs):
        checkout = real(*args, **kwargs)
        if checkout.revision.sha == first:   # the early fetch: done, but not yet handed out
            fetched.set()
            release.wait(30)
        return checkout

    monkeypatch.setattr(source, "fetch", slow)
    early: list[Checkout] = []
    runner = threading.Thread(target=lambda: early.append(shared.fetch(upstream.url, "main")))
    runner.start()
    assert fetched.wait(30)
    second = upstream.commit({"f": "2"})   # a push after that fetch had read the remote
    shared.refresh(upstream.url, "main")
    threading.Timer(0.2, release.set).start()

    late = shared.fetch(upstream.url, "main")
    runner.join(30)

    assert early[0].revision.sha == first
    assert late.revision.sha == second   # not handed the older fetch it would have joined
    assert len(shared.fetched) == 2


def test_apps_on_two_repositories_do_not_share_a_fetch(tmp_path, cache):
    one, two = Upstream(tmp_path / "one"), Upstream(tmp_path / "two")
    sha_one, sha_two = one.commit({"f": "1"}), two.commit({"f": "2"})
    shared = Counted(cache)

    results = in_threads(10, lambda i: shared.fetch((one if i % 2 else two).url, "main"))

    assert [r.revision.sha for r in results] == [sha_two, sha_one] * 5
    assert sorted(shared.fetched) == sorted([one.url, two.url])


def test_two_apps_on_one_repository_with_different_credentials_do_not_share(upstream, http_server, cache):
    sha = upstream.commit({"f": "1"})
    url = http_server.url("remote.git")
    shared = Counted(cache)
    right = Credentials(username="deploy", token=TOKEN)
    wrong = Credentials(username="deploy", token=WRONG_TOKEN)

    results = in_threads(6, lambda i: shared.fetch(url, "main", credentials=right if i % 2 else wrong))

    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, Checkout) and result.revision.sha == sha
        else:
            assert isinstance(result, SourceError), result   # never the commit fetched with the other token
            assert str(result).startswith(f"authentication to {url} failed")
    assert len(shared.fetched) == 2


def test_two_apps_with_the_same_credentials_share_even_from_different_key_files(upstream, cache, tmp_path):
    upstream.commit({"f": "1"})
    shared = Counted(cache)
    keys = []
    for name in ("app-a-identity", "app-b-identity"):   # one Secret, copied per app (daemon.credentials)
        keys.append(tmp_path / name)
        keys[-1].write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsame\n")

    in_threads(4, lambda i: shared.fetch(upstream.url, "main", credentials=Credentials(ssh_key_file=keys[i % 2])))

    assert len(shared.fetched) == 1


def test_a_failed_fetch_is_shared_by_its_generation_and_a_retry_fetches_again(upstream, cache):
    shared = Counted(cache)

    errors = in_threads(5, lambda i: shared.fetch(upstream.url, "main"))   # an empty remote: no branch main
    assert all(isinstance(e, SourceError) and "not found" in str(e) for e in errors)
    with pytest.raises(SourceError):
        shared.fetch(upstream.url, "main")
    assert len(shared.fetched) == 1

    sha = upstream.commit({"f": "1"})
    assert shared.retry(upstream.url, "main") is True
    assert shared.retry(upstream.url, "main") is False   # a burst of retries starts one new generation
    assert shared.fetch(upstream.url, "main").revision.sha == sha
    assert shared.retry(upstream.url, "main") is False   # the last fetch succeeded: nothing to retry
    assert len(shared.fetched) == 2


# --------------------------------------------------------------------------
# the render cache


def commit(upstream: Upstream, files: dict[str, object]) -> None:
    upstream.commit({name: (yaml.safe_dump_all(content) if isinstance(content, list) else
                            yaml.safe_dump(content) if isinstance(content, dict) else content)
                     for name, content in files.items()})


class Renders(RenderCache):
    """A RenderCache that records its lookups."""

    def __init__(self, **kwargs) -> None:
        self.results: list[str] = []
        super().__init__(on_lookup=self.results.append, **kwargs)


def fetch(upstream: Upstream, cache: Path) -> Checkout:
    return source.fetch(upstream.url, "main", cache_dir=cache)


def app_behind_a_symlink(upstream: Upstream) -> None:
    """Commit app apps/web whose one file is a symlink to shared/cm.yaml (ConfigMap web)."""
    commit(upstream, {"shared/cm.yaml": configmap("web", {"color": "blue"})})
    (upstream.work / "apps/web").mkdir(parents=True)
    os.symlink("../../shared/cm.yaml", upstream.work / "apps/web/cm.yaml")
    upstream.commit({})


def test_a_render_is_reused_when_a_commit_changes_another_apps_files(upstream, cache):
    commit(upstream, {"apps/a/cm.yaml": configmap("a", {"v": "1"}), "apps/b/cm.yaml": configmap("b", {"v": "1"})})
    renders = Renders()
    first = renders.render(fetch(upstream, cache), "apps/a", namespace="ns").manifests

    commit(upstream, {"apps/b/cm.yaml": configmap("b", {"v": "2"})})
    checkout = fetch(upstream, cache)
    again = renders.render(checkout, "apps/a", namespace="ns").manifests

    assert renders.results == ["miss", "hit"]
    assert again == first == render.render(checkout.path, "apps/a", namespace="ns")
    assert again[0].obj is not first[0].obj   # a copy: the planner may change what it is given


def test_a_change_to_the_apps_own_files_is_a_miss(upstream, cache):
    commit(upstream, {"apps/a/cm.yaml": configmap("a", {"v": "1"})})
    renders = Renders()
    renders.render(fetch(upstream, cache), "apps/a")

    commit(upstream, {"apps/a/cm.yaml": configmap("a", {"v": "2"})})
    [cm] = renders.render(fetch(upstream, cache), "apps/a").manifests

    assert renders.results == ["miss", "miss"]
    assert cm.obj["data"] == {"v": "2"}


def test_an_apps_revision_is_the_commit_that_last_changed_its_inputs(upstream, cache):
    renders = Renders()

    def since(files: dict) -> tuple[str, str]:
        commit(upstream, files)
        checkout = fetch(upstream, cache)
        return renders.render(checkout, "apps/a", app="a").since.sha, checkout.revision.sha

    created, head = since({"apps/a/cm.yaml": configmap("a", {"v": "1"}), "apps/b/cm.yaml": configmap("b", {})})
    assert created == head
    assert since({"apps/b/cm.yaml": configmap("b", {"v": "2"})})[0] == created   # another app's commit
    changed, head = since({"apps/a/cm.yaml": configmap("a", {"v": "2"})})
    assert changed == head != created
    reverted, head = since({"apps/a/cm.yaml": configmap("a", {"v": "1"})})   # back to the first content
    assert reverted == head != created
    assert renders.results == ["miss", "hit", "miss", "hit"]   # the reverted content was still cached
    assert renders.render(fetch(upstream, cache), "apps/a").since.sha == head   # no app named: this commit


def test_render_options_are_part_of_the_key(upstream, cache):
    commit(upstream, {"apps/a/cm.yaml": configmap("a", {"v": "1"})})
    renders = Renders()
    checkout = fetch(upstream, cache)

    one = renders.render(checkout, "apps/a", namespace="one").manifests
    two = renders.render(checkout, "apps/a", namespace="two").manifests

    assert renders.results == ["miss", "miss"]
    assert (one[0].obj["metadata"]["namespace"], two[0].obj["metadata"]["namespace"]) == ("one", "two")


def test_a_change_to_a_kustomize_base_outside_the_apps_path_is_a_miss(upstream, cache):
    commit(upstream, {
        "base/kustomization.yaml": {"resources": ["cm.yaml"]},
        "base/cm.yaml": configmap("shared", {"v": "1"}),
        "apps/web/kustomization.yaml": {"namePrefix": "web-", "resources": ["../../base"]},
        "apps/other/cm.yaml": configmap("other", {"v": "1"}),
    })
    renders = Renders()
    renders.render(fetch(upstream, cache), "apps/web")
    commit(upstream, {"apps/other/cm.yaml": configmap("other", {"v": "2"})})
    renders.render(fetch(upstream, cache), "apps/web")

    commit(upstream, {"base/cm.yaml": configmap("shared", {"v": "2"})})
    [cm] = renders.render(fetch(upstream, cache), "apps/web").manifests

    assert renders.results == ["miss", "hit", "miss"]
    assert cm.obj["metadata"]["name"] == "web-shared" and cm.obj["data"] == {"v": "2"}


def test_a_change_behind_a_symlink_is_a_miss(upstream, cache):
    """A link's own content is its target's name: what it points at is an input of its own."""
    app_behind_a_symlink(upstream)
    renders = Renders()
    renders.render(fetch(upstream, cache), "apps/web")

    commit(upstream, {"shared/cm.yaml": configmap("web", {"color": "green"})})
    [cm] = renders.render(fetch(upstream, cache), "apps/web").manifests

    assert renders.results == ["miss", "miss"]
    assert cm.obj["data"] == {"color": "green"}


def test_a_retargeted_app_path_symlink_is_a_miss(upstream, cache):
    commit(upstream, {"v1/cm.yaml": configmap("a", {"v": "1"}), "v2/cm.yaml": configmap("a", {"v": "2"})})
    os.symlink("v1", upstream.work / "current")
    upstream.commit({})
    renders = Renders()
    renders.render(fetch(upstream, cache), "current")

    (upstream.work / "current").unlink()
    os.symlink("v2", upstream.work / "current")
    upstream.commit({})
    [cm] = renders.render(fetch(upstream, cache), "current").manifests

    assert renders.results == ["miss", "miss"]
    assert cm.obj["data"] == {"v": "2"}


@pytest.mark.parametrize("app_path", ["current", "apps/web"])
def test_a_retargeted_link_in_a_chain_of_links_is_a_miss(upstream, cache, app_path):
    """`current -> a/b` with `a -> x`, and `apps/web/cm.yaml -> ../../a/b/cm.yaml`: retargeting `a` alone
    leaves both the app's path and its directory as they were, and changes what the render reads."""
    commit(upstream, {"x/b/cm.yaml": configmap("a", {"v": "1"}), "y/b/cm.yaml": configmap("a", {"v": "2"})})
    (upstream.work / "apps/web").mkdir(parents=True)
    os.symlink("x", upstream.work / "a")
    os.symlink("a/b", upstream.work / "current")
    os.symlink("../../a/b/cm.yaml", upstream.work / "apps/web/cm.yaml")
    upstream.commit({})
    renders = Renders()
    renders.render(fetch(upstream, cache), app_path)

    (upstream.work / "a").unlink()
    os.symlink("y", upstream.work / "a")
    upstream.commit({})
    [cm] = renders.render(fetch(upstream, cache), app_path).manifests

    assert renders.results == ["miss", "miss"]
    assert cm.obj["data"] == {"v": "2"}


def test_a_render_cache_hit_registers_secret_values_with_redact_again(upstream, cache):
    value = "s3cr3t-cached-render-value"
    commit(upstream, {"apps/a/secret.yaml": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
                                             "stringData": {"password": value}},
                      "apps/b/cm.yaml": configmap("b", {"v": "1"})})
    renders = Renders()
    renders.render(fetch(upstream, cache), "apps/a")
    commit(upstream, {"apps/b/cm.yaml": configmap("b", {"v": "2"})})
    redact.forget_all()
    assert value in redact.scrub(f"password={value}")

    [secret] = renders.render(fetch(upstream, cache), "apps/a").manifests

    assert renders.results == ["miss", "hit"]
    assert secret.obj["stringData"] == {"password": value}
    assert redact.scrub(f"password={value}") == f"password={redact.REDACTED}"


def test_a_failed_render_is_not_cached(upstream, cache):
    commit(upstream, {"apps/a/cm.yaml": "kind: ConfigMap\nmetadata: {name: a}\n"})   # no apiVersion
    renders = Renders()
    checkout = fetch(upstream, cache)

    for _ in range(2):
        with pytest.raises(RenderError, match="missing apiVersion"):
            renders.render(checkout, "apps/a")

    assert renders.results == ["uncached", "uncached"]
    assert len(renders) == 0


def test_a_render_that_may_read_remote_bases_is_not_cached(upstream, cache):
    commit(upstream, {"apps/a/kustomization.yaml": {"resources": ["cm.yaml"]},
                      "apps/a/cm.yaml": configmap("a", {"v": "1"})})
    renders = Renders()
    checkout = fetch(upstream, cache)

    for _ in range(2):
        renders.render(checkout, "apps/a", allow_remote_bases=True)

    assert renders.results == ["uncached", "uncached"]


def test_scopes_are_decided_again_on_a_hit(upstream, cache):
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    commit(upstream, {"apps/a/widget.yaml": widget})
    renders = Renders()
    checkout = fetch(upstream, cache)

    unknown = renders.render(checkout, "apps/a", namespace="ns", is_namespaced=lambda g, k: None).manifests
    namespaced = renders.render(checkout, "apps/a", namespace="ns", is_namespaced=lambda g, k: True).manifests

    assert renders.results == ["miss", "hit"]
    assert "namespace" not in unknown[0].obj["metadata"]
    assert namespaced[0].obj["metadata"]["namespace"] == "ns"


def test_the_render_cache_is_bounded(upstream, cache):
    commit(upstream, {f"apps/{n}/cm.yaml": configmap(n, {"v": "1"}) for n in "abc"})
    renders = Renders(max_entries=2)
    checkout = fetch(upstream, cache)

    for n in "abca":
        renders.render(checkout, f"apps/{n}")

    assert renders.results == ["miss", "miss", "miss", "miss"]   # a went out first, for c
    assert len(renders) == 2


# --------------------------------------------------------------------------
# the poll schedule: one job per repository (pure logic: fake runners, a fake clock)


class FakeRunner:
    """What the schedule reads of an AppRunner, and the triggers it received."""

    def __init__(self, name: str, repo: str, *, interval: float, ref: str = "main") -> None:
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(name=name, key=name, repo=repo, ref=ref, interval=interval, self_heal=True)
        self.running, self.current_sha, self.last_applied = False, None, None
        self.triggered: list[tuple[str, str | None]] = []

    def trigger(self, reason: str, *, sha: str | None = None) -> None:
        self.triggered.append((reason, sha))


class Refreshes(SharedFetches):
    def __init__(self, cache_dir: Path) -> None:
        super().__init__(cache_dir=cache_dir)
        self.refreshed: list[tuple[str, str]] = []

    def refresh(self, url: str, ref: str) -> float:
        self.refreshed.append((url, ref))
        return super().refresh(url, ref)


@pytest.fixture
def clock(monkeypatch):
    from gitopsd.daemon import triggers

    now = [1000.0]
    monkeypatch.setattr(triggers.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def refreshes(tmp_path) -> Refreshes:
    return Refreshes(tmp_path)


@pytest.fixture
def schedule(refreshes, clock):
    """A started Schedule (its jobs' first runs are far off; the tests run them by hand)."""
    from gitopsd.daemon.triggers import Schedule

    started = Schedule(threading.Event(), fetches=refreshes)
    started.start()
    yield started
    started.shutdown()


def jobs(schedule) -> dict[str, object]:
    return {j.id: j for j in schedule.scheduler.get_jobs()}


def run_polls(schedule) -> None:
    for job in jobs(schedule).values():
        if job.id.startswith("poll-"):
            job.func(*job.args)


def test_apps_of_one_repository_share_one_poll_job_at_the_shortest_interval(schedule, refreshes, clock):
    fetches = refreshes
    fast, slow = FakeRunner("fast", "file:///r/mono.git", interval=60), FakeRunner("slow", "file:///r/mono.git",
                                                                                  interval=300)
    other = FakeRunner("other", "file:///r/other.git", interval=60)
    for r in (fast, slow, other):
        schedule.poll(r)

    polls = [j for j in jobs(schedule).values() if j.id.startswith("poll-")]
    assert sorted(j.trigger.interval.total_seconds() for j in polls) == [60, 60]

    for minute in range(1, 6):   # five runs of the shared job, a minute apart
        clock[0] += 60
        run_polls(schedule)

    assert len(fast.triggered) == 5 and len(other.triggered) == 5
    assert slow.triggered == [("poll", None)]   # its own interval, on the job of its repository
    assert sorted(set(fetches.refreshed)) == [("file:///r/mono.git", "main"), ("file:///r/other.git", "main")]
    assert len(fetches.refreshed) == 10         # each repository once per run, however many apps it has


def test_a_removed_app_leaves_its_repository_and_the_last_one_out_ends_the_job(schedule):
    a, b = FakeRunner("a", "file:///r/mono.git", interval=60), FakeRunner("b", "file:///r/mono.git", interval=30)
    schedule.poll(a)
    schedule.poll(b)
    [job] = jobs(schedule).values()
    assert job.trigger.interval.total_seconds() == 30

    schedule.remove("b")
    [job] = jobs(schedule).values()
    assert job.trigger.interval.total_seconds() == 60   # back to the interval of the app left
    schedule.remove("a")
    assert jobs(schedule) == {}


def fake_checkout(sha: str):
    from types import SimpleNamespace

    return SimpleNamespace(revision=SimpleNamespace(sha=sha), git_dir=None)


def test_a_new_commit_wakes_the_apps_of_the_repository_that_have_not_seen_it(schedule):
    """Without a render cache every app's inputs are unknown: each that has not seen the commit is woken."""
    idle, deploying_old, not_fetched_yet, fetched_it, done_with_it, has_it = (
        FakeRunner(n, "file:///r/mono.git", interval=3600)
        for n in ("idle", "deploying-old", "not-fetched-yet", "fetched-it", "done-with-it", "has-it"))
    idle.current_sha = idle.last_applied = "old"
    deploying_old.running, deploying_old.current_sha = True, "old"
    not_fetched_yet.running = True   # woken before the last refresh: it may be waiting on an older fetch
    fetched_it.running, fetched_it.current_sha = True, "new"
    done_with_it.current_sha, done_with_it.last_applied = "new", "old"   # unchanged by it: its revision stays
    has_it.last_applied = "new"
    pushed = FakeRunner("pushed", "file:///r/mono.git", interval=3600)   # woken since the last refresh
    pushed.running, pushed.current_sha = True, "old"                    # queued: its run has not begun
    elsewhere = FakeRunner("elsewhere", "file:///r/other.git", interval=3600)
    for r in (idle, deploying_old, not_fetched_yet, fetched_it, done_with_it, has_it, pushed, elsewhere):
        schedule.poll(r)
    schedule.wake([pushed], "config")

    schedule.commits.on_new_commit("file:///r/mono.git", "main", fake_checkout("new"))

    assert idle.triggered == deploying_old.triggered == not_fetched_yet.triggered == [("poll", "new")]
    assert pushed.triggered == [("config", None)]   # once
    assert not any(r.triggered for r in (fetched_it, done_with_it, has_it, elsewhere))
    schedule.commits.on_new_commit("file:///r/mono.git", "main", fake_checkout("new"))
    assert idle.triggered == [("poll", "new")]        # woken in this generation already


# --------------------------------------------------------------------------
# the daemon: fifty apps on one repository

APPS = 50


def monorepo(repo, tmp_path, namespace: str, *, interval: str) -> Path:
    for n in range(APPS):
        repo.write(f"apps/app-{n:02d}/cm.yaml", configmap(f"app-{n:02d}", {"value": "0"}))
    repo.commit("fifty apps")
    return write_config(tmp_path / "config.yaml", [
        {"name": f"app-{n:02d}", "repo": repo.url, "ref": "main", "path": f"apps/app-{n:02d}",
         "namespace": namespace, "interval": interval} for n in range(APPS)])


def all_applied(kube, namespace: str, value: str = "0") -> bool:
    cms = kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace)
    return sum(1 for cm in cms if cm["metadata"]["name"].startswith("app-")
               and (cm.get("data") or {}).get("value") == value) == APPS


def idle(daemon) -> bool:
    status = json.loads(daemon.get("/status")[1])
    return len(status["apps"]) == APPS and not any(a["running"] for a in status["apps"])


@pytest.mark.cluster
def test_fifty_apps_on_one_repository_cost_one_fetch_per_poll(repo, kube, namespace, tmp_path, start_daemon):
    daemon = start_daemon(monorepo(repo, tmp_path, namespace, interval="5s"), "--no-leader-elect",
                          "--no-watch-local")
    wait_for("first sync of fifty apps", lambda: all_applied(kube, namespace), 120, 0.5)

    def polls() -> float:
        return metric(daemon, "gitopsd_reconcile_total", trigger="poll")

    start_polls, start_fetches = polls(), metric(daemon, "gitopsd_git_fetches_total")
    wait_for("three rounds of polls", lambda: polls() >= start_polls + 3 * APPS, 90, 0.5)
    rounds = (polls() - start_polls) / APPS
    fetches = metric(daemon, "gitopsd_git_fetches_total") - start_fetches

    assert rounds >= 3
    assert 1 <= fetches <= rounds + 1, (fetches, rounds)   # one per round; the last may have begun meanwhile


@pytest.mark.cluster
def test_a_push_costs_one_fetch_and_one_reconcile_and_is_a_transition_of_the_changed_app_only(
        repo, kube, namespace, tmp_path, start_daemon):
    daemon = start_daemon(monorepo(repo, tmp_path, namespace, interval="1h"), "--no-leader-elect",
                          "--no-watch-local")
    wait_for("first sync of fifty apps", lambda: all_applied(kube, namespace), 120, 0.5)
    wait_for("the first reconciles to end", lambda: idle(daemon), 60)
    first = json.loads(daemon.get("/status")[1])["apps"][0]["revision"]
    fetches, reconciles = metric(daemon, "gitopsd_git_fetches_total"), metric(daemon, "gitopsd_reconcile_total")
    renders = {r: metric(daemon, "gitopsd_render_cache_total", result=r) for r in ("hit", "miss")}

    repo.write("apps/app-07/cm.yaml", configmap("app-07", {"value": "1"}))
    sha = repo.commit("one line in one app")
    code, body = post_generic(daemon, repo.url, sha)
    assert code == 202 and len(json.loads(body)["triggered"]) == APPS   # routed to every app of the repository
    wait_for("the change applied", lambda: (kube.get(kube.resource("v1", "ConfigMap"), "app-07", namespace)
                                            or {}).get("data") == {"value": "1"}, 30, 0.05)
    wait_for("its reconcile counted",
             lambda: metric(daemon, "gitopsd_reconcile_total", trigger="webhook") >= 1, 60, 0.2)
    wait_for("the reconciles to end", lambda: idle(daemon), 60)

    assert metric(daemon, "gitopsd_git_fetches_total") - fetches == 1
    assert metric(daemon, "gitopsd_reconcile_total") - reconciles == 1, (   # the app the commit concerns
        metric_text(daemon, "gitopsd_reconcile_total"))
    assert metric(daemon, "gitopsd_render_cache_total", result="miss") - renders["miss"] == 1
    assert metric(daemon, "gitopsd_render_cache_total", result="hit") - renders["hit"] == 0
    revisions = {a["app"]: a["revision"] for a in json.loads(daemon.get("/status")[1])["apps"]}
    assert revisions.pop("app-07") == sha
    assert set(revisions.values()) == {first}   # the push did not change what they run: no new revision
    recorded = [e["app"] for e in daemon.events() if e.get("event") == "audit" and e.get("revision") == sha]
    assert recorded == ["app-07"]


@pytest.mark.cluster
def test_a_new_commit_found_by_one_apps_poll_wakes_the_other_apps_of_its_repository(
        repo, kube, namespace, tmp_path, start_daemon):
    for app in ("fast", "slow"):
        repo.write(f"{app}/cm.yaml", configmap(app, {"value": "0"}))
    repo.commit("two apps")
    config = write_config(tmp_path / "config.yaml", [
        {"name": app, "repo": repo.url, "ref": "main", "path": app, "namespace": namespace, "interval": interval}
        for app, interval in (("fast", "5s"), ("slow", "1h"))])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")
    wait_for("first sync", lambda: all(cm_value(kube, namespace, app) == "0" for app in ("fast", "slow")), 60)

    repo.write("slow/cm.yaml", configmap("slow", {"value": "1"}))
    sha = repo.commit("a change to the app polled hourly")   # no webhook

    wait_for("the hourly app deployed by its sibling's poll", lambda: cm_value(kube, namespace, "slow") == "1", 30)
    woke = daemon.wait_event(lambda e: e.get("event") == "new commit: woke the apps it concerns",
                             "the wake-up", 5)
    assert woke["triggered"] == ["slow"] and woke["revision"] == sha[:12]


def cm_value(kube, namespace: str, name: str) -> str | None:
    obj = kube.get(kube.resource("v1", "ConfigMap"), name, namespace)
    return None if obj is None else (obj.get("data") or {}).get("value")


@pytest.mark.cluster
def test_with_self_heal_off_a_commit_to_another_app_is_still_a_new_revision(
        repo, kube, namespace, tmp_path, start_daemon):
    """The hold on hand edits ends with the next commit, whichever app it changes: a restarted
    daemon knows only the recorded revision, so the rule must not depend on the render cache."""
    for app in ("held", "other"):
        repo.write(f"{app}/cm.yaml", configmap(app, {"value": "0"}))
    first = repo.commit("two apps")
    config = write_config(tmp_path / "config.yaml", [
        {"name": app, "repo": repo.url, "ref": "main", "path": app, "namespace": namespace, "interval": "1h",
         "selfHeal": app != "held"} for app in ("held", "other")])
    daemon = start_daemon(config, "--no-leader-elect", "--no-watch-local")
    wait_for("first sync", lambda: all(cm_value(kube, namespace, app) == "0" for app in ("held", "other")), 60)
    cms = kube.resource("v1", "ConfigMap")
    live = kube.get(cms, "held", namespace)
    live["data"]["value"] = "by hand"
    kube.request("PUT", cms.path(namespace, "held"), body=live)
    daemon.wait_event(lambda e: e.get("event") == "drift detected" and e.get("app") == "held", "drift reported")

    repo.write("other/cm.yaml", configmap("other", {"value": "1"}))
    sha = repo.commit("a change to the other app")
    post_generic(daemon, repo.url, sha)

    wait_for("the hand edit reverted by the new commit", lambda: cm_value(kube, namespace, "held") == "0", 30)
    wait_for("both apps at the new revision", lambda: {a["app"]: a["revision"] for a in json.loads(
        daemon.get("/status")[1])["apps"]} == {"held": sha, "other": sha}, 30)
    assert first != sha


def metric_text(daemon, name: str) -> str:
    """The samples of `name` that are not zero, for an assertion message."""
    return "\n".join(line for line in daemon.get("/metrics")[1].splitlines()
                     if line.startswith(name + "{") and not line.endswith(" 0.0"))
