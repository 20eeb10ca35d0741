#!/usr/bin/env python3
"""Progressive delivery's cost: canary step timing against a plain rolling update, and what a gate costs.

Part 1, steps. One app: a Deployment of --replicas with a canary (steps
10 / 50, then promotion, pause 0) and its Service. Each trial pushes a new
image, posts the signed webhook and reads, from the daemon's audit lines,
when each step was applied and healthy: push -> step 1 healthy, step -> next
step, push -> promoted and healthy. Requests: the daemon's own count
(gitopsd_apiserver_requests_total) for the whole canary.

The peer, side by side on the same cluster: the same image change as a plain
rolling update, `kubectl apply --server-side` then `kubectl rollout status`
(no steps, no gate: the floor a canary adds its steps to).

Part 2, gates. The evaluations a step's gates make, each timed --evaluations
times: a Prometheus gate (gitopsd.daemon.rollouts.ask_prometheus: the query
`sum(rate(http_requests_total{code=~"5.."}[1m])) / sum(rate(http_requests_total[1m]))`
against the test bed's real Prometheus, scraping its exporter) and a webhook
gate (ask_webhook: a POST to a local HTTP server that answers 204). The peer:
a bare HTTP GET of Prometheus' /-/ready, the round trip any evaluation pays.

    .venv/bin/python hack/rollout_bench.py [--trials 5] [--replicas 10] [--evaluations 200] [--cluster NAME]

`--cluster` reuses a running test-bed cluster (left running); without it a
cluster "rollout" is started and stopped. Prometheus is started and stopped
(named "rollout-bench").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import SECRET, DaemonProcess, GitRepo, deployment, post_generic, wait_for  # noqa: E402
from latency import pct, samples  # noqa: E402
from testbed import build  # noqa: E402
from testbed import cluster as tb  # noqa: E402
from testbed import prometheus as tb_prometheus  # noqa: E402

from gitopsd.daemon.rollouts import ask_prometheus, ask_webhook  # noqa: E402
from gitopsd.engine.rollout import ROLLOUT_ANNOTATION, PrometheusGate, WebhookGate  # noqa: E402
from gitopsd.kube import Kube  # noqa: E402

STEPS = (10, 50)


def _web(replicas: int, image: str) -> dict:
    obj = deployment("web", replicas=replicas, image=image)
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: f"strategy: canary\nsteps: {list(STEPS)}\npause: 0s\n"}
    return obj


def _service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}}


def requests_sent(daemon: DaemonProcess) -> float:
    return sum(samples(daemon, "gitopsd_apiserver_requests_total").values())


def steps_of(daemon: DaemonProcess, sha: str, after: int) -> list[tuple[float, dict]]:
    """The audit lines of `sha`'s rollout logged after line `after`: (time logged, line)."""
    out = []
    for line in daemon.log_path.read_text().splitlines()[after:]:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "audit" and e.get("revision") == sha and e.get("rollout"):
            out.append((_epoch(e["timestamp"]), e))
    return out


def _epoch(stamp: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def canary_trials(args, kubeconfig: Path, ns: str, work: Path) -> tuple[list[list[float]], list[float], list[float]]:
    """(per trial: seconds from the push to each step healthy, the last being promotion), totals, requests."""
    repo = GitRepo(work / "git")
    repo.write("web.yaml", [_web(args.replicas, "nginx:1.0"), _service()])
    first = repo.commit("initial")
    cfg = work / "config.yaml"
    cfg.write_text(json.dumps({"apps": [{"name": "web", "repo": repo.url, "ref": "main", "namespace": ns,
                                         "interval": "10m", "timeout": "5m"}]}))
    daemon = DaemonProcess(config=cfg, kubeconfig=kubeconfig, namespace=ns, workdir=work, cache=work / "cache",
                           extra=("--no-leader-elect", "--no-watch-local"), env={"GITOPSD_WEBHOOK_SECRET": SECRET},
                           name="rollout-bench")
    marks, totals, costs = [], [], []
    try:
        daemon.wait_ready()
        wait_for("the first sync", lambda: any(e.get("event") == "audit" and e.get("revision") == first
                                               and e.get("result") == "Applied" for e in daemon.events()), 120, 0.2)
        for i in range(1, args.trials + 1):
            repo.write("web.yaml", [_web(args.replicas, f"nginx:1.{i}"), _service()])
            sha = repo.commit(f"web 1.{i}")
            mark = len(daemon.log_path.read_text().splitlines())
            before = requests_sent(daemon)
            t0 = time.time()
            post_generic(daemon, repo.url, sha)
            done = wait_for(f"trial {i} promoted", lambda: [
                (t, e) for t, e in steps_of(daemon, sha, mark) if e["rollout"].get("promoted")], 300, 0.05)
            lines = steps_of(daemon, sha, mark)
            if any(e["result"] not in ("Applied", "NoChange") for _, e in lines):
                raise SystemExit(f"trial {i}: a step did not converge: {[e['result'] for _, e in lines]}")
            marks.append([t - t0 for t, e in lines])
            totals.append(done[0][0] - t0)
            costs.append(requests_sent(daemon) - before)
            print(f"  trial {i}: {len(lines)} steps, promoted in {totals[-1]:.2f}s, {costs[-1]:.0f} requests",
                  file=sys.stderr)
    finally:
        daemon.stop()
    return marks, totals, costs


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.binary("kubectl")), "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, check=True)


def peer_trials(args, kubeconfig: Path, ns: str, work: Path) -> list[float]:
    """The same image change as a plain rolling update: apply --server-side, rollout status."""
    path = work / "peer.json"

    def apply(image: str) -> None:
        path.write_text(json.dumps(deployment("peer", replicas=args.replicas, image=image)))
        kubectl(kubeconfig, "-n", ns, "apply", "--server-side", "-f", str(path))

    apply("nginx:1.0")
    kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer", "--timeout=120s")
    times = []
    for i in range(1, args.trials + 1):
        t0 = time.time()
        apply(f"nginx:1.{i}")
        kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer", "--timeout=120s")
        times.append(time.time() - t0)
        print(f"  peer trial {i}: rolled out in {times[-1]:.2f}s", file=sys.stderr)
    return times


class _Gate(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_):
        pass


def gate_costs(args) -> dict[str, list[float]]:
    """Milliseconds per evaluation: Prometheus gate, webhook gate, and the bare round trip."""
    prom = tb_prometheus.up("rollout-bench", out=sys.stderr)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prom.exporter.traffic(app="bench", track="canary", per_second=50, error_share=0.004)
        query = ('sum(rate(http_requests_total{app="bench",code=~"5.."}[1m])) '
                 '/ sum(rate(http_requests_total{app="bench"}[1m]))')
        gate = PrometheusGate(query=query, max=0.01, address=prom.url)
        wait_for("the exporter's rate in Prometheus",
                 lambda: ask_prometheus(gate, default=None)[0] != "inconclusive", 60, 0.5)
        hook = WebhookGate(url=f"http://127.0.0.1:{server.server_address[1]}/gate")
        payload = {"deployment": "web", "step": 1, "steps": 3, "weight": 10, "app": "bench", "revision": "0" * 40}
        out: dict[str, list[float]] = {"prometheus gate": [], "webhook gate": [], "GET /-/ready (peer)": []}
        for _ in range(args.evaluations):
            t0 = time.perf_counter()
            verdict, detail = ask_prometheus(gate, default=None)
            out["prometheus gate"].append((time.perf_counter() - t0) * 1000)
            if verdict != "pass":
                raise SystemExit(f"the Prometheus gate said {verdict}: {detail}")
            t0 = time.perf_counter()
            verdict, detail = ask_webhook(hook, payload=payload)
            out["webhook gate"].append((time.perf_counter() - t0) * 1000)
            if verdict != "pass":
                raise SystemExit(f"the webhook gate said {verdict}: {detail}")
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=10) as answer:
                answer.read()
            out["GET /-/ready (peer)"].append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        server.shutdown()
        tb_prometheus.down("rollout-bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--cluster", help="reuse this running test-bed cluster (left running)")
    args = parser.parse_args()

    c = tb.up(args.cluster or "rollout", out=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="gitopsd-rollout-"))
    ns = f"rollout-{os.getpid()}"
    kube = Kube.connect(kubeconfig=c.kubeconfig)
    try:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        marks, totals, costs = canary_trials(args, c.kubeconfig, ns, work)
        peer = peer_trials(args, c.kubeconfig, ns, work)
    finally:
        kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        if not args.cluster:
            tb.down("rollout")
    gates = gate_costs(args)

    names = [f"step {n + 1} ({w}%) healthy" for n, w in enumerate(STEPS)] + ["promoted and healthy"]
    print(f"\ncanary of a Deployment of {args.replicas} replicas, steps {'/'.join(map(str, STEPS))}/100, pause 0, "
          f"{args.trials} trials (seconds from the push)")
    print(f"{'':44}{'p50':>10}{'p95':>10}{'max':>10}")
    for n, label in enumerate(names):
        col = [m[n] for m in marks if len(m) > n]
        print(f"{label:44}{statistics.median(col):>9.2f}s{pct(col, 0.95):>9.2f}s{max(col):>9.2f}s")
    gaps = [b - a for m in marks for a, b in zip(m, m[1:])]
    print(f"{'one step to the next':44}{statistics.median(gaps):>9.2f}s{pct(gaps, 0.95):>9.2f}s{max(gaps):>9.2f}s")
    print(f"{'peer: apply --server-side + rollout status':44}{statistics.median(peer):>9.2f}s"
          f"{pct(peer, 0.95):>9.2f}s{max(peer):>9.2f}s")
    print(f"ratio (canary promoted / plain rolling update, p50)  {statistics.median(totals) / statistics.median(peer):.1f}x")
    print(f"gitopsd's requests per canary (push to promoted): median {statistics.median(costs):.0f}, "
          f"max {max(costs):.0f}")
    print(f"\ngate evaluation, {args.evaluations} each (milliseconds)")
    print(f"{'':44}{'p50':>10}{'p95':>10}{'max':>10}")
    for label, col in gates.items():
        print(f"{label:44}{statistics.median(col):>9.2f} {pct(col, 0.95):>9.2f} {max(col):>9.2f}")
    floor = statistics.median(gates["GET /-/ready (peer)"])
    print(f"ratio (prometheus gate / bare round trip, p50)  {statistics.median(gates['prometheus gate']) / floor:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
