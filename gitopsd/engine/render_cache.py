"""Render cache: a render is reused while the files it read are unchanged.

Every poll of an unchanged commit used to run kustomize or helm again, and a
push to a monorepo re-rendered every app of it although it touched one. A
build (gitopsd.engine.render.build) is a function of the content it read and
of its options, so it is cached under exactly that:

- the content of its inputs at the commit: the git object id of every path
  the build read (gitopsd.engine.source.describe; `Built.inputs` says which,
  closed over symlinks). A commit that leaves an app's directories alone —
  another app's change in a monorepo, a README edit — is a hit, and so is
  every poll of the same commit;
- the render options: the app's path, render kind, namespace, helm values
  files and release, allowRemoteBases, and a digest of the app's SOPS
  decryption keys (gitopsd.engine.decrypt.Keys.fingerprint): a key removed
  from the app's Secret is a miss, so the next render fails to decrypt
  instead of serving what the old key opened;
- the renderers: the kustomize, helm and sops binaries (path, size, mtime).

Decrypted Secrets are kept like every rendered Secret: in memory, in the
entries below; never on disk.

How a lookup works: for each (path, options) the cache keeps the input sets
of its last few builds. For a new commit it describes those paths (one local
git call each) and looks the described content up. Sound because a build that
meets the same content at the same paths reads the same files, takes the same
decisions and writes the same output; a path that changed kind (a directory
become a link) changes its description, so it is a miss.

Not cached, by design:
- a build with problems. Some failures are passing (a tool that timed out on
  a loaded machine) and must be retried for real; a failing app retries with
  backoff, so not caching failures costs little;
- a build with allowRemoteBases: it reads outside the commit (a remote base's
  branch moves without a commit here);
- when the commit cannot be described (no cached repository: a caller that
  made its own Checkout), which is a miss, never a hit.

An app's revision is the commit its desired state comes from: `render`
also says since which commit the app (named by the caller) has rendered from
the same inputs, and the daemon reports that commit. So in a monorepo a
commit to one app is a transition of that app only: the others plan as
before (the poll is still their drift check), find nothing to do, and as
their revision did not move, write no record and no status — the push's
cost follows the change. A commit that brings an app's inputs back to an
older content is a new revision all the same (the app's own last build is
compared, not whatever the cache still holds).

Which apps a new commit concerns (`unchanged_by`, asked by the daemon's
triggers before it wakes the apps of a repository, so that a push to one app
of a monorepo reconciles that app and not the thousand beside it): an app
whose last build is known here is left alone by a commit when no path that
changed since the commit its inputs were last checked at
(gitopsd.engine.source.changed_paths) is, lies below, or lies above one of
its inputs. That is the cache's own key read the other way: the inputs are
directories and files by real path plus the links on the way (a plain app
reads its whole directory, so a new file in it is below an input; a
kustomization's directories are inputs, not only the files it names), and
a changed leaf below an input changes that input's tree id, so "not
touched" means "the same key", hence the same build. The edge cases:

- a rename or a deletion names the old path: touched;
- a path become a symlink, or a directory become a file or a link, names
  that path (and every file the directory held): touched;
- a `.gitattributes` anywhere may change how any file is checked out
  without changing its blob: a commit touching one concerns every app;
- unknown, hence concerned by every new commit: an app never built in this
  process, whose last build failed or read remote bases (neither is
  cached), whose record was evicted, rendered without an app name (self-heal
  off: every commit is a new revision of it), or when git cannot tell what
  changed (the old commit gone from a shallow cache);
- a commit found unrelated moves the app's "checked at" commit forward, so
  the next push is diffed from there (one diff per push for the whole
  fleet, not one per app). A build in flight meanwhile records the commit
  it really read, which is older: sound, as its diff then covers both.

On a hit the build is handed out as a fresh copy (the cache keeps orjson
bytes, so nothing a caller changes reaches it), every Secret value in it is
registered with gitopsd.redact again (the registry forgets the least recently
seen values, and a value still rendered must stay known), and
`render.finish` runs again, as scopes depend on what the cluster serves.

Bounded: at most `max_entries` builds and `max_bytes` of stored manifests,
the least recently used out first. The bound on entries is far above any
fleet (each app keeps one build live, and an app whose build was evicted
has unknown inputs: every new commit of its repository wakes it, and its
next render is a new revision) — 10,000 apps met a bound of 4,096 and every
push woke 6,000 of them; `max_bytes` is the bound that holds memory. Safe for concurrent use: one lock around
the tables; builds run outside it (two callers missing the same key at once
both build, to the same result).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from gitopsd import redact
from gitopsd.engine import decrypt, render, source
from gitopsd.errors import RenderError

MAX_ENTRIES = 100_000
MAX_BYTES = 64 * 1024 * 1024
#: Input sets remembered per (path, options): an app's inputs change when its kustomization does.
INPUT_SETS_PER_OPTIONS = 4


@dataclass(frozen=True)
class Rendered:
    """An app's manifests, and the commit since which its render has been the same."""

    manifests: list[render.Manifest]
    since: source.Revision


@dataclass(frozen=True)
class _Entry:
    blob: bytes           # orjson of [[source, object], ...]
    inputs: tuple[str, ...]
    decrypted: bool = False   # render.Built.decrypted


@dataclass(frozen=True)
class _Seen:
    """An app's last build: its key and revision, what it read, and the commit whose content that is."""

    key: str
    since: source.Revision
    inputs: tuple[str, ...]
    at: str               # a commit at which `inputs` are known to hold this build's content


class RenderCache:
    """See the module docstring."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 on_lookup: Callable[[str], None] | None = None) -> None:
        """``on_lookup("hit" | "miss" | "uncached")`` hears every render (the daemon counts them)."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._on_lookup = on_lookup
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._input_sets: dict[tuple, list[tuple[str, ...]]] = {}
        self._bytes = 0
        self._since: OrderedDict[str, _Seen] = OrderedDict()   # app -> its last build

    def render(self, checkout: source.Checkout, path: str = ".", *, app: str | None = None, kind: str = "auto",
               namespace: str = "default", helm_values: Sequence[str] = (), helm_release: str | None = None,
               is_namespaced: Callable[[str, str], bool | None] = render.builtin_is_namespaced,
               allow_remote_bases: bool = False, allow_remote_charts: bool = False,
               timeout: float = 120.0, decryption: decrypt.Keys | None = None) -> Rendered:
        """`render.render` of `path` in `checkout`, from the cache when its inputs are unchanged.

        `since` is the commit from which `app` has rendered this build without
        a break (`checkout`'s own commit for a new build, or without `app`).
        Raises RenderError as `render.render` does.
        """
        options = (path, kind, namespace, tuple(helm_values), helm_release, allow_remote_bases,
                   allow_remote_charts, decryption.fingerprint if decryption is not None else None,
                   _renderers())
        # What the network serves may change while the commit does not.
        cacheable = not (allow_remote_bases or allow_remote_charts)
        found = self._lookup(checkout, options) if cacheable else None
        if found is not None:
            key, built = found
            inputs = tuple(sorted(built.inputs))
            self._count("hit")
        else:
            built = render.build(checkout.path, path, kind=kind, namespace=namespace, helm_values=helm_values,
                                 helm_release=helm_release, timeout=timeout, allow_remote_bases=allow_remote_bases,
                                 allow_remote_charts=allow_remote_charts, decryption=decryption)
            key = self._store(checkout, options, built) if cacheable and not built.problems else None
            inputs = tuple(sorted(built.inputs))
            self._count("miss" if key else "uncached")
        manifests = render.finish(built, namespace=namespace, is_namespaced=is_namespaced)
        return Rendered(manifests=manifests, since=self._since_for(app, key, checkout.revision, inputs))

    def unchanged_by(self, app: str, checkout: source.Checkout) -> bool | None:
        """Whether `checkout`'s commit leaves every input of `app`'s last build as it was.

        True also remembers that the inputs hold at this commit (the next
        commit is compared with this one); False when it touches one; None
        when that is not known (see the module docstring).
        """
        with self._lock:
            seen = self._since.get(app)
        sha = checkout.revision.sha
        if seen is None:
            return None
        if seen.at == sha:
            return True
        changed = source.changed_paths(checkout, since=seen.at)
        if changed is None:
            return None
        if touches(changed, seen.inputs):
            return False
        with self._lock:
            if self._since.get(app) is seen:   # not rebuilt meanwhile (a build records what it read)
                self._since[app] = _Seen(key=seen.key, since=seen.since, inputs=seen.inputs, at=sha)
        return True

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ lookup

    def _since_for(self, app: str | None, key: str | None, revision: source.Revision,
                   inputs: tuple[str, ...]) -> source.Revision:
        """The app's revision: the commit of its last build if this is the same build, else this one.

        Without a key (a build not cached) the app's record is dropped: what it
        read is then unknown."""
        if app is None:
            return revision
        with self._lock:
            last = self._since.pop(app, None)
            since = last.since if last is not None and key is not None and last.key == key else revision
            if key is not None:
                self._since[app] = _Seen(key=key, since=since, inputs=inputs, at=revision.sha)
                while len(self._since) > self.max_entries:
                    self._since.popitem(last=False)
            return since

    def _lookup(self, checkout: source.Checkout, options: tuple) -> tuple[str, render.Built] | None:
        with self._lock:
            candidates = list(self._input_sets.get(options, ()))
        for inputs in candidates:
            described = source.describe(checkout, inputs)
            if described is None:
                return None
            key = _key(options, described)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._remember_inputs(options, inputs)
            if entry is not None:
                return key, _thaw(entry)
        return None

    def _store(self, checkout: source.Checkout, options: tuple, built: render.Built) -> str | None:
        """Keep `built` (before `finish` changes it); its key, or None when it cannot be keyed or serialised."""
        inputs = tuple(sorted(built.inputs))
        described = source.describe(checkout, inputs)
        if described is None or any(v == "missing" for v in described.values()):
            return None   # a path the commit does not hold as read (e.g. git cannot tell): no safe key
        try:
            # Copied out: orjson's result sits in a buffer of up to ten times its length
            # (4 KiB for 10 bytes, 28 KiB for 3 KB), which a kept blob would keep too.
            blob = memoryview(orjson.dumps([[m.source, m.obj] for m in built.manifests])).tobytes()
        except TypeError:
            return None   # a value JSON cannot hold exactly (an integer beyond 64 bits)
        key = _key(options, described)
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes -= len(old.blob) if old else 0
            self._entries[key] = _Entry(blob=blob, inputs=inputs, decrypted=built.decrypted)
            self._bytes += len(blob)
            self._remember_inputs(options, inputs)
            self._evict()
        return key

    def _remember_inputs(self, options: tuple, inputs: tuple[str, ...]) -> None:
        sets = self._input_sets.setdefault(options, [])
        if inputs in sets:
            sets.remove(inputs)
        sets.insert(0, inputs)
        del sets[INPUT_SETS_PER_OPTIONS:]

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old.blob)
        if len(self._input_sets) > self.max_entries:
            for options in list(self._input_sets)[: len(self._input_sets) - self.max_entries]:
                del self._input_sets[options]

    def _count(self, result: str) -> None:
        if self._on_lookup is not None:
            self._on_lookup(result)


#: Files that change how other files are checked out without changing their blobs.
_CHECKOUT_RULES = ".gitattributes"


def touches(changed: frozenset[str], inputs: Sequence[str]) -> bool:
    """Whether a changed leaf path is, lies below, or lies above one of `inputs` ("." is the root).

    `changed` as gitopsd.engine.source.changed_paths names them. A path
    above an input is a directory become a file or a link (its leaf is named,
    and the input's old files as deleted). A changed `.gitattributes`
    touches everything.
    """
    if not changed:
        return False
    if "." in inputs or any(p.rsplit("/", 1)[-1] == _CHECKOUT_RULES for p in changed):
        return True
    below: set[str] = set()   # every changed path and every directory above one
    for p in changed:
        parts = p.split("/")
        below.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for i in inputs:
        parts = i.split("/")
        if i in below or any("/".join(parts[:n]) in changed for n in range(1, len(parts))):
            return True
    return False


def _key(options: tuple, described: dict[str, str]) -> str:
    return hashlib.sha256(orjson.dumps([repr(options), sorted(described.items())])).hexdigest()


def _thaw(entry: _Entry) -> render.Built:
    """A fresh copy of a stored build, its Secret values registered with gitopsd.redact again —
    and, for a build that decrypted SOPS files, the data of every object (a ConfigMap generated
    from an encrypted input holds plaintext too: the registry, being bounded, may have let the
    first render's registration go since)."""
    manifests = [render.Manifest(obj=obj, source=src) for src, obj in orjson.loads(entry.blob)]
    for m in manifests:
        redact.remember_secret({**m.obj, "kind": "Secret"} if entry.decrypted else m.obj)
    return render.Built(manifests=manifests, inputs=frozenset(entry.inputs), decrypted=entry.decrypted)


#: How long the answer of _renderers is reused: looking binaries up is not free, and a new
#: binary takes effect within this time.
RENDERERS_TTL = 10.0
_renderers_seen: tuple[float, tuple] = (float("-inf"), ())


def _renderers() -> tuple:
    """Which kustomize and helm would run (path, size, mtime): a new binary may render differently."""
    global _renderers_seen
    at, seen = _renderers_seen
    if time.monotonic() - at < RENDERERS_TTL:
        return seen
    out = []
    for tool in render.TOOLS:
        try:
            path = render.find_tool(tool)
            st = path.stat()
            out.append((str(path), st.st_size, st.st_mtime_ns))
        except (RenderError, OSError):
            out.append(None)
    _renderers_seen = (time.monotonic(), tuple(out))
    return _renderers_seen[1]
