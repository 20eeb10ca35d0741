"""Shared fixtures: one real control plane per test session, a namespace per test.

The cluster is started once (or reused when GITOPSD_TEST_CLUSTER names a
test-bed cluster, which is then left running) and torn down at the end. Tests
that need it FAIL with the tail of the failing component's log when it cannot
start; they never skip: a skipped proof is no proof.

Run with pytest-xdist (`make test` does, `-n` workers), the workers share the
one cluster: the first to need it starts it under a file lock, the others
adopt it, and the controller stops it when every worker is done. Each worker
watches the fake nodes and writes any not-Ready moment to a file the
controller reads at the end (see NodeWatch).

Multi-cluster tests get a second control plane, `cluster_b` (with
`kubeconfig_b` and `kube_b`): started on first use only, reused and left
running when GITOPSD_TEST_CLUSTER_B names one, failing the same way.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

sys_path_tests = str(Path(__file__).resolve().parent)

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, sys_path_tests)

from testbed import build as tb_build  # noqa: E402
from testbed import cluster as tb_cluster  # noqa: E402

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class _Bed:
    """What the session knows about one of its clusters, including why it failed."""

    def __init__(self, label: str) -> None:
        self.label = label  # how messages name it: "" for the session cluster, " b" for cluster_b
        self.cluster: tb_cluster.Cluster | None = None
        self.error: str | None = None
        self.nodes: NodeWatch | None = None


def _flaps_file(name: str) -> Path:
    """Where this run's watchers of cluster `name` write the moments a node was not Ready."""
    return tb_cluster.state_dir(name) / f"node-flaps-{_run_id()}.txt"


class NodeWatch:
    """Watches the fake nodes for the whole run and writes every moment one
    was not Ready to the run's flaps file (_flaps_file). A node that flaps makes
    every pod on it unready and fails health waits for no reason of gitopsd's,
    so a flap fails the run (see pytest_sessionfinish, which reads the file in
    the controller or the only process) — the suite is the test bed's long
    soak under load.
    """

    def __init__(self, cluster: tb_cluster.Cluster) -> None:
        import threading

        from kubernetes import config

        self.api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.file = _flaps_file(cluster.name)
        self.file.touch()   # its existence says the cluster was used (and watched) in this run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self.api)
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(core.list_node, timeout_seconds=60):
                    node = event["object"]
                    if (node.metadata.annotations or {}).get("kwok.x-k8s.io/node") != "fake":
                        continue   # a real node (tests/test_testbed_node.py) comes and goes: not watched
                    ready = {c.type: c.status for c in (node.status.conditions or [])}.get("Ready")
                    if ready != "True" and event["type"] != "DELETED":
                        with self.file.open("a") as f:   # one short line per write: appends interleave whole
                            f.write(f"{time.strftime('%H:%M:%S')} {node.metadata.name} Ready={ready}\n")
                    if self._stop.is_set():
                        return
            except Exception:  # the control plane restarting under a fault test; watch again
                self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()


_bed = _Bed("")
_bed_b = _Bed(" b")
_BEDS = (_bed, _bed_b)
_STARTED = time.monotonic()


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    """The controller (or the only process) names the run; xdist workers,
    started after this, inherit it and so name the same clusters."""
    if not _is_worker(config):
        os.environ["GITOPSD_TEST_RUN"] = str(os.getpid())


def _run_id() -> str:
    return os.environ.get("GITOPSD_TEST_RUN") or str(os.getpid())


def _session_name() -> str:
    return os.environ.get("GITOPSD_TEST_CLUSTER") or f"pytest-{_run_id()}"


def _b_name() -> str:
    return os.environ.get("GITOPSD_TEST_CLUSTER_B") or f"b-{_run_id()}"


def _bring_up(bed: _Bed, name: str, *, what: str) -> tb_cluster.Cluster:
    """Start (or, reusing, adopt) the bed's cluster once per session; every
    later request gets it, or the same failure: pytest.fail, never a skip."""
    if bed.cluster is not None:
        return bed.cluster
    if bed.error is not None:
        pytest.fail(bed.error, pytrace=False)
    try:
        if not tb_build.all_built():
            raise tb_cluster.ClusterError("test-bed binaries are missing: run `hack/cluster build` (make test does)")
        tb_cluster.clusters_dir().mkdir(parents=True, exist_ok=True)
        with open(tb_cluster.clusters_dir() / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # xdist workers: the first starts it, the rest adopt it
            bed.cluster = tb_cluster.up(name, out=sys.stderr)
        bed.nodes = NodeWatch(bed.cluster)
    except (tb_cluster.ClusterError, FileNotFoundError, OSError) as exc:
        bed.error = f"{what} did not start: {exc}"
        logs = tb_cluster.state_dir(name) / "logs"
        if logs.exists():  # keep them: `up` stopped the processes, the next run reuses the name
            kept = tb_build.cache_dir() / "test-logs" / name
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
            bed.error += f"\n(component logs kept in {kept})"
        pytest.fail(bed.error, pytrace=False)
    return bed.cluster


@pytest.fixture(scope="session")
def cluster() -> tb_cluster.Cluster:
    """The session's running control plane (started on first use)."""
    return _bring_up(_bed, _session_name(),
                     what="the local control plane")


@pytest.fixture(scope="module")
def sample_namespaces(cluster):
    """The sample apps' fixed namespaces (web-dev, web-staging, web-production)
    and gitopsd-system on the session cluster, the module's alone while it runs.

    Tests elsewhere get a namespace of their own; the modules that deploy
    sample-repo/ or deploy/ as they are cannot. This lock, beside the
    cluster's state, makes them take turns: xdist workers, and other runs
    sharing the cluster (GITOPSD_TEST_CLUSTER). Use it first, before the
    module's other fixtures touch those namespaces.
    """
    with open(cluster.dir / "sample-namespaces.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def real_node(cluster):
    """A real node of the session cluster (kubelet, containerd, runc: hack/testbed/node.py) beside
    the KWOK nodes, for the module; stopped at its end, so the rest of the suite sees the cluster
    as it was. A cluster has one: modules take turns (a lock beside the cluster's state, as for
    sample_namespaces). Fails, never skips, when it cannot start."""
    from testbed import node as tb_node

    with open(cluster.dir / "real-node.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        try:
            node = tb_node.up(cluster.name, out=sys.stderr)
        except (tb_node.NodeError, OSError) as exc:
            pytest.fail(f"the real node did not start: {exc}", pytrace=False)
        sys.stderr.write(f"\nreal node up in {time.monotonic() - start:.1f}s ({node.timings})\n")
        try:
            yield node
        finally:
            tb_node.down(cluster.name)


@pytest.fixture(scope="session")
def kubeconfig(cluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def cluster_b() -> tb_cluster.Cluster:
    """A second control plane for multi-cluster tests, `b-<run>`, started on
    first use only (a run that never asks for it starts nothing more).

    Independent of `cluster`: its own CA, etcd and ports. Torn down at the end
    of the session (pytest_sessionfinish), its component logs kept in
    test-logs/<name> when anything failed. GITOPSD_TEST_CLUSTER_B=NAME uses
    that test-bed cluster instead (started if it is not up) and leaves it
    running, as GITOPSD_TEST_CLUSTER does for `cluster`. Fails, never skips,
    when it cannot start.
    """
    reuse = os.environ.get("GITOPSD_TEST_CLUSTER_B")
    if reuse and reuse == _session_name():
        pytest.fail(f"GITOPSD_TEST_CLUSTER_B names the session cluster {reuse!r}: multi-cluster tests need a "
                    f"second control plane (unset it, or name another test-bed cluster)", pytrace=False)
    return _bring_up(_bed_b, _b_name(),
                     what="the second local control plane (cluster_b)")


@pytest.fixture(scope="session")
def kubeconfig_b(cluster_b) -> Path:
    """cluster_b's admin kubeconfig (certificate paths into its pki dir; for a
    self-contained one, testbed.cluster.client_kubeconfig(cluster_b, user=...))."""
    return cluster_b.kubeconfig


@pytest.fixture(scope="session")
def kube_b(kubeconfig_b):
    """gitopsd's own client for cluster_b."""
    from gitopsd.kube import Kube

    k = Kube.connect(kubeconfig=kubeconfig_b)
    yield k
    k.close()


@pytest.fixture(scope="session")
def api_client(kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def namespace(api_client, request) -> str:
    """A fresh namespace named after the test; deleted afterwards (without waiting)."""
    from kubernetes import client

    # At most 34 + 6 = 40 characters: tests use the namespace as an app name, which the CLI checks like the config.
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:34].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"gitopsd-test": "true"}}})
    # The serviceaccount controller makes `default` shortly after; many
    # workloads need it, so hand the test a namespace that is really ready.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.ApiException:
            time.sleep(0.1)
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException:
        pass


def _signal_state() -> dict[str, int]:
    """This thread's blocked and ignored signals, as /proc shows them (bit n-1 for signal n)."""
    import threading

    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        return {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in f) if k in ("SigBlk", "SigIgn")}


_SIGNALS_AT_START = _signal_state()


@pytest.fixture(autouse=True)
def _signals_left_as_found(request):
    """A test must leave the signals as it found them: a blocked or ignored SIGINT or SIGTERM is
    inherited by every process the worker starts later (a gitopsd that cannot be interrupted).
    Checked around each test, and against the worker's start (a fixture of a wider scope)."""
    before = _signal_state()
    if before != _SIGNALS_AT_START:
        pytest.fail(f"before {request.node.nodeid}, a fixture or an earlier test changed this thread's signal "
                    f"state: {before} (at the start: {_SIGNALS_AT_START})")
    yield
    after = _signal_state()
    if after != before:
        import signal as signal_mod

        changed = {k: [signal_mod.Signals(n + 1).name for n in range(64) if ((before[k] ^ after[k]) >> n) & 1
                       and n + 1 in {s.value for s in signal_mod.Signals}] for k in before}
        signal_mod.pthread_sigmask(signal_mod.SIG_SETMASK, [n + 1 for n in range(64) if (before["SigBlk"] >> n) & 1])
        pytest.fail(f"{request.node.nodeid} changed this thread's signal state: {changed}")


@pytest.fixture(autouse=True)
def _forget_secret_values():
    """Every test ends by emptying gitopsd's process-wide register of Secret values
    (gitopsd.redact): a value one test registered (a pin `123456789`, say) must not mask
    another test's output in the same process; which tests share a process differs by
    xdist worker."""
    yield
    from gitopsd import redact

    redact.forget_all()


@pytest.fixture
def receivers():
    """make(provider, **kw) -> a local receiver checking that provider's documented API (tests/receivers.py);
    closed at the end of the test."""
    from receivers import Receiver

    made: list[Receiver] = []

    def make(provider: str, **kw) -> Receiver:
        made.append(Receiver(provider, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def pytest_collection_modifyitems(session, config, items):
    """Tests on the real Gitea run late: `make test` builds it in the background meanwhile
    (hack/testbed/build.py start_background), and the `gitea` fixture waits for that build.
    The real node's tests (marker `node`) run just before them: after the rest, which never
    see the node, and giving Gitea's build their minutes too. The image's tests (marked
    `image`: a buildah build, podman runs) run last of all."""
    items.sort(key=lambda item: (item.get_closest_marker("image") is not None,
                                 "gitea" in getattr(item, "fixturenames", ()),
                                 item.get_closest_marker("node") is not None))   # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed cluster test, attach the tail of every component's log
    (of cluster_b's too when the test used it)."""
    outcome = yield
    report = outcome.get_result()
    if not (report.failed and report.when == "call"):
        return
    fixtures = getattr(item, "fixturenames", ())
    # The test's own cluster when it has one (tests/test_faults.py), else the session's.
    plane = getattr(item, "funcargs", {}).get("cluster") or _bed.cluster
    if "cluster" in fixtures and plane is not None:
        for comp in COMPONENTS:
            report.sections.append((f"{comp} log (tail)", plane.log_tail(comp, 8)))
    if "cluster_b" in fixtures and _bed_b.cluster is not None:
        for comp in COMPONENTS:
            report.sections.append((f"cluster b ({_bed_b.cluster.name}) {comp} log (tail)",
                                    _bed_b.cluster.log_tail(comp, 8)))


def pytest_sessionfinish(session, exitstatus):
    """Stop the run's clusters (`cluster`, and `cluster_b` when a test used
    it) unless reused; keep their component logs when anything failed.

    A fake node that was ever not Ready during the run fails it (exit 1).
    Under xdist the workers only stop watching: the controller, which ends
    after them, reports and stops the clusters they shared.
    """
    for bed in _BEDS:
        if bed.nodes is not None:
            bed.nodes.stop()
    if _is_worker(session.config):
        return
    watched = (time.monotonic() - _STARTED) / 60
    beds = ((_session_name(), "", bool(os.environ.get("GITOPSD_TEST_CLUSTER"))),
            (_b_name(), " b", bool(os.environ.get("GITOPSD_TEST_CLUSTER_B"))))
    for name, label, _reused in beds:
        flaps = _flaps_file(name)
        if not flaps.exists():
            continue   # no test of this run used it
        lines = flaps.read_text().splitlines()
        flaps.unlink()
        if lines:
            sys.stderr.write(f"\nTEST BED{label.upper()}: fake nodes were not Ready during the run "
                             f"({watched:.0f} min watched):\n  " + "\n  ".join(lines[:20]) + "\n")
            session.exitstatus = exitstatus = 1
        else:
            sys.stderr.write(f"\ntest bed{label}: every fake node stayed Ready for the {watched:.0f} min run\n")
    for name, _label, reused in beds:
        c = tb_cluster.Cluster.load(name)
        if c is None or reused:
            continue
        try:
            if exitstatus != 0:
                kept = tb_build.cache_dir() / "test-logs" / c.name
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(c.dir / "logs", kept)
                sys.stderr.write(f"\ncomponent logs kept in {kept}\n")
        finally:  # never leave a cluster running because its logs could not be copied
            tb_cluster.down(c.name)
            (tb_cluster.clusters_dir() / f"{c.name}.lock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def kube(kubeconfig):
    """gitopsd's own client for the session cluster."""
    from gitopsd.kube import Kube

    k = Kube.connect(kubeconfig=kubeconfig)
    yield k
    k.close()


@pytest.fixture
def repo(tmp_path):
    """A fresh Git remote (local bare repo) with a working clone."""
    from helpers import GitRepo

    return GitRepo(tmp_path / "git")


@pytest.fixture
def source_cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def app(repo, namespace, source_cache, kube):
    """A factory for AppSpecs over the test's repo and namespace; sync via .run()."""
    from gitopsd.engine.sync import AppSpec, sync

    class _App:
        cache_dir = source_cache

        def spec(self, **overrides) -> AppSpec:
            base = dict(name=namespace, repo=repo.url, ref="main", path=".", namespace=namespace,
                        inventory_namespace=namespace, timeout=60.0)
            return AppSpec(**{**base, **overrides})

        def sync(self, **overrides):
            return sync(kube, self.spec(**{k: v for k, v in overrides.items() if k not in ("dry_run",)}),
                        cache_dir=source_cache, dry_run=overrides.get("dry_run", False))

    return _App()


@pytest.fixture
def start_daemon(tmp_path, kubeconfig, namespace, source_cache):
    """Start real `gitopsd run` processes (stopped with SIGTERM at the end of the test)."""
    from helpers import SECRET, DaemonProcess

    started = []

    def start(config: Path, *extra: str, name: str = "daemon"):
        d = DaemonProcess(config=config, kubeconfig=kubeconfig, namespace=namespace, workdir=tmp_path,
                          cache=source_cache, extra=extra, env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name=name)
        started.append(d)
        d.wait_ready()
        return d

    yield start
    for d in started:
        d.stop()


# ---------------------------------------------------------------- a cluster of one's own

@pytest.fixture(scope="module")
def own_cluster(request) -> tb_cluster.Cluster:
    """A separate control plane for one test module, for tests that stop, kill
    and restart its components (never the session's shared cluster).

    Fails (never skips) when it cannot start. Torn down at the end of the
    module; its component logs are kept in test-logs/ when a test failed.
    """
    name = f"own-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    failed_before = request.session.testsfailed
    try:
        if not tb_build.all_built():
            raise tb_cluster.ClusterError("test-bed binaries are missing: run `hack/cluster build` (make test does)")
        own = tb_cluster.up(name, out=sys.stderr)
    except (tb_cluster.ClusterError, OSError) as exc:
        pytest.fail(f"the module's own control plane did not start: {exc}", pytrace=False)
    yield own
    if request.session.testsfailed > failed_before:
        kept = tb_build.cache_dir() / "test-logs" / name
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(own.dir / "logs", kept)
        sys.stderr.write(f"\ncomponent logs of {name} kept in {kept}\n")
    tb_cluster.down(name)


@pytest.fixture(scope="module")
def own_kubeconfig(own_cluster) -> Path:
    return own_cluster.kubeconfig


@pytest.fixture(scope="module")
def own_kube(own_kubeconfig):
    """gitopsd's own client for the module's own cluster."""
    from gitopsd.kube import Kube

    k = Kube.connect(kubeconfig=own_kubeconfig)
    yield k
    k.close()


# ---------------------------------------------------------------- a real Prometheus

@pytest.fixture(scope="session")
def prometheus(request):
    """A real Prometheus for the session, scraping the test exporter every
    second (hack/testbed/prometheus.py, exporter.py); no control plane needed.

    Yields a `testbed.prometheus.Prometheus`:
      .url                  base URL of the HTTP API (http://127.0.0.1:PORT; /api/v1/query)
      .query(expr, at=None) -> the API's `data` ({"resultType", "result"}); PrometheusError when refused
      .exporter             ExporterClient: traffic(app=, track=, per_second=, error_share=0.0),
                            rate(app=, track=, code=, per_second=), inc(app=, track=, code=, by=1.0),
                            reset(app=None), state()
      .exporter_url         the exporter's base URL (/metrics is what Prometheus scrapes)
    Every series is `http_requests_total{app, track, code}` with job="exporter".
    The exporter is shared by the whole session: give your series an app name
    of your own (the test's namespace) and filter queries by it.

    Started once (it is ready when it has scraped the exporter), stopped at the
    end of the session; fails, never skips, when it cannot start. Its logs are
    kept in test-logs/ when a test failed.
    """
    from testbed import prometheus as tb_prometheus

    name = f"prometheus-{os.getpid()}"
    failed_before = request.session.testsfailed

    def keep_logs() -> str:
        return _keep_logs(name, tb_prometheus.prometheus_dir(name).glob("*.log"))

    try:
        prom = tb_prometheus.up(name, out=sys.stderr)
    except (tb_prometheus.PrometheusError, FileNotFoundError, OSError) as exc:
        kept = keep_logs()
        tb_prometheus.down(name)
        pytest.fail(f"the test bed's Prometheus did not start: {exc}{kept}", pytrace=False)
    yield prom
    if request.session.testsfailed > failed_before:
        sys.stderr.write(keep_logs())
    prom.stop()


def _keep_logs(name: str, logs) -> str:
    """Copy a test-bed server's logs to test-logs/<name>; the line that says where."""
    kept = tb_build.cache_dir() / "test-logs" / name
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for log in logs:
        if log.exists():  # a server that failed early may have written none
            shutil.copy(log, kept)
    return f"\nlogs of {name} kept in {kept}\n"


# ---------------------------------------------------------------- a real forge

@pytest.fixture(scope="session")
def gitea(request, tmp_path_factory):
    """A real Gitea for the session (hack/testbed/forge.py): real push webhooks
    and commit-status API on 127.0.0.1; no control plane needed.

    Yields a `testbed.forge.Gitea`:
      .url, .user, .token         base URL; the admin and its token (scope all)
      .create_repo(name, private=True) -> Repo (.clone_url without credentials, .full_name)
      .push_url(repo)             the clone URL with the admin's token in it, for `git push`
      .add_webhook(repo, url=, secret=, events=("push",)) -> hook id
      .statuses(repo, sha)        every status posted on the commit, oldest first
      .api(method, path, body=None, token=None), .request(...)   any other /api/v1 call
    The server is shared by the session: name your repositories after the
    test's namespace.

    Started once (ready when its API answers and the admin's token works),
    stopped at the end of the session; fails, never skips, when it cannot
    start (`hack/cluster build` builds it). Its logs are kept in test-logs/
    when a test failed.
    """
    from testbed import build as tb_build
    from testbed import forge as tb_forge

    try:
        tb_build.wait_built("gitea")   # `make test` started its build in the background; else built here
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"the test bed's Gitea could not be built: {exc}", pytrace=False)
    name = f"gitea-{os.getpid()}"
    root = tmp_path_factory.mktemp("gitea")
    failed_before = request.session.testsfailed
    try:
        forge = tb_forge.start(root)
    except (tb_forge.ForgeError, FileNotFoundError, OSError) as exc:
        kept = _keep_logs(name, [tb_forge.log_path(root)])
        pytest.fail(f"the test bed's Gitea did not start: {exc}{kept}", pytrace=False)
    yield forge
    if request.session.testsfailed > failed_before:
        sys.stderr.write(_keep_logs(name, [forge.log]))
    forge.stop()
