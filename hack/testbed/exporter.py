"""A metrics exporter whose request counters the test decides.

Progressive-delivery gates ask Prometheus questions such as "is the canary's
error rate under 1 %?". To prove a gate both ways, a test must be able to make
the answer true, false or absent on demand — so this exporter serves one
counter family whose growth the test sets over HTTP, and a real Prometheus
scrapes it. Stdlib only: `hack/cluster` runs it with the system python3.

Metrics (GET /metrics, Prometheus text format 0.0.4)::

    # TYPE http_requests_total counter
    http_requests_total{app="web",track="canary",code="500"} 12.5

Labels: `app` (any name), `track` (`stable` or `canary` by convention; any
value is accepted so blue/green colours work too), `code` (an HTTP status as a
string, e.g. "200", "500").

Control (JSON bodies, every field required unless a default is shown; the
answer is the series touched, as in GET /state; a bad body is a 400 naming
the field):

    POST /traffic {"app", "track", "per_second", "error_share": 0.0}
        the track serves `per_second` requests a second, a share of them
        failing: code "200" grows at per_second*(1-share) and code "500" at
        per_second*share — both changed at one instant, so no scrape sees half.
        "the canary's error rate is 5 %" is
        {"app": "web", "track": "canary", "per_second": 100, "error_share": 0.05}.
    POST /rate    {"app", "track", "code", "per_second"}   one series' growth a second (0 = flat)
    POST /inc     {"app", "track", "code", "by": 1}         add once (a burst)
    POST /reset   {} or {"app": "web"}                      forget every series (of one app): they
                                                            leave /metrics and go stale in Prometheus
    GET  /state   {"series": [{"app", "track", "code", "value", "per_second"}, ...]}
    GET  /healthz "ok"

Growth is computed, not ticked: a series keeps (value at t0, rate since t0)
and a read returns value + rate * (now - t0), so rate() over any window gives
the configured rate exactly, whatever the scrape timing, and an idle exporter
uses no CPU. A change of rate first folds the growth so far into the value, so
counters never go down (a counter that went down would read as a reset).

Run: `python3 exporter.py --port-file FILE [--port 0]` binds 127.0.0.1 only
(port 0 = a free one, picked by the kernel, so there is no race between
choosing a port and binding it) and writes the bound port to FILE once it
serves. `ExporterClient` below is the Python face of the control API.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAMILY = "http_requests_total"
LABELS = ("app", "track", "code")
ERROR_CODE, OK_CODE = "500", "200"


@dataclass
class _Series:
    value: float = 0.0       # at `since`
    per_second: float = 0.0
    since: float = 0.0       # time.monotonic()

    def now(self, at: float) -> float:
        return self.value + self.per_second * (at - self.since)

    def set_rate(self, per_second: float, at: float) -> None:
        self.value, self.since, self.per_second = self.now(at), at, per_second


class Counters:
    """The counter family: label tuple (app, track, code) -> series. Thread-safe."""

    def __init__(self, *, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], _Series] = {}

    def _get(self, key: tuple[str, str, str], at: float) -> _Series:
        return self._series.setdefault(key, _Series(since=at))

    def set_rates(self, rates: dict[tuple[str, str, str], float]) -> None:
        """Set the growth of several series at one instant (created at 0 when new)."""
        with self._lock:
            at = self._clock()
            for key, per_second in rates.items():
                self._get(key, at).set_rate(per_second, at)

    def inc(self, key: tuple[str, str, str], by: float) -> None:
        with self._lock:
            self._get(key, self._clock()).value += by

    def reset(self, *, app: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._series if app is None or k[0] == app]:
                del self._series[key]

    def snapshot(self, *, app: str | None = None) -> list[dict]:
        with self._lock:
            at = self._clock()
            return [{**dict(zip(LABELS, key)), "value": s.now(at), "per_second": s.per_second}
                    for key, s in sorted(self._series.items()) if app is None or key[0] == app]

    def exposition(self) -> str:
        lines = [f"# HELP {FAMILY} Requests served, by app, track and status code (set by the test).",
                 f"# TYPE {FAMILY} counter"]
        for s in self.snapshot():
            labels = ",".join(f'{name}="{_escape(s[name])}"' for name in LABELS)
            lines.append(f"{FAMILY}{{{labels}}} {s['value']!r}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class BadRequest(ValueError):
    """A control request the exporter cannot act on; the message names the field."""


def _field(body: dict, name: str, kind: type, default=None):
    value = body.get(name, default)
    if value is None:
        raise BadRequest(f"field {name!r} is required")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
        raise BadRequest(f"field {name!r} must be a {'number' if kind is float else 'string'}, got {value!r}")
    if kind is str and not value:
        raise BadRequest(f"field {name!r} must not be empty")
    return value


def _key(body: dict) -> tuple[str, str, str]:
    return tuple(_field(body, name, str) for name in LABELS)  # type: ignore[return-value]


def _rate(body: dict, name: str = "per_second") -> float:
    value = _field(body, name, float)
    if value < 0:
        raise BadRequest(f"field {name!r} must be >= 0 (a counter never goes down), got {value}")
    return value


def apply_control(counters: Counters, *, path: str, body: dict) -> list[dict]:
    """Act on one control request; returns the series of the app it touched."""
    if path == "/traffic":
        app, track = _field(body, "app", str), _field(body, "track", str)
        total, share = _rate(body), _field(body, "error_share", float, 0.0)
        if not 0.0 <= share <= 1.0:
            raise BadRequest(f"field 'error_share' must be between 0 and 1, got {share}")
        counters.set_rates({(app, track, OK_CODE): total * (1 - share), (app, track, ERROR_CODE): total * share})
    elif path == "/rate":
        app = (key := _key(body))[0]
        counters.set_rates({key: _rate(body)})
    elif path == "/inc":
        app = (key := _key(body))[0]
        by = _field(body, "by", float, 1.0)
        if by < 0:
            raise BadRequest(f"field 'by' must be >= 0 (a counter never goes down), got {by}")
        counters.inc(key, by)
    elif path == "/reset":
        app = _field(body, "app", str) if "app" in body else None
        counters.reset(app=app)
    else:
        raise LookupError(path)
    return counters.snapshot(app=app)


class _Handler(BaseHTTPRequestHandler):
    counters: Counters  # set on the subclass made by serve()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        if not self.path.startswith("/metrics"):  # a scrape a second would drown the log
            super().log_message(format, *args)

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.counters.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/state":
            self._send(200, json.dumps({"series": self.counters.snapshot()}))
        elif path == "/healthz":
            self._send(200, "ok", "text/plain")
        else:
            self._send(404, json.dumps({"error": f"no such endpoint: GET {path}"}))

    def do_POST(self) -> None:  # noqa: N802
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}"
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            series = apply_control(self.counters, path=self.path, body=body)
        except LookupError:
            self._send(404, json.dumps({"error": f"no such endpoint: POST {self.path} "
                                                 "(try /traffic, /rate, /inc, /reset)"}))
        except (BadRequest, json.JSONDecodeError) as exc:
            self._send(400, json.dumps({"error": f"POST {self.path}: {exc}"}))
        else:
            self._send(200, json.dumps({"series": series}))


def serve(*, port: int = 0, counters: Counters | None = None) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (not yet serving: call serve_forever)."""
    handler = type("Handler", (_Handler,), {"counters": counters or Counters()})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="test exporter (see the module docstring for its API)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--port-file", type=Path, required=True, help="written with the bound port once serving")
    args = parser.parse_args(argv)
    server = serve(port=args.port)
    # Written atomically: a reader never sees a half-written port.
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------- the control API's Python face

class ExporterError(RuntimeError):
    """The exporter refused a control request or did not answer."""


@dataclass(frozen=True)
class ExporterClient:
    """Sets the exporter's counters from a test: `client.traffic(app="web", track="canary",
    per_second=100, error_share=0.05)` makes the canary's error rate 5 %."""

    url: str  # http://127.0.0.1:PORT

    def _call(self, method: str, path: str, body: dict | None = None) -> list[dict]:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.url + path, method=method, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())["series"]
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                reason = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):  # not one of ours (the stdlib's own error page)
                reason = f"{exc}: {raw[:200].decode(errors='replace')}"
            raise ExporterError(reason) from None
        except OSError as exc:
            raise ExporterError(f"the test exporter at {self.url} did not answer {method} {path}: {exc}") from None

    def traffic(self, *, app: str, track: str, per_second: float, error_share: float = 0.0) -> list[dict]:
        return self._call("POST", "/traffic", {"app": app, "track": track, "per_second": per_second,
                                               "error_share": error_share})

    def rate(self, *, app: str, track: str, code: str, per_second: float) -> list[dict]:
        return self._call("POST", "/rate", {"app": app, "track": track, "code": code, "per_second": per_second})

    def inc(self, *, app: str, track: str, code: str, by: float = 1.0) -> list[dict]:
        return self._call("POST", "/inc", {"app": app, "track": track, "code": code, "by": by})

    def reset(self, *, app: str | None = None) -> list[dict]:
        return self._call("POST", "/reset", {"app": app} if app else {})

    def state(self) -> list[dict]:
        return self._call("GET", "/state")


if __name__ == "__main__":
    raise SystemExit(main())
