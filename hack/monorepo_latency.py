#!/usr/bin/env python3
"""Push -> applied in a monorepo: one-line change to one app of N apps sharing one repository.

The case the per-repository fetch is for: N apps (default 50) on one repo
and ref, each its own directory (plain YAML or a kustomize overlay over a
shared base); every trial changes one value in one app, pushes, posts the
signed generic webhook and polls the apiserver until the value is live
(hack/latency.py's push_to_applied). Also reports how many git fetches and
reconciles the daemon spent on the pushes (its /metrics).

    .venv/bin/python hack/monorepo_latency.py [--apps 50] [--trials 20] [--render plain|kustomize]
                                              [--interval 10m] [--cluster NAME] [--profile]

`--cluster` reuses a running test-bed cluster (e.g. `shared`) and leaves it
running; without it a cluster "latency" is started and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import DaemonProcess, GitRepo, configmap, wait_for  # noqa: E402
from latency import SECRET, label, pct, push_to_applied, samples, start_profile, stop_profile  # noqa: E402
from testbed import cluster as tb  # noqa: E402

from gitopsd.kube import Kube  # noqa: E402


def write_apps(repo: GitRepo, *, apps: int, render: str, per_app: int) -> None:
    if render == "kustomize":
        repo.write("base/kustomization.yaml", {"resources": ["filler.yaml"]})
        repo.write("base/filler.yaml", [configmap(f"filler-{i:02d}", {"i": str(i)}) for i in range(per_app)])
    for n in range(apps):
        d = f"apps/app-{n:02d}"
        repo.write(f"{d}/settings.yaml", settings(n, "0", render=render))
        if render == "kustomize":
            repo.write(f"{d}/kustomization.yaml", {"namePrefix": f"app-{n:02d}-",
                                                   "resources": ["../../base", "settings.yaml"]})
        else:
            repo.write(f"{d}/filler.yaml", [configmap(f"app-{n:02d}-filler-{i:02d}", {"i": str(i)})
                                            for i in range(per_app)])


def settings(n: int, value: str, *, render: str) -> dict:
    """App n's ConfigMap app-NN-settings (kustomize adds the app-NN- prefix itself)."""
    return configmap("settings" if render == "kustomize" else f"app-{n:02d}-settings", {"value": value})


def metrics(daemon: DaemonProcess) -> dict[str, float]:
    """Git fetches and reconciles in all, and reconciles by trigger (`trigger=webhook`)."""
    out: dict[str, float] = {}
    for key, value in samples(daemon, "gitopsd_git_fetches_total", "gitopsd_reconcile_total").items():
        name = key.split("{")[0]
        out[name] = out.get(name, 0.0) + value
        if name == "gitopsd_reconcile_total":
            trigger = f"trigger={label(key, 'trigger')}"
            out[trigger] = out.get(trigger, 0.0) + value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--objects-per-app", type=int, default=5)
    parser.add_argument("--render", choices=("plain", "kustomize"), default="plain")
    parser.add_argument("--interval", default="10m", help="each app's poll interval (default 10m: pushes only)")
    parser.add_argument("--cluster", help="reuse this running test-bed cluster (left running)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy over the pushes: where they spent their wall-clock time, by stage and frame")
    args = parser.parse_args()

    c = tb.up(args.cluster or "latency", out=sys.stderr)
    daemon = None
    work = Path(tempfile.mkdtemp(prefix="gitopsd-monorepo-"))
    ns = f"monorepo-{os.getpid()}"
    kube = Kube.connect(kubeconfig=c.kubeconfig)
    try:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        repo = GitRepo(work / "git")
        write_apps(repo, apps=args.apps, render=args.render, per_app=args.objects_per_app)
        repo.commit("initial")
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps({"apps": [
            {"name": f"app-{n:02d}", "repo": repo.url, "ref": "main", "path": f"apps/app-{n:02d}",
             "namespace": ns, "interval": args.interval} for n in range(args.apps)]}))
        daemon = DaemonProcess(config=cfg, kubeconfig=c.kubeconfig, namespace=ns, workdir=work, cache=work / "cache",
                               extra=("--no-leader-elect", "--no-watch-local"),
                               env={"GITOPSD_WEBHOOK_SECRET": SECRET}, name="monorepo")
        daemon.wait_ready()
        cms = kube.resource("v1", "ConfigMap")

        def value(n: int = 0) -> str | None:
            obj = kube.get(cms, f"app-{n:02d}-settings", ns)
            return None if obj is None else obj["data"]["value"]

        started = time.monotonic()
        wait_for("first sync of every app", lambda: all(value(n) == "0" for n in range(args.apps)), 300, 0.5)
        print(f"all {args.apps} apps applied {time.monotonic() - started:.1f}s after the daemon was ready",
              file=sys.stderr)
        wait_for("the first reconciles to settle",
                 lambda: metrics(daemon).get("gitopsd_reconcile_total", 0) >= args.apps, 120, 0.5)
        time.sleep(2)   # the audit records of the first sync
        before = metrics(daemon)

        def change(i: int) -> None:
            repo.write("apps/app-00/settings.yaml", settings(0, str(i), render=args.render))

        spy = start_profile(daemon.proc.pid, work / "profile.txt") if args.profile else None
        push = push_to_applied(daemon, repo, args.trials, change=change, applied=lambda i: value() == str(i))
        profile = stop_profile(spy, work / "profile.txt", None) if spy else None
        # A push wakes the apps it concerns (here the changed one): wait until no reconcile runs.
        wait_for("the pushes' reconciles to end", lambda: not any(
            a["running"] for a in json.loads(daemon.get("/status")[1])["apps"]), 120, 0.5)
        after = metrics(daemon)
        fetches = after.get("gitopsd_git_fetches_total", 0) - before.get("gitopsd_git_fetches_total", 0)
        reconciles = after.get("gitopsd_reconcile_total", 0) - before.get("gitopsd_reconcile_total", 0)
        print(f"\npush -> applied, one-line change in 1 of {args.apps} apps on one repo ({args.render}, "
              f"{args.objects_per_app + 1} objects per app; {args.trials} trials)")
        print(f"  p50 {statistics.median(push) * 1000:.0f} ms   p95 {pct(push, 0.95) * 1000:.0f} ms   "
              f"max {max(push) * 1000:.0f} ms")
        print(f"  git fetches per push: {fetches / args.trials:.1f}" if "gitopsd_git_fetches_total" in after
              else "  git fetches per push: (no gitopsd_git_fetches_total metric in this version)")
        by_trigger = {k.split("=", 1)[1]: (after[k] - before.get(k, 0)) / args.trials for k in after
                      if k.startswith("trigger=") and after[k] != before.get(k, 0)}
        print(f"  reconciles per push: {reconciles / args.trials:.1f} "
              f"(by trigger: {', '.join(f'{k} {v:.1f}' for k, v in sorted(by_trigger.items()))})")
        if profile:
            ms = 1000 / 200 / args.trials
            stages = {k: round(v * profile["samples"] / 100 * ms, 1) for k, v in profile["stages_percent"].items()}
            print(f"  py-spy, ms per push (200 Hz, waits included) by stage: {json.dumps(stages)}")
            print(f"  source.fetch by step, ms per push: "
                  f"{json.dumps({k: round(v * ms, 1) for k, v in list(profile['fetch_steps_samples'].items())[:8]})}")
            for name, share in profile["inclusive_percent"][:25]:
                print(f"    {share:5.1f}%  {name}")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        try:
            kube.delete(kube.resource("v1", "Namespace"), ns)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass
        if not args.cluster:
            tb.down("latency")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
