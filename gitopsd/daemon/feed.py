"""What happens to the targets, for whoever listens: the web view's live updates and notifications.

The runners publish three kinds of event:

- ``revision``: a run resolved a commit other than the one live — the start
  of a transition (a forge's commit status goes to *pending*);
- ``record``: an audit record was written (a transition, a drift, a release
  request acted on) — the record exactly as stored, Secret values already
  scrubbed by the audit log;
- ``status``: something a reader of the target's status would see changed
  (a verdict, a hold, a drift) — not each run's start and end: a fleet's
  polls would wake every open page several times a second.

Listeners are called on the publishing runner's thread, so they must only
enqueue (the notifier) or note (the web view); one that raises is logged
and never stops the run or the other listeners. The feed also keeps a
version number that every event moves on, which the web view's event
stream waits on (``wait_newer``): a page learns that something changed, then
reads the daemon's in-memory state — never the apiserver — for what.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("gitopsd.daemon.feed")

KINDS = ("revision", "record", "status")


@dataclass(frozen=True)
class Event:
    kind: str                 # one of KINDS
    target: str               # AppConfig.key: `app`, or `app@cluster`
    cfg: Any                  # the target's gitopsd.config.AppConfig when it happened
    record: dict | None = None     # kind "record": the audit record as stored (with seq/hash when stored)
    revision: Any = None           # kind "revision": the gitopsd.engine.source.Revision being applied
    diff: str | None = None        # kind "record", a transition: its plan as text, Secret values masked


class Feed:
    def __init__(self) -> None:
        self._listeners: list[Callable[[Event], None]] = []
        self._changed = threading.Condition()
        self._version = 0

    def listen(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def publish(self, event: Event) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop a reconcile
                log.exception("feed listener failed", kind=event.kind, app=event.target)

    @property
    def version(self) -> int:
        return self._version

    def wait_newer(self, version: int, *, timeout: float) -> int:
        """The version once it is past `version`, or the same one after `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout=timeout)
            return self._version

    def wake_all(self) -> None:
        """Wake every waiter now (shutdown: event streams end instead of waiting out their timeout)."""
        with self._changed:
            self._version += 1
            self._changed.notify_all()
