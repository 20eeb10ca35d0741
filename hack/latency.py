#!/usr/bin/env python3
"""Daemon latency: push-to-applied and edit-to-reverted, p50/p95 over N trials,
and apiserver requests per steady-state reconcile.

Runs the real `gitopsd run` against a local cluster and a local bare Git
remote, one app of --objects ConfigMaps (default 200) plus the one that
changes, and measures from outside, the way a user would:

- push-to-applied: a one-line change to ONE object of the app, `git push`
  returns -> POST the generic webhook -> poll the apiserver (every 5 ms)
  until the new value is live; with the daemon's own request counters per
  push, so that "the cost follows the change" is a number;
- edit-to-reverted: a hand edit (an Update by another field manager) returns
  -> poll until gitopsd has put the desired value back;
- steady state: gitopsd's own request counters over K unchanged polls.

    .venv/bin/python hack/latency.py [--trials 20] [--objects 1000] [--layout file-per-object]
                                     [--cluster shared] [--profile 1] [--json F]

--layout: one-file (default; the objects in one multi-document file beside
the changed one's) or file-per-object. --cluster reuses a running test-bed
cluster and leaves it running (a namespace of its own, deleted at the end);
without it a cluster "latency" is started and stopped. --profile N runs
py-spy (with idle samples, 200 Hz) over the push trials after the first N
and says where the reconciles of the pushes spent their wall-clock time, by
stage (fetch, render, plan, apply, health, record, status), the fetch by its
steps (the git session, the checkout, reading the commit), and by frame.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
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


#: Stages of a push's reconcile, by the first frame of each found on a sample's stack (runner and engine).
STAGES = (
    ("fetch", ("fetch (gitopsd/engine/source_share.py", "fetch (gitopsd/engine/source.py")),
    ("render", ("_render (gitopsd/engine/sync.py",)),
    ("plan", ("make_plan (gitopsd/engine/plan.py", "load (gitopsd/engine/inventory.py")),
    ("apply", ("apply_plan (gitopsd/engine/apply.py",)),
    ("health", ("_wait_healthy (gitopsd/engine/sync.py",)),
    ("record", ("_record (gitopsd/daemon/runner.py",)),
    ("status", ("_write_status (gitopsd/daemon/runner.py",)),
    ("watch", ("_watch (gitopsd/daemon/runner.py",)),
    ("look", ("_look (gitopsd/daemon/triggers.py",)),
)
#: The frames of a push's work: its reconcile, and the look at the repository that wakes it.
PUSH_WORK = ("_reconcile (gitopsd/daemon/runner.py", "_look (gitopsd/daemon/triggers.py")


def start_profile(pid: int, out: Path):
    """py-spy record of the daemon with idle samples (waits count: this is about wall-clock time)."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("no py-spy: no profile (.venv/bin/pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-r", "200", "--idle", "-f", "raw", "-o", str(out),
                             "--nonblocking"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_profile(spy, out: Path, keep: Path | None) -> dict | None:
    """Stop py-spy; the push reconciles' samples by stage and by frame (hack/fleet_bench.summarize_stacks)."""
    import signal

    from fleet_bench import summarize_stacks

    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=120)
    if not out.exists():
        print(f"py-spy failed ({spy.returncode}): {err.strip()[-500:]}", file=sys.stderr)
        return None
    raw = out.read_text()
    if keep:
        keep.write_text(raw)
    work = [line for line in raw.splitlines() if any(f in line for f in PUSH_WORK)]
    stages: dict[str, int] = {}
    for line in work:
        stack, _, n = line.rpartition(" ")
        name = next((stage for stage, frames in STAGES if any(f in stack for f in frames)), "other")
        stages[name] = stages.get(name, 0) + int(n)
    total = sum(stages.values()) or 1
    return {"samples": total, "stages_percent": {k: round(100 * v / total, 1) for k, v in
                                                 sorted(stages.items(), key=lambda kv: -kv[1])},
            "fetch_steps_samples": fetch_steps(work), **summarize_stacks("\n".join(work), None)}


#: The frame of gitopsd.engine.source.fetch; the steps of a fetch are the frames right below it.
SOURCE_FETCH = "fetch (gitopsd/engine/source.py"


def fetch_steps(stacks: list[str]) -> dict[str, int]:
    """Samples of source.fetch by its step (the function it called: _fetch_moved, _resolve,
    _materialise, _read_revision, ...), so that "fetch" in the stages splits into git's parts."""
    steps: dict[str, int] = {}
    for line in stacks:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith(SOURCE_FETCH)), None)
        if at is None:
            continue
        below = [f.split(" (")[0] for f in frames[at + 1:at + 3]]
        name = " > ".join(below) or "fetch itself"
        steps[name] = steps.get(name, 0) + int(n)
    return dict(sorted(steps.items(), key=lambda kv: -kv[1]))


def samples(daemon: DaemonProcess, *names: str) -> dict[str, float]:
    """The daemon's samples of the metrics `names` from GET /metrics, by full sample (name and labels)."""
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(tuple(f"{n}{{" for n in names)):
            key, v = line.rsplit(" ", 1)
            out[key] = out.get(key, 0.0) + float(v)
    return out


def label(sample: str, name: str) -> str:
    """The value of label `name` in a sample key (`metric{a="x",b="y"}`); "" when absent."""
    found = re.search(f'[{{,]{name}="([^"]*)"', sample)
    return found.group(1) if found else ""


def daemon_counters(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's request and reconcile counters, by full sample name."""
    return samples(daemon, "gitopsd_apiserver_requests_total", "gitopsd_reconcile_total")


def requests_by_verb(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in after:
        if k.startswith("gitopsd_apiserver_requests_total") and after[k] != before.get(k, 0.0):
            verb = k.split('verb="')[1].split('"')[0]
            out[verb] = out.get(verb, 0.0) + after[k] - before.get(k, 0.0)
    return out


def write_app(repo: GitRepo, *, objects: int, layout: str) -> None:
    repo.write("app/cm.yaml", configmap("settings", {"value": "0"}))
    fillers = [configmap(f"filler-{i:04d}", {"i": str(i)}) for i in range(objects)]
    if layout == "one-file":
        repo.write("app/more.yaml", fillers)
    else:
        for cm in fillers:
            repo.write(f"app/more/{cm['metadata']['name']}.yaml", cm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--objects", type=int, default=200, help="ConfigMaps beside the changed one (default 200)")
    parser.add_argument("--layout", choices=("one-file", "file-per-object"), default="one-file")
    parser.add_argument("--steady-polls", type=int, default=3)
    parser.add_argument("--cluster", help="reuse this running test-bed cluster (left running)")
    parser.add_argument("--keep-cluster", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="py-spy the push trials after the first N (0: no profile)")
    parser.add_argument("--profile-out", type=Path, metavar="FILE", help="keep py-spy's raw stacks in FILE")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()

    c = tb.up(args.cluster or "latency", out=sys.stderr)
    daemon = None
    ns = f"latency-{os.getpid()}" if args.cluster else "latency"
    kube = Kube.connect(kubeconfig=c.kubeconfig)
    try:
        if kube.get(kube.resource("v1", "Namespace"), ns) is None:
            kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        work = Path(tempfile.mkdtemp(prefix="gitopsd-latency-"))
        repo = GitRepo(work / "git")
        write_app(repo, objects=args.objects, layout=args.layout)
        repo.commit("initial")
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps({"apps": [{"name": ns, "repo": repo.url, "ref": "main", "path": "app",
                                             "namespace": ns, "interval": "5s"}]}))
        daemon = DaemonProcess(config=cfg, kubeconfig=c.kubeconfig, namespace=ns, workdir=work, cache=work / "cache",
                               extra=("--no-leader-elect", "--no-watch-local"),
                               env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name="latency")
        daemon.wait_ready()
        cms = kube.resource("v1", "ConfigMap")

        def value() -> str | None:
            obj = kube.get(cms, "settings", ns)
            return None if obj is None else obj["data"]["value"]

        wait_for("first sync", lambda: value() == "0", 300)

        def settled() -> bool:   # the first sync's reconcile over (its applies are not the pushes')
            [app] = json.loads(daemon.get("/status")[1])["apps"]
            return app["result"] == "Applied" and not app["running"]

        wait_for("the first sync to end", settled, 300)

        def change(i: int) -> None:
            repo.write("app/cm.yaml", configmap("settings", {"value": str(i)}))

        warm = min(args.profile, args.trials) if args.profile else 0
        push = push_to_applied(daemon, repo, warm, change=change, applied=lambda i: value() == str(i)) if warm \
            else []
        spy = start_profile(daemon.proc.pid, work / "profile.txt") if args.profile else None
        before = daemon_counters(daemon)
        rest = push_to_applied(daemon, repo, args.trials - warm, change=lambda i: change(i + warm),
                               applied=lambda i: value() == str(i + warm))
        push += rest
        per_push = {verb: round(v / max(1, len(rest)), 1)
                    for verb, v in requests_by_verb(before, daemon_counters(daemon)).items()}
        profile = stop_profile(spy, work / "profile.txt", args.profile_out) if spy else None
        revert = edit_to_reverted(kube, [(ns, "settings", "value", str(args.trials))] * args.trials)

        def polls(cnt: dict[str, float]) -> float:
            return sum(v for k, v in cnt.items() if k.startswith("gitopsd_reconcile_total") and 'trigger="poll"' in k)

        time.sleep(2)
        before = daemon_counters(daemon)
        wait_for("steady polls", lambda: polls(daemon_counters(daemon)) >= polls(before) + args.steady_polls, 120)
        after = daemon_counters(daemon)
        n = polls(after) - polls(before)
        per = {verb: v / n for verb, v in requests_by_verb(before, after).items()} if n else {}

        print(f"\ngitopsd daemon latency ({args.trials} trials each; 2-core shared machine; "
              f"app of {args.objects + 1} ConfigMaps, {args.layout}, one changed per push)\n")
        print(f"{'measure':<34}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
        for name, vals in (("push -> applied (webhook)", push), ("hand edit -> reverted (self-heal)", revert)):
            print(f"{name:<34}{statistics.median(vals) * 1000:>10.0f}{pct(vals, 0.95) * 1000:>10.0f}"
                  f"{max(vals) * 1000:>10.0f}")
        print(f"\ndaemon requests per push: {json.dumps(per_push) if per_push else '0 (none)'}")
        print(f"steady-state reconciles observed: {n:.0f}; apiserver requests per reconcile: "
              f"{json.dumps(per) if per else '0 (none)'}")
        if profile:
            print(f"\npy-spy over {len(rest)} pushes ({profile['samples']} samples of the push's reconcile, waits "
                  f"included): by stage {json.dumps(profile['stages_percent'])}; top frames, inclusive %:")
            per_push_ms = {k: round(v / 200 / len(rest) * 1000, 1) for k, v in profile["fetch_steps_samples"].items()}
            print(f"source.fetch by step, ms per push (200 Hz): {json.dumps(dict(list(per_push_ms.items())[:8]))}")
            for name, share in profile["inclusive_percent"]:
                print(f"  {share:5.1f}%  {name}")
        if args.json:
            args.json.write_text(json.dumps({
                "objects": args.objects + 1, "layout": args.layout, "trials": args.trials,
                "push_ms": {"p50": round(statistics.median(push) * 1000), "p95": round(pct(push, 0.95) * 1000),
                            "all": [round(v * 1000) for v in push]},
                "revert_ms": {"p50": round(statistics.median(revert) * 1000),
                              "p95": round(pct(revert, 0.95) * 1000)},
                "requests_per_push": per_push, "requests_per_steady_reconcile": per, "profile": profile}, indent=1))
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if args.cluster:
            try:
                kube.delete(kube.resource("v1", "Namespace"), ns)
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        elif not args.keep_cluster:
            tb.down("latency")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
