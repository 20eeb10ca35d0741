"""YAML from a commit: read the way Kubernetes reads it, within bounds.

Every YAML text gitopsd parses comes from someone else: a tenant's commit, a
renderer's output, the operator's config file. Three things in YAML can take
the daemon down with a few hundred bytes, and each is bounded here before a
single Python object is built:

- aliases: `&a [x, x]`, `&b [*a, *a]`, ... nine levels make a billion nodes
  out of 500 bytes ("billion laughs"). The parser keeps one copy of each
  anchored node, but everything after it (key normalisation, diffing, JSON)
  walks the expanded tree. We count what the expanded tree would hold.
- nesting: a 300-deep document is valid YAML, and every recursive walk after
  parsing (ours, orjson's 255-level limit) fails on it with a message
  nobody can act on. Kubernetes objects are rarely 40 levels deep.
- recursion: `&a [*a]` is a list that contains itself; any walk of it never
  ends.

The check runs on the composed node graph (built by libyaml when available),
in one iterative pass that memoises each node's expanded size, so an alias
bomb is measured in microseconds and refused before construction. The limits
are generous for real repositories: a 5 MB bundle of CustomResourceDefinitions
is about 200,000 nodes, and real objects rarely nest 40 levels deep.

Parsing is the largest cost of rendering a big app, and a commit that
changes one object of a thousand leaves 999 documents as they were:
`Documents` (the renderer's `DOCUMENTS`) keeps what each document parsed to,
by the digest of its text, and parses only the documents it has not seen.
A stream is cut into documents at its `---` lines only when that is sure to
read the same as parsing it whole: no directives (`%`), no `...` end markers,
no byte-order mark inside; otherwise, and whenever a piece does not read as
exactly one document, or fails, or the limits trip, the text is parsed
whole, as before, so errors and their line numbers are unchanged. YAML
anchors belong to one document, so cutting at document boundaries changes
nothing else. A document is kept only when JSON holds it exactly (a
round-trip through orjson gives an equal value: no NaN, no 65-bit integer,
no binary, no set); each caller gets a fresh copy, and pays the limits'
nodes and aliases the document took when it was parsed.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml

#: Bytes of one YAML or JSON file a render reads (or one renderer's output).
MAX_FILE_BYTES = 32 * 1024 * 1024
#: Bytes of all the files one render reads, and of a renderer's output.
MAX_RENDER_BYTES = 64 * 1024 * 1024
#: Nodes (mappings, sequences, scalars; keys count) one render may expand to,
#: counting every alias as the copy of its anchor it becomes. About 140 bytes
#: of memory each once built: 2,000,000 is ~300 MB at most.
MAX_NODES = 2_000_000
#: Alias references in one file. Real files use a handful.
MAX_ALIASES = 10_000
#: Levels of nested mappings and sequences, aliases expanded.
MAX_DEPTH = 100

HINT = ("a render may read at most {bytes} MiB, expand to {nodes:,} YAML nodes and nest {depth} levels deep "
        "(aliases count as copies of what they point at); split the file, or drop the aliases")


def limits_hint() -> str:
    return HINT.format(bytes=MAX_RENDER_BYTES // (1024 * 1024), nodes=MAX_NODES, depth=MAX_DEPTH)


class YAMLLimitError(yaml.MarkedYAMLError):
    """The text is YAML, but more than gitopsd will build: bigger, deeper or
    more aliased than the limits allow, or recursive. A YAMLError, so every
    caller that reports invalid YAML reports this too; `problem` says which
    limit, `problem_mark` (when known) where it tripped."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


@dataclass
class Budget:
    """What one render may still read and expand to, shared by all its files:
    a thousand files of 1,999 nodes each are as costly as one big file."""

    nodes: int = field(default_factory=lambda: MAX_NODES)
    bytes: int = field(default_factory=lambda: MAX_RENDER_BYTES)

    def take_bytes(self, size: int) -> str | None:
        """Charge `size` bytes; the reason when over a limit, else None."""
        if size > MAX_FILE_BYTES:
            return f"is larger than the {_mib(MAX_FILE_BYTES)} a file may have ({size:,} bytes)"
        self.bytes -= size
        if self.bytes < 0:
            return f"takes the render past {_mib(MAX_RENDER_BYTES)} of input in total"
        return None


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB" if size % (1024 * 1024) else f"{size // (1024 * 1024)} MiB"


def measure(root: yaml.Node, *, budget: Budget, aliases_left: int) -> int:
    """Check one composed document against the limits; returns the alias
    references it used. Raises YAMLLimitError naming the first limit crossed.

    Iterative post-order walk: a node is measured once (its expanded size and
    height memoised by identity), each further reference to it is an alias.
    Meeting a node again while still inside it is a cycle.
    """
    size: dict[int, int] = {}
    height: dict[int, int] = {}  # levels of collections at and below a node
    inside: set[int] = set()
    aliases = 0
    # (node, levels above it, its children once entered)
    stack: list[tuple[yaml.Node, int, list[yaml.Node] | None]] = [(root, 0, None)]
    while stack:
        node, above, kids = stack.pop()
        key = id(node)
        if kids is not None:  # every child measured: measure the node
            inside.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0) if _is_collection(node) else 0
            if size[key] > budget.nodes:
                if aliases:
                    raise YAMLLimitError(f"YAML expands past {MAX_NODES:,} nodes through aliases (an alias bomb?)",
                                         node.start_mark)
                raise YAMLLimitError(f"takes the render past {MAX_NODES:,} YAML nodes", node.start_mark)
            continue
        if key in size:  # met before: an alias, which nests its target here
            aliases += 1
            if aliases > aliases_left:
                raise YAMLLimitError(f"uses more than {MAX_ALIASES:,} aliases", node.start_mark)
            if above + height[key] > MAX_DEPTH:
                raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels (through an alias)", node.start_mark)
            continue
        if key in inside:
            raise YAMLLimitError("an alias refers to a node that contains it (a structure that never ends)",
                                 node.start_mark)
        if _is_collection(node) and above + 1 > MAX_DEPTH:
            raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
        inside.add(key)
        kids = _children(node)
        stack.append((node, above, kids))
        level = above + 1 if _is_collection(node) else above
        stack.extend((k, level, None) for k in reversed(kids))
    budget.nodes -= size[id(root)]
    return aliases


def _is_collection(node: yaml.Node) -> bool:
    return isinstance(node, (yaml.SequenceNode, yaml.MappingNode))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class Bounded:
    """Loader mixin: measure each document before constructing it.

    Works with the C and the pure-Python loaders. The pure-Python composer
    recurses once per level, so its depth is also counted while composing
    (a 10,000-deep document would otherwise end in RecursionError); libyaml
    stops at 1,000 levels by itself, and the measure pass catches the rest.
    `budget` may be replaced before the first document is read, to share one
    across the files of a render.
    """

    budget: Budget
    _aliases_used: int
    _depth: int

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.budget = Budget()
        self._aliases_used = 0
        self._depth = 0
        self._size = len(stream) if isinstance(stream, (str, bytes)) else 0

    def _check_size(self) -> None:
        if self._size > MAX_FILE_BYTES:
            raise YAMLLimitError(f"is larger than the {_mib(MAX_FILE_BYTES)} a file may have "
                                 f"({self._size:,} bytes)")

    def check_node(self) -> bool:
        self._check_size()
        return super().check_node()

    def get_single_node(self) -> Any:
        self._check_size()
        return super().get_single_node()

    def construct_document(self, node: yaml.Node) -> Any:
        self._aliases_used += measure(node, budget=self.budget, aliases_left=MAX_ALIASES - self._aliases_used)
        return super().construct_document(node)

    def compose_node(self, parent: Any, index: Any) -> Any:  # pure-Python composer only
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:  # +1: the document's top node is level 0
                raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _kubernetes_loader() -> type:
    """A safe (C when available), bounded loader that reads YAML the way Kubernetes does.

    PyYAML's YAML 1.1 resolvers differ from the apiserver's in two ways that
    matter here: unquoted dates (`2024-01-01`) become datetime objects where
    Kubernetes keeps strings, which would make the plan stage see drift
    forever; and a bare `=` is resolved to a "value" tag SafeLoader cannot
    construct, failing on valid manifests. Both resolvers are dropped.
    """
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dropped = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
    resolvers = {first: [(tag, rx) for tag, rx in entries if tag not in dropped]
                 for first, entries in base.yaml_implicit_resolvers.items()}
    return type("KubernetesYAMLLoader", (Bounded, base), {"yaml_implicit_resolvers": resolvers})


KubernetesLoader = _kubernetes_loader()


def load_all(text: str, *, budget: Budget | None = None, loader: type = KubernetesLoader) -> list:
    """Every document of `text` (None for empty ones), within `budget`.

    `loader` is any loader class with the `Bounded` mixin. Raises
    yaml.YAMLError: a syntax error, or YAMLLimitError for a limit.
    """
    instance = loader(text)
    if budget is not None:
        instance.budget = budget
    try:
        docs = []
        while instance.check_data():
            docs.append(instance.get_data())
        return docs
    finally:
        instance.dispose()


def load_one(text: str, *, budget: Budget | None = None) -> Any:
    """The single document of `text` (None when empty); see `load_all`."""
    instance = KubernetesLoader(text)
    if budget is not None:
        instance.budget = budget
    try:
        return instance.get_single_data()
    finally:
        instance.dispose()


def measure_value(value: Any, *, budget: Budget) -> None:
    """The limits for an already-built value (JSON, which has no aliases):
    nesting depth and node count. Raises YAMLLimitError (with no mark)."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        count += 1
        if isinstance(item, (dict, list)):
            level += 1
            if level > MAX_DEPTH:
                raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                count += len(item)  # the keys
                stack.extend((v, level) for v in item.values())
            else:
                stack.extend((v, level) for v in item)
        if count > budget.nodes:
            raise YAMLLimitError(f"takes the render past {MAX_NODES:,} YAML nodes")
    budget.nodes -= count


# --------------------------------------------------------------------------
# Documents already parsed (see the module docstring)

#: Bytes of parsed documents kept (as orjson), and documents kept at most.
MEMO_BYTES = 32 * 1024 * 1024
MEMO_DOCUMENTS = 200_000

_SEPARATOR_LINE = re.compile(r"^---[ \t]*(?:#[^\n]*)?(?:\n|$)", re.MULTILINE)
_UNSURE = re.compile(r"^(?:%|\.\.\.)", re.MULTILINE)


@dataclass(frozen=True)
class _Parsed:
    blob: bytes      # orjson of the document (b"null" for an empty one)
    nodes: int       # what it took of the node budget
    aliases: int


class Documents:
    """Parsed documents by the digest of their text; see the module docstring. Safe for concurrent use."""

    def __init__(self, *, max_bytes: int = MEMO_BYTES, max_documents: int = MEMO_DOCUMENTS) -> None:
        self.max_bytes = max_bytes
        self.max_documents = max_documents
        self._lock = threading.Lock()
        self._kept: OrderedDict[bytes, _Parsed] = OrderedDict()
        self._bytes = 0
        self.parsed = 0   # documents parsed (not found), for tests and benchmarks

    def load_all(self, text: str, *, budget: Budget | None = None) -> list:
        """What `load_all(text, budget=budget)` returns, parsing only documents not seen before.

        Raises what `load_all` raises, from a parse of the whole text.
        """
        budget = budget if budget is not None else Budget()
        pieces = _pieces(text)
        if pieces is None:
            return load_all(text, budget=budget)
        left = budget.nodes
        docs = self._load_pieces(pieces, budget=budget)
        if docs is None:   # not sure: the whole text, as it always was
            budget.nodes = left
            return load_all(text, budget=budget)
        return docs

    def __len__(self) -> int:
        return len(self._kept)

    def _load_pieces(self, pieces: list[str], *, budget: Budget) -> list | None:
        docs: list = []
        aliases = 0
        for i, piece in enumerate(pieces):
            key = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=20).digest()
            with self._lock:
                found = self._kept.get(key)
                if found is not None:
                    self._kept.move_to_end(key)
            if found is None:
                found = self._parse(key, piece, first=i == 0, budget=budget)
                if found is None:
                    return None
            elif found.nodes > budget.nodes:
                return None   # the whole parse says where the limit trips
            else:
                budget.nodes -= found.nodes
            aliases += found.aliases
            if aliases > MAX_ALIASES:
                return None
            if found.blob:
                docs.append(orjson.loads(found.blob))
        return docs

    def _parse(self, key: bytes, piece: str, *, first: bool, budget: Budget) -> _Parsed | None:
        """Parse one piece; None when it is not exactly one document (none is fine before the first
        `---`), fails, or is over a limit. Kept when JSON holds it exactly."""
        before = budget.nodes
        loader = KubernetesLoader(piece)
        loader.budget = budget
        try:
            found = []
            while loader.check_data():
                found.append(loader.get_data())
            aliases = loader._aliases_used
        except yaml.YAMLError:
            return None
        finally:
            loader.dispose()
        with self._lock:
            self.parsed += 1
        if len(found) > 1:
            return None   # a `---` line this cut missed (`--- |`): the whole parse reads it
        if not found:
            # Only comments: nothing before the first `---`; after one, an empty document (None).
            return _Parsed(blob=b"" if first else b"null", nodes=0, aliases=0)
        try:
            blob = orjson.dumps(found[0])
            if orjson.loads(blob) != found[0]:
                return None   # NaN: the whole parse builds it
        except TypeError:
            return None       # a value JSON cannot hold (a 65-bit integer, binary, a set, a non-string key)
        parsed = _Parsed(blob=blob, nodes=before - budget.nodes, aliases=aliases)
        with self._lock:
            if key not in self._kept:
                self._kept[key] = parsed
                self._bytes += len(parsed.blob)
                while self._kept and (self._bytes > self.max_bytes or len(self._kept) > self.max_documents):
                    _, old = self._kept.popitem(last=False)
                    self._bytes -= len(old.blob)
        return parsed


def _pieces(text: str) -> list[str] | None:
    """`text` cut at its `---` lines, or None when cutting is not sure to read the same (or not worth it)."""
    if "\ufeff" in text or _UNSURE.search(text):
        return None
    return _SEPARATOR_LINE.split(text)


#: The renderer's memo of parsed documents (gitopsd.engine.render).
DOCUMENTS = Documents()
