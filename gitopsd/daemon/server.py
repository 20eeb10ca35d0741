"""The daemon's one HTTP port: push webhooks, health probes, metrics, status.

Routes:

- ``POST /hooks/github``, ``/hooks/gitlab``, ``/hooks/generic``: read the
  body (at most ``MAX_BODY`` bytes, else 413), verify it with the secret
  (401), parse it (400; 202 for events we ignore such as GitHub's ``ping``),
  hand the ``PushEvent`` to ``on_push`` and answer **202 Accepted** with
  ``{"triggered": [app, ...]}``. 202 rather than 200 because the syncs are
  only enqueued, not done, when we answer. A delivery seen before (same
  delivery id, ref and commit within ``DELIVERY_TTL``: a provider's retry or
  a replay) is answered **200** with ``{"duplicate": true, ...}`` and not
  acted on. Each delivery counts once in
  ``gitopsd_webhook_requests_total{provider, result}``.
- ``GET /healthz`` (liveness), ``GET /readyz`` (readiness): 200 with the
  check's text (``ok``, ``ok (leader, 3 apps)``) or 503 with the reason, as plain text.
- ``GET /metrics``: the Prometheus text format of ``registry``.
- ``GET /status``: JSON from the ``status`` callable (404 without one);
  ``GET /status?summary``: JSON from ``status_summary`` (counts, not a row
  per app: cheap to poll whatever the fleet's size; without one, the full
  status). Other query parameters are ignored.
- The web view (gitopsd.web.site), unless turned off (``--no-ui``): ``GET /``,
  ``/apps/...``, ``/ui/...`` and ``/api/v1/...``; its event stream
  (``/api/v1/events``) is written here, one thread per open stream as for any
  connection, at most ``site.MAX_STREAMS`` at once.

Anything else is 404; a known path with the wrong method is 405 with
``Allow``. ``HEAD`` works wherever ``GET`` does.

The handler threads never do real work: ``on_push`` must only enqueue (it is
called from several request threads at once, so it must be thread-safe).

Slow and vanishing clients: every connection has its own thread, so a slow
one never delays another (a push webhook included). Each read waits at most
``REQUEST_TIMEOUT`` seconds, and a request must be complete — head and body —
within ``REQUEST_DEADLINE`` of its first byte being awaited, so a client
dripping a byte every few seconds (slowloris) cannot hold a thread for long
either. A client that hangs up or times out is one debug line and a count in
``gitopsd_http_connections_total{ended="client_gone"}``, never a traceback;
an unexpected exception in a handler is a bug: one error line with its
traceback (``ended="error"``).

The secret is read through a callable at each request, so a hot-reloaded
config takes effect on the next delivery; neither it nor a received signature
is ever logged or echoed.
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

from gitopsd import metrics
from gitopsd.daemon import webhook
from gitopsd.daemon.webhook import PushEvent, WebhookError, normalize_repo_url
from gitopsd.errors import GitopsdError
from gitopsd.web import site as web_site
from gitopsd.web import views as web_views
from gitopsd.web.site import Site

MAX_BODY = 5 * 1024 * 1024  # bounds memory per request; real push payloads are far smaller
REQUEST_TIMEOUT = 10.0  # seconds one read from a client may wait
REQUEST_DEADLINE = 30.0  # seconds for a whole request (head and body) to arrive
DELIVERY_TTL = 3600.0  # seconds a delivery id is remembered to recognise its duplicates
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
        status_summary: Callable[[], dict] | None = None,
        registry: prometheus_client.CollectorRegistry = metrics.REGISTRY,
        log: Any = None,
        deliveries: webhook.RecentDeliveries | None = None,
        request_deadline: float = REQUEST_DEADLINE,
        site: Site | None = None,
    ) -> None:
        self.host = host
        self.on_push = on_push
        self.webhook_secret = webhook_secret
        self.ready = ready
        self.live = live
        self.status = status
        self.status_summary = status_summary
        self.registry = registry
        self.log = log if log is not None else structlog.get_logger("gitopsd.daemon.server")
        self.deliveries = deliveries if deliveries is not None else webhook.RecentDeliveries(ttl=DELIVERY_TTL)
        self.request_deadline = request_deadline
        self.site = site
        self._streams = threading.BoundedSemaphore(web_site.MAX_STREAMS)
        self._stopping = threading.Event()
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
        httpd.deadlines.start()
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
        self._stopping.set()
        if self.site is not None:
            self.site.feed.wake_all()   # open event streams end now, not at their next heartbeat
        httpd.shutdown()
        httpd.deadlines.stop()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=10)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib's 5 drops SYNs in a burst of connections, and a push webhook
    # arriving in such a burst would wait for its retransmit (1 s and more).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, app: Server) -> None:
        self.app = app
        self.deadlines = _Deadlines(seconds=app.request_deadline)
        if ":" in address[0]:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        """One connection, start to end (the stdlib's, with our own error handling).

        The stdlib's ``handle_error`` prints a traceback to stderr for every
        client that resets its connection or stops reading; here that is a
        debug line, and only a real bug is logged as an error.
        """
        ended = "closed"
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError) as exc:  # reset, broken pipe, aborted, timed out
            ended = "client_gone"
            self.app.log.debug("http client went away", remote=_host(client_address), error=type(exc).__name__)
        except Exception:  # noqa: BLE001 - a bug in a handler must not kill the server
            ended = "error"
            self.app.log.exception("http request failed", remote=_host(client_address))
        finally:
            if self.deadlines.forget(request) and ended == "closed":
                ended = "client_gone"
                self.app.log.debug("http client too slow; connection cut", remote=_host(client_address),
                                   deadline=self.deadlines.seconds)
            self.shutdown_request(request)
            metrics.HTTP_CONNECTIONS.labels(ended=ended).inc()


class _Deadlines:
    """Cuts connections whose request has not fully arrived in time.

    The per-read timeout alone lets a client that sends one byte every few
    seconds keep its thread forever (Go's http.Server has ReadHeaderTimeout
    for the same reason). One thread checks every armed connection twice a
    second and shuts the late ones down; the blocked read then returns and
    the handler ends as for a client that hung up.
    """

    def __init__(self, *, seconds: float) -> None:
        self.seconds = seconds
        self._due: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="gitopsd-http-deadlines", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + self.seconds

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def was_cut(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._cut

    def forget(self, sock: socket.socket) -> bool:
        """Drop everything about a finished connection; True if we cut it."""
        with self._lock:
            self._due.pop(sock, None)
            if sock in self._cut:
                self._cut.discard(sock)
                return True
            return False

    def _run(self) -> None:
        step = min(0.5, self.seconds / 4)
        while not self._stop.wait(step):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due <= now]
                for s in late:
                    del self._due[s]
                    self._cut.add(s)
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "gitopsd"
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    # --- dispatch --------------------------------------------------------------

    def handle_one_request(self) -> None:
        # The deadline covers waiting for the request, its head and its body;
        # it is disarmed once we have all of it (_dispatch, or after the body).
        self.server.deadlines.arm(self.connection)
        super().handle_one_request()

    def parse_request(self) -> bool:
        # A connection cut by the deadline leaves a fragment of a request line or
        # head in the buffer: answer nothing, act on nothing.
        ok = not self.server.deadlines.was_cut(self.connection) and super().parse_request()
        if self.server.deadlines.was_cut(self.connection):
            self.close_connection = True
            return False
        return ok

    def _dispatch(self) -> None:
        method = self.command
        # Not urlsplit: it would read a path starting with "//" as a host.
        path, _, query = self.path.partition("#")[0].partition("?")
        if (path not in _HOOK_PATHS or method != "POST") and self._has_body():
            # Only hooks read a body; an unread one would be misread as the
            # next request on this keep-alive connection.
            self.close_connection = True
        if path in _HOOK_PATHS and method == "POST":
            self._hook(provider=_HOOK_PATHS[path])
            return
        self.server.deadlines.disarm(self.connection)  # nothing more to read
        if path in _HOOK_PATHS:
            self._method_not_allowed(allow="POST")
            return
        if path in _GET_PATHS and not (path == "/status" and self.app.status is None):
            if method not in ("GET", "HEAD"):
                self._method_not_allowed(allow="GET, HEAD")
                return
            if path == "/status":
                self._get_status(summary=_has_param(query, "summary"))
            else:
                getattr(self, "_get_" + path.lstrip("/"))()
            return
        if self.app.site is not None and self.app.site.serves(path):
            if method not in ("GET", "HEAD"):
                self._method_not_allowed(allow="GET, HEAD")
                return
            self._web(path=path)
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
        self.server.deadlines.disarm(self.connection)
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
        key = webhook.delivery_key(event)
        if key is not None and not self.app.deliveries.claim(key):
            self.app.log.info("webhook duplicate ignored", provider=provider, ref=event.ref, after=event.after,
                              delivery=event.delivery, remote=self._remote())
            self._hook_answer(provider=provider, result="duplicate", status=HTTPStatus.OK,
                              doc={"duplicate": True, "delivery": event.delivery, "triggered": []})
            return
        try:
            triggered = list(self.app.on_push(event))
        except Exception as exc:
            if key is not None:
                self.app.deliveries.release(key)  # not acted on: the provider's retry must be
            self._hook_failed(provider=provider, stage="dispatching the push", exc=exc)
            return
        self.app.log.info(
            "webhook received", provider=provider, ref=event.ref,
            # normalised: a CI job's URL may embed a job token (https://user:token@...)
            repo=normalize_repo_url(event.repo_urls[0]), after=event.after,
            triggered=triggered, delivery=event.delivery, remote=self._remote(),
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
        # A reset or timeout mid-body propagates: nobody is left to answer, and
        # _HTTPServer counts it as a client that went away.
        body = self.rfile.read(length)
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

    def _remote(self) -> str:
        return _host(self.client_address)

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
            self._send(HTTPStatus.OK, f"{reason or 'ok'}\n".encode(), _TEXT)   # e.g. which shards are held
        else:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason or 'not ' + name}\n".encode(), _TEXT)

    def _get_metrics(self) -> None:
        self._send(HTTPStatus.OK, prometheus_client.generate_latest(self.app.registry),
                   prometheus_client.CONTENT_TYPE_LATEST)

    def _get_status(self, *, summary: bool) -> None:
        assert self.app.status is not None  # routed only when set
        source = self.app.status_summary if summary and self.app.status_summary else self.app.status
        try:
            body = _json_bytes(doc=source())
        except Exception as exc:
            self.app.log.warning("status failed", error=f"{type(exc).__name__}: {exc}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _json_bytes(doc={"error": "status unavailable"}), _JSON)
            return
        self._send(HTTPStatus.OK, body, _JSON)

    # --- the web view (gitopsd.web.site) -------------------------------------------

    def _web(self, *, path: str) -> None:
        site = self.app.site
        assert site is not None  # routed only when set
        try:
            answer = site.answer(path=path, authorization=self.headers.get("Authorization"),
                                 forwarded=self.headers.get(web_views.FORWARDED) is not None)
        except Exception as exc:
            self.app.log.warning("web view failed", path=path, error=f"{type(exc).__name__}: {exc}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _json_bytes(doc={"error": "web view unavailable"}), _JSON)
            return
        if not answer.stream:
            self._send(answer.status, answer.body, answer.content_type, extra=answer.headers)
        elif self.command == "HEAD" or not self.app._streams.acquire(blocking=False):
            busy = self.command != "HEAD"
            self._send(HTTPStatus.SERVICE_UNAVAILABLE if busy else HTTPStatus.OK,
                       _json_bytes(doc={"error": "too many open event streams; read the documents instead"})
                       if busy else b"", _JSON if busy else answer.content_type, extra=answer.headers)
        else:
            try:
                self._stream(site=site, headers=answer.headers)
            finally:
                self.app._streams.release()

    def _stream(self, *, site: Site, headers: dict[str, str]) -> None:
        """Server-sent events until the client goes or the server stops: one `change` per feed move."""
        self.close_connection = True   # the stream is the rest of this connection
        self.send_response(HTTPStatus.OK)
        for key, value in {"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                           "Connection": "close", "X-Accel-Buffering": "no", **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        version = site.feed.version
        self.wfile.write(web_site.event(version))   # the page reads its document once it hears this
        self.wfile.flush()
        while not self.app._stopping.is_set():
            newer = site.feed.wait_newer(version, timeout=web_site.HEARTBEAT)
            # A burst (a commit of many objects, a fleet-wide push) is one event: pages read once.
            if newer != version and self.app._stopping.wait(web_site.SETTLE):
                break
            if self.app._stopping.is_set():
                break
            newer = site.feed.version
            self.wfile.write(web_site.event(newer) if newer != version else b": heartbeat\n\n")
            self.wfile.flush()
            version = newer

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


def _host(client_address: Any) -> str:
    return str(client_address[0]) if client_address else "?"


def _has_param(query: str, name: str) -> bool:
    """Whether the query string names the parameter (``summary``, ``summary=1``, ``a=b&summary``)."""
    return any(part.partition("=")[0] == name for part in query.split("&"))


def _json_bytes(*, doc: Any) -> bytes:
    # default=str: status documents carry datetimes and paths.
    return (json.dumps(doc, default=str, sort_keys=True) + "\n").encode()
