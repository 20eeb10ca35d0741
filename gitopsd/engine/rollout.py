"""Progressive delivery, the engine's part: what a canary step applies (issue 12, first part).

Declared in Git, on a plain Deployment, so `kubectl apply` of the same files
still works (the annotation is inert there):

    metadata:
      annotations:
        gitopsd.io/rollout: |
          strategy: canary
          steps: [10, 50]        # percent of the replicas on the new template; 100 (promote) comes last
          pause: 30s             # after a step is healthy, before the next

A pod-template change of such a Deployment (its template differs from the
one running) is not applied to it. The new template runs as a second
Deployment, `<name>-canary`, beside the stable one, which keeps the running
template. The Service that selects the stable pods selects the canary pods
too (they carry the same labels, plus `gitopsd.io/track: canary`), so
traffic follows ready replicas: the replica-weighted canary. With 10
replicas, 10 % is 1 canary and 9 stable; each step re-weights the two and
keeps the total. Promotion is the Deployment as Git has it (the new template,
every replica) and no canary: it leaves the app's desired set and is pruned
like any object that left Git (it is an ApplySet member: prune and kubectl
see it). Abort is the release control's rollback (gitopsd.daemon.release):
the last healthy revision, which has no canary, re-applied, and the commit
quarantined.

Why the two Deployments do not fight: the canary's selector adds the track
label, so it never matches a stable pod. The stable Deployment's selector
does match the canary's ReplicaSets and pods, but a controller adopts only
orphans, and every canary ReplicaSet and pod carries its controller's
reference; the stable Deployment counts its own pods only.

This module is pure: the daemon's rollout control decides the step and
where the running template comes from; `shape` turns the manifests of a
commit into what that step applies.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import orjson
import yaml

from gitopsd.config import parse_duration
from gitopsd.engine.render import Manifest
from gitopsd.errors import GitopsdError

ROLLOUT_ANNOTATION = "gitopsd.io/rollout"
TRACK_LABEL = "gitopsd.io/track"
CANARY_OF_ANNOTATION = "gitopsd.io/canary-of"
CANARY_SUFFIX = "-canary"
STRATEGIES = ("canary", "blueGreen")
COLOR_LABEL = "gitopsd.io/color"
COLORS = ("blue", "green")
MAX_STEPS = 20
MAX_ANNOTATION_BYTES = 4096


class RolloutError(GitopsdError):
    """A rollout annotation gitopsd cannot follow: the object, the field and why."""


@dataclass(frozen=True)
class WebhookGate:
    """POST the step to `url` once it is healthy: 2xx passes, another status fails (abort), no answer
    (refused, timed out) is inconclusive: the step holds and the gate is asked again after the pause."""

    url: str
    timeout: float = 10.0


@dataclass(frozen=True)
class PrometheusGate:
    """A PromQL query evaluated once a step is healthy: `count` evaluations `interval` apart must
    give a value within [min, max]; more than `failure_limit` values outside abort; a query with
    no data (an empty vector, NaN) is inconclusive — the step holds and asks again — as is a
    Prometheus that does not answer. `address`: the Prometheus HTTP API (default: `gitopsd run
    --prometheus-url`, or $GITOPSD_PROMETHEUS_URL)."""

    query: str
    max: float | None = None
    min: float | None = None
    interval: float = 10.0
    count: int = 1
    failure_limit: int = 0
    address: str | None = None


@dataclass(frozen=True)
class Gates:
    webhook: WebhookGate | None = None
    prometheus: PrometheusGate | None = None


@dataclass(frozen=True)
class Canary:
    """A Deployment's canary strategy, as declared."""

    steps: tuple[int, ...]      # ascending percentages below 100; promotion (100) follows the last
    pause: float = 0.0          # seconds between a healthy step and the next
    gates: Gates = Gates()

    def weight(self, step: int) -> int:
        """The canary's share at `step` (0-based); 100 once past the last (promotion)."""
        return self.steps[step] if step < len(self.steps) else 100


@dataclass(frozen=True)
class BlueGreen:
    """A Deployment's blue-green strategy, as declared: the Service whose selector switches colour,
    an optional preview Service that selects the idle colour, and how long the old colour is kept."""

    service: str
    preview: str | None = None
    scale_down_delay: float = 30.0
    gates: Gates = Gates()


def other(color: str) -> str:
    return COLORS[1] if color == COLORS[0] else COLORS[0]


def color_name(name: str, color: str) -> str:
    return f"{name}-{color}"


def parse(obj: dict, *, source: str) -> Canary | BlueGreen | None:
    """The strategy declared on a Deployment, None when it declares none.

    Raises RolloutError naming the file, the object and what is wrong: a
    strategy gitopsd cannot follow is an error before anything is applied,
    never a silent plain rollout.
    """
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ROLLOUT_ANNOTATION)
    if raw is None:
        return None
    where = f"{source}: Deployment {(obj.get('metadata') or {}).get('name')!r}: annotation {ROLLOUT_ANNOTATION}"
    if obj.get("kind") != "Deployment" or obj.get("apiVersion") != "apps/v1":
        raise RolloutError(f"{source}: {obj.get('kind')} {(obj.get('metadata') or {}).get('name')!r}: "
                           f"{ROLLOUT_ANNOTATION} is only read on apps/v1 Deployments",
                           hint="move the annotation to the Deployment whose pods the Service selects")
    if not isinstance(raw, str) or len(raw.encode()) > MAX_ANNOTATION_BYTES:
        raise RolloutError(f"{where}: must be a short YAML mapping (at most {MAX_ANNOTATION_BYTES} bytes)")
    try:
        spec = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RolloutError(f"{where}: is not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise RolloutError(f"{where}: must be a mapping such as {{strategy: canary, steps: [10, 50]}}")
    if spec.get("strategy") not in STRATEGIES:
        raise RolloutError(f"{where}: strategy must be one of {', '.join(STRATEGIES)}, not {spec.get('strategy')!r}")
    if spec["strategy"] == "blueGreen":
        return _blue_green(spec, where=where)
    unknown = sorted(set(spec) - {"strategy", "steps", "pause", "gates"})
    if unknown:
        raise RolloutError(f"{where}: unknown field {unknown[0]!r}", hint="fields: strategy, steps, pause, gates")
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps or len(steps) > MAX_STEPS or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 100 for s in steps):
        raise RolloutError(f"{where}: steps must be a list of 1 to {MAX_STEPS} percentages (1-100), e.g. [10, 50]")
    if steps != sorted(set(steps)):
        raise RolloutError(f"{where}: steps must rise, each once: {steps}")
    return Canary(steps=tuple(s for s in steps if s < 100),
                  pause=_seconds(spec.get("pause", 0), where=where, field="pause"),
                  gates=_gates(spec.get("gates"), where=where))


def _gates(gates: object, *, where: str) -> Gates:
    if gates is None:
        return Gates()
    if not isinstance(gates, dict) or not gates or set(gates) - {"webhook", "prometheus"}:
        raise RolloutError(f"{where}: gates must be a mapping of webhook: {{url: ...}} and/or "
                           f"prometheus: {{query: ..., max: ...}}")
    webhook = prometheus = None
    if "webhook" in gates:
        hook = gates["webhook"]
        url = hook.get("url") if isinstance(hook, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or set(hook) - {"url", "timeout"}:
            raise RolloutError(f"{where}: gates.webhook must be {{url: http(s)://..., timeout: 10s}}")
        timeout = _seconds(hook.get("timeout", 10), where=where, field="gates.webhook.timeout")
        webhook = WebhookGate(url=url, timeout=timeout)
    if "prometheus" in gates:
        prometheus = _prometheus(gates["prometheus"], where=f"{where}: gates.prometheus")
    return Gates(webhook=webhook, prometheus=prometheus)


def _prometheus(spec: object, *, where: str) -> PrometheusGate:
    known = {"query", "max", "min", "interval", "count", "failureLimit", "address"}
    if not isinstance(spec, dict) or set(spec) - known:
        raise RolloutError(f"{where}: must be a mapping of {', '.join(sorted(known))}")
    query = spec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise RolloutError(f"{where}: query must be a PromQL expression")
    bounds = {k: spec.get(k) for k in ("max", "min")}
    if all(v is None for v in bounds.values()) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in bounds.values()):
        raise RolloutError(f"{where}: give max and/or min: the bounds a healthy value stays within (numbers)")
    counts = {k: spec.get(k, d) for k, d in (("count", 1), ("failureLimit", 0))}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100 for v in counts.values()) \
            or counts["count"] < 1:
        raise RolloutError(f"{where}: count (1-100) and failureLimit (0-100) must be whole numbers")
    address = spec.get("address")
    if address is not None and not (isinstance(address, str) and address.startswith(("http://", "https://"))):
        raise RolloutError(f"{where}: address must be the Prometheus URL, http(s)://...")
    return PrometheusGate(query=query, max=bounds["max"], min=bounds["min"],
                          interval=_seconds(spec.get("interval", 10), where=where, field="interval"),
                          count=counts["count"],
                          failure_limit=counts["failureLimit"], address=address)


def _blue_green(spec: dict, *, where: str) -> BlueGreen:
    unknown = sorted(set(spec) - {"strategy", "service", "previewService", "scaleDownDelay", "gates"})
    if unknown:
        raise RolloutError(f"{where}: unknown field {unknown[0]!r}",
                           hint="fields: strategy, service, previewService, scaleDownDelay, gates")
    for key in ("service", "previewService"):
        value = spec.get(key)
        if (value is not None or key == "service") and not (isinstance(value, str) and value):
            raise RolloutError(f"{where}: {key} must name a Service of the same commit and namespace")
    return BlueGreen(service=spec["service"], preview=spec.get("previewService"),
                     scale_down_delay=_seconds(spec.get("scaleDownDelay", 30), where=where, field="scaleDownDelay"),
                     gates=_gates(spec.get("gates"), where=where))


def _seconds(value: object, *, where: str, field: str) -> float:
    """A duration as the config file reads one (gitopsd.config.parse_duration: 30s, 2m, 1h30m, seconds)."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise RolloutError(f"{where}: {field} must be a duration: {exc}") from None


def template_hash(deployment: dict) -> str:
    """What identifies a pod template (the Deployment's, as written): a rollout is of one template."""
    template = (deployment.get("spec") or {}).get("template") or {}
    return hashlib.sha256(orjson.dumps(template, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def replicas(deployment: dict) -> int:
    value = declared_replicas(deployment)
    return 1 if value is None else value


def declared_replicas(deployment: dict) -> int | None:
    """`spec.replicas` as written, None when the Deployment leaves the count to someone else (an HPA)."""
    value = (deployment.get("spec") or {}).get("replicas")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def split(total: int, weight: int) -> tuple[int, int]:
    """(stable, canary) replicas for a canary share of `weight` percent of `total`: at least one
    canary while the share is above 0, never all of them before promotion (with one replica,
    the canary runs beside it: two pods for the length of the rollout)."""
    if weight >= 100 or total == 0:
        return 0, total   # (scaled to zero: nothing runs on either track)
    canary = max(1, math.ceil(total * weight / 100))
    return max(total - canary, 1), canary


def beside(stable: int, weight: int) -> int:
    """Canary replicas that take `weight` percent of the traffic next to `stable` pods whose count is
    not gitopsd's to change (an HPA scales them): canary / (stable + canary) >= weight, at least one."""
    if stable == 0:
        return 0
    return max(1, math.ceil(stable * weight / (100 - weight)))


def canary_name(name: str) -> str:
    return name + CANARY_SUFFIX


def shape(manifest: Manifest, *, canary: Canary, step: int, stable_template: dict,
          live_replicas: int | None = None) -> list[Manifest]:
    """What step `step` of the canary of this Deployment applies: the stable Deployment on
    `stable_template` (what runs now) and the canary on the commit's template, weighted; at
    promotion (past the last step), the Deployment as the commit has it, alone.

    A Deployment that declares no `spec.replicas` leaves its count to another controller (an
    HPA): the stable track keeps the count that controller gives it (`live_replicas`, the live
    Deployment's; gitopsd never takes the field) and the canary runs beside it, sized for its
    share of the traffic (`beside`)."""
    weight = canary.weight(step)
    if weight >= 100:
        return [manifest]
    obj = manifest.obj
    stable = orjson.loads(orjson.dumps(obj))
    stable["spec"]["template"] = orjson.loads(orjson.dumps(stable_template))
    if declared_replicas(obj) is None:
        canary_count = beside(1 if live_replicas is None else live_replicas, weight)
        stable["spec"].pop("replicas", None)
    else:
        stable_count, canary_count = split(replicas(obj), weight)
        stable["spec"]["replicas"] = stable_count
    new = orjson.loads(orjson.dumps(obj))
    meta = new["metadata"]
    name = meta["name"]
    meta["name"] = canary_name(name)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ROLLOUT_ANNOTATION}
    meta["annotations"] = {**annotations, CANARY_OF_ANNOTATION: name}
    spec = new["spec"]
    spec["replicas"] = canary_count
    selector = spec.setdefault("selector", {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), TRACK_LABEL: "canary"}
    template_meta = spec["template"].setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), TRACK_LABEL: "canary"}
    return [Manifest(obj=stable, source=manifest.source),
            Manifest(obj=new, source=f"{manifest.source} (canary of {name}, step {step + 1}: {weight}%)")]


def colored(manifest: Manifest, *, color: str, template: dict | None = None, replicas: int | None = None) -> Manifest:
    """The Deployment as colour `color`: named `<name>-<color>`, its selector and pods labelled with
    the colour (so a Service can select one colour), on `template` (default: the commit's)."""
    obj = orjson.loads(orjson.dumps(manifest.obj))
    meta = obj["metadata"]
    name = meta["name"]
    meta["name"] = color_name(name, color)
    spec = obj["spec"]
    if template is not None:
        spec["template"] = orjson.loads(orjson.dumps(template))
    if replicas is not None:
        spec["replicas"] = replicas
    selector = spec.setdefault("selector", {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), COLOR_LABEL: color}
    template_meta = spec["template"].setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), COLOR_LABEL: color}
    return Manifest(obj=obj, source=f"{manifest.source} ({color} of {name})")


def selecting(manifest: Manifest, color: str | None) -> Manifest:
    """The Service selecting only pods of `color` (None: as the commit has it, both colours)."""
    if color is None:
        return manifest
    obj = orjson.loads(orjson.dumps(manifest.obj))
    spec = obj.setdefault("spec", {})
    spec["selector"] = {**(spec.get("selector") or {}), COLOR_LABEL: color}
    return Manifest(obj=obj, source=manifest.source)


def scales(hpa: dict, deployment: str) -> bool:
    """Whether this HorizontalPodAutoscaler scales the Deployment named `deployment` (same namespace)."""
    target = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    return target.get("kind") == "Deployment" and target.get("name") == deployment


def min_replicas(hpa: dict) -> int | None:
    value = (hpa.get("spec") or {}).get("minReplicas", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def following(manifest: Manifest, color: str | None) -> Manifest:
    """The HPA scaling the active colour's Deployment (None: as the commit has it, the uncoloured one)."""
    if color is None:
        return manifest
    obj = orjson.loads(orjson.dumps(manifest.obj))
    target = obj["spec"]["scaleTargetRef"]
    target["name"] = color_name(target["name"], color)
    return Manifest(obj=obj, source=f"{manifest.source} (following {target['name']})")
