"""The daemon's one HTTP port: push webhooks, health probes, metrics, status.

Routes:

- ``POST /hooks/github``, ``/hooks/gitlab``, ``/hooks/generic``: read the
  body (at most ``MAX_BODY`` bytes, else 413), verify it with the secret
  (401), parse it (400; 202 for events we ignore such as GitHub's ``ping``),
  hand the ``PushEvent`` to ``on_push`` and answer **202 Accepted** with
  ``{"triggered": [app, ...]}``. 202 rather than 200 because the syncs are
  only enqueued, not done, when we answer. Each delivery counts once in
  ``gitopsd_webhook_requests_total{provider, result}``.
- ``GET /healthz`` (liveness), ``GET /readyz`` (readiness): 200 ``ok`` or
  503 with the reason as plain text.
- ``GET /metrics``: the Prometheus text format of ``registry``.
- ``GET /status``: JSON from the ``status`` callable (404 without one).

Anything else is 404; a known path with the wrong method is 405 with
``Allow``. ``HEAD`` works wherever ``GET`` does.

The handler threads never do real work: ``on_push`` must only enqueue (it is
called from several request threads at once, so it must be thread-safe).
Requests time out after ``REQUEST_TIMEOUT`` seconds so a slow client cannot
hold a thread forever. The secret is read through a callable at each request,
so a hot-reloaded config takes effect on the next delivery; neither it nor a
received signature is ever logged or echoed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
import structlog

from gitopsd import metrics, webhook
from gitopsd.errors import GitopsdError
from gitopsd.webhook import normalize_repo_url, PushEvent, WebhookError

MAX_BODY = 5 * 1024 * 1024  # bounds memory per request; real push payloads are far smaller
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request
# After a 413 we read and discard up to this much (for at most DRAIN_SECONDS)
# so the client sees our answer instead of a connection reset mid-upload.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0

_HOOK_PATHS = {f"/hooks/{provider}": provider for provider in webhook.PROVIDERS}
_GET_PATHS = ("/healthz", "/readyz", "/metrics", "/status")
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


class Server:
    """The HTTP endpoint, running in a daemon thread beside the scheduler."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        on_push: Callable[[PushEvent], list[str]],
        webhook_secret: Callable[[], bytes],
        ready: Callable[[], tuple[bool, str]],
        live: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
        status: Callable[[], dict] | None = None,
        registry: prometheus_client.CollectorRegistry = metrics.REGISTRY,
        log: Any = None,
    ) -> None:
        self.host = host
        self.on_push = on_push
        self.webhook_secret = webhook_secret
        self.ready = ready
        self.live = live
        self.status = status
        self.registry = registry
        self.log = log if log is not None else structlog.get_logger("gitopsd.server")
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread. Port 0 picks a free port (see ``port``).

        Raises ``GitopsdError`` when the address cannot be bound, naming it.
        """
        if self._httpd is not None:
            raise RuntimeError("server already started")
        try:
            httpd = _HTTPServer((self.host, self._port), _Handler, app=self)
        except OSError as exc:
            raise GitopsdError(
                f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}",
                hint="pick another port (gitopsd run --http-port) or stop the process holding this one",
            ) from None
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"gitopsd-http-{self._port}", daemon=True)
        self._thread.start()
        self.log.info("http server listening", host=self.host, port=self._port)

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked for)."""
        return self._port

    def stop(self) -> None:
        """Stop accepting, close the socket and join the serving thread.

        Safe to call twice or before ``start``. Requests already being handled
        run on daemon threads and are not waited for.
        """
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=10)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, app: Server) -> None:
        self.app = app
        if ":" in address[0]:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "gitopsd"
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    # --- dispatch --------------------------------------------------------------

    def _dispatch(self) -> None:
        method = self.command
        # Not urlsplit: it would read a path starting with "//" as a host.
        path = self.path.partition("?")[0].partition("#")[0]
        if (path not in _HOOK_PATHS or method != "POST") and self._has_body():
            # Only hooks read a body; an unread one would be misread as the
            # next request on this keep-alive connection.
            self.close_connection = True
        if path in _HOOK_PATHS:
            if method != "POST":
                self._method_not_allowed(allow="POST")
                return
            self._hook(provider=_HOOK_PATHS[path])
            return
        if path in _GET_PATHS and not (path == "/status" and self.app.status is None):
            if method not in ("GET", "HEAD"):
                self._method_not_allowed(allow="GET, HEAD")
                return
            getattr(self, "_get_" + path.lstrip("/"))()
            return
        self._send(HTTPStatus.NOT_FOUND, f"no route for {path}\n".encode(), _TEXT)

    # The stdlib looks up do_<METHOD>; one dispatcher serves them all so that
    # a known path with another method is a 405, not the stdlib's 501.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch  # noqa: N815

    def _has_body(self) -> bool:
        return self.headers.get("Content-Length", "0").strip() not in ("", "0") or bool(
            self.headers.get("Transfer-Encoding"))

    @property
    def app(self) -> Server:
        return self.server.app

    # --- webhooks --------------------------------------------------------------

    def _hook(self, *, provider: str) -> None:
        started = time.monotonic()
        body = self._read_body(provider=provider)
        if body is None:
            return
        try:
            secret = self.app.webhook_secret() or b""
            if isinstance(secret, str):
                secret = secret.encode("utf-8")
            webhook.verify(provider=provider, body=body, headers=self.headers, secret=secret)
        except WebhookError as exc:
            self.app.log.warning("webhook refused", provider=provider, reason=exc.message, remote=self._remote())
            self._hook_answer(provider=provider, result="unauthorized", status=exc.status, doc={"error": exc.message})
            return
        except Exception as exc:  # the secret callable failed: a bug or an unreadable file
            self._hook_failed(provider=provider, stage="reading the webhook secret", exc=exc)
            return
        try:
            event = webhook.parse(provider=provider, body=body, headers=self.headers)
        except WebhookError as exc:
            ignored = exc.status == HTTPStatus.ACCEPTED
            self.app.log.info(
                "webhook ignored" if ignored else "webhook refused",
                provider=provider, reason=exc.message, remote=self._remote(),
            )
            result, key = ("ignored", "ignored") if ignored else ("bad_request", "error")
            self._hook_answer(provider=provider, result=result, status=exc.status, doc={key: exc.message})
            return
        try:
            triggered = list(self.app.on_push(event))
        except Exception as exc:
            self._hook_failed(provider=provider, stage="dispatching the push", exc=exc)
            return
        self.app.log.info(
            "webhook received", provider=provider, ref=event.ref,
            # normalised: a CI job's URL may embed a job token (https://user:token@...)
            repo=normalize_repo_url(event.repo_urls[0]), after=event.after,
            triggered=triggered, delivery=self._delivery_id(), remote=self._remote(),
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        self._hook_answer(
            provider=provider, result="triggered" if triggered else "no_match",
            status=HTTPStatus.ACCEPTED, doc={"triggered": triggered},
        )

    def _read_body(self, *, provider: str) -> bytes | None:
        """The request body, or None after answering 411/400/413 ourselves.

        We need Content-Length (every provider sends it); chunked uploads
        are refused with 411 rather than read without a known bound.
        """
        raw = self.headers.get("Content-Length")
        if raw is None or "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._hook_answer(provider=provider, result="bad_request", status=HTTPStatus.LENGTH_REQUIRED,
                              doc={"error": "Content-Length required"})
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._hook_answer(provider=provider, result="bad_request", status=HTTPStatus.BAD_REQUEST,
                              doc={"error": "invalid Content-Length"})
            return None
        if length > MAX_BODY:
            self.app.log.warning("webhook refused", provider=provider, reason=f"body of {length} bytes too large",
                                 remote=self._remote())
            self.close_connection = True
            self._hook_answer(provider=provider, result="too_large", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              doc={"error": f"body larger than {MAX_BODY} bytes"})
            self._drain(length=length)
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # timeout or reset mid-body: nobody is left to answer
            self.close_connection = True
            return None
        if len(body) != length:
            self.close_connection = True
            self._hook_answer(provider=provider, result="bad_request", status=HTTPStatus.BAD_REQUEST,
                              doc={"error": "body shorter than Content-Length"})
            return None
        return body

    def _drain(self, *, length: int) -> None:
        """Discard an upload we refused, bounded in bytes and time.

        Closing with unread data makes the kernel send a reset, and a client
        still writing its body would see that instead of our 413.
        """
        deadline = time.monotonic() + DRAIN_SECONDS
        left = min(length, DRAIN_LIMIT)
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _hook_failed(self, *, provider: str, stage: str, exc: Exception) -> None:
        self.app.log.warning(
            "webhook failed", provider=provider, stage=stage, error=f"{type(exc).__name__}: {exc}",
            remote=self._remote(),
        )
        self._hook_answer(provider=provider, result="error", status=HTTPStatus.INTERNAL_SERVER_ERROR,
                          doc={"error": f"internal error while {stage}"})

    def _hook_answer(self, *, provider: str, result: str, status: int, doc: dict) -> None:
        metrics.WEBHOOKS.labels(provider=provider, result=result).inc()
        self._send(status, _json_bytes(doc=doc), _JSON)

    def _delivery_id(self) -> str | None:
        return self.headers.get("X-GitHub-Delivery") or self.headers.get("X-Gitlab-Event-UUID")

    def _remote(self) -> str:
        return str(self.client_address[0]) if self.client_address else "?"

    # --- probes, metrics, status ---------------------------------------------------

    def _get_healthz(self) -> None:
        self._probe(name="liveness", check=self.app.live)

    def _get_readyz(self) -> None:
        self._probe(name="readiness", check=self.app.ready)

    def _probe(self, *, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, reason = check()
        except Exception as exc:  # a crashing check is a failing check, never a 500 loop
            self.app.log.warning(f"{name} check raised", error=f"{type(exc).__name__}: {exc}")
            ok, reason = False, f"{name} check failed: {type(exc).__name__}"
        if ok:
            self._send(HTTPStatus.OK, b"ok\n", _TEXT)
        else:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason or 'not ' + name}\n".encode(), _TEXT)

    def _get_metrics(self) -> None:
        self._send(HTTPStatus.OK, prometheus_client.generate_latest(self.app.registry),
                   prometheus_client.CONTENT_TYPE_LATEST)

    def _get_status(self) -> None:
        assert self.app.status is not None  # routed only when set
        try:
            body = _json_bytes(doc=self.app.status())
        except Exception as exc:
            self.app.log.warning("status failed", error=f"{type(exc).__name__}: {exc}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _json_bytes(doc={"error": "status unavailable"}), _JSON)
            return
        self._send(HTTPStatus.OK, body, _JSON)

    # --- plumbing ----------------------------------------------------------------

    def _method_not_allowed(self, *, allow: str) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed; use {allow}\n".encode(),
                   _TEXT, extra={"Allow": allow})

    def _send(self, status: int, body: bytes, content_type: str, *, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        return "gitopsd"  # not the Python version: nobody outside needs it

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Route the stdlib's access/error lines to our logger at debug, not stderr."""
        debug = getattr(self.app.log, "debug", None)
        if debug is not None:
            debug("http request", line=format % args, remote=self._remote())


def _json_bytes(*, doc: Any) -> bytes:
    # default=str: status documents carry datetimes and paths.
    return (json.dumps(doc, default=str, sort_keys=True) + "\n").encode()
