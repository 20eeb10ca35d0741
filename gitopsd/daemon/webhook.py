"""Push webhooks: verify who sent them, read which repository and ref moved.

Pure functions, no I/O: the HTTP server (``gitopsd.daemon.server``) hands in the raw
body and headers, and gets back a ``PushEvent`` or a ``WebhookError`` whose
``status`` is the HTTP answer. The daemon then asks ``matches`` for each app
and enqueues a sync for those that follow the pushed ref.

The public functions take their arguments positionally or by name, as the
daemon's interface was agreed; the private helpers are keyword-only.

Three providers:

- ``github``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``,
  ``X-GitHub-Event: push`` (``ping`` and every other event are answered 202
  and ignored). JSON or form-encoded (``payload=<json>``) bodies both work.
  The SHA-1 ``X-Hub-Signature`` is not accepted.
- ``gitlab``: ``X-Gitlab-Token: <secret>`` (GitLab sends the token itself,
  not a signature), ``X-Gitlab-Event: Push Hook`` or ``Tag Push Hook``
  (``System Hook`` deliveries of push/tag_push work too).
- ``generic``: for CI jobs and scripts. ``X-Gitopsd-Signature:
  sha256=<hex HMAC-SHA256(secret, body)>`` over a JSON body
  ``{"repo": "<url>", "ref": "main" | "refs/heads/main" | "refs/tags/v1",
  "after": "<sha>"}`` (``after`` optional). A bare ref name means a branch.
  Example::

      body='{"repo":"https://git.example.com/org/app.git","ref":"main"}'
      sig=$(printf %s "$body" | openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)
      curl -H "X-Gitopsd-Signature: sha256=$sig" -d "$body" http://gitopsd:8080/hooks/generic

An empty secret disables webhooks: every delivery is refused (401). Neither
the secret nor a received signature ever appears in an error message.

Redeliveries and replays: providers retry a delivery (GitHub's "Redeliver",
GitLab's automatic retries) under the same delivery id, and anyone who
captured a signed delivery can send it again. ``delivery_id`` reads the id
from the headers each provider (or a Gitea/Gogs server speaking GitHub's
protocol) sends; ``RecentDeliveries`` remembers recent ids so the server can
answer a duplicate without acting on it. The id header is not covered by the
signature, so a replay under a fresh id gets through: it costs one fetch and
a reconcile that changes nothing (the daemon counts that, it does not record
it). Scripts calling ``generic`` may send ``X-Gitopsd-Delivery`` (or
``Idempotency-Key``) to get the same protection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROVIDERS = ("github", "gitlab", "generic")

_SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")  # SHA-1 and SHA-256 object names
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
# `[user@]host:path` as git reads it: no slash before the first colon.
_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[^\]]+\]):(?!:)(?P<path>.*)")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ssh": "22", "git+ssh": "22", "git": "9418"}
# Hosts whose owner/repository paths are case-insensitive, so `Org/Repo`
# and `org/repo` are one repository there (not on an arbitrary server).
_CASE_INSENSITIVE_HOSTS = frozenset({"github.com", "gitlab.com"})
# Payload fields holding the repository's URL in its various forms.
_GITHUB_URL_KEYS = ("clone_url", "ssh_url", "git_url", "html_url", "url")
_GITLAB_URL_KEYS = ("git_http_url", "git_ssh_url", "http_url", "ssh_url", "web_url", "url", "homepage")
# Where each sender puts the id of a delivery, the same id on every retry of it.
# GitLab: Idempotency-Key (stable across retries, GitLab >= 17.4) before
# X-Gitlab-Event-UUID (older servers). Gitea and Gogs send their own header
# beside X-GitHub-Delivery; Bitbucket sends X-Request-UUID (never X-Hook-UUID:
# that names the hook, the same for all its deliveries). X-Gitopsd-Delivery:
# a standby replica forwarding a push to the leader, or a script.
DELIVERY_HEADERS = ("X-GitHub-Delivery", "X-Gitea-Delivery", "X-Gogs-Delivery", "Idempotency-Key",
                    "X-Gitlab-Event-UUID", "X-Request-UUID", "X-Gitopsd-Delivery")
MAX_DELIVERY_ID = 200  # characters kept of a delivery id (real ones are 36-character UUIDs)


@dataclass(frozen=True)
class PushEvent:
    """A verified push: which repository, which ref, which commit."""

    provider: str  # "github" | "gitlab" | "generic"
    repo_urls: tuple[str, ...]  # every URL form in the payload, as sent
    ref: str  # full ref, e.g. "refs/heads/main" or "refs/tags/v1"
    branch: str | None  # "main" for refs/heads/main, else None
    tag: str | None  # "v1" for refs/tags/v1, else None
    after: str | None  # the new commit; None when absent or a deletion (all zeros)
    forwarded_by: str | None = None  # set when a standby replica forwarded this push (never forwarded again)
    delivery: str | None = None  # the sender's delivery id (see delivery_id), when it sent one


class WebhookError(Exception):
    """A delivery we do not act on; ``status`` is the HTTP answer.

    401: signature or token missing, malformed or wrong (or webhooks are
    disabled); 400: the payload is not a push we can read; 202: a valid
    delivery of an event we ignore (GitHub ``ping``, issue events, ...).
    ``message`` is safe to send back and to log: it never holds a secret.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- verification --------------------------------------------------------------


def verify(provider: str, body: bytes, headers: Mapping[str, str], secret: bytes) -> None:
    """Check the delivery's credentials the way ``provider`` signs them."""
    if provider == "github":
        verify_github(body=body, headers=headers, secret=secret)
    elif provider == "gitlab":
        verify_gitlab(headers=headers, secret=secret)
    elif provider == "generic":
        verify_generic(body=body, headers=headers, secret=secret)
    else:
        raise ValueError(f"unknown webhook provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def verify_github(body: bytes, headers: Mapping[str, str], secret: bytes) -> None:
    """``X-Hub-Signature-256`` must be ``sha256=`` + hex HMAC-SHA256 of the raw body.

    The body is checked byte for byte as received: re-serialising the JSON
    would change it. Raises ``WebhookError(401)`` when it is missing,
    malformed or wrong.
    """
    _verify_hmac_header(body=body, headers=headers, secret=secret, header="X-Hub-Signature-256")


def verify_gitlab(headers: Mapping[str, str], secret: bytes) -> None:
    """``X-Gitlab-Token`` must equal the secret.

    Both sides are hashed before the constant-time comparison so that not
    even the secret's length leaks through timing.
    """
    _require_secret(secret=secret)
    token = _header(headers=headers, name="X-Gitlab-Token")
    if token is None:
        raise WebhookError(401, "missing X-Gitlab-Token header")
    received = hashlib.sha256(_raw_bytes(value=token)).digest()
    expected = hashlib.sha256(secret).digest()
    if not hmac.compare_digest(received, expected):
        raise WebhookError(401, "X-Gitlab-Token does not match the configured secret")


def verify_generic(body: bytes, headers: Mapping[str, str], secret: bytes) -> None:
    """``X-Gitopsd-Signature`` must be ``sha256=`` + hex HMAC-SHA256 of the raw body.

    The same scheme as GitHub's, under our own header name, so any tool that
    can sign a GitHub-style hook (or ``openssl dgst -hmac``) can call us.
    """
    _verify_hmac_header(body=body, headers=headers, secret=secret, header="X-Gitopsd-Signature")


def _verify_hmac_header(*, body: bytes, headers: Mapping[str, str], secret: bytes, header: str) -> None:
    _require_secret(secret=secret)
    value = _header(headers=headers, name=header)
    if value is None:
        raise WebhookError(401, f"missing {header} header")
    # The format check looks only at what was received, never at the secret,
    # so it leaks nothing; the comparison itself is constant-time.
    match = _SIGNATURE.fullmatch(value.strip())
    if match is None:
        raise WebhookError(401, f"malformed {header} header: expected sha256=<64 hex digits>")
    expected = sign(body, secret=secret).removeprefix("sha256=")
    if not hmac.compare_digest(match.group(1).lower().encode("ascii"), expected.encode("ascii")):
        raise WebhookError(401, f"{header} does not match the body signed with the configured secret")


def sign(body: bytes, *, secret: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 of the body: what these headers carry, and what gitopsd's own
    notifications send (gitopsd.notify), so a receiver checks both with the same code."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _require_secret(*, secret: bytes) -> None:
    """An unset secret turns webhooks off rather than accepting anyone."""
    if not secret:
        raise WebhookError(401, "webhook secret not configured")


def _raw_bytes(*, value: str) -> bytes:
    """The header's bytes as sent: ``http.server`` decodes headers as latin-1."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # a str built in code, not read off the wire
        return value.encode("utf-8")


def _header(*, headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup in an ``HTTPMessage`` or a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


# --- parsing -------------------------------------------------------------------


def parse(provider: str, body: bytes, headers: Mapping[str, str]) -> PushEvent:
    """Read a (verified) delivery into a ``PushEvent``.

    Raises ``WebhookError(202)`` for events that are not pushes and
    ``WebhookError(400)`` for payloads that do not say which repository and
    ref moved. Call only after ``verify``: parsing unauthenticated input
    gains nothing.
    """
    if provider == "github":
        event = _parse_github(body=body, headers=headers)
    elif provider == "gitlab":
        event = _parse_gitlab(body=body, headers=headers)
    elif provider == "generic":
        event = _parse_generic(body=body)
    else:
        raise ValueError(f"unknown webhook provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    delivery = delivery_id(headers)
    return dataclasses.replace(event, delivery=delivery) if delivery else event


def _parse_github(*, body: bytes, headers: Mapping[str, str]) -> PushEvent:
    event = (_header(headers=headers, name="X-GitHub-Event") or "").strip()
    if not event:
        raise WebhookError(400, "missing X-GitHub-Event header")
    if event == "ping":
        raise WebhookError(202, "ping ignored: the webhook is reachable and its signature verified")
    if event != "push":
        raise WebhookError(202, f"GitHub event {event!r} ignored: only push events trigger a sync")
    content_type = (_header(headers=headers, name="Content-Type") or "").lower()
    if content_type.startswith("application/x-www-form-urlencoded"):
        # A hook configured with the form content type: the JSON is in `payload`.
        form = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"))
        if not form.get("payload"):
            raise WebhookError(400, "form-encoded GitHub delivery without a payload field")
        body = form["payload"][0].encode("utf-8")
    payload = _load_json(body=body)
    ref = _ref(payload=payload, key="ref")
    urls = _urls(sources=[payload.get("repository")], keys=_GITHUB_URL_KEYS)
    head = payload.get("head_commit")
    # For an annotated tag `after` is the tag object; head_commit is the commit.
    sha = head.get("id") if isinstance(head, dict) else None
    return _event(provider="github", urls=urls, ref=ref, after=sha or payload.get("after"))


def _parse_gitlab(*, body: bytes, headers: Mapping[str, str]) -> PushEvent:
    event = (_header(headers=headers, name="X-Gitlab-Event") or "").strip()
    if not event:
        raise WebhookError(400, "missing X-Gitlab-Event header")
    if event not in ("Push Hook", "Tag Push Hook", "System Hook"):
        raise WebhookError(202, f"GitLab event {event!r} ignored: only push and tag push events trigger a sync")
    payload = _load_json(body=body)
    kind = payload.get("object_kind") or payload.get("event_name")
    if kind not in ("push", "tag_push"):
        raise WebhookError(202, f"GitLab {event} of kind {kind!r} ignored: only push and tag_push trigger a sync")
    ref = _ref(payload=payload, key="ref")
    urls = _urls(sources=[payload.get("project"), payload.get("repository")], keys=_GITLAB_URL_KEYS)
    # checkout_sha is the commit (after is the tag object for annotated tags).
    return _event(provider="gitlab", urls=urls, ref=ref, after=payload.get("checkout_sha") or payload.get("after"))


def _parse_generic(*, body: bytes) -> PushEvent:
    payload = _load_json(body=body)
    repo = payload.get("repo")
    if not isinstance(repo, str) or not repo.strip():
        raise WebhookError(400, 'generic webhook payload needs "repo": the repository URL as a string')
    ref = _ref(payload=payload, key="ref")
    if not ref.startswith("refs/"):
        if ref == "HEAD":
            raise WebhookError(400, 'generic webhook "ref" must name a branch or tag, not HEAD')
        ref = f"refs/heads/{ref}"  # a bare name is a branch; tags come as refs/tags/<name>
    after = payload.get("after")
    if after is not None and not isinstance(after, str):
        raise WebhookError(400, 'generic webhook "after" must be a commit SHA string')
    # Optional: every URL form of the repository ("repos"), and who forwarded
    # the push (a standby replica handing it to the leader).
    more = [u.strip() for u in payload.get("repos") or [] if isinstance(u, str) and u.strip()]
    urls = [repo.strip()] + [u for u in more if u != repo.strip()]
    forwarded_by = payload.get("forwardedBy")
    event = _event(provider="generic", urls=urls, ref=ref, after=after)
    if isinstance(forwarded_by, str) and forwarded_by:
        event = dataclasses.replace(event, forwarded_by=forwarded_by)
    return event


def _load_json(*, body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WebhookError(400, f"payload is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, "payload must be a JSON object")
    return payload


def _ref(*, payload: dict, key: str) -> str:
    ref = payload.get(key)
    if not isinstance(ref, str) or not ref.strip():
        raise WebhookError(400, f'payload has no "{key}" naming the pushed branch or tag')
    return ref.strip()


def _urls(*, sources: list[object], keys: tuple[str, ...]) -> list[str]:
    """Every non-empty URL string under ``keys`` in ``sources``, in order, once."""
    found: list[str] = []
    for source in sources:
        if not isinstance(source, dict):
            continue
        for key in keys:
            value = source.get(key)
            if isinstance(value, str) and value.strip() and value.strip() not in found:
                found.append(value.strip())
    return found


def _event(*, provider: str, urls: list[str], ref: str, after: object) -> PushEvent:
    if not urls:
        raise WebhookError(400, "payload names no repository URL")
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    tag = ref.removeprefix("refs/tags/") if ref.startswith("refs/tags/") else None
    commit = after if isinstance(after, str) and after.strip("0") else None  # all zeros: ref deleted
    return PushEvent(provider=provider, repo_urls=tuple(urls), ref=ref, branch=branch or None, tag=tag or None,
                     after=commit)


# --- redeliveries ----------------------------------------------------------------


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The sender's id of this delivery (first of ``DELIVERY_HEADERS`` present), or None.

    Trimmed to ``MAX_DELIVERY_ID`` printable characters: it is logged and
    echoed, and it comes from the network.
    """
    for name in DELIVERY_HEADERS:
        value = _header(headers=headers, name=name)
        if value is not None:
            cleaned = "".join(ch for ch in value.strip() if ch.isprintable())[:MAX_DELIVERY_ID]
            if cleaned:
                return cleaned
    return None


def delivery_key(event: PushEvent) -> str | None:
    """What makes two deliveries the same, or None when the sender gave no id.

    The id alone is not enough: GitLab shares X-Gitlab-Event-UUID between
    the hooks fired by one request (a branch and a tag pushed together), so
    the pushed ref and commit are part of the key. The provider is not: a
    push forwarded by a standby arrives as ``generic`` with the same id,
    ref and commit, and is the same delivery.
    """
    if not event.delivery:
        return None
    return hashlib.sha256("\0".join((event.delivery, event.ref, event.after or "")).encode()).hexdigest()


class RecentDeliveries:
    """The delivery keys seen within ``ttl`` seconds, at most ``max_entries`` of them.

    A bounded memory: the oldest key goes first when full, so a flood of
    fresh ids costs a fixed amount of memory and only shortens how far back
    duplicates are recognised. Thread-safe (the HTTP server calls it from
    one thread per request). ``claim`` is the only test-and-set: two copies
    of one delivery arriving at once are one first and one duplicate.
    """

    def __init__(self, *, ttl: float = 3600.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # key -> when claimed, oldest first
        self._lock = threading.Lock()

    def claim(self, key: str) -> bool:
        """True the first time ``key`` is seen within ``ttl``; False for a duplicate."""
        now = self._clock()
        with self._lock:
            while self._seen:
                oldest, when = next(iter(self._seen.items()))
                if now - when < self.ttl and len(self._seen) < self.max_entries:
                    break
                del self._seen[oldest]
            if key in self._seen:
                return False
            self._seen[key] = now
            return True

    def release(self, key: str) -> None:
        """Forget ``key``: the delivery was not acted on, so its retry must be."""
        with self._lock:
            self._seen.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


# --- matching ------------------------------------------------------------------


def normalize_repo_url(url: str) -> str:
    """A credential-free canonical form under which one repository compares equal.

    ``https://github.com/Org/Repo.git``, ``git@github.com:Org/Repo.git`` and
    ``ssh://git@github.com/org/repo`` all become ``github.com/org/repo``:
    scheme, userinfo, query and default ports are dropped (a non-default
    port is kept: it may be another server), the host is lowercased, and a
    trailing ``.git`` or ``/`` is removed. Path case is kept except on
    github.com and gitlab.com, which ignore it. ``file://`` URLs and local
    paths become ``file:`` + the resolved absolute path, so ``/srv/x.git``
    and ``file:///srv/x`` are one repository. An empty URL gives ``""``,
    which matches nothing.

    A string of the form ``host:path`` is read as scp-like ssh unless a local
    path of that name exists, exactly as the source stage reads it.
    """
    url = url.strip()
    if not url:
        return ""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "file":
            return _local(path=urllib.parse.unquote(parts.path))
        host, port = _split_host_port(authority=parts.netloc.rpartition("@")[2])
        if port == _DEFAULT_PORTS.get(scheme):
            port = ""
        path = urllib.parse.unquote(parts.path)
    else:
        match = _SCP_LIKE.fullmatch(url)
        if match is None or Path(url).exists():
            return _local(path=url)
        host, port, path = match.group("host"), "", match.group("path")
    host = host.lower()
    # `host:org/repo` (scp) and `ssh://host/org/repo` name the same path.
    path = _strip_suffixes(path=path).lstrip("/")
    if host in _CASE_INSENSITIVE_HOSTS:
        path = path.lower()
    return f"{host}:{port}/{path}" if port else f"{host}/{path}"


def _split_host_port(*, authority: str) -> tuple[str, str]:
    if authority.startswith("["):  # [IPv6]:port
        host, _, rest = authority.partition("]")
        return host + "]", rest.removeprefix(":")
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return authority, ""


def _local(*, path: str) -> str:
    resolved = str(Path(path).expanduser().resolve())
    return "file:" + (_strip_suffixes(path=resolved) or "/")


def _strip_suffixes(*, path: str) -> str:
    """Drop trailing ``/`` and ``.git`` (``x.git/``, ``x/.git`` → ``x``)."""
    while True:
        stripped = path.rstrip("/").removesuffix(".git")
        if stripped == path:
            return path
        path = stripped


def matches(app_repo: str, app_ref: str, event: PushEvent) -> bool:
    """Does ``event`` move the ref that an app following (``app_repo``, ``app_ref``) tracks?

    The repository must equal one of the payload's URL forms after
    ``normalize_repo_url``. The ref matches when it names the pushed branch
    or tag, short (``main``, ``v1``) or full (``refs/heads/main``). A
    40/64-hex commit SHA never matches: a pinned commit cannot move. ``HEAD``
    matches any branch push: the payload cannot tell us reliably which
    branch is the default at fetch time, and one needless fetch is cheaper
    than a missed update. Tag pushes do not match ``HEAD``.
    """
    wanted = normalize_repo_url(url=app_repo)
    if not wanted or wanted not in {normalize_repo_url(url=u) for u in event.repo_urls}:
        return False
    if _SHA.fullmatch(app_ref):
        return False
    if app_ref == "HEAD":
        return event.branch is not None
    names = {event.ref}
    if event.branch:
        names |= {event.branch, f"refs/heads/{event.branch}"}
    if event.tag:
        names |= {event.tag, f"refs/tags/{event.tag}"}
    return app_ref in names
