"""Release control (issue 11): automatic rollback, quarantine, hold / resume / rollback from the CLI.

The decisions are pure logic (gitopsd.daemon.release.ReleaseControl) and are
tested as such first; then the real thing: a daemon on the real control
plane, real Deployments, real git commits and the real CLI.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import pytest
from helpers import (
    app_entry,
    cm_data,
    configmap,
    deployment,
    metric,
    post_generic,
    release_cli,
    transitions,
    wait_for,
    wait_transition,
    write_config,
)

from gitopsd import audit
from gitopsd.daemon import status as status_mod
from gitopsd.daemon.release import (
    AUTOMATIC,
    FOLLOWING,
    HELD,
    ROLLED_BACK,
    ROLLING_BACK,
    Release,
    ReleaseControl,
    Request,
    request_name,
)
from gitopsd.engine.source import Revision
from gitopsd.engine.sync import Outcome, SyncResult

GOOD, BAD, NEWER, OLDER = "a" * 40, "b" * 40, "c" * 40, "d" * 40


def _rev(sha: str) -> Revision:
    return Revision(url="file:///r.git", ref="main", sha=sha, author="A <a@x>", committer="A <a@x>",
                    message="m", time=datetime.now(timezone.utc))


def _ran(control: ReleaseControl, seen: str, outcome: Outcome, *, auto: bool = True,
         healthy: dict[frozenset, str | None] | None = None):
    """One run: the app's revision is `seen`; it deploys what the control picks; the outcome is given."""
    deployed = control.pick(_rev(seen)) or seen
    result = SyncResult(app="web", outcome=outcome, revision=_rev(deployed), reason="the rollout timed out")
    return deployed, control.after(result, auto=auto, last_healthy=lambda besides: GOOD if GOOD not in besides
                                   else None)


# ---------------------------------------------------------------- the decisions (pure logic)

def test_an_unhealthy_revision_is_quarantined_and_the_last_healthy_one_picked():
    control = ReleaseControl("web")
    _, verdict = _ran(control, GOOD, Outcome.APPLIED)
    assert not verdict.roll_back and control.state.state == FOLLOWING
    _, verdict = _ran(control, BAD, Outcome.UNHEALTHY)
    assert verdict.roll_back
    assert control.state.state == ROLLING_BACK and control.state.revision == GOOD
    assert control.state.quarantined == BAD and control.state.by == AUTOMATIC
    assert verdict.release["from"] == BAD and verdict.release["revision"] == GOOD   # the Unhealthy record says so
    deployed, verdict = _ran(control, BAD, Outcome.APPLIED)   # the rollback run: the ref still points at BAD
    assert deployed == GOOD and verdict.result == "RolledBack"
    assert verdict.release["quarantined"] == BAD and control.state.state == ROLLED_BACK


def test_a_quarantined_commit_is_not_applied_again_until_a_newer_one_arrives():
    control = ReleaseControl("web")
    control.state = Release(state=ROLLED_BACK, revision=GOOD, quarantined=BAD, rolled_back_from=BAD, by=AUTOMATIC)
    for _ in range(5):   # polls and webhooks replaying the bad commit
        deployed, verdict = _ran(control, BAD, Outcome.NO_CHANGE)
        assert deployed == GOOD and verdict.result is None and not verdict.roll_back
    deployed, verdict = _ran(control, NEWER, Outcome.APPLIED)
    assert deployed == NEWER and control.state.state == FOLLOWING and control.state.quarantined is None


def test_a_newer_commit_after_a_quarantine_that_is_unhealthy_too_is_rolled_back_again():
    control = ReleaseControl("web")
    control.state = Release(state=ROLLED_BACK, revision=GOOD, quarantined=BAD, rolled_back_from=BAD, by=AUTOMATIC)
    deployed, verdict = _ran(control, NEWER, Outcome.UNHEALTHY)
    assert deployed == NEWER and verdict.roll_back
    assert control.state.state == ROLLING_BACK and control.state.quarantined == NEWER
    assert control.state.revision == GOOD


def test_a_rollback_target_that_is_unhealthy_too_stays_and_is_not_rolled_back_again():
    control = ReleaseControl("web")
    _ran(control, GOOD, Outcome.APPLIED)
    _ran(control, BAD, Outcome.UNHEALTHY)
    deployed, verdict = _ran(control, BAD, Outcome.UNHEALTHY)
    assert deployed == GOOD and verdict.result is None and not verdict.roll_back
    assert control.state.state == ROLLED_BACK and "no rollback of a rollback" in control.state.reason
    deployed, verdict = _ran(control, BAD, Outcome.UNHEALTHY)
    assert deployed == GOOD and not verdict.roll_back


def test_without_on_unhealthy_an_unhealthy_revision_stays():
    control = ReleaseControl("web")
    deployed, verdict = _ran(control, BAD, Outcome.UNHEALTHY, auto=False)
    assert deployed == BAD and not verdict.roll_back and verdict.release is None
    assert control.state == Release() and control.state.to_status() == {}


def test_no_healthy_revision_means_no_rollback():
    control = ReleaseControl("web")
    result = SyncResult(app="web", outcome=Outcome.UNHEALTHY, revision=_rev(BAD))
    verdict = control.after(result, auto=True, last_healthy=lambda besides: None)
    assert not verdict.roll_back and control.state.state == FOLLOWING


def test_a_hold_request_keeps_the_revision_and_notes_each_new_commit_once():
    control = ReleaseControl("web")
    assert control.requested(Request(action="hold", by="cli/ann@laptop", revision=GOOD))
    assert control.take(live=GOOD, last_healthy=lambda besides: None)[1] is None
    assert control.state.state == HELD and control.state.revision == GOOD and control.state.by == "cli/ann@laptop"
    deployed, verdict = _ran(control, NEWER, Outcome.NO_CHANGE)
    assert deployed == GOOD and verdict.held.sha == NEWER
    deployed, verdict = _ran(control, NEWER, Outcome.NO_CHANGE)
    assert deployed == GOOD and verdict.held is None   # recorded once, not at every poll
    assert control.requested(Request(action="resume", by="cli/ann@laptop"))
    control.take(live=GOOD, last_healthy=lambda besides: None)
    deployed, _ = _ran(control, NEWER, Outcome.APPLIED)
    assert deployed == NEWER and control.state.state == FOLLOWING


def test_a_rollback_request_goes_back_and_holds_there():
    control = ReleaseControl("web")
    control.requested(Request(action="rollback", by="cli/ann@laptop", revision=OLDER))
    control.take(live=GOOD, last_healthy=lambda besides: None)
    assert control.state.state == ROLLING_BACK and control.state.hold_after
    deployed, verdict = _ran(control, GOOD, Outcome.APPLIED)
    assert deployed == OLDER and verdict.result == "RolledBack" and verdict.release["from"] == GOOD
    assert control.state.state == HELD and control.state.revision == OLDER
    deployed, _ = _ran(control, NEWER, Outcome.NO_CHANGE)
    assert deployed == OLDER


def test_a_request_is_acted_on_once():
    control = ReleaseControl("web")
    request = Request(action="hold", by="cli/ann@laptop", revision=GOOD)
    assert control.requested(request)
    assert control.take(live=GOOD, last_healthy=lambda besides: None) == (request, None)
    assert not control.requested(request)        # the watch delivers it again (a relist): ignored
    restored = ReleaseControl("web")
    restored.restore({"release": control.state.to_status()})   # a new leader reads the status back
    assert restored.state == control.state and not restored.requested(request)


def test_a_request_that_cannot_be_done_says_why_and_is_consumed():
    control = ReleaseControl("web")
    request = Request(action="rollback", by="cli/ann@laptop")
    control.requested(request)
    taken, refused = control.take(live=BAD, last_healthy=lambda besides: None)
    assert taken == request and "no revision recorded Applied and Healthy" in str(refused)
    assert control.state.state == FOLLOWING and control.state.request == request.id
    assert control.take(live=BAD, last_healthy=lambda besides: None) == (None, None)
    assert not control.requested(request)


def test_the_release_state_survives_a_round_trip_through_the_status_and_refuses_garbage():
    state = Release(state=ROLLED_BACK, revision=GOOD, quarantined=BAD, rolled_back_from=BAD, by=AUTOMATIC,
                    reason="why", since="2026-12-01T00:00:00Z", request="r1")
    assert Release.from_status(state.to_status()) == state
    assert Release.from_status({"state": "sideways", "revision": GOOD}) == Release()
    assert Release.from_status({"state": HELD}) == Release()              # held at nothing
    assert Release.from_status({"state": HELD, "revision": 7}) == Release()
    assert Release.from_status("held") == Release()


def test_a_request_read_from_the_cluster_is_checked():
    good = Request(action="rollback", by="cli/a@b", revision=GOOD)
    assert Request.from_json(good.to_json()) == good
    for raw, why in (("{", "not JSON"), ("[]", "not a JSON object"),
                     ('{"action": "delete", "by": "x", "id": "1", "at": "t"}', "action must be one of"),
                     ('{"action": "hold", "by": "", "id": "1", "at": "t"}', "'by' must be"),
                     ('{"action": "hold", "by": "x", "id": "1", "at": "t", "revision": "main"}', "full commit SHA")):
        with pytest.raises(ValueError, match=why):
            Request.from_json(raw)
    assert "." in request_name("web")   # never an app's parent (gitopsd-web) or a segment


def test_the_status_table_shows_held_and_rolled_back_apps():
    rows = [{"app": "web", "result": "Applied", "health": "Healthy", "revision": GOOD,
             "release": Release(state=ROLLED_BACK, revision=GOOD, quarantined=BAD, rolled_back_from=BAD,
                                by=AUTOMATIC).to_status()},
            {"app": "api", "result": "Applied", "health": "Healthy", "revision": OLDER,
             "release": Release(state=HELD, revision=OLDER, by="cli/ann@laptop").to_status()}]
    text = status_mod.table(rows)
    assert f"rolled back {BAD[:8]}->{GOOD[:8]}, {BAD[:8]} quarantined by gitopsd" in text
    assert f"held at {OLDER[:8]} by cli/ann@laptop" in text


# ---------------------------------------------------------------- the real control plane

def _stuck(name: str) -> dict:
    """A Deployment whose pods can never be scheduled: it never becomes available (health times out)."""
    obj = deployment(name)
    obj["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    return obj


def _template(kube, namespace: str, name: str) -> dict:
    live = kube.get(kube.resource("apps/v1", "Deployment"), name, namespace)
    return live["spec"]["template"]["spec"]


def _records(kube, namespace: str, app: str, result: str) -> list[dict]:
    return [r for r in audit.history(kube, namespace=namespace, app=app)
            if r.get("type") == "transition" and r.get("result") == result]


@pytest.fixture
def rolling_app(repo, kube, namespace, tmp_path, start_daemon):
    """An app with automatic rollback, its first (good) commit Applied and Healthy."""
    name = f"rb-{namespace[-6:]}"
    repo.write("web.yaml", deployment("web"))
    repo.write("settings.yaml", configmap("settings", {"v": "1"}))
    good = repo.commit("good")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="20s",
                                                               interval="5s", rollback={"onUnhealthy": True})])
    daemon = start_daemon(config)
    wait_transition(daemon, "the good commit Applied and Healthy", 60, app=name, result="Applied", revision=good)
    return name, daemon, good


@pytest.mark.cluster
def test_a_commit_that_never_becomes_healthy_is_rolled_back_and_what_it_added_is_pruned(
        rolling_app, repo, kube, namespace):
    name, daemon, good = rolling_app
    repo.write("web.yaml", _stuck("web"))
    repo.write("extra.yaml", configmap("added-by-bad", {"x": "1"}))
    bad = repo.commit("bad: unschedulable")
    post_generic(daemon, repo.url, bad)

    unhealthy = wait_transition(daemon, "the bad commit Unhealthy", 90, app=name, result="Unhealthy", revision=bad)
    assert unhealthy["release"]["state"] == ROLLING_BACK and unhealthy["release"]["by"] == AUTOMATIC
    rolled = wait_transition(daemon, "RolledBack", 90, app=name, result="RolledBack")
    assert rolled["revision"] == good and rolled["previous"] == bad and rolled["trigger"] == "rollback"
    assert rolled["release"]["quarantined"] == bad and rolled["release"]["from"] == bad
    assert rolled["release"]["by"] == AUTOMATIC and "ended Unhealthy" in rolled["release"]["reason"]
    assert rolled["health"]["outcome"] == "Healthy"
    assert metric(daemon, "gitopsd_release_decisions_total", app=name, action="rollback", by="gitopsd") == 1
    assert {o["name"]: o["action"] for o in rolled["plan"]["objects"]}.get("added-by-bad") == "pruned"
    assert cm_data(kube, namespace, "added-by-bad") is None
    assert "nodeSelector" not in _template(kube, namespace, "web")
    stored = status_mod.read_all(kube, namespace=namespace, app=name)[0]
    assert stored["release"]["state"] == ROLLED_BACK and stored["release"]["quarantined"] == bad
    # The stored trail says the same as the log.
    assert _records(kube, namespace, name, "RolledBack")[0]["release"]["quarantined"] == bad


@pytest.mark.cluster
def test_a_quarantined_commit_is_not_reapplied_by_polls_webhooks_or_self_heal_and_a_fix_deploys(
        rolling_app, repo, kube, namespace):
    name, daemon, good = rolling_app
    repo.write("web.yaml", _stuck("web"))
    bad = repo.commit("bad")
    post_generic(daemon, repo.url, bad)
    wait_transition(daemon, "RolledBack", 120, app=name, result="RolledBack")

    # Five polls and a webhook look at the ref, which still points at the bad commit.
    before = metric(daemon, "gitopsd_reconcile_total", app=name, trigger="poll")
    wait_for("five polls", lambda: metric(daemon, "gitopsd_reconcile_total", app=name, trigger="poll")
             >= before + 5, 90)
    before = metric(daemon, "gitopsd_reconcile_total", app=name, trigger="webhook")
    post_generic(daemon, repo.url, bad)
    wait_for("the webhook's reconcile", lambda: metric(daemon, "gitopsd_reconcile_total", app=name,
                                                         trigger="webhook") > before, 30)
    deployments = kube.resource("apps/v1", "Deployment")
    live = kube.get(deployments, "web", namespace)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:hand-edit"
    kube.request("PUT", deployments.path(namespace, "web"), body=live, query={"fieldManager": "kubectl-edit"})
    wait_for("self-heal puts the good revision back", lambda: _template(kube, namespace, "web")
             ["containers"][0]["image"] == "nginx:1.27", 30)
    assert "nodeSelector" not in _template(kube, namespace, "web")
    assert not [t for t in transitions(daemon, name) if t["revision"] == bad and t["result"] == "Applied"]

    repo.write("web.yaml", deployment("web", image="nginx:1.28"))
    fix = repo.commit("fix")
    post_generic(daemon, repo.url, fix)
    applied = wait_transition(daemon, "the fix Applied", 60, app=name, result="Applied", revision=fix)
    assert applied["health"]["outcome"] == "Healthy"
    assert _template(kube, namespace, "web")["containers"][0]["image"] == "nginx:1.28"
    wait_for("the status follows the ref again", lambda: status_mod.read_all(
        kube, namespace=namespace, app=name)[0].get("release", {}).get("state") == FOLLOWING, 30)


@pytest.mark.cluster
def test_without_on_unhealthy_an_unhealthy_commit_stays_live(repo, kube, namespace, tmp_path, start_daemon):
    name = f"norb-{namespace[-6:]}"
    repo.write("web.yaml", deployment("web"))
    good = repo.commit("good")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="5s")])
    daemon = start_daemon(config)
    wait_transition(daemon, "good Applied", 60, app=name, result="Applied", revision=good)
    repo.write("web.yaml", _stuck("web"))
    bad = repo.commit("bad")
    post_generic(daemon, repo.url, bad)
    unhealthy = wait_transition(daemon, "bad Unhealthy", 60, app=name, result="Unhealthy", revision=bad)
    assert "release" not in unhealthy
    assert _template(kube, namespace, "web").get("nodeSelector")
    assert not _records(kube, namespace, name, "RolledBack")


@pytest.fixture
def v1_app(repo, namespace, tmp_path, start_daemon):
    """An app of one ConfigMap (settings v=1), its first commit Applied by a running daemon:
    (name, daemon, first commit, config file)."""
    name = f"rel-{namespace[-6:]}"
    repo.write("settings.yaml", configmap("settings", {"v": "1"}))
    first = repo.commit("v1")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace)])
    daemon = start_daemon(config)
    wait_transition(daemon, "v1 Applied", 60, app=name, result="Applied", revision=first)
    return name, daemon, first, config


@pytest.mark.cluster
def test_rollback_to_an_older_commit_holds_there_pushes_are_recorded_and_resume_applies_the_newest(
        v1_app, repo, kube, kubeconfig, namespace):
    name, daemon, first, _ = v1_app
    repo.write("settings.yaml", configmap("settings", {"v": "2"}))
    second = repo.commit("v2")
    post_generic(daemon, repo.url, second)
    wait_transition(daemon, "v2 Applied", 60, app=name, result="Applied", revision=second)

    done = release_cli(kubeconfig, namespace, "rollback", name, "--to", first[:10], "-o", "json")
    assert done.returncode == 0, done.stderr
    rolled = wait_transition(daemon, "RolledBack", 30, app=name, result="RolledBack")
    assert rolled["revision"] == first and rolled["previous"] == second and rolled["trigger"] == "release"
    assert rolled["release"]["by"].startswith("cli/") and rolled["release"]["state"] == HELD
    assert cm_data(kube, namespace, "settings") == {"v": "1"}
    (asked,) = [r for r in audit.history(kube, namespace=namespace, app=name) if r["type"] == "release"]
    assert asked["action"] == "rollback" and asked["revision"] == first and asked["by"].startswith("cli/")
    assert asked["state"]["state"] == ROLLING_BACK and asked["seq"] < rolled["seq"] and asked["error"] is None

    repo.write("settings.yaml", configmap("settings", {"v": "3"}))
    third = repo.commit("v3")
    post_generic(daemon, repo.url, third)
    held = wait_transition(daemon, "v3 recorded Held", 30, app=name, result="Held", revision=third)
    assert held["previous"] == first and held["written"] == 0
    assert cm_data(kube, namespace, "settings") == {"v": "1"}
    table = subprocess.run([sys.executable, "-m", "gitopsd", "status", name, "--namespace", namespace,
                            "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=60)
    assert f"held at {first[:8]} by cli/" in table.stdout, table.stdout + table.stderr

    resumed = release_cli(kubeconfig, namespace, "resume", name)
    assert resumed.returncode == 0, resumed.stderr
    wait_transition(daemon, "v3 Applied after resume", 30, app=name, result="Applied", revision=third)
    assert cm_data(kube, namespace, "settings") == {"v": "3"}


@pytest.mark.cluster
def test_a_hold_without_a_running_daemon_is_acted_on_when_one_starts(
        v1_app, repo, kube, kubeconfig, namespace, start_daemon):
    name, daemon, first, config = v1_app
    daemon.stop()

    asked = release_cli(kubeconfig, namespace, "hold", name, wait="0")
    assert asked.returncode == 1 and "stays stored" not in asked.stderr   # --wait 0: asked, not waited for
    repo.write("settings.yaml", configmap("settings", {"v": "2"}))
    second = repo.commit("v2")
    again = start_daemon(config, name="daemon2")
    held = wait_transition(again, "v2 recorded Held", 60, app=name, result="Held", revision=second)
    assert held["release"]["revision"] == first
    assert cm_data(kube, namespace, "settings") == {"v": "1"}


@pytest.mark.cluster
def test_rollback_with_no_healthy_revision_says_so(v1_app, kube, kubeconfig, namespace):
    name, _, _, _ = v1_app
    refused = release_cli(kubeconfig, namespace, "rollback", name)   # refused by the CLI: nothing is stored
    assert refused.returncode == 2
    assert "no revision recorded Applied and Healthy" in refused.stderr and "--to" in refused.stderr
    assert kube.get(kube.resource("v1", "ConfigMap"), request_name(name), namespace) is None


@pytest.mark.cluster
def test_a_rollback_cut_short_by_the_leaders_death_is_finished_by_the_new_leader(
        repo, kube, namespace, tmp_path, start_daemon):
    import signal

    name = f"ha-{namespace[-6:]}"
    lease = ("--lease-duration", "3", "--lease-renew", "1", "--no-watch-local")
    # minReadySeconds: the good revision takes seconds to become available again, the window
    # in which the leader dies with the rollback decided and (partly) applied, not yet recorded.
    repo.write("web.yaml", deployment("web", minReadySeconds=4))
    good = repo.commit("good")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="15s",
                                                               rollback={"onUnhealthy": True})])
    a = start_daemon(config, *lease, name="replica-a")
    wait_transition(a, "good Applied", 60, app=name, result="Applied", revision=good)
    b = start_daemon(config, *lease, name="replica-b")
    repo.write("web.yaml", _stuck("web"))
    bad = repo.commit("bad")
    post_generic(a, repo.url, bad)
    decided = wait_transition(a, "the rollback decided", 60, app=name, result="Unhealthy", revision=bad)
    a.stop(signal.SIGKILL)
    assert decided["release"]["state"] == ROLLING_BACK
    assert not [t for t in transitions(a, name) if t["result"] == "RolledBack"], "killed before it was done"

    rolled = wait_transition(b, "the new leader finishes the rollback", 60, app=name, result="RolledBack")
    assert rolled["instance"] == "replica-b" and rolled["revision"] == good and rolled["previous"] == bad
    assert rolled["health"]["outcome"] == "Healthy" and rolled["release"]["quarantined"] == bad
    assert "nodeSelector" not in _template(kube, namespace, "web")
    assert len(_records(kube, namespace, name, "RolledBack")) == 1


@pytest.mark.cluster
def test_a_commit_whose_image_crash_loops_is_rolled_back_on_the_early_verdict(
        repo, kube, namespace, tmp_path, start_daemon):
    """The real Deployment controller and KWOK's :crashloop stage: no waiting out the 5-minute timeout."""
    name = f"crash-{namespace[-6:]}"
    repo.write("web.yaml", deployment("web", replicas=2))
    good = repo.commit("good")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, timeout="5m",
                                                               rollback={"onUnhealthy": True})])
    daemon = start_daemon(config)
    wait_transition(daemon, "good Applied", 60, app=name, result="Applied", revision=good)
    repo.write("web.yaml", deployment("web", replicas=2, image="nginx:crashloop"))
    bad = repo.commit("bad: crash-looping image")
    post_generic(daemon, repo.url, bad)

    unhealthy = wait_transition(daemon, "the early verdict", 60, app=name, result="Unhealthy", revision=bad)
    assert "CrashLoopBackOff" in unhealthy["reason"] and unhealthy["duration_seconds"] < 60
    rolled = wait_transition(daemon, "RolledBack", 60, app=name, result="RolledBack")
    assert rolled["revision"] == good and rolled["previous"] == bad and rolled["health"]["outcome"] == "Healthy"
    assert _template(kube, namespace, "web")["containers"][0]["image"] == "nginx:1.27"


@pytest.mark.cluster
def test_rollback_to_a_commit_that_left_the_app_alone_is_done_at_that_commit(
        repo, kube, kubeconfig, namespace, tmp_path, start_daemon):
    """A monorepo: the commit named belongs to another app; the app's files as they were then are applied,
    and the rollback is recorded done, at the commit named."""
    name = f"mono-{namespace[-6:]}"
    repo.write("web/settings.yaml", configmap("settings", {"v": "1"}))
    first = repo.commit("web v1")
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, path="web")])
    daemon = start_daemon(config)
    wait_transition(daemon, "v1 Applied", 60, app=name, result="Applied", revision=first)
    repo.write("other/readme.txt", "another team's commit")
    elsewhere = repo.commit("other team")   # not a revision of the app: its files are as in v1
    repo.write("web/settings.yaml", configmap("settings", {"v": "2"}))
    second = repo.commit("web v2")
    post_generic(daemon, repo.url, second)
    wait_transition(daemon, "v2 Applied", 60, app=name, result="Applied", revision=second)

    done = release_cli(kubeconfig, namespace, "rollback", name, "--to", elsewhere)
    assert done.returncode == 0, done.stderr
    rolled = wait_transition(daemon, "RolledBack", 30, app=name, result="RolledBack")
    assert rolled["revision"] == elsewhere and rolled["previous"] == second
    assert cm_data(kube, namespace, "settings") == {"v": "1"}


@pytest.mark.cluster
def test_a_newer_commit_during_a_bad_rollout_supersedes_it_without_a_rollback(rolling_app, repo, kube, namespace):
    """The health wait cut short by a newer commit is no verdict: nothing is quarantined or rolled back."""
    name, daemon, good = rolling_app
    repo.write("web.yaml", _stuck("web"))
    bad = repo.commit("bad")
    post_generic(daemon, repo.url, bad)
    wait_for("the bad commit applied, its health wait running", lambda: any(
        e.get("event") == "audit" and e.get("revision") == bad for e in daemon.events())
        or _template(kube, namespace, "web").get("nodeSelector"), 30)
    repo.write("web.yaml", deployment("web", image="nginx:1.28"))
    fix = repo.commit("fix")
    post_generic(daemon, repo.url, fix)
    wait_transition(daemon, "the fix Applied", 60, app=name, result="Applied", revision=fix)
    assert not [t for t in transitions(daemon, name) if t["result"] == "RolledBack" or t.get("release")]
    assert status_mod.read_all(kube, namespace=namespace, app=name)[0].get("release") is None
