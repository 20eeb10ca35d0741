"""The last line of defence for Secret values: scrub any text by value.

The rule: no text that came from a Secret, a secret generator or a tool's
error about one reaches a log line, an error, an Event, an audit record or
the CLI's output. The first lines of defence work by *field*: gitopsd.engine.diff
masks every value under a Secret's `data`/`stringData` before anything is
compared or printed, render messages name keys, never values. They cannot
see a value that a tool or the apiserver echoes back inside an error
message (`.stringData: expected map, got &{[password=...]}`), or one that a
bug drags into a traceback. So every exit also passes its text through
`scrub()`, which replaces any known secret value wherever it appears:

- the structlog processor chain (gitopsd.log): every event field, exception
  text and tracebacks included; and `sys.excepthook` /
  `threading.excepthook`, so an uncaught traceback is scrubbed too;
- audit records (gitopsd.audit), before they are hashed, stored, logged and
  turned into Events;
- sync results (gitopsd.engine.sync: reason, errors, health messages, hence the
  app status) and everything the CLI prints (gitopsd.report).

What is known: every value of every Secret gitopsd renders (the `data`
values raw and base64-decoded, `stringData`) and every value a renderer
meets on the way — a secret generator's literals, files and env lines, a
Secret manifest kustomize reads — registered by gitopsd.engine.render and
gitopsd.engine.confine as they are found, so even a render that fails scrubs its
own messages; every Secret value that gitopsd compares (gitopsd.engine.diff
registers both sides, so a value edited by hand into a live Secret is known
before a drift report is written) and the Secret an apiserver message is
about (`scrub_about`); and whatever *looks* like a value in a malformed
Secret body — list items, scalars, nested leaves under `data`/`stringData`,
the part after `=` or `:` of an item written as `password=...`, and of a key
Kubernetes would refuse (`password=...: ""`: a value pasted where a key goes,
which the apiserver's validation error quotes back); and the daemon's own
secrets: each app's git token and SSH key content (gitopsd.daemon reads
them, gitopsd.engine.sync registers the token of a CLI run too) and the webhook
secret. Cheap encodings are known too: standard and URL-safe base64
(unpadded), URL encoding, JSON and Python string escaping (Go's %q prints
the JSON form), and each line of a multi-line value (a PEM key echoed one
line at a time).

Design choices a security reviewer will ask about:

- **Lifetime: the process.** A value is not forgotten when its sync ends: a
  value rotated out of Git still sits in the live Secret until the next
  apply, and a drift report or a retry may echo it later. The registry is
  bounded (MAX_ENTRIES forms, i.e. roughly 10,000 values; the one seen
  least recently goes first), so a daemon that sees a new secret value every
  hour for years does not grow without limit; at about 230 bytes a form the
  bound is ~11 MiB. A value that every sync still renders is seen again
  each time, so it is never the one forgotten.
- **No plaintext.** The registry outlives the manifests it learned from, so
  it keeps no value: each form is stored as its length, a keyed BLAKE2b MAC
  (128 bits; the key is drawn at random per process and never leaves it),
  and a 16-bit bucket of a keyed rolling hash of its first MIN_LENGTH
  characters. A heap dump, an accidental repr or a debug endpoint shows
  digests; even with the key (a full memory dump), a value comes back only
  by guessing it, one MAC per guess, so a strong token stays safe and only
  a guessable password falls — as it would to a guess anyway. The bucket
  gives away at most 16 bits of a value's first characters.
- **Cost.** Scanning a text is one rolling-hash pass over it (~1 µs a
  character in CPython, independent of how many values are known) plus a
  MAC for each window whose bucket matches a known form (1 in 65,536 by
  chance): a log line costs microseconds, a 100 KB audit record ~0.1 s.
- **Minimum length: MIN_LENGTH characters, one rule for every text.** A
  shorter value ("1", "true", "admin", "web") is not scrubbed by value,
  anywhere: the registry is process-wide, so it would be redacted from
  every line that happens to contain it — timestamps, counts, app and
  namespace names, `replicas: true` — making logs useless, and its digest
  would fall to a brute force in no time anyway. (Scrubbing short values
  only where they stand alone, as the renderer once did for its own tool
  messages, does not save that: `app=web` is a standalone `web`.) Such
  values are still masked everywhere by field (gitopsd.engine.diff), and messages
  never carry a value on purpose; this layer is for the values that
  matter: passwords, tokens, keys. The rule applies per form, so a short
  value's longer forms are still scrubbed: its base64, and a secret
  generator's whole entry (`pw=abc`, or the typo `pw:abc` that kustomize
  quotes whole in its error), which is registered as a value of its own.
- **What it cannot catch.** A value inside a larger encoded blob (the
  base64 of `user:password`, a compressed or encrypted body), an encoding
  not listed above, and the value of a Secret gitopsd never reads (one a
  Pod references but Git does not hold). Those rely on the field-level
  rules alone.

The marker that replaces a value is REDACTED, the same one gitopsd.engine.diff uses.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import itertools
import json
import re
import secrets
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator

REDACTED = "<redacted>"
MIN_LENGTH = 6
MAX_ENTRIES = 50_000
SECTIONS = ("data", "stringData")

# What Kubernetes accepts as a Secret key (a ConfigMap key: alphanumerics, '-', '_', '.'; at most 253).
# Use with fullmatch. gitopsd.engine.render refuses other keys; here they are read as values pasted into a key.
SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_PRIME = (1 << 61) - 1          # modulus of the rolling hash (a Mersenne prime)
_BUCKET_MASK = 0xFFFF           # 16 bits of the rolling hash are kept per form


class _Registry:
    """Keyed digests of the secret values this process has seen (see the module docstring).

    A text is scanned in one pass: the rolling hash of every MIN_LENGTH-wide
    window is reduced to a 16-bit bucket; only where a bucket belongs to a
    registered form's first MIN_LENGTH characters is the MAC of the window
    of that form's length computed and compared. Readers take no lock: a
    change builds a new state and swaps it in.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._base = secrets.randbelow(_PRIME - (1 << 20)) + (1 << 20)
        self._shift = pow(self._base, MIN_LENGTH, _PRIME)
        self._lock = threading.Lock()
        self._state = _State()

    def __len__(self) -> int:
        return len(self._state.order)

    def __repr__(self) -> str:
        return f"<secret value registry: {len(self)} digests>"

    def _mac(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), key=self._key, digest_size=16).digest()

    def _bucket(self, text: str) -> int:
        h = 0
        for ch in text[:MIN_LENGTH]:
            h = (h * self._base + ord(ch)) % _PRIME
        return h & _BUCKET_MASK

    def add_many(self, forms: Iterable[str]) -> None:
        entries = {(len(f), self._mac(f), self._bucket(f)) for f in forms if len(f) >= MIN_LENGTH}
        with self._lock:
            old = self._state
            fresh = [e for e in entries if (e[0], e[1]) not in old.order]
            for length, digest, _ in entries:
                if (length, digest) in old.order:
                    # Seen again: to the young end. Only the order changes, which readers never use.
                    old.order[(length, digest)] = old.order.pop((length, digest))
            if not fresh:
                return
            state = old.copy()
            for length, digest, bucket in fresh:
                state.add(length, digest, bucket)
            while len(state.order) > MAX_ENTRIES:
                state.evict_oldest()
            self._state = state

    def clear(self) -> None:
        with self._lock:
            self._state = _State()

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every registered form found in `text`."""
        state = self._state
        if not state.order or len(text) < MIN_LENGTH:
            return []
        base, shift, anchors = self._base, self._shift, state.anchors
        prefix = list(itertools.accumulate(map(ord, text), lambda h, c: (h * base + c) % _PRIME, initial=0))
        hits = [i for i, (a, b) in enumerate(zip(prefix, prefix[MIN_LENGTH:]))
                if ((b - a * shift) % _PRIME) & _BUCKET_MASK in anchors]
        found: list[tuple[int, int]] = []
        for i in hits:
            h = ((prefix[i + MIN_LENGTH] - prefix[i] * shift) % _PRIME) & _BUCKET_MASK
            for length in anchors[h]:
                if i + length <= len(text) and self._mac(text[i:i + length]) in state.digests.get(length, ()):
                    found.append((i, i + length))
        return found


class _State:
    """One snapshot of the registry; once published, only `order` changes (under the lock)."""

    def __init__(self) -> None:
        self.order: dict[tuple[int, bytes], int] = {}          # (length, digest) -> bucket, least recent first
        self.digests: dict[int, set[bytes]] = {}               # length -> digests
        self.anchors: dict[int, collections.Counter] = {}      # bucket -> lengths using it (with counts)

    def copy(self) -> _State:
        new = _State()
        new.order = dict(self.order)
        new.digests = {k: set(v) for k, v in self.digests.items()}
        new.anchors = {k: collections.Counter(v) for k, v in self.anchors.items()}
        return new

    def add(self, length: int, digest: bytes, bucket: int) -> None:
        self.order[(length, digest)] = bucket
        self.digests.setdefault(length, set()).add(digest)
        self.anchors.setdefault(bucket, collections.Counter())[length] += 1

    def evict_oldest(self) -> None:
        (length, digest), bucket = next(iter(self.order.items()))
        del self.order[(length, digest)]
        self.digests[length].discard(digest)
        counter = self.anchors[bucket]
        counter[length] -= 1
        if counter[length] <= 0:
            del counter[length]
        if not counter:
            del self.anchors[bucket]


_registry = _Registry()
_hooks_installed = False


# ------------------------------------------------------------------ learning values

def remember(values: Iterable[object]) -> None:
    """Register secret values (strings; other scalars by their text) in every cheap encoding."""
    forms: set[str] = set()
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        forms |= _forms(value if isinstance(value, str) else str(value))
    if forms:
        _registry.add_many(forms)
        _install_hooks()


def remember_secret(obj: object) -> None:
    """Register every value of a Secret body, whatever its shape.

    Anything under `data`/`stringData` counts, however malformed: list items,
    a lone scalar, the leaves of a nested mapping, and for text written as
    `key=value` / `key: value` the part after the separator as well. A
    `data` value is registered raw and base64-decoded.
    """
    remember(secret_values(obj))


def secret_values(obj: object) -> list[str]:
    """What remember_secret registers: every value-like text in a Secret body (none for other kinds).

    A Secret is judged by its kind alone, whatever its apiVersion: an object
    with a missing or mistyped apiVersion is refused by the renderer, and
    that refusal must not be the message that carries its values.
    """
    if not (isinstance(obj, dict) and obj.get("kind") == "Secret"):
        return []
    values: list[str] = []
    for section in SECTIONS:
        body = obj.get(section)
        if isinstance(body, dict):
            # A key Kubernetes would refuse, written `password=...` or `password: ...`:
            # a value pasted where a key goes. The apiserver's error will quote it.
            values.extend(_after_separator(str(key)) for key in body if not SECRET_KEY.fullmatch(str(key)))
            for value in body.values():
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    text = str(value)
                    values.append(text)
                    if section == "data" and isinstance(value, str):
                        decoded = _b64decode_text(value)
                        if decoded is not None:
                            values.append(decoded)
                    continue
                values.extend(_loose_values(value))
        elif body is not None:
            values.extend(_loose_values(body))
    return values


def remember_objects(objs: Iterable[object]) -> None:
    """Register the values of every Secret among `objs` (anything else is ignored)."""
    remember(value for obj in objs for value in secret_values(obj))


def is_secret_kind(obj: object) -> bool:
    """A Kubernetes Secret (core v1), judged by kind and apiVersion only, whatever its body."""
    return isinstance(obj, dict) and obj.get("kind") == "Secret" and obj.get("apiVersion") == "v1"


def _loose_values(value: object) -> Iterator[str]:
    """Everything in a malformed section that could be a value."""
    if isinstance(value, dict):
        for sub in value.values():
            yield from _loose_values(sub)
    elif isinstance(value, (list, tuple)):
        for sub in value:
            yield from _loose_values(sub)
    elif value is not None and not isinstance(value, bool):
        text = str(value)
        yield text
        yield from (_after_separator(line) for line in text.splitlines())


def _after_separator(line: str) -> str:
    """What follows the first `=` or `:` of a `key=value` / `key: value` line ("" when none)."""
    for sep in ("=", ":"):
        key, found, rest = line.partition(sep)
        if found and key.strip() and rest.strip():
            return rest.strip()
    return ""


def _forms(text: str) -> set[str]:
    """The value and its cheap encodings, each line of a multi-line value included."""
    candidates = {text, text.strip()}
    candidates.update(line.strip() for line in text.splitlines())
    forms: set[str] = set()
    for value in candidates:
        if not value:
            continue
        raw = value.encode("utf-8", "surrogatepass")
        forms.update({
            value,
            base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            urllib.parse.quote(value, safe=""),
            urllib.parse.quote_plus(value, safe=""),
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            repr(value)[1:-1],
        })
    return forms


def b64decode_data(value: str) -> bytes | None:
    """A Secret `data` value decoded as the apiserver decodes it (standard
    alphabet, padded; line breaks ignored); None when it is not base64."""
    try:
        return base64.b64decode(value.replace("\n", "").replace("\r", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64decode_text(value: str) -> str | None:
    raw = b64decode_data(value)
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ------------------------------------------------------------------ scrubbing

def scrub(text: str) -> str:
    """`text` with every known secret value (in any registered form) replaced by REDACTED."""
    if not isinstance(text, str) or len(text) < MIN_LENGTH or not len(_registry):
        return text
    spans = sorted(_registry.spans(text))
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end in spans:
        if end <= pos:
            continue   # inside a span already replaced
        if start >= pos:
            out.append(text[pos:start])
            out.append(REDACTED)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def scrub_about(text: str, obj: object) -> str:
    """`text` scrubbed, with the values of `obj` (when it is a Secret) learned first.

    For a message about one object — an apiserver error in answer to a
    request that carried it — whose values may not be known yet: a live
    Secret read for a drift check, or one the bounded registry forgot.
    """
    remember_secret(obj)
    return scrub(text)


def scrub_data(value):
    """A copy of `value` (str, or dicts/lists/tuples of them) with every string scrubbed.

    Keys are scrubbed too (a value pasted into a key is still a value); other
    types pass through unchanged.
    """
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_data(k) if isinstance(k, str) else k: scrub_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_data(v) for v in value)
    return value


def forget_all() -> None:
    """Drop every registered value (tests that need a clean registry)."""
    _registry.clear()


# ------------------------------------------------------------------ uncaught tracebacks

def _install_hooks() -> None:
    """Scrub uncaught tracebacks (main thread and worker threads) before they are printed.

    Installed when the first value is registered: before that there is
    nothing to protect. Whoever prints the traceback next (Python's default
    hook, a test runner's) gets an exception whose text is already clean.
    A hook that scrubs by itself (marked ``scrubs_secrets``: gitopsd.log's,
    which makes the traceback a scrubbed log line) is left to do its job.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous_hook, previous_thread_hook = sys.excepthook, threading.excepthook

    def hook(exc_type, exc, tb) -> None:
        if getattr(previous_hook, "scrubs_secrets", False):
            return previous_hook(exc_type, exc, tb)
        _write_scrubbed(exc_type, exc, tb, fallback=lambda: previous_hook(exc_type, exc, tb))

    def thread_hook(args) -> None:
        if args.exc_type is SystemExit or getattr(previous_thread_hook, "scrubs_secrets", False):
            return previous_thread_hook(args)
        name = getattr(args.thread, "name", "?")
        sys.stderr.write(f"Exception in thread {name}:\n")
        _write_scrubbed(args.exc_type, args.exc_value, args.exc_traceback,
                        fallback=lambda: previous_thread_hook(args))

    sys.excepthook = hook
    threading.excepthook = thread_hook


def _write_scrubbed(exc_type, exc, tb, *, fallback) -> None:
    import traceback

    try:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
    except Exception:  # noqa: BLE001 - never lose the report because formatting failed
        return fallback()
    stream = sys.stderr
    if stream is not None:
        stream.write(scrub(text))
        stream.flush()


def scrub_exception(exc: BaseException) -> BaseException:
    """Scrub an exception in place — its args and text attributes, along its whole chain.

    For errors about to cross a boundary where someone else may print them
    (a CLI error line, a traceback): the causes and contexts are printed with
    a traceback too, and an apiserver error that echoed a value is often one
    of them. Returns `exc`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            current.args = scrub_data(current.args)
            for name, value in list(vars(current).items()):
                if isinstance(value, (str, list, tuple, dict)):
                    setattr(current, name, scrub_data(value))
        except (AttributeError, TypeError):
            pass   # a read-only attribute or an exotic type: its text stays as the excepthook finds it
        stack.extend((current.__cause__, current.__context__))
    return exc
