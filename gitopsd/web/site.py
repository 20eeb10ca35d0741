"""The web view's routes: the page, its static files, its JSON and its event stream.

- ``GET /``, ``/apps/TARGET``, ``/apps/TARGET/history/SEQ``: the page (one
  HTML file; the script reads the path, so every deep link is the same file).
- ``GET /ui/FILE``: the script, the style sheet and the icon, shipped in the
  package (gitopsd/web/static): no build step and no CDN, so the view works
  in a cluster without internet.
- ``GET /api/v1/apps``, ``/api/v1/apps/TARGET``,
  ``/api/v1/apps/TARGET/history/SEQ``: the documents of gitopsd.web.views.
- ``GET /api/v1/events``: server-sent events; one ``change`` event whenever
  something happened to a target (gitopsd.daemon.feed), after which the page
  reads its document again. A comment every ``HEARTBEAT`` seconds keeps
  proxies from cutting an idle stream. At most ``MAX_STREAMS`` at once: more
  are answered 503, and the page falls back to reading every few seconds.

With a token (``--ui-token-file``), everything under /api/ needs
``Authorization: Bearer TOKEN``, compared in constant time; the file is read
at each request, so a rotated Secret counts at once. The page and its static
files hold no data and need none: the page asks for the token and keeps it in
the tab's session storage. The token is never logged.

Headers: a Content-Security-Policy that allows only the page's own script
and style (no inline script, nothing from elsewhere), no framing, no
referrer, no MIME sniffing. The script writes every value with textContent,
never as HTML: a commit message is written by whoever can push.
"""

from __future__ import annotations

import hmac
import re
import urllib.parse
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import orjson

from gitopsd.web.views import NotFound, Views

HEARTBEAT = 15.0
SETTLE = 0.5        # seconds a stream waits after a change for the rest of its burst
MAX_STREAMS = 32
API = "/api/v1/"

_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
           "icon.svg": "image/svg+xml"}
_PAGE_PATH = re.compile(r"/(apps/[^/]+(/history/\d+)?/?)?")
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False   # the event stream: the server writes it (gitopsd.daemon.server)


class Site:
    def __init__(self, *, views: Views, token_file: Path | None = None) -> None:
        self.views = views
        self.feed = views.daemon.feed
        self.token_file = token_file
        self._files = {name: (resources.files("gitopsd.web") / "static" / name).read_bytes()
                       for name in (*_STATIC, "index.html")}

    @staticmethod
    def serves(path: str) -> bool:
        return path.startswith(API) or path.startswith("/ui/") or _PAGE_PATH.fullmatch(path) is not None

    def answer(self, *, path: str, authorization: str | None, forwarded: bool = False) -> Answer:
        """The answer to a GET of `path` (the caller checked the method and `serves`). `forwarded`:
        the request came from another replica (gitopsd.web.views.FORWARDED): this one's targets only."""
        if not path.startswith(API):
            return self._static(path)
        if not self._authorized(authorization):
            return Answer(401, _json({"error": "this gitopsd's web view needs a token: Authorization: Bearer TOKEN"}),
                          headers={**_HEADERS, "WWW-Authenticate": 'Bearer realm="gitopsd"'})
        route = path[len(API):].rstrip("/")
        if route == "events":
            return Answer(200, content_type="text/event-stream", headers=dict(_HEADERS), stream=True)
        try:
            status, doc = self._document(route, authorization=authorization, forwarded=forwarded)
        except NotFound as exc:
            status, doc = 404, {"error": str(exc)}
        return Answer(status, _json(doc), headers=dict(_HEADERS))

    def _document(self, route: str, *, authorization: str | None, forwarded: bool) -> tuple[int, dict]:
        # Each segment decoded on its own: a target on another cluster is `app@cluster`, which a
        # browser sends as app%40cluster; an encoded "/" stays inside its segment.
        parts = [urllib.parse.unquote(part) for part in route.split("/")]
        if parts == ["apps"]:
            return 200, self.views.apps(authorization=authorization, forwarded=forwarded)
        if len(parts) == 2 and parts[0] == "apps" or (
                len(parts) == 4 and parts[0] == "apps" and parts[2] == "history" and parts[3].isdigit()):
            url = None if forwarded else self.views.elsewhere(parts[1])
            if url is not None:   # the page of a target another replica runs is that replica's
                return self.views.from_replica(url, API + route, authorization)
            if len(parts) == 2:
                return 200, self.views.app(parts[1])
            return 200, self.views.transition(parts[1], int(parts[3]))
        raise NotFound(f"no such document: {API}{route}")

    def _static(self, path: str) -> Answer:
        if path.startswith("/ui/"):
            name = path[len("/ui/"):]
            if name not in _STATIC:
                return Answer(404, b"no such file\n", "text/plain; charset=utf-8")
            return Answer(200, self._files[name], _STATIC[name], headers=dict(_HEADERS))
        return Answer(200, self._files["index.html"], "text/html; charset=utf-8", headers=dict(_HEADERS))

    def _authorized(self, authorization: str | None) -> bool:
        if self.token_file is None:
            return True
        try:
            expected = self.token_file.read_bytes().strip()
        except OSError:
            return False   # no token to compare with: nobody gets in (the log says why at start)
        scheme, _, sent = (authorization or "").partition(" ")
        return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), expected)


def event(version: int) -> bytes:
    """One server-sent event: something changed; `version` is the feed's (gitopsd.daemon.feed)."""
    return f"event: change\ndata: {version}\n\n".encode()


def _json(doc: dict) -> bytes:
    return orjson.dumps(doc, default=str) + b"\n"
