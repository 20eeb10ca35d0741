"""Logging configuration, in one place (structlog).

The same event is one JSON object per line in production (stdout of a pod)
and a readable line on a terminal. Library code only calls
`structlog.get_logger(name)`; this module decides how events look.

Every event passes `scrub_secrets` after exceptions are formatted and before
it is rendered: each field — the message, exception text, tracebacks,
nested values — is scrubbed of known secret values (gitopsd.redact). Records
from the standard `logging` module (libraries: the scheduler, urllib3) are
rendered by the same chain, so they are scrubbed too.
"""

from __future__ import annotations

import logging
import sys

import structlog

from gitopsd import redact


def configure(*, fmt: str = "auto", level: str = "info", stream=None) -> None:
    """fmt: "json", "console", or "auto" (console when the stream is a terminal)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    console = fmt == "console"
    renderer = (structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False) if console
                else structlog.processors.JSONRenderer(sort_keys=False))
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.format_exc_info,
        scrub_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            *([_readable_audit] if console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(stream=stream, renderer=renderer, shared=shared,
                          level=getattr(logging, level.upper(), logging.INFO))


def scrub_secrets(_logger, _method, event: dict) -> dict:
    """Every field of the event with known secret values replaced (see gitopsd.redact)."""
    return {key: redact.scrub_data(value) for key, value in event.items()}


def _route_stdlib_logging(*, stream, renderer, shared: list, level: int) -> None:
    """Send `logging` records (third-party libraries) through the same processors and renderer.

    Without a handler, Python's last-resort handler prints a library's
    warning and its traceback to stderr unscrubbed and in another format.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_gitopsd", False)]:
        root.removeHandler(old)
    handler._gitopsd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # Libraries are chatty at info; their warnings are what an operator needs.
    root.setLevel(max(level, logging.WARNING))


def _readable_audit(_logger, _method, event: dict) -> dict:
    """On a terminal, an audit record is one readable line, not a dump of nested
    dicts; JSON output keeps every field (it is the machine-readable record)."""
    if event.get("event") != "audit":
        return event
    from gitopsd.report import summary_line

    # summary_line starts with the record's time: no second timestamp.
    return {"event": f"audit {event.get('app', '')}: {summary_line(event)}", "level": event.get("level")}
