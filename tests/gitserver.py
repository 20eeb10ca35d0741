"""A real smart-HTTP git server for tests, on 127.0.0.1 only.

`git http-backend` (the CGI git ships) behind Python's http.server, with HTTP
Basic auth in front: close to what GitHub/GitLab do for https fetches, and
enough to prove that a token reaches the server and nowhere else. Given a
certificate and key (`tls`), it serves https, as a forge with a private CA does.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from receivers import TLSFiles

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


@dataclass
class GitHTTPServer:
    """Serves every repository under ``root`` as ``http://127.0.0.1:<port>/<name>``.

    Requests must carry Basic auth ``username:token``; anything else is
    answered 401, like a real forge. ``auth_headers`` records what clients
    sent, so a test can check the token travelled in the header.
    """

    root: Path
    username: str
    token: str
    auth_headers: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)   # "GET /remote.git/info/refs?service=...", in order
    tls: TLSFiles | None = None   # serve https with its certificate (tests/receivers.py)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def sessions(self) -> int:
        """Git sessions served so far: each (ls-remote, fetch) begins with one GET of info/refs."""
        return sum(1 for r in self.requests if r.startswith("GET ") and "/info/refs" in r)

    def url(self, name: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/{name}"

    def start(self) -> GitHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def _serve(self) -> None:
                header = self.headers.get("Authorization", "")
                owner.auth_headers.append(header)
                owner.requests.append(f"{self.command} {self.path}")
                expected = "Basic " + base64.b64encode(f"{owner.username}:{owner.token}".encode()).decode()
                if header != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self._body()
                path, _, query = self.path.partition("?")
                env = {
                    "GIT_PROJECT_ROOT": str(owner.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command,
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": owner.username,
                    "REMOTE_ADDR": self.client_address[0],
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                    "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                    "PATH": "/usr/bin:/bin",
                }
                done = subprocess.run([HTTP_BACKEND], input=body, capture_output=True, env=env, check=False)
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = done.stdout.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            # The handshake runs at accept; a client that refuses the certificate fails only its own.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
