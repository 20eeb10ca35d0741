"""Logging, configured in one place: structlog end to end.

Every line the process writes goes through one chain of processors:
gitopsd's own events (`structlog.get_logger(name)`) and the standard
`logging` records of the libraries (urllib3, apscheduler, the Kubernetes
client, GitPython, watchfiles) and of Python's `warnings`. Both reach the
root handler, whose structlog `ProcessorFormatter` renders them alike, so a
pod's log is one JSON object per line with the same keys everywhere —
``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event``, then the
event's fields — and a terminal gets readable lines. Without that handler a
library's warning would reach stderr through Python's last-resort handler:
in another format, unscrubbed.

The chain: the values bound with `scope`/`bind` (app, trigger, revision),
level, logger name, timestamp; then, for both kinds of record,
`format_exc_info` (a traceback becomes the ``exception`` text),
`scrub_secrets` (every field — message, exception text, nested values — is
scrubbed of known secret values, gitopsd.redact), and the renderer.

Levels (``--log-level``): gitopsd's loggers log at the level asked for.
Libraries (every logger outside ``gitopsd``) are chatty at info — the
scheduler announces every run, watchfiles every change — so they stay at
warning unless the level is debug. One stays at info even then: the
Kubernetes client's REST logger, whose debug lines are whole response
bodies, a Secret's data among them, read before gitopsd knows the values to
scrub.

Uncaught exceptions: a thread that dies of one (and the main thread)
would print Python's plain traceback to stderr — not JSON, and not
scrubbed. `configure` installs `threading.excepthook` and `sys.excepthook`
so that it becomes one error line (``event`` "uncaught exception", the
thread's name, the traceback as ``exception``) through the same chain.
KeyboardInterrupt keeps Python's own handling.

Context: `scope(app=..., trigger=...)` binds values to every line this
thread (or asyncio task) writes until the block ends, library records
included; `bind(revision=...)` adds one to the current scope once it is
known. A thread does not inherit them: `in_context(fn)` carries them into a
pool.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeVar

import structlog
from structlog.stdlib import ProcessorFormatter

from gitopsd import redact

LEVELS = ("debug", "info", "warning", "error")
#: The envelope every line starts with, in this order (JSON).
ENVELOPE = ("timestamp", "level", "logger", "event")
#: Debug lines that are response bodies: off at every level (see the module docstring).
_BODY_LOGGERS = ("kubernetes.client.rest",)

T = TypeVar("T")


def configure(*, fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every log line of the process through structlog, to ``stream`` (stdout by default).

    ``fmt``: "json", "console", or "auto" (console when the stream is a
    terminal). ``level``: one of LEVELS. Calling it again replaces the
    previous configuration (tests do; so does the CLI).
    """
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    renderer = (structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False) if console
                else structlog.processors.JSONRenderer(sort_keys=False))
    formatter = ProcessorFormatter(
        # No ExtraAdder: a record's attributes include what other handlers set on it (`message`).
        foreign_pre_chain=shared,
        processors=[
            ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub_secrets,
            *([_readable_audit] if console else [_envelope_first]),
            renderer,
        ])
    _install_handler(logging.StreamHandler(stream), formatter)
    _set_levels(_threshold(level))
    logging.captureWarnings(True)   # `warnings.warn` of a library: a log line like any other
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """A thread died of an exception: one error line (see the module docstring)."""
    if args.exc_type is SystemExit:
        return   # what the default hook ignores too
    name = args.thread.name if args.thread is not None else "?"
    structlog.get_logger("gitopsd").error("uncaught exception", thread=name,
                                          exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    """The main thread ended with an exception: one error line, or Python's own for ^C."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)
        return
    structlog.get_logger("gitopsd").error("uncaught exception", thread="MainThread",
                                          exc_info=(exc_type, exc_value, exc_traceback))


# The lines they write go through scrub_secrets: gitopsd.redact's own hooks leave them be.
_log_thread_exception.scrubs_secrets = True  # type: ignore[attr-defined]
_log_uncaught.scrubs_secrets = True  # type: ignore[attr-defined]


def scrub_secrets(_logger: Any, _method: str, event: dict) -> dict:
    """Every field of the event with known secret values replaced (see gitopsd.redact)."""
    return {key: redact.scrub_data(value) for key, value in event.items()}


@contextlib.contextmanager
def scope(**values: Any) -> Iterator[None]:
    """Bind ``values`` to every line this thread (or asyncio task) logs until
    the block ends, library records included. What `bind` adds inside ends
    with the block too; an enclosing scope's values come back."""
    saved = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved)


def bind(**values: Any) -> None:
    """Add ``values`` to the current scope (e.g. the revision, once fetched)."""
    structlog.contextvars.bind_contextvars(**values)


def in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, to run in another thread (a pool), with the values bound in
    this one: threads do not inherit context variables."""
    values = structlog.contextvars.get_contextvars()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        with scope(**values):
            return fn(*args, **kwargs)
    return run


def _threshold(level: str) -> int:
    if level not in LEVELS:
        raise ValueError(f"{level!r} is not a log level: use one of {', '.join(LEVELS)}")
    return getattr(logging, level.upper())


def _install_handler(handler: logging.Handler, formatter: logging.Formatter) -> None:
    """The root logger's one handler of ours (a previous one is replaced, others are left alone)."""
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_gitopsd", False)]:
        root.removeHandler(old)
    handler._gitopsd = True  # type: ignore[attr-defined]
    root.addHandler(handler)


def _set_levels(threshold: int) -> None:
    """gitopsd at ``threshold``; libraries at warning (or above) unless debugging."""
    logging.getLogger("gitopsd").setLevel(threshold)
    logging.getLogger().setLevel(threshold if threshold <= logging.DEBUG else max(threshold, logging.WARNING))
    for name in _BODY_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.INFO))


def _envelope_first(_logger: Any, _method: str, event: dict) -> dict:
    """timestamp, level, logger, event first, then the event's own fields, so a line reads left to right."""
    head = {key: event[key] for key in ENVELOPE if key in event}
    return {**head, **{key: value for key, value in event.items() if key not in head}}


def _readable_audit(_logger: Any, _method: str, event: dict) -> dict:
    """On a terminal, an audit record is one readable line, not a dump of nested
    dicts; JSON output keeps every field (it is the machine-readable record)."""
    if event.get("event") != "audit":
        return event
    from gitopsd.report import summary_line

    # summary_line starts with the record's time: no second timestamp.
    target = event.get("app", "")
    if event.get("cluster") not in (None, "in-cluster"):
        target = f"{target}@{event['cluster']}"
    return {"event": f"audit {target}: {summary_line(event)}", "level": event.get("level")}
