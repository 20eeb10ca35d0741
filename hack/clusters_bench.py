#!/usr/bin/env python3
"""Several clusters: does a stopped cluster hold up the others? push-to-applied on cluster a while
cluster b is healthy, then while b's apiserver is stopped (SIGSTOP), side by side with kubectl.

The issue's scenario: one daemon deploys to two clusters, and cluster b's
apiserver stops answering (SIGSTOP) for 30 s. Runs the real `gitopsd run`
(--no-leader-elect, the signed generic webhook as from a CI job) against two
test-bed control planes, a (gitopsd's own, `in-cluster`) and b (reached
through a self-contained kubeconfig for its own client certificate, in the
Secret `b-kubeconfig`, key `value`, in gitopsd's namespace of a), and a local
bare Git remote with three apps of --objects ConfigMaps plus one `<app>-probe`
ConfigMap (the one that changes):

- `near` (path near/) on a; `far` (path far/) on b; `fan` (path fan/) with
  `clusters: [in-cluster, b]` (targets `fan` and `fan@b`). All in one
  namespace (the daemon's, on each cluster), selfHeal and prune on, interval 5s.

Measured from outside, the way a user would:

1. "b healthy": --trials T. Each trial commits a change to near/probe.yaml
   AND fan/probe.yaml, pushes, POSTs the generic webhook and polls cluster a
   (every 5 ms) until near's probe has the new value: push -> applied. Side
   by side, in alternating order, the peer: `kubectl apply --server-side
   --field-manager=bench` of the same probe file (same bytes) into another
   namespace of a, timed from starting kubectl to the same criterion (a GET
   shows the value), so the per-trial ratio gitopsd/kubectl is meaningful on
   a shared, noisy machine. Between trials (untimed): fan's probe has the
   value on a (and on b) and no target of a is running.
2. "b stopped": tb.pause(b, "kube-apiserver"). Detection: seconds from the
   pause until /status shows `far@b` and `fan@b` with result
   ClusterUnreachable. Then the same T trials (fan@b cannot follow), then b
   stays stopped until 30 s have passed since the pause (longer if the trials
   took longer: the figure is printed), tb.resume. Recovery: seconds from the
   resume until fan's probe on b has the last pushed value, and until /status
   shows no ClusterUnreachable. Nothing may be pruned on b: the far-* and
   fan-* ConfigMaps on b are counted (and their uids compared) before the
   pause and after the recovery.

The table: per phase p50/p95 of gitopsd's push -> applied on a and of the
kubectl peer, the median of the per-trial ratios gitopsd/kubectl, and "a's
latency with b stopped / with b healthy" (p50 and p95; kubectl's own
stopped/healthy is printed beside it as the machine's noise). b is resumed
in a finally block whatever happens.

    .venv/bin/python hack/clusters_bench.py [--trials 15] [--objects 50] [--json F]
                                            [--cluster-a NAME --cluster-b NAME]

Without --cluster-a/--cluster-b it starts its own clusters `mcbench-a` and
`mcbench-b` and brings them down at the end; with them it reuses running
test-bed clusters and leaves them running (a fresh namespace on each,
deleted at the end). The daemon's log is kept (its path is printed).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import DaemonProcess, GitRepo, configmap, post_generic, wait_for  # noqa: E402
from latency import pct, poll_until  # noqa: E402
from testbed import build as tb_build  # noqa: E402
from testbed import cluster as tb  # noqa: E402

from gitopsd.kube import Kube  # noqa: E402

SECRET = "clusters-bench-secret"
APISERVER = "kube-apiserver"
#: The issue's scenario: cluster b's apiserver stopped for (at least) this long.
HOLD_SECONDS = 30.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probe(app: str, value: str) -> dict:
    return configmap(f"{app}-probe", {"value": value})


def write_app(repo: GitRepo, app: str, objects: int) -> None:
    repo.write(f"{app}/more.yaml", [configmap(f"{app}-{i:04d}", {"i": str(i)}) for i in range(objects)])
    repo.write(f"{app}/probe.yaml", probe(app, "0"))


class Bench:
    def __init__(self, args, a: tb.Cluster, b: tb.Cluster, ns: str, work: Path) -> None:
        self.args, self.a, self.b, self.ns, self.work = args, a, b, ns, work
        self.peer_ns = f"{ns}-kubectl"
        self.kube = Kube.connect(kubeconfig=a.kubeconfig)
        self.kube_b = Kube.connect(kubeconfig=b.kubeconfig)
        self.cms = self.kube.resource("v1", "ConfigMap")
        self.kubectl = str(tb_build.binary("kubectl"))
        self.repo: GitRepo | None = None
        self.daemon: DaemonProcess | None = None
        self.paused = False
        self.results: dict = {}

    # -- reads

    def value(self, kube: Kube, name: str, ns: str | None = None) -> str | None:
        obj = kube.get(self.cms, name, ns or self.ns)
        return None if obj is None else (obj.get("data") or {}).get("value")

    def rows(self) -> dict[tuple[str, str], dict]:
        code, body = self.daemon.get("/status")
        if code != 200:
            return {}
        return {(r["app"], r["cluster"]): r for r in json.loads(body)["apps"]}

    def on_b(self) -> dict[str, str]:
        """{name: uid} of far's and fan's ConfigMaps on b."""
        return {o["metadata"]["name"]: o["metadata"]["uid"]
                for o in self.kube_b.list(self.kube_b.resource("v1", "ConfigMap"), namespace=self.ns)
                if o["metadata"]["name"].startswith(("far-", "fan-"))}

    # -- set-up

    def setup(self) -> None:
        a = self.args
        for name in (self.ns, self.peer_ns):
            self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, field_manager="bench")
        kc = tb.client_kubeconfig(self.b, user="gitopsd-mcbench", groups=("system:masters",))
        self.kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "b-kubeconfig",
                                                                           "namespace": self.ns},
                         "data": {"value": base64.b64encode(yaml.safe_dump(kc).encode()).decode()}},
                        field_manager="bench")
        self.repo = repo = GitRepo(self.work / "git")
        for app in ("near", "far", "fan"):
            write_app(repo, app, a.objects)
        repo.commit("initial")

        def entry(name: str, **extra) -> dict:
            return {"name": name, "repo": repo.url, "ref": "main", "path": name, "namespace": self.ns,
                    "interval": "5s", "selfHeal": True, "prune": True, **extra}

        cfg = self.work / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "clusters": {"b": {"kubeconfig": {"secretRef": {"name": "b-kubeconfig"}}}},
            "apps": [entry("near"), entry("far", cluster="b"), entry("fan", clusters=["in-cluster", "b"])],
        }, sort_keys=False))
        self.daemon = DaemonProcess(config=cfg, kubeconfig=self.a.kubeconfig, namespace=self.ns, workdir=self.work,
                                    cache=self.work / "cache", extra=("--no-leader-elect", "--no-watch-local"),
                                    env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name="clusters-bench")
        say(f"daemon log: {self.daemon.log_path}")
        self.daemon.wait_ready()
        wait_for("first sync of every target", lambda: self.value(self.kube, "near-probe") == "0"
                 and self.value(self.kube, "fan-probe") == "0" and self.value(self.kube_b, "far-probe") == "0"
                 and self.value(self.kube_b, "fan-probe") == "0", 300)
        want = {("near", "in-cluster"), ("far", "b"), ("fan", "in-cluster"), ("fan", "b")}
        wait_for("every target Applied and idle", lambda: (rows := self.rows()) and set(rows) == want and all(
            r["result"] == "Applied" and not r["running"] for r in rows.values()), 300)
        say(f"first sync done: 4 targets of {a.objects + 1} ConfigMaps each")

    # -- one trial of each

    def gitopsd_trial(self, value: str) -> float:
        self.repo.write("near/probe.yaml", probe("near", value))
        self.repo.write("fan/probe.yaml", probe("fan", value))
        sha = self.repo.commit(f"probe {value}")   # returns once `git push` has
        t0 = time.monotonic()
        code, body = post_generic(self.daemon, self.repo.url, sha, secret=SECRET)
        if code >= 300:
            raise RuntimeError(f"webhook answered {code}: {body}")
        return poll_until(lambda: self.value(self.kube, "near-probe") == value) - t0

    def kubectl_trial(self, value: str) -> float:
        path = self.work / "peer" / "probe.yaml"   # the same bytes as near/probe.yaml of this trial
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(probe("near", value), sort_keys=False))
        env = {**os.environ, "KUBECONFIG": str(self.a.kubeconfig)}
        t0 = time.monotonic()
        proc = subprocess.run([self.kubectl, "apply", "--server-side", "--field-manager=bench", "-n", self.peer_ns,
                               "-f", str(path)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl apply exited {proc.returncode}: {proc.stderr}")
        return poll_until(lambda: self.value(self.kube, "near-probe", self.peer_ns) == value) - t0

    def settle(self, value: str, *, b_too: bool) -> None:
        """Untimed, between trials: the fan-out caught up and a's targets are idle."""
        wait_for("fan on a", lambda: self.value(self.kube, "fan-probe") == value, 60)
        if b_too:
            wait_for("fan on b", lambda: self.value(self.kube_b, "fan-probe") == value, 60)

        def idle() -> bool:
            rows = self.rows()
            return bool(rows) and not any(r["running"] for k, r in rows.items() if k[1] == "in-cluster" or b_too)
        try:
            wait_for("a's targets idle", idle, 30, interval=0.05)
        except AssertionError:
            pass   # a poll reconcile that will not end is the daemon's latency too: measure it
        time.sleep(0.2)

    def trials(self, phase: str, *, b_too: bool) -> dict:
        g, k = [], []
        for i in range(1, self.args.trials + 1):
            value = f"{phase}-{i}"
            order = ("gitopsd", "kubectl") if i % 2 else ("kubectl", "gitopsd")
            for tool in order:
                if tool == "gitopsd":
                    g.append(self.gitopsd_trial(value))
                else:
                    k.append(self.kubectl_trial(value))
            if phase == "stopped" and not tb.is_paused(self.b, APISERVER):
                raise RuntimeError("b's apiserver is not stopped any more")
            say(f"  {phase} {i:2d}/{self.args.trials}: gitopsd {g[-1] * 1000:6.0f} ms  kubectl {k[-1] * 1000:6.0f} ms"
                f"  ({order[0]} first)")
            self.settle(value, b_too=b_too)
        return {"gitopsd": g, "kubectl": k, "ratios": [x / y for x, y in zip(g, k)], "last": value}

    # -- the phases

    def run(self) -> None:
        self.setup()
        say(f"phase 'b healthy': {self.args.trials} trials")
        self.results["healthy"] = self.trials("healthy", b_too=True)
        wait_for("every target idle before the pause", lambda: not any(r["running"] for r in self.rows().values()),
                 60, interval=0.05)
        before = self.on_b()

        say("phase 'b stopped': SIGSTOP b's kube-apiserver")
        paused_at = time.monotonic()
        tb.pause(self.b, APISERVER)
        self.paused = True

        def unreachable() -> bool:
            rows = self.rows()
            return all(rows.get(t, {}).get("result") == "ClusterUnreachable" for t in (("far", "b"), ("fan", "b")))
        detected = poll_until(unreachable, 120) - paused_at
        say(f"  far@b and fan@b ClusterUnreachable after {detected:.2f}s")
        stopped = self.trials("stopped", b_too=False)
        self.results["stopped"] = stopped
        trials_done = time.monotonic() - paused_at
        time.sleep(max(0.0, paused_at + HOLD_SECONDS - time.monotonic()))
        resumed_at = time.monotonic()
        tb.resume(self.b, APISERVER)
        self.paused = False
        held = resumed_at - paused_at
        say(f"  b resumed after {held:.1f}s stopped (trials done {trials_done:.1f}s after the pause)")

        # Recovery: poll both criteria until each holds; first time each was seen.
        applied_at = clean_at = None
        deadline = time.monotonic() + 180
        while (applied_at is None or clean_at is None) and time.monotonic() < deadline:
            if applied_at is None:
                try:
                    if self.value(self.kube_b, "fan-probe") == stopped["last"]:
                        applied_at = time.monotonic()
                except Exception:  # noqa: BLE001 - b's apiserver still waking up
                    pass
            if clean_at is None and not any(r["result"] == "ClusterUnreachable" for r in self.rows().values()):
                clean_at = time.monotonic()
            time.sleep(0.01)
        if applied_at is None or clean_at is None:
            raise RuntimeError(f"b did not recover within 180 s (fan@b applied: {applied_at is not None}, "
                               f"/status clean: {clean_at is not None})")
        wait_for("every target idle after the recovery", lambda: not any(r["running"] for r in self.rows().values()),
                 60, interval=0.05)
        after = self.on_b()
        self.results.update({
            "detection_s": detected, "held_s": held, "trials_done_s": trials_done,
            "recovery_applied_s": applied_at - resumed_at, "recovery_status_s": clean_at - resumed_at,
            "b_objects": {"before": len(before), "after": len(after), "gone": sorted(set(before) - set(after)),
                          "recreated": sorted(n for n in before if n in after and after[n] != before[n])},
            "final_rows": {f"{k[0]}@{k[1]}": r["result"] for k, r in self.rows().items()},
        })

    def resume_b(self) -> None:
        if self.paused or tb.is_paused(self.b, APISERVER):
            tb.resume(self.b, APISERVER)
            self.paused = False
            say("b's kube-apiserver resumed (clean-up)")

    def cleanup_namespaces(self) -> None:
        for kube, names in ((self.kube, (self.ns, self.peer_ns)), (self.kube_b, (self.ns,))):
            for name in names:
                try:
                    kube.delete(kube.resource("v1", "Namespace"), name)
                except Exception:  # noqa: BLE001 - best effort clean-up
                    pass


# ---------------------------------------------------------------- report

def ms(v: float) -> str:
    return f"{v * 1000:,.0f}"


def summary(results: dict) -> dict:
    out: dict = {}
    for phase in ("healthy", "stopped"):
        r = results.get(phase)
        if not r:
            continue
        out[phase] = {tool: {"p50_ms": round(statistics.median(r[tool]) * 1000),
                             "p95_ms": round(pct(r[tool], 0.95) * 1000),
                             "max_ms": round(max(r[tool]) * 1000),
                             "all_ms": [round(v * 1000) for v in r[tool]]} for tool in ("gitopsd", "kubectl")}
        out[phase]["ratio_gitopsd_over_kubectl"] = round(statistics.median(r["ratios"]), 2)
    if "healthy" in out and "stopped" in out:
        h, s = out["healthy"], out["stopped"]
        out["stopped_over_healthy"] = {
            tool: {"p50": round(s[tool]["p50_ms"] / max(1, h[tool]["p50_ms"]), 2),
                   "p95": round(s[tool]["p95_ms"] / max(1, h[tool]["p95_ms"]), 2)} for tool in ("gitopsd", "kubectl")}
    for key in ("detection_s", "held_s", "trials_done_s", "recovery_applied_s", "recovery_status_s"):
        if key in results:
            out[key] = round(results[key], 2)
    for key in ("b_objects", "final_rows"):
        if key in results:
            out[key] = results[key]
    return out


def table(s: dict, args) -> str:
    lines = [f"{'phase':<12}{'gitopsd p50/p95 ms':>20}{'kubectl p50/p95 ms':>20}{'gitopsd/kubectl':>17}"
             f"{'a: stopped/healthy p50 / p95':>30}"]
    lines.append("-" * len(lines[0]))
    for phase, label in (("healthy", "b healthy"), ("stopped", "b stopped")):
        if phase not in s:
            continue
        p = s[phase]
        g, k = p["gitopsd"], p["kubectl"]
        rel = "1.00 / 1.00 (base)" if phase == "healthy" else \
            f"{s['stopped_over_healthy']['gitopsd']['p50']:.2f} / {s['stopped_over_healthy']['gitopsd']['p95']:.2f}" \
            if "stopped_over_healthy" in s else "-"
        lines.append(f"{label:<12}{g['p50_ms']:>11,} / {g['p95_ms']:<6,}{k['p50_ms']:>12,} / {k['p95_ms']:<5,}"
                     f"{p['ratio_gitopsd_over_kubectl']:>14.2f}   {rel:>28}")
    lines.append("")
    lines.append(f"push -> applied on a (near, {args.objects + 1} ConfigMaps; the same commit changes fan on a and b), "
                 f"{args.trials} trials per phase, order alternated")
    lines.append("gitopsd/kubectl: median of the per-trial ratios; kubectl = apply --server-side of the same probe "
                 "file into another namespace of a, until a GET shows it")
    if "stopped_over_healthy" in s:
        k = s["stopped_over_healthy"]["kubectl"]
        lines.append(f"kubectl stopped/healthy (the machine's noise): {k['p50']:.2f} / {k['p95']:.2f}; "
                     f"max gitopsd on a: {s['healthy']['gitopsd']['max_ms']:,} ms healthy, "
                     f"{s['stopped']['gitopsd']['max_ms']:,} ms stopped")
    if "detection_s" in s:
        lines.append(f"detection (pause -> far@b and fan@b ClusterUnreachable in /status): {s['detection_s']:.2f} s")
    if "recovery_applied_s" in s:
        lines.append(f"b stopped for {s['held_s']:.1f} s (trials done {s['trials_done_s']:.1f} s after the pause); "
                     f"recovery (resume -> fan's probe on b has the last push): {s['recovery_applied_s']:.2f} s, "
                     f"(resume -> no ClusterUnreachable in /status): {s['recovery_status_s']:.2f} s")
    if "b_objects" in s:
        o = s["b_objects"]
        verdict = "nothing pruned" if not o["gone"] else f"GONE: {', '.join(o['gone'])}"
        lines.append(f"far+fan ConfigMaps on b: {o['before']} before the pause, {o['after']} after the recovery "
                     f"({verdict}; recreated: {', '.join(o['recreated']) or 'none'})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=15, help="push trials per phase (default 15)")
    parser.add_argument("--objects", type=int, default=50, help="ConfigMaps per app beside its probe (default 50)")
    parser.add_argument("--cluster-a", metavar="NAME", help="reuse this running test-bed cluster as a (left running)")
    parser.add_argument("--cluster-b", metavar="NAME", help="reuse this running test-bed cluster as b (left running)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    if bool(args.cluster_a) != bool(args.cluster_b):
        parser.error("--cluster-a and --cluster-b go together")
    if args.cluster_a and args.cluster_a == args.cluster_b:
        parser.error("--cluster-a and --cluster-b must be two clusters")
    if args.trials < 2 or args.objects < 0:
        parser.error("--trials must be >= 2 and --objects >= 0")

    reuse = bool(args.cluster_a)
    started_at = time.monotonic()
    started: list[str] = []
    bench = None
    try:
        clusters = []
        for name in ((args.cluster_a, args.cluster_b) if reuse else ("mcbench-a", "mcbench-b")):
            if reuse:
                c = tb.Cluster.load(name)
                if c is None or not c.pids or not all(c.alive().values()):
                    parser.error(f"cluster {name!r} is not up (hack/cluster status {name})")
            else:
                started.append(name)   # before up(): a half-started cluster is brought down too
                c = tb.up(name, out=sys.stderr)
            clusters.append(c)
        a, b = clusters
        ns = f"mcbench-{os.getpid()}" if reuse else "mcbench"
        work = Path(tempfile.mkdtemp(prefix="gitopsd-clusters-bench-"))
        bench = Bench(args, a, b, ns, work)
        try:
            bench.run()
        finally:
            bench.resume_b()   # always: never leave b's apiserver stopped
            if bench.daemon is not None:
                bench.daemon.stop()
        s = summary(bench.results)
        print(f"\ngitopsd, two clusters: push -> applied on a while b is healthy / stopped (SIGSTOP, "
              f"{s.get('held_s', HOLD_SECONDS):.0f} s); {os.cpu_count()}-core shared machine\n")
        print(table(s, args))
        if args.json:
            args.json.write_text(json.dumps({"objects": args.objects + 1, "trials": args.trials,
                                             "clusters": [a.name, b.name], **s}, indent=1) + "\n")
            say(f"wrote {args.json}")
        say(f"daemon log kept: {bench.daemon.log_path}; took {time.monotonic() - started_at:.0f}s")
        return 0
    except BaseException:
        if bench is not None and bench.results:
            say("PARTIAL results before the failure:\n" + table(summary(bench.results), args))
        if bench is not None and bench.daemon is not None:
            say(f"daemon log: {bench.daemon.log_path}")
        raise
    finally:
        if bench is not None:
            bench.resume_b()
        if reuse and bench is not None:
            bench.cleanup_namespaces()
        for name in started:
            tb.down(name)
            say(f"cluster {name!r} stopped")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
