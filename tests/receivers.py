"""Local HTTP receivers for notifications, each checking requests against its provider's documented API.

A `Receiver` listens on 127.0.0.1 and records every request (`arrivals`);
`problems` collects every way a request strays from the provider's
documented shape — path, method, auth header, JSON fields and their
allowed values — and such a request is answered 422, as the forges do.
Behaviour is scripted: `fail` answers the first N requests with a status
(500 forever with N large), `retry_after` adds that header to them, `hold`
keeps each request open until the test sets the event.

Tests wait on `wait_arrivals` (a condition variable), never on a sleep.

With `tls` (a `TLSFiles`: a private CA and a certificate it signed, made by
openssl) a receiver answers https at https://localhost:PORT with that certificate. `ForwardProxy`
is an HTTP proxy on 127.0.0.1 that tunnels CONNECT and forwards plain http
requests, to this machine only, recording each request line and its
Proxy-Authorization (`seen`).

The shapes (as documented by each provider):
- GitHub: POST /repos/{owner}/{repo}/statuses/{sha}, Authorization: Bearer <token>,
  {state: error|failure|pending|success, target_url?, description? (<= 140), context?}
- GitLab: POST /api/v4/projects/{id}/statuses/{sha} with {id} a number or a URL-encoded path,
  PRIVATE-TOKEN: <token>, {state: pending|running|success|failed|canceled, ref?, name?, context?,
  target_url?, description?, coverage?, pipeline_id?}
- Gitea/Forgejo: POST /api/v1/repos/{owner}/{repo}/statuses/{sha}, Authorization: token <token>,
  {state: pending|success|error|failure|warning, target_url?, description?, context?}
- Slack incoming webhook: POST, {text, blocks?}: blocks a list of objects with a type
- gitopsd's webhook: POST, X-Gitopsd-Signature checked with gitopsd.daemon.webhook.verify_generic
"""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHA = r"[0-9a-f]{40}"
SHAPES = {
    "github": {"path": re.compile(rf"/repos/[^/]+/[^/]+/statuses/{SHA}"),
               "states": {"error", "failure", "pending", "success"},
               "keys": {"state", "target_url", "description", "context"}},
    "gitlab": {"path": re.compile(rf"/api/v4/projects/(\d+|[^/]+%2F[^/]+)/statuses/{SHA}"),
               "states": {"pending", "running", "success", "failed", "canceled"},
               "keys": {"state", "ref", "name", "context", "target_url", "description", "coverage", "pipeline_id"}},
    "gitea": {"path": re.compile(rf"/api/v1/repos/[^/]+/[^/]+/statuses/{SHA}"),
              "states": {"pending", "success", "error", "failure", "warning"},
              "keys": {"state", "target_url", "description", "context"}},
}


@dataclass
class Arrival:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def sha(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class Receiver:
    provider: str                      # github | gitlab | gitea | slack | webhook
    token: str = ""                    # the token (forges) or signing key (webhook) to expect
    fail: int = 0                      # answer the first `fail` requests with `fail_status`
    fail_status: int = 500
    fail_body: str = "upstream broke"
    retry_after: str | None = None
    hold: threading.Event | None = None
    tls: TLSFiles | None = None        # answer https with this certificate
    arrivals: list[Arrival] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - the stdlib's name
                receiver._handle(self)

            def do_PUT(self) -> None:    # noqa: N802
                receiver._handle(self)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"https://localhost:{port}" if self.tls is not None else f"http://127.0.0.1:{port}"

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_arrivals(self, count: int, *, timeout: float = 30.0, what: str = "") -> list[Arrival]:
        """The arrivals once there are at least `count` (AssertionError naming them after `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.arrivals) >= count, timeout=timeout):
                raise AssertionError(f"{self.provider}: {len(self.arrivals)} requests after {timeout}s, wanted "
                                     f"{count} {what}: {[a.body[:200] for a in self.arrivals]}")
            return list(self.arrivals)

    def wait_for(self, predicate, *, timeout: float = 30.0, what: str = "") -> Arrival:
        """The first arrival matching `predicate` (waits for it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: any(predicate(a) for a in self.arrivals), timeout=timeout):
                raise AssertionError(f"{self.provider}: no request {what} after {timeout}s: "
                                     f"{[a.body[:300] for a in self.arrivals]}")
            return next(a for a in self.arrivals if predicate(a))

    def statuses(self, sha: str | None = None) -> list[str]:
        """The commit states that arrived (for `sha`), in order."""
        return [a.json["state"] for a in self.arrivals if sha is None or a.sha == sha]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        arrival = Arrival(method=handler.command, path=handler.path, headers=dict(handler.headers.items()),
                          body=body, at=time.monotonic())
        problems = self._check(arrival)
        with self._cond:
            self.arrivals.append(arrival)
            self.problems += problems
            failing = len(self.arrivals) <= self.fail
            self._cond.notify_all()
        if self.hold is not None:
            self.hold.wait(60)
        if problems:
            return self._answer(handler, 422, {"message": "Validation Failed", "errors": problems})
        if failing:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return self._answer(handler, self.fail_status, {"message": self.fail_body}, headers)
        self._answer(handler, 201 if self.provider in SHAPES else 200, {"ok": True})

    @staticmethod
    def _answer(handler, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def _check(self, a: Arrival) -> list[str]:
        problems = []
        if a.method != "POST":
            problems.append(f"method {a.method}, not POST")
        try:
            data = a.json
        except ValueError:
            return [*problems, "the body is not JSON"]
        if a.headers.get("Content-Type") != "application/json":
            problems.append(f"Content-Type {a.headers.get('Content-Type')!r}")
        if self.provider in SHAPES:
            problems += self._check_status(a, data, SHAPES[self.provider])
        elif self.provider == "slack":
            if not isinstance(data.get("text"), str) or not data["text"]:
                problems.append("slack: no text")
            if not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in data.get("blocks", [])):
                problems.append("slack: a block without a type")
        elif self.provider == "webhook" and self.token:
            from gitopsd.daemon.webhook import WebhookError, verify_generic

            try:
                verify_generic(a.body, a.headers, self.token.encode())
            except WebhookError as exc:
                problems.append(f"webhook signature: {exc}")
        return problems

    def _check_status(self, a: Arrival, data: dict, shape: dict) -> list[str]:
        problems = []
        if not shape["path"].fullmatch(a.path):
            problems.append(f"path {a.path} is not {shape['path'].pattern}")
        want = {"github": ("Authorization", f"Bearer {self.token}"), "gitlab": ("PRIVATE-TOKEN", self.token),
                "gitea": ("Authorization", f"token {self.token}")}[self.provider]
        if a.headers.get(want[0]) != want[1]:
            problems.append(f"header {want[0]} is not the token")
        if data.get("state") not in shape["states"]:
            problems.append(f"state {data.get('state')!r} not in {sorted(shape['states'])}")
        if extra := set(data) - shape["keys"]:
            problems.append(f"unknown fields {sorted(extra)}")
        if len(data.get("description") or "") > 140:
            problems.append("description over 140 characters")
        if "target_url" in data and not str(data["target_url"]).startswith(("http://", "https://")):
            problems.append(f"target_url {data['target_url']!r} is no URL")
        return problems


@dataclass(frozen=True)
class TLSFiles:
    """A private CA (`ca`: what a client is told to trust) and a server certificate it signed for
    localhost and 127.0.0.1 (`cert`, `key`), made by openssl: a server a company CA signed."""
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, where: Path) -> TLSFiles:
        where.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=where)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=gitopsd test CA", "-keyout", "ca.key",
                "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
        (where / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem")
        return cls(ca=where / "ca.pem", cert=where / "server.pem", key=where / "server.key")


@dataclass
class Seen:
    method: str
    target: str                    # host:port for CONNECT, the absolute URL otherwise
    proxy_authorization: str | None
    headers: dict


class ForwardProxy:
    """An HTTP proxy on 127.0.0.1 (see the module docstring); refuses targets off this machine."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._cond = threading.Condition()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_CONNECT(self) -> None:   # noqa: N802 - the stdlib's name
                proxy._connect(self)

            def do_POST(self) -> None:      # noqa: N802
                proxy._forward(self)

            do_PUT = do_POST

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_seen(self, count: int, timeout: float = 30.0) -> list[Seen]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.seen) >= count, timeout=timeout):
                raise AssertionError(f"the proxy saw {len(self.seen)} requests after {timeout}s, wanted {count}")
            return list(self.seen)

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._cond:
            self.seen.append(Seen(method=handler.command, target=handler.path,
                                  proxy_authorization=handler.headers.get("Proxy-Authorization"),
                                  headers=dict(handler.headers.items())))
            self._cond.notify_all()

    @staticmethod
    def _local(host: str | None) -> bool:
        return host in ("localhost", "127.0.0.1")

    def _connect(self, handler: BaseHTTPRequestHandler) -> None:
        self._record(handler)
        host, _, port = handler.path.rpartition(":")
        if not self._local(host):
            handler.send_error(403, "this proxy reaches this machine only")
            return
        upstream = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        handler.send_response(200, "Connection established")
        handler.end_headers()
        client = handler.connection
        with upstream:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 10)
                if not ready:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (upstream if src is client else client).sendall(data)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        self._record(handler)
        url = urllib.parse.urlsplit(handler.path)
        if not url.scheme or not self._local(url.hostname):
            handler.send_error(403, "this proxy forwards absolute http URLs to this machine only")
            return
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in handler.headers.items() if not k.lower().startswith("proxy-")}
        conn = http.client.HTTPConnection("127.0.0.1", url.port, timeout=10)
        try:
            conn.request(handler.command, url.path + (f"?{url.query}" if url.query else ""), body=body,
                         headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        handler.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

