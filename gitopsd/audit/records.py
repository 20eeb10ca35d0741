"""Audit records: what one transition or one drift looks like, and how it is hashed.

Hash chain: ``hash = sha256(prev_hash + canonical_json(record without hash))``
with canonical JSON = orjson with sorted keys; the first record (seq 1) has
``prev_hash`` = 64 zeros. Chaining (seq, prev_hash, hash, time) is the
writer's job (gitopsd.audit.store.AuditLog.record); this module builds the
record's content and hashes it.

Record fields (stable names; see transition_record and drift_record):
``type`` (transition|drift|release), ``app``, ``time`` (UTC ISO 8601), ``instance``,
``seq``, ``prev_hash``, ``hash``; transitions add ``trigger``, ``source``,
``ref``, ``previous``, ``revision``, ``commit`` {author, committer, message,
time}, ``signature`` (null for an app without `verify`; else {provider,
verdict, key, signer, commit}: `good` with the signing key's fingerprint and
who signed, or why the commit was refused: `unsigned`, `unknown-key`, `bad`),
``plan`` {objects
[{group, kind, namespace, name, uid?, action, fields, done}], unchanged,
kept, orphans}, ``written``, ``result``, ``reason``, ``errors``, ``health``
{outcome, objects}, ``started``, ``duration_seconds``, and ``release`` {state,
revision, quarantined, from, by, reason} on a transition release control
decided (result RolledBack or Held, or the Unhealthy one that started an
automatic rollback); drifts add ``object``,
``fields``, ``managers``, ``action``, ``deleted``, ``revision``, ``error``;
``written_as`` (the ServiceAccount user an app with serviceAccountName wrote as);
a release request acted on (type ``release``) has ``action``, ``by``,
``revision``, ``request``, ``requested``, ``state`` and ``error``.
Only field *paths* ever enter a record, never diff text, so no Secret value
can (gitopsd.engine.diff masks values before paths are computed); `reason` and
`errors` are the sync's own messages, which gitopsd.engine.sync has already
cleaned of Secret values. As the last line of defence, AuditLog.record
scrubs every string of every record by value (gitopsd.redact) before it is
hashed, so what is stored, logged and announced in Events is the same
clean text. A record over RECORD_MAX_BYTES has its longest
lists cut, the numbers dropped under ``truncated``.

Size, measured (tests/test_audit_sync_paths.py prints it): a record is
0.5 KiB (drift) to ~2.6 KiB (a 5-object commit with a 1 KiB message); the
create/update/prune/no-op/fail/unhealthy/refused mix averages 1.35 KB.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import urllib.parse
from collections.abc import Sequence
from datetime import datetime, timezone

import orjson

from gitopsd.engine import health as health_
from gitopsd.engine.plan import HASH_ANNOTATION, Action
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.objects import ObjectRef

GENESIS_HASH = "0" * 64
# One record larger than this has its longest lists cut (see fit): a plan of
# thousands of objects still records, and a segment still holds several records.
RECORD_MAX_BYTES = 100 * 1024
MAX_MESSAGE_CHARS = 4096

DRIFT_ACTIONS = ("corrected", "reported", "failed")
# Results of release control (gitopsd.daemon.release), beside the sync outcomes: a rollback
# done (the re-applied revision is healthy), and a commit not applied because the app is held.
ROLLED_BACK, HELD = "RolledBack", "Held"
# Transitions that wrote the app's objects: after one, its commit is what runs.
CLUSTER_CHANGING = frozenset({Outcome.APPLIED.value, Outcome.UNHEALTHY.value, ROLLED_BACK})
# Transitions after which the cluster matched the commit (drift, if any, is gone).
CONVERGED = CLUSTER_CHANGING | {Outcome.NO_CHANGE.value}

_PAST = {Action.CREATE: "created", Action.UPDATE: "configured", Action.PRUNE: "pruned",
         Action.RECREATE: "recreated"}


def canonical(rec: dict) -> bytes:
    """The bytes that are hashed and stored: JSON with sorted keys, no whitespace."""
    return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)


def record_hash(rec: dict) -> str:
    """sha256(prev_hash + canonical JSON of the record without its "hash")."""
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(str(rec.get("prev_hash", "")).encode() + canonical(body)).hexdigest()


def _ref_dict(ref: ObjectRef) -> dict:
    return {"group": ref.group, "kind": ref.kind, "namespace": ref.namespace, "name": ref.name}


def iso_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def transition_record(result: SyncResult, *, trigger: str, previous: str | None, instance: str,
                      source: str | None = None, ref: str | None = None, outcome: str | None = None,
                      release: dict | None = None, rollout: dict | None = None) -> dict:
    """The audit record of one sync attempt (not yet chained: AuditLog.record does that).

    `trigger` says what started it: poll, webhook, self-heal, cli, config,
    watch, retry — recorded as given, not checked, so a new trigger never
    costs a record.

    `previous` is the revision that was live before (the caller knows: the
    daemon from its state, the CLI from the store, see last_revision).
    `source`/`ref` name the repository when the result has no revision (the
    fetch itself failed); otherwise the revision's credential-free URL wins.

    `outcome` replaces the result's own (RolledBack, Held: release control);
    `release` is the release decision behind the transition (who held or
    rolled back, from and to which commit, why), recorded under `release`;
    `rollout` the canary steps the run applied (gitopsd.daemon.rollouts).

    Plan objects are the plan's intended changes with the action in the past
    tense and `done` saying whether this attempt really wrote it: a Refused
    or Failed record lists what the commit *would* have done, all `done:
    false` (or partly, when an apply stage failed midway; `written` counts
    them). Only field paths are kept, never values or diff text. An object
    whose fields the apply took over from other managers names them
    (`took_over`, gitopsd.engine.takeover); a namespace created for the app
    (createNamespace) is `created_namespace`; the ServiceAccount user the
    app's dry-runs and writes were made as (serviceAccountName) is
    `written_as`. They appear only when there are any, so older records read
    the same.
    """
    rev, plan = result.revision, result.plan
    done = {c.ref for c in result.applied} | {c.ref for c in result.pruned}
    objects, unchanged, kept, orphans = [], 0, [], []
    if plan is not None:
        for c in plan.changes:
            if c.action == Action.UNCHANGED:
                unchanged += 1
                continue
            obj = {**_ref_dict(c.ref), "action": _PAST[c.action], "fields": _changed_fields(c),
                   "done": c.ref in done}
            uid = ((c.live or {}).get("metadata") or {}).get("uid")
            if uid:
                obj["uid"] = uid
            if c.takeover:   # whose fields the apply took over (and so removed where Git has none)
                obj["took_over"] = list(c.takeover)
            objects.append(obj)
        kept, orphans = [str(r) for r in plan.kept], [str(r) for r in plan.orphans]
    result_name = outcome or result.outcome.value
    if result_name in CLUSTER_CHANGING or result.health:   # (a NoChange may carry a recheck)
        healthy, _ = health_.summarize(result.health)
        outcome = "Healthy" if healthy else "Unhealthy"
    else:
        outcome = "NotChecked"   # nothing was written, or the apply failed before the wait
    message = rev.message if rev else ""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " [truncated]"
    return fit({
        "type": "transition",
        "app": result.app,
        "trigger": trigger,
        "source": rev.url if rev else _public_url(source),
        "ref": rev.ref if rev else ref,
        "previous": previous,
        "revision": rev.sha if rev else None,
        "commit": None if rev is None else {
            "author": rev.author, "committer": rev.committer, "message": message, "time": iso_time(rev.time)},
        "signature": rev.signature.record() if rev is not None and rev.signature is not None else None,
        "plan": {"objects": objects, "unchanged": unchanged, "kept": kept, "orphans": orphans},
        "written": len(done),
        "result": result_name,
        "reason": result.reason,
        "errors": list(result.errors),
        "health": {"outcome": outcome,
                   "objects": [{**_ref_dict(h.ref), "status": h.status.value, "message": h.message}
                               for h in result.health if h.status is not health_.Status.CURRENT]},
        "started": iso_time(result.started),
        "duration_seconds": round(result.duration, 3),
        "instance": instance,
        **({"created_namespace": result.created_namespace} if result.created_namespace else {}),
        # The identity the app's writes were made as (serviceAccountName), when not gitopsd's own.
        **({"written_as": plan.act_as.user} if plan is not None and plan.act_as is not None else {}),
        **({"release": release} if release is not None else {}),
        **({"rollout": rollout} if rollout is not None else {}),
    })


_HASH_PATH = f"metadata.annotations.{HASH_ANNOTATION}"


def _changed_fields(change) -> list[str]:
    """The paths worth an auditor's time.

    A created or pruned object has no "changed fields" (its diff against
    nothing lists only top-level keys), and gitopsd's own desired-hash
    annotation changes with every update, so it is left out unless it is all
    that changed (someone edited it by hand).
    """
    if change.diff is None or change.action in (Action.CREATE, Action.PRUNE):
        return []
    return [f for f in change.diff.fields if f != _HASH_PATH] or list(change.diff.fields)


def drift_record(*, app: str, ref: ObjectRef, fields: Sequence[str], managers: Sequence[str], action: str,
                 revision: str | None, instance: str, deleted: bool = False, error: str | None = None,
                 suggestion: str | None = None) -> dict:
    """The audit record of one drift: which object, which fields, who, and what gitopsd did.

    `managers` are the field managers that own the drifted paths
    (gitopsd.engine.diff.managers_of), i.e. who edited by hand; `deleted` marks an
    object removed by hand (no fields then). `action`: "corrected" (put
    back), "reported" (self-heal off: left alone), "failed" (the correction
    was refused; `error` says why). `suggestion`: the ignore rule, in config
    syntax, that would allow this drift (gitopsd.engine.ignore.suggestion); only
    paths, never values.
    """
    if action not in DRIFT_ACTIONS:
        raise ValueError(f"drift action must be one of {', '.join(DRIFT_ACTIONS)}, not {action!r}")
    return fit({
        "type": "drift", "app": app, "object": _ref_dict(ref), "fields": list(fields),
        "managers": list(managers), "action": action, "deleted": deleted, "revision": revision,
        "error": error, "suggestion": suggestion, "instance": instance,
    })


def release_record(*, app: str, request: dict, state: dict, instance: str, error: str | None = None) -> dict:
    """The audit record of a release request acted on (gitopsd.daemon.release): who asked for what
    (`gitopsd hold|resume|rollback`), and the state it led to — or `error`, why it could not be done.
    The transitions it causes (RolledBack, Held, Applied) are records of their own."""
    return fit({
        "type": "release", "app": app, "action": request.get("action"), "by": request.get("by"),
        "revision": request.get("revision"), "request": request.get("id"), "requested": request.get("at"),
        "state": state, "error": error, "instance": instance,
    })


def _public_url(url: str | None) -> str | None:
    """`url` without any user:password@ (the revision's own URL is already clean; this is the fallback)."""
    if not url or "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, ""))


def fit(rec: dict) -> dict:
    """Cut the longest lists of an oversized record so it fits RECORD_MAX_BYTES.

    A commit touching thousands of objects must still record (and a segment
    must still hold it), so the object list is halved until it fits, the
    number dropped kept under `truncated`. Counts (`written`, `unchanged`)
    stay exact.
    """
    if len(canonical(rec)) <= RECORD_MAX_BYTES:
        return rec
    truncated: dict[str, int] = {}
    lists = [("plan", "objects"), (None, "errors"), ("health", "objects"), ("plan", "kept"),
             ("plan", "orphans"), (None, "fields")]
    for parent, key in lists:
        holder = rec.get(parent) if parent else rec
        if not isinstance(holder, dict) or not isinstance(holder.get(key), list):
            continue
        items = holder[key]
        original = len(items)
        while items and len(canonical(rec)) > RECORD_MAX_BYTES:
            items = items[:len(items) // 2]
            holder[key] = items
        if len(items) < original:
            truncated[f"{parent}.{key}" if parent else key] = original - len(items)
            rec["truncated"] = truncated
        if len(canonical(rec)) <= RECORD_MAX_BYTES:
            break
    return rec


def default_instance() -> str:
    """hostname-pid: a pod's name in the cluster, distinct for two daemons on one host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def cli_instance() -> str:
    """Who ran a one-shot CLI command: cli/<user>@<host>."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli/{user}@{socket.gethostname()}"
