"""Drift an app means to allow: fields gitopsd leaves to other field managers.

Two sources, one mechanism:
- ignore rules (`ignoreDifferences:`, Argo CD's shape): objects named by
  group, kind, name and namespace (globs; absent: any) and fields named by
  JSON pointer (`/spec/replicas`), by the dotted path drift reports print
  (`spec.template.spec.containers[0].image`), or by field manager
  (`managedFieldsManagers`: whatever those own); `*` in a path matches any
  key or list item;
- field managers left alone on every object (`ignoreManagers`, default the
  kube-controller-manager, whose HPA scales Deployments through the scale
  subresource).

What "left alone" means under server-side apply. When the live object
exists, gitopsd applies its desired body *minus* every ignored field that
another field manager owns (`leave_alone`): gitopsd then owns none of
them, so another manager's change is neither drift (the dry-run keeps the
live value, and the ownership fast path does not ask for those fields) nor
reverted, and a watch event of that change costs no dry-run. A field is only
left out when another manager owns it: if gitopsd owned it alone and stopped
applying it, the apiserver would remove it (spec.replicas back to its
default, 1). So an ignored field nobody else has taken keeps following Git,
and a Git change of it is applied; once someone takes it, it is theirs. When
the object is created (or re-created), Git's value is used.

What is never left out, whatever a rule says: the object's identity
(apiVersion, kind, metadata.name, metadata.namespace), gitopsd's and the
ApplySet's own labels and annotations (`gitopsd.io/*`,
`applyset.kubernetes.io/*`). A whole value (a map, a list item, an atomic
list) is left out only when one other manager owns all of it; otherwise its
parts are judged one by one, and a list item keeps its key fields (a
container's name), so what remains still names the item.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import yaml

from gitopsd.engine import fields as fields_mod
from gitopsd.engine.diff import dotted, resolve
from gitopsd.engine.fields import Path
from gitopsd.objects import ObjectRef, ref_of

#: The HPA scales a Deployment through its scale subresource as kube-controller-manager.
DEFAULT_MANAGERS = ("kube-controller-manager",)

_IDENTITY = (("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"))
_OWN_PREFIXES = ("gitopsd.io/", "applyset.kubernetes.io/")
_INDEX = re.compile(r"\[(\d+|\*)\]")
_POINTER_ESCAPE = re.compile(r"~(?![01])")


# ------------------------------------------------------------------ paths

def check_pointer(text: str) -> str:
    """A JSON pointer (RFC 6901) to a field of an object; ValueError says why not."""
    if not text.startswith("/"):
        raise ValueError(f"{_quote(text)} is not a JSON pointer: it must start with '/' (e.g. /spec/replicas)")
    if _POINTER_ESCAPE.search(text):
        raise ValueError(f"{_quote(text)} is not a JSON pointer: '~' must be followed by 0 or 1 ('~1' for '/', "
                         "'~0' for '~')")
    tokens = pointer_tokens(text)
    if any(t == "" for t in tokens):
        raise ValueError(f"{_quote(text)} is not a JSON pointer to a field: it has an empty step ('//' or a "
                         "trailing '/')")
    _check_not_identity(text, tokens)
    return text


def check_field_path(text: str) -> str:
    """A dotted path as drift reports print it (`spec.template.spec.containers[0].image`)."""
    if text.startswith((".", "[")) or text.endswith(".") or ".." in text or ".[" in text:
        raise ValueError(f"{_quote(text)} is not a field path: write keys separated by '.', list items as [0] "
                         "(e.g. spec.template.spec.containers[0].image)")
    if any("[" in piece or "]" in piece for piece in _INDEX.sub("", text).split(".")) \
            or re.search(r"\](?![.\[]|$)", text):
        raise ValueError(f"{_quote(text)} is not a field path: a list item is [N] or [*], followed by '.', "
                         "another item or the end")
    _check_not_identity(text, tuple(_INDEX.sub("", text).split(".")))
    return text


def _check_not_identity(text: str, tokens: tuple[str, ...]) -> None:
    if any(tokens[:len(ident)] == ident for ident in _IDENTITY):
        raise ValueError(f"{_quote(text)} names the object's identity (apiVersion, kind, metadata.name, "
                         "metadata.namespace), which cannot be ignored")


def _quote(text: str) -> str:
    """A path as the config's messages quote values."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pointer_tokens(text: str) -> tuple[str, ...]:
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in text.split("/")[1:])


def pointer(path: Path) -> str:
    """`/spec/template/spec/containers/0/image`: a concrete path as a JSON pointer."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def resolve_pointer(obj, tokens: tuple[str, ...]) -> Iterator[Path]:
    """Every concrete path of `obj` that the pointer's tokens name (`*`: any key or item)."""
    if not tokens:
        yield ()
        return
    head, rest = tokens[0], tokens[1:]
    for step, value in _children(obj, head):
        for tail in resolve_pointer(value, rest):
            yield (step, *tail)


def _children(obj, token: str) -> Iterator[tuple[str | int, object]]:
    if isinstance(obj, dict):
        if token == "*":
            yield from obj.items()
        elif token in obj:
            yield token, obj[token]
    elif isinstance(obj, list):
        if token == "*":
            yield from enumerate(obj)
        elif token.isdigit() and int(token) < len(obj):
            yield int(token), obj[int(token)]


def _value_at(obj, path: Path):
    for p in path:
        obj = obj[p]
    return obj


# ------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """One ignore rule, compiled: which objects (globs, None: any) and which of their fields."""

    group: str | None = None
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None
    pointers: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    managers: frozenset[str] = frozenset()

    def matches(self, ref: ObjectRef) -> bool:
        return all(pattern is None or fnmatch.fnmatchcase(value, pattern) for pattern, value in (
            (self.group, ref.group), (self.kind, ref.kind), (self.name, ref.name),
            (self.namespace, ref.namespace)))

    def paths(self, obj: dict) -> Iterator[Path]:
        """The concrete paths of `obj` that the rule's pointers and dotted paths name."""
        for text in self.pointers:
            yield from resolve_pointer(obj, pointer_tokens(text))
        for text in self.fields:
            yield from resolve(obj, text)


@dataclass(frozen=True)
class Ignore:
    """An app's ignore rules and the field managers it leaves alone on every object."""

    rules: tuple[Rule, ...] = ()
    managers: frozenset[str] = frozenset()

    def leave_alone(self, desired: dict, live: dict | None) -> tuple[dict, tuple[str, ...]]:
        """What gitopsd applies over `live`: `desired` without the ignored fields another field
        manager owns (see the module docstring), and those fields' dotted paths. `desired`
        itself (not a copy) when nothing is left out: no live object, no other manager."""
        if not live or not (self.rules or self.managers):
            return desired, ()
        others = list(fields_mod.entries(live))
        if not others:
            return desired, ()
        rules = [r for r in self.rules if r.matches(ref_of(desired))]
        managers = self.managers.union(*(r.managers for r in rules))
        taken: list[Path] = []
        named = [e["fieldsV1"] for e in others if e.get("manager") in managers]
        if named:
            taken += _taken(desired, (), desired, named)
        owners = [e["fieldsV1"] for e in others]
        for rule in rules:
            for path in rule.paths(desired):
                if not _identity(path):
                    taken += _taken(desired, path, _value_at(desired, path), owners)
        if not taken:
            return desired, ()
        return _without(desired, taken), tuple(sorted({dotted(p) for p in taken}))


    def left_to_others(self, obj: dict) -> tuple[list[Path], frozenset[str]]:
        """What the app leaves to other field managers on `obj`, whoever owns it now: the concrete
        paths its matching rules name (identity aside), and the managers it leaves alone there
        (`managers` and the rules' managedFieldsManagers). A field-manager takeover
        (gitopsd.engine.takeover) takes none of it: gitopsd would then own those fields without
        applying them, and its next apply would remove them."""
        rules = [r for r in self.rules if r.matches(ref_of(obj))]
        paths = [p for r in rules for p in r.paths(obj) if not _identity(p)]
        return paths, self.managers.union(*(r.managers for r in rules))


NOTHING = Ignore()


def _identity(path: Path) -> bool:
    return any(path[:len(ident)] == ident for ident in _IDENTITY)


def _protected(path: Path) -> bool:
    """Never left out: the identity, and gitopsd's and the ApplySet's own labels and annotations."""
    if path in _IDENTITY:
        return True
    return len(path) == 3 and path[:2] in (("metadata", "labels"), ("metadata", "annotations")) \
        and str(path[2]).startswith(_OWN_PREFIXES)


def _holds_protected(path: Path) -> bool:
    """Whether `path` is, or lies above, a field that is never left out."""
    return len(path) < 3 and path in ((), ("metadata",), ("metadata", "labels"), ("metadata", "annotations")) \
        or _protected(path)


def _taken(desired: dict, path: Path, value, owners: list[dict]) -> list[Path]:
    """The largest parts of `value` (at `path` of `desired`) that one of `owners` (field sets)
    holds whole: all of it, or else its parts one by one — never a protected field, nor the key
    fields of a list item (see the module docstring)."""
    nodes = [n for owned in owners if (n := fields_mod.node_at(owned, desired, path)) is not None]
    if not nodes:
        return []
    if not _holds_protected(path) and any(fields_mod.covers_node(n, value) for n in nodes):
        return [path]
    out: list[Path] = []
    if isinstance(value, dict):
        keys = _key_fields(desired, path, value, owners)
        for key, sub in value.items():
            if key not in keys and not _protected((*path, key)):
                out += _taken(desired, (*path, key), sub, owners)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _taken(desired, (*path, i), item, owners)
    return out


def _key_fields(desired: dict, path: Path, item: dict, owners: list[dict]) -> set[str]:
    """When `path` is a list item: the fields that identify it (the `k:{...}` of any owner)."""
    if not path or not isinstance(path[-1], int):
        return set()
    lists = [n for owned in owners if (n := fields_mod.node_at(owned, desired, path[:-1]))]
    return set().union(*(fields_mod.key_fields(n, item) for n in lists))


def _without(obj: dict, paths: Iterable[Path]) -> dict:
    """A copy of `obj` without `paths`; list items are removed from the last one back, so the
    indexes of the others still hold."""
    out = copy.deepcopy(obj)
    for path in sorted(set(paths), key=lambda p: [(isinstance(s, str), s) for s in p], reverse=True):
        parent = _value_at(out, path[:-1])
        del parent[path[-1]]
    return out


# ------------------------------------------------------------------ suggestions

#: A drift of more fields than this is no drift to allow field by field: no suggestion (and a
#: record that stays small).
MAX_SUGGESTED = 20


def suggestion(ref: ObjectRef, paths: Iterable[str], obj: dict) -> str | None:
    """The ignore rule, in config syntax, that would silence drift of `paths` (dotted, as in a
    drift report) of the object `ref` — written with JSON pointers, as Argo CD users know them.
    None when there is nothing to suggest (an object deleted by hand) or too much (more than
    MAX_SUGGESTED fields)."""
    paths = list(paths)
    if len(paths) > MAX_SUGGESTED:
        return None
    pointers = []
    for text in paths:
        found = next(resolve(obj, text), None)
        pointers.append(pointer(found) if found is not None else "/" + text.replace(".", "/"))
    if not pointers:
        return None
    rule = {"kind": ref.kind, "name": ref.name, "jsonPointers": pointers}
    return "ignoreDifferences: " + yaml.safe_dump([rule], default_flow_style=True, sort_keys=False,
                                                    width=10_000).strip()
