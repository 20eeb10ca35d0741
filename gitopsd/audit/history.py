"""Reading the audit trail back: `gitopsd history`, what was live at an instant, the last revision.

Records are read newest first, one segment at a time, so a short query on a
long history reads only the newest segment or two. Unreadable entries are
skipped here; gitopsd.audit.verify is the place that reports them.

What was live at an instant (`state_at`) needs the whole trail, oldest
first: a revision made live years ago is still live when nothing changed
the cluster since. It keeps whole records, so `gitopsd export` can check
the hashes of the ones its answer rests on; `live_at` is the same answer as
plain data for `gitopsd history --at`. Which results changed the cluster is
records.CLUSTER_CHANGING's to say, nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LiveState:
    """What the trail says about one instant, as whole records (so a caller can check their hashes).

    `live`: the transition that put the running revision there (None when
    nothing was live yet); `open_drift`: drift records still open at `when`;
    `partial`: later Failed attempts that wrote some objects; `first_change`:
    when nothing was live, the first transition that wrote the cluster after
    `when` (None when there is none); `first_seq`: the oldest seq still stored
    (above 1 when retention removed older records); `recorded`: whether the
    app has any record at all.
    """

    app: str
    namespace: str
    when: datetime
    live: dict | None
    open_drift: list[dict]
    partial: list[dict]
    first_change: dict | None
    first_seq: int | None
    recorded: bool

    @property
    def used(self) -> list[dict]:
        """The records an answer about this instant rests on (the live transition and the open drift)."""
        return ([self.live] if self.live is not None else []) + self.open_drift

    def nothing_live(self) -> str:
        """Why nothing was live at `when`, in one sentence that says where the trail starts."""
        if not self.recorded:
            return f"no audit records for app {self.app} in namespace {self.namespace}"
        text = f"no transition that wrote the cluster is recorded at or before {iso_time(self.when)}"
        if self.first_change is not None:
            text += (f"; the first is seq {self.first_change.get('seq')} at {self.first_change.get('time')} "
                     f"(revision {str(self.first_change.get('revision'))[:8]})")
        if isinstance(self.first_seq, int) and self.first_seq > 1:
            text += f" (records before seq {self.first_seq} were removed by retention)"
        return text


def state_at(kube: Kube, *, namespace: str, app: str, when: datetime) -> LiveState:
    """Which transition was live at `when`, and the drift open then (see live_at for the rules).

    Reads the whole trail (every segment) in seq order: the order the chain
    proves, whatever the writers' clocks said; the instant falls before the
    first record stamped after `when`. A record whose time cannot be read is
    skipped: it says nothing about any instant, and `gitopsd audit verify` is
    the place that names it.
    """
    records = _all_records(kube, namespace=namespace, app=app)
    timed = [r for r in records if _time_of(r) is not None]
    cut = next((i for i, r in enumerate(timed) if _time_of(r) > when), len(timed))
    live, drift, partial = _fold(timed[:cut])
    first_change = None if live is not None else next((r for r in timed[cut:] if _changes_cluster(r)), None)
    return LiveState(app=app, namespace=namespace, when=when, live=live, open_drift=drift, partial=partial,
                     first_change=first_change, first_seq=records[0].get("seq") if records else None,
                     recorded=bool(records))


def _changes_cluster(rec: dict) -> bool:
    return rec.get("type") == "transition" and rec.get("result") in CLUSTER_CHANGING


def _fold(records: list[dict]) -> tuple[dict | None, list[dict], list[dict]]:
    """Replay records oldest first: (the live transition, the open drift, partly written attempts since)."""
    live: dict | None = None
    drift: dict[tuple, dict] = {}
    partial: list[dict] = []
    for rec in records:
        if rec.get("type") == "transition":
            if _changes_cluster(rec):
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
    return live, list(drift.values()), partial


def live_at(kube: Kube, *, namespace: str, app: str, when: datetime) -> dict:
    """Which revision was live at `when`, who wrote it, and the drift open then.

    Live = the newest transition at or before `when` that wrote the app's
    objects: a result in records.CLUSTER_CHANGING (Applied, Unhealthy: an
    Unhealthy rollout is still what runs; whatever else the records module
    counts there). NoChange does not move it (nothing was written: a commit
    that only touched a README did not put anything in the cluster), nor do
    Failed, Refused or DryRun; a Failed attempt that wrote some objects
    before failing is listed under `partial`.

    Open drift = drift records after that transition and at or before `when`
    with action reported/failed, not since closed by a "corrected" record
    for the same object or by a transition that converged the app (Applied,
    Unhealthy or NoChange — a NoChange means nothing differed any more).
    """
    return answer(state_at(kube, namespace=namespace, app=app, when=when))


def answer(state: LiveState) -> dict:
    """The `history --at` answer (plain data, one JSON document) of a LiveState."""
    live = state.live
    out = {"app": state.app, "at": iso_time(state.when), "revision": None, "commit": None, "source": None,
           "ref": None, "transition": None, "open_drift": state.open_drift, "partial": state.partial, "note": None}
    if live is None:
        out["note"] = state.nothing_live()
        return out
    out.update(revision=live.get("revision"), commit=live.get("commit"), source=live.get("source"),
               ref=live.get("ref"),
               transition={k: live.get(k) for k in ("seq", "time", "result", "reason", "trigger", "previous",
                                                    "instance", "hash")})
    return out
