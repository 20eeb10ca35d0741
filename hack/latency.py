#!/usr/bin/env python3
"""Daemon latency: push-to-applied and edit-to-reverted, p50/p95 over N trials,
and apiserver requests per steady-state reconcile.

Runs the real `gitopsd run` against its own local cluster ("latency") and a
local bare Git remote, and measures from outside, the way a user would:

- push-to-applied: `git push` returns -> POST the generic webhook -> poll the
  apiserver (every 5 ms) until the new value is live;
- edit-to-reverted: a hand edit (an Update by another field manager) returns
  -> poll until gitopsd has put the desired value back;
- steady state: gitopsd's own request counters over K unchanged polls.

    .venv/bin/python hack/latency.py [--trials 20] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import DaemonProcess, GitRepo, configmap, wait_for  # noqa: E402
from testbed import cluster as tb  # noqa: E402

from gitopsd.kube import Kube  # noqa: E402

SECRET = "latency-bench-secret"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def poll_until(check, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.005)
    raise RuntimeError("timed out")


def push_to_applied(daemon: DaemonProcess, repo: GitRepo, trials: int, *, change, applied,
                    secret: str = SECRET, timeout: float = 30.0) -> list[float]:
    """Seconds from `git push` returning (plus the signed generic webhook) until the change is live.

    change(i) writes trial i's edit into the work tree; applied(i) reads the cluster and says whether it is
    live. Shared with hack/fleet_bench.py.
    """
    out = []
    for i in range(1, trials + 1):
        change(i)
        sha = repo.commit(f"trial {i}")
        t0 = time.monotonic()
        body = json.dumps({"repo": repo.url, "ref": "main", "after": sha}).encode()
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        daemon.post("/hooks/generic", body, {"X-Gitopsd-Signature": sig})
        out.append(poll_until(lambda: applied(i), timeout) - t0)
    return out


def edit_to_reverted(kube: Kube, targets: list[tuple[str, str, str, str]], *, pause: float = 0.2,
                     timeout: float = 30.0) -> list[float]:
    """Seconds from a hand edit (a PUT by field manager kubectl-edit) until gitopsd has put the value back.

    targets: (namespace, ConfigMap name, data key, desired value), edited one after the other. Shared with
    hack/fleet_bench.py.
    """
    cms = kube.resource("v1", "ConfigMap")
    out = []
    for i, (ns, name, key, desired) in enumerate(targets):
        time.sleep(pause)   # let the previous revert's own watch event pass
        live = kube.get(cms, name, ns)
        live["data"][key] = f"hand-edit-{i}"
        kube.request("PUT", cms.path(ns, name), body=live, query={"fieldManager": "kubectl-edit"})
        t0 = time.monotonic()

        def restored(ns=ns, name=name, key=key, desired=desired) -> bool:
            obj = kube.get(cms, name, ns)
            return obj is not None and obj["data"].get(key) == desired

        out.append(poll_until(restored, timeout) - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steady-polls", type=int, default=3)
    parser.add_argument("--keep-cluster", action="store_true")
    args = parser.parse_args()

    c = tb.up("latency", out=sys.stderr)
    daemon = None
    try:
        kube = Kube.connect(kubeconfig=c.kubeconfig)
        ns = "latency"
        if kube.get(kube.resource("v1", "Namespace"), ns) is None:
            kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        work = Path(tempfile.mkdtemp(prefix="gitopsd-latency-"))
        repo = GitRepo(work / "git")
        repo.write("app/cm.yaml", configmap("settings", {"value": "0"}))
        repo.write("app/more.yaml", [configmap(f"filler-{i:03d}", {"i": str(i)}) for i in range(200)])
        repo.commit("initial")
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps({"apps": [{"name": "latency", "repo": repo.url, "ref": "main", "path": "app",
                                             "namespace": ns, "interval": "5s"}]}))
        daemon = DaemonProcess(config=cfg, kubeconfig=c.kubeconfig, namespace=ns, workdir=work, cache=work / "cache",
                               extra=("--no-leader-elect", "--no-watch-local"),
                               env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name="latency")
        daemon.wait_ready()
        cms = kube.resource("v1", "ConfigMap")

        def value() -> str | None:
            obj = kube.get(cms, "settings", ns)
            return None if obj is None else obj["data"]["value"]

        wait_for("first sync", lambda: value() == "0", 60)

        def change(i: int) -> None:
            repo.write("app/cm.yaml", configmap("settings", {"value": str(i)}))

        push = push_to_applied(daemon, repo, args.trials, change=change, applied=lambda i: value() == str(i))
        revert = edit_to_reverted(kube, [(ns, "settings", "value", str(args.trials))] * args.trials)

        def counters() -> dict[str, float]:
            with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
            out: dict[str, float] = {}
            for line in text.splitlines():
                if line.startswith("gitopsd_apiserver_requests_total{") or line.startswith("gitopsd_reconcile_total{"):
                    key, v = line.rsplit(" ", 1)
                    out[key] = out.get(key, 0.0) + float(v)
            return out

        def polls(cnt: dict[str, float]) -> float:
            return sum(v for k, v in cnt.items() if k.startswith("gitopsd_reconcile_total") and 'trigger="poll"' in k)

        time.sleep(2)
        before = counters()
        wait_for("steady polls", lambda: polls(counters()) >= polls(before) + args.steady_polls, 120)
        after = counters()
        n = polls(after) - polls(before)
        requests = {k.split('verb="')[1].split('"')[0]: after[k] - before.get(k, 0.0) for k in after
                    if k.startswith("gitopsd_apiserver_requests_total") and after[k] != before.get(k, 0.0)}

        print(f"\ngitopsd daemon latency ({args.trials} trials each; 2-core shared machine; "
              f"app of 201 ConfigMaps)\n")
        print(f"{'measure':<34}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
        for name, vals in (("push -> applied (webhook)", push), ("hand edit -> reverted (self-heal)", revert)):
            print(f"{name:<34}{statistics.median(vals) * 1000:>10.0f}{pct(vals, 0.95) * 1000:>10.0f}"
                  f"{max(vals) * 1000:>10.0f}")
        per = {verb: v / n for verb, v in requests.items()} if n else {}
        print(f"\nsteady-state reconciles observed: {n:.0f}; apiserver requests per reconcile: "
              f"{json.dumps(per) if per else '0 (none)'}")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if not args.keep_cluster:
            tb.down("latency")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
