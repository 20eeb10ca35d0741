"""What is worth telling: feed events (gitopsd.daemon.feed) as `Notice`s, or nothing.

A Notice is one of:

- a transition begun (`phase` "started"): a run resolved a commit other than
  the live one. A commit status goes to pending; a JSON webhook hears it; a
  chat does not (one message per transition, when it has a verdict);
- a transition ended (`phase` "finished"): its audit record, with result,
  health, reason, the commit's subject and author, and the record's seq and
  hash (the web view's history link);
- a drift (`kind` "drift"): an object changed by hand, what gitopsd did about
  it and who changed it;
- a release request acted on (`kind` "release": hold, resume, rollback). The
  transitions release control decides (RolledBack, Held) are transitions,
  and release events too: a chat that asked only for `release` hears them.

What is *not* worth telling, and why (`Memory` keeps what was told per target):

- the same commit again. A NoChange record of the revision that was live
  already — the first run after a restart or a leader change, a config
  reload — is steady state: Flux's notification-controller hears nothing
  then either (its controllers emit events for a non-empty change set or a
  failure), and a restart of gitopsd must not post "success" on every
  app's commit and a chat message per app. Such a record is told only when
  the last thing told about the target was a failure: the recovery is news.
- a run that starts on a commit whose verdict was already told: the retries
  of a failed commit begin again and again (every backoff) without any news,
  and a pending status over a failure would hide the failure;
- a DryRun transition (self-heal off, the same commit): its drift records
  say what matters.

A new commit is always told, even when it changed nothing in the cluster:
it is now the deployed revision (and its pending status needs closing). A
transition whose record names no commit (its render failed) is told as the
commit its run began on.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from gitopsd.audit.records import CLUSTER_CHANGING, HELD, ROLLED_BACK
from gitopsd.config import IN_CLUSTER, split_target

#: Results that are a verdict against the commit (a commit status "failure").
FAILED_RESULTS = frozenset({"Failed", "Unhealthy", "Refused"})
#: Results of release control: a transition, and a release event too.
RELEASE_RESULTS = frozenset({ROLLED_BACK, HELD})


@dataclass(frozen=True)
class Notice:
    """One thing to tell, in the words of gitopsd's JSON webhook body (`as_json`)."""

    kind: str                       # transition | drift | release
    target: str                     # `app` or `app@cluster` (gitopsd.config.AppConfig.key)
    phase: str = "finished"         # transitions: started | finished
    revision: str | None = None
    previous: str | None = None
    result: str | None = None       # a transition's result; a drift's action; a release request's action
    health: str | None = None       # Healthy | Unhealthy | NotChecked
    reason: str = ""
    subject: str = ""               # the commit message's first line
    author: str = ""
    seq: int | None = None
    hash: str | None = None
    repo: str = ""                  # the app's repository URL (where a forge's repository is read from)
    details: dict[str, Any] = field(default_factory=dict)   # drift: object, fields, managers; release: by, error

    @property
    def app(self) -> str:
        return split_target(self.target)[0]

    @property
    def cluster(self) -> str:
        return split_target(self.target)[1]

    @property
    def events(self) -> frozenset[str]:
        """The `events:` a notifier must name to hear this (RolledBack, Held: transition or release)."""
        if self.kind == "transition" and self.result in RELEASE_RESULTS:
            return frozenset({"transition", "release"})
        return frozenset({self.kind})

    @property
    def failed(self) -> bool:
        return self.result in FAILED_RESULTS or (self.kind != "transition" and bool(self.details.get("error")))

    def link(self, ui_url: str | None) -> str | None:
        """The web view's page of this event: the record in the target's history, or the target."""
        if not ui_url:
            return None
        page = f"{ui_url}/apps/{self.target}"
        return f"{page}/history/{self.seq}" if self.seq is not None else page

    def as_json(self, *, ui_url: str | None) -> dict[str, Any]:
        """gitopsd's webhook body: stable keys (added to, never renamed), `version` 1."""
        return {"version": 1, "kind": self.kind, "phase": self.phase, "app": self.app, "cluster": self.cluster,
                "target": self.target, "revision": self.revision, "previous": self.previous,
                "result": self.result, "health": self.health, "reason": self.reason,
                "commit": {"subject": self.subject, "author": self.author}, "link": self.link(ui_url),
                "seq": self.seq, "hash": self.hash, **self.details}


def of_revision(*, target: str, revision: Any, previous: str | None, repo: str) -> Notice:
    """A transition begins on `revision` (a gitopsd.engine.source.Revision)."""
    return Notice(kind="transition", phase="started", target=target, revision=revision.sha, previous=previous,
                  subject=_subject(revision.message), author=revision.author or "", repo=repo)


def of_record(*, target: str, record: dict, repo: str) -> Notice | None:
    """The notice of an audit record as stored, or None for a type that tells nothing."""
    kind = record.get("type")
    common = {"target": target, "seq": record.get("seq"), "hash": record.get("hash"), "repo": repo,
              "revision": record.get("revision")}
    if kind == "transition":
        commit = record.get("commit") or {}
        return Notice(kind="transition", previous=record.get("previous"), result=record.get("result"),
                      health=(record.get("health") or {}).get("outcome"), reason=record.get("reason") or "",
                      subject=_subject(commit.get("message") or ""), author=commit.get("author") or "",
                      details=({"release": record["release"]} if record.get("release") else {}), **common)
    if kind == "drift":
        obj = record.get("object") or {}
        return Notice(kind="drift", result=record.get("action"), reason=record.get("error") or "",
                      details={"object": _object_name(obj), "fields": record.get("fields") or [],
                               "managers": record.get("managers") or [], "deleted": bool(record.get("deleted")),
                               "error": record.get("error")}, **common)
    if kind == "release":
        return Notice(kind="release", result=record.get("action"), reason=record.get("error") or "",
                      details={"by": record.get("by"), "error": record.get("error")}, **common)
    return None


def _subject(message: str) -> str:
    return message.strip().split("\n", 1)[0][:200]


def _object_name(obj: dict) -> str:
    """`Deployment.apps/ns/web`, as the drift log lines name it."""
    kind = f"{obj.get('kind')}.{obj['group']}" if obj.get("group") else str(obj.get("kind"))
    return "/".join(p for p in (kind, obj.get("namespace"), obj.get("name")) if p)


class Memory:
    """What was last told per target: (revision, finished, failed), and the transition begun and not yet
    ended. Decides what is news (module docstring).

    In memory only: after a restart nothing is known, so a steady NoChange
    is quiet and a new commit or a failure is told — the cheap side to err on.
    """

    def __init__(self) -> None:
        self._told: dict[str, tuple[str | None, bool, bool]] = {}
        self._begun: dict[str, Notice] = {}
        self._lock = threading.Lock()

    def news(self, notice: Notice) -> Notice | None:
        """`notice` when it is worth telling (remembered), else None.

        A transition that ends without a commit of its own — a render or a
        signature check failed, so the record has no revision — ends the
        transition begun: it is told as that commit's (revision, subject,
        author), so the commit's pending status gets its failure."""
        if notice.kind != "transition":
            return notice
        with self._lock:
            begun = self._begun.pop(notice.target, None) if notice.phase == "finished" else None
            if begun is not None and notice.revision is None:
                notice = dataclasses.replace(notice, revision=begun.revision, subject=begun.subject,
                                             author=begun.author)
            last = self._told.get(notice.target)
            if not self._is_news(notice, last):
                return None
            if notice.phase == "started":
                self._begun[notice.target] = notice
            self._told[notice.target] = (notice.revision, notice.phase == "finished", notice.failed)
            return notice

    def keep(self, targets: set[str]) -> None:
        """Forget every target but `targets` (an app removed from the config leaves nothing behind)."""
        with self._lock:
            for gone in [t for t in self._told if t not in targets]:
                del self._told[gone]
            for gone in [t for t in self._begun if t not in targets]:
                del self._begun[gone]

    @staticmethod
    def _is_news(notice: Notice, last: tuple[str | None, bool, bool] | None) -> bool:
        if notice.phase == "started":
            return last is None or last[0] != notice.revision   # begun or judged already: a retry
        if notice.result == "DryRun":
            return False
        if notice.result == "NoChange" and notice.revision == notice.previous:
            # Steady state, unless it ends a failure told before or a pending left open.
            return last is not None and (last[2] or (last[0] == notice.revision and not last[1]))
        return True


def describe(notice: Notice, *, limit: int = 140) -> str:
    """One line for a commit status or a message: the verdict, then why (cut to `limit`)."""
    if notice.phase == "started":
        text = f"deploying {notice.revision[:12] if notice.revision else ''}".strip()
    elif notice.kind == "drift":
        text = f"drift {notice.result}: {notice.details.get('object')}"
    elif notice.kind == "release":
        text = f"{notice.result} requested by {notice.details.get('by')}"
    elif notice.result == HELD:
        text = "held: not applied until the app is resumed"
    elif notice.result == ROLLED_BACK:
        text = "rolled back to this commit"
    elif notice.result in CLUSTER_CHANGING or notice.result == "NoChange":
        text = f"{notice.result}, {(notice.health or 'NotChecked').lower()}"
    else:
        text = str(notice.result)
    where = "" if notice.cluster == IN_CLUSTER else f" on {notice.cluster}"
    text = f"{text}{where}"
    if notice.reason and notice.failed:
        text = f"{text}: {' '.join(notice.reason.split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
