"""Per-app status stored in the cluster, shown by `gitopsd status`.

The status lives in the app's ApplySet parent ConfigMap, under data key
`status`, written with its own field manager (`gitopsd-status`) so it never
disturbs the inventory annotations the `gitopsd` manager owns. The daemon
writes it only when something a reader would see changed (revision, result,
health, drift): a steady-state reconcile writes nothing. The live schedule
(next run) is in memory only and is served at the daemon's GET /status.
"""

from __future__ import annotations

import re

import orjson

from gitopsd.engine import inventory
from gitopsd.kube import Kube

STATUS_KEY = "status"
FIELD_MANAGER = "gitopsd-status"
FIELDS = ("app", "revision", "ref", "result", "reason", "health", "lastTransition", "lastDrift", "interval",
          "suspended", "nextRun", "release", "rollout", "waitingFor")
#: What `gitopsd status` needs to show a row; the other fields are optional
#: (an older or newer daemon may write fewer or more), but typed when present.
REQUIRED = ("app", "result", "health")
TYPES: dict[str, tuple[type, ...]] = {
    "app": (str,), "revision": (str,), "ref": (str,), "result": (str,), "reason": (str,), "health": (str,),
    "lastTransition": (str,), "lastDrift": (dict, type(None)), "interval": (int, float), "suspended": (bool,),
    "nextRun": (str,), "release": (dict,), "rollout": (list,), "waitingFor": (list,),
}
#: A status the daemon writes is a few hundred bytes; a bigger value was put
#: there by hand and is not parsed (a ConfigMap holds up to 1 MiB).
MAX_BYTES = 64 * 1024


def write(kube: Kube, *, app: str, namespace: str, status: dict) -> None:
    """Record an app's status on its parent (creating the parent if the app never synced;
    the namespace too, should it be missing)."""
    inv = inventory.Inventory(app=app, namespace=namespace)
    body = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": inv.name, "namespace": namespace,
                     # Shared with the gitopsd manager (same value): a parent created
                     # here is still recognised as the app's ApplySet parent.
                     "labels": inv.labels},
        "data": {STATUS_KEY: orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()},
    }
    inventory.in_namespace(kube, namespace, lambda: kube.apply(body, field_manager=FIELD_MANAGER))


def of_parent(parent: dict | None) -> dict | None:
    """The status stored on a parent ConfigMap as read (a runner taking the app over), or None
    when there is none or it is unreadable (the daemon rewrites it at the next transition)."""
    raw = ((parent or {}).get("data") or {}).get(STATUS_KEY)
    if not isinstance(raw, str) or len(raw.encode()) > MAX_BYTES:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def read_all(kube: Kube, *, namespace: str, app: str | None = None) -> list[dict]:
    """Every app's stored status in ``namespace`` (or only ``app``'s), sorted by app.

    One unreadable status (a hand-edited parent ConfigMap: not JSON, wrong
    types, missing keys, a huge value) never hides the others: it comes back
    as ``{"app", "configMap", "error"}``, the error naming the ConfigMap, the
    key and why. The app's name is taken from the ConfigMap's name, which the
    edit did not change. Parents without a status (an app only ever synced
    from the CLI) are left out.
    """
    cms = kube.resource("v1", "ConfigMap")
    if app is not None:
        parent = kube.get(cms, inventory.parent_name(app), namespace)
        found = [parent] if parent is not None else []
    else:
        found = kube.list(cms, namespace=namespace, label_selector="app.kubernetes.io/managed-by=gitopsd")
    out = []
    for cm in found:
        entry = read_one(cm, namespace=namespace)
        if entry is not None:
            out.append(entry)
    return sorted(out, key=lambda d: d["app"])


def problem_hint(entry: dict) -> str:
    """How to repair an unreadable status, for the CLI to print under the error."""
    ns, _, name = entry["configMap"].partition("/")
    return (f"gitopsd rewrites it at the app's next transition or daemon restart; to clear it now: kubectl -n {ns} "
            f"patch configmap {name} --type json -p '[{{\"op\": \"remove\", \"path\": \"/data/{STATUS_KEY}\"}}]'")


def read_one(cm: dict, *, namespace: str) -> dict | None:
    """The status stored on one parent ConfigMap as `read_all` gives it (an unreadable one as
    `{"app", "configMap", "error"}`), or None when it holds none."""
    name = (cm.get("metadata") or {}).get("name", "")
    raw = (cm.get("data") or {}).get(STATUS_KEY)
    if raw is None:
        return None
    prefix = inventory.parent_name("")
    app = name[len(prefix):] if name.startswith(prefix) else name
    try:
        return _checked(raw, app=app)
    except ValueError as exc:
        return {"app": app, "configMap": f"{namespace}/{name}",
                "error": f"ConfigMap {namespace}/{name}, key {STATUS_KEY!r}: {exc}"}


def _checked(raw: str, *, app: str) -> dict:
    """The status JSON as the daemon writes it, or ValueError saying every way it is not."""
    size = len(raw.encode())
    if size > MAX_BYTES:
        raise ValueError(f"is {size:,} bytes, more than the {MAX_BYTES // 1024} KiB read (gitopsd writes well under "
                         "1 KiB), so it was not written by gitopsd")
    if not raw.strip():
        raise ValueError("is empty")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {_json_type(data)}, not an object")
    problems = []
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        problems.append("misses " + ", ".join(repr(k) for k in missing))
    for key, types in TYPES.items():
        if key in data and not _has_type(data[key], types):
            wanted = " or ".join(dict.fromkeys(_json_type(t) for t in types))
            problems.append(f"{key!r} is a JSON {_json_type(data[key])}, expected {wanted}")
    drift = data.get("lastDrift")
    if isinstance(drift, dict):
        for key in ("time", "object"):
            if key in drift and not isinstance(drift[key], str):
                problems.append(f"'lastDrift.{key}' is a JSON {_json_type(drift[key])}, expected string")
    if isinstance(data.get("app"), str) and data["app"] != app:
        problems.append(f"names app {data['app'][:60]!r}, but the ConfigMap is the parent of app {app!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return data


def _has_type(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):   # a Python int, but no JSON number
        return bool in types
    return isinstance(value, types)


_JSON_NAMES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
               dict: "object"}


def _json_type(value_or_type: object) -> str:
    """The JSON name of a value's type (or of a Python type)."""
    kind = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
    return _JSON_NAMES.get(kind, kind.__name__)


def table(apps: list[dict]) -> str:
    """A terminal table; an unreadable status is a row with result `Unreadable`.

    Every cell is cut to its column's width and stripped of control
    characters: a hand-edited status must not be able to move the cursor or
    recolour the terminal.
    """
    if not apps:
        return "no apps have reported status yet"
    cols = ("APP", "REVISION", "RESULT", "HEALTH", "RELEASE", "LAST CHANGE", "LAST DRIFT", "REASON")
    # Targets on other clusters than gitopsd's own: a CLUSTER column (one row per target).
    several = any(a.get("cluster") not in (None, "in-cluster") for a in apps)
    if several:
        cols = ("APP", "CLUSTER", *cols[1:])
    widths = (_WIDTHS[0], 40, *_WIDTHS[1:]) if several else _WIDTHS
    rows = []
    for a in apps:
        where = (str(a.get("cluster") or "in-cluster"),) if several else ()
        if "error" in a:
            rows.append(tuple(_cell(v, w) for v, w in zip(
                (a["app"], *where, "", "Unreadable", "Unknown", "", "", "", a["error"]), widths)))
            continue
        drift = a.get("lastDrift") or {}
        drift_text = f"{drift.get('time', '')} {drift.get('object', '')}".strip() if isinstance(drift, dict) else ""
        values = (a.get("app", ""), *where, (a.get("revision") or "")[:12], a.get("result", ""), a.get("health", ""),
                  release_text(a.get("release")) or rollout_text(a.get("rollout")), a.get("lastTransition", ""),
                  drift_text, a.get("reason") or "")
        rows.append(tuple(_cell(v, w) for v, w in zip(values, widths)))
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [cols] + rows)


_WIDTHS = (40, 12, 16, 16, 72, 25, 80, 60)


def rollout_text(rollout: object) -> str:
    """The RELEASE cell of an app with canaries in progress (gitopsd.daemon.rollouts)."""
    if not isinstance(rollout, list):
        return ""
    def one(r: dict) -> str:
        gates = r.get("gates") if isinstance(r.get("gates"), dict) else {}
        gate_text = "".join(f", {name} {verdict}" for name, verdict in gates.items())
        if r.get("strategy") == "blueGreen":
            name, new, old = r.get("deployment"), r.get("new"), r.get("old")
            if r.get("phase") == "switched":
                return f"blue-green {name} switched to {new}" + (f", {old} kept" if old else "")
            if r.get("phase") == "ready":
                return f"blue-green {name} {new} ready, switching{' from ' + old if old else ''}{gate_text}"
            return f"blue-green {name} deploying {new}{' beside ' + old if old else ''}{gate_text}"
        counts = r.get("replicas") if isinstance(r.get("replicas"), dict) else {}
        split = f": {counts.get('canary')} canary + {counts.get('stable')} stable" if counts else ""
        return f"canary {r.get('deployment')} step {r.get('step')}/{r.get('steps')} ({r.get('weight')}%{split}{gate_text})"
    return "; ".join(one(r) for r in rollout if isinstance(r, dict))


def release_text(release: object) -> str:
    """The RELEASE cell: following (empty), or held / rolled back / quarantined, with the commits and
    who decided (gitopsd.daemon.release)."""
    if not isinstance(release, dict) or release.get("state") in (None, "following"):
        return ""
    short = {k: str(release.get(k) or "")[:8] for k in ("revision", "quarantined", "rolledBackFrom")}
    text = {"held": f"held at {short['revision']}",
            "rollingBack": f"rolling back {short['rolledBackFrom']}->{short['revision']}",
            "rolledBack": f"rolled back {short['rolledBackFrom']}->{short['revision']}"}.get(
                str(release.get("state")), str(release.get("state")))
    if short["quarantined"]:
        text += f", {short['quarantined']} quarantined"
    return f"{text} by {release.get('by') or '?'}"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _cell(value: object, width: int) -> str:
    text = _CONTROL.sub("?", str(value))
    return text if len(text) <= width else text[:width - 3] + "..."
