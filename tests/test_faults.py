"""Real faults against the real CLI and daemon: components stopped, killed and
restarted, a Git remote removed, rewritten, slow or corrupt, credentials
revoked, the apiserver throttling, objects deleted under the daemon, a
tampered audit trail, a blocked or read-only disk.

Every case asserts what a user must be able to rely on: a clear error naming
what failed and why, nothing half-applied where it can be avoided, nothing
pruned by mistake (objects and resourceVersions compared before and after),
the daemon's HTTP port still answering, convergence once the fault is gone
(waited on an audit record, a log line or an object, never a fixed sleep),
an audit chain that verifies, and no Python traceback anywhere.

These tests stop and kill control-plane processes, so they run on a cluster
of their own (the `own_cluster` fixture), shared by this module; every test
puts back what it stopped (and an autouse fixture checks that it did). The
apiserver's own audit log is the independent witness of which writes reached
it, and from whom (ApiLog).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import (
    SECRET,
    DaemonProcess,
    GitRepo,
    app_entry,
    assert_no_traceback,
    assert_serving,
    audit_events,
    audit_verify,
    cm_data,
    configmap,
    configmaps,
    deployment,
    gitopsd,
    gitopsd_json,
    post_generic,
    snapshot,
    wait_audit,
    wait_for,
    write_config,
)
from testbed import cluster as tb

pytestmark = pytest.mark.cluster

LEASE = ("--lease-duration", "3", "--lease-renew", "1", "--no-watch-local")
BIG = 150            # ConfigMaps in an app whose apply takes long enough to be interrupted
SILENCE = 4.0        # how long a paused component stays silent: longer than the 3 s lease
OUTAGE = 10          # seconds of revoked credentials over which the log is checked for a flood
KEEP = {"keep.yaml": configmap("keep-me", {"k": "v"})}   # an app's one object before a big commit


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
        """Writes (not dry runs) by a user agent, optionally to one resource/namespace, received after `since`."""
        out = []
        for e in self.events():
            ref = e.get("objectRef") or {}
            if ("dryRun" in e.get("requestURI", "") or agent not in e.get("userAgent", "")
                    or (namespace and ref.get("namespace") != namespace)
                    or (resource and ref.get("resource") != resource)
                    or (since and _utc(e["requestReceivedTimestamp"]) < since)):
                continue
            out.append(e)
        return out


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------- the test bed

@dataclass
class Bed:
    """What a fault test works with: the cluster, the test's namespace (gitopsd's own too), its Git
    remote, its source cache, and the daemon starter."""

    cluster: tb.Cluster
    kube: object
    kubeconfig: Path
    namespace: str
    repo: GitRepo
    tmp_path: Path
    cache: Path
    start_daemon: object

    @property
    def config(self) -> Path:
        return self.tmp_path / "config.yaml"

    def running(self, app: str, files: dict, *flags: str, name: str = "daemon", **entry):
        """Commit `files`, start a daemon on one app, wait for its first Applied record: (daemon, sha)."""
        for path, content in files.items():
            self.repo.write(path, content)
        sha = self.repo.commit("initial state")
        if entry.get("ref", "main") != "main":
            self.repo._git("push", "-q", "origin", f"main:{entry['ref']}")   # the app's branch, from main
        write_config(self.config, [app_entry(app, self.repo.url, self.namespace, **entry)])
        daemon = self.start_daemon(self.config, *flags, name=name)
        wait_audit(daemon, "the first sync", app=app, result="Applied", revision=sha)
        return daemon, sha

    def members(self, app: str, *, where: str | None = None) -> dict[str, tuple[str, str]]:
        """{name: (uid, resourceVersion)} of the app's ConfigMaps (by its ApplySet label)."""
        from gitopsd.engine.inventory import PART_OF_LABEL, applyset_id, parent_name

        parent = applyset_id(name=parent_name(app), namespace=self.namespace)
        return snapshot(self.kube, where or self.namespace, selector=f"{PART_OF_LABEL}={parent}")

    def cli(self, *args: str) -> subprocess.Popen:
        """The real CLI in the background (to fault it while it runs)."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "GITOPSD_CACHE": str(self.cache)}
        return subprocess.Popen([sys.executable, "-m", "gitopsd", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def sync_args(self, app: str) -> list[str]:
        return ["sync", "--repo", self.repo.url, "--ref", "main", "--path", ".", "-n", self.namespace,
                "--app", app, "--inventory-namespace", self.namespace]

    def verify(self, app: str, *, ok: bool = True) -> str:
        return audit_verify(app, kubeconfig=self.kubeconfig, namespace=self.namespace, cache=self.cache, ok=ok)

    def intact(self, daemon: DaemonProcess, app: str) -> None:
        """After the fault: still serving, no traceback in the log, the audit chain verifies."""
        assert_serving(daemon)
        assert_no_traceback(daemon.log_path.read_text(), f"daemon log {daemon.log_path}")
        self.verify(app)

    def applied_once(self, app: str, sha: str) -> None:
        """Exactly one Applied record of `sha` in the app's history: no duplicate from a retried write."""
        _, records = gitopsd_json("history", app, "--namespace", self.namespace, kubeconfig=self.kubeconfig,
                                  cache=self.cache, expect=0)
        applied = [r for r in records if r.get("result") == "Applied" and r.get("revision") == sha]
        assert len(applied) == 1, [f"#{r['seq']} {r.get('result')} {r.get('reason')}" for r in records]
        assert len({r["hash"] for r in records}) == len(records)

    def status(self, app: str) -> dict:
        _, shown = gitopsd_json("status", app, "--namespace", self.namespace, kubeconfig=self.kubeconfig,
                                cache=self.cache, expect=0)
        return shown[0]


@pytest.fixture
def bed(cluster, kube, kubeconfig, namespace, repo, tmp_path, source_cache, start_daemon) -> Bed:
    return Bed(cluster=cluster, kube=kube, kubeconfig=kubeconfig, namespace=namespace, repo=repo,
               tmp_path=tmp_path, cache=source_cache, start_daemon=start_daemon)


def unchanged(before: dict, after: dict) -> None:
    """Every object of `before` is still there, same uid and resourceVersion (not rewritten, not pruned)."""
    changed = {n: (before[n], after.get(n)) for n in before if after.get(n) != before[n]}
    assert not changed, f"objects rewritten or removed by the fault: {changed}"


def start_big_apply(bed: Bed, daemon: DaemonProcess, *, instance: str = "daemon") -> tuple[str, ApiLog]:
    """Commit BIG more ConfigMaps, push the webhook, return once some (not all) have reached the
    apiserver: (sha, the apiserver's log from before the push)."""
    bed.repo.write("cms.yaml", configmaps(BIG))
    sha = bed.repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(bed.cluster)
    post_generic(daemon, bed.repo.url, sha)
    mid_apply(api, bed.namespace, agent=f"({instance})")
    return sha, api


def big_app_mid_apply(bed: Bed, app: str) -> tuple[DaemonProcess, tuple, str]:
    """A daemon on `app` (keep-me alone), then a commit of BIG more, its apply under way:
    (daemon, keep-me's (uid, resourceVersion) before, the big commit's sha)."""
    daemon, _ = bed.running(app, KEEP, *LEASE)
    keep = bed.members(app)["keep-me"]
    sha, _ = start_big_apply(bed, daemon)
    return daemon, keep, sha


def mid_apply(api: ApiLog, namespace: str, *, agent: str = "gitopsd/", at_least: int = 5) -> None:
    wait_for(f"{at_least} writes under way", lambda: len(api.writes(namespace=namespace, agent=agent)) >= at_least,
             60, interval=0.01)


def converged_big(bed: Bed, daemon: DaemonProcess, app: str, sha: str, keep: tuple, *, timeout: float = 120) -> dict:
    """The big commit is Applied (recorded once), every object is there and keep-me was never touched."""
    done = wait_audit(daemon, "convergence", timeout=timeout, app=app, result="Applied", revision=sha)
    after = bed.members(app)
    unchanged({"keep-me": keep}, after)
    assert len(after) == BIG + 1
    bed.applied_once(app, sha)
    bed.intact(daemon, app)
    return done


# ---------------------------------------------------------------- 1-6: the apiserver and etcd

def cli_sync_outlasts_a_pause(bed: Bed, component: str, app: str) -> None:
    """A CLI sync of BIG objects, `component` paused midway: the CLI waits, then completes."""
    bed.repo.write("cms.yaml", configmaps(BIG))
    bed.repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(bed.cluster)
    # Two requests in flight, not 16: the apply is still under way when the audit log shows its first
    # writes, however loaded the machine that reads that log is.
    cli = bed.cli(*bed.sync_args(app), "--concurrency", "2", "-o", "json")
    mid_apply(api, bed.namespace)

    with paused(bed.cluster, component):
        assert len(api.writes(namespace=bed.namespace)) < BIG, "the apply was interrupted midway"
        with pytest.raises(subprocess.TimeoutExpired):
            cli.wait(timeout=SILENCE)   # it waits for the silent component: no crash, no give-up

    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, f"{out}\n{err}"
    assert json.loads(out)["outcome"] == "Applied"
    assert len(bed.members(app)) == BIG
    assert_no_traceback(err, "`gitopsd sync` stderr")
    bed.verify(app)


def test_apiserver_paused_mid_cli_sync_then_resumed_completes(bed):
    cli_sync_outlasts_a_pause(bed, "kube-apiserver", "paused-cli")


def test_etcd_paused_mid_cli_sync_then_resumed_completes(bed):
    cli_sync_outlasts_a_pause(bed, "etcd", "paused-etcd")


def test_apiserver_paused_during_daemon_reconcile_then_resumed_converges(bed):
    app = "paused-daemon"
    daemon, keep, sha = big_app_mid_apply(bed, app)

    with paused(bed.cluster, "kube-apiserver"):
        assert_serving(daemon)   # its HTTP port answers while the apiserver is silent
        daemon.wait_event(lambda e: e.get("event") == "leadership lost", "the lease runs out", 30)
    converged_big(bed, daemon, app, sha, keep)


def test_apiserver_killed_mid_apply_of_a_large_app_converges_without_duplicates(bed):
    app = "killed-apiserver"
    daemon, keep, sha = big_app_mid_apply(bed, app)

    with killed(bed.cluster, "kube-apiserver"):
        assert_serving(daemon)
        failed = wait_audit(daemon, "the interrupted apply is reported", app=app, result="Failed")
    assert any("cannot reach the apiserver" in e or "leadership lost" in e for e in failed["errors"]), failed
    converged_big(bed, daemon, app, sha, keep)


def test_apiserver_killed_mid_cli_sync_fails_clearly_and_a_rerun_converges(bed):
    app = "killed-cli"
    bed.repo.write("cms.yaml", configmaps(BIG))
    bed.repo.commit(f"{BIG} ConfigMaps")
    api = ApiLog(bed.cluster)
    cli = bed.cli(*bed.sync_args(app))
    mid_apply(api, bed.namespace)

    with killed(bed.cluster, "kube-apiserver"):
        out, err = cli.communicate(timeout=180)
    assert cli.returncode == 2, f"{out}\n{err}"
    assert "cannot reach the apiserver" in out, out
    assert "ConfigMap" in out and "result unknown" in out, "names the objects whose write is in doubt"
    in_doubt = set(re.findall(r"(ConfigMap/\S+): result unknown", out))
    assert len(in_doubt) <= 16, f"only the writes in flight are in doubt (one per worker), not {len(in_doubt)}"
    assert "not sent: the apiserver stopped answering" in out, "the rest is counted on one line, not sent"
    assert "warning: the audit record of this sync was not stored" in err, err[-2000:]
    assert_no_traceback(err, "`gitopsd sync` stderr")

    rerun = gitopsd(*bed.sync_args(app), kubeconfig=bed.kubeconfig, cache=bed.cache)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(bed.members(app)) == BIG
    bed.verify(app)


def test_etcd_killed_mid_sync_then_restarted_converges(bed):
    app = "killed-etcd"
    daemon, keep, sha = big_app_mid_apply(bed, app)

    with killed(bed.cluster, "etcd"):
        assert_serving(daemon)
        daemon.wait_event(lambda e: e.get("event") == "leadership lost", "the lease cannot be renewed", 60)
    converged_big(bed, daemon, app, sha, keep, timeout=180)


# ---------------------------------------------------------------- 7: controller-manager

def test_controller_manager_down_makes_a_rollout_unhealthy_in_time_then_it_recovers(bed):
    app = "no-controllers"
    daemon, _ = bed.running(app, KEEP, *LEASE, interval="5s", timeout="8s")

    with killed(bed.cluster, "kube-controller-manager"):
        bed.repo.write("web.yaml", deployment("web", replicas=2))
        sha = bed.repo.commit("a Deployment nobody rolls out")
        post_generic(daemon, bed.repo.url, sha)
        verdict = wait_audit(daemon, "the health verdict", timeout=30, app=app, revision=sha)
        assert verdict["result"] == "Unhealthy", verdict
        assert f"Deployment.apps/{bed.namespace}/web" in verdict["reason"], verdict["reason"]
        assert verdict["duration_seconds"] < 8 + 5, "within the health timeout"

    recovered = wait_audit(daemon, "the rollout recovers once the controllers run", timeout=90, app=app,
                           revision=sha, reason="the rollout has become healthy")
    assert recovered["health"]["outcome"] == "Healthy"
    bed.intact(daemon, app)


# ---------------------------------------------------------------- 8-10: gitopsd itself

def test_daemon_killed_mid_sync_restarts_and_converges_without_losing_objects(bed):
    app = "killed-daemon"
    first, keep, sha = big_app_mid_apply(bed, app)
    first.stop(signal.SIGKILL)
    assert_no_traceback(first.log_path.read_text(), f"daemon log {first.log_path}")

    second = bed.start_daemon(bed.config, *LEASE, name="daemon-2")
    done = converged_big(bed, second, app, sha, keep)
    live = bed.repo._git("rev-parse", "HEAD~1")
    assert done["previous"] == live, "the new process knows what was live from the audit trail"


def test_daemon_killed_while_recording_many_apps_keeps_every_audit_chain_intact(bed):
    from gitopsd import audit

    apps = [f"many-{i:02d}" for i in range(20)]
    for name in apps:
        bed.repo.write(f"{name}/cm.yaml", configmap(name, {"app": name}))
    bed.repo.commit("twenty apps")
    write_config(bed.config, [app_entry(name, bed.repo.url, bed.namespace, path=name) for name in apps])
    api = ApiLog(bed.cluster)
    first = bed.start_daemon(bed.config, *LEASE)

    def segments_written() -> set[str]:
        return {e["objectRef"].get("name", "") for e in api.writes(namespace=bed.namespace, agent="(daemon)")
                if e["objectRef"].get("name", "").startswith("gitopsd-audit-")}
    wait_for("the first audit segments being written", segments_written, 60, interval=0.005)
    first.stop(signal.SIGKILL)
    assert len(segments_written()) < len(apps), "killed while the apps were still being recorded"
    assert_no_traceback(first.log_path.read_text(), f"daemon log {first.log_path}")

    second = bed.start_daemon(bed.config, *LEASE, name="daemon-2")
    for name in apps:
        wait_audit(second, f"{name} recorded by the new process", app=name)
    for name in apps:
        ok, message = audit.verify(bed.kube, namespace=bed.namespace, app=name)
        assert ok, f"{name}: {message}"
        assert cm_data(bed.kube, bed.namespace, name) == {"app": name}
    bed.intact(second, apps[0])


def test_paused_leader_starts_no_write_after_waking_once_a_standby_took_over(bed):
    app = "paused-leader"
    a, _ = bed.running(app, KEEP, *LEASE, name="replica-a")
    b = bed.start_daemon(bed.config, *LEASE, name="replica-b")
    sha, api = start_big_apply(bed, a, instance="replica-a")

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        b.wait_event(lambda e: e.get("event") == "leadership acquired", "the standby takes over", 30)
        wait_audit(b, "the new leader converges", timeout=120, app=app, result="Applied", revision=sha)
    finally:
        woke = datetime.now(timezone.utc)
        os.kill(a.proc.pid, signal.SIGCONT)
    a.wait_event(lambda e: e.get("event") == "leadership lost", "the ex-leader notices", 30)
    wait_for("the ex-leader's interrupted reconcile ends",
             lambda: not json.loads(a.get("/status")[1])["apps"][0]["running"], 60)

    # A client-side fence cannot stop a write whose check passed just before
    # the pause: Kubernetes has no server-side fencing token. So at most the
    # writes already past the fence, one per worker, may land after waking —
    # app objects the new leader converges anyway — and nothing else: no new
    # write, no audit record, Event, status or parent update.
    # The test's namespace holds everything a writes; other tests' daemons may be named replica-a too.
    late = api.writes(agent="(replica-a)", resource=None, since=woke, namespace=bed.namespace)
    described = [f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('name')}" for e in late]
    in_flight = [e for e in late if e["objectRef"].get("resource") == "configmaps"
                 and e["objectRef"].get("name", "").startswith("cm-") and e["verb"] == "patch"]
    assert len(in_flight) == len(late), f"writes other than in-flight applies after waking: {described}"
    assert len(in_flight) <= 16, f"more writes after waking than workers in flight: {described}"
    assert len(bed.members(app)) == BIG + 1
    assert (bed.status(app)["result"], bed.status(app)["revision"]) == ("Applied", sha), "the leader's status"
    bed.intact(b, app)
    assert_no_traceback(a.log_path.read_text(), f"daemon log {a.log_path}")


# ---------------------------------------------------------------- 11-15: the Git remote

def small_app(bed: Bed, app: str, **entry) -> tuple[DaemonProcess, dict]:
    """A running daemon on a small app polled every 5 s: (daemon, its objects before the fault)."""
    daemon, _ = bed.running(app, {"cms.yaml": configmaps(3, prefix="settings")}, *LEASE, interval="5s", **entry)
    return daemon, bed.members(app)


def held(bed: Bed, daemon: DaemonProcess, app: str, before: dict) -> None:
    """While a fault lasts: the daemon serves, and nothing it manages was touched."""
    assert_serving(daemon)
    unchanged(before, bed.members(app))


def recover(bed: Bed, daemon: DaemonProcess, app: str, fix, **match) -> dict:
    """Remove the fault; wait for the next record matching `match` (default NoChange: the cluster
    was right all along), then check the daemon is intact."""
    match = match or {"result": "NoChange"}
    seen = len(audit_events(daemon, app, **match))
    fix()
    done = wait_audit(daemon, "convergence once the fault is gone", timeout=90, after=seen, app=app, **match)
    bed.intact(daemon, app)
    return done


def test_removed_remote_is_a_clear_error_prunes_nothing_and_recovers(bed):
    app = "moved-remote"
    daemon, before = small_app(bed, app)
    moved = bed.repo.bare.with_name("moved-away.git")
    bed.repo.bare.rename(moved)

    failed = wait_audit(daemon, "the fetch failure", app=app, result="Failed")
    assert failed["reason"].startswith(f"cannot reach {bed.repo.url} (fetching ref 'main')"), failed["reason"]
    held(bed, daemon, app, before)
    recover(bed, daemon, app, lambda: moved.rename(bed.repo.bare))


def test_force_pushed_unrelated_history_is_refused_and_recovers_when_restored(bed):
    app, git = "rewritten", bed.repo._git
    daemon, before = small_app(bed, app)
    good = git("rev-parse", "HEAD")
    git("checkout", "-q", "--orphan", "unrelated")
    git("rm", "-q", "-r", "--cached", ".")
    (bed.repo.work / "cms.yaml").unlink()
    bed.repo.write("other.yaml", configmaps(3, prefix="stranger"))
    git("add", "-A")
    git("commit", "-q", "-m", "an unrelated history")
    git("push", "-q", "--force", "origin", "unrelated:main")

    refused = wait_audit(daemon, "the rewritten history", app=app, result="Refused")
    assert "shares no object with what is live" in refused["reason"], refused["reason"]
    assert not [n for n in snapshot(bed.kube, bed.namespace) if n.startswith("stranger")], "nothing of it applied"
    held(bed, daemon, app, before)
    recover(bed, daemon, app, lambda: git("push", "-q", "--force", "origin", f"{good}:refs/heads/main"))


def test_deleted_ref_is_a_clear_error_prunes_nothing_and_recovers(bed):
    app, git = "lost-branch", bed.repo._git
    daemon, before = small_app(bed, app, ref="release")

    git("push", "-q", "origin", "--delete", "release")
    failed = wait_audit(daemon, "the missing ref", app=app, result="Failed")
    assert failed["reason"] == f"ref 'release' not found in {bed.repo.url}: no such branch, tag or commit", failed
    held(bed, daemon, app, before)
    recover(bed, daemon, app, lambda: git("push", "-q", "origin", "main:release"))


class GitDaemon:
    """`git daemon` serving a directory on git://127.0.0.1, behind a proxy that can go silent."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = (root / "git-daemon.log").open("w")
        self.proc = subprocess.Popen(
            ["git", "daemon", "--verbose", "--reuseaddr", "--export-all", f"--base-path={root}",
             "--listen=127.0.0.1", f"--port={port}", str(root)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("git daemon listening", lambda: _accepts(port), 10)
        self.proxy = SilentProxy(port)

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.proxy.port}/{name}"

    def stop(self) -> None:
        self.proxy.stop()
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


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


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_hanging_remote_times_out_clearly_without_delaying_other_apps_and_recovers(bed):
    server = GitDaemon(bed.repo.bare.parent)
    try:
        bed.repo.write("cms.yaml", configmaps(3, prefix="settings"))
        bed.repo.commit()
        other = GitRepo(bed.tmp_path / "other")
        other.write("cm.yaml", configmap("other", {"v": "1"}))
        other.commit()
        hung, app = server.url("remote.git"), "hung-remote"
        write_config(bed.config, [app_entry(app, hung, bed.namespace, interval="5s", fetchTimeout="10s"),
                                  app_entry("bystander", other.url, bed.namespace)])
        daemon = bed.start_daemon(bed.config, *LEASE)
        wait_audit(daemon, "the first sync", app=app, result="Applied")
        before = bed.members(app)

        server.proxy.silent = True
        other.write("cm.yaml", configmap("other", {"v": "2"}))
        post_generic(daemon, other.url, other.commit())
        wait_for("the other app is not held up", lambda: cm_data(bed.kube, bed.namespace, "other") == {"v": "2"}, 30)
        failed = wait_audit(daemon, "the fetch timeout", timeout=60, app=app, result="Failed")
        assert failed["reason"] == f"fetching ref 'main' from {hung} timed out after 10s", failed["reason"]
        held(bed, daemon, app, before)
        recover(bed, daemon, app, server.proxy.answer)
    finally:
        server.stop()


def test_corrupt_object_in_the_remote_is_a_clear_error_and_recovers_when_repaired(bed):
    app, git = "corrupt-remote", bed.repo._git
    daemon, before = small_app(bed, app)
    bed.repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
    git("add", "-A")
    git("commit", "-q", "-m", "green")
    oid = git("rev-parse", "HEAD:cms.yaml")
    blob = bed.repo.bare / "objects" / oid[:2] / oid[2:]
    git("push", "-q", "origin", "main")
    assert blob.is_file(), "a small push leaves loose objects in the remote"
    good = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(good[:len(good) // 2])

    failed = wait_audit(daemon, "the corrupt fetch", app=app, result="Failed")
    assert failed["reason"].startswith(f"git fetch failed for {bed.repo.url} (ref 'main'): "), failed["reason"]
    held(bed, daemon, app, before)
    recover(bed, daemon, app, lambda: blob.write_bytes(good), result="Applied", revision=git("rev-parse", "HEAD"))


# ---------------------------------------------------------------- 16, 22: the disk

def test_source_cache_blocked_by_a_file_is_a_clear_error_and_recovers(bed):
    app = "blocked-cache"
    daemon, before = small_app(bed, app)
    (checkouts,) = (bed.cache / "sources").glob("*/checkouts")
    shutil.rmtree(checkouts)
    checkouts.write_text("a file where the cache expects a directory\n")
    bed.repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
    sha = bed.repo.commit("green")

    failed = wait_audit(daemon, "the cache failure", app=app, result="Failed")
    assert str(checkouts) in failed["reason"] and "File exists" in failed["reason"], failed["reason"]
    held(bed, daemon, app, before)
    recover(bed, daemon, app, checkouts.unlink, result="Applied", revision=sha)


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


def test_read_only_working_dir_is_a_clear_error_and_recovers(bed):
    app = "read-only-disk"
    daemon, before = small_app(bed, app)
    with read_only(bed.cache):
        bed.repo.write("cms.yaml", configmaps(3, prefix="settings", color="green"))
        sha = bed.repo.commit("green")
        failed = wait_audit(daemon, "the disk failure", app=app, result="Failed")
        assert "Read-only file system" in failed["reason"] and str(bed.cache) in failed["reason"], failed
        held(bed, daemon, app, before)
        seen = len(audit_events(daemon, app, result="Applied", revision=sha))
    wait_audit(daemon, "convergence once the disk is writable", timeout=90, after=seen, app=app, result="Applied",
               revision=sha)
    bed.intact(daemon, app)


# ---------------------------------------------------------------- 17-18: credentials and throttling

def service_account_kubeconfig(bed: Bed, name: str) -> Path:
    """A kubeconfig holding a bound (TokenRequest) token of a cluster-admin ServiceAccount."""
    kube, ns = bed.kube, bed.namespace
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{ns}-{name}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]})
    token = kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token",
                         body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": 3600}})["status"]["token"]
    path = bed.tmp_path / f"{name}.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": bed.cluster.server,
                                               "certificate-authority": str(bed.cluster.dir / "pki" / "ca.crt")}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": name}}]}))
    return path


@contextlib.contextmanager
def daemon_as(bed: Bed, kubeconfig: Path, *, name: str):
    """A daemon on bed.config that talks to the apiserver with `kubeconfig` (not the admin's)."""
    daemon = DaemonProcess(config=bed.config, kubeconfig=kubeconfig, namespace=bed.namespace,
                           workdir=bed.tmp_path, cache=bed.cache, extra=LEASE,
                           env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name=name)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def test_revoked_credentials_are_a_clear_401_without_log_spam_and_new_ones_recover(bed):
    app = "revoked"
    bed.repo.write("cms.yaml", configmaps(3, prefix="settings"))
    bed.repo.commit()
    write_config(bed.config, [app_entry(app, bed.repo.url, bed.namespace, interval="5s")])
    with daemon_as(bed, service_account_kubeconfig(bed, "deployer"), name="as-deployer") as daemon:
        wait_audit(daemon, "the first sync", app=app, result="Applied")
        before = bed.members(app)
        bed.kube.delete(bed.kube.resource("v1", "ServiceAccount"), "deployer", bed.namespace)

        first = daemon.wait_event(lambda e: "401" in str(e.get("error")), "the 401 is reported", 30)
        assert "401 Unauthorized" in first["error"] and "no longer accepts gitopsd's credentials" in first["error"]
        daemon.wait_event(lambda e: e.get("event") == "leadership lost", "it stops leading", 30)
        held(bed, daemon, app, before)
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.proc.wait(timeout=OUTAGE)   # it keeps running through the outage...
        complaints = [(e["event"], e["error"]) for e in daemon.events() if "401" in str(e.get("error"))]
        assert len(complaints) <= OUTAGE, complaints   # ...and says so without flooding the log
        assert [c[0] for c in complaints].count("lease request failed") == 1, complaints

    with daemon_as(bed, service_account_kubeconfig(bed, "deployer"), name="as-new-deployer") as daemon:
        wait_audit(daemon, "convergence with new credentials", app=app)
        unchanged(before, bed.members(app))
        bed.intact(daemon, app)
    bed.kube.delete(bed.kube.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
                    f"{bed.namespace}-deployer")


def _rejected(cluster, flow_schema: str) -> int:
    """How many requests APF rejected for a FlowSchema, from the apiserver's own metrics."""
    _, text = tb.request(cluster, "GET", "/metrics")
    total = 0
    for line in str(text).splitlines():
        if line.startswith("apiserver_flowcontrol_rejected_requests_total{") and f'flow_schema="{flow_schema}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_apiserver_throttling_with_429_is_backed_off_and_converges(bed):
    app, name, kube = "throttled", f"gitopsd-faults-{uuid.uuid4().hex[:6]}", bed.kube
    flowcontrol = "flowcontrol.apiserver.k8s.io/v1"
    throttled = service_account_kubeconfig(bed, "throttled")
    kube.apply({"apiVersion": flowcontrol, "kind": "PriorityLevelConfiguration", "metadata": {"name": name},
                "spec": {"type": "Limited", "limited": {
                    "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"}}}})
    kube.apply({"apiVersion": flowcontrol, "kind": "FlowSchema", "metadata": {"name": name},
                "spec": {"priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 500,
                         "distinguisherMethod": {"type": "ByUser"},
                         "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                                        "name": "throttled", "namespace": bed.namespace}}],
                                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                       "namespaces": ["*"], "clusterScope": True}],
                                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}})
    schemas = kube.resource(flowcontrol, "FlowSchema")
    wait_for("the FlowSchema is in force", lambda: any(
        c["type"] == "Dangling" and c["status"] == "False"
        for c in ((kube.get(schemas, name) or {}).get("status") or {}).get("conditions") or []), 30)
    try:
        bed.repo.write("cms.yaml", configmaps(BIG))
        sha = bed.repo.commit(f"{BIG} ConfigMaps")
        write_config(bed.config, [app_entry(app, bed.repo.url, bed.namespace, interval="5s")])
        with daemon_as(bed, throttled, name="throttled") as daemon:
            wait_audit(daemon, "convergence under throttling", timeout=240, app=app, result="Applied",
                       revision=sha)
            assert _rejected(bed.cluster, name) > 0, "the apiserver really answered 429"
            assert len(bed.members(app)) == BIG
            bed.intact(daemon, app)
    finally:
        kube.delete(schemas, name)
        kube.delete(kube.resource(flowcontrol, "PriorityLevelConfiguration"), name)
        kube.delete(kube.resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
                    f"{bed.namespace}-throttled")


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
def widgets_lost(bed):
    """A running app of three Widgets whose CRD (installed by hand, not by the app) was then deleted:
    (daemon, the Failed record of the first reconcile after it)."""
    crds = bed.kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    install_crd(bed.kube)
    try:
        widgets = [{"apiVersion": "faults.example.com/v1", "kind": "Widget", "metadata": {"name": f"w{i}"},
                    "spec": {"size": i}} for i in range(3)]
        daemon, _ = bed.running("widgets", {"widgets.yaml": widgets}, *LEASE, interval="5s")
        bed.kube.delete(crds, WIDGETS)
        wait_for("the CRD and its objects are gone", lambda: bed.kube.get(crds, WIDGETS) is None, 60)
        yield daemon, wait_audit(daemon, "the reconcile after the loss", app="widgets", result="Failed")
    finally:
        bed.kube.delete(crds, WIDGETS)


def test_crd_deleted_under_its_custom_resources_fails_visibly_and_converges_when_restored(bed, widgets_lost):
    daemon, failed = widgets_lost
    assert sorted(e.split(": ")[1].rsplit("/", 1)[1] for e in failed["errors"]) == ["w0", "w1", "w2"], failed
    assert bed.status("widgets")["result"] == "Failed"
    assert_serving(daemon)

    done = recover(bed, daemon, "widgets", lambda: install_crd(bed.kube), result="Applied")
    assert sorted(o["name"] for o in done["plan"]["objects"] if o["action"] == "created") == ["w0", "w1", "w2"]


def test_crd_deleted_under_its_custom_resources_is_reported_as_a_kind_no_longer_served(widgets_lost):
    _, failed = widgets_lost
    assert all("the cluster serves no Widget in faults.example.com/v1" in e for e in failed["errors"]), failed


def test_app_namespace_deleted_by_hand_is_recreated_with_its_objects(bed):
    app, target = "own-namespace", f"faults-target-{uuid.uuid4().hex[:6]}"
    namespaces = bed.kube.resource("v1", "Namespace")
    files = {"ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": target}},
             "cms.yaml": [{**cm, "metadata": {**cm["metadata"], "namespace": target}}
                          for cm in configmaps(3, prefix="settings")]}
    try:
        daemon, _ = bed.running(app, files, *LEASE, interval="5s")
        uid = bed.kube.get(namespaces, target)["metadata"]["uid"]
        bed.kube.delete(namespaces, target)

        def restored():
            ns = bed.kube.get(namespaces, target)
            return (ns is not None and ns["metadata"]["uid"] != uid and not ns["metadata"].get("deletionTimestamp")
                    and len(bed.members(app, where=target)) == 3)
        wait_for("the namespace and its objects are back", restored, 120)
        assert all(cm_data(bed.kube, target, f"settings-{i:03d}") == {"i": str(i)} for i in range(3))
        bed.intact(daemon, app)
    finally:
        bed.kube.delete(namespaces, target)


def _edit_record(bed: Bed, segment: str, seq: int, raw: str) -> None:
    """Rewrite one stored record by hand, as `kubectl edit` would (a merge patch)."""
    cms = bed.kube.resource("v1", "ConfigMap")
    bed.kube.request("PATCH", cms.path(bed.namespace, segment), body={"data": {f"{seq:012d}": raw}},
                     content_type="application/merge-patch+json")


def test_hand_edited_audit_segment_is_named_by_verify_and_the_daemon_keeps_recording(bed):
    app = "tampered"
    daemon, _ = bed.running(app, {"cm.yaml": configmap("settings", {"color": "blue"})}, *LEASE)
    segment = f"gitopsd-audit-{app}-000001"
    original = bed.kube.get(bed.kube.resource("v1", "ConfigMap"), segment, bed.namespace)["data"]["000000000001"]
    forged = original.replace('"Ada Author <ada@example.com>"', '"Mallory <mallory@example.com>"')
    assert forged != original
    _edit_record(bed, segment, 1, forged)

    message = bed.verify(app, ok=False)
    assert message == f"BROKEN: seq 1 edited: its content no longer matches its hash (segment {segment})", message

    bed.repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = bed.repo.commit("green")
    post_generic(daemon, bed.repo.url, sha)
    recorded = wait_audit(daemon, "the next record", app=app, revision=sha)
    assert recorded["seq"] == 2 and recorded.get("stored") is not False, recorded

    _edit_record(bed, segment, 1, original)
    bed.intact(daemon, app)


def test_deleted_audit_segment_is_named_by_verify_and_the_daemon_keeps_recording(bed):
    app = "shredded"
    daemon, _ = bed.running(app, {"cm.yaml": configmap("settings", {"color": "blue"})}, *LEASE)
    bed.kube.delete(bed.kube.resource("v1", "ConfigMap"), f"gitopsd-audit-{app}-000001", bed.namespace)

    bed.repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    sha = bed.repo.commit("green")
    post_generic(daemon, bed.repo.url, sha)
    recorded = wait_audit(daemon, "the next record", app=app, revision=sha)
    assert recorded.get("stored") is not False, recorded
    assert_serving(daemon)
    assert_no_traceback(daemon.log_path.read_text(), f"daemon log {daemon.log_path}")
    assert bed.verify(app, ok=False).startswith("BROKEN: seq 1 missing")
