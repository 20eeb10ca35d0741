"""Progressive delivery, the daemon's part: one app's canaries, step by step (issue 12, first part).

gitopsd.engine.rollout says what a step applies; this module decides which
step runs, when the next one may, and what a finished or failed step means.

- A canary starts when a Deployment that declares one (annotation
  gitopsd.io/rollout) gets a pod template other than the one it runs. What
  it runs is on the live Deployment: gitopsd writes the hash of the template
  it applied there (gitopsd.io/template-hash), so a leader that takes over
  mid-rollout knows the stable template from the cluster, not from memory.
  A Deployment that runs without that annotation yet (the strategy was just
  declared, or an older gitopsd applied it) is updated plainly once.
- Each step is one reconcile: the stable and canary Deployments planned,
  applied and health-waited like any commit — the canary's pods Ready, no
  crash loop, no failed pod, the rollout progressing (gitopsd.engine.health:
  the early verdicts). Once a step is healthy, the next may run after the
  declared pause (the reconcile is scheduled for then); a poll meanwhile
  re-applies the same step and changes nothing.
- The last step is promotion: the Deployment as the commit has it, and no
  canary (pruned: it left the desired set).
- A step that ends Unhealthy aborts the rollout: the release control
  (gitopsd.daemon.release) rolls back to the last healthy revision — the
  stable template at full size, no canary — and quarantines the commit,
  whether or not the app asked for automatic rollback otherwise.
- Self-heal keeps the step that runs: the runner's desired state is what the
  step applied.

State is per app and small: for each Deployment in a rollout, the template's
hash, the step, and whether it was healthy (and since when); shown in the
status (`rollout`) and in each transition's audit record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gitopsd.engine import rollout
from gitopsd.engine.render import Manifest
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.objects import ObjectRef, ref_of

log = structlog.get_logger("gitopsd.rollouts")

TEMPLATE_HASH_ANNOTATION = "gitopsd.io/template-hash"


@dataclass
class Active:
    """One Deployment's canary in progress."""

    ref: ObjectRef
    template: str                 # the hash of the template being rolled out
    canary: rollout.Canary
    step: int = 0
    healthy_at: float | None = None   # when the running step was found healthy (monotonic)

    @property
    def weight(self) -> int:
        return self.canary.weight(self.step)

    @property
    def promoting(self) -> bool:
        return self.step >= len(self.canary.steps)

    def status(self) -> dict:
        return {"deployment": self.ref.name, "namespace": self.ref.namespace, "step": self.step + 1,
                "steps": len(self.canary.steps) + 1, "weight": self.weight,
                "healthy": self.healthy_at is not None}


class RolloutControl:
    """One app's canaries; the runner calls `shape` during a reconcile's plan and `after` once it ends."""

    def __init__(self, app: str, *, live: Callable[[ObjectRef], dict | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self._live, self._clock = live, clock
        self._active: dict[ObjectRef, Active] = {}
        self._lock = threading.Lock()   # status() is read by the HTTP server's thread

    @property
    def active(self) -> list[Active]:
        with self._lock:
            return list(self._active.values())

    def shape(self, manifests: list[Manifest]) -> list[Manifest]:
        """The commit's manifests as this moment of its rollouts applies them (see the module docstring).
        Raises rollout.RolloutError for a declaration gitopsd cannot follow."""
        out: list[Manifest] = []
        seen: set[ObjectRef] = set()
        for m in manifests:
            canary = rollout.parse(m.obj, source=m.source)
            if canary is None:
                out.append(m)
                continue
            ref = ref_of(m.obj)
            seen.add(ref)
            out.extend(self._step(m, ref, canary))
        with self._lock:
            for ref in set(self._active) - seen:
                del self._active[ref]   # the Deployment, or its strategy, left the commit: nothing to step
        return out

    def _step(self, m: Manifest, ref: ObjectRef, canary: rollout.Canary) -> list[Manifest]:
        new = rollout.template_hash(m.obj)
        live = self._live(ref)
        running = ((live or {}).get("metadata") or {}).get("annotations", {}).get(TEMPLATE_HASH_ANNOTATION)
        with self._lock:
            active = self._active.get(ref)
            if live is None or running is None or running == new:
                self._active.pop(ref, None)
                return [_marked(m, new)]   # first apply, no record of what runs, or nothing new to roll out
            if active is None or active.template != new:
                active = self._active[ref] = Active(ref=ref, template=new, canary=canary)
                log.info("canary started", app=self.app, deployment=ref.name, steps=list(canary.steps),
                         template=new)
            elif active.healthy_at is not None and self._clock() - active.healthy_at >= canary.pause:
                active.step, active.healthy_at = active.step + 1, None
                log.info("canary step", app=self.app, deployment=ref.name, step=active.step + 1,
                         weight=active.weight)
            active.canary = canary
        if active.promoting:
            return [_marked(m, new)]
        shaped = rollout.shape(m, canary=canary, step=active.step, stable_template=live["spec"]["template"])
        return [_marked(shaped[0], running), shaped[1]]

    def after(self, result: SyncResult, *, cancelled: bool = False) -> tuple[float | None, bool, dict | None]:
        """Judge a run: (seconds until the next step may run, or None; whether the rollout failed —
        the caller rolls back; the record's `rollout` field). A run `cancelled` (a newer commit,
        shutdown) judged nothing: the step stays, and a newer template starts its own rollout."""
        with self._lock:
            active = list(self._active.values())
        if not active:
            return None, False, None
        record = {"deployments": [a.status() for a in active]}
        if cancelled:
            return None, False, record
        if result.outcome == Outcome.UNHEALTHY:
            with self._lock:
                self._active.clear()
            log.warning("canary failed: rolling back", app=self.app, deployments=[a.ref.name for a in active],
                        reason=result.reason)
            return None, True, {**record, "aborted": True}
        if result.outcome not in (Outcome.APPLIED, Outcome.NO_CHANGE):
            return None, False, record   # failed to plan or apply: retried like any run
        wait = None
        now = self._clock()
        with self._lock:
            for a in active:
                if a.promoting:
                    self._active.pop(a.ref, None)
                    log.info("canary promoted", app=self.app, deployment=a.ref.name)
                    continue
                if a.healthy_at is None:
                    a.healthy_at = now
                left = max(0.0, a.canary.pause - (now - a.healthy_at))
                wait = left if wait is None else min(wait, left)
        return wait, False, {"deployments": [a.status() for a in active],
                             "promoted": [a.ref.name for a in active if a.promoting]}

    def status(self) -> list[dict]:
        return [a.status() for a in self.active]


def _marked(m: Manifest, template: str) -> Manifest:
    """The Deployment with the hash of the template it runs, for the next reconcile (or leader) to read."""
    obj = dict(m.obj)
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), TEMPLATE_HASH_ANNOTATION: template}
    obj["metadata"] = meta
    return Manifest(obj=obj, source=m.source)
