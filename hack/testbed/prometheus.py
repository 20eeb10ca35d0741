"""A real Prometheus for the test bed, scraping the test exporter every second.

Progressive delivery gates ask Prometheus's query API whether a canary is
healthy; their tests need the real API (PromQL, rate() extrapolation, empty
vectors, NaN, staleness), not a stub of it. So the test bed runs the real
server (built from its Go module by build.py) next to exporter.py, whose
`http_requests_total` counters a test sets.

Layout: `<cluster state dir>/prometheus/` holds `prometheus.yml`, the TSDB
(`data/`), `state.json` (PIDs and ports), `exporter.port` and one log per
process. It shares a cluster's *name* but not its lifecycle: it needs no
apiserver, starts whether or not a cluster of that name runs, survives a
restart of the control plane, and `hack/cluster down NAME` stops it too.

Start order and races: the exporter binds a port the kernel picks and writes
it to `exporter.port` (nothing to race); Prometheus cannot report a port it
chose, so it gets one picked free, and when another process takes it first
(Prometheus exits: address in use) the start is retried once with a fresh
port. `up` returns once Prometheus has scraped the exporter (`up{job=
"exporter"} == 1` through the query API), so a test can query at once.

Scrape and evaluation every second, a scrape timeout of one second; loopback
only. A series appears in queries within about a second of being set, and
`rate(...[10s])` reflects a new rate once the window holds two samples
(exactly, for a series set from zero: the exporter's counters grow linearly).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import build, cluster, procs
from .exporter import ExporterClient

SCRAPE_INTERVAL = "1s"
JOB = "exporter"
START_TIMEOUT = 60.0
QUERY_TIMEOUT = 10.0


class PrometheusError(RuntimeError):
    """Prometheus or its exporter could not start, or a query failed; the message says why."""


def prometheus_dir(name: str) -> Path:
    return cluster.state_dir(name) / cluster.PROMETHEUS_SUBDIR


@dataclass
class Prometheus:
    """A running Prometheus and its exporter: query one, set the other."""

    name: str
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return prometheus_dir(self.name)

    @property
    def url(self) -> str:
        """Base URL of the HTTP API, e.g. http://127.0.0.1:PORT (query at /api/v1/query)."""
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    @property
    def exporter_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['exporter']}"

    @property
    def exporter(self) -> ExporterClient:
        """Sets the exporter's counters (see exporter.py for the API)."""
        return ExporterClient(self.exporter_url)

    def log(self, process: str) -> Path:
        return self.dir / f"{process}.log"

    def alive(self) -> dict[str, bool]:
        return {process: procs.is_ours(pid, self.dir) for process, pid in self.pids.items()}

    def query(self, expr: str, *, at: float | None = None) -> dict:
        """An instant query; returns the API's `data` ({"resultType", "result"}).

        Raises PrometheusError naming the expression and Prometheus's errorType
        and error when the query is refused (bad PromQL is `bad_data`)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT) as resp:
                raw, code = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, code = exc.read(), exc.code
        except OSError as exc:
            raise PrometheusError(f"query {expr!r}: Prometheus at {self.url} did not answer: {exc}") from None
        try:
            answer = json.loads(raw)
        except ValueError:  # e.g. 503 "Service Unavailable" in plain text while it starts
            raise PrometheusError(f"query {expr!r}: HTTP {code}: {raw[:200].decode(errors='replace')}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def stop(self) -> list[str]:
        """Stop Prometheus and the exporter and remove their files (as down())."""
        return down(self.name)

    def save(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({"pids": self.pids, "ports": self.ports}, indent=2))


def load(name: str) -> Prometheus | None:
    """The Prometheus recorded under `name`, running or not; None when none was started."""
    path = prometheus_dir(name) / "state.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Prometheus(name=name, pids=data["pids"], ports=data["ports"])


def _config(exporter_port: int) -> str:
    # Plain JSON is valid YAML. scrape_timeout must not exceed the interval.
    return json.dumps({
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }, indent=2)


def _start_exporter(prom: Prometheus, *, timeout: float) -> None:
    port_file = prom.dir / "exporter.port"
    argv = [sys.executable, str(Path(__file__).with_name("exporter.py")), "--port-file", str(port_file)]
    prom.pids["exporter"] = procs.spawn(argv, log=prom.log("exporter"), cwd=prom.dir)
    prom.save()

    def serving():
        return port_file.exists(), f"no {port_file.name} yet"
    procs.wait_until("the exporter to serve", name="exporter", pid=prom.pids["exporter"], owner=prom.dir,
                     log=prom.log("exporter"), check=serving, timeout=timeout, error=PrometheusError)
    prom.ports["exporter"] = int(port_file.read_text())
    prom.save()


def _start_prometheus(prom: Prometheus, *, timeout: float) -> None:
    config = prom.dir / "prometheus.yml"
    config.write_text(_config(prom.ports["exporter"]))
    prom.ports["prometheus"] = procs.free_port()
    prom.pids["prometheus"] = procs.spawn([
        str(build.binary("prometheus")), f"--config.file={config}",
        f"--storage.tsdb.path={prom.dir / 'data'}", "--storage.tsdb.retention.time=1d",
        f"--web.listen-address=127.0.0.1:{prom.ports['prometheus']}",
        # The scrape manager applies discovered targets (static ones too) on a
        # 5 s tick by default: the first scrape came 5-6 s after start, now
        # ~1 s. A hidden flag (since 2.4x): a pin without it fails to start,
        # loudly, in the fixture.
        "--scrape.discovery-reload-interval=1s",
    ], log=prom.log("prometheus"), cwd=prom.dir)
    prom.save()

    def scraped():
        try:
            result = prom.query(f'up{{job="{JOB}"}}')["result"]
        except PrometheusError as exc:  # refused, or 503 while it starts: not a failure yet
            return False, str(exc)
        return bool(result) and result[0]["value"][1] == "1", f"up{{job={JOB!r}}} = {result}"
    procs.wait_until("Prometheus to scrape the exporter", name="prometheus", pid=prom.pids["prometheus"],
                     owner=prom.dir, log=prom.log("prometheus"), check=scraped, timeout=timeout,
                     error=PrometheusError)


def up(name: str = "default", *, out=None, timeout: float = START_TIMEOUT) -> Prometheus:
    """Start the exporter and Prometheus under `name`; return once Prometheus
    has scraped the exporter. One already running is returned as it is; a
    half-dead one is stopped and started afresh. Needs `hack/cluster build`
    (the prometheus binary); raises PrometheusError with a log tail."""
    say = (lambda msg: print(msg, file=out, flush=True)) if out else (lambda msg: None)
    existing = load(name)
    if existing and existing.pids and all(existing.alive().values()):
        say(f"prometheus {name!r} already up at {existing.url}")
        return existing
    down(name)
    binary = build.binary("prometheus")  # FileNotFoundError with the hint, before anything starts
    started = time.monotonic()
    for attempt in (1, 2):
        prom = Prometheus(name=name)
        shutil.rmtree(prom.dir, ignore_errors=True)
        prom.dir.mkdir(parents=True)
        try:
            _start_exporter(prom, timeout=timeout)
            _start_prometheus(prom, timeout=timeout)
            break
        except PrometheusError as exc:
            procs.stop(prom.pids, owner=prom.dir)  # never leave processes behind
            if attempt == 2:
                raise
            say(f"  start failed ({str(exc).splitlines()[0]}); retrying once with a fresh port")
        except BaseException:
            procs.stop(prom.pids, owner=prom.dir)
            raise
    say(f"prometheus {name!r} ({binary}) up in {time.monotonic() - started:.1f}s at {prom.url}, "
        f"scraping the exporter at {prom.exporter_url} every {SCRAPE_INTERVAL}")
    return prom


def down(name: str = "default") -> list[str]:
    """Stop the exporter and Prometheus recorded under `name` and remove their
    files (and the state dir when nothing else is left in it)."""
    prom = load(name)
    stopped = procs.stop(prom.pids, owner=prom.dir) if prom else []
    shutil.rmtree(prometheus_dir(name), ignore_errors=True)
    state = cluster.state_dir(name)
    if state.exists() and not any(state.iterdir()):
        state.rmdir()
    return stopped


def status(name: str) -> dict | None:
    """What runs under `name` (for `hack/cluster status`); None when nothing was started."""
    prom = load(name)
    if prom is None:
        return None
    alive = prom.alive()
    return {"url": prom.url if "prometheus" in prom.ports else None,
            "exporter_url": prom.exporter_url if "exporter" in prom.ports else None,
            "processes": {p: {"pid": prom.pids[p], "running": ok} for p, ok in alive.items()}}
