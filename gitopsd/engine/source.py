"""Source stage: turn (repository URL, ref) into a commit and a directory
holding that commit's tree.

One bare repository per remote is cached under ``cache_dir``; the first call
initialises it, every later call fetches into it (shallow where the remote
allows), so polling a big repository every minute costs one ``ls-remote`` and
a small pack, never a clone; a push (``moved``) costs the fetch alone — one
git session against the remote. Trees are materialised once per commit into
``checkouts/<sha>/`` and shared by every caller that asks for that commit.

Secrets never touch disk, argv or logs: an https token reaches git only via
environment-scoped config (``GIT_CONFIG_COUNT``/``KEY``/``VALUE``) as an
``Authorization`` header; an ssh key is named by path on ``GIT_SSH_COMMAND``.
The cache key, ``Revision.url`` and every error message use the URL with its
credentials removed, and quoted git output is scrubbed of the token.

Concurrent fetches of one repository are serialised: in this process by a
lock per cache directory (waited on, never polled), across processes by a
blocking flock on the cache's lock file. Sharing one fetch between the apps of
a repository is gitopsd.engine.source_share's job; this module fetches when
asked.

Transport (ls-remote, fetch, checkout) drives the ``git`` CLI directly, because
one runner then owns the three things that matter there: the scoped environment, killing the
whole process group on timeout (git's helpers — ``ssh``,
``git-remote-https`` — would otherwise outlive it and hold the pipes), and
scrubbing what git printed before it reaches an error. Reading a fetched
commit's metadata is local and credential-free (one ``git log``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from gitopsd.errors import SourceError

if TYPE_CHECKING:
    from gitopsd.engine.signature import Signature

#: How many materialised commits to keep per repository. A caller reading a
#: checkout keeps it safe until this many newer ones have been made.
KEEP_CHECKOUTS = 5

#: Transports git may use at all: no ``ext::`` (runs commands), no ``fd::``.
_ALLOWED_PROTOCOLS = "file:git:http:https:ssh"

_DEFAULT_HTTPS_USERNAME = "x-access-token"

_HEX = re.compile(r"[0-9a-f]{4,40}")
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
# `user@host:path` — a colon before the first slash; git's own rule.
_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[^\]]+\]):(?!:)(?P<path>.*)")

# Environment that would redirect, trace or pre-configure git behind our back.
_SCRUBBED_ENV = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_NAMESPACE",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_ASKPASS", "SSH_ASKPASS",
    "GIT_CURL_VERBOSE", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_CONFIG_PARAMETERS",
)


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to the remote; all optional.

    ``token`` is the https password or access token. When only a token is
    given, the username defaults to ``x-access-token`` (GitHub's convention;
    GitLab and Gitea accept any username with a token).
    """

    username: str | None = None
    token: str | None = None
    ssh_key_file: Path | None = None
    known_hosts_file: Path | None = None
    ca_file: Path | None = None  # the CA bundle an https remote's certificate must chain to, instead of the system's

    def __repr__(self) -> str:
        # A dataclass repr would print the token into any log or traceback.
        token = "***" if self.token else None
        return (
            f"Credentials(username={self.username!r}, token={token!r}, "
            f"ssh_key_file={self.ssh_key_file!r}, known_hosts_file={self.known_hosts_file!r}, "
            f"ca_file={self.ca_file!r})"
        )


@dataclass(frozen=True)
class Revision:
    """The commit a fetch resolved to, as the audit trail records it."""

    url: str
    ref: str
    sha: str
    author: str
    committer: str
    message: str
    time: datetime
    signature: Signature | None = None   # its verdict, for an app that verifies signatures (gitopsd.engine.signature)


@dataclass(frozen=True)
class Checkout:
    """A commit and a directory holding its tree.

    ``path`` is shared with other callers of the same commit: read it, never
    write to it. It survives until ``KEEP_CHECKOUTS`` newer commits of the same
    repository have been checked out.
    """

    revision: Revision
    path: Path
    git_dir: Path | None = None  # the cached bare repository holding the commit (see describe)


def fetch(
    url: str,
    ref: str = "HEAD",
    *,
    cache_dir: Path,
    credentials: Credentials | None = None,
    timeout: float = 120.0,
    moved: bool = False,
) -> Checkout:
    """Resolve ``ref`` in the repository at ``url`` and check its commit out.

    ``url`` is ``file://``, a local path, ``http(s)://``, ``ssh://`` or
    scp-like ``user@host:path``. Credentials embedded in an http(s) URL are
    used when ``credentials`` is None, and removed from the URL either way.

    ``ref`` is a branch, a tag (peeled to its commit), a full or abbreviated
    commit SHA, or ``HEAD`` (the remote's default branch). A name that is both
    a tag and a branch means the tag, as in git. A full SHA already in the
    cache needs no network at all (commits are immutable); other refs cost
    one ``ls-remote`` and, when the commit is new, one shallow fetch (with
    ``moved``, see below, the fetch alone). A SHA
    that no branch or tag points at is fetched directly, and when the remote
    refuses that, by a full fetch of its branches and tags (abbreviated SHAs
    always take that route: a remote cannot be asked for a prefix).

    ``moved`` says the caller knows the ref has moved (a push webhook named
    a new commit): a ``ls-remote`` would only confirm it, so a ref the cache
    last resolved as a branch (or ``HEAD``, or a full ``refs/...`` name) is
    fetched directly, in one session against the remote, and the new commit
    read from the local ref. Only the ``ls-remote`` route decides between a
    tag and a branch: a ref the cache has as a tag, or has never resolved,
    takes it; so does a branch the remote no longer has (then "no such
    ref", or the tag that now bears its name). A tag created with the name
    of a branch an app follows wins from the next fetch without ``moved``
    (the repository's poll). Without ``moved`` a poll that finds nothing
    new costs one ``ls-remote``, the cheapest look at a remote: a fetch
    that brings nothing costs several times more.

    ``timeout`` bounds the whole call, including waiting for another fetch of
    the same repository to finish; a git process still running at the end is
    killed with everything it started.

    Concurrent calls for the same URL, from threads or processes sharing
    ``cache_dir``, are serialised (see the module docstring); different URLs
    proceed in parallel.

    Raises SourceError when the remote is unreachable, refuses the
    credentials or the ssh host key, has no such ref, or the timeout expires.
    """
    remote = _Remote.parse(url=url, credentials=credentials)
    _check_ref(ref=ref, remote=remote)
    _check_credential_files(remote=remote)
    git = _Git(remote=remote, ref=ref, deadline=time.monotonic() + timeout, timeout=timeout)
    home = Path(cache_dir) / _cache_key(url=remote.url)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(
            f"cannot create the git cache for {remote.url} in {cache_dir}: {exc.strerror}",
            hint="cache_dir must be a writable directory (an emptyDir volume in the cluster)",
        ) from None
    try:
        with _locked(home / "lock", git=git):
            repo = _ensure_repo(home=home, git=git)
            rev = (_fetch_moved(repo=repo, git=git) if moved else None) or _resolve(repo=repo, git=git)
            revision = _read_revision(repo=repo, rev=rev, git=git)
            path = _materialise(repo=repo, checkouts=home / "checkouts", sha=revision.sha, git=git)
            _collect_garbage(checkouts=home / "checkouts", keep=KEEP_CHECKOUTS, current=revision.sha)
    except OSError as exc:
        # A full, read-only or tampered-with cache (a file where a directory
        # belongs): the user's problem to fix, not a crash of ours.
        if not str(exc.filename or "").startswith(str(home)):
            raise
        raise SourceError(
            f"the git cache for {remote.url} is not usable: {exc.strerror}: {exc.filename}",
            hint=f"cache_dir must be a writable directory with free space; {home} holds only a cache "
            "and may be removed (the next fetch re-creates it)",
        ) from None
    return Checkout(revision=revision, path=path, git_dir=home / "repo.git")


def describe(checkout: Checkout, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, str] | None:
    """What each repo-relative path is in the checkout's commit, from the cached repository.

    ``"<mode> <type> <object id>"`` as git's trees record it (mode 120000 is
    a symlink, whose blob is its target's name) or ``"missing"``; ``"."`` is
    the commit's root tree. Symlinks are not followed: a path that runs
    through one is ``missing``. Object ids are content hashes, so two commits
    that give a path the same description give it the same content.

    Local and cheap: a path is looked up tree by tree from the root, and each
    tree's listing (one ``git ls-tree``) is kept, keyed by its id — immutable,
    so never stale. Fifty apps under one directory cost a few listings per
    commit, not fifty calls. None when it cannot be answered (no cached
    repository, git failing): callers treat that as "unknown", never as
    "unchanged".
    """
    if checkout.git_dir is None:
        return None
    trees = _Trees(git_dir=checkout.git_dir, timeout=timeout)
    root = trees.root(checkout.revision.sha)
    if root is None:
        return None
    out: dict[str, str] = {}
    for path in paths:
        found = trees.lookup(root, path)
        if found is None:
            return None
        out[path] = found
    return out


def commit_object(checkout: Checkout, sha: str, *, timeout: float = 30.0) -> bytes:
    """The raw commit object `sha` (`git cat-file commit`) from the checkout's cached repository: what a
    signature is checked against, byte for byte. Local and cheap. Raises SourceError when it cannot be read."""
    if checkout.git_dir is None or not _FULL_SHA.fullmatch(sha):
        raise SourceError(f"commit {sha[:12]} of {checkout.revision.url} cannot be read: no cached repository")
    out = _Trees(git_dir=checkout.git_dir, timeout=timeout)._git("cat-file", "commit", sha)
    if out is None:
        raise SourceError(f"commit {sha[:12]} of {checkout.revision.url} cannot be read from the git cache",
                          hint="the cache may have been removed meanwhile; the next fetch re-creates it")
    return out.encode("utf-8", "surrogateescape")


def changed_paths(checkout: Checkout, *, since: str, timeout: float = 30.0) -> frozenset[str] | None:
    """The repo-relative paths whose entry differs between commit ``since`` and the checkout's commit.

    Leaves, as ``git diff-tree -r --no-renames`` names them: files, symlinks
    and submodules, never a directory. So a rename names both paths, a
    deletion the path deleted, a type change (a file become a symlink) its
    path, and a directory replaced by a file or a link names that path and
    every file it held. Empty when the two commits have the same tree.

    Local and cheap (one ``git diff-tree`` in the cached repository, kept by
    the pair of commits: the apps woken by one push ask for the same pair,
    and one of them runs git). None when it cannot be answered — no cached
    repository, ``since`` not in it (gone from a shallow cache), git failing:
    callers treat that as "anything may have changed".
    """
    sha = checkout.revision.sha
    if checkout.git_dir is None or not (_FULL_SHA.fullmatch(since) and _FULL_SHA.fullmatch(sha)):
        return None
    trees = _Trees(git_dir=checkout.git_dir, timeout=timeout)

    def read() -> frozenset[str] | None:
        out = trees._git("diff-tree", "-r", "-z", "--no-renames", "--name-only", "--no-commit-id", since, sha)
        return None if out is None else frozenset(p for p in out.split("\0") if p)

    return trees._once("diff", f"{since}..{sha}", read)


#: Tree listings and diffs kept (by git_dir and object ids); a listing of a big directory is a few kB.
KEEP_TREE_LISTINGS = 4096


class _Trees:
    """Tree lookups (and diffs) in one cached repository, through a process-wide memo of listings.

    Single flight: the apps woken by one push all look at the same new root
    tree at once; one of them lists it, the others wait for that listing.
    """

    _memo: OrderedDict[tuple[Path, str, str], dict[str, str] | frozenset[str] | str] = OrderedDict()
    _running: dict[tuple[Path, str, str], threading.Event] = {}
    _lock = threading.Lock()

    def __init__(self, *, git_dir: Path, timeout: float) -> None:
        self.git_dir = git_dir
        self.timeout = timeout

    def root(self, sha: str) -> str | None:
        """The commit's root tree id."""
        def read() -> str | None:
            out = self._git("rev-parse", "--verify", "--end-of-options", f"{sha}^{{tree}}")
            return out.strip() if out is not None and _FULL_SHA.fullmatch(out.strip()) else None

        return self._once("root", sha, read)

    def lookup(self, root: str, path: str) -> str | None:
        """``"<mode> <type> <id>"`` of ``path`` below the tree ``root``, ``"missing"``, or None (git failed)."""
        entry = f"040000 tree {root}"
        for part in ([] if path in ("", ".") else path.split("/")):
            mode, kind, oid = entry.split(" ")
            if kind != "tree":
                return "missing"
            listing = self.listing(oid)
            if listing is None:
                return None
            if part not in listing:
                return "missing"
            entry = listing[part]
        return entry

    def listing(self, tree: str) -> dict[str, str] | None:
        """name -> "<mode> <type> <id>" of the entries of one tree."""
        def read() -> dict[str, str] | None:
            out = self._git("ls-tree", "-z", "--end-of-options", tree)
            if out is None:
                return None
            entries = (record.partition("\t") for record in out.split("\0"))
            return {name: meta for meta, tab, name in entries if tab}

        return self._once("tree", tree, read)

    @classmethod
    def remember_diff(cls, *, git_dir: Path, since: str, sha: str, paths: frozenset[str]) -> None:
        """Keep what a diff-tree run elsewhere (a patched checkout's) found, for changed_paths to reuse."""
        with cls._lock:
            cls._memo[(git_dir, "diff", f"{since}..{sha}")] = paths
            while len(cls._memo) > KEEP_TREE_LISTINGS:
                cls._memo.popitem(last=False)

    def _once(self, what: str, oid: str, read):
        """The memoised answer for (this repository, what, oid), read by one caller at a time."""
        key = (self.git_dir, what, oid)
        while True:
            with self._lock:
                if key in self._memo:
                    self._memo.move_to_end(key)
                    return self._memo[key]
                running = self._running.get(key)
                if running is None:
                    self._running[key] = threading.Event()
                    break
            running.wait(self.timeout)
        value = None
        try:
            value = read()
        finally:
            with self._lock:
                if value is not None:   # a failure is not remembered: the next caller tries again
                    self._memo[key] = value
                    while len(self._memo) > KEEP_TREE_LISTINGS:
                        self._memo.popitem(last=False)
                self._running.pop(key).set()
        return value

    def _git(self, *args: str) -> str | None:
        env = _Remote(url=str(self.git_dir), kind="local", credentials=Credentials()).environment()
        try:
            proc = subprocess.run(["git", "--git-dir", str(self.git_dir), *args], capture_output=True, env=env,
                                  timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.decode("utf-8", "surrogateescape") if proc.returncode == 0 else None


def split_credentials(url: str, *, credentials: Credentials | None) -> tuple[str, Credentials]:
    """(the URL as fetch uses and reports it, without credentials; the credentials it would use).

    The credentials are ``credentials`` or, when None, those embedded in an
    http(s) URL. Raises SourceError for a URL fetch would refuse.
    """
    remote = _Remote.parse(url=url, credentials=credentials)
    return remote.url, remote.credentials


# --- the remote: what to tell git, what to show humans ------------------------


@dataclass(frozen=True)
class _Remote:
    """A remote split into the credential-free URL and the secrets."""

    url: str  # credential-free; what git is given and what humans see
    kind: str  # "local" | "http" | "ssh" | "git"
    credentials: Credentials

    @classmethod
    def parse(cls, *, url: str, credentials: Credentials | None) -> _Remote:
        """Classify ``url`` and move any http(s) userinfo into credentials.

        An ssh username stays in the URL: it picks the account, it is no
        secret, and removing it would log in as the daemon's local user. An
        ssh password is dropped (we never use passwords over ssh).
        """
        url = url.strip()
        if not url or url.startswith("-"):
            raise SourceError(
                f"invalid repository URL {_strip_userinfo(url=url)!r}",
                hint="use https://, ssh://, git@host:path, file:// or a local path",
            )
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*::", url):  # git's `<transport>::<address>`
            raise SourceError(
                f"unsupported repository URL {_strip_userinfo(url=url)!r}: remote helpers are not allowed",
                hint="use https://, ssh://, git@host:path, file:// or a local path",
            )
        creds = credentials or Credentials()
        if "://" in url:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            kinds = {"http": "http", "https": "http", "ssh": "ssh", "git+ssh": "ssh", "file": "local", "git": "git"}
            if scheme not in kinds:
                raise SourceError(
                    f"unsupported repository URL scheme {scheme!r} in {_strip_userinfo(url=url)}",
                    hint="use https://, ssh://, git@host:path, file:// or a local path",
                )
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user, has_password, password = userinfo.partition(":")
            user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
            kind = kinds[scheme]
            if kind == "http":
                netloc = hostport
                if credentials is None and (user or has_password):
                    creds = Credentials(username=user or None, token=password or None)
            elif kind == "ssh" and user:
                netloc = f"{urllib.parse.quote(user, safe='')}@{hostport}"
            else:
                netloc = hostport
            clean = urllib.parse.urlunsplit((scheme, netloc, parts.path, parts.query, ""))
            return cls(url=clean, kind=kind, credentials=creds)
        match = _SCP_LIKE.fullmatch(url)
        if match and not Path(url).exists():
            return cls(url=url, kind="ssh", credentials=creds)
        return cls(url=str(Path(url).expanduser().resolve()), kind="local", credentials=creds)

    @property
    def host(self) -> str:
        """Host (and port) for messages about ssh host keys."""
        if "://" in self.url:
            return urllib.parse.urlsplit(self.url).netloc.rpartition("@")[2]
        match = _SCP_LIKE.fullmatch(self.url)
        return match.group("host") if match else self.url

    def secrets(self) -> list[str]:
        """Every form in which the token could show up in git's output."""
        token = self.credentials.token
        if not token:
            return []
        pair = f"{self._username()}:{token}"
        return [_basic(pair=pair), pair, urllib.parse.quote(token, safe=""), token]

    def _username(self) -> str:
        return self.credentials.username or _DEFAULT_HTTPS_USERNAME

    def environment(self) -> dict[str, str]:
        """The process environment for git talking to this remote.

        Secrets go in as environment-scoped git config, which git reads like
        ``-c`` but which is not visible in ``ps`` and never written to any
        config file.
        """
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV and not k.startswith("GIT_TRACE")}
        env.update(
            GIT_TERMINAL_PROMPT="0",  # never wait for a password on a terminal
            GIT_ALLOW_PROTOCOL=_ALLOWED_PROTOCOLS,
            GCM_INTERACTIVE="never",
            LC_ALL="C",  # we match git's English messages
            LANGUAGE="C",
        )
        config = [
            # An empty helper resets the list: no system or user credential
            # helper may answer (or prompt) in place of the given credentials.
            ("credential.helper", ""),
            # Auto-gc must run inside our lock, not detached behind it.
            ("gc.autoDetach", "false"),
            ("maintenance.autoDetach", "false"),
        ]
        creds = self.credentials
        if self.kind == "http" and creds.token:
            basic = _basic(pair=f"{self._username()}:{creds.token}")
            config.append(("http.extraHeader", f"Authorization: Basic {basic}"))
        first = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        for i, (key, value) in enumerate(config, start=first):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        env["GIT_CONFIG_COUNT"] = str(first + len(config))
        if self.kind == "http" and creds.ca_file is not None:
            # Only the given CAs are trusted (as with known_hosts), not the system's bundle. The
            # variable, not http.sslCAInfo: git lets a GIT_SSL_CAINFO in the environment win over config.
            env["GIT_SSL_CAINFO"] = str(creds.ca_file)
            env.pop("GIT_SSL_CAPATH", None)
        if self.kind == "ssh":
            ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
            if creds.ssh_key_file is not None:
                ssh += ["-i", str(creds.ssh_key_file), "-o", "IdentitiesOnly=yes"]
            if creds.known_hosts_file is not None:
                # Only the given file is trusted, not whatever the image ships.
                # Quoted for ssh itself: this option takes a list of paths.
                known = f'"{creds.known_hosts_file}"'
                ssh += ["-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"]
            env["GIT_SSH_COMMAND"] = shlex.join(ssh)
        return env


def _basic(*, pair: str) -> str:
    return base64.b64encode(pair.encode()).decode("ascii")


def _strip_userinfo(*, url: str) -> str:
    """``url`` without ``user:password@``, for messages about URLs we reject."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"


def _check_ref(*, ref: str, remote: _Remote) -> None:
    """Refuse refs that git would read as options or revision syntax.

    Only names and hex SHAs reach git; `main~1`, `HEAD@{2}` or `-x` would
    mean something else than "a branch, tag or commit".
    """
    bad = (
        not ref
        or ref.startswith(("-", "/"))
        or ref.endswith(("/", ".lock", "."))
        or any(c in ref for c in " ~^:?*[\\\t\n\r\x7f")
        or ".." in ref
        or "@{" in ref
        or any(ord(c) < 0x20 for c in ref)
    )
    if bad:
        raise SourceError(
            f"invalid ref {ref!r} for {remote.url}",
            hint="use a branch name, a tag name, a commit SHA or HEAD",
        )


def _check_credential_files(*, remote: _Remote) -> None:
    """Fail early and clearly on a missing key file: ssh would only say
    "Permission denied", hiding that the file was never there."""
    cred = remote.credentials
    for label, path in (("ssh key file", cred.ssh_key_file), ("known_hosts file", cred.known_hosts_file)):
        if path is not None and not Path(path).is_file():
            raise SourceError(
                f"the {label} {path} for {remote.url} does not exist",
                hint="mount the secret holding it and point the credentials at the mounted file",
            )


def _cache_key(*, url: str) -> str:
    """A directory name for this remote: readable slug plus a hash.

    The hash alone makes it unique; the slug lets a human find a repository's
    cache with `ls`.
    """
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-.")[-48:].strip("-.")
    return f"{slug}-{digest}" if slug else digest


# --- running git ---------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str  # already scrubbed of secrets


#: The longest a wait on git goes without looking for a signal (Ctrl-C delivered to another thread
#: wakes no blocked syscall of the main one; each slice ends in Python, where the signal is seen).
WAIT_SLICE = 1.0


def _communicate(proc: subprocess.Popen, *, deadline: float) -> tuple[bytes, bytes]:
    """proc.communicate() until ``deadline`` (TimeoutExpired after it), in slices of WAIT_SLICE."""
    while True:
        left = deadline - time.monotonic()
        try:
            return proc.communicate(timeout=max(0.0, min(left, WAIT_SLICE)))
        except subprocess.TimeoutExpired:
            if left <= WAIT_SLICE:
                raise


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill git's process group (ssh, git-remote-https and the like with it) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=5)


@dataclass(frozen=True)
class _Git:
    """Runs git for one fetch() call: its remote, its ref, its deadline."""

    remote: _Remote
    ref: str
    deadline: float
    timeout: float

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self, *, args: Sequence[str], repo: Path | None, env: dict[str, str] | None = None, check: bool = True
    ) -> _Result:
        """Run ``git args`` (in ``repo`` when given) within the deadline.

        With ``check`` a non-zero exit becomes a classified SourceError;
        without it the caller decides. Output is decoded leniently: commit
        messages and paths are not guaranteed UTF-8.
        """
        left = self.remaining()
        if left <= 0:
            raise self.timed_out()
        full_env = self.remote.environment()
        full_env.update(env or {})
        argv = ["git", *(["--git-dir", str(repo)] if repo is not None else []), *args]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            # Own process group, so a timeout kills ssh / remote-https too.
            start_new_session=True,
        )
        try:
            out, err = _communicate(proc, deadline=time.monotonic() + left)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise self.timed_out() from None
        except BaseException:
            _kill_group(proc)   # Ctrl-C, a stop: git and what it started go too, not left to hang
            raise
        result = _Result(proc.returncode, out.decode("utf-8", "replace"), self.scrub(err.decode("utf-8", "replace")))
        if check and result.returncode != 0:
            raise self.failed(verb=args[0], stderr=result.stderr)
        return result

    def scrub(self, text: str) -> str:
        for secret in self.remote.secrets():
            text = text.replace(secret, "***")
        return text

    # --- errors: every one names the URL and the ref, and hints at a fix -----

    def timed_out(self) -> SourceError:
        return SourceError(
            f"fetching ref {self.ref!r} from {self.remote.url} timed out after {self.timeout:g}s",
            hint="the remote is slow or unreachable (or another fetch of it holds the cache); "
            "check the network, or raise the timeout for big repositories",
        )

    def unknown_ref(self) -> SourceError:
        return SourceError(
            f"ref {self.ref!r} not found in {self.remote.url}: no such branch, tag or commit",
            hint="check the spelling; a commit (all 40 hex digits) must be reachable from a branch or tag "
            "of the remote",
        )

    def abbreviated_sha(self) -> SourceError:
        return SourceError(
            f"ref {self.ref!r} is no branch or tag of {self.remote.url}, and an abbreviated commit SHA is "
            "not followed",
            hint="pin a commit by all 40 hex digits (git rev-parse <sha>): gitopsd fetches only the ref it is "
            "given, and finding a prefix would fetch every branch and tag of the remote",
        )

    def failed(self, *, verb: str, stderr: str) -> SourceError:
        """Turn git's complaint into a message a user can act on."""
        url, ref, kind = self.remote.url, self.ref, self.remote.kind
        detail = _summary(stderr=stderr)
        low = stderr.lower()
        if any(sign in low for sign in _HOST_KEY_SIGNS):
            return SourceError(
                f"the ssh host key of {self.remote.host} could not be verified while fetching ref {ref!r} "
                f"from {url}: {detail}",
                hint="put the host's public key (verified out of band, e.g. from the provider's docs) "
                "in the known_hosts file given as known_hosts_file",
            )
        if any(sign in low for sign in _TLS_SIGNS):
            given = self.remote.credentials.ca_file
            return SourceError(
                f"the TLS certificate of {self.remote.host} could not be verified while fetching ref {ref!r} "
                f"from {url}: {detail}",
                hint=(f"the server's certificate does not chain to the CA bundle given ({given.name}): "
                      "check that it holds the CA that signed the server's certificate" if given else
                      "a server whose certificate a private CA signed needs that CA: put it in the "
                      "credentials Secret as ca.crt (or give credentials.caFile)"),
            )
        if any(sign in low for sign in _AUTH_SIGNS):
            if kind == "ssh":
                hint = "check that the ssh key (ssh_key_file) may read the repository, e.g. as a deploy key"
                if "unprotected private key file" in low:
                    hint = "ssh refuses a private key readable by others: make the key file mode 0400 or 0600"
            elif self.remote.credentials.token:
                hint = "check the token and username: the token may be wrong, expired or lack read access"
            else:
                hint = "the remote needs credentials: give a token (https) or an ssh key"
            if "could not read username" in low or "terminal prompts disabled" in low:
                detail = "the server refused the request (HTTP 401) and no other credentials are configured"
            return SourceError(f"authentication to {url} failed while fetching ref {ref!r}: {detail}", hint=hint)
        if "couldn't find remote ref" in low:
            return self.unknown_ref()
        if any(sign in low for sign in _UNREACHABLE_SIGNS):
            return SourceError(
                f"cannot reach {url} (fetching ref {ref!r}): {detail}",
                hint="check the URL, that the repository exists (a private one may look missing without "
                "credentials), and that the host is reachable from gitopsd",
            )
        return SourceError(
            f"git {verb} failed for {url} (ref {ref!r}): {detail}",
            hint="run the same git command by hand against the remote to see more",
        )


# What git, curl and ssh print (with LC_ALL=C) for each kind of failure.
_HOST_KEY_SIGNS = ("host key verification failed", "remote host identification has changed", "host key is known")
_AUTH_SIGNS = (
    "authentication failed", "could not read username", "could not read password", "terminal prompts disabled",
    "permission denied (publickey", "returned error: 401", "returned error: 403", "invalid username or password",
    "unprotected private key file", "access denied",
)
_UNREACHABLE_SIGNS = (
    "does not appear to be a git repository", " not found", "returned error: 404", "no such file or directory",
    "not a git repository", "could not resolve host", "could not resolve hostname", "connection refused",
    "failed to connect", "couldn't connect", "connection timed out", "network is unreachable", "no route to host",
    "could not read from remote repository", "connection reset", "connection closed", "empty reply from server",
)
# curl with OpenSSL says the first; with GnuTLS (Debian's git) the second; the last two: a bundle curl cannot read.
_TLS_SIGNS = ("ssl certificate problem", "server certificate verification failed", "certificate verify failed",
              "error setting certificate", "problem with the ssl ca cert")


def _summary(*, stderr: str) -> str:
    """The informative part of git's stderr, on one line.

    git and ssh wrap the cause in banners and generic advice ("Please make
    sure you have the correct access rights", "@@@ WARNING @@@", how to
    remove a known_hosts line); a user needs the cause, not the padding.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith(_NOISE)]
    specific = [line for line in useful if line.lower() != "fatal: could not read from remote repository."]
    chosen = list(dict.fromkeys(specific or useful or lines))[:3]
    return "; ".join(chosen) or "no output from git"


_NOISE = (
    "@", "please make sure", "and the repository exists", "it is also possible", "it is possible that",
    "someone could be", "please contact", "add correct host key", "remove with", "ssh-keygen -f",
    "it is required that", "this private key will be ignored", "the fingerprint for", "sha256:", "offending",
)


# --- the cache -----------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, *, git: _Git) -> Iterator[None]:
    """Hold the cache at ``path`` exclusively, within the call's deadline.

    Threads of this process queue on a lock per cache (an in-process wait,
    with the deadline as its timeout); the one holding it then takes an
    flock on ``path`` against other processes sharing the cache directory.
    Nothing polls: a thread that has to wait sleeps until the lock is free.
    """
    in_process = _process_lock(path)
    if not in_process.acquire(timeout=max(0.0, git.remaining())):
        raise git.timed_out()
    try:
        with open(path, "a+b") as handle:
            _flock(handle.fileno(), git=git)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        in_process.release()


_PROCESS_LOCKS: dict[Path, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    """The in-process lock of one cache (one per repository; never removed: a few bytes each)."""
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(path, threading.Lock())


def _flock(fd: int, *, git: _Git) -> None:
    """An exclusive flock on ``fd`` before the deadline, or SourceError.

    Free (the usual case): taken at once. Held by another process: a helper
    thread blocks in flock on a duplicate of ``fd`` (it shares the open file,
    hence the lock) while this thread waits with the deadline. A helper that
    gets the lock after the caller gave up closes its duplicate, which
    releases it, as the caller has closed the file by then.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    dup = os.dup(fd)
    got = threading.Event()
    guard = threading.Lock()
    abandoned = False

    def wait() -> None:
        try:
            fcntl.flock(dup, fcntl.LOCK_EX)
            with guard:
                if not abandoned:
                    got.set()
        finally:
            os.close(dup)

    threading.Thread(target=wait, name="git-cache-flock", daemon=True).start()
    if got.wait(max(0.0, git.remaining())):
        return
    with guard:
        if got.is_set():
            return
        abandoned = True
    raise git.timed_out()


def _ensure_repo(*, home: Path, git: _Git) -> Path:
    """The cached bare repository, created on first use.

    Created in a temp dir and renamed, so a crash never leaves a half-made
    repository that later calls would trip over. It has no remote configured:
    each fetch names the URL, so nothing about the remote (let alone a
    credential) is stored in its config.
    """
    repo = home / "repo.git"
    if (repo / "HEAD").is_file():
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=home))
    try:
        git.run(args=["init", "--quiet", "--bare", str(tmp)], repo=None)
        os.rename(tmp, repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (home / "url").write_text(git.remote.url + "\n")  # for humans browsing the cache
    return repo


def _resolve(*, repo: Path, git: _Git) -> str:
    """A name for the commit ``git.ref`` names (its SHA, or that of a tag of it), fetched into ``repo``."""
    ref = git.ref
    if _FULL_SHA.fullmatch(ref):
        cached = _local_commit(repo=repo, rev=ref, git=git)
        if cached:
            return cached
    found = _ls_remote(repo=repo, git=git)
    if found is not None:
        refname, sha = found
        cached = _local_commit(repo=repo, rev=sha, git=git)
        if cached:
            return cached
        # HEAD is symbolic on the remote; park it under our own name.
        target = "refs/gitopsd/HEAD" if refname == "HEAD" else refname
        _fetch(repo=repo, git=git, refspecs=[f"+{refname}:{target}"], depth=1)
        return sha   # a commit or a tag of one: _read_revision peels it, or says it is neither
    if not _FULL_SHA.fullmatch(ref):
        # Only the configured ref is fetched: finding an abbreviated SHA would
        # take every branch and tag of the remote (anyone's pushed work), and a
        # prefix is no name for a commit one reviewed.
        raise git.abbreviated_sha() if _HEX.fullmatch(ref) else git.unknown_ref()
    # Protocol v2 servers serve any reachable commit by SHA.
    attempt = _fetch(repo=repo, git=git, refspecs=[f"+{ref}:refs/gitopsd/commit"], depth=1, check=False)
    if attempt.returncode == 0:
        return ref
    # A server that will not (protocol v0 without uploadpack.allowReachableSHA1InWant, a dumb
    # HTTP server): look for the commit in its branches and tags. Still only that commit is
    # rendered: a full SHA names its content.
    _fetch(
        repo=repo,
        git=git,
        refspecs=["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
        depth=None,
    )
    sha = _local_commit(repo=repo, rev=ref, git=git)
    if not sha:
        raise git.unknown_ref()
    return sha


def _fetch_moved(*, repo: Path, git: _Git) -> str | None:
    """The local ref holding the new commit of a ref known to have moved, fetched in one session,
    or None (see fetch's ``moved``).

    None when the cache does not know the ref as a branch, ``HEAD`` or a
    full refname, and when the remote no longer has that ref: the caller
    then resolves it with ``ls-remote``. Any other failure (unreachable,
    credentials refused, timeout) is the caller's error, worded as for any
    fetch; the cache keeps its refs (git updates them only after a
    complete fetch).
    """
    local = _parked_ref(repo=repo, git=git)
    if local is None:
        return None
    remote_name = "HEAD" if local == "refs/gitopsd/HEAD" else local
    attempt = _fetch(repo=repo, git=git, refspecs=[f"+{remote_name}:{local}"], depth=1, check=False)
    if attempt.returncode != 0:
        if "couldn't find remote ref" in attempt.stderr.lower():
            return None
        raise git.failed(verb="fetch", stderr=attempt.stderr)
    return local


def _parked_ref(*, repo: Path, git: _Git) -> str | None:
    """Where the last ``ls-remote`` resolution of ``git.ref`` parked its commit, if it is a branch-like ref.

    ``HEAD`` is parked at ``refs/gitopsd/HEAD``, a full refname at itself, a
    short name at ``refs/heads/<name>`` — unless the cache holds a tag of
    that name (a tag wins over a branch: only ``ls-remote`` can tell which
    the remote has now). SHAs are never "moved".
    """
    ref = git.ref
    if _FULL_SHA.fullmatch(ref) or ref.startswith("refs/tags/"):
        return None
    local = "refs/gitopsd/HEAD" if ref == "HEAD" else ref if ref.startswith("refs/") else f"refs/heads/{ref}"
    tag = f"refs/tags/{ref}" if local == f"refs/heads/{ref}" else local
    listed = git.run(args=["for-each-ref", "--format=%(refname)", local, tag], repo=repo, check=False)
    names = set(listed.stdout.splitlines()) if listed.returncode == 0 else set()
    return local if local in names and (tag == local or tag not in names) else None


def _ls_remote(*, repo: Path, git: _Git) -> tuple[str, str] | None:
    """(refname, commit-ish SHA) the remote advertises for ``git.ref``.

    Lookup order follows git's own: an exact full refname, then tags, then
    branches. A tag's peeled line (``^{}``) wins over the tag object, so the
    SHA is a commit when the remote peels (all do for annotated tags).
    """
    ref = git.ref
    if ref == "HEAD" or ref.startswith("refs/"):
        candidates = [ref]
    else:
        candidates = [f"refs/tags/{ref}", f"refs/heads/{ref}"]
    result = git.run(args=["ls-remote", "--", git.remote.url, *candidates], repo=repo)
    advertised: dict[str, str] = {}
    for line in result.stdout.splitlines():
        sha, _, name = line.partition("\t")
        advertised[name] = sha
    for name in candidates:
        if name in advertised:
            return name, advertised.get(f"{name}^{{}}", advertised[name])
    return None


def _fetch(*, repo: Path, git: _Git, refspecs: list[str], depth: int | None, check: bool = True) -> _Result:
    """``git fetch`` from the remote into the cache.

    With ``depth=None`` a shallow cache is deepened to full history, which is
    what finding an arbitrary old commit needs.
    """
    # No auto-maintenance here: it is a process of its own on every fetch, on a push's path;
    # _prepare_spare runs it after the fetch has returned, still under the cache's lock.
    args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-auto-maintenance"]
    if depth is not None:
        args.append(f"--depth={depth}")
    elif (repo / "shallow").exists():
        args.append("--unshallow")
    return git.run(args=[*args, "--", git.remote.url, *refspecs], repo=repo, check=check)


def _local_commit(*, repo: Path, rev: str, git: _Git) -> str | None:
    """Full SHA of the commit ``rev`` names in the cache, or None if absent."""
    args = ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"]
    result = git.run(args=args, repo=repo, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _materialise(*, repo: Path, checkouts: Path, sha: str, git: _Git) -> Path:
    """``checkouts/<sha>``, holding exactly the commit's tree.

    Written into a temp dir and renamed, so readers see all of it or none of
    it. ``read-tree`` + ``checkout-index`` with a throwaway index leaves the
    shared repository untouched and lets git (not us) handle symlinks,
    executable bits and hostile paths (``..``, ``.git``).

    A push to a big monorepo changes a few files of thousands: the new tree
    is then made from the last checkout (`_patch`) — its files hard-linked,
    never written to, and only the paths the commit changed checked out
    anew — so the cost follows the change, not the repository's size. That
    trusts the last checkout to be the tree of its commit: the checkouts are
    this cache's own, and nothing writes to them (renderers only read).
    """
    final = checkouts / sha
    if final.is_dir():
        os.utime(final)  # recently used: the last to be collected
        return final
    checkouts.mkdir(exist_ok=True)
    base = _latest_checkout(checkouts)
    for stale in checkouts.glob(".tmp-*"):  # left by a crash; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    spares = checkouts.parent / "spares"
    for stale in spares.glob("*"):
        if base is None or stale.name != base.name:
            shutil.rmtree(stale, ignore_errors=True)
    spare = spares / base.name if base is not None else None
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:12]}-", dir=checkouts))
    linked = spare is not None and spare.is_dir()
    if linked:
        os.rmdir(tmp)
        os.rename(spare, tmp)   # the base's tree, hard-linked ahead of time (see _prepare_spare)
    index = Path(f"{tmp}.index")
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; readers may be other users
        env = {"GIT_INDEX_FILE": str(index)}
        git.run(args=["read-tree", sha], repo=repo, env=env)
        if base is None or not _patch(repo=repo, base=base, tmp=tmp, sha=sha, git=git, env=env, linked=linked):
            _empty(tmp)
            git.run(args=["--work-tree", str(tmp), "checkout-index", "--all", "--force"], repo=repo, env=env)
        try:
            os.rename(tmp, final)
        except OSError as exc:  # pragma: no cover - only without the lock
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        os.utime(final)
    finally:
        index.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    threading.Thread(target=_prepare_spare, args=(checkouts.parent, sha), name="checkout-spare",
                     daemon=True).start()
    return final


def _prepare_spare(home: Path, sha: str) -> None:
    """Hard-link the checkout of ``sha`` into ``spares/<sha>``, and run git's auto-maintenance, off the fetch's path.

    Making a tree of thousands of directories is the one part of a patched
    checkout that follows the repository's size; done here, after the fetch
    returned, the next commit's checkout starts from the spare and costs
    what the commit changed. Under the cache's lock (it waits for the fetch
    that started it); skipped when a newer checkout was made meanwhile.
    Built under a temporary name and renamed: a spare is whole or absent.
    """
    git = _Git(remote=_Remote(url=str(home), kind="local", credentials=Credentials()), ref="HEAD",
               deadline=time.monotonic() + 120.0, timeout=120.0)
    checkouts, spares = home / "checkouts", home / "spares"
    try:
        with _locked(home / "lock", git=git):
            current, spare = checkouts / sha, spares / sha
            # git's auto-gc, which every fetch leaves to this thread (see _fetch): cheap unless due.
            git.run(args=["maintenance", "run", "--auto", "--quiet"], repo=home / "repo.git", check=False)
            if spare.exists() or _latest_checkout(checkouts) != current:
                return
            spares.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:12]}-", dir=spares))
            try:
                tmp.chmod(0o755)
                _link_tree(current, tmp)
                os.rename(tmp, spare)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, SourceError):
        pass   # no spare: the next checkout links the tree itself


def _latest_checkout(checkouts: Path) -> Path | None:
    """The most recently used complete checkout (a commit's own directory), or None."""
    done = [p for p in checkouts.iterdir() if _FULL_SHA.fullmatch(p.name) and p.is_dir()]
    return max(done, key=lambda p: p.stat().st_mtime, default=None)


def _patch(*, repo: Path, base: Path, tmp: Path, sha: str, git: _Git, env: dict[str, str], linked: bool) -> bool:
    """Make ``tmp`` the tree of ``sha`` from the checkout ``base`` (of another commit of the repository).

    ``base``'s files are hard-linked into ``tmp`` (links recreated; already
    done when ``linked``: a spare), never opened for writing: every path
    the commit changed is first removed from ``tmp``, then checked out anew
    from the index of ``sha``. False (``tmp``
    in any state) when that is not sure to give exactly the checkout of
    ``sha``: git cannot tell what changed, a path that is not UTF-8, a
    changed path below a link or a non-directory, a directory that is not
    left empty by its deletions. The caller then checks everything out.
    """
    diff = git.run(args=["diff-tree", "-r", "-z", "--no-renames", "--name-status", "--end-of-options", base.name,
                         sha], repo=repo, check=False)
    if diff.returncode != 0 or "\ufffd" in diff.stdout:
        return False
    fields = diff.stdout.split("\0")
    changes = list(zip(fields[0::2], fields[1::2]))   # (status, path)
    # The same diff as changed_paths(since=base) asks for, which the apps woken by this commit do next.
    _Trees.remember_diff(git_dir=repo, since=base.name, sha=sha, paths=frozenset(path for _, path in changes))
    if not linked:
        _link_tree(base, tmp)
    # Deepest first: a directory's files go before the directory itself (a directory become a file).
    for _, path in sorted(changes, key=lambda c: -c[1].count("/")):
        if not _remove(tmp, path):
            return False
    present = [path for status, path in changes if status != "D"]
    for i in range(0, len(present), 1000):
        git.run(args=["--work-tree", str(tmp), "checkout-index", "--force", "--", *present[i:i + 1000]],
                repo=repo, env=env)
    return True


def _link_tree(src: Path | str, dst: Path | str) -> None:
    """Recreate the tree `src` in the existing directory `dst`: directories made, files hard-linked,
    symlinks copied as links (never followed). A third of shutil.copytree's cost: this is per push."""
    with os.scandir(src) as entries:
        for entry in entries:
            target = os.path.join(dst, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(target, 0o755)
                _link_tree(entry.path, target)
            else:
                os.link(entry.path, target)


def _remove(root: Path, path: str) -> bool:
    """Remove ``path`` below ``root`` without following a link, and the directories it leaves empty.

    True also when it is absent. False when a parent is a link or not a
    directory, or ``path`` is a directory that still holds something.
    """
    parts = path.split("/")
    here = root
    for part in parts[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return True   # no such parent: nothing to remove (added by the commit)
        if not stat.S_ISDIR(st.st_mode):
            return False
    target = here / parts[-1]
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return True
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(target)   # a submodule's empty directory, or one its files were removed from
        else:
            os.unlink(target)
    except OSError:
        return False
    while here != root:
        try:
            os.rmdir(here)     # git keeps no empty directory: neither does a fresh checkout
        except OSError:
            break
        here = here.parent
    return True


def _empty(directory: Path) -> None:
    for entry in list(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _read_revision(*, repo: Path, rev: str, git: _Git) -> Revision:
    """The metadata of the commit ``rev`` names in the cache, as recorded in the commit object itself.

    One local ``git log`` (no network, no credentials involved): the commit's
    full SHA, raw names (``%an``, not the mailmapped ``%aN``), committer time
    in UTC and the message re-encoded to UTF-8 from the commit's own
    encoding (undecodable bytes replaced), because the audit trail wants
    what the commit says, not how a mailmap renders it today. Options that
    a user's git config could turn on (signatures, notes, colour) are off.
    """
    fields = "%x00".join(("%H", "%an <%ae>", "%cn <%ce>", "%ct", "%B"))
    result = git.run(args=["log", "-1", "--no-show-signature", "--no-notes", "--no-color", f"--format={fields}",
                           "--end-of-options", f"{rev}^{{commit}}"], repo=repo, check=False)
    parts = result.stdout.split("\0", 4)
    if result.returncode != 0 or len(parts) != 5 or not _FULL_SHA.fullmatch(parts[0]):
        raise SourceError(
            f"ref {git.ref!r} in {git.remote.url} points at {rev}, which is not a commit",
            hint="point the app at a branch, a tag of a commit, or a commit SHA",
        )
    sha, author, committer, when, message = parts
    return Revision(url=git.remote.url, ref=git.ref, sha=sha, author=author, committer=committer,
                    message=message.strip(), time=datetime.fromtimestamp(int(when), tz=timezone.utc))


def _collect_garbage(*, checkouts: Path, keep: int, current: str) -> None:
    """Remove all but the ``keep`` most recently used checkouts.

    Recency is the directory's mtime, refreshed on every reuse, so a commit
    that is fetched again and again (the app's steady state) is never removed.
    ``current`` is never removed, whatever the clock says. A doomed checkout
    is renamed away under the lock (readers of it keep their open files) and
    deleted on a thread of its own: removing a big monorepo's tree is no part
    of a push's latency.
    """
    entries = [p for p in checkouts.iterdir() if _FULL_SHA.fullmatch(p.name) and p.is_dir()]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    trash = checkouts.parent / "trash"
    for old in entries[keep:]:
        if old.name != current:
            trash.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                os.rename(old, trash / f"{old.name}-{time.monotonic_ns()}")
    doomed = list(trash.iterdir()) if trash.is_dir() else []   # with any a crash left
    if doomed:
        threading.Thread(target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in doomed],
                         name="checkout-gc", daemon=True).start()
