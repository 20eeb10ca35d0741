"""Drift reports and sync summaries, as text for people and JSON for tools.

Everything printed passes through here; diffs come from gitopsd.diff, which
has already masked Secret values. Each public function's result is also
scrubbed by value (gitopsd.redact) — the last line of defence for a value
that an error message echoed.
"""

from __future__ import annotations

from gitopsd import redact
from gitopsd.plan import Action, Plan
from gitopsd.source import Revision
from gitopsd.sync import SyncResult

_MARK = {Action.CREATE: "+", Action.UPDATE: "~", Action.RECREATE: "!", Action.PRUNE: "-", Action.UNCHANGED: "="}


def revision_dict(rev: Revision | None) -> dict | None:
    if rev is None:
        return None
    return {"url": rev.url, "ref": rev.ref, "sha": rev.sha, "author": rev.author, "committer": rev.committer,
            "message": rev.message, "time": rev.time.isoformat()}


def plan_dict(plan: Plan | None) -> dict:
    return redact.scrub_data(_plan_dict(plan))


def _plan_dict(plan: Plan | None) -> dict:
    if plan is None:
        return {"counts": {}, "changes": [], "errors": []}
    changes = []
    for c in plan.changes:
        if c.action == Action.UNCHANGED:
            continue
        changes.append({
            "group": c.ref.group, "kind": c.ref.kind, "namespace": c.ref.namespace, "name": c.ref.name,
            "action": c.action.value, "source": c.source,
            "fields": list(c.diff.fields) if c.diff else [],
            "diff": c.diff.text if c.diff else "",
        })
    return {
        "counts": plan.counts(),
        "changes": changes,
        "kept": [{"object": str(r), "reason": plan.kept_reasons.get(r, "")} for r in plan.kept],
        "orphans": [str(r) for r in plan.orphans],
        "errors": list(plan.errors),
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
    for c in plan.changes:
        if c.action == Action.UNCHANGED:
            continue
        where = f"  ({c.source})" if c.source else ""
        lines.append(f"{_MARK[c.action]} {c.action.value:<9} {c.ref}{where}")
        if c.diff and c.action in (Action.UPDATE, Action.RECREATE):
            lines.append("    changed: " + ", ".join(c.diff.fields))
            lines.extend("    " + line for line in c.diff.text.rstrip("\n").splitlines())
    for ref in plan.kept:
        lines.append(f"  kept      {ref}  (no longer in Git; not pruned: {plan.kept_reasons.get(ref, 'kept')})")
    for ref in plan.orphans:
        lines.append(f"  orphan    {ref}  (no longer in Git; not pruned: prune is off)")
    for err in plan.errors:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def result_dict(result: SyncResult) -> dict:
    return redact.scrub_data({
        "app": result.app,
        "outcome": result.outcome.value,
        "reason": result.reason,
        "revision": revision_dict(result.revision),
        "plan": _plan_dict(result.plan),
        "applied": [{"ref": str(c.ref), "action": c.action.value} for c in result.applied],
        "pruned": [str(c.ref) for c in result.pruned],
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
    for err in result.errors:
        if result.plan is None or err not in result.plan.errors:
            lines.append(f"error: {err}")
    lines.append(f"{result.outcome.value}: {result.reason} ({result.duration:.1f}s)")
    return redact.scrub("\n".join(lines))
