#!/usr/bin/env python3
"""Bad commit -> rolled back and healthy: gitopsd's automatic rollback against a CI script's.

One app (a Deployment of --replicas, a ConfigMap) with `rollback: {onUnhealthy: true}`.
Each trial pushes a good commit (a new image tag, waits until it is Applied and
Healthy), then a bad one whose image crash-loops (KWOK's `:crashloop` stage: the
real Deployment controller rolls it out, its new pods go into CrashLoopBackOff),
posts the signed webhook and times until the audit trail's RolledBack record
(the good revision re-applied and healthy again). Requests: the daemon's own
count (gitopsd_apiserver_requests_total) from the push to the RolledBack record.

The peer, side by side on the same cluster: what a CI job does without gitopsd —
`kubectl apply --server-side --force-conflicts` (rollout undo took the
fields) of the bad manifest, `kubectl rollout status --timeout`, and on
failure `kubectl rollout undo` and `kubectl rollout status` again. `rollout status` does not read CrashLoopBackOff: it waits for the
Deployment's progress deadline or its own timeout (--peer-timeout, default 30s;
many pipelines use minutes).

    .venv/bin/python hack/rollback_bench.py [--trials 10] [--replicas 3] [--cluster NAME] [--peer-timeout 30]

`--cluster` reuses a running test-bed cluster (left running); without it a
cluster "rollback" is started and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import SECRET, DaemonProcess, GitRepo, configmap, deployment, post_generic, wait_for  # noqa: E402
from latency import pct, samples  # noqa: E402
from testbed import build  # noqa: E402
from testbed import cluster as tb  # noqa: E402

from gitopsd.kube import Kube  # noqa: E402


def requests_sent(daemon: DaemonProcess) -> float:
    return sum(samples(daemon, "gitopsd_apiserver_requests_total").values())


def rolled_back(daemon: DaemonProcess, after: int) -> dict | None:
    """The first RolledBack transition the daemon logged after line `after` of its log."""
    lines = daemon.log_path.read_text().splitlines()[after:]
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "audit" and e.get("result") == "RolledBack":
            return e
    return None


def applied(daemon: DaemonProcess, sha: str) -> bool:
    return any(e.get("event") == "audit" and e.get("result") == "Applied" and e.get("revision") == sha
               and (e.get("health") or {}).get("outcome") == "Healthy" for e in daemon.events())


def gitopsd_trials(args, kube: Kube, kubeconfig: Path, ns: str, work: Path) -> tuple[list[float], list[float]]:
    repo = GitRepo(work / "git")
    repo.write("web.yaml", deployment("web", replicas=args.replicas, image="nginx:1.0"))
    repo.write("settings.yaml", configmap("settings", {"v": "0"}))
    first = repo.commit("initial")
    cfg = work / "config.yaml"
    cfg.write_text(json.dumps({"apps": [{"name": "web", "repo": repo.url, "ref": "main", "namespace": ns,
                                         "interval": "10m", "timeout": "5m", "rollback": {"onUnhealthy": True}}]}))
    daemon = DaemonProcess(config=cfg, kubeconfig=kubeconfig, namespace=ns, workdir=work, cache=work / "cache",
                           extra=("--no-leader-elect", "--no-watch-local"), env={"GITOPSD_WEBHOOK_SECRET": SECRET},
                           name="rollback-bench")
    times, costs = [], []
    try:
        daemon.wait_ready()
        wait_for("the first sync", lambda: applied(daemon, first), 120, 0.2)
        for i in range(1, args.trials + 1):
            repo.write("web.yaml", deployment("web", replicas=args.replicas, image=f"nginx:1.{i}"))
            good = repo.commit(f"good {i}")
            post_generic(daemon, repo.url, good)
            wait_for(f"good {i} Applied and Healthy", lambda: applied(daemon, good), 120, 0.1)
            repo.write("web.yaml", deployment("web", replicas=args.replicas, image="nginx:crashloop"))
            bad = repo.commit(f"bad {i}")
            mark = len(daemon.log_path.read_text().splitlines())
            before = requests_sent(daemon)
            t0 = time.monotonic()
            post_generic(daemon, repo.url, bad)
            rec = wait_for(f"trial {i} rolled back", lambda: rolled_back(daemon, mark), 300, 0.05)
            times.append(time.monotonic() - t0)
            costs.append(requests_sent(daemon) - before)
            assert rec["revision"] == good and rec["previous"] == bad, rec
            print(f"  trial {i}: rolled back and healthy in {times[-1]:.2f}s, {costs[-1]:.0f} requests",
                  file=sys.stderr)
    finally:
        daemon.stop()
    return times, costs


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.binary("kubectl")), "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, check=check)


def peer_trials(args, kubeconfig: Path, ns: str, work: Path) -> list[float]:
    """apply, rollout status --timeout, undo on failure, rollout status: a CI job's rollback."""
    def manifest(image: str) -> Path:
        path = work / "peer.json"
        path.write_text(json.dumps(deployment("peer", replicas=args.replicas, image=image)))
        return path

    kubectl(kubeconfig, "-n", ns, "apply", "--server-side", "--force-conflicts", "-f", str(manifest("nginx:1.0")))
    kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer", "--timeout=120s")
    times = []
    for i in range(1, args.trials + 1):
        kubectl(kubeconfig, "-n", ns, "apply", "--server-side", "--force-conflicts", "-f", str(manifest(f"nginx:1.{i}")))
        kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer", "--timeout=120s")
        t0 = time.monotonic()
        kubectl(kubeconfig, "-n", ns, "apply", "--server-side", "--force-conflicts", "-f", str(manifest("nginx:crashloop")))
        status = kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer",
                         f"--timeout={args.peer_timeout}s", check=False)
        if status.returncode == 0:
            raise SystemExit(f"peer trial {i}: rollout status said a crash-looping rollout succeeded")
        kubectl(kubeconfig, "-n", ns, "rollout", "undo", "deployment/peer")
        kubectl(kubeconfig, "-n", ns, "rollout", "status", "deployment/peer", "--timeout=120s")
        times.append(time.monotonic() - t0)
        print(f"  peer trial {i}: rolled back and healthy in {times[-1]:.2f}s", file=sys.stderr)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--peer-timeout", type=int, default=30, help="the peer's rollout status --timeout, seconds")
    parser.add_argument("--no-peer", action="store_true", help="gitopsd only")
    parser.add_argument("--cluster", help="reuse this running test-bed cluster (left running)")
    args = parser.parse_args()

    c = tb.up(args.cluster or "rollback", out=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="gitopsd-rollback-"))
    ns = f"rollback-{os.getpid()}"
    kube = Kube.connect(kubeconfig=c.kubeconfig)
    try:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        times, costs = gitopsd_trials(args, kube, c.kubeconfig, ns, work)
        peer = [] if args.no_peer else peer_trials(args, c.kubeconfig, ns, work)
    finally:
        kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        if not args.cluster:
            tb.down("rollback")
    print(f"\nbad commit (image crash-loops) -> rolled back and healthy, Deployment of {args.replicas} replicas, "
          f"{args.trials} trials")
    print(f"{'':38}{'p50':>10}{'p95':>10}{'max':>10}")
    print(f"{'gitopsd (automatic rollback)':38}{statistics.median(times):>9.2f}s{pct(times, 0.95):>9.2f}s"
          f"{max(times):>9.2f}s")
    if peer:
        print(f"{'kubectl apply/rollout status/undo':38}{statistics.median(peer):>9.2f}s{pct(peer, 0.95):>9.2f}s"
              f"{max(peer):>9.2f}s   (--timeout={args.peer_timeout}s)")
        print(f"ratio (peer / gitopsd, p50)           {statistics.median(peer) / statistics.median(times):.1f}x")
    print(f"gitopsd's requests per rollback (push to RolledBack record, incl. the bad rollout): "
          f"median {statistics.median(costs):.0f}, max {max(costs):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
