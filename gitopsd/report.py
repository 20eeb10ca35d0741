"""Drift reports and sync summaries, as text for people and JSON for tools.

Everything printed passes through here; diffs come from gitopsd.engine.diff, which
has already masked Secret values. Each public function's result is also
scrubbed by value (gitopsd.redact) — the last line of defence for a value
that an error message echoed. Audit records (the last section) are scrubbed
once, before they are hashed (gitopsd.audit.store), so what is rendered from
them here is the stored text, byte for byte.
"""

from __future__ import annotations

from gitopsd import redact, schemas
from gitopsd.engine.plan import Action, Plan
from gitopsd.engine.source import Revision
from gitopsd.engine.sync import SyncResult
from gitopsd.objects import ObjectRef

# The Events API refuses a note over 1 KiB (events.k8s.io/v1 Event.note).
EVENT_NOTE_MAX = 1024


_MARK = {Action.CREATE: "+", Action.UPDATE: "~", Action.RECREATE: "!", Action.PRUNE: "-", Action.UNCHANGED: "="}


def revision_dict(rev: Revision | None) -> dict | None:
    if rev is None:
        return None
    return {"url": rev.url, "ref": rev.ref, "sha": rev.sha, "author": rev.author, "committer": rev.committer,
            "message": rev.message, "time": rev.time.isoformat()}


def diff_dict(app: str, rev: Revision | None, plan: Plan) -> dict:
    """`gitopsd diff -o json`: a stable document (gitopsd.schemas, diff.schema.json)."""
    return redact.scrub_data({"schema": schemas.DIFF, "app": app, "revision": revision_dict(rev),
                              **_plan_dict(plan), "in_sync": plan.in_sync})


def error_dict(command: str, error: str, *, app: str | None = None) -> dict:
    """The JSON of a command that failed before it had a result; for diff and sync, in their schema."""
    schema = schemas.for_command(command)
    return redact.scrub_data({**({"schema": schema} if schema else {}), **({"app": app} if app else {}),
                              "error": error})


def _plan_dict(plan: Plan | None) -> dict:
    if plan is None:
        return {"counts": {}, "changes": [], "kept": [], "orphans": [], "errors": [], "create_namespace": None}
    changes = []
    for c in plan.changes:
        if c.action == Action.UNCHANGED:
            continue
        changes.append({
            "group": c.ref.group, "kind": c.ref.kind, "namespace": c.ref.namespace, "name": c.ref.name,
            "action": c.action.value, "source": c.source,
            "fields": list(c.diff.fields) if c.diff else [],
            "diff": c.diff.text if c.diff else "",
            "takeover": list(c.takeover),
        })
    return {
        "counts": plan.counts(),
        "changes": changes,
        "kept": [{"object": str(r), "reason": plan.kept_reasons.get(r, "")} for r in plan.kept],
        "orphans": [str(r) for r in plan.orphans],
        "errors": list(plan.errors),
        "create_namespace": plan.missing_namespace,
    }


def plan_text(plan: Plan, rev: Revision | None, *, header: str) -> str:
    return redact.scrub(_plan_text(plan, rev, header=header))


def _plan_text(plan: Plan, rev: Revision | None, *, header: str) -> str:
    lines = [header]
    if rev is not None:
        first = rev.message.splitlines()[0] if rev.message else ""
        lines.append(f"  revision {rev.sha[:12]} ({rev.ref}) by {rev.author}: {first}")
    counts = plan.counts()
    lines.append("  " + ", ".join(f"{counts[a.value]} {a.value}" for a in
                                  (Action.CREATE, Action.UPDATE, Action.RECREATE, Action.PRUNE, Action.UNCHANGED)))
    if plan.missing_namespace:
        lines.append(f"+ create    Namespace/{plan.missing_namespace}  (createNamespace: missing; created first, "
                     f"labelled gitopsd.io/created-by={plan.app}, no member: never pruned; the objects in it "
                     f"are validated once it exists)")
    for c in plan.changes:
        if c.action == Action.UNCHANGED:
            continue
        where = f"  ({c.source})" if c.source else ""
        lines.append(f"{_MARK[c.action]} {c.action.value:<9} {c.ref}{where}")
        if c.diff and c.action in (Action.UPDATE, Action.RECREATE):
            lines.append("    changed: " + ", ".join(c.diff.fields))
        if c.takeover and c.action == Action.UPDATE:
            lines.append(f"    takes over the fields of {', '.join(c.takeover)}: what they set and Git does not "
                         f"is removed")
        if c.diff and c.action in (Action.UPDATE, Action.RECREATE):
            lines.extend("    " + line for line in c.diff.text.rstrip("\n").splitlines())
    for ref in plan.kept:
        lines.append(f"  kept      {ref}  (no longer in Git; not pruned: {plan.kept_reasons.get(ref, 'kept')})")
    for ref in plan.orphans:
        lines.append(f"  orphan    {ref}  (no longer in Git; not pruned: prune is off)")
    for err in plan.errors:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def transition_diff(plan: Plan | None) -> str | None:
    """A transition's changes as one unified diff, for the web view's transition page: each object
    created, changed or recreated with its diff (live before -> desired; a created one in full), each
    pruned one named. Secret values were masked by gitopsd.engine.diff before the text was made, and
    the text is scrubbed by value once more. None when the plan changes nothing."""
    if plan is None:
        return None
    parts = []
    for c in plan.changes:
        if c.action == Action.UNCHANGED:
            continue
        where = f"  ({c.source})" if c.source else ""
        parts.append(f"{_MARK[c.action]} {c.action.value} {c.ref}{where}\n")
        if c.diff is not None and c.diff.text and c.action != Action.PRUNE:
            parts.append(c.diff.text if c.diff.text.endswith("\n") else c.diff.text + "\n")
    return redact.scrub("".join(parts)) if parts else None


def result_dict(result: SyncResult) -> dict:
    """`gitopsd sync -o json`: a stable document (gitopsd.schemas, sync-result.schema.json)."""
    return redact.scrub_data({
        "schema": schemas.SYNC_RESULT,
        "app": result.app,
        "outcome": result.outcome.value,
        "reason": result.reason,
        "revision": revision_dict(result.revision),
        "plan": _plan_dict(result.plan),
        "applied": [{"ref": str(c.ref), "action": c.action.value} for c in result.applied],
        "pruned": [str(c.ref) for c in result.pruned],
        "created_namespace": result.created_namespace,
        "health": [{"ref": str(h.ref), "status": h.status.value, "message": h.message} for h in result.health],
        "errors": list(result.errors),
        "duration_seconds": round(result.duration, 3),
    })


def result_text(result: SyncResult) -> str:
    lines = []
    if result.plan is not None:
        lines.append(_plan_text(result.plan, result.revision, header=f"sync {result.app}:"))
    for h in result.health:
        if h.status.value != "Current":
            lines.append(f"  health {h.ref}: {h.status.value}: {h.message}")
    if result.created_namespace:
        lines.append(f"  created Namespace/{result.created_namespace} (createNamespace)")
    for err in result.errors:
        if result.plan is None or err not in result.plan.errors:
            lines.append(f"error: {err}")
    lines.append(f"{result.outcome.value}: {result.reason} ({result.duration:.1f}s)")
    return redact.scrub("\n".join(lines))


# ------------------------------------------------------------------ audit records

# The order fields appear in on a log line: what happened first, the chain last.
_LOG_ORDER = ("app", "cluster", "type", "seq", "trigger", "result", "action", "reason", "previous", "revision", "object",
              "fields", "managers", "deleted", "error", "suggestion", "commit", "written", "plan", "health", "errors", "source",
              "ref", "signature", "written_as", "started", "duration_seconds", "instance", "time", "prev_hash", "hash")


def log_fields(rec: dict) -> dict:
    """The record's fields in reading order (same names and values; only the order differs)."""
    ordered = {k: rec[k] for k in _LOG_ORDER if k in rec}
    ordered.update((k, v) for k, v in rec.items() if k not in ordered)
    return ordered


def _short(sha: str | None) -> str:
    return sha[:8] if sha else "none"


def _subject(rec: dict) -> str:
    commit = rec.get("commit") or {}
    return (commit.get("message") or "").splitlines()[0] if commit.get("message") else ""


def _counts(rec: dict) -> str:
    plan = rec.get("plan") or {}
    counts: dict[str, int] = {}
    for obj in plan.get("objects", []):
        counts[obj["action"]] = counts.get(obj["action"], 0) + 1
    parts = [f"{n} {action}" for action, n in sorted(counts.items())]
    parts.append(f"{plan.get('unchanged', 0)} unchanged")
    return ", ".join(parts)


def _object_str(obj: dict) -> str:
    return str(ObjectRef(group=obj.get("group", ""), kind=obj.get("kind", ""), namespace=obj.get("namespace", ""),
                         name=obj.get("name", "")))


def summary_line(rec: dict) -> str:
    """One line per record for `gitopsd history`: time, seq, what happened, who, counts, who signed the commit."""
    when = (rec.get("time") or "")[:19] + "Z"
    seq = f"#{rec.get('seq', '?')}"
    if rec.get("type") == "drift":
        obj = rec.get("object") or {}
        what = "deleted" if rec.get("deleted") else ", ".join(rec.get("fields") or []) or "-"
        by = ", ".join(rec.get("managers") or []) or "unknown manager"
        line = f"{when}  {seq:>6}  drift {rec.get('action', '?'):<9}  {_object_str(obj)}: {what} (by {by})"
        return line + (f"  error: {rec['error']}" if rec.get("error") else "")
    if rec.get("type") == "release":
        state = rec.get("state") or {}
        line = (f"{when}  {seq:>6}  release {rec.get('action', '?'):<9}  by {rec.get('by') or '-'}"
                f"{' at ' + _short(rec.get('revision')) if rec.get('revision') else ''}: {state.get('state', '?')}")
        return line + (f"  refused: {rec['error']}" if rec.get("error") else "")
    commit = rec.get("commit") or {}
    author = (commit.get("author") or "").split(" <")[0] or "-"
    line = (f"{when}  {seq:>6}  {rec.get('result', '?'):<9}  {_short(rec.get('previous'))}->"
            f"{_short(rec.get('revision'))}  {author}  \"{_subject(rec)}\"  {_counts(rec)}  "
            f"[{rec.get('trigger', '?')}]")
    line += _trust(rec)
    if rec.get("result") not in ("Applied", "NoChange") and rec.get("reason"):
        line += f"  {rec['reason'][:120]}"
    release = rec.get("release")
    if isinstance(release, dict):
        line += f"  [{release.get('state')} by {release.get('by') or '-'}: {str(release.get('reason') or '')[:120]}]"
    return line


def event_note(rec: dict) -> str:
    """The parent Event's note: the record in one sentence (no values, only paths)."""
    if rec.get("type") == "drift":
        return object_note(rec, rec.get("object") or {})
    if rec.get("type") == "release":
        return summary_line(rec).split("release ", 1)[-1][:EVENT_NOTE_MAX]
    commit = rec.get("commit") or {}
    return (f"{rec.get('result')}: {rec.get('reason', '')} | revision {_short(rec.get('revision'))} (was "
            f"{_short(rec.get('previous'))}) by {commit.get('author', '-')}: {_subject(rec)}{_trust(rec)} | "
            f"{_counts(rec)} | trigger {rec.get('trigger')}, audit seq {rec.get('seq', '-')}")[:EVENT_NOTE_MAX]


def _trust(rec: dict) -> str:
    """Who signed the commit and whom the app wrote as, when the record knows: '' otherwise."""
    signature, text = rec.get("signature"), ""
    if isinstance(signature, dict) and signature.get("verdict") == "good":
        text += f"  signed by {signature.get('signer') or '-'} ({signature.get('key')})"
    if rec.get("written_as"):
        text += f"  as {rec['written_as']}"
    return text


def object_note(rec: dict, obj: dict) -> str:
    if rec.get("type") == "drift":
        what = "deleted by hand" if rec.get("deleted") else "changed " + ", ".join(rec.get("fields") or [])
        by = ", ".join(rec.get("managers") or []) or "unknown manager"
        text = f"drift {rec.get('action')}: {what} (by {by}); revision {_short(rec.get('revision'))}"
        return (text + (f"; error: {rec['error']}" if rec.get("error") else ""))[:EVENT_NOTE_MAX]
    fields = obj.get("fields") or []
    text = f"{obj.get('action')} by gitopsd at revision {_short(rec.get('revision'))}"
    if fields and obj.get("action") != "created":
        text += ": " + ", ".join(fields)
    return text[:EVENT_NOTE_MAX]


def live_at_text(answer: dict) -> str:
    """`gitopsd history APP --at T` for people."""
    lines = [f"app {answer['app']} at {answer['at']}:"]
    if answer.get("revision") is None and answer.get("transition") is None:
        lines.append(f"  {answer.get('note') or 'no live revision recorded'}")
    else:
        commit = answer.get("commit") or {}
        t = answer["transition"]
        lines.append(f"  revision {answer['revision']} ({answer.get('ref')}) from {answer.get('source')}")
        lines.append(f"  author    {commit.get('author', '-')}")
        lines.append(f"  committer {commit.get('committer', '-')} at {commit.get('time', '-')}")
        message = (commit.get("message") or "").splitlines() or [""]
        lines.append(f"  message   {message[0]}")
        lines.extend(f"            {m}" for m in message[1:])
        lines.append(f"  put there by audit seq {t['seq']} ({t['result']}, trigger {t['trigger']}) at {t['time']} "
                     f"by {t['instance']}")
    for rec in answer.get("partial") or []:
        lines.append(f"  partly written afterwards: seq {rec.get('seq')} {rec.get('result')} revision "
                     f"{_short(rec.get('revision'))} ({rec.get('written')} objects): {rec.get('reason', '')[:100]}")
    drift = answer.get("open_drift") or []
    if not drift:
        lines.append("  open drift: none")
    for rec in drift:
        what = "deleted" if rec.get("deleted") else ", ".join(rec.get("fields") or [])
        lines.append(f"  open drift: {_object_str(rec.get('object') or {})}: {what} by "
                     f"{', '.join(rec.get('managers') or []) or 'unknown'} ({rec.get('action')} at {rec.get('time')}, "
                     f"seq {rec.get('seq')})")
    return "\n".join(lines)
