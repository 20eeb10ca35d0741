"""Real faults against the real CLI and daemon: components stopped, killed and
restarted, a Git remote removed, rewritten, slow or corrupt, credentials
revoked, the apiserver throttling, objects deleted under the daemon, a
tampered audit trail, a full or read-only disk.

Every case asserts what a user must be able to rely on: a clear error naming
what failed and why, nothing half-applied where it can be avoided, nothing
pruned by mistake (objects and resourceVersions compared before and after),
the daemon's HTTP port still answering, convergence once the fault is gone
(waited on an audit record, a log line or an object, never a fixed sleep),
an audit chain that verifies, and no Python traceback anywhere.

These tests stop and kill control-plane processes, so they run on a cluster
of their own (the `own_cluster` fixture), shared by this module; every test
puts back what it stopped (and an autouse fixture checks that it did).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import (SECRET, DaemonProcess, app_entry, assert_no_traceback, assert_serving, audit_events,
                     audit_verify, cm_data, configmap, configmaps, deployment, gitopsd, gitopsd_json,
                     post_generic, snapshot, wait_audit, wait_for, write_config)
from testbed import cluster as tb

pytestmark = pytest.mark.cluster

LEASE = ("--lease-duration", "3", "--lease-renew", "1", "--no-watch-local")
BIG = 150            # ConfigMaps in an app whose apply takes long enough to be interrupted
SILENCE = 4.0        # how long a paused component stays silent: longer than the 3 s lease
OUTAGE = 10          # seconds of revoked credentials over which the log is checked for a flood


# ---------------------------------------------------------------- the module's own cluster

@pytest.fixture(scope="module")
def cluster(own_cluster):
    return own_cluster


@pytest.fixture(scope="module")
def kubeconfig(own_kubeconfig):
    return own_kubeconfig


@pytest.fixture(scope="module")
def api_client(own_kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(own_kubeconfig))


@pytest.fixture(scope="module")
def kube(own_kube):
    return own_kube


@pytest.fixture(autouse=True)
def components_put_back(own_cluster):
    """Each test restores what it stopped; this proves it, and heals the cluster if it did not."""
    yield
    healed = tb.heal(own_cluster)
    assert not healed, f"the test left components stopped: {healed}"


@contextlib.contextmanager
def paused(cluster, component: str):
    """SIGSTOP `component` for the block; SIGCONT however the block ends."""
    tb.pause(cluster, component)
    try:
        yield
    finally:
        if tb.is_paused(cluster, component):
            tb.resume(cluster, component)


@contextlib.contextmanager
def killed(cluster, component: str):
    """SIGKILL `component` for the block; start it again (and wait until ready) however it ends."""
    tb.kill(cluster, component)
    try:
        yield
    finally:
        if not tb.is_running(cluster, component):
            tb.start_component(cluster, component)


class ApiLog:
    """The apiserver's own audit log from now on: every write that reached it, and who sent it."""

    def __init__(self, cluster) -> None:
        self.path = cluster.log("audit")
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self._seen: list[dict] = []

    def events(self) -> list[dict]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                self._seen.append(json.loads(line))
        return self._seen

    def writes(self, *, namespace: str | None = None, agent: str = "gitopsd/", resource: str | None = "configmaps",
               since: datetime | None = None) -> list[dict]:
        """Completed writes (not dry runs) by a user agent, optionally to one resource/namespace, after `since`."""
        out = []
        for e in self.events():
            ref = e.get("objectRef") or {}
            if ("dryRun" in e.get("requestURI", "") or agent not in e.get("userAgent", "")
                    or (namespace and ref.get("namespace") != namespace)
                    or (resource and ref.get("resource") != resource)
                    or (since and _ts(e["requestReceivedTimestamp"]) < since)):
                continue
            out.append(e)
        return out


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- shared steps

def sync_args(repo, namespace: str, app: str, *extra: str) -> list[str]:
    return ["sync", "--repo", repo.url, "--ref", "main", "--path", ".", "-n", namespace, "--app", app,
            "--inventory-namespace", namespace, *extra]


def start_cli(args: list[str], *, kubeconfig: Path, cache: Path) -> subprocess.Popen:
    """The real CLI in the background (to fault it while it runs)."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GITOPSD_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "gitopsd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def running_app(repo, namespace, tmp_path, start_daemon, app: str, files: dict, *flags: str, **entry):
    """Commit `files`, start a daemon on one app, wait for its first Applied record: (daemon, sha)."""
    for path, content in files.items():
        repo.write(path, content)
    sha = repo.commit("initial state")
    config = write_config(tmp_path / "config.yaml", [app_entry(app, repo.url, namespace, **entry)])
    daemon = start_daemon(config, *flags)
    wait_audit(daemon, "the first sync", app=app, result="Applied", revision=sha)
    return daemon, sha


def mid_apply(api: ApiLog, namespace: str, *, agent: str = "gitopsd/", at_least: int = 5) -> None:
    """Wait until some (not all) ConfigMaps of a big apply have reached the apiserver."""
    wait_for(f"{at_least} writes under way", lambda: len(api.writes(namespace=namespace, agent=agent)) >= at_least,
             60, interval=0.01)


def intact(daemon: DaemonProcess, app: str, *, kubeconfig, namespace, cache) -> None:
    """After the fault: still serving, no traceback in the log, the audit chain verifies."""
    assert_serving(daemon)
    assert_no_traceback(daemon.log_path.read_text(), f"daemon log {daemon.log_path}")
    audit_verify(app, kubeconfig=kubeconfig, namespace=namespace, cache=cache)


def history(app: str, *, kubeconfig, namespace, cache) -> list[dict]:
    _, records = gitopsd_json("history", app, "--namespace", namespace, kubeconfig=kubeconfig, cache=cache,
                              expect=0)
    return records


def applied_once(app: str, sha: str, **where) -> None:
    """Exactly one Applied record of `sha` in the app's history: no duplicate from a retried write."""
    records = history(app, **where)
    applied = [r for r in records if r.get("result") == "Applied" and r.get("revision") == sha]
    assert len(applied) == 1, [f"#{r['seq']} {r.get('result')} {r.get('reason')}" for r in records]
    assert len({r["hash"] for r in records}) == len(records)


def members(kube, namespace: str, app: str, *, where: str | None = None) -> dict[str, tuple[str, str]]:
    """{name: (uid, resourceVersion)} of the app's ConfigMaps (by its ApplySet label), in `where` or `namespace`."""
    from gitopsd.inventory import PART_OF_LABEL, applyset_id, parent_name

    return snapshot(kube, where or namespace,
                    selector=f"{PART_OF_LABEL}={applyset_id(name=parent_name(app), namespace=namespace)}")


def unchanged(before: dict, after: dict) -> None:
    """Every object of `before` is still there, same uid and resourceVersion (not rewritten, not pruned)."""
    changed = {n: (before[n], after.get(n)) for n in before if after.get(n) != before[n]}
    assert not changed, f"objects rewritten or removed by the fault: {changed}"


# ---------------------------------------------------------------- 1-4: the apiserver

def test_apiserver_paused_mid_cli_sync_then_resumed_completes(repo, namespace, cluster, kube, kubeconfig,
                                                              source_cache):
    repo.write("cms.yaml", configmaps(BIG))
    repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    cli = start_cli([*sync_args(repo, namespace, "paused-cli"), "-o", "json"], kubeconfig=kubeconfig,
                    cache=source_cache)
    mid_apply(api, namespace)

    with paused(cluster, "kube-apiserver"):
        written = len(api.writes(namespace=namespace))
        assert written < BIG, "the apply was interrupted midway"
        with pytest.raises(subprocess.TimeoutExpired):
            cli.wait(timeout=SILENCE)   # the CLI waits for a silent apiserver; it neither crashes nor gives up

    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, f"{out}\n{err}"
    assert json.loads(out)["outcome"] == "Applied"
    assert len(members(kube, namespace, "paused-cli")) == BIG
    assert_no_traceback(err, "`gitopsd sync` stderr")
    audit_verify("paused-cli", kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


def test_apiserver_paused_during_daemon_reconcile_then_resumed_converges(repo, namespace, tmp_path, cluster, kube,
                                                                       kubeconfig, source_cache, start_daemon):
    app = "paused-daemon"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"keep.yaml": configmap("keep-me", {"k": "v"})}, *LEASE)
    before = members(kube, namespace, app)
    repo.write("cms.yaml", configmaps(BIG))
    sha = repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    post_generic(daemon, repo.url, sha)
    mid_apply(api, namespace)

    with paused(cluster, "kube-apiserver"):
        assert_serving(daemon)   # its HTTP port answers while the apiserver is silent
        daemon.wait_event(lambda e: e.get("event") == "leadership lost", "the lease runs out", 30)

    wait_audit(daemon, "convergence", timeout=120, app=app, result="Applied", revision=sha)
    after = members(kube, namespace, app)
    unchanged({"keep-me": before["keep-me"]}, after)
    assert len(after) == BIG + 1   # and keep-me
    applied_once(app, sha, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


def test_apiserver_killed_mid_apply_of_a_large_app_converges_without_duplicates(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache, start_daemon):
    app = "killed-apiserver"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"keep.yaml": configmap("keep-me", {"k": "v"})}, *LEASE)
    before = members(kube, namespace, app)
    repo.write("cms.yaml", configmaps(BIG))
    sha = repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    post_generic(daemon, repo.url, sha)
    mid_apply(api, namespace)

    with killed(cluster, "kube-apiserver"):
        assert_serving(daemon)
        failed = wait_audit(daemon, "the interrupted apply is reported", app=app, result="Failed")
    assert any("cannot reach the apiserver" in e or "leadership lost" in e for e in failed["errors"]), failed

    wait_audit(daemon, "convergence", timeout=120, app=app, result="Applied", revision=sha)
    after = members(kube, namespace, app)
    unchanged({"keep-me": before["keep-me"]}, after)
    assert len(after) == BIG + 1
    applied_once(app, sha, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


def test_apiserver_killed_mid_cli_sync_fails_clearly_and_a_rerun_converges(repo, namespace, cluster, kube,
                                                                         kubeconfig, source_cache):
    repo.write("cms.yaml", configmaps(BIG))
    repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    cli = start_cli(sync_args(repo, namespace, "killed-cli"), kubeconfig=kubeconfig, cache=source_cache)
    mid_apply(api, namespace)

    with killed(cluster, "kube-apiserver"):
        out, err = cli.communicate(timeout=180)
    assert cli.returncode == 2, f"{out}\n{err}"
    assert "cannot reach the apiserver" in out, out
    assert "ConfigMap" in out and "result unknown" in out, "names the objects whose write is in doubt"
    assert "warning: the audit record of this sync was not stored" in err, err[-2000:]
    assert_no_traceback(err, "`gitopsd sync` stderr")

    rerun = gitopsd(*sync_args(repo, namespace, "killed-cli"), kubeconfig=kubeconfig, cache=source_cache)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(members(kube, namespace, "killed-cli")) == BIG
    audit_verify("killed-cli", kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


# ---------------------------------------------------------------- 5-6: etcd

def test_etcd_paused_mid_cli_sync_then_resumed_completes(repo, namespace, cluster, kube, kubeconfig, source_cache):
    repo.write("cms.yaml", configmaps(BIG))
    repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    cli = start_cli([*sync_args(repo, namespace, "paused-etcd"), "-o", "json"], kubeconfig=kubeconfig,
                    cache=source_cache)
    mid_apply(api, namespace)

    with paused(cluster, "etcd"):
        with pytest.raises(subprocess.TimeoutExpired):
            cli.wait(timeout=SILENCE)
        assert len(api.writes(namespace=namespace)) < BIG

    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, f"{out}\n{err}"
    assert json.loads(out)["outcome"] == "Applied"
    assert len(members(kube, namespace, "paused-etcd")) == BIG
    assert_no_traceback(err, "`gitopsd sync` stderr")
    audit_verify("paused-etcd", kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


def test_etcd_killed_mid_sync_then_restarted_converges(repo, namespace, tmp_path, cluster, kube, kubeconfig,
                                                       source_cache, start_daemon):
    app = "killed-etcd"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"keep.yaml": configmap("keep-me", {"k": "v"})}, *LEASE)
    before = members(kube, namespace, app)
    repo.write("cms.yaml", configmaps(BIG))
    sha = repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    post_generic(daemon, repo.url, sha)
    mid_apply(api, namespace)

    with killed(cluster, "etcd"):
        assert_serving(daemon)
        daemon.wait_event(lambda e: e.get("event") == "leadership lost", "the lease cannot be renewed", 60)

    wait_audit(daemon, "convergence", timeout=180, app=app, result="Applied", revision=sha)
    after = members(kube, namespace, app)
    unchanged({"keep-me": before["keep-me"]}, after)
    assert len(after) == BIG + 1
    applied_once(app, sha, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


# ---------------------------------------------------------------- 7: controller-manager

def test_controller_manager_down_makes_a_rollout_unhealthy_in_time_then_it_recovers(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache, start_daemon):
    app = "no-controllers"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"keep.yaml": configmap("keep-me", {"k": "v"})}, *LEASE, interval="5s", timeout="8s")

    with killed(cluster, "kube-controller-manager"):
        repo.write("web.yaml", deployment("web", replicas=2))
        sha = repo.commit("a Deployment nobody rolls out")
        post_generic(daemon, repo.url, sha)
        verdict = wait_audit(daemon, "the health verdict", timeout=30, app=app, revision=sha)
        assert verdict["result"] == "Unhealthy", verdict
        assert f"Deployment.apps/{namespace}/web" in verdict["reason"], verdict["reason"]
        assert verdict["duration_seconds"] < 8 + 5, "within the health timeout"

    recovered = wait_audit(daemon, "the rollout recovers once the controllers run", timeout=90, app=app,
                           revision=sha, reason="the rollout has become healthy")
    assert recovered["health"]["outcome"] == "Healthy"
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


# ---------------------------------------------------------------- 8-10: gitopsd itself

def test_daemon_killed_mid_sync_restarts_and_converges_without_losing_objects(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache, start_daemon):
    app = "killed-daemon"
    first, sha1 = running_app(repo, namespace, tmp_path, start_daemon, app,
                              {"keep.yaml": configmap("keep-me", {"k": "v"})}, *LEASE)
    before = members(kube, namespace, app)
    repo.write("cms.yaml", configmaps(BIG))
    sha = repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    post_generic(first, repo.url, sha)
    mid_apply(api, namespace, agent="(daemon)")
    first.stop(signal.SIGKILL)

    second = start_daemon(tmp_path / "config.yaml", *LEASE, name="daemon-2")
    done = wait_audit(second, "the new process converges", timeout=120, app=app, result="Applied", revision=sha)
    assert done["previous"] == sha1, "the new process knows what was live from the audit trail"
    after = members(kube, namespace, app)
    unchanged({"keep-me": before["keep-me"]}, after)
    assert len(after) == BIG + 1
    applied_once(app, sha, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    intact(second, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


def test_daemon_killed_while_recording_many_apps_keeps_every_audit_chain_intact(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache, start_daemon):
    from gitopsd import audit

    apps = [f"many-{i:02d}" for i in range(20)]
    for name in apps:
        repo.write(f"{name}/cm.yaml", configmap(name, {"app": name}))
    repo.commit("twenty apps")
    config = write_config(tmp_path / "config.yaml",
                          [app_entry(name, repo.url, namespace, path=name) for name in apps])
    api = ApiLog(cluster)
    first = start_daemon(config, *LEASE)
    def segments_written() -> set[str]:
        return {e["objectRef"].get("name", "") for e in api.writes(namespace=namespace, agent="(daemon)")
                if e["objectRef"].get("name", "").startswith("gitopsd-audit-")}
    wait_for("the first audit segments being written", segments_written, 60, interval=0.005)
    first.stop(signal.SIGKILL)
    assert len(segments_written()) < len(apps), "killed while the apps were still being recorded"

    second = start_daemon(config, *LEASE, name="daemon-2")
    for name in apps:
        wait_audit(second, f"{name} recorded by the new process", app=name)
    for name in apps:
        ok, message = audit.verify(kube, namespace=namespace, app=name)
        assert ok, f"{name}: {message}"
        assert cm_data(kube, namespace, name) == {"app": name}
    intact(second, apps[0], kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


@pytest.mark.xfail(strict=True, reason="daemon.py: a replica that lost its lease still sends its in-flight applies, "
                                       "then writes its Failed audit record, an Event and the app status")
def test_paused_leader_never_writes_after_waking_once_a_standby_took_over(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache, start_daemon):
    app = "paused-leader"
    repo.write("keep.yaml", configmap("keep-me", {"k": "v"}))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(app, repo.url, namespace)])
    a = start_daemon(config, *LEASE, name="replica-a")
    wait_audit(a, "replica-a's first sync", app=app, result="Applied")
    b = start_daemon(config, *LEASE, name="replica-b")
    repo.write("cms.yaml", configmaps(BIG))
    sha = repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(cluster)
    post_generic(a, repo.url, sha)
    mid_apply(api, namespace, agent="(replica-a)")

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        b.wait_event(lambda e: e.get("event") == "leadership acquired", "the standby takes over", 30)
        wait_audit(b, "the new leader converges", timeout=120, app=app, result="Applied", revision=sha)
    finally:
        woke = _now()
        os.kill(a.proc.pid, signal.SIGCONT)
    a.wait_event(lambda e: e.get("event") == "leadership lost", "the ex-leader notices", 30)
    wait_for("the ex-leader's interrupted reconcile ends",
             lambda: not json.loads(a.get("/status")[1])["apps"][0]["running"], 60)

    late = api.writes(agent="(replica-a)", resource=None, since=woke)
    assert not late, f"{len(late)} writes after waking: " + ", ".join(
        f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('name')}" for e in late)
    assert len(members(kube, namespace, app)) == BIG + 1
    _, shown = gitopsd_json("status", app, "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert (shown[0]["result"], shown[0]["revision"]) == ("Applied", sha), "the status is the leader's"
    intact(b, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    assert_no_traceback(a.log_path.read_text(), f"daemon log {a.log_path}")


# ---------------------------------------------------------------- 11-15: the Git remote

def remote_fault(repo, namespace, tmp_path, kube, start_daemon, app: str, **entry):
    """A running daemon on a small app polled every 5 s: (daemon, snapshot of its objects)."""
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"cms.yaml": configmaps(3, prefix="settings")}, *LEASE, interval="5s", **entry)
    return daemon, members(kube, namespace, app)


def held(daemon, kube, namespace: str, app: str, before: dict) -> None:
    """While a fault lasts: the daemon serves, and nothing it manages was touched."""
    assert_serving(daemon)
    unchanged(before, members(kube, namespace, app))


def recover(daemon, app: str, fix, *, where: dict, **match) -> dict:
    """Remove the fault; wait for the next record matching `match` (NoChange: the cluster was right all along)."""
    match = match or {"result": "NoChange"}
    seen = len(audit_events(daemon, app, **match))
    fix()
    done = wait_audit(daemon, "convergence once the fault is gone", timeout=90, after=seen, app=app, **match)
    intact(daemon, app, **where)
    return done


def test_removed_remote_is_a_clear_error_prunes_nothing_and_recovers(repo, namespace, tmp_path, kube, kubeconfig,
                                                                     source_cache, start_daemon):
    app = "moved-remote"
    daemon, before = remote_fault(repo, namespace, tmp_path, kube, start_daemon, app)
    moved = repo.bare.with_name("moved-away.git")
    repo.bare.rename(moved)

    failed = wait_audit(daemon, "the fetch failure", app=app, result="Failed")
    assert failed["reason"].startswith(f"cannot reach {repo.url} (fetching ref 'main')"), failed["reason"]
    held(daemon, kube, namespace, app, before)
    recover(daemon, app, lambda: moved.rename(repo.bare), where=dict(kubeconfig=kubeconfig, namespace=namespace,
                                                                    cache=source_cache))


def test_force_pushed_unrelated_history_is_refused_and_recovers_when_restored(
        repo, namespace, tmp_path, kube, kubeconfig, source_cache, start_daemon):
    app = "rewritten"
    daemon, before = remote_fault(repo, namespace, tmp_path, kube, start_daemon, app)
    good = repo._git("rev-parse", "HEAD")
    repo._git("checkout", "-q", "--orphan", "unrelated")
    repo._git("rm", "-q", "-r", "--cached", ".")
    (repo.work / "cms.yaml").unlink()
    repo.write("other.yaml", configmaps(3, prefix="stranger"))
    repo._git("add", "-A")
    repo._git("commit", "-q", "-m", "an unrelated history")
    repo._git("push", "-q", "--force", "origin", "unrelated:main")

    refused = wait_audit(daemon, "the rewritten history", app=app, result="Refused")
    assert "shares no object with what is live" in refused["reason"], refused["reason"]
    assert not [n for n in snapshot(kube, namespace) if n.startswith("stranger")], "nothing of it applied"
    held(daemon, kube, namespace, app, before)
    recover(daemon, app, lambda: repo._git("push", "-q", "--force", "origin", f"{good}:refs/heads/main"),
            where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))


def test_deleted_ref_is_a_clear_error_prunes_nothing_and_recovers(repo, namespace, tmp_path, kube, kubeconfig,
                                                                  source_cache, start_daemon):
    app = "lost-branch"
    repo.write("cms.yaml", configmaps(3, prefix="settings"))
    repo.commit()
    repo._git("push", "-q", "origin", "main:release")
    config = write_config(tmp_path / "config.yaml",
                          [app_entry(app, repo.url, namespace, ref="release", interval="5s")])
    daemon = start_daemon(config, *LEASE)
    wait_audit(daemon, "the first sync", app=app, result="Applied")
    before = members(kube, namespace, app)

    repo._git("push", "-q", "origin", "--delete", "release")
    failed = wait_audit(daemon, "the missing ref", app=app, result="Failed")
    assert failed["reason"] == f"ref 'release' not found in {repo.url}: no such branch, tag or commit", failed
    held(daemon, kube, namespace, app, before)
    recover(daemon, app, lambda: repo._git("push", "-q", "origin", "main:release"),
            where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))


class GitDaemon:
    """`git daemon` serving a directory on git://127.0.0.1, behind a proxy that can go silent."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.log = (root / "git-daemon.log").open("w")
        self.proc = subprocess.Popen(
            ["git", "daemon", "--verbose", "--reuseaddr", "--export-all", f"--base-path={root}",
             "--listen=127.0.0.1", f"--port={self.port}", str(root)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("git daemon listening", lambda: _accepts(self.port), 10)
        self.proxy = SilentProxy(self.port)

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.proxy.port}/{name}"

    def stop(self) -> None:
        self.proxy.stop()
        self.proc.terminate()
        self.proc.wait(10)


class SilentProxy:
    """A TCP proxy; while `silent`, it accepts connections and never answers (a hung server)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.silent = False
        self.held: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.silent:
                self.held.append(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def answer(self) -> None:
        """The server is fixed: new connections are served, the hung ones dropped (as a restart would)."""
        self.silent = False
        for s in self.held:
            s.close()

    def stop(self) -> None:
        self.server.close()
        self.answer()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_hanging_remote_times_out_clearly_without_delaying_other_apps_and_recovers(
        repo, namespace, tmp_path, kube, kubeconfig, source_cache, start_daemon):
    from helpers import GitRepo

    server = GitDaemon(repo.bare.parent)
    try:
        repo.write("cms.yaml", configmaps(3, prefix="settings"))
        repo.commit()
        other = GitRepo(tmp_path / "other")
        other.write("cm.yaml", configmap("other", {"v": "1"}))
        other.commit()
        hung, app = server.url("remote.git"), "hung-remote"
        config = write_config(tmp_path / "config.yaml", [
            app_entry(app, hung, namespace, interval="5s"), app_entry("bystander", other.url, namespace)])
        daemon = start_daemon(config, *LEASE)
        wait_audit(daemon, "the first sync", app=app, result="Applied")
        before = members(kube, namespace, app)

        server.proxy.silent = True
        started = time.monotonic()
        other.write("cm.yaml", configmap("other", {"v": "2"}))
        post_generic(daemon, other.url, other.commit())
        wait_for("the other app is not held up", lambda: cm_data(kube, namespace, "other") == {"v": "2"}, 30)
        failed = wait_audit(daemon, "the fetch timeout", timeout=200, app=app, result="Failed")
        assert failed["reason"] == f"fetching ref 'main' from {hung} timed out after 120s", failed["reason"]
        assert time.monotonic() - started < 200
        held(daemon, kube, namespace, app, before)
        recover(daemon, app, server.proxy.answer,
                where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))
    finally:
        server.stop()


def test_corrupt_object_in_the_remote_is_a_clear_error_and_recovers_when_repaired(
        repo, namespace, tmp_path, kube, kubeconfig, source_cache, start_daemon):
    app = "corrupt-remote"
    daemon, before = remote_fault(repo, namespace, tmp_path, kube, start_daemon, app)
    repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
    repo._git("add", "-A")
    repo._git("commit", "-q", "-m", "green")
    blob = repo._git("rev-parse", "HEAD:cms.yaml")
    repo._git("push", "-q", "origin", "main")
    sha = repo._git("rev-parse", "HEAD")
    blob_path = repo.bare / "objects" / blob[:2] / blob[2:]
    assert blob_path.is_file(), "a small push leaves loose objects in the remote"
    good = blob_path.read_bytes()
    blob_path.chmod(0o644)
    blob_path.write_bytes(good[:len(good) // 2])

    failed = wait_audit(daemon, "the corrupt fetch", app=app, result="Failed")
    assert failed["reason"].startswith(f"git fetch failed for {repo.url} (ref 'main'): "), failed["reason"]
    held(daemon, kube, namespace, app, before)
    recover(daemon, app, lambda: blob_path.write_bytes(good), result="Applied", revision=sha,
            where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))


# ---------------------------------------------------------------- 16, 22: the disk

def test_source_cache_blocked_by_a_file_is_a_clear_error_and_recovers(repo, namespace, tmp_path, kube, kubeconfig,
                                                                      source_cache, start_daemon):
    app = "blocked-cache"
    daemon, before = remote_fault(repo, namespace, tmp_path, kube, start_daemon, app)
    (checkouts,) = (source_cache / "sources").glob("*/checkouts")
    shutil.rmtree(checkouts)
    checkouts.write_text("a file where the cache expects a directory\n")
    repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
    sha = repo.commit("green")

    failed = wait_audit(daemon, "the cache failure", app=app, result="Failed", revision=None)
    assert str(checkouts) in failed["reason"] and "File exists" in failed["reason"], failed["reason"]
    held(daemon, kube, namespace, app, before)
    recover(daemon, app, checkouts.unlink, result="Applied", revision=sha,
            where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))


@contextlib.contextmanager
def read_only(path: Path):
    """`path` on a read-only filesystem (EROFS) for the block: a read-only bind mount as root
    (file modes do not stop root), plain file modes otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    for argv in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.fail(f"cannot make {path} read-only for the test ({' '.join(argv)}): {done.stderr}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_working_dir_is_a_clear_error_and_recovers(repo, namespace, tmp_path, kube, kubeconfig,
                                                             source_cache, start_daemon):
    app = "read-only-disk"
    daemon, before = remote_fault(repo, namespace, tmp_path, kube, start_daemon, app)
    with read_only(source_cache):
        repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
        sha = repo.commit("green")
        failed = wait_audit(daemon, "the disk failure", app=app, result="Failed")
        assert "Read-only file system" in failed["reason"] and str(source_cache) in failed["reason"], failed
        held(daemon, kube, namespace, app, before)
        seen = len(audit_events(daemon, app, result="Applied", revision=sha))
    wait_audit(daemon, "convergence once the disk is writable", timeout=90, after=seen, app=app, result="Applied",
               revision=sha)
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


# ---------------------------------------------------------------- 17-18: credentials and throttling

def service_account_kubeconfig(kube, cluster, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig holding a bound (TokenRequest) token of a cluster-admin ServiceAccount."""
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{namespace}-{name}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
    token = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                         body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": 3600}})["status"]["token"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                               "certificate-authority": str(cluster.dir / "pki" / "ca.crt")}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": name}}]}))
    return path


@contextlib.contextmanager
def daemon_as(sa_kubeconfig: Path, config: Path, *, namespace, tmp_path, cache, name: str):
    """A daemon that talks to the apiserver with the given kubeconfig (not the admin's)."""
    daemon = DaemonProcess(config=config, kubeconfig=sa_kubeconfig, namespace=namespace, workdir=tmp_path,
                           cache=cache, extra=LEASE, env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name=name)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def test_revoked_credentials_are_a_clear_401_without_log_spam_and_new_ones_recover(
        repo, namespace, tmp_path, cluster, kube, kubeconfig, source_cache):
    app = "revoked"
    repo.write("cms.yaml", configmaps(3, prefix="settings"))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(app, repo.url, namespace, interval="5s")])
    sa_config = service_account_kubeconfig(kube, cluster, namespace, "deployer", tmp_path / "sa.kubeconfig")
    with daemon_as(sa_config, config, namespace=namespace, tmp_path=tmp_path, cache=source_cache,
                   name="as-deployer") as daemon:
        wait_audit(daemon, "the first sync", app=app, result="Applied")
        before = members(kube, namespace, app)
        kube.delete(kube.resource("v1", "ServiceAccount"), "deployer", namespace)

        first = daemon.wait_event(lambda e: "401" in str(e.get("error")), "the 401 is reported", 30)
        assert "401 Unauthorized" in first["error"], first
        lost = daemon.wait_event(lambda e: e.get("event") == "leadership lost", "it stops leading", 30)
        assert lost
        held(daemon, kube, namespace, app, before)
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.proc.wait(timeout=OUTAGE)   # it keeps running through the outage...
        complaints = [(e["event"], e["error"]) for e in daemon.events() if "401" in str(e.get("error"))]
        assert len(complaints) <= OUTAGE, complaints   # ...and says so without flooding the log
        assert [c[0] for c in complaints].count("lease request failed") == 1, complaints

    sa_config = service_account_kubeconfig(kube, cluster, namespace, "deployer", tmp_path / "sa.kubeconfig")
    with daemon_as(sa_config, config, namespace=namespace, tmp_path=tmp_path, cache=source_cache,
                   name="as-new-deployer") as daemon:
        wait_audit(daemon, "convergence with new credentials", app=app)
        unchanged(before, members(kube, namespace, app))
        intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    kube.delete(kube.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), f"{namespace}-deployer")


def _rejected(cluster, flow_schema: str) -> int:
    """How many requests APF rejected for a FlowSchema, from the apiserver's own metrics."""
    _, text = tb.request(cluster, "GET", "/metrics")
    total = 0
    for line in str(text).splitlines():
        if line.startswith("apiserver_flowcontrol_rejected_requests_total{") and f'flow_schema="{flow_schema}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_apiserver_throttling_with_429_is_backed_off_and_converges(repo, namespace, tmp_path, cluster, kube,
                                                                   kubeconfig, source_cache):
    app, name = "throttled", f"gitopsd-faults-{uuid.uuid4().hex[:6]}"
    flowcontrol = "flowcontrol.apiserver.k8s.io/v1"
    sa_config = service_account_kubeconfig(kube, cluster, namespace, "throttled", tmp_path / "sa.kubeconfig")
    kube.apply({"apiVersion": flowcontrol, "kind": "PriorityLevelConfiguration", "metadata": {"name": name},
                "spec": {"type": "Limited", "limited": {
                    "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"}}}})
    kube.apply({"apiVersion": flowcontrol, "kind": "FlowSchema", "metadata": {"name": name},
                "spec": {"priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 500,
                         "distinguisherMethod": {"type": "ByUser"},
                         "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                                        "name": "throttled", "namespace": namespace}}],
                                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                       "namespaces": ["*"], "clusterScope": True}],
                                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}})
    schemas = kube.resource(flowcontrol, "FlowSchema")
    wait_for("the FlowSchema is in force", lambda: any(
        c["type"] == "Dangling" and c["status"] == "False"
        for c in (kube.get(schemas, name) or {}).get("status", {}).get("conditions", [])), 30)
    try:
        repo.write("cms.yaml", configmaps(BIG))
        sha = repo.commit(f"{BIG} ConfigMaps")
        config = write_config(tmp_path / "config.yaml", [app_entry(app, repo.url, namespace, interval="5s")])
        with daemon_as(sa_config, config, namespace=namespace, tmp_path=tmp_path, cache=source_cache,
                       name="throttled") as daemon:
            wait_audit(daemon, "convergence under throttling", timeout=240, app=app, result="Applied",
                       revision=sha)
            assert _rejected(cluster, name) > 0, "the apiserver really answered 429"
            assert len(members(kube, namespace, app)) == BIG
            intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    finally:
        kube.delete(schemas, name)
        kube.delete(kube.resource(flowcontrol, "PriorityLevelConfiguration"), name)
        kube.delete(kube.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), f"{namespace}-throttled")


# ---------------------------------------------------------------- 19-21: objects removed or edited under the daemon

WIDGETS = "widgets.faults.example.com"
CRD = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": WIDGETS},
       "spec": {"group": "faults.example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                    "type": "object", "properties": {"spec": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]}}


def install_crd(kube) -> None:
    kube.apply(CRD)
    crds = kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    wait_for("the CRD is Established", lambda: any(
        c["type"] == "Established" and c["status"] == "True"
        for c in ((kube.get(crds, WIDGETS) or {}).get("status") or {}).get("conditions") or []), 30)


@pytest.fixture
def widgets_lost(repo, namespace, tmp_path, kube, start_daemon):
    """A running app of three Widgets whose CRD (installed by hand, not by the app) was then deleted:
    (daemon, the Failed record of the first reconcile after it)."""
    crds = kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    install_crd(kube)
    try:
        widgets = [{"apiVersion": "faults.example.com/v1", "kind": "Widget", "metadata": {"name": f"w{i}"},
                    "spec": {"size": i}} for i in range(3)]
        daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, "widgets", {"widgets.yaml": widgets},
                                *LEASE, interval="5s")
        kube.delete(crds, WIDGETS)
        wait_for("the CRD and its objects are gone", lambda: kube.get(crds, WIDGETS) is None, 60)
        yield daemon, wait_audit(daemon, "the reconcile after the loss", app="widgets", result="Failed")
    finally:
        kube.delete(crds, WIDGETS)


def test_crd_deleted_under_its_custom_resources_fails_visibly_and_converges_when_restored(
        widgets_lost, namespace, kube, kubeconfig, source_cache):
    daemon, failed = widgets_lost
    assert sorted(e.split(": ")[1].rsplit("/", 1)[1] for e in failed["errors"]) == ["w0", "w1", "w2"], failed
    status = gitopsd("status", "widgets", "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
    assert status.returncode == 0 and "Failed" in status.stdout, status.stdout + status.stderr
    assert_serving(daemon)

    done = recover(daemon, "widgets", lambda: install_crd(kube), result="Applied",
                   where=dict(kubeconfig=kubeconfig, namespace=namespace, cache=source_cache))
    assert sorted(o["name"] for o in done["plan"]["objects"] if o["action"] == "created") == ["w0", "w1", "w2"]


@pytest.mark.xfail(strict=True, reason="plan.py/kube.py: with discovery cached from before the CRD was deleted, "
                                       "the error says 'Not Found: 404 page not found', not that the kind is gone")
def test_crd_deleted_under_its_custom_resources_is_reported_as_a_kind_no_longer_served(widgets_lost):
    _, failed = widgets_lost
    assert all("the cluster serves no Widget in faults.example.com/v1" in e for e in failed["errors"]), failed


def test_app_namespace_deleted_by_hand_is_recreated_with_its_objects(repo, namespace, tmp_path, kube, kubeconfig,
                                                                     source_cache, start_daemon):
    app, target = "own-namespace", f"faults-target-{uuid.uuid4().hex[:6]}"
    namespaces = kube.resource("v1", "Namespace")
    files = {"ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": target}},
             "cms.yaml": [{**cm, "metadata": {**cm["metadata"], "namespace": target}}
                          for cm in configmaps(3, prefix="settings")]}
    try:
        daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app, files, *LEASE, interval="5s")
        uid = kube.get(namespaces, target)["metadata"]["uid"]
        kube.delete(namespaces, target)

        def restored():
            ns = kube.get(namespaces, target)
            return (ns is not None and ns["metadata"]["uid"] != uid and not ns["metadata"].get("deletionTimestamp")
                    and len(members(kube, namespace, app, where=target)) == 3)
        wait_for("the namespace and its objects are back", restored, 120)
        assert all(cm_data(kube, target, f"settings-{i:03d}") == {"i": str(i)} for i in range(3))
        intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)
    finally:
        kube.delete(namespaces, target)


def test_hand_edited_audit_segment_is_named_by_verify_and_the_daemon_keeps_recording(
        repo, namespace, tmp_path, kube, kubeconfig, source_cache, start_daemon):
    app = "tampered"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"cm.yaml": configmap("settings", {"color": "blue"})}, *LEASE)
    segment = f"gitopsd-audit-{app}-000001"
    cms = kube.resource("v1", "ConfigMap")
    original = kube.get(cms, segment, namespace)["data"]["000000000001"]
    forged = original.replace('"Ada Author <ada@example.com>"', '"Mallory <mallory@example.com>"')
    assert forged != original
    patch = kube.request  # a merge patch of one record, as `kubectl edit` would send it
    patch("PATCH", cms.path(namespace, segment), body={"data": {"000000000001": forged}},
          content_type="application/merge-patch+json")

    message = audit_verify(app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache, ok=False)
    assert message == (f"BROKEN: seq 1 edited: its content no longer matches its hash (segment {segment})"), message

    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    post_generic(daemon, repo.url, sha)
    recorded = wait_audit(daemon, "the next record", app=app, revision=sha)
    assert recorded["seq"] == 2 and recorded.get("stored") is not False, recorded
    assert_serving(daemon)

    patch("PATCH", cms.path(namespace, segment), body={"data": {"000000000001": original}},
          content_type="application/merge-patch+json")
    intact(daemon, app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


@pytest.mark.xfail(strict=True, reason="audit.py: after its newest segment is deleted the daemon starts a new chain "
                                       "at seq 1, so verify passes and the loss is invisible in the cluster")
def test_deleted_audit_segment_is_named_by_verify_and_the_daemon_keeps_recording(
        repo, namespace, tmp_path, kube, kubeconfig, source_cache, start_daemon):
    app = "shredded"
    daemon, _ = running_app(repo, namespace, tmp_path, start_daemon, app,
                            {"cm.yaml": configmap("settings", {"color": "blue"})}, *LEASE)
    kube.delete(kube.resource("v1", "ConfigMap"), f"gitopsd-audit-{app}-000001", namespace)

    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = repo.commit("green")
    post_generic(daemon, repo.url, sha)
    recorded = wait_audit(daemon, "the next record", app=app, revision=sha)
    assert recorded.get("stored") is not False, recorded
    assert_serving(daemon)
    assert_no_traceback(daemon.log_path.read_text(), f"daemon log {daemon.log_path}")
    message = audit_verify(app, kubeconfig=kubeconfig, namespace=namespace, cache=source_cache, ok=False)
    assert message.startswith("BROKEN: seq 1 missing"), message
