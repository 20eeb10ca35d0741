"""Field-manager takeover: make gitopsd the one owner of what kubectl wrote before it.

Server-side apply removes a field only when the applier owned it alone and
stops sending it. An object first written by `kubectl apply` (client-side:
manager `kubectl-client-side-apply`, an Update), `kubectl create`, `edit`
or `replace`, or from before its first server-side apply (the apiserver's
`before-first-apply`) keeps those managers after gitopsd adopts it: they
co-own every field they wrote, so a field later removed from Git survives
in the cluster. Taking over rewrites metadata.managedFields the way
kubectl's own client-side-to-server-side upgrade (client-go's csaupgrade)
and Flux's kustomize-controller do:

- the field sets of the listed managers (Update or Apply entries of the
  object itself, never a subresource's such as /status or /scale) are
  merged into gitopsd's Apply entry — or, when gitopsd has none yet (an
  adoption), the first of them becomes it — and their entries go;
- the `kubectl.kubernetes.io/last-applied-configuration` annotation goes,
  from the object and from the merged set: kubectl's record of its last
  apply would otherwise outlive it (and it holds a Secret's values).

It is one JSON patch (RFC 6902), sent just before gitopsd's apply of the
object and only when the live object has such an entry. It rewrites the
entries one by one, each guarded by a `test` of the entry as it was read
(the patch fails, 422, when one of them changed since), rather than by
the object's resourceVersion: a busy controller's status updates (a
Deployment rolling out) bump that every moment and would make a
resourceVersion-guarded patch conflict again and again, while they never
touch the entries rewritten here. The apply that follows then removes what
those managers had set and Git does not; fields the server defaults (which
a client-side apply also owned) are defaulted again.

Names are exact (`kubectl-edit`) or a prefix ending in `*` (`kubectl-*`).
gitopsd's own Apply entry is never a candidate; other managers (the
controllers', an HPA's) are left alone. So is what the app leaves to other
managers (gitopsd.engine.ignore): a manager it leaves alone is never taken
over, and the fields its ignore rules name stay with whoever owns them —
taken over, they would be gitopsd's without being applied, and the next
apply would remove them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from gitopsd.engine import fields as fields_mod
from gitopsd.engine.fields import Path
from gitopsd.engine.ignore import NOTHING, Ignore
from gitopsd.kube import FIELD_MANAGER

LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def matches(manager: str, names: Iterable[str]) -> bool:
    """Whether `manager` is one of `names` (a name ending in `*` is a prefix)."""
    return any(manager.startswith(n[:-1]) if n.endswith("*") else manager == n for n in names)


def managers(live: dict | None, names: Iterable[str], *, ignore: Ignore = NOTHING,
             own: str = FIELD_MANAGER) -> tuple[str, ...]:
    """The managers of `live` (in managedFields order, once each) whose fields a takeover would take."""
    if not live:
        return ()
    return tuple(dict.fromkeys(e["manager"] for e, _ in _split(live, tuple(names), ignore=ignore, own=own)))


def patch(live: dict, names: Iterable[str], *, ignore: Ignore = NOTHING,
          own: str = FIELD_MANAGER) -> list[dict] | None:
    """The JSON patch that takes the fields of `names` over on `live`, or None when there is nothing to take.

    See the module docstring. The patch holds only while the entries it rewrites are as in `live`.
    """
    split = _split(live, tuple(names), ignore=ignore, own=own)
    if not split:
        return None
    entries = _entries(live)
    ours = next((i for i, e in enumerate(entries) if _is_own(e, own)), None)
    target = copy.deepcopy(entries[ours]) if ours is not None else {
        k: v for k, v in split[0][0].items() if k not in ("fieldsV1", "subresource")}
    target["manager"], target["operation"], target["fieldsType"] = own, "Apply", "FieldsV1"
    fields = copy.deepcopy(target.get("fieldsV1") or {})
    for _, taken in split:
        _union(fields, taken)
    annotations = (fields.get("f:metadata") or {}).get("f:annotations")
    if isinstance(annotations, dict):
        annotations.pop(f"f:{LAST_APPLIED_ANNOTATION}", None)
    target["fieldsV1"] = fields
    kept = {id(entry): rest for entry, rest in _kept(live, split)}
    touched = sorted(i for i, e in enumerate(entries) if id(e) in kept or i == ours)
    at = "/metadata/managedFields/"
    ops = [{"op": "test", "path": f"{at}{i}", "value": entries[i]} for i in touched]
    if ours is not None:
        ops.append({"op": "replace", "path": f"{at}{ours}", "value": target})
    for i in reversed(touched):   # from the last back: a removal leaves the indexes before it as they are
        if i == ours:
            continue
        if kept[id(entries[i])]:   # what the app leaves to this manager stays its own
            ops.append({"op": "replace", "path": f"{at}{i}", "value": {**entries[i], "fieldsV1": kept[id(entries[i])]}})
        else:
            ops.append({"op": "remove", "path": f"{at}{i}"})
    if ours is None:
        ops.append({"op": "add", "path": f"{at}-", "value": target})
    if LAST_APPLIED_ANNOTATION in ((live["metadata"].get("annotations")) or {}):
        ops.append({"op": "remove", "path": "/metadata/annotations/" + _pointer(LAST_APPLIED_ANNOTATION)})
    return ops


def _entries(live: dict) -> list[dict]:
    return (live.get("metadata") or {}).get("managedFields") or []


def _is_own(entry: dict, own: str) -> bool:
    return entry.get("manager") == own and entry.get("operation") == "Apply" and not entry.get("subresource")


def _split(live: dict, names: tuple[str, ...], *, ignore: Ignore, own: str) -> list[tuple[dict, dict]]:
    """(entry, the part of its fields to take) for each entry a takeover takes from: a listed
    manager's, of the object itself, not gitopsd's Apply entry nor a manager the app leaves alone,
    with something left to take once the fields the app leaves to others are kept out."""
    if not names:
        return []
    paths, left_alone = ignore.left_to_others(live)
    out = []
    for entry in _entries(live):
        manager = entry.get("manager") or ""
        if not manager or entry.get("subresource") or _is_own(entry, own) or manager in left_alone \
                or entry.get("operation") not in ("Apply", "Update") or not matches(manager, names):
            continue
        taken = copy.deepcopy(entry.get("fieldsV1") or {})
        for path in paths:
            _detach(taken, live, path)
        if _has_fields(taken):
            out.append((entry, taken))
    return out


def _kept(live: dict, split: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """(entry, what stays its own: its fields minus what is taken) for each entry taken from."""
    return [(entry, _minus(copy.deepcopy(entry.get("fieldsV1") or {}), taken)) for entry, taken in split]


def _detach(fields: dict, obj: dict, path: Path) -> None:
    """Remove the node of `path` (of `obj`) from the field set `fields`, with the parents it
    leaves empty. An atomic value above the path (owned whole) goes whole."""
    chain: list[tuple[dict, str]] = []
    node, value = fields, obj
    for part in path:
        if not node or set(node) <= {"."}:
            break   # an atomic value owned whole: it goes whole
        if isinstance(part, int):
            item = value[part]
            key = _item_key(node, item)
        else:
            key = f"f:{part}"
        if key is None or key not in node:
            return   # the set does not reach it: nothing of it is taken
        chain.append((node, key))
        node, value = node[key], value[part]
    for parent, key in reversed(chain):
        del parent[key]
        if parent is fields or _has_fields(parent):
            break


def _item_key(node: dict, item) -> str | None:
    """The key of the `k:`/`v:` node that stands for the list item `item`."""
    if isinstance(item, dict):
        found = fields_mod.match_key(node, item)
        return next((k for k, v in node.items() if v is found), None) if found is not None else None
    return fields_mod.set_key(item)


def _has_fields(node: dict) -> bool:
    return any(key != "." for key in node)


def _minus(fields: dict, taken: dict) -> dict:
    """`fields` without the leaves of `taken` (and the parents that leaves empty)."""
    for key, sub in taken.items():
        if key not in fields or key == ".":
            continue
        if sub and _has_fields(sub) and isinstance(fields[key], dict) and _has_fields(fields[key]):
            _minus(fields[key], sub)
            if not _has_fields(fields[key]):
                del fields[key]
        else:
            del fields[key]
    return fields


def _union(into: dict, other: dict) -> None:
    """Merge the fieldsV1 trie `other` into `into` (a set union: every path of either)."""
    for key, sub in other.items():
        if key in into and isinstance(into[key], dict) and isinstance(sub, dict):
            _union(into[key], sub)
        else:
            into.setdefault(key, copy.deepcopy(sub))


def _pointer(key: str) -> str:
    """A map key as a JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
