"""One fetch per repository: the apps of a repository share each fetch of it.

Fifty apps on one repository and ref (a monorepo) need one ``ls-remote`` per
poll, not fifty. ``SharedFetches`` sits in front of gitopsd.engine.source.fetch
and gives every caller of the same *key* — (repository URL without its
credentials, ref, credentials) — the result of one fetch:

- **Single flight.** A caller that finds a fetch of its key running waits for
  it (an in-process wait, no lock-file polling) and gets its commit, or its
  error.
- **Generations.** A finished fetch stays the answer until someone says the
  repository may have moved: ``refresh(url, ref)``, called by the daemon's
  poll of the repository (once per interval), by a push webhook and by a
  commit to a local repository (gitopsd.daemon.triggers). Callers in between
  — the reconciles those triggers start, a config edit, a new leader — reuse
  it. So a result is never older than the last refresh, and one poll or one
  push costs one fetch however many apps read the repository. A push's
  refresh (``pushed``) knows the repository moved: its fetch skips the
  ``ls-remote`` a poll's starts with (one git session against the remote,
  not two).
- **Failures are results too,** within their generation: fifty apps woken by
  one poll while the remote is down cost one failed fetch, and all fifty
  report it. ``retry`` starts a new generation only when the current answer
  is a failure and no fetch is running (the apps' backoff retries come in
  bursts; the first one fetches, the others join it).
- **Credentials are part of the key.** Two apps on one URL share a fetch only
  when their credentials are the same — compared by content (token,
  username, the bytes of the ssh key and known_hosts files), so two apps
  naming one Secret share, and an app with wrong credentials never receives
  a commit fetched with another app's.

Errors name the repository and ref as gitopsd.engine.source words them. The
on-disk cache (and its cross-process lock) stays gitopsd.engine.source's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gitopsd.engine import source

#: Keys remembered at most (repositories x refs x credentials); the least recently used go first.
MAX_KEYS = 4096


@dataclass(frozen=True)
class FetchKey:
    url: str          # credential-free, as source reports it
    ref: str
    credentials: str  # digest of the credentials' content ("" for none)


@dataclass
class _Slot:
    """What is known about one key: the fetch running, and the last one finished."""

    running_since: float | None = None
    started: float = 0.0                       # when the last finished fetch began
    checkout: source.Checkout | None = None
    error: BaseException | None = None
    done: bool = False                         # a finished fetch exists
    waiters: int = 0


class SharedFetches:
    """See the module docstring. Safe for concurrent use."""

    def __init__(self, *, cache_dir: Path, timeout: float = 120.0,
                 on_fetch: Callable[[FetchKey], None] | None = None,
                 on_new_commit: Callable[[str, str, source.Checkout], None] | None = None) -> None:
        """``on_fetch(key)`` hears every fetch that goes to the remote (the daemon counts them);
        ``on_new_commit(url, ref, checkout)`` hears when a fetch finds a commit other than the one
        the previous fetch of that repository and ref found (not the first one), so that the daemon
        can wake the apps of the repository that commit concerns."""
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._on_fetch = on_fetch
        self._on_new_commit = on_new_commit
        self._cond = threading.Condition()
        self._slots: dict[FetchKey, _Slot] = {}
        self._stale_before: dict[tuple[str, str], float] = {}   # (url, ref) -> last refresh
        self._last_sha: dict[tuple[str, str], str] = {}
        self._moved: set[tuple[str, str]] = set()                 # current generation started by a push

    # ------------------------------------------------------------ asking

    def fetch(self, url: str, ref: str, *, credentials: source.Credentials | None = None,
              timeout: float | None = None) -> source.Checkout:
        """The checkout of ``ref`` as of the current generation; fetches only when none is known.

        ``timeout`` bounds a fetch this call starts (default: the one given at construction); a
        call that finds one running waits for that one, which has its own.

        Raises what gitopsd.engine.source.fetch raised for this generation (SourceError).
        """
        key = key_of(url, ref, credentials=credentials)
        with self._cond:
            slot = self._slot(key)
            while True:
                fresh_after = self._stale_before.get((key.url, key.ref), float("-inf"))
                if slot.running_since is not None and slot.running_since >= fresh_after:
                    slot.waiters += 1
                    while slot.running_since is not None:
                        self._cond.wait()
                    slot.waiters -= 1
                    return self._answer(slot)
                if slot.done and slot.started >= fresh_after:
                    return self._answer(slot)
                if slot.running_since is not None:
                    self._cond.wait()   # a fetch of an older generation: wait for it, then fetch again
                    continue
                slot.running_since = time.monotonic()
                moved = (key.url, key.ref) in self._moved
                break
        return self._run(key, slot, url=url, ref=ref, credentials=credentials, moved=moved,
                         timeout=self.timeout if timeout is None else timeout)

    # ------------------------------------------------------------ invalidating

    def refresh(self, url: str, ref: str) -> float:
        """The repository may have moved: the next fetch of it (any credentials) goes to the remote.

        Returns the new generation's mark (see `refreshed_at`).
        """
        repo = _repo_key(url, ref)
        with self._cond:
            self._stale_before[repo] = mark = time.monotonic()
            self._moved.discard(repo)
            return mark

    def pushed(self, url: str, ref: str) -> float:
        """The repository has moved (a push said so): a refresh whose fetch goes straight for the ref.

        One git session against the remote instead of two (no ``ls-remote``
        first: see gitopsd.engine.source.fetch's ``moved``). The next refresh
        (a poll) goes back to looking before fetching. Returns the new
        generation's mark, as `refresh`.
        """
        mark = self.refresh(url, ref)
        with self._cond:
            if self._stale_before.get(_repo_key(url, ref)) == mark:
                self._moved.add(_repo_key(url, ref))
        return mark

    def refreshed_at(self, url: str, ref: str) -> float:
        """The mark of the current generation of this repository and ref (-inf before any refresh):
        a run woken at this mark or later fetches in it, hence sees whatever it finds."""
        with self._cond:
            return self._stale_before.get(_repo_key(url, ref), float("-inf"))

    def retry(self, url: str, ref: str) -> bool:
        """Start a new generation if the last fetch of this repository and ref failed and none runs.

        Returns whether it did.
        """
        repo = _repo_key(url, ref)
        with self._cond:
            fresh_after = self._stale_before.get(repo, float("-inf"))
            slots = [s for k, s in self._slots.items() if (k.url, k.ref) == repo]
            if any(s.running_since is not None for s in slots):
                return False
            if not any(s.done and s.error is not None and s.started >= fresh_after for s in slots):
                return False
        self.refresh(url, ref)
        return True

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop what is known about every repository and ref not in ``keep`` (normalised with repo_key)."""
        with self._cond:
            for key in [k for k, s in self._slots.items()
                        if (k.url, k.ref) not in keep and s.running_since is None and not s.waiters]:
                del self._slots[key]
            for table in (self._stale_before, self._last_sha):
                for repo in [r for r in table if r not in keep]:
                    del table[repo]
            self._moved &= keep

    # ------------------------------------------------------------ internals

    def _slot(self, key: FetchKey) -> _Slot:
        slot = self._slots.pop(key, None) or _Slot()
        self._slots[key] = slot   # most recently used last
        if len(self._slots) > MAX_KEYS:
            for old in [k for k, s in self._slots.items() if s.running_since is None and not s.waiters]:
                if len(self._slots) <= MAX_KEYS:
                    break
                del self._slots[old]
        return slot

    def _run(self, key: FetchKey, slot: _Slot, *, url: str, ref: str,
             credentials: source.Credentials | None, moved: bool, timeout: float) -> source.Checkout:
        checkout: source.Checkout | None = None
        error: BaseException | None = None
        if self._on_fetch is not None:
            self._on_fetch(key)
        try:
            checkout = source.fetch(url, ref, cache_dir=self.cache_dir, credentials=credentials,
                                    timeout=timeout, moved=moved)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter, then re-raised
            error = exc
        new = False
        if checkout is not None:
            with self._cond:
                previous = self._last_sha.get((key.url, key.ref))
                self._last_sha[(key.url, key.ref)] = checkout.revision.sha
            new = previous is not None and previous != checkout.revision.sha
        if new and self._on_new_commit is not None:
            # Before the waiters get the commit: every app that waits for it is still
            # "under way, not fetched yet" when the daemon decides whom to wake.
            self._on_new_commit(key.url, key.ref, checkout)
        with self._cond:
            slot.started, slot.running_since = slot.running_since or 0.0, None
            slot.checkout, slot.error, slot.done = checkout, error, True
            self._cond.notify_all()
        return self._answer(slot)

    @staticmethod
    def _answer(slot: _Slot) -> source.Checkout:
        if slot.error is not None:
            raise slot.error
        assert slot.checkout is not None
        return slot.checkout


def key_of(url: str, ref: str, *, credentials: source.Credentials | None) -> FetchKey:
    """The sharing key: URL without credentials (those move into the credentials), ref, and a
    digest of the credentials' content. Raises SourceError for a URL source.fetch would refuse."""
    clean, creds = source.split_credentials(url, credentials=credentials)
    return FetchKey(url=clean, ref=ref, credentials=_credentials_digest(creds))


def repo_key(url: str, ref: str) -> tuple[str, str]:
    """(credential-free URL, ref): what a refresh applies to. A URL source would refuse is kept as given."""
    return _repo_key(url, ref)


def _repo_key(url: str, ref: str) -> tuple[str, str]:
    try:
        return source.split_credentials(url, credentials=None)[0], ref
    except source.SourceError:
        return url, ref


def _credentials_digest(creds: source.Credentials) -> str:
    """A digest of what authenticates: the token and username, and the content of the key, known_hosts
    and CA files (two apps reading one Secret get private copies of its key under different paths)."""
    if creds == source.Credentials():
        return ""
    h = hashlib.sha256()
    for part in (creds.username, creds.token):
        h.update(b"\0" + (part or "").encode())
    for path in (creds.ssh_key_file, creds.known_hosts_file, creds.ca_file):
        h.update(b"\0")
        if path is not None:
            try:
                h.update(Path(path).read_bytes())
            except OSError:
                h.update(b"unreadable:" + str(path).encode())   # source.fetch reports it
    return h.hexdigest()
