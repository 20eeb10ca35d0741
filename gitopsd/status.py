"""Per-app status stored in the cluster, shown by `gitopsd status`.

The status lives in the app's ApplySet parent ConfigMap, under data key
`status`, written with its own field manager (`gitopsd-status`) so it never
disturbs the inventory annotations the `gitopsd` manager owns. The daemon
writes it only when something a reader would see changed (revision, result,
health, drift): a steady-state reconcile writes nothing. The live schedule
(next run) is in memory only and is served at the daemon's GET /status.
"""

from __future__ import annotations

import orjson

from gitopsd import inventory
from gitopsd.kube import Kube

STATUS_KEY = "status"
FIELD_MANAGER = "gitopsd-status"
FIELDS = ("app", "revision", "ref", "result", "reason", "health", "lastTransition", "lastDrift", "interval",
          "suspended", "nextRun")


def write(kube: Kube, *, app: str, namespace: str, status: dict) -> None:
    """Record an app's status on its parent (creating the parent if the app never synced)."""
    inventory.ensure_namespace(kube, namespace)
    inv = inventory.Inventory(app=app, namespace=namespace)
    body = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": inv.name, "namespace": namespace,
                     # Shared with the gitopsd manager (same value): a parent created
                     # here is still recognised as the app's ApplySet parent.
                     "labels": {inventory.ID_LABEL: inv.id, "app.kubernetes.io/managed-by": "gitopsd"}},
        "data": {STATUS_KEY: orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()},
    }
    kube.apply(body, field_manager=FIELD_MANAGER)


def read_all(kube: Kube, *, namespace: str, app: str | None = None) -> list[dict]:
    cms = kube.resource("v1", "ConfigMap")
    out = []
    for cm in kube.list(cms, namespace=namespace, label_selector="app.kubernetes.io/managed-by=gitopsd"):
        raw = (cm.get("data") or {}).get(STATUS_KEY)
        if not raw:
            continue
        data = orjson.loads(raw)
        if app is None or data.get("app") == app:
            out.append(data)
    return sorted(out, key=lambda d: d.get("app", ""))


def table(apps: list[dict]) -> str:
    if not apps:
        return "no apps have reported status yet"
    cols = ("APP", "REVISION", "RESULT", "HEALTH", "LAST CHANGE", "LAST DRIFT", "REASON")
    rows = []
    for a in apps:
        drift = a.get("lastDrift") or {}
        rows.append((
            a.get("app", ""), (a.get("revision") or "")[:12], a.get("result", ""), a.get("health", ""),
            a.get("lastTransition", ""), (drift.get("time", "") + " " + drift.get("object", "")).strip(),
            (a.get("reason") or "")[:60],
        ))
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [cols] + rows)
