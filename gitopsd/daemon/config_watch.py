"""Hot reload of the config file, surviving what editors and Kubernetes do to it.

An invalid edit is rejected and the previous config keeps running. A
missing, unreadable or empty file is an invalid edit, never "no apps": that
takes an explicit `apps: []`. A valid new config is handed to the daemon as
the parsed config and its difference from the running one.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Callable

import structlog

from gitopsd import config as config_mod
from gitopsd.errors import GitopsdError

log = structlog.get_logger("gitopsd")

OnChange = Callable[[config_mod.Config, config_mod.ConfigChange], None]


class ConfigWatcher:
    """Owns the running config: `config` is always the last valid version of the file."""

    def __init__(self, path: Path, *, on_change: OnChange, stopped: threading.Event) -> None:
        self.config_path = path
        self.config = config_mod.load(path)   # an invalid initial config is fatal
        try:
            self._config_digest = self._read_config()[0]
        except OSError:
            self._config_digest = ""   # gone since load: the watch will say so
        self._on_change = on_change
        self._stopped = stopped

    def _read_config(self) -> tuple[str, bytes]:
        """(digest, bytes) of one read of the file: what is parsed is what was hashed.

        Raises OSError when the file cannot be read (missing, a directory, no permission).
        """
        data = self.config_path.read_bytes()
        return hashlib.sha256(data).hexdigest(), data

    def _config_dirs(self) -> tuple[Path, ...]:
        """Where a change to the config file shows: its directory (watched recursively,
        so a ConfigMap volume's `..data` swap is seen), and the directory of the file
        a symlink points to when that lies elsewhere."""
        parent = self.config_path.absolute().parent
        target = self.config_path.resolve().parent
        if target == parent or target.is_relative_to(parent) or not target.is_dir():
            return (parent,)
        return (parent, target)

    def watch(self) -> None:
        """Hot reload until stopped, surviving what editors and Kubernetes do to the file.

        Not a watch on the file itself: editors save by writing a new file and
        renaming it over the old one, and ConfigMap volumes swap a symlink, either
        of which ends a watch on the old inode. If the watch itself fails (the
        directory was removed), it is re-armed every second, and the file is read
        again each time so that nothing changed meanwhile is missed.
        """
        from watchfiles import watch

        problem = None
        while not self._stopped.is_set():
            dirs = self._config_dirs()
            try:
                for _changes in watch(*dirs, stop_event=self._stopped, debounce=200, step=50, rust_timeout=1000,
                                      yield_on_timeout=False):
                    problem = None
                    self._reload_safely()
                    if self._config_dirs() != dirs:
                        break  # the link points into another directory now: watch that one
            except Exception as exc:  # noqa: BLE001 - the watch must come back, whatever ended it
                if str(exc) != problem:
                    log.warning("cannot watch the config file's directory; retrying every second",
                                path=str(self.config_path), directories=[str(d) for d in dirs],
                                error=f"{type(exc).__name__}: {exc}")
                problem = str(exc)
                self._stopped.wait(1.0)
                self._reload_safely()

    def _reload_safely(self) -> None:
        try:
            self.reload()
        except Exception:  # noqa: BLE001 - hot reload must survive a bug in one reload
            log.exception("config reload failed; the previous config keeps running")

    def reload(self) -> None:
        """Apply a changed config file; a file that is not a valid config changes nothing.

        Missing, unreadable, empty or not UTF-8 is not "no apps": an `rm`, a
        half-written save or a broken volume mount must not stop every app.
        Each distinct rejected state is logged once; the next valid version
        (the file re-created included) is picked up.
        """
        try:
            digest, data = self._read_config()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                why = "the file is missing (deleted, or moved away)"
            else:
                why = f"cannot read the file: {exc.strerror or exc}"
            self._reject(f"unreadable:{type(exc).__name__}", why,
                         hint="restore the file; to remove every app, write a file with `apps: []`")
            return
        if digest == self._config_digest:
            return
        if not data.strip():
            self._reject(digest, "the file is empty",
                         hint="to remove every app, write `apps: []`; an empty file is taken for an accident")
            return
        try:
            new = config_mod.parse(data.decode("utf-8"), source=str(self.config_path),
                                   base_dir=self.config_path.absolute().parent)
        except UnicodeDecodeError as exc:
            self._reject(digest, f"not UTF-8 text (byte {exc.start})")
            return
        except GitopsdError as exc:
            self._reject(digest, str(exc))
            return
        change = config_mod.diff(self.config, new)
        self.config, self._config_digest = new, digest
        self._on_change(new, change)
        log.info("config reloaded", path=str(self.config_path), added=list(change.added),
                 removed=list(change.removed), changed=list(change.changed))

    def _reject(self, state: str, error: str, *, hint: str | None = None) -> None:
        """Log a rejected config state once (`state` identifies it) and keep the running apps."""
        if state == self._config_digest:
            return
        self._config_digest = state
        log.error("config change rejected; the previous config keeps running", path=str(self.config_path),
                  error=error, hint=hint, running=[a.name for a in self.config.apps])

