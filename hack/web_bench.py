#!/usr/bin/env python3
"""hack/web_bench.py: what the web view costs — answer times, apiserver requests, memory.

    .venv/bin/python hack/web_bench.py                    # 300 apps x 5 ConfigMaps
    .venv/bin/python hack/web_bench.py --apps 1000 --rounds 100

Starts its own cluster "web-bench" (hack/testbed, loopback only), a fleet of
apps as hack/fleet_bench.py writes it, and the real `gitopsd run`; once every
app is Applied and Healthy it measures from outside:

- first views: GET /api/v1/apps/APP of --viewed apps, each for the first time
  (the app's trail is read from the cluster then, and verified), p50/p95;
- views: --rounds GETs of each document, p50/p95 — the apps table
  (/api/v1/apps), an app (/api/v1/apps/APP), a transition
  (/api/v1/apps/APP/history/1) and, beside them, the daemon's /status (the same
  rows without commit) and the peer: `kubectl get configmaps -l
  app.kubernetes.io/managed-by=gitopsd -o json` in gitopsd's namespace, the
  apps' stored status read from the apiserver, which is what a view without
  the daemon's memory would have to read. The ratio column is against it;
- apiserver requests during the views: the daemon's own
  gitopsd_apiserver_requests_total (watches left out) before and after. The
  daemon runs without leader election, whose lease renewals would count too,
  and with hour-long poll intervals;
- memory: the daemon's VmRSS before the first views and after them (the
  trails kept for the viewed apps).

The machine is shared: the cluster and the daemon share its cores with
whatever else runs; quote the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fleet_bench import DAEMON_NS, app_name, app_namespace, build_fleet, say, summary_done  # noqa: E402
from helpers import DaemonProcess  # noqa: E402
from latency import pct  # noqa: E402
from testbed import build  # noqa: E402
from testbed import cluster as tb  # noqa: E402


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
        assert resp.status == 200, (url, resp.status)
    return time.perf_counter() - started


def timed_kubectl(kubeconfig: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(build.binary("kubectl")), f"--kubeconfig={kubeconfig}", "-n", DAEMON_NS, "get",
                    "configmaps", "-l", "app.kubernetes.io/managed-by=gitopsd", "-o", "json"],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def requests_sent(daemon: DaemonProcess) -> float:
    total = 0.0
    for line in daemon.get("/metrics")[1].splitlines():
        if line.startswith("gitopsd_apiserver_requests_total{") and 'verb="watch"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_converged(daemon: DaemonProcess, apps: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        code, body = daemon.get("/status?summary")
        if code == 200 and summary_done(json.loads(body)["summary"])[0] == apps:
            return time.monotonic() - started
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"gitopsd run exited:\n{daemon.log_path.read_text()[-3000:]}")
        time.sleep(0.25)
    raise RuntimeError(f"not converged after {timeout:.0f}s")


def row(name: str, times: list[float], peer: list[float] | None) -> str:
    p50, p95 = pct(times, 0.5) * 1000, pct(times, 0.95) * 1000
    ratio = f"{pct(times, 0.5) / pct(peer, 0.5):.2f}" if peer else ""
    return f"| {name} | {p50:.1f} | {p95:.1f} | {ratio} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--apps", type=int, default=300)
    p.add_argument("--objects-per-app", type=int, default=5)
    p.add_argument("--rounds", type=int, default=50, help="GETs of each document (default 50)")
    p.add_argument("--viewed", type=int, default=64, help="apps viewed for the first time (default 64)")
    p.add_argument("--cluster", default="web-bench")
    args = p.parse_args(argv)
    if args.cluster in ("shared", "dev") or args.cluster.startswith("pytest-"):
        p.error(f"refusing to use cluster {args.cluster!r}: it belongs to someone else")
    cluster = tb.up(args.cluster, out=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="gitopsd-web-bench-"))
    daemon = None
    try:
        entries, _ = build_fleet(tmp / "git", args.apps, args.objects_per_app, 0, "1h")
        for ns in sorted({DAEMON_NS} | {app_namespace(i) for i in range(args.apps)}):
            tb.request(cluster, "POST", "/api/v1/namespaces",
                       {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        cfg = tmp / "apps.yaml"
        cfg.write_text(json.dumps({"apps": entries}))
        daemon = DaemonProcess(config=cfg, kubeconfig=cluster.kubeconfig, namespace=DAEMON_NS, workdir=tmp,
                               cache=tmp / "cache", extra=("--no-watch-local", "--no-leader-elect"), name="web-bench")
        daemon.wait_ready(60)
        converged = wait_converged(daemon, args.apps, 1200)
        say(f"{args.apps} apps converged in {converged:.1f}s")
        base = daemon.url
        viewed = [app_name(i) for i in range(min(args.viewed, args.apps))]
        rss_before = rss_mib(daemon.proc.pid)
        first = [timed_get(f"{base}/api/v1/apps/{app}") for app in viewed]
        rss_after = rss_mib(daemon.proc.pid)
        app = viewed[0]
        docs = {"/api/v1/apps (the table)": "/api/v1/apps", f"/api/v1/apps/{app}": f"/api/v1/apps/{app}",
                f"/api/v1/apps/{app}/history/1": f"/api/v1/apps/{app}/history/1", "/status": "/status"}
        sent_before = requests_sent(daemon)
        times = {name: [] for name in docs}
        peer = []
        for _ in range(args.rounds):   # interleaved, so a noisy spell hits every column alike
            for name, path in docs.items():
                times[name].append(timed_get(base + path))
            peer.append(timed_kubectl(cluster.kubeconfig))
        sent = requests_sent(daemon) - sent_before
        when = dt.datetime.now().astimezone()
        print(f"gitopsd web view benchmark, {when:%Y-%m-%d}, {os.cpu_count()} cores (shared machine), "
              f"{args.apps} apps x {args.objects_per_app} ConfigMaps, {args.rounds} rounds\n")
        print("| what | p50 ms | p95 ms | p50 / kubectl |\n| --- | --- | --- | --- |")
        print(row(f"first view of an app ({len(viewed)} apps)", first, peer))
        for name in docs:
            print(row(name, times[name], peer))
        print(row("peer: kubectl get configmaps (the stored status)", peer, None))
        print(f"\napiserver requests sent by gitopsd during the {args.rounds * len(docs)} views: {sent:.0f}")
        print(f"daemon RSS: {rss_before:.0f} MiB before the first views, {rss_after:.0f} MiB after "
              f"({len(viewed)} trails kept)")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        tb.down(args.cluster)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
