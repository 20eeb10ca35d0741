"""Bad input through the real command line, and how the CLI fails.

Every flag of every subcommand is checked before anything runs, by the
validators the config file uses (gitopsd.config), so a flag accepts what the
file accepts, with the same words. Each bad input below runs the real
`gitopsd` as a subprocess and must: exit 2 (argparse's usage-error code, which
scripts never confuse with 1 = drift / refused), name the flag (or the
environment variable, or the file) and the reason, print no Python traceback,
and leave the cluster exactly as it was: every object's resourceVersion in
the app's namespace is compared before and after.

The app under test is set up so that running a bad sync by mistake would be
seen: the cluster holds four ConfigMaps from the first commit, and the head
commit keeps only one of them. A real sync there is refused by the prune
guard (75% > 50%); `--prune-guard 50` used to switch the guard off and prune.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import GitRepo, configmap, gitopsd

pytestmark = pytest.mark.cluster


@dataclass
class World:
    namespace: str
    repo_url: str
    kubeconfig: Path
    cache: Path
    files: Path
    kube: object

    @property
    def app(self) -> str:
        return self.namespace

    def sync_args(self) -> list[str]:
        return ["--repo", self.repo_url, "--ref", "main", "--namespace", self.namespace, "--app", self.app,
                "--inventory-namespace", self.namespace]

    def snapshot(self) -> dict[str, str]:
        """Every object gitopsd could touch for this app, by kind/name -> resourceVersion."""
        out = {}
        for kind in ("ConfigMap", "Secret", "Event"):
            for obj in self.kube.list(self.kube.resource("v1", kind), namespace=self.namespace):
                out[f"{kind}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
        for obj in self.kube.list(self.kube.resource("coordination.k8s.io/v1", "Lease"), namespace=self.namespace):
            out[f"Lease/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
        return out


@pytest.fixture(scope="module")
def world(api_client, kubeconfig, kube, tmp_path_factory) -> World:
    """One app synced from a first commit, whose head commit would prune 3 of its 4 ConfigMaps."""
    from kubernetes import client

    root = tmp_path_factory.mktemp("cli-input")
    namespace = f"cli-input-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace, "labels": {"gitopsd-test": "true"}}})
    repo = GitRepo(root / "git")
    for i in range(4):
        repo.write(f"cm-{i}.yaml", configmap(f"cm-{i}", {"i": str(i)}))
    repo.commit("four settings")
    w = World(namespace=namespace, repo_url=repo.url, kubeconfig=kubeconfig, cache=root / "cache",
              files=root / "files", kube=kube)
    first = gitopsd("sync", *w.sync_args(), kubeconfig=kubeconfig, cache=w.cache)
    assert first.returncode == 0, first.stdout + first.stderr
    for i in range(1, 4):
        repo.remove(f"cm-{i}.yaml")
    repo.commit("keep one setting")

    w.files.mkdir()
    (w.files / "empty").write_text("")
    (w.files / "blank").write_text("  \n\n")
    (w.files / "a-directory").mkdir()
    (w.files / "apps.yaml").write_text("apps: []\n")
    (w.files / "no-apps-key.yaml").write_text("webhook: {secretFile: /etc/gitopsd/webhook}\n")
    yield w
    core.delete_namespace(namespace)


def run(w: World, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "KUBECONFIG": str(w.kubeconfig), "GITOPSD_CACHE": str(w.cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gitopsd", *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# Each case: id, the arguments (given the World), the words the message must hold, extra environment.
F = "{files}"   # replaced by the World's scratch directory
CASES = [
    # sync: the flags that decide what gets deleted
    ("sync-prune-guard-as-percent", ["sync", "@app", "--prune-guard", "50"],
     ["argument --prune-guard", "50 is out of range", "0 < x <= 1"], None),
    ("sync-prune-guard-zero", ["sync", "@app", "--prune-guard", "0"],
     ["argument --prune-guard", "0 is out of range"], None),
    ("sync-prune-guard-nan", ["sync", "@app", "--prune-guard", "nan"],
     ["argument --prune-guard", '"nan" is not a number'], None),
    ("sync-prune-guard-typo-flag", ["sync", "@app", "--prune-gaurd", "0.9"],
     ["unrecognized arguments: --prune-gaurd"], None),
    ("sync-timeout-word", ["sync", "@app", "--timeout", "soon"],
     ["argument --timeout", '"soon" is not a duration', "use 30s, 1m, 1h30m"], None),
    ("sync-timeout-negative", ["sync", "@app", "--timeout=-5m"],
     ["argument --timeout", '"-5m" is negative'], None),
    ("sync-timeout-too-short", ["sync", "@app", "--timeout", "500ms"],
     ["argument --timeout", "too short: at least 1s", "health wait"], None),
    ("sync-timeout-overflow", ["sync", "@app", "--timeout", "99999999999h"],
     ["argument --timeout", "too long: at most 3650d"], None),
    ("sync-concurrency-zero", ["sync", "@app", "--concurrency", "0"],
     ["argument --concurrency", "0 is out of range: use 1 to 256"], None),
    ("sync-render-unknown", ["sync", "@app", "--render", "jsonnet"],
     ["argument --render", "invalid choice: 'jsonnet'"], None),
    ("sync-path-absolute", ["sync", "@app", "--path", "/etc"],
     ["argument --path", '"/etc" is absolute', "relative to the repository root"], None),
    ("sync-values-outside-repo", ["sync", "@app", "--values", "../../etc/passwd"],
     ["argument --values", "leaves the repository through '..'"], None),
    ("sync-values-without-helm", ["sync", "@app", "--render", "kustomize", "--values", "values.yaml"],
     ["argument --values", "only used with --render helm or auto, and --render is kustomize"], None),
    ("sync-ref-with-space", ["sync", "@app", "--ref", "main dev"],
     ["argument --ref", "contains whitespace"], None),
    ("sync-namespace-invalid", ["sync", "@app", "--namespace", "Bad_NS"],
     ["argument --namespace/-n", '"Bad_NS" is not a valid namespace'], None),
    ("sync-app-invalid", ["sync", "@app", "--app", "Web_Prod"],
     ["argument --app", '"Web_Prod" is not a valid app name'], None),
    ("sync-ssh-key-missing", ["sync", "@app", "--ssh-key", F + "/no-such-key"],
     ["argument --ssh-key", "no-such-key: does not exist"], None),
    ("sync-inventory-namespace-from-env", ["sync", "@app-no-inventory"],
     ["$GITOPSD_NAMESPACE (the default of --inventory-namespace)", '"Not_A_Namespace" is not a valid namespace'],
     {"GITOPSD_NAMESPACE": "Not_A_Namespace"}),
    ("sync-username-without-token", ["sync", "@app", "--git-username", "deploy"],
     ["argument --git-username", "give --git-token-file or set GITOPSD_GIT_TOKEN"], None),
    ("sync-take-over-every-manager", ["sync", "@app", "--take-over-managers", "kubectl-edit,*"],
     ["argument --take-over-managers", '"*" would take over every controller\'s fields too', "name the managers"],
     None),
    ("diff-take-over-manager-with-space", ["diff", "@app", "--take-over-managers", "kubectl edit"],
     ["argument --take-over-managers", '"kubectl edit" is not a field manager name'], None),
    # diff
    ("diff-concurrency-word", ["diff", "@app", "--concurrency", "lots"],
     ["argument --concurrency", '"lots" is not a whole number'], None),
    ("diff-token-file-missing", ["diff", "@app", "--git-token-file", "/no/such/token"],
     ["argument --git-token-file", "/no/such/token: does not exist"], None),
    ("diff-token-file-directory", ["diff", "@app", "--git-token-file", F + "/a-directory"],
     ["argument --git-token-file", "is a directory, not a file"], None),
    ("diff-token-file-empty", ["diff", "@app", "--git-token-file", F + "/blank"],
     ["argument --git-token-file", "is empty; it must hold the token"], None),
    ("diff-known-hosts-directory", ["diff", "@app", "--known-hosts", F + "/a-directory"],
     ["argument --known-hosts", "is a directory, not a file"], None),
    ("diff-repo-with-password", ["diff", "--repo", "https://bot:s3cr3t-pass@git.example.com/fleet.git"],
     ["argument --repo", "carries a password", "https://git.example.com/fleet.git", "--git-token-file"], None),
    ("diff-path-escapes", ["diff", "@app", "--path", "../other-app"],
     ["argument --path", "leaves the repository through '..'"], None),
    ("diff-app-too-long", ["diff", "@app", "--app", "a" * 41],
     ["argument --app", "at most 40 characters"], None),
    ("diff-kubeconfig-missing", ["diff", "@app", "--kubeconfig", F + "/no-kubeconfig"],
     ["argument --kubeconfig", "no-kubeconfig: does not exist"], None),
    ("diff-context-empty", ["diff", "@app", "--context", ""],
     ["argument --context", "is empty"], None),
    ("diff-output-yaml", ["diff", "@app", "-o", "yaml"],
     ["argument --output/-o", "invalid choice: 'yaml'"], None),
    # run: nothing may start
    ("run-config-missing", ["run", "--config", F + "/no-such-apps.yaml", "--no-leader-elect"],
     ["argument --config", "no-such-apps.yaml: does not exist"], None),
    ("run-config-directory", ["run", "--config", F + "/a-directory", "--no-leader-elect"],
     ["argument --config", "is a directory, not a file"], None),
    ("run-config-empty", ["run", "--config", F + "/empty", "@run"],
     ["/empty: invalid config", "the file is empty", "apps: []"], None),
    ("run-config-whitespace", ["run", "--config", F + "/blank", "@run"],
     ["/blank: invalid config", "the file is empty", "apps: []"], None),
    ("run-config-without-apps", ["run", "--config", F + "/no-apps-key.yaml", "@run"],
     ["no-apps-key.yaml: invalid config", "apps: missing"], None),
    ("run-http-port-out-of-range", ["run", "--config", F + "/apps.yaml", "--http-port", "70000"],
     ["argument --http-port", "70000 is out of range: use 0 to 65535"], None),
    ("run-http-port-from-env", ["run", "--config", F + "/apps.yaml"],
     ["$GITOPSD_HTTP_PORT (the default of --http-port)", '"eighty" is not a whole number'],
     {"GITOPSD_HTTP_PORT": "eighty"}),
    ("run-log-format-from-env", ["run", "--config", F + "/apps.yaml"],
     ["$GITOPSD_LOG_FORMAT (the default of --log-format)", "'xml' is not one of auto, json, console"],
     {"GITOPSD_LOG_FORMAT": "xml"}),
    ("run-lease-renew-not-shorter", ["run", "--config", F + "/apps.yaml", "--lease-duration", "10s",
                                     "--lease-renew", "10s"],
     ["argument --lease-renew", "is not shorter than --lease-duration"], None),
    ("run-lease-duration-word", ["run", "--config", F + "/apps.yaml", "--lease-duration", "forever"],
     ["argument --lease-duration", '"forever" is not a duration'], None),
    ("run-advertise-url-without-scheme", ["run", "--config", F + "/apps.yaml", "--advertise-url", "10.0.0.7:8080"],
     ["argument --advertise-url", "is not an http(s) URL"], None),
    ("run-http-address-invalid", ["run", "--config", F + "/apps.yaml", "--http-address", "local host"],
     ["argument --http-address", "is not an IP address or host name"], None),
    ("run-concurrency-fraction", ["run", "--config", F + "/apps.yaml", "--concurrency", "2.5"],
     ["argument --concurrency", '"2.5" is not a whole number'], None),
    ("run-instance-with-space", ["run", "--config", F + "/apps.yaml", "--instance", "my replica"],
     ["argument --instance", "is not a name"], None),
    # status, history, audit verify
    ("status-app-invalid", ["status", "Bad_App", "@ns"],
     ["argument app", '"Bad_App" is not a valid app name'], None),
    ("status-namespace-empty", ["status", "--namespace", ""],
     ["argument --namespace", '"" is not a valid namespace'], None),
    ("history-since-word", ["history", "@appname", "@ns", "--since", "yesterday"],
     ["argument --since", "'yesterday' is not a time", "ISO 8601"], None),
    ("history-since-bare-number", ["history", "@appname", "@ns", "--since", "90"],
     ["argument --since", "'90' is not a time"], None),
    ("history-limit-zero", ["history", "@appname", "@ns", "--limit", "0"],
     ["argument --limit", "0 is out of range: use 1 to"], None),
    ("history-at-with-limit", ["history", "@appname", "@ns", "--at", "1h", "--limit", "5"],
     ["argument --at", "--since and --limit do not apply"], None),
    ("audit-verify-app-path", ["audit", "verify", "../gitopsd-system", "@ns"],
     ["argument app", "is not a valid app name"], None),
    ("audit-verify-kubeconfig-directory", ["audit", "verify", "@appname", "@ns", "--kubeconfig", F + "/a-directory"],
     ["argument --kubeconfig", "is a directory, not a file"], None),
]


def _argv(w: World, template: list[str]) -> list[str]:
    out: list[str] = []
    for item in template:
        if item == "@app":
            out += w.sync_args()
        elif item == "@app-no-inventory":
            out += w.sync_args()[:-2]
        elif item == "@run":
            out += ["--namespace", w.namespace, "--no-leader-elect", "--http-address", "127.0.0.1", "--http-port",
                    "0", "--log-format", "json"]
        elif item == "@ns":
            out += ["--namespace", w.namespace]
        elif item == "@appname":
            out.append(w.app)
        else:
            out.append(item.replace(F, str(w.files)))
    return out


def test_there_are_at_least_twenty_distinct_bad_inputs() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 20
    commands = {c[1][0] if c[1][0] != "audit" else "audit verify" for c in CASES}
    assert commands == {"sync", "diff", "run", "status", "history", "audit verify"}


@pytest.mark.parametrize(("template", "words", "env"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_flag_and_reason_and_leaves_cluster_untouched(world, template, words, env):
    before = world.snapshot()
    proc = run(world, *_argv(world, template), env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{output}"
    for word in words:
        assert word.replace(F, str(world.files)) in output, f"{word!r} not in:\n{output}"
    assert "Traceback" not in output, output
    assert "s3cr3t-pass" not in output
    assert world.snapshot() == before, "the cluster changed"


def test_flags_accept_what_the_config_accepts(world):
    """--timeout takes durations like the file (and kubectl, flux); a share up to 1 is a valid prune guard."""
    before = world.snapshot()
    for timeout in ("90s", "5m", "1h30m", "300"):
        proc = run(world, "sync", *world.sync_args(), f"--timeout={timeout}", "--prune-guard", "0.99", "--dry-run",
                   "-o", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["outcome"] == "DryRun"
    assert world.snapshot() == before, "a dry run wrote to the cluster"


def test_prune_guard_still_refuses_with_a_valid_share(world):
    """The head commit drops 3 of 4 objects: the default guard refuses (exit 1), nothing is deleted."""
    proc = run(world, "sync", *world.sync_args(), "--timeout", "1m", "-o", "json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "Refused"
    names = {o["metadata"]["name"] for o in world.kube.list(world.kube.resource("v1", "ConfigMap"),
                                                              namespace=world.namespace)}
    assert {"cm-0", "cm-1", "cm-2", "cm-3"} <= names


def _with_a_bug(w: World, *args: str, exc: str) -> subprocess.CompletedProcess:
    """The real CLI with one function replaced by one that raises ``exc``: an
    unexpected exception stands for a bug we do not know of yet."""
    code = ("import sys, gitopsd.engine.sync as s\n"
            "def broken(*a, **k):\n"
            f"    raise {exc}\n"
            "s.fetch_and_plan = broken\n"
            "from gitopsd.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n")
    env = {**os.environ, "KUBECONFIG": str(w.kubeconfig), "GITOPSD_CACHE": str(w.cache)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_bug_in_diff_exits_2_not_1_with_one_line_and_one_traceback(world):
    proc = _with_a_bug(world, "diff", *world.sync_args(), exc="KeyError('spec')")
    assert proc.returncode == 2, proc.stdout + proc.stderr   # 1 would read as "drift"
    assert proc.stderr.count("this is a bug in gitopsd") == 1, proc.stderr
    assert "KeyError: 'spec'" in proc.stderr.splitlines()[0]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    assert proc.stdout == ""


def test_a_bug_with_json_output_still_writes_json(world):
    proc = _with_a_bug(world, "diff", *world.sync_args(), "-o", "json", exc="TypeError('unhashable type')")
    assert proc.returncode == 2
    assert "this is a bug in gitopsd" in json.loads(proc.stdout)["error"]
    assert proc.stderr.count("Traceback (most recent call last)") == 1


def test_a_user_error_has_no_traceback_unless_debug(world):
    args = ["diff", "--repo", "file:///nonexistent/repo.git", "--namespace", world.namespace,
            "--inventory-namespace", world.namespace]
    plain = run(world, *args)
    assert plain.returncode == 2 and "nonexistent" in plain.stdout + plain.stderr
    assert "Traceback" not in plain.stdout + plain.stderr
    # A GitopsdError raised outside the command's own handling (here: from the planner) gets a traceback on --debug.
    code = ("import sys, gitopsd.engine.sync as s\nfrom gitopsd.errors import ClusterError\n"
            "def refused(*a, **k):\n    raise ClusterError('the apiserver said no', hint='ask it nicely')\n"
            "s.fetch_and_plan = refused\nfrom gitopsd.cli import main\nraise SystemExit(main(sys.argv[1:]))\n")
    env = {**os.environ, "KUBECONFIG": str(world.kubeconfig), "GITOPSD_CACHE": str(world.cache)}
    quiet = subprocess.run([sys.executable, "-c", code, "diff", *world.sync_args()], env=env, capture_output=True,
                           text=True, timeout=60)
    assert quiet.returncode == 2 and "the apiserver said no" in quiet.stdout + quiet.stderr
    assert "Traceback" not in quiet.stdout + quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "diff", "--debug", *world.sync_args()], env=env,
                          capture_output=True, text=True, timeout=60)
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr


def test_ctrl_c_exits_130_without_a_traceback_and_stops_git(world):
    """SIGINT while `gitopsd diff` waits on a Git server that never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(60)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/fleet.git"
        env = {**os.environ, "KUBECONFIG": str(world.kubeconfig), "GITOPSD_CACHE": str(world.cache),
               "GIT_TERMINAL_PROMPT": "0"}
        # As from a terminal: SIGINT delivered and raising KeyboardInterrupt, whatever this process
        # was started with (a job a non-interactive shell puts in the background has it ignored, and
        # an ignored or blocked signal passes to every child).
        as_from_a_terminal = ("import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                              "signal.signal(signal.SIGINT, signal.default_int_handler); "
                              "sys.argv[0] = 'gitopsd'; runpy.run_module('gitopsd', run_name='__main__')")
        proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "diff", "--repo", url, "--namespace",
                                 world.namespace, "--inventory-namespace", world.namespace],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn = _git_asking(server, "/fleet.git/")   # git is fetching: gitopsd is inside the source stage
            with conn:
                proc.send_signal(signal.SIGINT)
                try:
                    out, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                    raise AssertionError("gitopsd did not exit within 60 s of SIGINT: "
                                         f"{[line for line in status if line.startswith(('Sig', 'ShdPnd'))]}") from None
                assert _closed(conn), "git went with gitopsd: its connection is closed, not left waiting"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in out + err


def _closed(conn: socket.socket) -> bool:
    """Whether the peer has closed (EOF or reset) within the connection's timeout."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _git_asking(server: socket.socket, path: str) -> socket.socket:
    """The first connection whose request names `path`: git's. A loopback port is reused from the
    ephemeral range, so another process retrying an old port of its own can reach this one first;
    signalling gitopsd on such a connection would interrupt it before it reaches git."""
    while True:
        conn, _ = server.accept()
        conn.settimeout(30)
        try:
            head = conn.recv(4096)
        except OSError:
            head = b""
        if path.encode() in head.split(b"\r\n", 1)[0]:
            return conn
        conn.close()


# --------------------------------------------------------------------------
# `gitopsd status` with a hand-edited parent ConfigMap


def _stored_status(app: str) -> dict:
    return {"app": app, "revision": "0123456789abcdef0123456789abcdef01234567", "ref": "main", "result": "Applied",
            "reason": "3 created", "health": "Healthy", "lastTransition": "2026-11-20T14:00:00Z",
            "lastDrift": None, "interval": 60.0, "suspended": False}


def _three_apps_with_one_edited(kube, namespace: str, raw: str) -> None:
    """alpha, broken and gamma report status as the daemon does; then broken's is edited by hand."""
    from gitopsd.daemon import status

    for app in ("alpha", "broken", "gamma"):
        status.write(kube, app=app, namespace=namespace, status=_stored_status(app))
    kube.request("PATCH", kube.resource("v1", "ConfigMap").path(namespace, "gitopsd-broken"),
                 body={"data": {"status": raw}}, content_type="application/merge-patch+json")


_HUGE = json.dumps({**_stored_status("broken"), "reason": "x" * 900_000})   # a ConfigMap holds up to 1 MiB
CORRUPTIONS = [
    ("invalid-json", '{"app": "broken", "result": ', "is not valid JSON (unexpected end of data"),
    ("not-an-object", '["broken", "Applied"]', "holds a JSON array, not an object"),
    ("wrong-types", json.dumps({"app": "broken", "result": 7, "health": ["Healthy"], "interval": "1m",
                                "suspended": "no", "lastDrift": "yesterday"}),
     "'result' is a JSON number, expected string; 'health' is a JSON array, expected string; 'lastDrift' is a "
     "JSON string, expected object or null; 'interval' is a JSON string, expected number; 'suspended' is a JSON "
     "string, expected boolean"),
    ("missing-keys", json.dumps({"app": "broken", "revision": "abc"}), "misses 'result', 'health'"),
    ("huge-value", _HUGE, f"is {len(_HUGE):,} bytes, more than the 64 KiB read"),
    ("another-apps-status", json.dumps(_stored_status("alpha")),
     "names app 'alpha', but the ConfigMap is the parent of app 'broken'"),
    ("emptied", "", "is empty"),
]


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_status_reports_a_corrupted_app_and_shows_the_others(kube, namespace, kubeconfig, tmp_path, raw, reason):
    _three_apps_with_one_edited(kube, namespace, raw)
    where = f"ConfigMap {namespace}/gitopsd-broken, key 'status': "

    every = gitopsd("status", "--namespace", namespace, kubeconfig=kubeconfig, cache=tmp_path)
    assert every.returncode == 0, every.stdout + every.stderr
    rows = {line.split()[0]: line for line in every.stdout.splitlines()[1:]}
    assert set(rows) == {"alpha", "broken", "gamma"}, every.stdout
    assert "Applied" in rows["alpha"] and "Applied" in rows["gamma"] and "0123456789ab" in rows["gamma"]
    assert "Unreadable" in rows["broken"]
    assert f"warning: app broken: unreadable status: {where}{reason}" in every.stderr, every.stderr
    assert f"kubectl -n {namespace} patch configmap gitopsd-broken" in every.stderr
    assert len(every.stdout) < 2000 and len(every.stderr) < 2000, "a huge value must not be echoed"

    as_json = gitopsd("status", "--namespace", namespace, "-o", "json", kubeconfig=kubeconfig, cache=tmp_path)
    assert as_json.returncode == 0
    entries = {e["app"]: e for e in json.loads(as_json.stdout)}
    assert entries["alpha"]["result"] == "Applied" and entries["gamma"]["result"] == "Applied"
    assert entries["broken"]["error"].startswith(where + reason)
    assert entries["broken"]["configMap"] == f"{namespace}/gitopsd-broken"

    asked = gitopsd("status", "broken", "--namespace", namespace, kubeconfig=kubeconfig, cache=tmp_path)
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert f"error: app broken: unreadable status: {where}{reason}" in asked.stderr

    other = gitopsd("status", "gamma", "--namespace", namespace, kubeconfig=kubeconfig, cache=tmp_path)
    assert other.returncode == 0 and "gamma" in other.stdout and "broken" not in other.stdout + other.stderr
    for proc in (every, as_json, asked, other):
        assert "Traceback" not in proc.stdout + proc.stderr


def test_status_of_an_app_that_never_reported_exits_1(kube, namespace, kubeconfig, tmp_path):
    from gitopsd.daemon import status

    status.write(kube, app="alpha", namespace=namespace, status=_stored_status("alpha"))
    proc = gitopsd("status", "beta", "--namespace", namespace, kubeconfig=kubeconfig, cache=tmp_path)
    assert proc.returncode == 1
    assert f"no status for app 'beta' in namespace {namespace}" in proc.stderr


def test_status_strips_terminal_control_characters_from_a_hand_edited_status(kube, namespace, kubeconfig,
                                                                             tmp_path):
    sneaky = {**_stored_status("broken"), "result": "\x1b[2J\x1b[31mApplied", "reason": "line\nbreak\rreturn"}
    _three_apps_with_one_edited(kube, namespace, json.dumps(sneaky))
    proc = gitopsd("status", "--namespace", namespace, kubeconfig=kubeconfig, cache=tmp_path)
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    assert len(proc.stdout.splitlines()) == 4   # header + three rows: the newline in the reason did not add one


def test_a_bug_in_the_daemon_is_one_error_line_with_its_traceback_in_the_log(world):
    """`gitopsd run --log-format json`: the bug is one JSON event at error level (traceback inside), exit 2."""
    code = ("import sys, gitopsd.daemon as d\n"
            "def broken(self):\n    raise RuntimeError('scheduler exploded')\n"
            "d.Daemon.start = broken\n"
            "from gitopsd.cli import main\nraise SystemExit(main(sys.argv[1:]))\n")
    env = {**os.environ, "KUBECONFIG": str(world.kubeconfig), "GITOPSD_CACHE": str(world.cache)}
    proc = subprocess.run([sys.executable, "-c", code, "run", "--config", str(world.files / "apps.yaml"),
                           "--namespace", world.namespace, "--no-leader-elect", "--http-address", "127.0.0.1",
                           "--http-port", "0", "--log-format", "json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    events = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines()]   # every line is JSON
    bugs = [e for e in events if "this is a bug in gitopsd" in e["event"]]
    assert len(bugs) == 1 and bugs[0]["level"] == "error"
    assert "RuntimeError: scheduler exploded" in bugs[0]["exception"]
    assert sum("Traceback (most recent call last)" in json.dumps(e) for e in events) == 1
