"""Audit: one record per commit-to-cluster transition and per drift, tamper-evident.

This is the Record stage of DESIGN.md §2 and the part auditors read years
later: which commit was live at time T, who wrote it, and who changed the
cluster by hand in between. Every record goes three ways — a structlog line
on stdout, Kubernetes Events, and a durable hash-chained store in the
cluster — and each job has its module:

- ``records``  — what a transition or drift record holds, its canonical JSON
  and hash (the chain rule), the size cap;
- ``store``    — AuditLog, the writer: chains a record on the app's head,
  logs it, stores it (with a backlog while the apiserver is away) and
  announces it;
- ``segments`` — the store itself: ConfigMap segments in gitopsd's
  namespace, why that store, sealing and retention;
- ``head``     — the chain head and its copy on the app's ApplySet parent,
  which makes a deleted newest segment detectable;
- ``verify``   — ``gitopsd audit verify``: the first broken link, named;
- ``history``  — ``gitopsd history``: records newest first, what was live at
  an instant, the last converged revision;
- ``events``   — the Kubernetes Events.

Rendering records as text (``gitopsd history`` lines, Event notes, the order
of a log line's fields) lives with the other human-readable output in
gitopsd.report. The names below are the package's public surface.
"""

from gitopsd.audit.events import (
                                   REPORTING_CONTROLLER,
                                   WARNING_RESULTS,
)
from gitopsd.audit.head import HEAD_FIELD_MANAGER, HEAD_SEGMENT_ANNOTATION
from gitopsd.audit.history import (
                                   history,
                                   last_healthy,
                                   last_revision,
                                   live_at,
                                   parse_time,
)
from gitopsd.audit.records import (
                                   CLUSTER_CHANGING,
                                   CONVERGED,
                                   DRIFT_ACTIONS,
                                   GENESIS_HASH,
                                   HELD,
                                   MAX_MESSAGE_CHARS,
                                   RECORD_MAX_BYTES,
                                   ROLLED_BACK,
                                   canonical,
                                   cli_instance,
                                   default_instance,
                                   drift_record,
                                   record_hash,
                                   release_record,
                                   transition_record,
)
from gitopsd.audit.segments import (
                                   AUDIT_APP_LABEL,
                                   DEFAULT_RETENTION,
                                   FIRST_SEQ_ANNOTATION,
                                   HEAD_ANNOTATION,
                                   RETAINED_FROM_ANNOTATION,
                                   SEGMENT_MAX_BYTES,
                                   SEGMENT_MAX_RECORDS,
                                   SEGMENT_PREFIX,
                                   list_segments,
                                   segment_name,
)
from gitopsd.audit.store import APPEND_ATTEMPTS, MAX_BACKLOG, AuditLog
from gitopsd.audit.verify import verify
from gitopsd.report import (
                                   EVENT_NOTE_MAX,
                                   event_note,
                                   live_at_text,
                                   log_fields,
                                   object_note,
                                   summary_line,
)

__all__ = [
    "APPEND_ATTEMPTS", "AUDIT_APP_LABEL", "AuditLog", "CLUSTER_CHANGING", "CONVERGED", "DEFAULT_RETENTION",
    "DRIFT_ACTIONS", "EVENT_NOTE_MAX", "FIRST_SEQ_ANNOTATION", "GENESIS_HASH", "HEAD_ANNOTATION",
    "HEAD_FIELD_MANAGER", "HEAD_SEGMENT_ANNOTATION", "MAX_BACKLOG", "MAX_MESSAGE_CHARS",
    "RECORD_MAX_BYTES", "REPORTING_CONTROLLER", "ROLLED_BACK", "RETAINED_FROM_ANNOTATION", "SEGMENT_MAX_BYTES",
    "SEGMENT_MAX_RECORDS", "SEGMENT_PREFIX", "list_segments", "WARNING_RESULTS", "canonical", "cli_instance", "default_instance",
    "drift_record", "event_note", "HELD", "history", "last_healthy", "last_revision", "live_at", "live_at_text", "log_fields",
    "object_note", "parse_time", "record_hash", "release_record", "segment_name", "summary_line", "transition_record", "verify",
]
