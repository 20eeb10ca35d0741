"""Kubernetes Events (events.k8s.io/v1) for audit records, so `kubectl describe` shows what gitopsd did.

One Event per record on the app's ApplySet parent ConfigMap
(``gitopsd-<app>``), whose note counts what the transition created,
configured and pruned; a drift record adds one on the object that drifted,
where whoever edited it will look. A transition has no Event per object it
wrote, as Flux's kustomize-controller records on the Kustomization alone:
on a fleet's first sync those were five of an app's 35 requests, and the
audit record (gitopsd history) names every object and field anyway.

Events are best effort (the apiserver expires them after an hour); a
failed Event write is logged and never fails the record. Their notes are
rendered by gitopsd.report (event_note, object_note): paths only, never
values.
"""

from __future__ import annotations

import time

from gitopsd import redact
from gitopsd.audit.segments import AUDIT_APP_LABEL
from gitopsd.engine import inventory
from gitopsd.engine.sync import Outcome
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube
from gitopsd.report import EVENT_NOTE_MAX, event_note, object_note

REPORTING_CONTROLLER = "gitopsd.io/gitopsd"
WARNING_RESULTS = frozenset({Outcome.FAILED.value, Outcome.UNHEALTHY.value, Outcome.REFUSED.value, "RolledBack"})


class EventRecorder:
    """Announces stored records as Events; remembers each app's parent uid (an Event's `regarding` names it)."""

    def __init__(self, kube: Kube, *, namespace: str, logger) -> None:
        self.kube = kube
        self.namespace = namespace
        self._log = logger
        self._parent_uids: dict[str, str] = {}

    def remember_parent(self, app: str, uid: str | None) -> None:
        """The parent's uid as a write of it returned it, so the next Event need not GET it."""
        if uid:
            self._parent_uids[app] = uid

    def announce(self, rec: dict) -> None:
        """One Event on the app's parent; for a drift record, one more on the object that drifted."""
        app = rec["app"]
        parent = inventory.parent_name(app)
        targets: list[tuple[dict, str]] = [(
            {"apiVersion": "v1", "kind": "ConfigMap", "namespace": self.namespace, "name": parent,
             **({"uid": uid} if (uid := self._parent_uid(app)) else {})},
            event_note(rec))]
        if rec.get("type") == "drift" and (regarding := self._regarding(rec["object"])) is not None:
            targets.append((regarding, object_note(rec, rec["object"])))
        for regarding, note in targets:
            self._event(rec, regarding=regarding, note=note)

    def _regarding(self, obj: dict) -> dict | None:
        """An Event's `regarding` for an object a record names (None: the cluster no longer serves its kind)."""
        res = self.kube.resource_for_group_kind(obj.get("group", ""), obj.get("kind", ""))
        if res is None:
            return None
        regarding = {"apiVersion": res.api_version, "kind": obj["kind"], "name": obj["name"]}
        if obj.get("namespace"):
            regarding["namespace"] = obj["namespace"]
        if obj.get("uid"):
            regarding["uid"] = obj["uid"]
        return regarding

    def _parent_uid(self, app: str) -> str | None:
        uid = self._parent_uids.get(app)
        if uid is None:
            try:
                parent = self.kube.get(self.kube.resource("v1", "ConfigMap"), inventory.parent_name(app),
                                       self.namespace)
            except GitopsdError:
                parent = None
            uid = ((parent or {}).get("metadata") or {}).get("uid")
            if uid:
                self._parent_uids[app] = uid
        return uid

    def _event(self, rec: dict, *, regarding: dict, note: str) -> None:
        if rec.get("type") == "drift":
            reason = {"corrected": "DriftCorrected", "reported": "DriftReported",
                      "failed": "DriftCorrectionFailed"}[rec["action"]]
            warning, action = rec["action"] != "corrected", "SelfHeal"
        elif rec.get("type") == "release":
            reason = {"hold": "Hold", "resume": "Resume", "rollback": "RollbackRequested"}.get(
                str(rec.get("action")), "Release")
            warning, action = bool(rec.get("error")), "Release"
        else:
            reason = rec.get("result") or "Unknown"
            warning, action = reason in WARNING_RESULTS, "Sync"
        # Events live beside what they are about; cluster-scoped objects' in "default", as client-go does.
        namespace = regarding.get("namespace") or "default"
        body = {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": f"{regarding['name'][:200]}.{time.time_ns():x}", "namespace": namespace,
                         "labels": {AUDIT_APP_LABEL: rec["app"]},
                         "annotations": {"gitopsd.io/audit-seq": str(rec.get("seq", "")),
                                         "gitopsd.io/audit-hash": rec.get("hash", "")}},
            "eventTime": rec["time"], "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": str(rec.get("instance", ""))[:128] or "gitopsd",
            "action": action, "reason": reason, "type": "Warning" if warning else "Normal",
            "regarding": regarding, "note": redact.scrub(note)[:EVENT_NOTE_MAX],
        }
        try:
            events = self.kube.resource("events.k8s.io/v1", "Event")
            self.kube.request("POST", events.path(namespace), body=body)
        except GitopsdError as exc:
            self._log.warning("audit_event_failed", app=rec["app"], regarding=regarding.get("name"), error=str(exc))
