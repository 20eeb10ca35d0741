"""Plan: for every desired object, create / update (with a diff) / unchanged;
and the prune set. This is where gitopsd decides that an object drifted.

How drift is judged — the way the server would, at the lowest request cost:

1. Live state comes from the daemon's watch cache (asked to cover what the
   plan searches, LiveCache.ensure: one list per kind for the whole
   process), else from one label-selected LIST per group-kind x namespace
   of the app's ApplySet members (not one GET per object). A desired object
   that is not a member (first sync, adoption, deleted by hand) is not read
   up front: its dry-run (3.) says whether it exists — a server-side dry-run
   of a create comes back without a resourceVersion — and only one that
   exists is read (a GET), to diff against and to check it is no other
   app's. A new app's first plan thus costs its dry-runs and nothing else.
2. Ownership fast path. Every object gitopsd applies carries an annotation
   with a hash of its desired body. When the live object's hash equals the
   desired one AND gitopsd's server-side-apply field set still covers every
   field of the desired object, nothing can have changed: in SSA, anyone who
   changes a field we own — `kubectl edit`, `kubectl scale`, another
   applier with force — takes the field from us, so it drops out of our set.
   (An update that writes the *same* value only shares ownership, which is
   correctly "no drift".) Such objects cost no request at all.
3. Everything else is judged by a server-side-apply dry-run: the server's
   view of the desired object, defaults and admission included, compared
   with the live object (gitopsd.engine.diff). Server-defaulted fields appear on
   both sides, so they never show as drift.

Drift the app allows (gitopsd.engine.ignore: ignore rules, field managers
left alone) is taken out before 2. and 3.: over a live object, what is
judged and applied is the desired object without the ignored fields that
another field manager owns (ObjectChange.to_apply). gitopsd does not own
those, so the fast path does not ask for them and the dry-run keeps their
live values: an HPA's replicas are neither drift nor reverted.

The dry-runs double as validation: every invalid object of a commit is found
before anything is written. Objects whose CRD or Namespace arrives (or whose
CRD changes) in the same commit can only be dry-run after stage 0 is
applied; they are marked deferred and judged then.

Objects a repository written for Flux freezes (`frozen`: `ssa: IfNotPresent`
once created, `reconcile: disabled`) are "still ours" whatever they hold:
never judged, written or healed.

Prune safety lives here too: the prune set is only members (our label) that
left Git, minus what is annotated `gitopsd.io/prune: disabled` (or Flux's
`kustomize.toolkit.fluxcd.io/prune: disabled` or `reconcile: disabled`, Argo
CD's sync option `Prune=false`, a chart's `helm.sh/resource-policy: keep`), minus
Namespaces that still hold objects of the commit or objects gitopsd does not
manage.

Two things an apply does beyond the objects, decided here too:

- A missing namespace. An object's dry-run into a namespace that does not
  exist fails (404 `namespaces "x" not found`). When that namespace is the
  app's own and the app may create it (`createNamespace`), the object is
  deferred like one whose Namespace arrives in the same commit and
  Plan.missing_namespace names the namespace for the apply to create; no
  request is spent looking for it beforehand. Otherwise the error says
  the namespace is missing and how to get it created.
- Field-manager takeover (gitopsd.engine.takeover). An object whose live
  state has fields of a manager the app takes over (`kubectl apply`,
  `create`, `edit`, ...) — other than those the app leaves to others — names
  them in ObjectChange.takeover, skips the ownership fast path (those
  managers may own fields Git no longer sets) and is an update even when its
  dry-run shows no difference: the apply takes the fields over, and so
  removes what Git does not set.

Identity. An app that names a ServiceAccount (`serviceAccountName`) is
planned as that account: its dry-runs are sent impersonating it
(gitopsd.kube.Kube.impersonating), so a write the account may not do is
refused here, with the apiserver's reason and the object, before anything
of the app is written (Plan.act_as says whom the apply must act as).
gitopsd's own reads — the member LIST, the GET of an object found to exist,
the look through a Namespace before it is pruned — stay gitopsd's: they
write nothing, and the watch cache that replaces them is gitopsd's too.
When every dry-run is refused, the account itself is the likely cause: the
plan says whether it exists (impersonating a missing ServiceAccount still
authenticates, and is then allowed nothing).

A partial plan (a self-heal: some objects of the last applied commit) is
judged by the same code, but reads only those objects' live state, has no
prune set (what it does not name is not "gone from Git"), and leaves out
objects that are being deleted, or whose Namespace or CRD is: applying them
now would fail or be undone, and the deletion's own watch event brings them
back once it has finished (Plan.waiting).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from gitopsd import redact
from gitopsd.engine import diff as difflib_
from gitopsd.engine import takeover
from gitopsd.engine.fields import covers
from gitopsd.engine.ignore import NOTHING, Ignore
from gitopsd.engine.inventory import (
    ID_LABEL,
    PART_OF_LABEL,
    Inventory,
    namespace_missing,
    split_group_kind,
)
from gitopsd.engine.render import Manifest
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube, KubeApiError, Resource, ServiceAccount, UnknownKindError
from gitopsd.objects import ObjectRef, ref_of, split_api_version

HASH_ANNOTATION = "gitopsd.io/desired-hash"
PRUNE_ANNOTATION = "gitopsd.io/prune"          # "disabled" keeps the object when it leaves Git
# The same wish in the words of repositories written for Flux and Argo CD (a kept PVC or Namespace there
# must stay kept here): Flux's annotation, and Argo CD's sync option (Prune=confirm waits for a person,
# whom gitopsd never asks: kept too).
FLUX_PRUNE_ANNOTATION = "kustomize.toolkit.fluxcd.io/prune"
ARGO_SYNC_OPTIONS = "argocd.argoproj.io/sync-options"
HELM_RESOURCE_POLICY = "helm.sh/resource-policy"   # "keep": a chart's PVC or CRD outlives its removal (as Helm)
RECREATE_ANNOTATION = "gitopsd.io/recreate"    # "enabled" allows delete+create on immutable changes
FLUX_FORCE_ANNOTATION = "kustomize.toolkit.fluxcd.io/force"   # Flux's "enabled": the same
# Flux's apply policies gitopsd honours: an object applied only while it does not exist (ssa: IfNotPresent:
# a Secret another controller fills in), or whose reconciliation is switched off (reconcile: disabled, on
# the manifest or on the live object: never written again, never pruned).
FLUX_SSA_ANNOTATION = "kustomize.toolkit.fluxcd.io/ssa"
FLUX_RECONCILE_ANNOTATION = "kustomize.toolkit.fluxcd.io/reconcile"
NEVER_RECREATE_BY_DEFAULT = {("apiextensions.k8s.io", "CustomResourceDefinition"), ("", "Namespace"),
                             ("", "PersistentVolume"), ("", "PersistentVolumeClaim")}
# Page size of the LISTs that look through a Namespace before it is pruned.
NAMESPACE_CHECK_PAGE = 500


def _says(annotations: dict, key: str, value: str) -> bool:
    """Whether annotation `key` is `value` (as the tools read them: case and surrounding space aside)."""
    return str(annotations.get(key, "")).strip().lower() == value


def _argo_options(annotations: dict) -> set[str]:
    """Argo CD's sync options: a comma-separated list, e.g. "Prune=false,ServerSideApply=true"."""
    return {o.strip() for o in str(annotations.get(ARGO_SYNC_OPTIONS, "")).split(",")}


def frozen(desired: dict, live: dict) -> bool:
    """Whether an existing object is left as it is, whatever Git says now: created once (Flux's
    `ssa: IfNotPresent`), or its reconciliation switched off (`reconcile: disabled`, in Git or live)."""
    wanted = desired["metadata"].get("annotations") or {}
    found = (live.get("metadata") or {}).get("annotations") or {}
    return (_says(wanted, FLUX_SSA_ANNOTATION, "ifnotpresent")
            or any(_says(a, FLUX_RECONCILE_ANNOTATION, "disabled") for a in (wanted, found)))


def recreate_enabled(annotations: dict) -> bool:
    """Whether the object asks to be deleted and re-created when a field it changes is immutable:
    "gitopsd.io/recreate: enabled", Flux's "kustomize.toolkit.fluxcd.io/force: enabled", or Argo CD's
    sync options Replace=true with Force=true."""
    return (any(_says(annotations, k, "enabled") for k in (RECREATE_ANNOTATION, FLUX_FORCE_ANNOTATION))
            or {"Replace=true", "Force=true"} <= _argo_options(annotations))


def prune_disabled(annotations: dict) -> str | None:
    """The annotation that keeps an object when it leaves Git ("gitopsd.io/prune: disabled", or Flux's,
    Argo CD's or a Helm chart's way of saying it), as the plan's reason; None when nothing keeps it."""
    for key in (PRUNE_ANNOTATION, FLUX_PRUNE_ANNOTATION, FLUX_RECONCILE_ANNOTATION):
        if _says(annotations, key, "disabled"):
            return f"{key}: disabled"
    if _says(annotations, HELM_RESOURCE_POLICY, "keep"):
        return f"{HELM_RESOURCE_POLICY}: keep"
    options = _argo_options(annotations)
    return next((f"{ARGO_SYNC_OPTIONS}: {o}" for o in ("Prune=false", "Prune=confirm") if o in options), None)


class LiveCache(Protocol):
    """What the planner needs from a watch-fed cache of an app's members
    (the daemon's informers): which (kind, namespace) it covers, the
    members it holds — None while any of its watches has not synced — and a
    way to make it cover more: `ensure(targets)` starts what is missing (a
    kind's first app starts its one watch for every app) and waits a short
    while for it to sync."""

    @property
    def targets(self) -> set[tuple[Resource, str | None]]: ...

    def members(self) -> dict[ObjectRef, dict] | None: ...

    def ensure(self, targets: set[tuple[Resource, str | None]]) -> None: ...


class Action(str, enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    RECREATE = "recreate"
    UNCHANGED = "unchanged"
    PRUNE = "prune"


@dataclass
class ObjectChange:
    ref: ObjectRef
    action: Action
    source: str = ""                       # the manifest's file ("" for prunes)
    desired: dict | None = None            # body to apply (our label and hash added)
    live: dict | None = None
    diff: difflib_.Diff | None = None
    deferred: bool = False                 # dry-run possible only after stage 1 is applied
    resource: Resource | None = None
    unseen: bool = False                   # not a member, not read: its dry-run says whether it exists
    body: dict | None = None               # what is applied over `live` when not `desired` (see to_apply)
    left_alone: tuple[str, ...] = ()       # fields of `desired` left to other managers (dotted paths)
    takeover: tuple[str, ...] = ()         # field managers whose fields the apply takes over (gitopsd.engine.takeover)

    def to_apply(self) -> dict | None:
        """The body the apply (and its dry-run) sends: over a live object, `desired` without the
        fields an ignore rule leaves to other field managers (gitopsd.engine.ignore); all of
        `desired` when the object is created or re-created, so Git's values are used then."""
        if self.body is None or self.action == Action.RECREATE:
            return self.desired
        return self.body


@dataclass
class Plan:
    app: str
    inventory: Inventory
    changes: list[ObjectChange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kept: list[ObjectRef] = field(default_factory=list)        # left Git, but not pruned (see kept_reasons)
    kept_reasons: dict[ObjectRef, str] = field(default_factory=dict)
    orphans: list[ObjectRef] = field(default_factory=list)     # left Git, prune off for this run
    members: int = 0                                           # live members found
    targets: set = field(default_factory=set)                  # (Resource, namespace) searched for members
    partial: bool = False                  # some objects of the app (a self-heal): no prune, parent left as is
    waiting: list[ObjectRef] = field(default_factory=list)     # partial: being deleted, judged once gone
    ignore: Ignore = NOTHING               # drift the app allows (gitopsd.engine.ignore)
    create_namespace: str | None = None    # the app's namespace, which the apply may create (createNamespace)
    missing_namespace: str | None = None   # create_namespace, found missing: the apply creates it first
    take_over: tuple[str, ...] = ()        # the app's takeOverManagers
    act_as: ServiceAccount | None = None   # the app's serviceAccountName: dry-runs were, writes must be, made as it
    forbidden: list[tuple[ObjectChange, str]] = field(default_factory=list)   # dry-runs the account was refused: why

    def of(self, action: Action) -> list[ObjectChange]:
        return [c for c in self.changes if c.action == action]

    def counts(self) -> dict[str, int]:
        return {a.value: len(self.of(a)) for a in Action}

    @property
    def in_sync(self) -> bool:
        return not self.errors and all(c.action == Action.UNCHANGED for c in self.changes)

    @property
    def group_kinds(self) -> set[str]:
        return {c.ref.group_kind for c in self.changes if c.action != Action.PRUNE}

    @property
    def namespaces(self) -> set[str]:
        return {c.ref.namespace for c in self.changes if c.action != Action.PRUNE and c.ref.namespace}


def desired_hash(obj: dict) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def prepare(obj: dict, inv: Inventory) -> dict:
    """The body gitopsd applies: the manifest plus our part-of label and hash.

    A copy through JSON (the form it is hashed and sent in; five times
    deepcopy's speed, and this runs for every object of every plan)."""
    body = orjson.loads(orjson.dumps(obj))
    meta = body.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), PART_OF_LABEL: inv.id}
    meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items() if k != HASH_ANNOTATION}
    meta["annotations"][HASH_ANNOTATION] = desired_hash(body)
    return body


def make_plan(kube: Kube, manifests: list[Manifest], inv: Inventory, *, prune: bool = True,
              recreate: bool = False, allowed_namespaces: tuple[str, ...] | None = None,
              cache: LiveCache | None = None, partial: bool = False, ignore: Ignore = NOTHING,
              create_namespace: str | None = None, take_over: tuple[str, ...] = (),
              act_as: ServiceAccount | None = None) -> Plan:
    """Decide, for the whole app, what applying this commit would do.

    With `allowed_namespaces`, an object outside them (or cluster-scoped) is
    an error before any request: a tenant's repo cannot write elsewhere even
    when gitopsd's RBAC would let it. (So a namespace the apply creates,
    `create_namespace`, is always an allowed one: nothing outside them is
    ever dry-run, so nothing outside them is ever found missing.)

    `partial`: `manifests` are only some of the app's objects (a self-heal,
    see the module docstring). Their live state comes from `cache` when it
    is synced, else from a GET each; no member LIST, no prune set.

    `ignore`: the drift the app allows. Over a live object the plan judges
    (and the apply sends) the desired object without the ignored fields that
    other field managers own (ObjectChange.to_apply), so their changes are
    neither drift nor reverted.

    `create_namespace`: the app's namespace, when the app may create it
    (see the module docstring). `take_over`: the field managers whose
    fields the apply takes over (gitopsd.engine.takeover); never those
    `ignore` leaves to other managers. `act_as`: the app's ServiceAccount,
    which the dry-runs impersonate (see the module docstring).
    """
    plan = Plan(app=inv.app, inventory=inv, partial=partial, ignore=ignore, create_namespace=create_namespace,
                take_over=tuple(take_over), act_as=act_as)
    crd_kinds = _crd_kinds(manifests)
    commit_namespaces = {m.obj["metadata"]["name"] for m in manifests
                         if m.obj.get("kind") == "Namespace" and m.obj.get("apiVersion") == "v1"}

    # Resolve resources; unknown kinds are errors unless a CRD in this commit defines them.
    changes: list[ObjectChange] = []
    for m in manifests:
        ref = ref_of(m.obj)
        change = ObjectChange(ref=ref, action=Action.CREATE, source=m.source, desired=prepare(m.obj, inv))
        try:
            change.resource = kube.resource(m.obj["apiVersion"], m.obj["kind"])
        except UnknownKindError as exc:
            if (ref.group, ref.kind) in crd_kinds:
                change.deferred = True
            else:
                plan.errors.append(f"{m.source}: {ref}: {exc.message} (hint: {exc.hint})")
                continue
        if change.resource is not None and change.resource.namespaced and not ref.namespace:
            plan.errors.append(f"{m.source}: {ref}: namespaced kind without a namespace")
            continue
        if allowed_namespaces is not None and not _may_write(ref, allowed_namespaces):
            where = f"namespace {ref.namespace!r}" if ref.namespace else "cluster scope"
            plan.errors.append(f"{m.source}: {ref}: the app may not write to {where}; allowed namespaces: "
                               f"{', '.join(allowed_namespaces)}")
            continue
        if why := _gitopsd_own(m.obj, ref, inv):
            plan.errors.append(f"{m.source}: {ref}: {why}; an app may not manage gitopsd's own state "
                               f"(hint: rename the object or drop the label)")
            continue
        changes.append(change)

    if partial:
        plan.targets = member_targets(kube, None, changes)
        members = _cached_members(plan.targets, cache) or {}
    else:
        plan.targets = member_targets(kube, inv, changes)
        members = _list_members(kube, inv, plan.targets, cache, changes=changes)
    plan.members = len(members)
    _attach_members(changes, members, plan)
    changes = [c for c in changes if c.desired is not None]  # refused: owned by another app
    if partial:
        changes = _not_going_away(changes, plan)

    def judge(change: ObjectChange) -> None:
        _judge(kube, change, plan, commit_namespaces=commit_namespaces, recreate=recreate)

    # CRDs first: a custom resource whose CRD this commit creates or changes can
    # only be validated against the new schema, i.e. after stage 0 is applied.
    crds = [c for c in changes if not c.deferred and (c.ref.group, c.ref.kind) == CRD_KEY]
    judged = list(crds)
    list(kube.budget.map(judge, crds))
    changing = {_crd_defines(c.desired) for c in crds if c.action != Action.UNCHANGED and c.desired is not None}
    for c in changes:
        if (c.ref.group, c.ref.kind) in changing:
            c.deferred = True
    # By identity: ObjectChange equality would compare whole object bodies.
    crd_ids = {id(c) for c in crds}
    rest = [c for c in changes if not c.deferred and id(c) not in crd_ids]
    # The ownership fast path on this thread: work that sends no request costs less than its hand-off.
    for c in rest:
        if c.live is not None and c.desired is not None and not c.takeover and \
                still_ours(c.live, c.desired, ignore=ignore):
            c.action = Action.UNCHANGED
    judged += [c for c in rest if c.action != Action.UNCHANGED]
    list(kube.budget.map(judge, [c for c in rest if c.action != Action.UNCHANGED]))
    _report_forbidden(kube, plan, judged=len(judged))
    plan.changes = changes = [c for c in changes if c.desired is not None]   # refused once read (_judge)
    if partial:
        return plan   # what it does not name is not gone from Git: nothing to prune or keep

    desired_refs = {c.ref for c in changes}
    desired_namespaces = {c.ref.namespace for c in changes if c.ref.namespace}
    for ref, live in sorted(members.items()):
        if ref in desired_refs:
            continue
        annotations = live["metadata"].get("annotations") or {}
        is_namespace = ref.group == "" and ref.kind == "Namespace"
        if (kept_by := prune_disabled(annotations)) is not None:
            plan.kept.append(ref)
            plan.kept_reasons[ref] = kept_by
        elif allowed_namespaces is not None and not _may_write(ref, allowed_namespaces):
            # The same bounds as for writes: a label or a parent record that
            # points elsewhere (hand-edited, or from before the app was
            # restricted) never makes a tenant's app delete outside them.
            plan.kept.append(ref)
            plan.kept_reasons[ref] = "outside the app's allowed namespaces"
        elif is_namespace and ref.name in desired_namespaces:
            # Deleting it would delete objects of this very commit (the Namespace
            # object moved to another app).
            plan.kept.append(ref)
            plan.kept_reasons[ref] = "it still holds objects of this commit"
        elif is_namespace and prune and (foreign := foreign_objects(kube, ref.name, inv.id)):
            # Deleting a Namespace deletes everything in it, ours or not.
            plan.kept.append(ref)
            plan.kept_reasons[ref] = "it holds objects gitopsd does not manage: " + ", ".join(foreign)
        elif not prune:
            plan.orphans.append(ref)
        else:
            res = kube.resource_for_group_kind(ref.group, ref.kind)
            plan.changes.append(ObjectChange(ref=ref, action=Action.PRUNE, live=live, resource=res))
    if plan.act_as is not None:
        _dry_run_prunes(kube, plan)
    return plan


def _dry_run_prunes(kube: Kube, plan: Plan) -> None:
    """An app acting as its ServiceAccount: each prune dry-run as the account, so a delete it may
    not do fails the plan before anything of the commit is written, as a forbidden apply does
    (gitopsd's own deletes need no such check: deploy/ grants them with every write)."""
    writer = kube.impersonating(plan.act_as)

    def check(change: ObjectChange) -> None:
        uid = (change.live or {}).get("metadata", {}).get("uid")
        try:
            writer.delete(change.resource, change.ref.name, change.ref.namespace or None, uid=uid, dry_run=True)
        except KubeApiError as exc:
            if exc.status == 409:   # changed since listed: the prune itself re-checks its uid
                return
            hint = refusal_hint(plan.act_as, exc if exc.impersonation_refused else None, change.ref.namespace)
            why = redact.scrub_about(exc.api_message, change.live)
            plan.errors.append(f"{change.ref}: prune refused: {exc.reason or exc.status}: {why} ({hint})")

    list(kube.budget.map(check, [c for c in plan.changes if c.action == Action.PRUNE and c.resource is not None]))


def heal_set(manifests: list[Manifest], refs: Collection[ObjectRef]) -> list[Manifest]:
    """What a self-heal of `refs` plans (in manifest order): those objects of
    the last applied commit, what they stand on, and what stands on them.

    - The Namespace of each (when the app has it) and the CRD of each custom
      resource: the partial plan must see them Terminating (then it waits,
      see make_plan) or gone (then they are re-created first, stage 0).
    - Every object the app keeps in a drifted Namespace and every custom
      resource of a drifted CRD: deleting either deleted those too, and only
      the Namespace's or CRD's own event says so once it is gone.
    What is still as gitopsd applied it costs no request to plan (the
    member cache and the ownership fast path), so the hot path of one hand
    edit stays one dry-run and one apply.
    """
    by_ref = {ref_of(m.obj): m for m in manifests}
    drifted = {r for r in refs if r in by_ref}
    drifted_namespaces = {r.name for r in drifted if (r.group, r.kind) == NAMESPACE_KEY}
    drifted_crd_kinds = {_crd_defines(by_ref[r].obj) for r in drifted if (r.group, r.kind) == CRD_KEY}
    used_namespaces = {r.namespace for r in drifted if r.namespace}
    used_kinds = {(r.group, r.kind) for r in drifted}

    def wanted(ref: ObjectRef, m: Manifest) -> bool:
        key = (ref.group, ref.kind)
        return (ref in drifted
                or ref.namespace in drifted_namespaces or key in drifted_crd_kinds    # stands on one
                or (key == NAMESPACE_KEY and ref.name in used_namespaces)            # one stands on it
                or (key == CRD_KEY and _crd_defines(m.obj) in used_kinds))
    return [m for ref, m in by_ref.items() if wanted(ref, m)]


# Labels that mark gitopsd's own objects: an ApplySet parent (its id) and an
# audit segment. A manifest carrying one would pass for gitopsd's state.
RESERVED_LABELS = (ID_LABEL, "gitopsd.io/audit-app")
OWN_STATE_KINDS = {("", "ConfigMap"), ("coordination.k8s.io", "Lease")}


def _gitopsd_own(obj: dict, ref: ObjectRef, inv: Inventory) -> str | None:
    """Why this desired object would overwrite or impersonate gitopsd's own
    state (None when it does not): in gitopsd's namespace, the ConfigMaps
    and Leases named `gitopsd-*` are its parents, status, audit trail and
    leader Lease — an app that wrote one could rewrite history or take
    leadership. Other objects in that namespace are fine (gitopsd may
    manage its own Deployment)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    reserved = [k for k in RESERVED_LABELS if k in labels]
    if reserved:
        return f"carries the label {reserved[0]}, reserved for gitopsd's own objects"
    if ref.namespace == inv.namespace and (ref.group, ref.kind) in OWN_STATE_KINDS \
            and ref.name.startswith("gitopsd-"):
        return f"{ref.kind} names starting with 'gitopsd-' in namespace {inv.namespace} are gitopsd's own"
    return None


def _may_write(ref: ObjectRef, allowed_namespaces: tuple[str, ...]) -> bool:
    """Inside the allowed namespaces. An app may own the Namespace objects of
    its allowed namespaces (overlays often ship them); any other
    cluster-scoped object is out of bounds."""
    own_namespace = ref.group == "" and ref.kind == "Namespace" and ref.name in allowed_namespaces
    return own_namespace or (bool(ref.namespace) and ref.namespace in allowed_namespaces)


# Objects every namespace gets without anyone asking: not a reason to keep one.
_AUTOMATIC = {("", "ConfigMap", "kube-root-ca.crt"), ("", "ServiceAccount", "default")}
_NEVER_USER_DATA = {("", "Event"), ("events.k8s.io", "Event"), ("", "Endpoints"),
                    ("discovery.k8s.io", "EndpointSlice")}


def foreign_objects(kube: Kube, namespace: str, applyset_id: str, *, limit: int = 3) -> list[str]:
    """Why the Namespace must not be pruned: up to `limit` objects in it that
    gitopsd does not manage, or the kinds it could not look at. [] = safe.

    Deleting a Namespace deletes everything in it, whoever made it, so the
    check must see all of it: every page of every namespaced kind the
    apiserver serves (discovery refreshed first: a CRD added a minute ago
    counts). An object is ours when it carries our part-of label, or when it
    is owned by an object in the same namespace (pods of our Deployments:
    their owners are checked in turn). Fail-safe: a kind that cannot be
    listed (RBAC forbids it, its aggregated API is down) keeps the Namespace,
    because what gitopsd cannot see it cannot protect.

    Costs one metadata-only LIST per namespaced kind (more pages only for
    large namespaces), and runs only when a Namespace is about to be pruned.
    """
    kube.discover()
    found = [f"objects of {gv} (its API server does not answer discovery)"
             for gv in sorted(kube.stale_group_versions)]
    for res in sorted(kube.namespaced_resources(), key=lambda r: (r.group, r.kind)):
        if len(found) >= limit:
            break
        if (res.group, res.kind) in _NEVER_USER_DATA:
            continue
        try:
            for item in kube.list_metadata(res, namespace=namespace, page=NAMESPACE_CHECK_PAGE):
                meta = item.get("metadata") or {}
                if not _ours_or_automatic(kube, res, meta, applyset_id):
                    found.append(f"{res.kind}/{meta.get('name')}")
                    break   # one per kind is enough to name; look at the other kinds
        except GitopsdError as exc:
            if _kind_gone(kube, res, exc):
                continue   # its CRD was deleted since discovery, and its objects with it
            status = getattr(exc, "status", None)
            why = "gitopsd may not list them" if status == 403 else f"listing them failed ({exc})"
            found.append(f"{_plural_label(res)} ({why})")
    return found[:limit]


def _kind_gone(kube: Kube, res: Resource, exc: Exception) -> bool:
    """A 404 for the kind's path itself, and discovery, asked again, no longer lists the kind
    nor calls its group-version stale: a CRD deleted since discovery (deleting a CRD deletes
    its objects first, so none can be left). An aggregated API that stopped answering is
    stale, not gone: its objects may exist, and the namespace is kept."""
    if not (isinstance(exc, KubeApiError) and exc.path_not_served):
        return False
    kube.discover()
    return (f"{res.group}/{res.version}" not in kube.stale_group_versions
            and kube.resource_for_group_kind(res.group, res.kind) is None)


def _ours_or_automatic(kube: Kube, res: Resource, meta: dict, applyset_id: str) -> bool:
    if (meta.get("labels") or {}).get(PART_OF_LABEL) == applyset_id:
        return True
    if (res.group, res.kind, meta.get("name")) in _AUTOMATIC:
        return True
    owners = meta.get("ownerReferences") or []
    # Owned objects go with their owner. Only owners inside this namespace
    # excuse them: those are checked themselves. An owner elsewhere (a
    # cluster-scoped object) says nothing about whether this one is ours.
    return bool(owners) and all(_namespaced_kind(kube, o) for o in owners)


def _namespaced_kind(kube: Kube, owner: dict) -> bool:
    group, _ = split_api_version(owner.get("apiVersion") or "")
    res = kube.resource_for_group_kind(group, owner.get("kind") or "")
    return res is not None and res.namespaced


def _plural_label(res: Resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def judge_deferred(kube: Kube, plan: Plan, *, recreate: bool = False) -> list[str]:
    """Dry-run the objects that had to wait for stage 1; returns new errors."""
    before = len(plan.errors)
    deferred = [c for c in plan.changes if c.deferred]
    for change in deferred:
        change.deferred = False
        try:
            change.resource = kube.resource(change.desired["apiVersion"], change.desired["kind"])
        except UnknownKindError as exc:
            plan.errors.append(f"{change.source}: {change.ref}: {exc.message}")
            continue
    judged = [c for c in deferred if c.resource is not None]
    list(kube.budget.map(lambda c: _judge(kube, c, plan, commit_namespaces=set(), recreate=recreate), judged))
    _report_forbidden(kube, plan, judged=len(judged))
    return plan.errors[before:]


# ------------------------------------------------------------------ internals

CRD_KEY = ("apiextensions.k8s.io", "CustomResourceDefinition")
NAMESPACE_KEY = ("", "Namespace")


def _crd_defines(crd: dict) -> tuple[str, str]:
    """(group, kind) that a CustomResourceDefinition serves."""
    spec = crd.get("spec") or {}
    return spec.get("group", ""), (spec.get("names") or {}).get("kind", "")


def _crd_kinds(manifests: list[Manifest]) -> set[tuple[str, str]]:
    return {_crd_defines(m.obj) for m in manifests
            if (split_api_version(m.obj.get("apiVersion", ""))[0], m.obj.get("kind")) == CRD_KEY}


def member_targets(kube: Kube, inv: Inventory | None, changes: list[ObjectChange]) -> set[tuple[Resource, str | None]]:
    """Every group-kind x namespace where members may live: desired ones and the parent's record
    (without `inv`: the desired ones only)."""
    targets: set[tuple[Resource, str | None]] = set()
    for c in changes:
        if c.resource is not None:
            targets.add((c.resource, c.ref.namespace if c.resource.namespaced else None))
    for gk in (inv.group_kinds if inv is not None else ()):
        group, kind = split_group_kind(gk)
        res = kube.resource_for_group_kind(group, kind)
        if res is None:
            continue  # the kind is gone from the cluster (CRD deleted): nothing to list or prune
        if res.namespaced:
            targets.update((res, ns) for ns in inv.namespaces)
        else:
            targets.add((res, None))
    return targets


def _cached_members(targets: set[tuple[Resource, str | None]],
                    cache: LiveCache | None) -> dict[ObjectRef, dict] | None:
    """Live members in `targets` from the watch cache; None unless it has synced all of them."""
    if cache is None or not targets <= cache.targets:
        return None
    cached = cache.members()
    if cached is None:
        return None
    wanted = {(res.group, res.kind, ns or "") for res, ns in targets}
    return {ref: obj for ref, obj in cached.items() if (ref.group, ref.kind, ref.namespace) in wanted}


def _list_members(kube: Kube, inv: Inventory, targets: set[tuple[Resource, str | None]],
                  cache: LiveCache | None, *, changes: Collection[ObjectChange] = ()) -> dict[ObjectRef, dict]:
    """Live members: from the watch cache when it covers every target — asked to, when it does
    not yet (an app's first plan) — else one LIST per target. A LIST gitopsd may not send (403)
    fails the plan naming the commit's objects of that kind and their files: an app that ships a
    kind gitopsd has no rights on learns which object it is, not only which request failed."""
    if cache is not None and not targets <= cache.targets:
        # Keep what it covers: a health wait may be reading a kind this plan no longer has.
        cache.ensure(cache.targets | targets)
    cached = _cached_members(targets, cache)
    if cached is not None:
        return cached

    def fetch(target):
        res, ns = target
        try:
            return kube.list(res, namespace=ns, label_selector=inv.selector)
        except KubeApiError as exc:
            if exc.status != 403:
                raise
            mine = [c for c in changes if (c.ref.group, c.ref.kind) == (res.group, res.kind)
                    and (ns is None or c.ref.namespace == ns)]
            named = "; ".join(f"{c.source}: {c.ref}" if c.source else str(c.ref) for c in mine[:5]) + \
                (f" and {len(mine) - 5} more" if len(mine) > 5 else "")
            where = f" in namespace {ns}" if ns else ""
            raise GitopsdError(f"{named or 'objects of the app'}: gitopsd may not list {res.kind} "
                               f"({res.api_version}){where}, which it must to find the app's objects of that kind "
                               f"before writing any: {exc.message}",
                               hint=f"grant list and watch (and get, create, patch, delete) on "
                                    f"{res.plural}{'.' + res.group if res.group else ''} to gitopsd, or leave "
                                    f"{res.kind} out of the app") from None

    members: dict[ObjectRef, dict] = {}
    for items in kube.budget.map(fetch, sorted(targets, key=lambda t: (t[0].group, t[0].kind, t[1] or ""))):
        for item in items:
            # Belt and braces: the selector should guarantee it, but an object
            # without our exact label is never treated as ours.
            if (item["metadata"].get("labels") or {}).get(PART_OF_LABEL) == inv.id:
                members[ref_of(item)] = item
    return members


def _not_going_away(changes: list[ObjectChange], plan: Plan) -> list[ObjectChange]:
    """A partial plan's changes minus those being deleted, or whose Namespace or CRD
    (in this plan) is; those are named in plan.waiting.

    A Namespace deleted by hand goes Terminating, its objects go, then it
    does: an apply in between is refused ("being terminated") or deleted
    again. The heal of the Namespace's own DELETED event brings them all
    back, in stage order (heal_set plans a Namespace with what the app
    keeps in it, a CRD with its custom resources).
    """
    gone_namespaces = {c.ref.name for c in changes
                       if (c.ref.group, c.ref.kind) == NAMESPACE_KEY and _terminating(c.live)}
    gone_kinds = {_crd_defines(c.desired) for c in changes if (c.ref.group, c.ref.kind) == CRD_KEY
                  and _terminating(c.live)}
    keep = []
    for c in changes:
        if _terminating(c.live) or c.ref.namespace in gone_namespaces or (c.ref.group, c.ref.kind) in gone_kinds:
            plan.waiting.append(c.ref)
        else:
            keep.append(c)
    return keep


def _terminating(live: dict | None) -> bool:
    return bool(live and (live.get("metadata") or {}).get("deletionTimestamp"))


def _attach_members(changes: list[ObjectChange], members: dict[ObjectRef, dict], plan: Plan) -> None:
    """Attach live members to their changes and check them; mark the rest unseen (see _judge).
    Deferred changes are judged after stage 0, against no live object."""
    for c in changes:
        if c.deferred:
            continue
        if c.ref in members:
            c.live = members[c.ref]
            if _check_owner(c, plan):
                c.takeover = () if frozen(c.desired, c.live) else takeover.managers(c.live, plan.take_over,
                                                                                     ignore=plan.ignore)
        else:
            c.unseen = True


def _check_owner(change: ObjectChange, plan: Plan) -> bool:
    """Whether the live object may be this app's; if not, the plan error says whose it is and the
    change is dropped (desired None): an ApplySet parent, or another ApplySet's member."""
    labels = change.live["metadata"].get("labels") or {}
    if ID_LABEL in labels:
        plan.errors.append(f"{change.source}: {change.ref}: is the ApplySet parent of another app "
                           f"({labels[ID_LABEL]}); an app may not manage it")
    elif (owner := labels.get(PART_OF_LABEL)) and owner != change.desired["metadata"]["labels"][PART_OF_LABEL]:
        plan.errors.append(f"{change.source}: {change.ref}: already owned by another ApplySet ({owner}); "
                           f"two apps must not manage one object")
    else:
        return True
    change.desired = None
    return False


def _read_unseen(kube: Kube, change: ObjectChange, plan: Plan) -> bool:
    """An unseen object turned out to exist (or its dry-run failed): read it, and check it may be
    ours. False when it may not (the change is dropped, see _check_owner)."""
    change.unseen = False
    change.live = kube.get(change.resource, change.ref.name, change.ref.namespace or None)
    if change.live is None:
        return True
    if not _check_owner(change, plan):
        return False
    change.takeover = () if frozen(change.desired, change.live) else takeover.managers(
        change.live, plan.take_over, ignore=plan.ignore)
    return True


def still_ours(live: dict, desired: dict, *, ignore: Ignore = NOTHING) -> bool:
    """True when nobody can have changed the live object since gitopsd applied `desired`.

    See the module docstring (ownership fast path). Conservative: any doubt
    (no entry for us, an unexpected list shape) answers False, which only
    costs a dry-run. Fields `ignore` leaves to other managers are not asked
    for: gitopsd does not apply them over a live object, so another
    manager's change of one is no drift (and costs no dry-run).
    """
    meta = live.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    if frozen(desired, live):
        return True   # nothing to write, whoever changed it: no drift either
    if (meta.get("annotations") or {}).get(HASH_ANNOTATION) != desired["metadata"]["annotations"][HASH_ANNOTATION]:
        return False
    entry = next((m for m in meta.get("managedFields") or []
                  if m.get("manager") == "gitopsd" and m.get("operation") == "Apply" and not m.get("subresource")),
                 None)
    if entry is None:
        return False
    if "stringData" in desired:
        # Write-only: the server never stores stringData, so nobody can take
        # those fields from us and a hand edit of `data` leaves our set intact.
        return False
    owned = entry.get("fieldsV1") or {}
    applied, _ = ignore.leave_alone(desired, live)
    body = {k: v for k, v in applied.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: v for k, v in applied["metadata"].items() if k not in ("name", "namespace")}
    return covers(owned, body)


def _judge(kube: Kube, change: ObjectChange, plan: Plan, *, commit_namespaces: set[str], recreate: bool) -> None:
    """Decide one change's action by its dry-run (or the ownership fast path).

    An unseen object (not a member, not read) whose dry-run shows that it
    exists — a resourceVersion, which a dry-run create never has — or whose
    dry-run failed is read now, checked like a member, and judged against
    what was read; one that does not exist is a create, as its GET would
    have said. A race with a create in between is the same race as between
    a GET and the apply. When what was read has fields the app leaves to
    other managers (plan.ignore), the dry-run is repeated without them: the
    first one sent all of `desired`, as for a create. A dry-run that ran on a
    newer object than the one read, when the comparison names a field the
    apply does not set (another manager wrote it in between: _stale), is
    judged again against the object read anew, so their write is never shown
    as this change's.
    """
    live, desired = change.live, change.desired
    if desired is None:
        return
    if live is not None and not change.takeover and still_ours(live, desired, ignore=plan.ignore):
        change.action = Action.UNCHANGED
        return
    _leave_alone(change, plan.ignore)
    after = _dry_run(kube, change, plan, commit_namespaces=commit_namespaces, recreate=recreate)
    if after is None:
        return
    if change.unseen and (after.get("metadata") or {}).get("resourceVersion"):
        after = _read_again(kube, change, plan, after, dry_run=False, commit_namespaces=commit_namespaces,
                            recreate=recreate)
        if after is None:
            return
    change.unseen = False
    for _ in range(STALE_READS):
        if not _stale(change.live, after, change.to_apply()):
            break
        # Written by another hand between the read and the dry-run (a controller's annotation,
        # say): the dry-run ran on that newer object, so compare it with that object read
        # again, never with the older read (which would show their change as ours).
        after = _read_again(kube, change, plan, after, dry_run=True, commit_namespaces=commit_namespaces,
                            recreate=recreate)
        if after is None:
            return
    live = change.live
    d = difflib_.compare(live, after, label=str(change.ref))
    if live is None:
        change.action, change.diff = Action.CREATE, d
    elif d.empty and not change.takeover:
        change.action = Action.UNCHANGED
    else:
        # A takeover alone is an update too: what those managers set and Git does not goes.
        change.action, change.diff = Action.UPDATE, d


def _read_again(kube: Kube, change: ObjectChange, plan: Plan, after: dict, *, dry_run: bool,
                commit_namespaces: set[str], recreate: bool) -> dict | None:
    """Read the change's object anew and judge it against that: None when that settles it
    (refused, unchanged, or the dry-run gave no answer), else the dry-run to compare with: a
    new one when `dry_run` or when the body changed (fields left to other managers), else `after`."""
    if not _read_unseen(kube, change, plan):
        return None
    live = change.live
    if live is not None and not change.takeover and still_ours(live, change.desired, ignore=plan.ignore):
        change.action = Action.UNCHANGED
        return None
    if _leave_alone(change, plan.ignore) or dry_run:
        return _dry_run(kube, change, plan, commit_namespaces=commit_namespaces, recreate=recreate)
    return after


# How often a change is judged again when its object was written between the read and the dry-run.
STALE_READS = 3


def _stale(live: dict | None, after: dict, applied: dict | None) -> bool:
    """Whether comparing `after` with `live` could show another hand's write as this change's.

    The dry-run ran on a newer object than `live` when the resourceVersions differ (a dry-run
    keeps the stored object's: nothing is stored). That alone is common and harmless (a
    controller's status update bumps it), so it counts only when the comparison also names a
    field the applied body does not set: only such a field can be another manager's write
    between the read and the dry-run (or one the apply drops, which a fresh read shows again).
    """
    if live is None or applied is None:
        return False
    before = (live.get("metadata") or {}).get("resourceVersion")
    seen = (after.get("metadata") or {}).get("resourceVersion")
    if not (before and seen and before != seen):
        return False
    return any(not difflib_.within(applied, f) for f in difflib_.compare(live, after, label="").fields)


def _leave_alone(change: ObjectChange, ignore: Ignore) -> bool:
    """Set what the change applies over its live object (see ObjectChange.to_apply); whether
    any field is left to other managers."""
    if change.live is None:
        change.body, change.left_alone = None, ()
        return False
    body, change.left_alone = ignore.leave_alone(change.desired, change.live)
    change.body = body if change.left_alone else None
    return bool(change.left_alone)


def _dry_run(kube: Kube, change: ObjectChange, plan: Plan, *, commit_namespaces: set[str],
             recreate: bool) -> dict | None:
    """The server's view of the change applied; None when it cannot be judged by it (the
    reason is in the plan's errors, or the change is deferred or a re-creation)."""
    desired = change.desired
    writer = kube.impersonating(plan.act_as) if plan.act_as is not None else kube
    try:
        return writer.apply(change.to_apply(), dry_run=True)
    except UnknownKindError as exc:   # served when discovery was cached, gone since (its CRD deleted)
        plan.errors.append(f"{change.source}: {change.ref}: {exc.message} (hint: {exc.hint})")
        return None
    except KubeApiError as exc:
        missing = bool(change.ref.namespace) and namespace_missing(exc, change.ref.namespace)
        if exc.status == 404 and change.ref.namespace in commit_namespaces:
            change.unseen = False
            change.deferred = True  # its Namespace arrives in this commit
            return None
        if missing and change.ref.namespace == plan.create_namespace:
            change.unseen = False
            change.deferred = True  # its Namespace is created first (createNamespace): judged after stage 0
            plan.missing_namespace = plan.create_namespace
            return None
        # (In a missing namespace nothing exists to read.)
        if change.unseen and not missing and not _read_unseen(kube, change, plan):
            return None
        live = change.live
        annotated = recreate_enabled(desired["metadata"].get("annotations") or {})
        # The app-wide switch never covers kinds whose deletion destroys data
        # (every custom resource of a CRD, a namespace's contents, a volume):
        # those need the annotation on the object itself.
        allowed = annotated or (recreate and (change.ref.group, change.ref.kind) not in NEVER_RECREATE_BY_DEFAULT)
        if exc.is_immutable_field and live is not None and allowed:
            change.action = Action.RECREATE
            change.diff = difflib_.compare(live, desired, label=str(change.ref))
            return None
        reason = redact.scrub_about(exc.api_message, desired)
        if exc.status == 403 and plan.act_as is not None and not exc.impersonation_refused:
            plan.forbidden.append((change, reason))
            return None   # reported with a hint once every dry-run is back (_report_forbidden)
        hint = ""
        if exc.impersonation_refused:
            hint = f" ({refusal_hint(plan.act_as, exc, change.ref.namespace)})"
        elif exc.is_immutable_field:
            hint = (f" (hint: this field cannot change in place; annotate the object "
                    f"{RECREATE_ANNOTATION}=enabled or sync with --recreate to delete and re-create it)")
        elif missing:
            hint = f" ({missing_namespace_hint(change.ref.namespace, plan.create_namespace)})"
        plan.errors.append(f"{change.source}: {change.ref}: {exc.reason or exc.status}: {reason}{hint}")
        return None


def missing_namespace_hint(namespace: str, create_namespace: str | None) -> str:
    """How to get `namespace` created, for the error of an object whose namespace does not exist."""
    if create_namespace is None:
        return (f"hint: namespace {namespace} does not exist; set createNamespace: true on the app "
                f"(gitopsd sync/diff --create-namespace) to have gitopsd create the app's namespace, "
                f"or add a Namespace {namespace} to the repository")
    return (f"hint: namespace {namespace} does not exist; createNamespace creates only the app's namespace "
            f"({create_namespace}): add a Namespace {namespace} to the repository")


def _report_forbidden(kube: Kube, plan: Plan, *, judged: int) -> None:
    """Turn the dry-runs the app's account was refused into plan errors, each with the hint
    that fits: grant the account this write — or, when it was refused every write it was
    asked for, look at the account itself (missing, or nothing bound to it)."""
    refused, plan.forbidden = plan.forbidden, []
    if not refused:
        return
    account = plan.act_as
    if len(refused) < judged:
        for change, reason in refused:
            plan.errors.append(f"{change.source}: {change.ref}: Forbidden: {reason} "
                               f"({refusal_hint(account, None, change.ref.namespace)})")
        return
    # The account first: the apiserver's words are the same for every object, and a reason is cut short.
    why = _account_trouble(kube, account)
    for change, reason in refused:
        plan.errors.append(f"{change.source}: {change.ref}: Forbidden: every write of the app was refused to "
                           f"ServiceAccount {account}: {why}; the apiserver: {reason}")


def refusal_hint(account: ServiceAccount, exc: KubeApiError | None, namespace: str) -> str:
    """How to get a write done that was refused while acting as the app's account (`namespace`: the
    object's, '' if cluster-scoped): gitopsd's own `impersonate` right when the apiserver refused the
    impersonation itself (`exc`), else a grant to the account."""
    if exc is not None and exc.impersonation_refused:
        return (f"hint: gitopsd itself may not act as ServiceAccount {account} (serviceAccountName): grant "
                f"gitopsd `impersonate` on serviceaccounts, as ClusterRole gitopsd-impersonate in deploy/ does")
    where = f"a RoleBinding in namespace {namespace}" if namespace else "a ClusterRoleBinding"
    return (f"hint: the app acts as ServiceAccount {account} (serviceAccountName), which may do only what "
            f"RBAC grants it: grant this with {where} to {account.user}, or keep the object out of the app")


def _account_trouble(kube: Kube, account: ServiceAccount) -> str:
    """Why an account was refused everything: whether it exists, as far as gitopsd may see."""
    unbound = (f"no Role or ClusterRole is bound to it (e.g. `kubectl -n <namespace> create rolebinding "
               f"{account.name} --clusterrole=edit --serviceaccount={account.namespace}:{account.name}`)")
    try:
        found = kube.get(kube.resource("v1", "ServiceAccount"), account.name, account.namespace)
    except GitopsdError:
        return (f"the account may be missing (impersonating a ServiceAccount that does not exist still "
                f"authenticates, and is allowed nothing), or {unbound}")
    if found is None:
        return (f"it does not exist; create it (`kubectl -n {account.namespace} create serviceaccount "
                f"{account.name}`) and bind it a Role, or fix serviceAccountName")
    return f"it exists, but {unbound}"
