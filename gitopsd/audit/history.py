"""Reading the audit trail back: `gitopsd history`, what was live at an instant, the last revision.

Records are read newest first, one segment at a time, so a short query on a
long history reads only the newest segment or two. Unreadable entries are
skipped here; gitopsd.audit.verify is the place that reports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from gitopsd.audit.records import CLUSTER_CHANGING, CONVERGED, iso_time
from gitopsd.audit.segments import Segment, list_segments, parse_record, read_segment
from gitopsd.kube import Kube


def newest_first(kube: Kube, *, namespace: str, app: str, segments: list[Segment] | None = None) -> Iterator[dict]:
    """Records newest first, reading one segment at a time (so `--limit 5` reads one).

    Unreadable entries are skipped here; `verify` is the place that reports them.
    `segments`: the app's segments as just listed (saves listing them again).
    """
    if segments is None:
        segments = list_segments(kube, namespace=namespace, app=app)
    for seg in reversed(segments):
        cm = read_segment(kube, namespace=namespace, name=seg.name)
        if cm is None:
            continue   # removed by retention while we read
        data = cm.get("data") or {}
        for key in sorted(data, reverse=True):
            rec = parse_record(data[key])
            if rec is not None:
                yield rec


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An instant from ISO 8601 (`2026-11-20T14:00:00Z`; naive means UTC) or an age (`90m`, `2h`, `7d`,
    `1h30m`: a duration as the config reads it, with a unit; a bare `2026` is no age)."""
    from gitopsd.config import parse_duration

    text = text.strip()
    if not re.fullmatch(r"[\d.]*", text):
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=parse_duration(text))
        except ValueError:
            pass   # not an age; ISO 8601 below
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use ISO 8601 (2026-11-20T14:00:00Z) or an age (90m, 2h, 7d)") \
            from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _time_of(rec: dict) -> datetime | None:
    try:
        return parse_time(rec["time"])
    except (KeyError, TypeError, ValueError):
        return None


def history(kube: Kube, *, namespace: str, app: str, since: datetime | None = None,
            limit: int | None = None) -> list[dict]:
    """The app's records (transitions and drifts), newest first.

    Stops reading segments as soon as `limit` records are found or a record is
    older than `since`, so a short query on a long history stays cheap.
    """
    out: list[dict] = []
    for rec in newest_first(kube, namespace=namespace, app=app):
        when = _time_of(rec)
        if since is not None and when is not None and when < since:
            break
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def last_revision(kube: Kube, *, namespace: str, app: str, segments: list[Segment] | None = None) -> str | None:
    """The newest recorded revision the cluster converged to (Applied, Unhealthy or NoChange).

    What a new transition calls `previous`: a Failed or Refused attempt never
    became live, so it does not count. `segments`: see newest_first.
    """
    for rec in newest_first(kube, namespace=namespace, app=app, segments=segments):
        if rec.get("type") == "transition" and rec.get("result") in CONVERGED and rec.get("revision"):
            return rec["revision"]
    return None


def last_healthy(kube: Kube, *, namespace: str, app: str, besides: set[str]) -> str | None:
    """The newest revision, other than those in `besides`, recorded as applied and healthy: a
    transition that converged (Applied, NoChange, RolledBack) with health Healthy. What a
    rollback goes back to (gitopsd.daemon.release). None when the trail has none."""
    for rec in newest_first(kube, namespace=namespace, app=app):
        revision = rec.get("revision")
        if rec.get("type") == "transition" and rec.get("result") in CONVERGED and revision \
                and revision not in besides and (rec.get("health") or {}).get("outcome") == "Healthy":
            return revision
    return None


def _all_records(kube: Kube, *, namespace: str, app: str) -> list[dict]:
    recs = list(newest_first(kube, namespace=namespace, app=app))
    return sorted(recs, key=lambda r: r.get("seq") if isinstance(r.get("seq"), int) else -1)


def _object_key(obj: dict) -> tuple:
    return (obj.get("group", ""), obj.get("kind", ""), obj.get("namespace", ""), obj.get("name", ""))


def live_at(kube: Kube, *, namespace: str, app: str, when: datetime) -> dict:
    """Which revision was live at `when`, who wrote it, and the drift open then.

    Live = the newest transition at or before `when` that wrote the app's
    objects: result Applied or Unhealthy (an Unhealthy rollout is still what
    runs). NoChange does not move it (nothing was written: a commit that only
    touched a README did not put anything in the cluster), nor do Failed,
    Refused or DryRun; a Failed attempt that wrote some objects before
    failing is listed under `partial`.

    Open drift = drift records after that transition and at or before `when`
    with action reported/failed, not since closed by a "corrected" record
    for the same object or by a transition that converged the app (Applied,
    Unhealthy or NoChange — a NoChange means nothing differed any more).
    """
    records = _all_records(kube, namespace=namespace, app=app)
    live: dict | None = None
    drift: dict[tuple, dict] = {}
    partial: list[dict] = []
    for rec in records:
        t = _time_of(rec)
        if t is None or t > when:
            break
        if rec.get("type") == "transition":
            if rec.get("result") in CLUSTER_CHANGING:
                live, partial = rec, []
            if rec.get("result") in CONVERGED:
                drift.clear()
            elif rec.get("written"):
                partial.append(rec)
        elif rec.get("type") == "drift":
            key = _object_key(rec.get("object") or {})
            if rec.get("action") == "corrected":
                drift.pop(key, None)
            else:
                drift[key] = rec
    first_seq = records[0].get("seq") if records else None
    answer = {"app": app, "at": iso_time(when), "revision": None, "commit": None, "source": None, "ref": None,
              "transition": None, "open_drift": list(drift.values()), "partial": partial, "note": None}
    if live is not None:
        answer.update(revision=live.get("revision"), commit=live.get("commit"), source=live.get("source"),
                      ref=live.get("ref"),
                      transition={k: live.get(k) for k in ("seq", "time", "result", "reason", "trigger",
                                                           "previous", "instance", "hash")})
    elif not records:
        answer["note"] = f"no audit records for app {app} in namespace {namespace}"
    else:
        answer["note"] = f"no transition that wrote the cluster is recorded at or before {iso_time(when)}"
        if isinstance(first_seq, int) and first_seq > 1:
            answer["note"] += f" (records before seq {first_seq} were removed by retention)"
    return answer
