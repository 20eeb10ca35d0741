"""Progressive delivery, the daemon's part: one app's canaries and blue-green switches (issue 12, first part).

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

Blue-green (gitopsd.engine.rollout.BlueGreen) runs the same way, in phases
instead of steps: the Deployment runs as `<name>-blue` or `<name>-green`, its
Service selecting the active colour (the colour is read from the live
Service, so a new leader knows it). A new template is deployed as the other
colour at full size, the preview Service on it (`deploying`); once that run
is healthy the next one switches the Service (`ready`); the old colour is
kept for the scale-down delay so switching back is a selector change
(`switched`), then left out and pruned. A new colour that fails is never
switched to: the release control rolls back, the Service stays where it is.
A Deployment that ran uncoloured keeps serving beside its first colour until
the switch.

State is per app and small: for each Deployment in a rollout, the template's
hash and the step or phase (and since when it was healthy); shown in the
status (`rollout`) and in each transition's audit record.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import structlog

from gitopsd import metrics
from gitopsd.engine import rollout
from gitopsd.engine.render import Manifest
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.objects import ObjectRef, ref_of

log = structlog.get_logger("gitopsd.rollouts")

TEMPLATE_HASH_ANNOTATION = "gitopsd.io/template-hash"


@dataclass
class GateState:
    """What the gates said of the step under judgement (reset when the step changes)."""

    webhook_ok: bool = False
    passes: int = 0
    failures: int = 0
    last: dict | None = None      # the last answers, for the record


@dataclass
class Active:
    """One Deployment's canary in progress."""

    ref: ObjectRef
    template: str                 # the hash of the template being rolled out
    canary: rollout.Canary
    step: int = 0
    healthy_at: float | None = None   # when the running step was found healthy (monotonic)
    gates: GateState = field(default_factory=GateState)
    replicas: dict[str, int | None] = field(default_factory=dict)   # the step's counts: stable, canary

    @property
    def weight(self) -> int:
        return self.canary.weight(self.step)

    @property
    def promoting(self) -> bool:
        return self.step >= len(self.canary.steps)

    def status(self) -> dict:
        return {"deployment": self.ref.name, "namespace": self.ref.namespace, "strategy": "canary",
                "step": self.step + 1, "steps": len(self.canary.steps) + 1, "weight": self.weight,
                **({"replicas": dict(self.replicas)} if self.replicas and not self.promoting else {}),
                "healthy": self.healthy_at is not None, **_verdicts(self.gates)}


@dataclass
class Switch:
    """One Deployment's blue-green switch in progress: `deploying` (the new colour at full size beside
    the active one, the Service on the active colour, the preview on the new), `ready` (the new colour
    healthy: the next run switches the Service), `switched` (the old colour kept for the scale-down
    delay, then dropped)."""

    ref: ObjectRef
    template: str
    strategy: rollout.BlueGreen
    new_color: str
    old_color: str | None          # None: the Deployment ran without colours (adopted into blue)
    phase: str = "deploying"
    switched_at: float | None = None
    dropping: bool = False         # this run leaves the old colour out: done once healthy
    gates: GateState = field(default_factory=GateState)

    def status(self) -> dict:
        return {"deployment": self.ref.name, "namespace": self.ref.namespace, "strategy": "blueGreen",
                "phase": self.phase, "active": self.new_color if self.phase == "switched" else self.old_color,
                "new": self.new_color, **({"old": self.old_color} if self.old_color and not self.dropping else {}),
                **_verdicts(self.gates)}


class RolloutControl:
    """One app's canaries and switches; the runner calls `shape` during a reconcile's plan and `after` once it ends."""

    def __init__(self, app: str, *, live: Callable[[ObjectRef], dict | None], prometheus_url: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self._live, self._clock = live, clock
        self._prometheus_url = prometheus_url   # `gitopsd run --prometheus-url`: a gate's address by default
        self._active: dict[ObjectRef, Active | Switch] = {}
        self._lock = threading.Lock()   # status() is read by the HTTP server's thread

    @property
    def active(self) -> list[Active | Switch]:
        with self._lock:
            return list(self._active.values())

    def shape(self, manifests: list[Manifest]) -> list[Manifest]:
        """The commit's manifests as this moment of its rollouts applies them (see the module docstring).
        Raises rollout.RolloutError for a declaration gitopsd cannot follow."""
        out: list[Manifest] = []
        seen: set[ObjectRef] = set()
        selectors: dict[ObjectRef, str | None] = {}   # Service, HPA -> the colour it selects, follows (blue-green)
        services = {ref_of(m.obj): m for m in manifests if m.obj.get("kind") == "Service"}
        autoscalers = [m for m in manifests if m.obj.get("kind") == "HorizontalPodAutoscaler"]
        for m in manifests:
            strategy = rollout.parse(m.obj, source=m.source)
            if strategy is None:
                out.append(m)
                continue
            ref = ref_of(m.obj)
            seen.add(ref)
            if isinstance(strategy, rollout.Canary):
                out.extend(self._step(m, ref, strategy))
            else:
                shaped, colors = self._switch(m, ref, strategy, services, autoscalers)
                out.extend(shaped)
                selectors.update(colors)
        with self._lock:
            for ref in set(self._active) - seen:
                del self._active[ref]   # the Deployment, or its strategy, left the commit: nothing to step
        return [(rollout.following if m.obj.get("kind") == "HorizontalPodAutoscaler" else rollout.selecting)(
            m, selectors[r]) if (r := ref_of(m.obj)) in selectors else m for m in out]

    def _switch(self, m: Manifest, ref: ObjectRef, bg: rollout.BlueGreen, services: dict[ObjectRef, Manifest],
                autoscalers: list[Manifest]) -> tuple[list[Manifest], dict[ObjectRef, str | None]]:
        """Blue-green: the colour Deployments, and the colour each Service selects and each HPA of the
        Deployment follows (the active one), at this moment."""
        svc_ref = ObjectRef(group="", kind="Service", namespace=ref.namespace, name=bg.service)
        preview_ref = ObjectRef(group="", kind="Service", namespace=ref.namespace, name=bg.preview or "")
        for wanted in (svc_ref, preview_ref) if bg.preview else (svc_ref,):
            if wanted not in services:
                raise rollout.RolloutError(f"{m.source}: Deployment {ref.name!r}: blueGreen names Service "
                                           f"{wanted.name!r}, which the commit does not have in namespace "
                                           f"{ref.namespace}", hint="the Service must be part of the same app")
        hpas = [h for h in autoscalers if rollout.scales(h.obj, ref.name) and ref_of(h.obj).namespace == ref.namespace]
        new = rollout.template_hash(m.obj)
        live_svc = self._live(svc_ref)
        active = ((live_svc or {}).get("spec") or {}).get("selector", {}).get(rollout.COLOR_LABEL)
        active_dep = self._live(_color_ref(ref, active)) if active else None
        serving = active_dep if active else self._live(ref)   # (None: the first deployment)
        running = _template_of(active_dep)

        def colored(color: str, template: dict | None = None) -> Manifest:
            """The colour's Deployment. Without spec.replicas in Git (an HPA decides), each colour keeps
            its live count, and a new one starts at the serving one's: full size. gitopsd still applies
            the count, as the HPA's field it is left to the HPA (ignoreManagers) once the HPA writes
            it; leaving it out while gitopsd alone owns it would reset it to 1."""
            count = None
            if rollout.declared_replicas(m.obj) is None:
                own = self._live(_color_ref(ref, color))
                count = next((c for c in (rollout.declared_replicas(own or {}), rollout.declared_replicas(serving or {}),
                                          *(rollout.min_replicas(h.obj) for h in hpas)) if c is not None), None)
            return rollout.colored(m, color=color, template=template, replicas=count)

        def routed(service_color: str | None, preview_color: str | None) -> dict[ObjectRef, str | None]:
            out = {svc_ref: service_color, **({preview_ref: preview_color} if bg.preview else {})}
            return {**out, **{ref_of(h.obj): service_color for h in hpas}}

        now = self._clock()
        with self._lock:
            sw = self._active.get(ref)
            if isinstance(sw, Switch) and sw.phase == "switched" and sw.new_color == active and sw.template == new:
                keep_old = sw.old_color is not None and now - (sw.switched_at or now) < bg.scale_down_delay
                sw.dropping = not keep_old
                shaped = [_marked(colored(active), new)]
                old_dep = self._live(_color_ref(ref, sw.old_color)) if keep_old else None
                if old_dep is not None:
                    shaped.append(_marked(colored(sw.old_color, old_dep["spec"]["template"]),
                                          _template_of(old_dep) or ""))
                return shaped, routed(active, active)
            if active is not None and running == new:
                self._active.pop(ref, None)   # steady: the active colour runs the commit's template
                return [_marked(colored(active), new)], routed(active, active)
            if not isinstance(sw, Switch) or sw.template != new:
                target = rollout.COLORS[0] if active is None else rollout.other(active)
                if active is not None and _ready_on(self._live(_color_ref(ref, target)), new):
                    # Switching back (an abort, a rollback) to the colour kept since the last switch: it
                    # runs this template, Ready, so the Service switches in this run and the colour it
                    # leaves goes at once. No gate: this colour has served before.
                    sw = self._active[ref] = Switch(ref=ref, template=new, strategy=bg, new_color=target,
                                                    old_color=None, phase="ready")
                    log.info("blue-green: switching back", app=self.app, deployment=ref.name, color=target)
                else:
                    sw = self._active[ref] = Switch(ref=ref, template=new, strategy=bg, new_color=target,
                                                    old_color=active)
                    log.info("blue-green started", app=self.app, deployment=ref.name, active=active, new=target)
            sw.strategy = bg
        shaped = [_marked(colored(sw.new_color), new)]
        if sw.old_color is not None and active_dep is not None:
            shaped.insert(0, _marked(colored(sw.old_color, active_dep["spec"]["template"]), running or ""))
        elif sw.phase == "deploying" and self._live(ref) is not None:
            shaped.insert(0, m)   # adopting: the uncoloured Deployment keeps serving until the switch
        colour = sw.new_color if sw.phase == "ready" else sw.old_color
        return shaped, routed(colour, sw.new_color)

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
                active.step, active.healthy_at, active.gates = active.step + 1, None, GateState()
                log.info("canary step", app=self.app, deployment=ref.name, step=active.step + 1,
                         weight=active.weight)
            active.canary = canary
        if active.promoting:
            return [_marked(m, new)]
        live_replicas = rollout.declared_replicas(live)
        shaped = rollout.shape(m, canary=canary, step=active.step, stable_template=live["spec"]["template"],
                               live_replicas=live_replicas)
        active.replicas = {"stable": shaped[0].obj["spec"].get("replicas", live_replicas),
                           "canary": shaped[1].obj["spec"]["replicas"]}
        return [_marked(shaped[0], running), shaped[1]]

    def after(self, result: SyncResult, *, cancelled: bool = False) -> tuple[float | None, bool, dict | None]:
        """Judge a run: (seconds until the next step may run, or None; whether the rollout failed —
        the caller rolls back; the record's `rollout` field). A run `cancelled` (a newer commit,
        shutdown) judged nothing: the step stays, and a newer template starts its own rollout.
        A healthy step whose gate refuses it makes `result` Unhealthy (outcome and reason)."""
        with self._lock:
            active = list(self._active.values())
        if not active:
            return None, False, None
        record = {"deployments": [a.status() for a in active]}
        if cancelled:
            return None, False, record
        if result.outcome == Outcome.UNHEALTHY:
            for a in active:
                metrics.ROLLOUT_STEPS.inc(app=self.app, strategy=_strategy(a), outcome="aborted")
            with self._lock:
                self._active.clear()
            log.warning("rollout failed: rolling back", app=self.app, deployments=[a.ref.name for a in active],
                        reason=result.reason)
            return None, True, {**record, "aborted": True}
        if result.outcome not in (Outcome.APPLIED, Outcome.NO_CHANGE):
            return None, False, record   # failed to plan or apply: retried like any run
        # The step (or phase) is healthy. Those not judged yet ask their gates (outside the lock: the network).
        gates: dict[str, dict] = {}
        held: dict[ObjectRef, float] = {}   # not judged yet: ask again after this many seconds
        for a in active:
            strategy = a.canary if isinstance(a, Active) else a.strategy
            if not _awaits_verdict(a) or (isinstance(a, Switch) and a.phase != "deploying"):
                continue   # (blue-green asks its gates once, before the switch)
            verdict, retry = self._judge(a, strategy.gates, revision=result.revision.sha if result.revision else None)
            if a.gates.last:
                gates[a.ref.name] = a.gates.last
            if verdict == "fail":
                # The analysis failed: the run's verdict is Unhealthy, recorded and rolled back as such.
                result.outcome = Outcome.UNHEALTHY
                result.reason = f"rollout gate refused {a.ref.name}: {_why(a.gates.last)}"
                for b in active:
                    metrics.ROLLOUT_STEPS.inc(app=self.app, strategy=_strategy(b), outcome="aborted")
                with self._lock:
                    self._active.clear()
                return None, True, {**record, "gates": gates, "aborted": True}
            if verdict == "hold":
                held[a.ref] = retry
        wait = None
        now = self._clock()
        with self._lock:
            for a in active:
                if a.ref in held:   # the gates are asked again; the step does not advance meanwhile
                    left = held[a.ref]
                elif isinstance(a, Switch):
                    if _awaits_verdict(a):
                        metrics.ROLLOUT_STEPS.inc(app=self.app, strategy="blueGreen", outcome=_outcome(a))
                    left = self._switched(a, now)
                elif a.promoting:
                    metrics.ROLLOUT_STEPS.inc(app=self.app, strategy="canary", outcome="promoted")
                    self._active.pop(a.ref, None)
                    log.info("canary promoted", app=self.app, deployment=a.ref.name)
                    continue
                else:
                    if a.healthy_at is None:
                        metrics.ROLLOUT_STEPS.inc(app=self.app, strategy="canary", outcome="healthy")
                        a.healthy_at = now
                    left = max(0.0, a.canary.pause - (now - a.healthy_at))
                if left is not None:
                    wait = left if wait is None else min(wait, left)
        return wait, False, {"deployments": [a.status() for a in active], **({"gates": gates} if gates else {}),
                             "promoted": [a.ref.name for a in active if isinstance(a, Active) and a.promoting]}

    def _judge(self, a: Active | Switch, gates: rollout.Gates, *, revision: str | None) -> tuple[str, float]:
        """Ask a healthy step's gates: ("pass" | "fail" | "hold", seconds until asking again)."""
        state = a.gates
        payload = {**a.status(), "app": self.app, "revision": revision}
        answers = dict(state.last or {})
        if gates.webhook is not None and not state.webhook_ok:
            verdict, detail = ask_webhook(gates.webhook, payload=payload)
            answers["webhook"] = {"verdict": verdict, **detail}
            state.last = answers
            log.info("rollout gate", app=self.app, deployment=a.ref.name, gate="webhook", verdict=verdict, **detail)
            if verdict != "pass":
                return ("fail" if verdict == "fail" else "hold"), max(_pause_of(a), GATE_RETRY)
            state.webhook_ok = True
        gate = gates.prometheus
        if gate is None:
            return "pass", 0.0
        verdict, detail = ask_prometheus(gate, default=self._prometheus_url)
        if verdict == "pass":
            state.passes += 1
        elif verdict == "fail":
            state.failures += 1
        answers["prometheus"] = {"verdict": verdict, "passes": state.passes, "failures": state.failures, **detail}
        state.last = answers
        log.info("rollout gate", app=self.app, deployment=a.ref.name, gate="prometheus", verdict=verdict,
                 passes=state.passes, failures=state.failures, **detail)
        if state.failures > gate.failure_limit:
            return "fail", 0.0
        return ("pass", 0.0) if state.passes >= gate.count else ("hold", gate.interval)

    def _switched(self, sw: Switch, now: float) -> float | None:
        """A healthy run of a blue-green switch: its next phase, and when the next run is due."""
        if sw.phase == "deploying":
            sw.phase = "ready"
            log.info("blue-green: new colour healthy, switching", app=self.app, deployment=sw.ref.name,
                     color=sw.new_color)
            return 0.0
        if sw.phase == "ready":
            sw.phase, sw.switched_at = "switched", now
            log.info("blue-green: switched", app=self.app, deployment=sw.ref.name, color=sw.new_color)
            return sw.strategy.scale_down_delay if sw.old_color is not None else 0.0
        if sw.dropping:
            self._active.pop(sw.ref, None)
            log.info("blue-green: old colour scaled down", app=self.app, deployment=sw.ref.name,
                     color=sw.old_color)
            return None
        return max(0.0, sw.strategy.scale_down_delay - (now - (sw.switched_at or now)))

    def status(self) -> list[dict]:
        return [a.status() for a in self.active]


#: An inconclusive gate (no answer) is asked again after the pause, and at least this often (seconds).
GATE_RETRY = 10.0


def _verdicts(gates: GateState) -> dict:
    """The gates' last verdicts, for the status: {"gates": {"prometheus": "pass 1/3", "webhook": "pass"}}."""
    out = {}
    for name, a in (gates.last or {}).items():
        verdict = a.get("verdict")
        out[name] = f"{verdict} {a.get('passes')} passed, {a.get('failures')} failed" if name == "prometheus" \
            else str(verdict)
    return {"gates": out} if out else {}


def _why(answers: dict | None) -> str:
    """The refusing gate's answer, in a few words."""
    for name, a in (answers or {}).items():
        if a.get("verdict") == "fail":
            if name == "webhook":
                return f"webhook {a.get('url')} answered {a.get('status')}"
            return (f"prometheus: {a.get('value')} outside [{a.get('min')}, {a.get('max')}] "
                    f"({a.get('failures')} failed evaluations)")
    return "a gate failed"


def ask_prometheus(gate: rollout.PrometheusGate, *, default: str | None) -> tuple[str, dict]:
    """Evaluate the gate's query now: ("pass" | "fail" | "inconclusive", details for the record).
    No data (an empty vector, NaN) and no answer are inconclusive: absence of evidence is not a verdict."""
    address = gate.address or default
    bounds = {"min": gate.min, "max": gate.max}
    if not address:
        return "inconclusive", {**bounds, "error": "no Prometheus address (the gate's address or --prometheus-url)"}
    url = f"{address.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': gate.query})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = orjson.loads(answer.read())
    except urllib.error.HTTPError as exc:   # a query Prometheus refuses (bad PromQL) will not get better
        return "fail", {**bounds, "error": f"Prometheus refused the query ({exc.code})"}
    except (OSError, ValueError) as exc:
        return "inconclusive", {**bounds, "error": type(exc).__name__}
    value = _first_value((body.get("data") or {}) if isinstance(body, dict) else {})
    if value is None or math.isnan(value):
        return "inconclusive", {**bounds, "value": None}
    ok = (gate.max is None or value <= gate.max) and (gate.min is None or value >= gate.min)
    return ("pass" if ok else "fail"), {**bounds, "value": value}


def _first_value(data: dict) -> float | None:
    result = data.get("result")
    try:
        if data.get("resultType") == "scalar":
            return float(result[1])
        if data.get("resultType") == "vector" and result:
            return float(result[0]["value"][1])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return None


def _awaits_verdict(a: Active | Switch) -> bool:
    """A healthy run of `a` judges something new: a canary step not judged yet (promotion needs no gate),
    a blue-green phase about to change."""
    if isinstance(a, Active):
        return a.healthy_at is None and not a.promoting
    return a.phase in ("deploying", "ready") or a.dropping


def _pause_of(a: Active | Switch) -> float:
    return a.canary.pause if isinstance(a, Active) else 0.0


def ask_webhook(gate: rollout.WebhookGate, *, payload: dict) -> tuple[str, dict]:
    """POST the step to the gate: ("pass" | "fail" | "inconclusive", details for the record). The
    URL's query (which may carry a token) is never logged or recorded: only scheme, host and path."""
    parts = urllib.parse.urlsplit(gate.url)
    where = {"url": f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"}
    request = urllib.request.Request(gate.url, data=orjson.dumps(payload), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gitopsd"})
    try:
        with urllib.request.urlopen(request, timeout=gate.timeout) as answer:
            return "pass", {**where, "status": answer.status}
    except urllib.error.HTTPError as exc:
        return "fail", {**where, "status": exc.code}
    except (OSError, ValueError) as exc:   # refused, timed out, unreachable: no verdict
        return "inconclusive", {**where, "error": type(exc).__name__}


def _strategy(a: Active | Switch) -> str:
    return "blueGreen" if isinstance(a, Switch) else "canary"


def _outcome(a: Switch) -> str:
    """What a healthy run of a blue-green switch (before it advances) completes."""
    return {"ready": "switched", "switched": "scaledDown" if a.dropping else "healthy"}.get(a.phase, "healthy")


def _color_ref(ref: ObjectRef, color: str | None) -> ObjectRef:
    return ObjectRef(group=ref.group, kind=ref.kind, namespace=ref.namespace, name=rollout.color_name(ref.name, color))


def _ready_on(deployment: dict | None, template: str) -> bool:
    """The Deployment runs `template` (as gitopsd marked it) and every replica of it is Ready and up to date."""
    if deployment is None or _template_of(deployment) != template:
        return False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = spec.get("replicas", 1)
    return (status.get("observedGeneration", 0) >= (deployment.get("metadata") or {}).get("generation", 0)
            and status.get("updatedReplicas", 0) == wanted and status.get("readyReplicas", 0) == wanted
            and status.get("replicas", 0) == wanted)


def _template_of(deployment: dict | None) -> str | None:
    return ((deployment or {}).get("metadata") or {}).get("annotations", {}).get(TEMPLATE_HASH_ANNOTATION)


def _marked(m: Manifest, template: str) -> Manifest:
    """The Deployment with the hash of the template it runs, for the next reconcile (or leader) to read."""
    obj = dict(m.obj)
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), TEMPLATE_HASH_ANNOTATION: template}
    obj["metadata"] = meta
    return Manifest(obj=obj, source=m.source)
