"""One reconcile of one app, top to bottom: the pipeline of DESIGN.md §2.

    fetch source -> verify -> render -> plan -> guard -> apply -> prune -> health -> result

The CLI (`gitopsd diff`, `gitopsd sync`) and the daemon call exactly this
code. Each stage is a module with one job; this file only orchestrates and
turns what the stages report into one SyncResult.

A self-heal (`heal`) is a small commit through the same code: the objects
that drifted, planned against live state and applied in stages with the
same guards, health wait and result — only without fetch, render and prune.

Failure rules: a source error, a commit refused for its signature (an app
with `verify`: gitopsd.engine.signature) or a render error stops before the
cluster is touched (and never prunes); a plan error (any invalid object) stops before the first
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
from typing import Callable, Collection

import structlog
from pydantic import InstanceOf
from pydantic.dataclasses import dataclass as pydantic_dataclass

from gitopsd import redact
from gitopsd.config import MODEL_CONFIG, AppConfig, Namespace
from gitopsd.engine import decrypt, health, health_exprs, inventory, render, signature, source
from gitopsd.engine.apply import ApplyOutcome, apply_plan
from gitopsd.engine.diff import compare, managers_of, within
from gitopsd.engine.ignore import suggestion
from gitopsd.engine.plan import (
    Action,
    LiveCache,
    ObjectChange,
    Plan,
    heal_set,
    make_plan,
)
from gitopsd.engine.render_cache import RenderCache
from gitopsd.engine.source_share import SharedFetches
from gitopsd.errors import GitopsdError, LeadershipLost, RenderError
from gitopsd.kube import Kube
from gitopsd.objects import ObjectRef, ref_of

DEFAULT_INVENTORY_NAMESPACE = "gitopsd-system"
log = structlog.get_logger("gitopsd.engine.sync")


@pydantic_dataclass(frozen=True, config=MODEL_CONFIG)
class AppSpec(AppConfig):
    """What to reconcile: one app (= one ApplySet), as one reconcile sees it.

    The app model of the config file (gitopsd.config.AppConfig: every field,
    default and check) plus what exists only at run time: the resolved
    credentials and the namespace of the app's inventory. The daemon builds
    one per reconcile with `AppConfig.to_spec`; the CLI and tests construct
    it directly, by Python names. Settings only the daemon reads (interval,
    self_heal, suspend) ride along unused.
    """

    credentials: InstanceOf[source.Credentials] | None = None
    """The resolved credentials (values); AppConfig.credentials only says where they are."""
    decryption_keys: InstanceOf[decrypt.Keys] | None = None
    """The resolved SOPS keys (values); AppConfig.decryption only says where they are."""
    trusted_keys: InstanceOf[signature.TrustedKeys] | None = None
    """The public keys AppConfig.verify names, as read for this reconcile."""
    inventory_namespace: Namespace = DEFAULT_INVENTORY_NAMESPACE
    """Where the ApplySet parent lives (gitopsd's own namespace)."""


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
    drift: list["Drift"] = field(default_factory=list)   # heal: what differed, read before the apply
    created_namespace: str | None = None   # created for the app before the apply (createNamespace)

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
                   on_revision: Callable[[source.Revision], None] | None = None,
                   fetches: SharedFetches | None = None, renders: RenderCache | None = None,
                   follow_inputs: bool = True,
                   pick: Callable[[source.Revision], str | None] | None = None,
                   shape: Callable[[list[render.Manifest]], list[render.Manifest]] | None = None,
                   ) -> tuple[source.Revision, Plan]:
    """Source -> render -> plan. Raises GitopsdError; writes nothing to the cluster.

    With a synced `cache` (the daemon's watch of the app's members) the plan
    reads live state from memory instead of listing; with `inv` (the
    daemon's copy of the ApplySet parent, kept current by its own writes) it
    does not re-read the parent either. With `fetches` the apps of one
    repository share its fetches (gitopsd.engine.source_share; the daemon's),
    with `renders` a render whose inputs did not change is reused
    (gitopsd.engine.render_cache), and — with `follow_inputs` — the revision
    returned is the commit the app's desired state comes from: a commit that
    left the app's inputs alone (another app's, in a monorepo) is no new
    revision of this app. Without `follow_inputs` (self-heal off: any new
    commit ends the hold on hand edits, also after a restart, which knows
    only the recorded revision) it is the commit fetched. Whatever it raises
    has been scrubbed of secret values (redact.scrub_exception), so a caller
    may print it.

    `pick` (release control, gitopsd.daemon.release) hears the app's revision
    and may name another commit (a full SHA) to deploy instead — a held or
    rolled-back app; it is rendered from Git and planned in its place, and the
    revision returned is that commit (recorded on the app's ref). `shape`
    (progressive delivery, gitopsd.daemon.rollouts) turns the manifests into
    what this moment of a rollout applies (a canary step).
    """
    if app.credentials is not None:
        redact.remember([app.credentials.token])   # a git token is a secret value too
    if app.decryption_keys is not None:
        redact.remember(app.decryption_keys.age)   # so are the SOPS keys, should a tool echo one
    try:
        if fetches is not None:
            checkout = fetches.fetch(app.repo, app.ref, credentials=app.credentials, timeout=app.fetch_timeout)
        else:
            checkout = source.fetch(app.repo, app.ref, cache_dir=cache_dir or default_cache_dir(),
                                    credentials=app.credentials, timeout=app.fetch_timeout)
        if on_revision is not None:
            on_revision(checkout.revision)
        try:
            signed = _signed(app, checkout)
        except signature.SignatureError:
            # Refused before anything is rendered, unless release control deploys another commit
            # (held, rolling back: the way out of a bad push must stay open); that one is checked below.
            target = pick(checkout.revision) if pick is not None else None
            if target is None or target == checkout.revision.sha:
                raise
            revision = checkout.revision
        else:
            revision, manifests = _render(kube, app, checkout, renders=renders, follow_inputs=follow_inputs)
            target = pick(revision) if pick is not None else None
        if target is not None and target != revision.sha:
            checkout = source.fetch(app.repo, target, cache_dir=fetches.cache_dir if fetches is not None
                                    else cache_dir or default_cache_dir(), credentials=app.credentials,
                                    timeout=app.fetch_timeout)
            signed = _signed(app, checkout)
            _, manifests = _render(kube, app, checkout, renders=renders, follow_inputs=follow_inputs)
            revision = dataclasses.replace(checkout.revision, ref=app.ref)   # the commit named, as named
        if signed is not None:
            # The commit checked is the one rendered; `revision` may be an older one whose inputs it shares.
            revision = dataclasses.replace(revision, signature=signed.signature)
        if shape is not None:
            manifests = shape(manifests)
        if inv is None:
            inv = inventory.load(kube, app=app.name, namespace=app.inventory_namespace)
        plan = make_plan(kube, manifests, inv, prune=app.prune if prune is None else prune,
                         recreate=app.recreate, allowed_namespaces=app.allowed_namespaces, cache=cache,
                         **plan_options(app))
    except Exception as exc:
        redact.scrub_exception(exc)
        raise
    return revision, plan


def _signed(app: AppSpec, checkout: source.Checkout) -> source.Revision | None:
    """The checkout's revision with its good signature verdict; None for an app that does not verify.
    Raises SignatureError (refused) or GitopsdError (cannot tell): never lets an unverified commit through."""
    if app.verify is None:
        return None
    if app.trusted_keys is None or app.trusted_keys.provider != app.verify.provider:
        raise GitopsdError(f"app {app.name} verifies commit signatures, and its {app.verify.provider} keys were "
                           "not read; refusing to deploy unverified commits")
    return signature.signed(checkout, keys=app.trusted_keys)


def plan_options(app: AppSpec) -> dict:
    """What make_plan takes from the app beyond prune/recreate/allowed namespaces: the drift it allows,
    the namespace it may create (createNamespace), the field managers it takes over and the
    ServiceAccount its writes are made as (serviceAccountName; the apply acts as the plan's). One
    place for `sync` and `heal`."""
    return dict(ignore=app.ignore, create_namespace=app.namespace if app.create_namespace else None,
                take_over=app.take_over_managers, act_as=app.service_account)


def _render(kube: Kube, app: AppSpec, checkout: source.Checkout, *, renders: RenderCache | None,
            follow_inputs: bool) -> tuple[source.Revision, list[render.Manifest]]:
    """The app's revision (see fetch_and_plan) and manifests; every secret value met on the way
    (or in a cached render) is registered."""
    options = dict(kind=app.render, namespace=app.namespace, helm_values=app.helm_values,
                   helm_release=app.helm_release or app.name, is_namespaced=kube.is_namespaced,
                   allow_remote_bases=app.allow_remote_bases, allow_remote_charts=app.allow_remote_charts,
                   decryption=app.decryption_keys)
    if renders is not None:
        rendered = renders.render(checkout, app.path, app=app.name if follow_inputs else None, **options)
        return rendered.since, rendered.manifests
    return checkout.revision, render.render(checkout.path, app.path, **options)


def render_commit(kube: Kube, app: AppSpec, checkout: source.Checkout) -> list[render.Manifest]:
    """The app's manifests rendered from `checkout` with the app's settings, as a sync renders them
    (uncached): for rendering an old commit again (`gitopsd export`). Raises RenderError."""
    return _render(kube, app, checkout, renders=None, follow_inputs=False)[1]


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
         on_revision: Callable[[source.Revision], None] | None = None,
         fetches: SharedFetches | None = None, renders: RenderCache | None = None,
         pick: Callable[[source.Revision], str | None] | None = None, verify: bool = False,
         shape: Callable[[list[render.Manifest]], list[render.Manifest]] | None = None) -> SyncResult:
    """Reconcile `app` once and say what happened. Never raises for user errors.

    `hold_revision`: when the fetched commit is this one, only plan and report
    (outcome DryRun) — how an app with self-heal off leaves hand edits alone
    until the next commit. `on_revision` hears the fetched commit before
    anything is planned (the daemon compares webhook commits with it).
    `fetches`, `renders`, `pick` and `shape`: see fetch_and_plan. `verify`: wait for
    health even when nothing needs writing (a rollback that a replica which
    died mid-way had already written: whether it is healthy is the question).

    Raises LeadershipLost when `kube` is fenced by a leader lease
    (gitopsd.daemon.leader.FencedKube) and refused a write: the one exception,
    because a replica that lost the lease must record nothing about it.
    """
    result = SyncResult(app=app.name, outcome=Outcome.FAILED)
    do_prune = app.prune if prune is None else prune

    def plan() -> Plan:
        try:
            result.revision, planned = fetch_and_plan(kube, app, cache_dir=cache_dir, prune=do_prune, cache=cache,
                                                      inv=inv, on_revision=on_revision, fetches=fetches,
                                                      renders=renders, follow_inputs=hold_revision is None,
                                                      pick=pick, shape=shape)
        except signature.SignatureError as exc:
            result.revision = exc.revision   # the refused commit and its verdict, for the audit record
            raise
        return planned

    def held() -> str | None:
        if dry_run:
            return "dry run: nothing was written"
        if hold_revision is not None and result.revision.sha == hold_revision:
            return "drift reported, not corrected: self-heal is off and the commit is unchanged"
        return None

    return _run(kube, app, result, plan=plan, held=held, prune=do_prune, on_progress=on_progress,
                on_health=on_health, cancel=cancel, cache=cache, verify=verify)


def heal(kube: Kube, app: AppSpec, *, manifests: list[render.Manifest], refs: Collection[ObjectRef],
         revision: source.Revision | None, inv: inventory.Inventory, cache: LiveCache | None = None,
         dry_run: bool = False, on_progress: Progress | None = None,
         on_health: Callable[[health.ObjectHealth], None] | None = None,
         cancel: threading.Event | None = None) -> SyncResult:
    """Self-heal: put `refs` back as `manifests` (the last applied commit's) say — a small commit.

    The same pipeline as `sync`, minus fetch and render: a partial plan of
    those objects and what they stand on (gitopsd.engine.plan.heal_set),
    judged by the same code (live state from `cache` when it is synced, the
    ownership fast path, a dry-run for the rest), then the same staged
    apply, health wait and SyncResult. It never prunes and leaves the
    ApplySet parent's record of the whole app alone (Plan.partial).
    `result.drift` says, for each object that differed, what and who
    changed it, read before anything was written. `dry_run` (self-heal
    off): plan and report only, outcome DryRun. Raises LeadershipLost like
    `sync`.
    """
    result = SyncResult(app=app.name, outcome=Outcome.FAILED, revision=revision)

    def plan() -> Plan:
        planned = make_plan(kube, heal_set(manifests, refs), inv, prune=False, recreate=app.recreate,
                            allowed_namespaces=app.allowed_namespaces, cache=cache, partial=True,
                            **plan_options(app))
        result.drift = [drift_of(c) for c in planned.changes if c.action != Action.UNCHANGED]
        return planned

    def held() -> str | None:
        return "drift reported, not corrected: self-heal is off" if dry_run else None

    return _run(kube, app, result, plan=plan, held=held, prune=False, on_progress=on_progress,
                on_health=on_health, cancel=cancel, cache=cache)


def _run(kube: Kube, app: AppSpec, result: SyncResult, *, plan: Callable[[], Plan],
         held: Callable[[], str | None], prune: bool, on_progress: Progress | None,
         on_health: Callable[[health.ObjectHealth], None] | None,
         cancel: threading.Event | None, cache: LiveCache | None, verify: bool = False) -> SyncResult:
    """plan -> guard -> apply -> prune -> health -> `result`: what `sync` and `heal` share.

    `held()` (asked once the plan is valid) names why nothing may be
    written, making the outcome DryRun; None lets the apply go ahead.
    """
    started = time.monotonic()
    try:
        result.plan = planned = plan()
        if planned.errors:
            # Sorted (by file, then object): the dry-runs finish in any order, and a
            # repeated failure must read the same to be recognised as the same.
            result.errors = sorted(planned.errors)
            result.reason = _cause("invalid object", result.errors) + "; nothing was applied"
            return result
        refused = prune_guard(app, planned) if prune else None
        if refused:
            result.outcome, result.reason = Outcome.REFUSED, refused
            return result
        why = held()
        if why:
            result.outcome, result.reason = Outcome.DRY_RUN, why
            return result
        outcome: ApplyOutcome = apply_plan(kube, planned, prune=prune, recreate=app.recreate,
                                           on_progress=on_progress)
        result.applied, result.pruned = outcome.applied, outcome.pruned
        result.created_namespace = outcome.created_namespace
        if not outcome.ok:
            result.errors = outcome.errors
            result.reason = _cause("apply failed", outcome.errors)
            return result
        changed = bool(outcome.applied or outcome.pruned)
        if not changed and not verify:
            result.outcome, result.reason = Outcome.NO_CHANGE, "in sync"
            return result
        watched = outcome.applied if changed else [c for c in planned.changes if c.action != Action.PRUNE]
        result.health = _wait_healthy(kube, watched, app=app, cancel=cancel, on_change=on_health,
                                      selector=planned.inventory.selector,
                                      live=cache if isinstance(cache, health.LiveSource) else None)
        healthy, why = health.summarize(result.health)
        if healthy:
            result.outcome, result.reason = (Outcome.APPLIED, _summary(outcome)) if changed else \
                (Outcome.NO_CHANGE, "in sync")
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


@dataclass(frozen=True)
class Drift:
    """One object found changed or deleted outside Git, as it was before anything was written."""

    ref: ObjectRef
    source: str                     # the manifest's file
    fields: tuple[str, ...]         # changed paths that Git sets (none when deleted)
    managers: tuple[str, ...]       # field managers that own those paths now: who edited
    deleted: bool
    suggestion: str | None = None   # the ignore rule that would allow this drift, in config syntax


def drift_of(change: ObjectChange) -> Drift:
    """What differs in a planned change (create/update/recreate) and who made it differ.

    Only paths the desired object sets count: a controller's writes to
    fields Git leaves alone (a Deployment's revision annotation) are not
    drift, and would name the controller as the hand that edited. A change
    the server refused to dry-run (an immutable field, an admission policy)
    has no diff: its fields are read from the desired object itself then.
    Fields the app leaves to other managers are never among them
    (ObjectChange.to_apply); the suggestion is the ignore rule that would
    add these (gitopsd.engine.ignore.suggestion).
    """
    deleted = change.live is None
    if deleted:
        fields = []
    else:
        found = change.diff or compare(change.live, change.to_apply(), label=str(change.ref))
        fields = [f for f in found.fields if within(change.desired, f)]
    managers = managers_of(change.live, fields) if change.live else ["unknown (the object was deleted)"]
    return Drift(ref=change.ref, source=change.source, fields=tuple(fields), managers=tuple(managers),
                 deleted=deleted, suggestion=suggestion(change.ref, fields, change.desired) if fields else None)


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


def recheck_health(kube: Kube, refs: list[ObjectRef], *, app: AppConfig,
                   live: health.LiveSource | None = None) -> list[health.ObjectHealth]:
    """One look at objects that were not healthy (no waiting): the daemon asks
    whether a rollout that timed out has since completed on its own, judged
    as `app`'s sync judges them (its healthCheckExprs). With `live` (the
    daemon's informers) what a watch covers is read from memory."""
    return health.wait(refs, get=_getter(kube), timeout=0, live=live,
                       rules=health_exprs.rules_of(app.health_check_exprs))


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
                       parallel=kube.budget.map, get_many=get_many, live=live,
                       rules=health_exprs.rules_of(app.health_check_exprs))
