"""What one daemon keeps and answers per app, made cheap enough for 10,000 apps (issue 10).

Pure logic with fakes where no cluster is involved (the schedule's arithmetic, the
packing of desired objects, the metrics' text); a real daemon against the real
control plane for what users see (GET /status?summary, /metrics after a removal).
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from types import SimpleNamespace

import prometheus_client
import pytest
from helpers import app_entry, cm_data, configmap, wait_for, write_config

from gitopsd import metrics
from gitopsd.daemon.core import Daemon
from gitopsd.daemon.desired import DesiredState
from gitopsd.daemon.runner import NO_RUN, AppRunner
from gitopsd.engine.plan import Action, ObjectChange
from gitopsd.engine.source_share import SharedFetches
from gitopsd.objects import ref_of

# ------------------------------------------------------------------ status


class _ScheduledRunner:
    """What the schedule and the status read of an AppRunner."""

    def __init__(self, name: str, repo: str, *, interval: float) -> None:
        self.cfg = SimpleNamespace(name=name, key=name, repo=repo, ref="main", interval=interval)
        self.running, self.current_sha, self.last_applied = False, None, None

    def status(self) -> dict:
        return {"app": self.cfg.name}

    def trigger(self, reason: str, *, sha: str | None = None) -> None:
        pass


@pytest.fixture
def schedule(tmp_path, monkeypatch):
    from gitopsd.daemon import triggers

    monkeypatch.setattr(triggers.time, "monotonic", lambda: 1000.0)
    started = triggers.Schedule(threading.Event(), fetches=SharedFetches(cache_dir=tmp_path))
    started.start()
    yield started
    started.shutdown()


def test_status_of_many_apps_reads_each_repositorys_schedule_once(schedule, monkeypatch):
    runners = {}
    for repo in ("file:///r/a.git", "file:///r/b.git", "file:///r/c.git"):
        for i in range(100):
            r = _ScheduledRunner(f"{repo[-5]}-{i:03d}", repo, interval=60 if i else 300)
            runners[r.cfg.name] = r
            schedule.poll(r)
    jobs = {j.id: j.next_run_time for j in schedule.scheduler.get_jobs()}
    looked_up: list[str] = []
    get_job = schedule.scheduler.get_job
    monkeypatch.setattr(schedule.scheduler, "get_job", lambda job_id: looked_up.append(job_id) or get_job(job_id))
    daemon = SimpleNamespace(runners=runners, schedule=schedule, instance="i",
                             leadership=SimpleNamespace(status=lambda: {}, app_status=lambda name: {}),
                             clusters=SimpleNamespace(status=lambda: []))

    status = Daemon.status_json(daemon)

    assert len(status["apps"]) == 300
    assert sorted(looked_up) == sorted(jobs)   # once per repository, not once per app
    by_app = {row["app"]: row["nextRun"] for row in status["apps"]}
    (a_job,) = [t for job_id, t in jobs.items() if schedule._repos[("file:///r/a.git", "main")].job_id == job_id]
    # On its repository's next run (polled just now, the job a minute away at most) ...
    assert by_app["a-001"] == a_job.strftime("%Y-%m-%dT%H:%M:%SZ")
    # ... and the 5-minute app four runs later: 300 - 60/2 - (54..60 s ahead) needs 4 more minutes.
    assert by_app["a-000"] == (a_job + timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_status_summary_counts_apps_by_result_and_health(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("good/cm.yaml", configmap("good", {"k": "v"}))
    repo.write("also-good/cm.yaml", configmap("also-good", {"k": "v"}))   # an object of its own: never two owners
    repo.commit()
    cfg = write_config(tmp_path / "config.yaml", [
        app_entry("fine", repo.url, namespace, path="good"),
        app_entry("also-fine", repo.url, namespace, path="also-good", interval="2h"),
        app_entry("broken", "file:///nonexistent/repo.git", namespace),
    ])
    daemon = start_daemon(cfg, "--no-leader-elect")
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("app") == "broken"
                      and e.get("result") == "Failed", "broken app failed", 30)

    def summary() -> dict:
        code, body = daemon.get("/status?summary")
        assert code == 200
        return json.loads(body)["summary"]

    done = wait_for("both good apps Applied", lambda: summary()["results"].get("Applied", {}).get("Healthy") == 2
                    and summary(), 30)
    assert done["apps"] == 3
    assert done["results"]["Failed"] == {"Unknown": 1}
    rows = json.loads(daemon.get("/status")[1])["apps"]
    assert sum(sum(h.values()) for h in done["results"].values()) == len(rows)   # the same apps as the rows
    assert "apps" not in json.loads(daemon.get("/status?summary")[1])             # counts, no row per app


# ------------------------------------------------------------------ desired objects


def _change(obj: dict, *, action: Action = Action.UPDATE, source: str = "apps/cm.yaml") -> ObjectChange:
    return ObjectChange(ref=ref_of(obj), action=action, source=source, desired=obj, live={"stale": True})


def test_runner_desired_objects_come_back_exactly_after_packing():
    tricky = configmap("tricky", {"unicode": "grüße ✓", "quote": 'a"b\\c', "empty": ""},
                       annotations={"gitopsd.io/hash": "abc"})
    tricky["spec"] = {"f": 1.0, "g": 0.1, "n": None, "t": True, "i": -7, "big": 2 ** 63 - 1, "l": [1, [2, {}]]}
    plain = configmap("plain", {"k": "v"})
    pruned = configmap("gone", {"k": "v"})
    state = DesiredState.of([_change(tricky), _change(plain, source="apps/plain.yaml"),
                             _change(pruned, action=Action.PRUNE)])

    assert state.refs() == [ref_of(tricky), ref_of(plain)]          # not what the plan prunes
    back = state.get(ref_of(tricky))
    assert back == tricky and json.dumps(back) == json.dumps(tricky)  # 1.0 stays a float, order kept
    assert all(isinstance(kept, bytes) for kept, _ in state._kept.values())
    back["data"]["unicode"] = "changed by a caller"
    assert state.get(ref_of(tricky)) == tricky                       # each read is the caller's own copy
    assert [(m.obj, m.source) for m in state.manifests()] == [(tricky, "apps/cm.yaml"), (plain, "apps/plain.yaml")]
    assert state.get(ref_of(pruned)) is None and ref_of(pruned) not in state


def test_desired_object_json_cannot_hold_is_kept_as_it_is():
    huge = configmap("huge", {"k": "v"})
    huge["spec"] = {"n": 2 ** 70}    # beyond what orjson encodes exactly
    state = DesiredState.of([_change(huge)])
    assert state.get(ref_of(huge)) == huge and state.get(ref_of(huge)) is not huge


def test_the_next_desired_state_names_what_a_commit_changed_and_shares_the_rest():
    """What _watch judges again after a run: only objects whose desired state the run changed."""
    kept, edited, gone = configmap("kept", {"k": "v"}), configmap("edited", {"k": "v"}), configmap("gone", {"k": "v"})
    first = DesiredState.of([_change(kept), _change(edited), _change(gone)])
    now_edited, added = configmap("edited", {"k": "new"}), configmap("added", {"k": "v"})
    second = DesiredState.of([_change(kept), _change(now_edited), _change(added)], before=first)

    assert second.changed_since(first) == [ref_of(now_edited), ref_of(added)]
    assert second._kept[ref_of(kept)] is first._kept[ref_of(kept)]   # unchanged: kept once, not twice
    assert second.changed_since(second) == []
    assert DesiredState.of([_change(kept)]).changed_since(DesiredState()) == [ref_of(kept)]   # a runner's first run
    moved = DesiredState.of([_change(kept, source="apps/other.yaml")], before=first)
    assert moved.changed_since(first) == [ref_of(kept)]   # another file: judged again, to be sure


# ------------------------------------------------------------------ runner between runs


def test_idle_runner_keeps_no_cancel_event_of_its_own(monkeypatch):
    ran = []
    view = SimpleNamespace(stop=lambda: None)
    link = SimpleNamespace(informers=SimpleNamespace(view=lambda **kw: view), log_fields={})
    daemon = SimpleNamespace(namespace="gitopsd", clusters=SimpleNamespace(get=lambda name: link),
                             pool=SimpleNamespace(submit=lambda fn, *args, lane: fn(*args)), prometheus_url=None,
                             dependencies=SimpleNamespace(settled=lambda name: None))
    cfg = SimpleNamespace(name="idle", key="idle", target_cluster="in-cluster", repo="file:///r.git", ref="main")
    runner = AppRunner(daemon, cfg)
    assert runner.cancel is NO_RUN and runner.heal_cancel is NO_RUN
    monkeypatch.setattr(runner, "_reconcile", lambda reason: ran.append(runner.cancel))
    runner.trigger("poll")
    (during,) = ran
    assert isinstance(during, threading.Event) and during is not NO_RUN   # a run has its own to cancel
    assert runner.cancel is NO_RUN and not runner.running                # and lets go of it after
    runner.stop()   # nothing to cancel: fine
    assert not NO_RUN.is_set()


# ------------------------------------------------------------------ metrics


def _samples(name: str, app: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for m in metrics.REGISTRY.collect() for s in m.samples
            if s.name == name and s.labels.get("app") == app}


def test_reconcile_duration_reads_as_a_histogram_per_app():
    app = "histogram-check"
    for seconds in (0.3, 1.0, 1000.0):
        metrics.RECONCILE_DURATION.observe(app=app, value=seconds)
    buckets = {dict(k)["le"]: v for k, v in _samples("gitopsd_reconcile_duration_seconds_bucket", app).items()}
    assert buckets["0.25"] == 0 and buckets["0.5"] == 1 and buckets["1.0"] == 2   # le: at most the bound
    assert buckets["600.0"] == 2 and buckets["+Inf"] == 3
    assert _samples("gitopsd_reconcile_duration_seconds_count", app) == {(("app", app), ("cluster", "in-cluster")): 3.0}
    assert _samples("gitopsd_reconcile_duration_seconds_sum", app) == {(("app", app), ("cluster", "in-cluster")): 1001.3}
    text = prometheus_client.generate_latest(metrics.REGISTRY).decode()
    assert "# TYPE gitopsd_reconcile_duration_seconds histogram" in text
    assert f'gitopsd_reconcile_duration_seconds_bucket{{app="{app}",cluster="in-cluster",le="+Inf"}} 3.0' in text
    metrics.forget_app(app)
    assert _samples("gitopsd_reconcile_duration_seconds_count", app) == {}


def test_an_app_taken_out_of_the_config_leaves_no_metric_series(repo, kube, namespace, tmp_path, start_daemon):
    repo.write("a/cm.yaml", configmap("from-a", {"k": "a"}))
    repo.write("b/cm.yaml", configmap("from-b", {"k": "b"}))
    repo.commit()
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [app_entry("app-a", repo.url, namespace, path="a"),
                       app_entry("app-b", repo.url, namespace, path="b")])
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_for("both synced", lambda: cm_data(kube, namespace, "from-a") and cm_data(kube, namespace, "from-b"), 30)
    wait_for("app-a measured", lambda: 'app="app-a"' in daemon.get("/metrics")[1], 10)

    write_config(cfg, [app_entry("app-b", repo.url, namespace, path="b")])
    daemon.wait_event(lambda e: e.get("event") == "config reloaded" and e.get("removed") == ["app-a"],
                      "app-a removed", 10)
    text = daemon.get("/metrics")[1]
    assert 'app="app-a"' not in text
    assert 'gitopsd_reconcile_total{app="app-b",cluster="in-cluster"' in text and \
        'gitopsd_reconcile_duration_seconds_count{app="app-b",cluster="in-cluster"}' in text



def test_reconcile_counts_and_the_last_revision_read_as_before():
    app = "counter-check"
    metrics.RECONCILE_RESULTS.inc(app=app, trigger="poll", outcome="NoChange")
    metrics.RECONCILE_RESULTS.inc(app=app, trigger="poll", outcome="NoChange")
    metrics.RECONCILE_RESULTS.inc(app=app, trigger="webhook", outcome="Applied")
    metrics.LAST_APPLIED.set(app=app, value="a" * 40)
    metrics.LAST_APPLIED.set(app=app, value="b" * 40)   # a new revision replaces the old one's series
    text = prometheus_client.generate_latest(metrics.REGISTRY).decode()
    assert "# TYPE gitopsd_reconcile_total counter" in text
    assert f'gitopsd_reconcile_total{{app="{app}",cluster="in-cluster",outcome="NoChange",trigger="poll"}} 2.0' in text
    assert f'gitopsd_reconcile_total{{app="{app}",cluster="in-cluster",outcome="Applied",trigger="webhook"}} 1.0' \
        in text
    assert _samples("gitopsd_last_applied_revision_info", app) == \
        {(("app", app), ("cluster", "in-cluster"), ("revision", "b" * 40)): 1.0}
    metrics.forget_app(app)
    assert f'app="{app}"' not in prometheus_client.generate_latest(metrics.REGISTRY).decode()
