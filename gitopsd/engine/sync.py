"""One reconcile of one app, top to bottom: the pipeline of DESIGN.md §2.

    fetch source -> render -> plan -> guard -> apply -> prune -> health -> result

The CLI (`gitopsd diff`, `gitopsd sync`) and the daemon call exactly this
code. Each stage is a module with one job; this file only orchestrates and
turns what the stages report into one SyncResult.

Failure rules: a source or render error stops before the cluster is touched
(and never prunes); a plan error (any invalid object) stops before the first
write and reports every invalid object; an apply error in one stage stops
later stages and the prune.

Secret values: the renderer registers every value of a rendered Secret (and
of a secret generator) with gitopsd.redact before anything is planned, and
refuses a Secret whose `data` or `stringData` is not a mapping of strings
(or whose `data` is not base64), naming file, object and field — downstream
code and the apiserver's own errors would otherwise echo the value. What
leaves this module (a SyncResult, an exception) is scrubbed by value.

A failure's `reason` is one line that carries its cause: the first problem
itself (file, object, message) and how many more there are (`_cause`).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import structlog

from gitopsd import redact
from gitopsd.engine import health, inventory, render, source
from gitopsd.engine.apply import ApplyOutcome, apply_plan
from gitopsd.engine.plan import Action, LiveCache, ObjectChange, Plan, make_plan
from gitopsd.errors import GitopsdError, LeadershipLost, RenderError
from gitopsd.kube import Kube
from gitopsd.objects import ObjectRef, ref_of

DEFAULT_INVENTORY_NAMESPACE = "gitopsd-system"
log = structlog.get_logger("gitopsd.engine.sync")


@dataclass(frozen=True)
class AppSpec:
    """What to reconcile: one app (= one ApplySet)."""

    name: str
    repo: str
    ref: str = "HEAD"
    path: str = "."
    namespace: str = "default"                # for namespaced objects that name none
    render: str = "auto"                      # auto | plain | kustomize | helm
    helm_values: tuple[str, ...] = ()
    helm_release: str | None = None           # default: the app name
    allow_remote_bases: bool = False          # kustomize may fetch remote bases (read outside the commit)
    prune: bool = True
    prune_guard: float = 0.5                  # refuse to prune more than this share of the members
    allow_prune_all: bool = False             # lift the guard (an emptied repo really means "delete all")
    recreate: bool = False                    # allow delete+create on immutable-field changes
    timeout: float = 300.0                    # health wait
    credentials: source.Credentials | None = None
    inventory_namespace: str = DEFAULT_INVENTORY_NAMESPACE
    allowed_namespaces: tuple[str, ...] | None = None   # None: any; else writes only there (no cluster-scoped)


class Outcome(str, enum.Enum):
    APPLIED = "Applied"
    NO_CHANGE = "NoChange"
    FAILED = "Failed"
    UNHEALTHY = "Unhealthy"
    REFUSED = "Refused"          # by the prune guard
    DRY_RUN = "DryRun"


@dataclass
class SyncResult:
    app: str
    outcome: Outcome
    reason: str = ""
    revision: source.Revision | None = None
    plan: Plan | None = None
    applied: list[ObjectChange] = field(default_factory=list)
    pruned: list[ObjectChange] = field(default_factory=list)
    health: list[health.ObjectHealth] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.APPLIED, Outcome.NO_CHANGE, Outcome.DRY_RUN)


Progress = Callable[[str, ObjectChange], None]


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("GITOPSD_CACHE") or Path.home() / ".cache" / "gitopsd") / "sources"


def fetch_and_plan(kube: Kube, app: AppSpec, *, cache_dir: Path | None = None,
                   prune: bool | None = None, cache: LiveCache | None = None,
                   inv: inventory.Inventory | None = None,
                   on_revision: Callable[[source.Revision], None] | None = None) -> tuple[source.Revision, Plan]:
    """Source -> render -> plan. Raises GitopsdError; writes nothing to the cluster.

    With a synced `cache` (the daemon's watch of the app's members) the plan
    reads live state from memory instead of listing; with `inv` (the
    daemon's copy of the ApplySet parent, kept current by its own writes) it
    does not re-read the parent either. Whatever it raises has been scrubbed
    of secret values (redact.scrub_exception), so a caller may print it.
    """
    if app.credentials is not None:
        redact.remember([app.credentials.token])   # a git token is a secret value too
    try:
        checkout = source.fetch(app.repo, app.ref, cache_dir=cache_dir or default_cache_dir(),
                                credentials=app.credentials)
        if on_revision is not None:
            on_revision(checkout.revision)
        manifests = _render(kube, app, checkout.path)
        if inv is None:
            inv = inventory.load(kube, app=app.name, namespace=app.inventory_namespace)
        plan = make_plan(kube, manifests, inv, prune=app.prune if prune is None else prune,
                         recreate=app.recreate, allowed_namespaces=app.allowed_namespaces, cache=cache)
    except Exception as exc:
        redact.scrub_exception(exc)
        raise
    return checkout.revision, plan


def _render(kube: Kube, app: AppSpec, checkout: Path) -> list[render.Manifest]:
    """The app's manifests; the renderer has registered every secret value it met."""
    return render.render(checkout, app.path, kind=app.render, namespace=app.namespace,
                         helm_values=app.helm_values, helm_release=app.helm_release or app.name,
                         is_namespaced=kube.is_namespaced, allow_remote_bases=app.allow_remote_bases)


def prune_guard(app: AppSpec, plan: Plan) -> str | None:
    """Why this plan's prune is refused, or None when it may go ahead.

    The share is measured against what the app will have touched: live members
    plus creations, so a rename (one create, one prune per object) is not a
    mass deletion. Pruning every live member is refused whenever the commit
    shares no object with what is live — an emptied repo, a wrong path.
    """
    doomed = len(plan.of(Action.PRUNE))
    if not doomed or app.allow_prune_all:
        return None
    if doomed == plan.members:
        if not any(c.action != Action.PRUNE for c in plan.changes):
            why = "an emptied repo or a wrong path?"
        else:
            why = "the commit shares no object with what is live: a moved path or namespace?"
        return (f"the commit would prune all {doomed} objects of app {app.name} ({why}); refused. "
                f"Allow it with allowPruneAll / --allow-prune-all")
    base = plan.members + len(plan.of(Action.CREATE))
    if doomed > app.prune_guard * base:
        return (f"the commit would prune {doomed} of {plan.members} objects ({doomed / base:.0%} of the "
                f"{base} it touches), more than the prune guard's {app.prune_guard:.0%}; refused. Raise "
                f"pruneGuard / --prune-guard or allow it with --allow-prune-all")
    return None


def sync(kube: Kube, app: AppSpec, *, cache_dir: Path | None = None, dry_run: bool = False,
         prune: bool | None = None, on_progress: Progress | None = None,
         on_health: Callable[[health.ObjectHealth], None] | None = None,
         cancel: threading.Event | None = None, cache: LiveCache | None = None,
         inv: inventory.Inventory | None = None, hold_revision: str | None = None,
         on_revision: Callable[[source.Revision], None] | None = None) -> SyncResult:
    """Reconcile `app` once and say what happened. Never raises for user errors.

    `hold_revision`: when the fetched commit is this one, only plan and report
    (outcome DryRun) — how an app with self-heal off leaves hand edits alone
    until the next commit. `on_revision` hears the fetched commit before
    anything is planned (the daemon compares webhook commits with it).

    Raises LeadershipLost when `kube` is fenced by a leader lease
    (gitopsd.daemon.leader.FencedKube) and refused a write: the one exception,
    because a replica that lost the lease must record nothing about it.
    """
    started = time.monotonic()
    result = SyncResult(app=app.name, outcome=Outcome.FAILED)
    do_prune = app.prune if prune is None else prune
    try:
        result.revision, plan = fetch_and_plan(kube, app, cache_dir=cache_dir, prune=do_prune, cache=cache,
                                               inv=inv, on_revision=on_revision)
        result.plan = plan
        if plan.errors:
            # Sorted (by file, then object): the dry-runs finish in any order, and a
            # repeated failure must read the same to be recognised as the same.
            result.errors = sorted(plan.errors)
            result.reason = _cause("invalid object", result.errors) + "; nothing was applied"
            return result
        refused = prune_guard(app, plan) if do_prune else None
        if refused:
            result.outcome, result.reason = Outcome.REFUSED, refused
            return result
        if dry_run or (hold_revision is not None and result.revision.sha == hold_revision):
            result.outcome = Outcome.DRY_RUN
            result.reason = ("dry run: nothing was written" if dry_run else
                             "drift reported, not corrected: self-heal is off and the commit is unchanged")
            return result
        outcome: ApplyOutcome = apply_plan(kube, plan, prune=do_prune, recreate=app.recreate,
                                           on_progress=on_progress)
        result.applied, result.pruned = outcome.applied, outcome.pruned
        if not outcome.ok:
            result.errors = outcome.errors
            result.reason = _cause("apply failed", outcome.errors)
            return result
        if not outcome.applied and not outcome.pruned:
            result.outcome, result.reason = Outcome.NO_CHANGE, "in sync"
            return result
        result.health = _wait_healthy(kube, outcome.applied, app=app, cancel=cancel, on_change=on_health,
                                      selector=plan.inventory.selector,
                                      live=cache if isinstance(cache, health.LiveSource) else None)
        healthy, why = health.summarize(result.health)
        if healthy:
            result.outcome, result.reason = Outcome.APPLIED, _summary(outcome)
        else:
            result.outcome, result.reason = Outcome.UNHEALTHY, why
        return result
    except GitopsdError as exc:
        result.errors = [str(exc)]
        problems = exc.problems if isinstance(exc, RenderError) else []
        result.reason = _cause("rendering failed", problems) if problems else exc.message.splitlines()[0]
        return result
    except LeadershipLost:
        raise   # not a result: this replica may no longer write, so it has nothing to report either
    except Exception as exc:  # noqa: BLE001 - a bug must become a Failed result, not a lost reconcile
        log.exception("sync failed unexpectedly", app=app.name)
        result.errors = [f"internal error: {type(exc).__name__}: {exc}"]
        result.reason = "internal error (see the log); nothing more was applied"
        return result
    finally:
        result.duration = time.monotonic() - started
        _scrub(result)


# A reason is one line: enough for the first problem's file and message, not a page of tool output.
MAX_CAUSE_CHARS = 400


def _cause(what: str, problems: list[str]) -> str:
    """`what: <the first problem> (and N more problems)` — one line that says why.

    A count alone ("rendering failed with 1 problem") sends every reader of
    history, Events and status to the logs; the first problem names the file
    and the message, and the rest stay in the result's `errors`.
    """
    lines = [line.strip() for line in problems[0].splitlines() if line.strip()] if problems else []
    first = " ".join(lines) or "(no message)"
    if len(first) > MAX_CAUSE_CHARS:
        first = first[:MAX_CAUSE_CHARS - 1] + "…"
    more = len(problems) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    return f"{what}: {first}{tail}"


def _scrub(result: SyncResult) -> None:
    """The last line of defence: no known secret value leaves a sync in its text."""
    result.reason = redact.scrub(result.reason)
    result.errors = [redact.scrub(e) for e in result.errors]
    result.health = [dataclasses.replace(h, message=clean) if (clean := redact.scrub(h.message)) != h.message
                     else h for h in result.health]
    if result.plan is not None:
        result.plan.errors[:] = [redact.scrub(e) for e in result.plan.errors]


def _summary(outcome: ApplyOutcome) -> str:
    counts: dict[str, int] = {}
    for c in outcome.applied:
        counts[c.action.value] = counts.get(c.action.value, 0) + 1
    if outcome.pruned:
        counts["prune"] = len(outcome.pruned)
    # create/update/recreate/prune all take a plain "d" in the past tense.
    return ", ".join(f"{n} {verb}d" for verb, n in sorted(counts.items()))


def recheck_health(kube: Kube, refs: list[ObjectRef], *,
                   live: health.LiveSource | None = None) -> list[health.ObjectHealth]:
    """One look at objects that were not healthy (no waiting): the daemon asks
    whether a rollout that timed out has since completed on its own. With
    `live` (the daemon's informers) what a watch covers is read from memory."""
    return health.wait(refs, get=_getter(kube), timeout=0, live=live)


def _getter(kube: Kube) -> Callable[[ObjectRef], dict | None]:
    """One object from the apiserver: the health wait's fallback where no watch covers it."""
    def get(ref: ObjectRef) -> dict | None:
        res = kube.resource_for_group_kind(ref.group, ref.kind)
        return kube.get(res, ref.name, ref.namespace or None) if res else None

    return get


def _wait_healthy(kube: Kube, applied: list[ObjectChange], *, app: AppSpec, cancel, on_change,
                  selector: str, live: health.LiveSource | None = None) -> list[health.ObjectHealth]:
    """Wait for what was applied. With `live` (the daemon's informers) the wait is
    fed by their watch and a rolling workload's pods by a temporary watch (no
    request while it waits); without (the CLI), it polls: GETs, or one LIST per
    kind and namespace of three or more objects, and the pods by their selector."""
    get = _getter(kube)

    def related_pods(workload: dict) -> list[dict]:
        selector = ((workload.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not selector:
            return []
        pods = kube.resource("v1", "Pod")
        return kube.list(pods, namespace=workload["metadata"].get("namespace"),
                         label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items())))

    def get_many(refs: list[ObjectRef]) -> dict[ObjectRef, dict | None]:
        # Three or more unsettled objects of one kind in one namespace: one LIST
        # of the app's members there (by the ApplySet label) instead of a GET each.
        groups: dict[tuple[str, str, str], list[ObjectRef]] = {}
        for ref in refs:
            groups.setdefault((ref.group, ref.kind, ref.namespace), []).append(ref)
        out: dict[ObjectRef, dict | None] = {}
        for (group, kind, ns), members in groups.items():
            res = kube.resource_for_group_kind(group, kind)
            if res is None or len(members) < 3:
                continue
            found = {ref_of(o): o for o in kube.list(res, namespace=ns or None, label_selector=selector)}
            out.update({ref: found.get(ref) for ref in members})
        return out

    # The apply responses are the first reading: no GET for what is ready on sight.
    return health.wait([c.ref for c in applied], get=get, timeout=app.timeout, cancel=cancel, on_change=on_change,
                       related_pods=related_pods, initial={c.ref: c.live for c in applied if c.live},
                       workers=kube.max_workers, get_many=get_many, live=live)
