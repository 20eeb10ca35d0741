"""The web view's documents: what each page shows, as JSON, from the daemon's memory.

Every answer is made from what the daemon holds anyway — the runners' status
and verdicts, the desired objects of their last plan, the live objects in
their cluster's informers, the trail kept by gitopsd.web.trail — so a page
view sends no request to the apiserver. The exceptions, each once and then
kept: the first view of a target reads its newest records, `audit verify`
reads the chain when its head has moved, and a record older than those kept
is read from the trail. An object no informer covers yet is shown as not
watched rather than fetched.

Replicas: with --shards each replica runs the targets of the shards it
holds, and a standby runs none; a browser behind the Service reaches any of
them. So the apps table asks each other replica that runs some of the
targets for its own rows (once per table read, all replicas at once, with a
short timeout), and the page of a target run elsewhere is that replica's
page, read from it. The URL is the one each replica publishes on its Lease
for forwarded webhooks (--advertise-url); the request carries the browser's
token and a header that stops the other replica from asking further. A
replica that does not answer leaves its targets' rows as this one knows
them, with the reason.

Nothing here can hold a Secret value: records are scrubbed when written,
diff texts are masked when made, objects are shown by name and health only,
and every document is scrubbed by value once more (gitopsd.redact) before it
leaves (`scrubbed`).
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from gitopsd import redact
from gitopsd.engine import health as health_mod
from gitopsd.engine import health_exprs
from gitopsd.web.trail import Trails, Where

if TYPE_CHECKING:
    from gitopsd.daemon.core import Daemon
    from gitopsd.daemon.runner import AppRunner

DRIFTS = 50       # drift records on an app page, newest first
HISTORY = 100     # transitions on an app page, newest first
REPLICA_TIMEOUT = 3.0   # seconds another replica has to answer for its targets
FORWARDED = "X-Gitopsd-Forwarded"   # on a request from another replica: answer with this one's own targets only


class NotFound(LookupError):
    pass


class Views:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.trails = Trails(where=self._where)
        daemon.feed.listen(self.trails.on_event)

    def _where(self, target: str) -> Where | None:
        runner = self.daemon.runners.get(target)
        if runner is None:
            return None
        return Where(kube=runner.link.kube, namespace=self.daemon.namespace, app=runner.cfg.name)

    def _runner(self, target: str) -> AppRunner:
        runner = self.daemon.runners.get(target)
        if runner is None:
            raise NotFound(f"no app {target} is run by this gitopsd")
        return runner

    # ------------------------------------------------------------ /api/v1/apps

    def apps(self, *, authorization: str | None = None, forwarded: bool = False) -> dict:
        """The apps table: /status's rows, each with its commit's subject and author; the rows of
        targets another replica runs are that replica's (unless this request came from one)."""
        status = self.daemon.status_json()
        elsewhere: dict[str, list[dict]] = {}
        for row in status["apps"]:
            row["target"] = key = _key(row)
            runner = self.daemon.runners.get(key)
            row["commit"] = _commit(runner) if runner is not None else None
            url = None if forwarded else self.elsewhere(key)
            if url is not None:
                elsewhere.setdefault(url, []).append(row)
        answers = self._ask_replicas(sorted(elsewhere), "/api/v1/apps", authorization)
        replaced = {}
        for url, rows in elsewhere.items():
            doc, error = answers[url]
            theirs = {r.get("target"): r for r in (doc or {}).get("apps", []) if isinstance(r, dict)}
            for row in rows:
                if row["target"] in theirs:
                    replaced[row["target"]] = {**theirs[row["target"]], "replica": url}
                else:
                    row.update(replica=url, reason=f"run by the replica at {url}, whose web view "
                                                   f"{'did not answer: ' + error if error else 'does not list it'}")
        status["apps"] = [replaced.get(row["target"], row) for row in status["apps"]]
        return scrubbed({**status, "version": self.daemon.feed.version})

    def elsewhere(self, target: str) -> str | None:
        """The URL of the replica that runs `target`, when it is not this one."""
        if target not in self.daemon.runners:
            return None
        return self.daemon.leadership.owner_url(target)

    def from_replica(self, url: str, path: str, authorization: str | None) -> tuple[int, dict]:
        """(status, document) of `path` as the replica at `url` answers it (502 when it does not)."""
        status, doc, error = _ask(url, path, authorization)
        if error is not None:
            return 502, {"error": f"the replica at {url}, which runs this app, did not answer: {error}"}
        return status, scrubbed({**doc, "replica": url})

    def _ask_replicas(self, urls: list[str], path: str, authorization: str | None) -> dict[str, tuple]:
        if not urls:
            return {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
            futures = {url: pool.submit(_ask, url, path, authorization) for url in urls}
        out = {}
        for url, future in futures.items():
            status, doc, error = future.result()
            out[url] = (doc, error if error else None if status == 200 else f"HTTP {status}")
        return out

    # ------------------------------------------------------------ /api/v1/apps/TARGET

    def app(self, target: str) -> dict:
        runner = self._runner(target)
        row = {**runner.status(), "target": target, "running": runner.running, "commit": _commit(runner)}
        doc = {"app": row, "objects": self._objects(runner), "version": self.daemon.feed.version,
               "repo": {"url": runner.cfg.repo, "ref": runner.cfg.ref, "path": runner.cfg.path}}
        try:
            records = self.trails.records(target)
        except Exception as exc:  # noqa: BLE001 - the page shows the rest and says why the trail is missing
            doc.update(trailError=f"cannot read the audit trail: {exc}", lastTransition=None, transitions=[],
                       drifts=[], verify=None)
            return scrubbed(doc)
        transitions = [r for r in records if r.get("type") in ("transition", "release")]
        last = next((r for r in records if r.get("type") == "transition"), None)
        doc.update(
            lastTransition=last,
            transitions=[_summary(r) for r in transitions[:HISTORY]],
            drifts=[r for r in records if r.get("type") == "drift"][:DRIFTS],
            verify=self.trails.verify(target),
        )
        return scrubbed(doc)

    def _objects(self, runner: AppRunner) -> list[dict]:
        """The app's objects as its last plan wants them, each with its live health.

        Health is computed from the informers' copy with the app's own rules
        (healthCheckExprs), the same reading a health wait makes.
        """
        rules = health_exprs.rules_of(runner.cfg.health_check_exprs)
        out = []
        for ref in sorted(runner.desired.refs(), key=lambda r: (r.group, r.kind, r.namespace or "", r.name)):
            row = {"group": ref.group, "kind": ref.kind, "namespace": ref.namespace, "name": ref.name,
                   "file": runner.desired.source(ref)}
            seen = runner.cache.read(ref, after=None)
            if not seen.covered:
                row.update(health="NotWatched", message="no informer covers this kind yet")
            elif seen.obj is None:
                row.update(health="Missing", message="not in the cluster")
            else:
                status, message = health_mod.compute(seen.obj, rules=rules)
                row.update(health=status.value, message=message)
            out.append(row)
        return out

    # ------------------------------------------------------------ /api/v1/apps/TARGET/history/SEQ

    def transition(self, target: str, seq: int) -> dict:
        runner = self._runner(target)
        rec = self.trails.record(target, seq)
        if rec is None:
            raise NotFound(f"app {target} has no record {seq} in its trail")
        diff = self.trails.diff(target, seq)
        note = None
        if diff is None and rec.get("type") == "transition":
            note = ("the diff text of a transition is kept in this daemon's memory only (the audit record keeps "
                    "the changed field paths, never values); this one is from before a restart or older than "
                    "the newest transitions kept, so only its field paths are shown")
        return scrubbed({"app": {"app": runner.cfg.name, "cluster": runner.link.name, "target": target},
                         "record": rec, "diff": diff, "diffNote": note, "version": self.daemon.feed.version})


def _ask(url: str, path: str, authorization: str | None) -> tuple[int, dict, str | None]:
    """GET another replica's document: (status, JSON, None), or (0, {}, why) when it did not answer."""
    headers = {FORWARDED: "1", "Accept": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    req = urllib.request.Request(url.rstrip("/") + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REPLICA_TIMEOUT) as resp:   # noqa: S310 - an advertised http URL
            return resp.status, json.loads(resp.read()), None
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read()), None
        except ValueError:
            return exc.code, {"error": f"HTTP {exc.code}"}, None
    except (OSError, ValueError) as exc:
        return 0, {}, f"{type(exc).__name__}: {exc}"


def _key(row: dict) -> str:
    cluster = row.get("cluster")
    return row["app"] if cluster in (None, "in-cluster") else f"{row['app']}@{cluster}"


def _commit(runner: AppRunner) -> dict | None:
    """The commit live (or being applied) as the runner last resolved it: subject, author, time."""
    result = runner.last_result
    known = [r for r in (runner.desired_revision, result.revision if result is not None else None) if r is not None]
    # The one live (a NoChange run moves the revision on without a transition), else the newest known.
    rev = next((r for r in known if r.sha == runner.last_applied), known[0] if known else None)
    if rev is None:
        return None
    subject = rev.message.splitlines()[0] if rev.message else ""
    return {"sha": rev.sha, "subject": subject[:200], "author": rev.author, "time": rev.time.isoformat()}


def _summary(rec: dict) -> dict:
    """A history row: what a timeline shows of one transition (the page of the record has the rest)."""
    commit = rec.get("commit") or {}
    message = commit.get("message") or ""
    plan = rec.get("plan") or {}
    return {
        "seq": rec.get("seq"), "type": rec.get("type"), "time": rec.get("time"), "trigger": rec.get("trigger"),
        "revision": rec.get("revision"), "previous": rec.get("previous"),
        "subject": message.splitlines()[0][:200] if message else "", "author": commit.get("author"),
        "result": rec.get("result"), "health": (rec.get("health") or {}).get("outcome"),
        "duration": rec.get("duration_seconds"), "reason": rec.get("reason"),
        "changes": len(plan.get("objects") or []), "action": rec.get("action"), "by": rec.get("by"),
    }


def scrubbed(doc: dict) -> dict:
    """The document with every string scrubbed of Secret values gitopsd has seen (the last line of defence)."""
    return redact.scrub_data(doc)
