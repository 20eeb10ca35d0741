"""Comparing a live object with what the server would make of the desired one.

The comparison is between two *server-produced* objects (the live one and a
server-side-apply dry-run of the desired one), so defaulted fields appear on
both sides and never show as drift. What differs is reported as field paths
(for the audit trail) and as a unified YAML diff (for people).

Secret values never leave this module: before anything is compared or
printed, every value under a Secret's `data`/`stringData` is replaced by a
marker that says only whether it changed. A section that is not a mapping
(a list, a text block: refused by gitopsd.engine.render before planning, but a live
object is whatever the cluster holds) is masked as a whole. Both sides'
values are also registered with gitopsd.redact, so a value someone edited
into a live Secret by hand is scrubbed from any message that echoes it.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from gitopsd.redact import REDACTED, is_secret_kind, remember_objects

# Server-maintained metadata that says nothing about desired state.
_VOLATILE_METADATA = ("managedFields", "resourceVersion", "generation", "creationTimestamp", "uid", "selfLink")
REDACTED_CHANGED = "<redacted: changed>"


@dataclass(frozen=True)
class Diff:
    fields: tuple[str, ...]   # changed field paths, e.g. ("spec.replicas", "data.password")
    text: str                 # unified diff of the YAML, Secret values masked

    @property
    def empty(self) -> bool:
        return not self.fields


def normalize(obj: dict | None) -> dict:
    """A copy without status and server-maintained metadata."""
    if not obj:
        return {}
    out = copy.deepcopy(obj)
    out.pop("status", None)
    meta = out.get("metadata") or {}
    for key in _VOLATILE_METADATA:
        meta.pop(key, None)
    for key in ("annotations", "labels"):
        if key in meta and not meta[key]:
            del meta[key]
    return out


def redact_pair(live: dict, after: dict) -> tuple[dict, dict]:
    """Mask Secret values on both sides, keeping only 'present' and 'changed'."""
    if not (is_secret_kind(live) or is_secret_kind(after)):
        return live, after
    remember_objects((live, after))
    live, after = copy.deepcopy(live), copy.deepcopy(after)
    for section in ("data", "stringData"):
        old = live.get(section) or {}
        new = after.get(section) or {}
        if not (isinstance(old, dict) and isinstance(new, dict)):
            # Malformed: no key-by-key comparison, and nothing of it is shown.
            changed = old != new
            if section in live:
                live[section] = REDACTED
            if section in after:
                after[section] = REDACTED_CHANGED if changed and section in live else REDACTED
            continue
        for key in set(old) | set(new):
            changed = old.get(key) != new.get(key)
            if key in old:
                old[key] = REDACTED
            if key in new:
                new[key] = REDACTED_CHANGED if changed and key in old else REDACTED
        if section in live:
            live[section] = old
        if section in after:
            after[section] = new
    # kubectl's last-applied annotation would carry the whole Secret, values
    # included; our desired-hash is a hash of the values (a short PIN falls to
    # a guessing loop), so both are masked too.
    for side in (live, after):
        ann = (side.get("metadata") or {}).get("annotations") or {}
        for key in ("kubectl.kubernetes.io/last-applied-configuration", "gitopsd.io/desired-hash"):
            if key in ann:
                ann[key] = REDACTED
    return live, after


def redact(obj: dict) -> dict:
    """One object with any Secret values masked (for printing a single object)."""
    return redact_pair(obj, obj)[1]


def changed_paths(old, new, prefix: str = "") -> list[str]:
    """Field paths whose values differ; lists compared element-wise by index."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(changed_paths(old[key], new[key], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(changed_paths(a, b, f"{prefix}[{i}]"))
        return out
    return [] if old == new else [prefix or "."]


def compare(live: dict | None, after: dict, *, label: str) -> Diff:
    """Diff of `live` against the server's view of the desired object (`after`)."""
    # Paths are computed on the masked copies: an unchanged Secret value is
    # REDACTED on both sides, a changed one differs only by its marker.
    old, new = redact_pair(normalize(live), normalize(after))
    fields = changed_paths(old, new)
    if not fields:
        return Diff(fields=(), text="")
    text = "".join(difflib.unified_diff(
        to_yaml(old).splitlines(keepends=True) if old else [],
        to_yaml(new).splitlines(keepends=True),
        fromfile=f"live/{label}", tofile=f"desired/{label}",
    ))
    return Diff(fields=tuple(fields), text=text)


def to_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, width=120)


def managers_of(live: dict, fields: tuple[str, ...] | list[str], *, exclude: str = "gitopsd") -> list[str]:
    """Field managers (other than `exclude`) that own any of `fields` on `live`.

    Drift reports name who changed an object by hand: in server-side apply
    the last writer of a field owns it, so the owners of the drifted paths
    are the editors (`kubectl-edit`, `kubectl-scale`, ...). Falls back to the
    most recently active other manager when no path can be attributed.
    """
    entries = [m for m in (live.get("metadata") or {}).get("managedFields") or []
               if m.get("manager") and m.get("manager") != exclude and m.get("subresource") != "status"]
    found: list[str] = []
    for entry in entries:
        owned = entry.get("fieldsV1") or {}
        if any(_owns(owned, _path_parts(p)) for p in fields):
            label = entry["manager"] + (f" ({entry['operation']})" if entry.get("operation") else "")
            if label not in found:
                found.append(label)
    if found or not entries:
        return found
    latest = max(entries, key=lambda m: m.get("time") or "")
    return [latest["manager"] + (f" ({latest['operation']})" if latest.get("operation") else "")]


def _path_parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.split("."):
        while "[" in piece:
            name, rest = piece.split("[", 1)
            if name:
                parts.append(name)
            idx, piece = rest.split("]", 1)
            parts.append(int(idx))
        if piece:
            parts.append(piece)
    return parts


def _owns(owned: dict, parts: list) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if isinstance(head, int):
        # A list element: any keyed/indexed/valued child may be it (no schema here).
        return any(_owns(sub, rest) for key, sub in owned.items() if key[:2] in ("k:", "i:", "v:"))
    child = owned.get(f"f:{head}")
    if child is None:
        return False
    return not child or _owns(child, rest)


def within(obj, path: str) -> bool:
    """Whether `path` (as changed_paths spells it) exists in `obj`.

    A drift report names only fields of the desired object: anything else in a
    live-vs-dry-run comparison is a controller moving its own fields between
    the two reads (a Deployment's revision annotation), not a hand edit.
    """
    return next(resolve(obj, path), None) is not None


def resolve(obj, path: str) -> Iterator[tuple[str | int, ...]]:
    """Every concrete path (keys and list indexes) of `obj` that `path`, spelled as
    changed_paths spells it, names; `*` (a key) and `[*]` match any key or item. Keys may
    contain dots (`app.kubernetes.io/name`), so keys are matched against the path text rather
    than split on dots."""
    if path == "":
        yield ()
        return
    if path.startswith("["):
        index, _, rest = path[1:].partition("]")
        if isinstance(obj, list):
            items = range(len(obj)) if index == "*" else \
                [int(index)] if index.isdigit() and int(index) < len(obj) else []
            for i in items:
                for tail in resolve(obj[i], rest.removeprefix(".")):
                    yield (i, *tail)
        return
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        key = str(key)
        for name in (key, "*"):
            if path == name or (path.startswith(name) and path[len(name)] in ".["):
                for tail in resolve(value, path[len(name):].removeprefix(".")):
                    yield (key, *tail)
                break


def dotted(path: tuple[str | int, ...]) -> str:
    """A concrete path spelled as changed_paths spells it: `spec.template.spec.containers[0].image`."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
