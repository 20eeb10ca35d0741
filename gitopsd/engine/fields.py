"""Who owns which field of a live object: reading server-side apply's managedFields.

Every write records, per field manager, the set of fields it owns
(`metadata.managedFields[].fieldsV1`), a tree keyed `f:<field>` for map
keys, `k:{...}` for the items of an associative list (containers by name),
`v:<json>` for the items of a set (finalizers) and `.` for "this node
itself". gitopsd reads it to decide two things without a request: whether
an object is still as it applied it (gitopsd.engine.plan.still_ours: its own
set still covers the desired body), and which fields another manager has
taken (gitopsd.engine.ignore: those an ignore rule leaves to it).

Edge cases the readers rely on:
- An atomic map or list (a selector, container args) is owned as a whole:
  fieldsV1 lists no children under it, so `{}` (or only `.`) below a path
  means "everything under here".
- A list item is found by its key fields (`k:{"name":"web"}`); key fields
  the item leaves out may have been defaulted by the server (a port's
  protocol), so only the fields it sets must agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from gitopsd.kube import FIELD_MANAGER

#: A concrete path into an object: map keys and list indexes.
Path = tuple[str | int, ...]


def entries(live: dict, *, others_than: str = FIELD_MANAGER) -> Iterator[dict]:
    """The managedFields entries of `live` that can own spec fields: not `others_than`'s
    (gitopsd's own, by default), not a status subresource's, and with a field set."""
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != others_than and entry.get("subresource") != "status" \
                and entry.get("fieldsV1"):
            yield entry


def covers(owned: dict, value) -> bool:
    """Whether the field set `owned` (a fieldsV1 tree, or a node of one) holds every field of
    the map `value`."""
    if isinstance(value, dict):
        for key, sub in value.items():
            child = owned.get(f"f:{key}")
            if child is None:
                return False   # (an applied null is owned too: someone setting it takes it)
            if isinstance(sub, (dict, list)) and sub and not covers_node(child, sub):
                return False
        return True
    return True


def covers_node(owned: dict, value) -> bool:
    """Whether the node `owned` (found for some path) holds all of `value`, the object's value
    at that path: a scalar's node is the field itself; `{}` is an atomic value owned whole (a
    granular one whose children were all taken by others disappears from the set instead)."""
    if not owned or set(owned) <= {"."} or not isinstance(value, (dict, list)):
        return True
    if isinstance(value, dict):
        return covers(owned, value)
    for item in value:
        if isinstance(item, dict):
            match = match_key(owned, item)
            if match is None or not covers(match, item):
                return False
        elif set_key(item) not in owned:
            return False
    return True


def node_at(owned: dict, obj, path: Path) -> dict | None:
    """The node of the field set `owned` for `path` of `obj` (whose list items say which
    `k:`/`v:` entry an index is), `{}` when an atomic value above it is owned whole, None when
    the set does not reach it."""
    node, value = owned, obj
    for part in path:
        if not node or set(node) <= {"."}:
            return {}
        if isinstance(part, int):
            item = value[part]
            node = match_key(node, item) if isinstance(item, dict) else node.get(set_key(item))
        else:
            node = node.get(f"f:{part}")
        if node is None:
            return None
        value = value[part]
    return node


def match_key(owned: dict, item: dict) -> dict | None:
    """The `k:{...}` entry of an associative list that identifies `item` (see the module docstring)."""
    found = _keyed(owned, item)
    return found[1] if found else None


def key_fields(owned: dict, item: dict) -> set[str]:
    """The names of the fields by which the list node `owned` identifies `item` (none: no such entry)."""
    found = _keyed(owned, item)
    return set(found[0]) if found else set()


def _keyed(owned: dict, item: dict) -> tuple[dict, dict] | None:
    """(the key fields, the entry) of the `k:{...}` entry of `owned` that identifies `item`."""
    for key, sub in owned.items():
        if not key.startswith("k:"):
            continue
        try:
            ident = json.loads(key[2:])
        except json.JSONDecodeError:
            continue
        if isinstance(ident, dict) and all(item.get(k, v) == v for k, v in ident.items()) \
                and any(k in item for k in ident):
            return ident, sub
    return None


def set_key(item) -> str:
    """The `v:<json>` key of a set item (finalizers) in a field set."""
    return f"v:{json.dumps(item, separators=(',', ':'))}"
