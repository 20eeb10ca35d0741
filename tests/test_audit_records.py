"""Audit records as pure values: the chain's arithmetic, size limits, time parsing and rendering (no cluster)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import structlog

from gitopsd import audit
from gitopsd import log as gitopsd_log
from gitopsd.objects import ObjectRef


def _drift(app: str = "shop", **overrides) -> dict:
    base = dict(app=app, ref=ObjectRef("apps", "Deployment", "web", "web"), fields=["spec.replicas"],
                managers=["kubectl (Update)"], action="reported", revision="c" * 40, instance="gitopsd-0")
    return audit.drift_record(**{**base, **overrides})


def test_each_record_carries_the_hash_of_the_one_before():
    trail = audit.AuditLog(None, namespace="unused", instance="gitopsd-0")
    first, second = trail.record(_drift()), trail.record(_drift(action="corrected"))
    other_app = trail.record(_drift(app="billing"))

    assert (first["seq"], first["prev_hash"]) == (1, audit.GENESIS_HASH)
    assert (second["seq"], second["prev_hash"]) == (2, first["hash"])
    assert (other_app["seq"], other_app["prev_hash"]) == (1, audit.GENESIS_HASH), "one chain per app"
    assert audit.record_hash(second) == second["hash"]
    assert audit.record_hash({**second, "action": "reported"}) != second["hash"]
    assert first["time"].endswith("Z") and first["instance"] == "gitopsd-0"


def test_record_does_not_change_the_callers_dict():
    rec = _drift()
    before = json.dumps(rec, sort_keys=True)
    audit.AuditLog(None, namespace="unused").record(rec)
    assert json.dumps(rec, sort_keys=True) == before


def test_an_oversized_plan_is_cut_to_fit_not_dropped():
    objects = [{"group": "", "kind": "ConfigMap", "namespace": "ns", "name": f"cm-{i}", "action": "configured",
                "fields": [f"data.key-{k}" for k in range(30)], "done": True} for i in range(2000)]
    rec = audit.records.fit({"type": "transition", "app": "mono", "plan": {"objects": objects, "unchanged": 0},
                      "written": 2000})
    assert len(audit.canonical(rec)) <= audit.RECORD_MAX_BYTES
    assert rec["written"] == 2000
    assert len(rec["plan"]["objects"]) + rec["truncated"]["plan.objects"] == 2000


def test_drift_action_must_be_one_gitopsd_takes():
    try:
        _drift(action="ignored")
    except ValueError as exc:
        assert "corrected, reported, failed" in str(exc)
    else:
        raise AssertionError("an unknown drift action was accepted")


def test_times_are_iso_8601_or_an_age():
    now = datetime(2026, 11, 20, 15, 0, tzinfo=timezone.utc)
    assert audit.parse_time("2026-11-20T14:00:00Z") == datetime(2026, 11, 20, 14, tzinfo=timezone.utc)
    assert audit.parse_time("2026-11-20T14:00:00") == datetime(2026, 11, 20, 14, tzinfo=timezone.utc)
    assert audit.parse_time("2026-11-20T16:00:00+02:00") == datetime(2026, 11, 20, 14, tzinfo=timezone.utc)
    assert audit.parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert audit.parse_time("7d", now=now) == now - timedelta(days=7)
    try:
        audit.parse_time("yesterday")
    except ValueError as exc:
        assert "ISO 8601" in str(exc)
    else:
        raise AssertionError("a non-time was accepted")


def test_the_log_line_is_the_record_as_json_and_readable_on_a_terminal():
    out = io.StringIO()
    gitopsd_log.configure(fmt="json", stream=out)
    try:
        stored = audit.AuditLog(None, namespace="unused").record(_drift())
        gitopsd_log.configure(fmt="console", stream=out)
        audit.AuditLog(None, namespace="unused").record(_drift())
    finally:
        structlog.reset_defaults()
    json_line, console_line = out.getvalue().splitlines()
    line = json.loads(json_line)
    assert line["event"] == "audit" and line["level"] == "info"
    # The log line's own envelope, then the record as stored (its own time included).
    assert {k: v for k, v in line.items() if k not in ("event", "level", "timestamp", "logger")} == stored
    # On a terminal: one readable line (the chain fields stay in the JSON record).
    assert console_line.startswith("[info") and console_line.split()[2] == "audit"
    assert "audit shop:" in console_line and "drift reported" in console_line
    assert "Deployment.apps/web/web: spec.replicas" in console_line and "kubectl" in console_line
    assert "\n" not in console_line.strip() and "{" not in console_line, "no nested dicts dumped"


def test_history_lines_and_events_say_who_signed_and_whom_the_app_wrote_as():
    from gitopsd.report import event_note

    rec = {"type": "transition", "seq": 3, "time": "2026-11-20T14:00:03.123456Z", "result": "Applied",
           "previous": None, "revision": "2" * 40, "trigger": "poll", "reason": "1 created",
           "commit": {"author": "Ada Author <ada@example.com>", "message": "web"},
           "signature": {"provider": "ssh", "verdict": "good", "key": "SHA256:abc", "signer": "ada@example.com",
                         "commit": "2" * 40},
           "written_as": "system:serviceaccount:team-a:deployer",
           "plan": {"objects": [{"action": "created"}], "unchanged": 0}}
    trust = "  signed by ada@example.com (SHA256:abc)  as system:serviceaccount:team-a:deployer"
    assert trust in audit.summary_line(rec)
    assert trust in event_note(rec)
    refused = {**rec, "result": "Failed", "signature": {**rec["signature"], "verdict": "unsigned"}}
    assert "signed by" not in audit.summary_line(refused) and "signed by" not in event_note(refused)


def test_history_lines_say_what_happened_in_one_line():
    rec = {"type": "transition", "seq": 7, "time": "2026-11-20T14:00:03.123456Z", "result": "Applied",
           "previous": "1" * 40, "revision": "2" * 40, "trigger": "webhook",
           "commit": {"author": "Ada Author <ada@example.com>", "message": "bump web\n\nbody"},
           "plan": {"objects": [{"action": "created"}, {"action": "configured"}, {"action": "configured"}],
                    "unchanged": 4}}
    assert audit.summary_line(rec) == ('2026-11-20T14:00:03Z      #7  Applied    11111111->22222222  Ada Author  '
                                       '"bump web"  2 configured, 1 created, 4 unchanged  [webhook]')
    drift = {**_drift(), "seq": 8, "time": "2026-11-20T14:05:00.000000Z"}
    assert audit.summary_line(drift) == ("2026-11-20T14:05:00Z      #8  drift reported   "
                                         "Deployment.apps/web/web: spec.replicas (by kubectl (Update))")
