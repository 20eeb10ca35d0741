"""Release control: which commit of its ref an app runs, and who decided it.

An app follows its ref: each reconcile deploys the app's revision, the
newest commit that changed what the app renders. Three things override that:

- **hold** (`gitopsd hold APP`): stay at a revision. Newer commits are
  recorded (result `Held`, once each) and not applied; self-heal keeps the
  held revision. `gitopsd resume APP` follows the ref again.
- **rollback** (`gitopsd rollback APP [--to SHA]`): go back to a revision now
  (default: the last one recorded Applied and Healthy before what runs) and
  hold there.
- **automatic rollback** (the app setting `rollback: {onUnhealthy: true}`): a
  revision that ends Unhealthy — the health timeout or an early verdict
  (CrashLoopBackOff, ImagePullBackOff, ProgressDeadlineExceeded, a failed
  Job) — is *quarantined* and the last healthy revision re-applied (rendered
  again from its commit, pruning what only the bad commit created, through
  the same prune guard and namespace rules as any commit). The quarantine
  holds until the app's revision moves past the bad commit (a newer commit
  that changes the app), which is deployed as usual: no flip-flop between
  the bad commit and the good one at every poll.

States (`Release.state`): `following`; `held`; `rollingBack` (decided, not
yet done: stored before the first write of the rollback, so a replica that
takes over mid-way finishes it); `rolledBack` (the automatic rollback is
done, the bad commit quarantined). A rollback's own transition is recorded
with result `RolledBack` once the re-applied revision is healthy, naming
both commits, the reason and who decided (`release` in the audit record).
A rollback target that itself ends Unhealthy is recorded Unhealthy and stays
put: gitopsd never rolls back a rollback.

Who decides (`Release.by`): `gitopsd` for the automatic rollback, the
request's `by` (`cli/<user>@<host>`) for the commands.

Where it lives. Requests: one ConfigMap per app in gitopsd's namespace,
`gitopsd-<app>.release` (no app's parent or audit segment can have that
name: app names have no dot), labelled `gitopsd.io/release-of=<app>`,
written by the CLI with its own field manager. So the commands work from a
laptop with a kubeconfig, need no port of the daemon, and survive a leader
change; the daemon watches them (one watch for every app). A request
carries an id; the daemon acts on it once (the id of the last request acted
on is part of its state). Decisions: the app's status on its ApplySet parent
(gitopsd.daemon.status, field `release`), written before anything of a
rollback is applied, and read back by a new leader with the rest of the
app's state; and every transition in the audit trail.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
import structlog

from gitopsd.daemon.reflector import Reflector
from gitopsd.engine import inventory
from gitopsd.engine.source import Revision
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube

log = structlog.get_logger("gitopsd.release")

FOLLOWING, HELD, ROLLING_BACK, ROLLED_BACK = "following", "held", "rollingBack", "rolledBack"
STATES = (FOLLOWING, HELD, ROLLING_BACK, ROLLED_BACK)
ACTIONS = ("hold", "resume", "rollback")
#: Who decides an automatic rollback.
AUTOMATIC = "gitopsd"
LABEL = "gitopsd.io/release-of"
FIELD_MANAGER = "gitopsd-release"
REQUEST_KEY = "request"
#: A request is a few hundred bytes; a larger value was not written by gitopsd.
MAX_REQUEST_BYTES = 16 * 1024


def _label(target: str) -> str:
    """A target's name as a label value: `web@eu-1` -> `web.eu-1` (no app or cluster name has a dot)."""
    return target.replace("@", ".")


def request_name(app: str) -> str:
    """The request ConfigMap of `app` (a dot: never an app's parent or audit segment)."""
    return f"{inventory.parent_name(_label(app))}.release"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(sha: str | None) -> str:
    return (sha or "")[:12]


@dataclass(frozen=True)
class Request:
    """What a person asked for (`gitopsd hold|resume|rollback`)."""

    action: str
    by: str
    revision: str | None = None    # rollback --to / the revision to hold; None: see ReleaseControl.take
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    at: str = dataclasses.field(default_factory=_now)

    def to_json(self) -> str:
        return orjson.dumps(dataclasses.asdict(self), option=orjson.OPT_SORT_KEYS).decode()

    def as_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: str) -> Request:
        """Raises ValueError saying what is wrong (a hand-edited request is refused, not guessed at)."""
        if len(raw.encode()) > MAX_REQUEST_BYTES:
            raise ValueError(f"is larger than {MAX_REQUEST_BYTES // 1024} KiB: not written by gitopsd")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        if data.get("action") not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {data.get('action')!r}")
        for key in ("by", "id", "at"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{key!r} must be a non-empty string")
        revision = data.get("revision")
        if revision is not None and not (isinstance(revision, str) and _is_sha(revision)):
            raise ValueError(f"revision must be a full commit SHA (40 hex digits), not {revision!r}")
        return cls(action=data["action"], by=data["by"], revision=revision, id=data["id"], at=data["at"])


def _is_sha(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Release:
    """The daemon's decision for one app (see the module docstring)."""

    state: str = FOLLOWING
    revision: str | None = None       # held at, or rolled back to
    quarantined: str | None = None    # the commit that ended Unhealthy (automatic rollback)
    rolled_back_from: str | None = None
    by: str = ""
    reason: str = ""
    since: str = ""
    request: str | None = None        # id of the last request acted on
    hold_after: bool = False          # a rollback by a person: hold there once done

    def pick(self, revision: Revision) -> str | None:
        """The commit to deploy when the app's revision is `revision`; None: that one."""
        if self.state in (HELD, ROLLING_BACK):
            return self.revision
        if self.state == ROLLED_BACK and revision.sha == self.quarantined:
            return self.revision
        return None

    def to_status(self) -> dict:
        """The `release` field of the app's status (camelCase, as the rest of it); empty when
        nothing was ever decided (the app simply follows its ref)."""
        if self == Release():
            return {}
        out = {"state": self.state, "revision": self.revision, "quarantined": self.quarantined,
               "rolledBackFrom": self.rolled_back_from, "by": self.by, "reason": self.reason, "since": self.since,
               "request": self.request, "holdAfter": self.hold_after}
        return {k: v for k, v in out.items() if v not in (None, "", False)}

    @classmethod
    def from_status(cls, data: object) -> Release:
        """Read back what to_status wrote; anything unreadable is the default (following), logged."""
        if not isinstance(data, dict):
            return cls()
        state = data.get("state")
        strings = {k: data.get(k) for k in ("revision", "quarantined", "rolledBackFrom", "by", "reason", "since",
                                            "request")}
        if state not in STATES or not all(v is None or isinstance(v, str) for v in strings.values()) or \
                (state != FOLLOWING and not strings["revision"]):
            log.warning("the stored release state is unreadable: following the ref", state=str(state)[:40])
            return cls()
        return cls(state=state, revision=strings["revision"], quarantined=strings["quarantined"],
                   rolled_back_from=strings["rolledBackFrom"], by=strings["by"] or "",
                   reason=strings["reason"] or "", since=strings["since"] or "", request=strings["request"],
                   hold_after=data.get("holdAfter") is True)

    def record(self) -> dict:
        """The `release` field of an audit record: the decision behind the transition."""
        return {"state": self.state, "revision": self.revision, "quarantined": self.quarantined,
                "from": self.rolled_back_from, "by": self.by, "reason": self.reason}


@dataclass
class Verdict:
    """What a run means for the release (ReleaseControl.after): how to record it, and what next."""

    result: str | None = None          # the record's result instead of the outcome's (RolledBack)
    release: dict | None = None        # the record's `release` field
    held: Revision | None = None       # a commit not applied because the app is held: record it (Held,
                                       # with the state's record() as its `release`)
    roll_back: bool = False            # an automatic rollback was just decided: run it now


class ReleaseControl:
    """One app's release state inside its runner, and the decisions that change it.

    Called only from the runner's reconcile (one at a time per app), except
    `requested`, which the request watch calls from its thread.
    """

    def __init__(self, app: str) -> None:
        self.app = app
        self.state = Release()
        self._lock = threading.Lock()           # _pending: the request watch's thread and the runner's
        self._pending: Request | None = None
        self._seen: Revision | None = None       # the app's revision, as the last run found it
        self._noted: str | None = None           # the last commit recorded Held

    def requested(self, request: Request) -> bool:
        """A request arrived (the watch); True when it is new and the runner should run."""
        with self._lock:
            if request.id == self.state.request or (self._pending and request.id == self._pending.id):
                return False
            self._pending = request
            return True

    def restore(self, status: dict | None) -> None:
        self.state = Release.from_status((status or {}).get("release"))

    def take(self, *, live: str | None,
             last_healthy: Callable[[set[str]], str | None]) -> tuple[Request | None, GitopsdError | None]:
        """Act on a pending request: (the request, None) once the state changed (the caller stores
        and records it before going on); (the request, why) when it cannot be done (nothing to
        hold, no healthy revision to roll back to: consumed all the same); (None, None) when
        there is none."""
        with self._lock:
            req, self._pending = self._pending, None
        if req is None or req.id == self.state.request:
            return None, None
        try:
            self._act(req, live=live, last_healthy=last_healthy)
        except GitopsdError as exc:
            self.state = dataclasses.replace(self.state, request=req.id)
            return req, exc
        log.info("release request", app=self.app, action=req.action, by=req.by, state=self.state.state,
                 revision=_short(self.state.revision))
        return req, None

    def _act(self, req: Request, *, live: str | None, last_healthy: Callable[[set[str]], str | None]) -> None:
        base = dict(by=req.by, since=_now(), request=req.id)
        if req.action == "resume":
            self.state = Release(reason=f"resumed by {req.by}", **base)
        elif req.action == "hold":
            at = req.revision or (self.state.revision if self.state.state != FOLLOWING else None) or live
            if at is None:
                raise GitopsdError(f"app {self.app}: nothing to hold: no revision has been applied yet",
                                   hint="hold once the app has synced, or name one: gitopsd rollback APP --to SHA")
            self.state = Release(state=HELD, revision=at, reason=f"held at {_short(at)} by {req.by}", **base)
        else:
            to = req.revision or last_healthy({s for s in (live, self.state.quarantined) if s})
            if to is None:
                raise GitopsdError(f"app {self.app}: no revision recorded Applied and Healthy before "
                                   f"{_short(live) or 'what runs'} to roll back to",
                                   hint="name one: gitopsd rollback APP --to SHA (gitopsd history APP lists them)")
            self.state = Release(state=ROLLING_BACK, revision=to, rolled_back_from=live, hold_after=True,
                                 reason=f"rollback to {_short(to)} requested by {req.by}", **base)

    @property
    def rolling_back(self) -> bool:
        """A rollback is under way: its run waits for health even if a replica that died had written it."""
        return self.state.state == ROLLING_BACK

    def pick(self, revision: Revision) -> str | None:
        self._seen = revision
        return self.state.pick(revision)

    def after(self, result: SyncResult, *, auto: bool, last_healthy: Callable[[set[str]], str | None]) -> Verdict:
        """Judge a finished run: the record's result and release field, a Held commit to record, and
        whether an automatic rollback was just decided (the caller stores the state and runs it)."""
        s, rev = self.state, result.revision
        sha = rev.sha if rev is not None else None
        ran = result.outcome in (Outcome.APPLIED, Outcome.NO_CHANGE, Outcome.UNHEALTHY)
        if s.state == ROLLING_BACK and ran and sha == s.revision:
            healthy = result.outcome != Outcome.UNHEALTHY
            done = HELD if s.hold_after else ROLLED_BACK
            note = "" if healthy else f"; {_short(sha)} is not healthy either, and stays (no rollback of a rollback)"
            self._noted = self._seen.sha if self._seen is not None else None   # what it went back from: no Held
            self.state = dataclasses.replace(s, state=done, reason=s.reason + note)
            return Verdict(result="RolledBack" if healthy else None, release=self.state.record())
        if s.state == ROLLED_BACK and ran and sha is not None and sha not in (s.revision, s.quarantined):
            log.info("a newer commit ends the quarantine", app=self.app, quarantined=_short(s.quarantined),
                     revision=_short(sha))
            self.state = s = Release(request=s.request, since=_now(), reason=f"following again from {_short(sha)}")
        verdict = Verdict()
        seen = self._seen
        if s.state == HELD and seen is not None and seen.sha not in (s.revision, self._noted):
            self._noted = seen.sha
            verdict.held = seen
        if (s.state == FOLLOWING and auto and result.outcome == Outcome.UNHEALTHY and sha is not None):
            good = last_healthy({sha})
            if good is None:
                log.warning("revision ended Unhealthy and there is no healthy revision to roll back to",
                            app=self.app, revision=_short(sha))
                return verdict
            self.state = Release(state=ROLLING_BACK, revision=good, quarantined=sha, rolled_back_from=sha,
                                 by=AUTOMATIC, since=_now(), request=s.request,
                                 reason=f"{_short(sha)} ended Unhealthy: {result.reason or 'not healthy'}")
            verdict.roll_back = True
            verdict.release = self.state.record()
        return verdict


# ---------------------------------------------------------------------------- requests in the cluster

def write_request(kube: Kube, *, namespace: str, app: str, request: Request) -> None:
    """Store a request for the daemon (the CLI's side)."""
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": request_name(app), "namespace": namespace,
                         "labels": {LABEL: _label(app), "app.kubernetes.io/managed-by": "gitopsd"}},
            "data": {REQUEST_KEY: request.to_json()}}
    kube.apply(body, field_manager=FIELD_MANAGER)


def request_of(obj: dict) -> tuple[str, Request] | None:
    """(app, request) from a request ConfigMap; None (logged) when it is not readable."""
    meta = obj.get("metadata") or {}
    app = ((meta.get("labels") or {}).get(LABEL) or "").replace(".", "@", 1)
    raw = (obj.get("data") or {}).get(REQUEST_KEY)
    if not app or meta.get("name") != request_name(app) or not isinstance(raw, str):
        return None
    try:
        return app, Request.from_json(raw)
    except ValueError as exc:
        log.warning("unreadable release request: ignored", configmap=meta.get("name"), error=str(exc))
        return None


class RequestWatch:
    """The daemon's one watch of release requests: ConfigMaps labelled gitopsd.io/release-of in
    its namespace (gitopsd.daemon.reflector: list, watch, resume, relist on 410). Hands each
    new or changed request to `deliver(app, request)` and keeps the newest per app, which a
    runner taking an app over reads (`latest`): a request made while no replica ran the app
    is acted on when one does."""

    BUCKET = "requests"

    def __init__(self, kube: Kube, *, namespace: str, deliver: Callable[[str, Request], None]) -> None:
        self._deliver = deliver
        self._latest: dict[str, Request] = {}
        self._reflector = Reflector(kube, kube.resource("v1", "ConfigMap"), namespace, selector=LABEL,
                                    bucket_of=lambda obj: self.BUCKET, sink=self, kind="release-requests")

    def start(self) -> RequestWatch:
        self._reflector.start()
        return self

    def stop(self) -> None:
        self._reflector.stop()

    def latest(self, app: str) -> Request | None:
        return self._latest.get(app)

    # the reflector's Sink
    def keeps(self, bucket: str) -> bool:
        return True

    def wanted(self, taken: Callable[[frozenset[str]], None]) -> frozenset[str]:
        buckets = frozenset({self.BUCKET})
        taken(buckets)
        return buckets

    def on_event(self, stream, kind: str, bucket: str, obj: dict) -> None:
        if kind != "DELETED":
            self._take(obj)

    def on_synced(self, stream, buckets: frozenset[str]) -> None:
        for name in buckets:   # the first list: every request already stored
            for obj in stream.bucket(name).values():
                self._take(obj)

    def on_forbidden(self, stream) -> bool:
        log.warning("gitopsd may not watch ConfigMaps in its namespace: release requests (gitopsd hold, "
                    "resume, rollback) are not seen", hint="grant list and watch on configmaps (deploy/rbac.yaml)")
        return True

    def _take(self, obj: dict) -> None:
        found = request_of(obj)
        if found is None:
            return
        app, request = found
        if self._latest.get(app) == request:
            return
        self._latest[app] = request
        self._deliver(app, request)


# ---------------------------------------------------------------------------- the CLI's side

def make_request(kube: Kube, *, namespace: str, app: str, action: str, to: str | None, by: str) -> Request:
    """The request for `gitopsd hold|resume|rollback`, its revision resolved from the audit trail:

    - rollback without --to: the last revision recorded Applied and Healthy before what runs;
    - hold without a revision: what runs (the last revision the cluster converged to);
    - --to: a full SHA, or the prefix of one revision the trail records (at least 7 characters).

    Raises GitopsdError saying why it cannot be done. Reads only the app's audit trail.
    """
    from gitopsd import audit

    live = audit.last_revision(kube, namespace=namespace, app=app)
    revision = None
    if to is not None:
        revision = to if _is_sha(to) else _recorded(kube, namespace=namespace, app=app, prefix=to)
    elif action == "rollback":
        revision = audit.last_healthy(kube, namespace=namespace, app=app, besides={live} if live else set())
        if revision is None:
            raise GitopsdError(f"app {app}: no revision recorded Applied and Healthy before {_short(live) or 'now'} "
                               f"to roll back to", hint="name one with --to SHA (gitopsd history lists them)")
    elif action == "hold":
        revision = live
        if revision is None:
            raise GitopsdError(f"app {app}: nothing to hold: no revision is recorded as applied in {namespace}",
                               hint="is the app's name and gitopsd's namespace (--namespace) right?")
    return Request(action=action, by=by, revision=revision)


def _recorded(kube: Kube, *, namespace: str, app: str, prefix: str) -> str:
    from gitopsd import audit

    prefix = prefix.lower()
    if len(prefix) < 7 or not all(c in "0123456789abcdef" for c in prefix):
        raise GitopsdError(f"--to {prefix!r}: give a commit SHA (at least 7 hex digits)")
    found = {r["revision"] for r in audit.history(kube, namespace=namespace, app=app)
             if r.get("type") == "transition" and isinstance(r.get("revision"), str)
             and r["revision"].startswith(prefix)}
    if len(found) != 1:
        why = "matches no revision" if not found else f"matches {len(found)} revisions"
        raise GitopsdError(f"--to {prefix}: {why} in the audit trail of app {app}",
                           hint="give the full 40-character SHA (any commit of the app's repository)")
    return found.pop()


def acted_on(kube: Kube, *, namespace: str, app: str, request: Request) -> dict | None:
    """The app's stored release state once the daemon has acted on `request`, else None."""
    from gitopsd.daemon import status as status_mod

    parent = kube.get(kube.resource("v1", "ConfigMap"), inventory.parent_name(app), namespace)
    release = (status_mod.of_parent(parent) or {}).get("release")
    return release if isinstance(release, dict) and release.get("request") == request.id else None
