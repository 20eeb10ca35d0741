"""Logging configuration, in one place (structlog).

The same event is one JSON object per line in production (stdout of a pod)
and a readable line on a terminal. Library code only calls
`structlog.get_logger(name)`; this module decides how events look.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, fmt: str = "auto", level: str = "info", stream=None) -> None:
    """fmt: "json", "console", or "auto" (console when the stream is a terminal)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    console = fmt == "console"
    renderer = (structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False) if console
                else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.format_exc_info,
            *([_readable_audit] if console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _readable_audit(_logger, _method, event: dict) -> dict:
    """On a terminal, an audit record is one readable line, not a dump of nested
    dicts; JSON output keeps every field (it is the machine-readable record)."""
    if event.get("event") != "audit":
        return event
    from gitopsd.audit import summary_line

    # summary_line starts with the record's time: no second timestamp.
    return {"event": f"audit {event.get('app', '')}: {summary_line(event)}", "level": event.get("level")}
