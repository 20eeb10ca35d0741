"""Apply a Plan: staged server-side apply, then prune, under the ApplySet.

Order (DESIGN.md §3): the parent is widened to old ∪ new group-kinds and
namespaces first, so a crash mid-apply never hides a member from the next
prune; stage 0 (CRDs, Namespaces, ClusterRoles) is applied and CRDs waited
on until Established; objects that could only be validated after stage 0 are
dry-run then, and any error stops the sync before stage 1; stages 1..3 follow;
prune runs last, in reverse stage order; finally the parent is narrowed —
unless the widening already wrote exactly that (a new app, a commit that
added or removed no kind or namespace): an unchanged parent is not written
again.

Before stage 0, a namespace the plan found missing and may create
(createNamespace, Plan.missing_namespace) is created: a plain create (no
server-side apply, so gitopsd holds no Apply entry on it), labelled
gitopsd.io/created-by=<app> and without the ApplySet label — so it is no
member and never pruned; only a Namespace object in Git makes it one.

An update of an object that other managers wrote first (ObjectChange.takeover)
takes their fields over just before the apply: one JSON patch of its
managedFields (gitopsd.engine.takeover), retried once against a fresh read
when the object changed since it was read.

A partial plan (a self-heal, gitopsd.engine.plan) goes through the same
stages but prunes nothing and never narrows the parent: it names only some
of the app's objects, so its group-kinds and namespaces are not the app's.
The parent is not even rewritten when it already records what the heal
writes (the usual case: the objects are members of the last commit).

Identity: what is written on behalf of the app's manifests — applies,
takeover patches, the delete of a re-creation, prunes and a created
namespace — is sent as the app's ServiceAccount when it names one
(Plan.act_as, gitopsd.kube.Kube.impersonating), so the app can do no more
than its account may; the plan's dry-runs were made as the same account. A
prune the account may not do fails the app with the apiserver's reason; the
object stays. gitopsd's own bookkeeping — the ApplySet parent, the CRD
wait — stays its own.

Within a stage objects are independent and are applied concurrently on the
process's shared fan-out (`kube.budget.map`, gitopsd.budget), whose request
budget also bounds them together with every other reconcile. A failure in a stage stops the later
stages and the prune: nothing is deleted on a partial apply.

Leadership: the daemon hands in a Kube fenced by its lease (gitopsd.daemon.leader.
FencedKube), which refuses each write the moment the replica can no longer
prove it leads, before the request is sent. The stage in flight then ends
(the other writes of the pool are refused the same way), nothing later is
sent, and LeadershipLost leaves apply_plan carrying how many planned writes
were not sent. What was written stays: the new leader converges it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from gitopsd import redact
from gitopsd.engine import inventory, takeover
from gitopsd.engine.ignore import NOTHING, Ignore
from gitopsd.engine.inventory import PART_OF_LABEL
from gitopsd.engine.plan import Action, ObjectChange, Plan, judge_deferred, refusal_hint
from gitopsd.errors import GitopsdError, LeadershipLost
from gitopsd.kube import Kube, KubeApiError, UnknownKindError
from gitopsd.objects import ObjectRef

STAGE_FIRST = {("apiextensions.k8s.io", "CustomResourceDefinition"), ("", "Namespace"),
               ("rbac.authorization.k8s.io", "ClusterRole")}
STAGE_LAST = {("admissionregistration.k8s.io", k) for k in (
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
    "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")}
STAGES = (0, 1, 2, 3)
# On a namespace gitopsd created for an app (createNamespace): which app. Not the ApplySet label: no member.
CREATED_BY_LABEL = "gitopsd.io/created-by"
CRD_ESTABLISHED_TIMEOUT = 60.0
RECREATE_DELETE_TIMEOUT = 60.0


def stage_of(ref: ObjectRef) -> int:
    """0: CRDs, Namespaces, ClusterRoles; 1: *Class kinds; 2: the rest; 3: admission webhooks/policies."""
    key = (ref.group, ref.kind)
    if key in STAGE_FIRST:
        return 0
    if key in STAGE_LAST:
        return 3
    if ref.kind.endswith("Class"):
        return 1
    return 2


@dataclass
class ApplyOutcome:
    applied: list[ObjectChange] = field(default_factory=list)   # written: created, updated, recreated
    pruned: list[ObjectChange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    created_namespace: str | None = None                        # created for the app (createNamespace)

    @property
    def ok(self) -> bool:
        return not self.errors


Progress = Callable[[str, ObjectChange], None]


def apply_plan(kube: Kube, plan: Plan, *, prune: bool = True, recreate: bool = False,
               on_progress: Progress | None = None) -> ApplyOutcome:
    """Write the plan to the cluster; see the module docstring for the order.

    Raises LeadershipLost, carrying how many planned writes were not sent,
    when a fenced Kube refuses a write.
    """
    out = ApplyOutcome()
    sent: set[int] = set()   # id() of each planned change whose request went out (or failed on its own)
    try:
        _apply(kube, plan, out, sent, prune=prune, recreate=recreate,
               progress=on_progress or (lambda verb, change: None))
    except LeadershipLost as exc:
        exc.unsent = sum(1 for c in plan.changes if id(c) not in sent and c.action != Action.UNCHANGED
                         and (prune or c.action != Action.PRUNE))
        raise
    return out


def _apply(kube: Kube, plan: Plan, out: ApplyOutcome, sent: set[int], *, prune: bool, recreate: bool,
           progress: Progress) -> None:
    inv = plan.inventory
    writer = kube.impersonating(plan.act_as) if plan.act_as is not None else kube   # the app's own writes
    writes = [c for c in plan.changes if c.action in (Action.CREATE, Action.UPDATE, Action.RECREATE) or c.deferred]
    prunes = [c for c in plan.changes if c.action == Action.PRUNE] if prune else []
    final_gks, final_nss = plan.group_kinds, plan.namespaces
    if not writes and not prunes and (plan.partial or inv.exists and inv.group_kinds == final_gks and
                                      inv.namespaces == final_nss):
        return  # nothing to do, not even on the parent

    recorded = inv.exists and final_gks <= inv.group_kinds and final_nss <= inv.namespaces
    if not (plan.partial and recorded):
        inventory.write(kube, inv, group_kinds=inv.group_kinds | final_gks,
                        namespaces=inv.namespaces | final_nss)

    if plan.missing_namespace:
        error = _create_namespace(writer, plan.missing_namespace, app=plan.app)
        if error:
            out.errors.append(error)
            return
        out.created_namespace = plan.missing_namespace

    for stage in STAGES:
        if stage == 1 and any(c.deferred for c in plan.changes):
            errors = judge_deferred(kube, plan, recreate=recreate)
            if errors:
                out.errors.extend(errors)
                return
            writes = [c for c in plan.changes if c.action in (Action.CREATE, Action.UPDATE, Action.RECREATE)]
        batch = [c for c in writes if stage_of(c.ref) == stage and not c.deferred
                 and c.action != Action.UNCHANGED]
        write = partial(_write, writer, take_over=plan.take_over, ignore=plan.ignore)
        for change, error in _each(kube, batch, write, sent, out.errors):
            if error:
                out.errors.append(error)
            else:
                out.applied.append(change)
                progress(change.action.value, change)
        if out.errors:
            return
        if stage == 0:
            crds = [c for c in batch if c.ref.kind == "CustomResourceDefinition"]
            if crds:
                out.errors.extend(_wait_established(kube, crds))
                if out.errors:
                    return
                kube.discover()

    for stage in reversed(STAGES):
        batch = [c for c in prunes if stage_of(c.ref) == stage]
        for change, (error, deleted) in _each(kube, batch, lambda c: _delete(writer, c, inv.id), sent, out.errors):
            if error:
                out.errors.append(error)
            elif deleted:
                out.pruned.append(change)
                progress("prune", change)
    if out.errors:
        return  # keep the widened parent: the next sync retries the prune
    if plan.partial:
        return  # a part of the app (a self-heal): the parent keeps the whole app's record
    kept_gks = {r.group_kind for r in plan.kept + plan.orphans}
    kept_nss = {r.namespace for r in plan.kept + plan.orphans if r.namespace}
    narrowed = (final_gks | kept_gks, final_nss | kept_nss)
    if narrowed != (inv.group_kinds, inv.namespaces):   # else the widening wrote exactly this (a new app)
        inventory.write(kube, inv, group_kinds=narrowed[0], namespaces=narrowed[1])


class _Unreachable(Exception):
    """The apiserver stopped answering during this write: its result is unknown."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


_NOT_SENT = object()


def _each(kube: Kube, batch: list[ObjectChange], fn, sent: set[int], errors: list[str]):
    """(change, fn(change)) for a stage's batch, run on the budget's fan-out, in batch order;
    each change yielded is added to `sent`.

    When the apiserver stops answering (fn raises _Unreachable), the writes
    already in flight are reported one by one, as their result is unknown,
    and the rest of the batch is not sent: one line in `errors` counts them.
    Queuing a hundred more requests at a dead server would only print a
    hundred identical lines and delay the next reconcile, which retries them.

    A write refused by the fence (LeadershipLost) is not in the output; the
    rest of the batch still runs — each of its writes meets the same closed
    fence and is refused before it is sent, so when the pool is done nothing
    more of this stage can reach the apiserver — then LeadershipLost is
    raised, after the caller has seen every write that did go out.
    """
    if not batch:
        return

    gone = threading.Event()

    def run(change: ObjectChange):
        if gone.is_set():
            return _NOT_SENT
        try:
            return fn(change)
        except LeadershipLost as exc:
            return exc
        except _Unreachable as exc:
            gone.set()
            return exc
    lost: LeadershipLost | None = None
    not_sent = 0
    for result, change in zip(kube.budget.map(run, batch), batch):   # map first: it ends the loop
        if isinstance(result, LeadershipLost):
            lost = result
            continue
        if result is _NOT_SENT:
            not_sent += 1
            continue
        sent.add(id(change))
        if isinstance(result, _Unreachable):
            errors.append(result.line)
            continue
        yield change, result
    if lost is not None:
        raise lost
    if not_sent:
        errors.append(f"{not_sent} more write(s) of this stage not sent: the apiserver stopped answering "
                      "(the next reconcile sends them)")


def _write(kube: Kube, change: ObjectChange, *, take_over: tuple[str, ...] = (),
           ignore: Ignore = NOTHING) -> str | None:
    """Apply one object; return an error line, or None. LeadershipLost passes through."""
    try:
        if change.action == Action.RECREATE:
            _delete_and_wait(kube, change)
        elif change.takeover and change.live is not None:
            _take_over(kube, change, take_over, ignore=ignore)
        change.live = kube.apply(change.to_apply())
        return None
    except KubeApiError as exc:
        return f"{change.source}: {change.ref}: {exc.reason or exc.status}: " \
               f"{redact.scrub_about(exc.api_message, change.desired)}{_account_hint(kube, exc, change)}"
    except UnknownKindError as exc:
        return f"{change.source}: {change.ref}: {exc.message}"
    except GitopsdError as exc:  # the apiserver went away: the write may or may not have happened
        raise _Unreachable(f"{change.source}: {change.ref}: result unknown: {exc.message}") from None


def _take_over(kube: Kube, change: ObjectChange, names: tuple[str, ...], *, ignore: Ignore) -> None:
    """Take the fields of `names` over on the live object (gitopsd.engine.takeover); raises KubeApiError.

    The patch holds only while the entries it rewrites are as read (422 when
    one changed, as the patch's `test` fails): then the object is read again
    and the patch made anew, once.
    """
    names = names or change.takeover
    ns = change.ref.namespace or None
    live = change.live
    for attempt in (1, 2):
        ops = takeover.patch(live, names, ignore=ignore)
        if ops is None:
            return
        try:
            kube.json_patch(change.resource, change.ref.name, ns, ops)
            return
        except KubeApiError as exc:
            if exc.status not in (409, 422) or attempt == 2:
                raise
        live = kube.get(change.resource, change.ref.name, ns)
        if live is None:
            return   # deleted meanwhile: the apply creates it, and nobody else owns anything


def _create_namespace(kube: Kube, name: str, *, app: str) -> str | None:
    """Create the app's namespace (createNamespace); an error line, or None. One that exists is left alone."""
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {CREATED_BY_LABEL: app}}}
    try:
        kube.create(kube.resource("v1", "Namespace"), body)
        return None
    except KubeApiError as exc:
        if exc.status == 409:   # created meanwhile (by hand, another app): it is there, which is all we need
            return None
        if exc.impersonation_refused:
            hint = f" ({refusal_hint(kube.account, exc, '')})"
        elif exc.status == 403 and kube.account is not None:
            hint = (f" (hint: the app acts as ServiceAccount {kube.account} (serviceAccountName): createNamespace "
                    f"needs `create` on namespaces for {kube.account.user}, a ClusterRole; or create the namespace "
                    f"beforehand)")
        elif exc.status == 403:
            hint = (" (hint: gitopsd needs `create` on namespaces for createNamespace: deploy/cluster-wide.yaml grants "
                    "it; the namespaced install does not, there the installer creates the namespaces)")
        else:
            hint = ""
        return f"Namespace/{name}: cannot create it (createNamespace): {exc.reason or exc.status}: " \
               f"{exc.api_message}{hint}"
    except GitopsdError as exc:
        return f"Namespace/{name}: cannot create it (createNamespace): {exc.message}"


def _account_hint(kube: Kube, exc: KubeApiError, change: ObjectChange) -> str:
    """For a write the app's ServiceAccount was refused: how to grant it (else nothing)."""
    if exc.status != 403 or kube.account is None:
        return ""
    return f" ({refusal_hint(kube.account, exc, change.ref.namespace)})"


def _delete_and_wait(kube: Kube, change: ObjectChange) -> None:
    res = change.resource
    ns = change.ref.namespace or None
    kube.delete(res, change.ref.name, ns, propagation="Foreground")
    deadline = time.monotonic() + RECREATE_DELETE_TIMEOUT
    while kube.get(res, change.ref.name, ns) is not None:
        if time.monotonic() > deadline:
            raise KubeApiError(status=504, reason="Timeout", method="DELETE", path=res.path(ns, change.ref.name),
                               message=f"{change.ref} still exists {RECREATE_DELETE_TIMEOUT:.0f}s after delete "
                                       "(a finalizer?); cannot re-create it")
        time.sleep(0.2)


def _delete(kube: Kube, change: ObjectChange, applyset_id: str) -> tuple[str | None, bool]:
    """Prune one object: (error line or None, whether we deleted it)."""
    live = change.live or {}
    labels = (live.get("metadata") or {}).get("labels") or {}
    if labels.get(PART_OF_LABEL) != applyset_id:  # never delete what lacks our label
        return f"{change.ref}: refusing to prune: it does not carry {PART_OF_LABEL}={applyset_id}", False
    if change.resource is None:
        return f"{change.ref}: cannot prune: the cluster no longer serves its kind", False
    try:
        deleted = kube.delete(change.resource, change.ref.name, change.ref.namespace or None,
                              uid=live["metadata"].get("uid"))
        return None, deleted   # False: already gone
    except KubeApiError as exc:
        if exc.status == 409:  # uid precondition failed: a new object took the name; not ours to delete
            return None, False
        return f"{change.ref}: prune failed: {exc.reason or exc.status}: {exc.api_message}" \
               f"{_account_hint(kube, exc, change)}", False
    except GitopsdError as exc:
        raise _Unreachable(f"{change.ref}: prune result unknown: {exc.message}") from None


def _wait_established(kube: Kube, crds: list[ObjectChange]) -> list[str]:
    res = kube.resource("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    deadline = time.monotonic() + CRD_ESTABLISHED_TIMEOUT
    pending = {c.ref.name: c for c in crds}
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            obj = kube.get(res, name) or {}
            conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
            if conds.get("Established", {}).get("status") == "True":
                del pending[name]
            elif conds.get("NamesAccepted", {}).get("status") == "False":
                c = pending.pop(name)
                return [f"{c.source}: {c.ref}: names not accepted: {conds['NamesAccepted'].get('message', '')}"]
        if pending:
            time.sleep(0.2)
    return [f"{c.source}: {c.ref}: not Established after {CRD_ESTABLISHED_TIMEOUT:.0f}s" for c in pending.values()]
