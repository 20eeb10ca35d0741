"""structlog end to end: every line of the process is one JSON object with the
same keys (timestamp, level, logger, event), libraries' records included,
scrubbed of secret values; --log-level; values bound once show on every line.

The in-process tests configure logging on a StringIO and restore structlog's
defaults afterwards; the daemon tests run the real `gitopsd run` (its log is
a pod's log) against the shared control plane.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import structlog
from helpers import app_entry, cm_data, configmap, metric, post_generic, wait_for, write_config

from gitopsd import log, redact

ENVELOPE = ["timestamp", "level", "logger", "event"]


@pytest.fixture
def lines() -> Iterator[Callable[[], list[dict]]]:
    """Configure JSON logging to a buffer; call the fixture's value for the lines written so far, parsed."""
    out = io.StringIO()
    log.configure(fmt="json", level="info", stream=out)

    def parsed() -> list[dict]:
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield parsed
    structlog.reset_defaults()
    log.configure(fmt="json", stream=io.StringIO())   # leave no handler writing to this test's buffer


def _secret() -> str:
    value = f"s3cret-{uuid.uuid4().hex}"
    redact.remember([value])
    return value


def test_stdlib_library_records_are_json_lines_with_the_standard_keys(lines) -> None:
    logging.getLogger("urllib3.connectionpool").warning("Retrying (%s) after connection broken", "Retry(total=2)")
    logging.getLogger("apscheduler.executors.default").warning("Run time of job %r was missed by %s", "poll", "0:00:03")
    structlog.get_logger("gitopsd.engine.sync").warning("apply retried", app="web")

    urllib3_line, apscheduler_line, own_line = lines()
    assert list(urllib3_line) == ENVELOPE
    assert urllib3_line["logger"] == "urllib3.connectionpool" and urllib3_line["level"] == "warning"
    assert urllib3_line["event"] == "Retrying (Retry(total=2)) after connection broken"
    assert urllib3_line["timestamp"].endswith("Z")   # ISO 8601, UTC
    assert apscheduler_line["logger"] == "apscheduler.executors.default"
    assert apscheduler_line["event"] == "Run time of job 'poll' was missed by 0:00:03"
    assert list(own_line) == [*ENVELOPE, "app"] and own_line["logger"] == "gitopsd.engine.sync"


def test_secret_values_are_scrubbed_from_library_records(lines) -> None:
    value = _secret()
    logging.getLogger("urllib3.connectionpool").warning("GET /repo?token=%s failed", value)
    try:
        raise ConnectionError(f"remote said: bad credentials {value}")
    except ConnectionError:
        logging.getLogger("git.cmd").exception("fetch failed")
    structlog.get_logger("gitopsd.daemon.runner").error("fetch failed", error={"remote": [f"said {value}"]})

    written = lines()
    assert len(written) == 3
    assert value not in json.dumps(written)
    assert redact.REDACTED in written[0]["event"]
    assert "ConnectionError" in written[1]["exception"] and redact.REDACTED in written[1]["exception"]
    assert written[2]["error"] == {"remote": [f"said {redact.REDACTED}"]}


def test_libraries_stay_at_warning_unless_the_level_is_debug() -> None:
    out = io.StringIO()
    try:
        log.configure(fmt="json", level="info", stream=out)
        _log_at_every_level()
        at_info = [(e["logger"], e["level"]) for e in map(json.loads, out.getvalue().splitlines())]
        out.seek(0), out.truncate()
        log.configure(fmt="json", level="debug", stream=out)
        _log_at_every_level()
        at_debug = [(e["logger"], e["level"]) for e in map(json.loads, out.getvalue().splitlines())]
    finally:
        structlog.reset_defaults()
        log.configure(fmt="json", stream=io.StringIO())
    assert at_info == [("gitopsd.daemon.runner", "info"), ("apscheduler.scheduler", "warning")]
    assert at_debug == [("gitopsd.daemon.runner", "debug"), ("gitopsd.daemon.runner", "info"),
                        ("apscheduler.scheduler", "info"), ("apscheduler.scheduler", "warning"),
                        ("urllib3.connectionpool", "debug")]
    # Response bodies (a Secret's data) never, whatever the level.
    assert not any(name == "kubernetes.client.rest" for name, _ in at_info + at_debug)


def _log_at_every_level() -> None:
    own = structlog.get_logger("gitopsd.daemon.runner")
    own.debug("reconciled: no change")
    own.info("reconcile started")
    logging.getLogger("apscheduler.scheduler").info("Scheduler started")
    logging.getLogger("apscheduler.scheduler").warning("Execution of job skipped")
    logging.getLogger("urllib3.connectionpool").debug("Starting new HTTPS connection (1): 127.0.0.1:6443")
    logging.getLogger("kubernetes.client.rest").debug("response body: {\"data\": {\"password\": \"...\"}}")


def test_bound_context_shows_on_every_line(lines) -> None:
    own = structlog.get_logger("gitopsd.daemon.runner")
    pool_lines = []

    def in_a_pool_thread() -> None:
        logging.getLogger("urllib3.connectionpool").warning("connection pool is full")
        pool_lines.append(True)

    with log.scope(app="web", trigger="webhook"):
        own.info("reconcile started")
        log.bind(revision="0123456789ab")
        own.info("fetched")
        logging.getLogger("urllib3.connectionpool").warning("Retrying")
        with log.scope(object="Deployment.apps/web/web"):
            own.warning("drift corrected")
        own.info("applied")
        worker = threading.Thread(target=log.in_context(in_a_pool_thread))
        worker.start()
        worker.join()
        bare_thread = threading.Thread(target=lambda: own.info("a thread not given the context"))
        bare_thread.start()
        bare_thread.join()
    own.info("after the reconcile")

    started, fetched, retry, drift, applied, pooled, bare, after = lines()
    assert pool_lines == [True]
    assert {k: started[k] for k in ("app", "trigger")} == {"app": "web", "trigger": "webhook"}
    for line in (fetched, retry, drift, applied, pooled):
        assert (line["app"], line["trigger"], line["revision"]) == ("web", "webhook", "0123456789ab"), line
    assert drift["object"] == "Deployment.apps/web/web" and "object" not in applied, "a nested scope ends"
    assert "app" not in bare and "app" not in after, "nothing leaks past the scope, or into other threads"


def test_console_format_renders_library_records_readably() -> None:
    out = io.StringIO()
    try:
        log.configure(fmt="console", level="info", stream=out)
        logging.getLogger("urllib3.connectionpool").warning("Retrying after %s", "connection reset")
    finally:
        structlog.reset_defaults()
        log.configure(fmt="json", stream=io.StringIO())
    [line] = out.getvalue().splitlines()
    assert "[warning" in line and "Retrying after connection reset" in line and "urllib3.connectionpool" in line
    assert not line.startswith("{")


def test_python_warnings_become_log_lines() -> None:
    # In a fresh process: pytest captures warnings in its own.
    code = ("import warnings\nfrom gitopsd import log\nlog.configure(fmt='json')\n"
            "warnings.warn('this option is deprecated', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    [line] = [json.loads(text) for text in proc.stdout.splitlines()]
    assert line["logger"] == "py.warnings" and line["level"] == "warning" and "deprecated" in line["event"]
    assert proc.stderr == ""


def test_a_thread_that_dies_of_an_exception_logs_one_scrubbed_json_line() -> None:
    # In a fresh process: the hook is process-wide.
    code = ("import threading\nfrom gitopsd import log, redact\nlog.configure(fmt='json')\n"
            "redact.remember(['hunter2-token'])\n"
            "def boom():\n    raise RuntimeError('cannot reach hunter2-token')\n"
            "t = threading.Thread(target=boom, name='poller')\nt.start()\nt.join()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    [line] = [json.loads(text) for text in proc.stdout.splitlines()]
    assert line["event"] == "uncaught exception" and line["level"] == "error" and line["thread"] == "poller"
    assert "RuntimeError: cannot reach" in line["exception"] and "Traceback" in line["exception"]
    assert "hunter2-token" not in proc.stdout
    assert proc.stderr == "", "no plain traceback beside the JSON line"


def test_an_uncaught_exception_in_the_main_thread_is_a_json_line_and_fails_the_process() -> None:
    code = "from gitopsd import log\nlog.configure(fmt='json')\nraise ValueError('bad start')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    [line] = [json.loads(text) for text in proc.stdout.splitlines()]
    assert line["event"] == "uncaught exception" and "ValueError: bad start" in line["exception"]
    assert proc.returncode == 1 and proc.stderr == ""


# --------------------------------------------------------------------------
# The daemon's own log (`gitopsd run` as a subprocess)


def _no_change_then_a_commit(repo, kube, namespace, tmp_path, start_daemon, *flags: str):
    """A daemon that applies a commit, is pushed the same commit (a reconcile
    with no change: the runner's debug line), then a new one. Reconciles of an
    app run one after the other, so once the second audit line is written,
    the no-change reconcile's lines are all in the log."""
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    first = repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(namespace, repo.url, namespace)])
    daemon = start_daemon(config, *flags)
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    assert post_generic(daemon, repo.url, first)[0] == 202
    wait_for("the no-change reconcile", lambda: metric(
        daemon, "gitopsd_reconcile_total", app=namespace, trigger="webhook", outcome="NoChange") == 1, 15)
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    second = repo.commit()
    assert post_generic(daemon, repo.url, second)[0] == 202
    daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("revision") == second, "the second commit applied")
    return daemon


def test_log_level_debug_shows_debug_lines_and_every_line_is_json(repo, kube, namespace, tmp_path, start_daemon):
    daemon = _no_change_then_a_commit(repo, kube, namespace, tmp_path, start_daemon, "--log-level", "debug")

    raw = daemon.log_path.read_text().splitlines()
    events = [json.loads(line) for line in raw]   # every line: a pod's log is all JSON
    assert all(list(e)[:4] == ENVELOPE for e in events), [e for e in events if list(e)[:4] != ENVELOPE][:3]
    assert any(e["event"] == "reconciled: no change" and e["level"] == "debug" for e in events)
    loggers = {(e["logger"].split(".")[0], e["level"]) for e in events}
    assert ("urllib3", "debug") in loggers, "library debug lines are shown at debug"
    assert ("apscheduler", "info") in loggers


def test_log_level_info_hides_debug_and_library_chatter(repo, kube, namespace, tmp_path, start_daemon):
    daemon = _no_change_then_a_commit(repo, kube, namespace, tmp_path, start_daemon)   # the default: info

    events = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    assert [e for e in events if e["level"] == "debug"] == []
    assert [e for e in events if not e["logger"].startswith("gitopsd") and e["level"] in ("debug", "info")] == []
    assert sum(e["event"] == "audit" for e in events) == 2


def test_a_runs_lines_carry_its_app_trigger_and_revision(repo, kube, namespace, tmp_path, start_daemon):
    """Bound once by the runner (gitopsd.log.scope), not passed by hand: even library lines
    logged inside the run (urllib3 at debug) say which app, trigger and commit they belong to."""
    daemon = _no_change_then_a_commit(repo, kube, namespace, tmp_path, start_daemon, "--log-level", "debug")

    events = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    no_change = next(e for e in events if e["event"] == "reconciled: no change")
    assert no_change["app"] == namespace and no_change["trigger"] == "webhook"
    first_audit = next(e for e in events if e["event"] == "audit")
    assert no_change["revision"] == first_audit["revision"][:12], "the commit of the run, bound once fetched"
    in_run = [e for e in events if e["logger"].startswith("urllib3") and e.get("app") == namespace]
    assert in_run and all(e.get("trigger") for e in in_run), "library lines inside a run carry its context"
