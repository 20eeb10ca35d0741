#!/usr/bin/env python3
"""`make run`: the local control plane, a Git remote seeded from sample-repo/,
and gitopsd running in the foreground against it.

1. builds the control plane the first time (visible progress) and starts the
   cluster named `default` (or --cluster NAME) unless it is already up;
2. creates a local bare Git remote, ~/.cache/gitopsd/quickstart/fleet.git,
   seeded from sample-repo/ (kept across runs: your pushes survive);
3. writes a config with one app per environment overlay;
4. runs `gitopsd run` with readable logs until Ctrl-C.

Then, in another terminal:
    git clone ~/.cache/gitopsd/quickstart/fleet.git && cd fleet
    edit apps/web/overlays/staging/kustomization.yaml   (minReplicas: 2 -> 3)
    git commit -am "staging: 3 replicas" && git push
gitopsd sees the push within a second (it watches local repositories).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

from testbed import build, cluster  # noqa: E402

ENVIRONMENTS = ("dev", "staging", "production")


def git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "gitopsd quickstart"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "quickstart@gitopsd.local"),
           "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "gitopsd quickstart"),
           "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "quickstart@gitopsd.local")}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def seed_remote(remote: Path) -> None:
    if remote.exists():
        print(f"using the existing Git remote {remote}", flush=True)
        return
    remote.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=remote.parent)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "fleet"
        shutil.copytree(ROOT / "sample-repo", work)
        git("init", "-q", "-b", "main", cwd=work)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "Initial desired state from gitopsd's sample-repo", cwd=work)
        git("remote", "add", "origin", str(remote), cwd=work)
        git("push", "-q", "origin", "main", cwd=work)
    print(f"created the Git remote {remote} from sample-repo/", flush=True)


def write_config(path: Path, remote: Path) -> None:
    lines = ["# Written by hack/quickstart.py: one app per environment of sample-repo.", "apps:"]
    for env in ENVIRONMENTS:
        lines += [f"  - name: web-{env}", f"    repo: file://{remote}", "    ref: main",
                  f"    path: apps/web/overlays/{env}", f"    namespace: web-{env}", "    interval: 1m",
                  "    prune: true", "    selfHeal: true", "    timeout: 2m"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--http-port", type=int, default=8080)
    args = parser.parse_args()

    if not build.all_built():
        print("building the local control plane (first run only; ~10 minutes on 2 cores)", flush=True)
        build.build()
    c = cluster.up(args.cluster, out=sys.stdout)
    home = build.cache_dir() / "quickstart"
    remote = home / "fleet.git"
    seed_remote(remote)
    config = home / "gitopsd.yaml"
    write_config(config, remote)
    print(f"\nconfig: {config}\nkubeconfig: {c.kubeconfig}\n"
          f"try:    git clone {remote} /tmp/fleet   (edit, commit, push: gitopsd deploys it)\n"
          f"        KUBECONFIG={c.kubeconfig} {ROOT / '.venv/bin/gitopsd'} status\n", flush=True)
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig)}
    cmd = [sys.executable, "-m", "gitopsd", "run", "--config", str(config), "--http-address", "127.0.0.1",
           "--http-port", str(args.http_port), "--no-leader-elect"]
    daemon = subprocess.Popen(cmd, env=env)
    # Stopped with SIGTERM (kill, a timeout, make's parent going away): stop the daemon too, as Ctrl-C
    # does (the terminal sends that one to both), instead of leaving it running without us.
    signal.signal(signal.SIGTERM, lambda *_: daemon.terminate())
    try:
        return daemon.wait()
    except KeyboardInterrupt:
        daemon.wait()
        return 0


if __name__ == "__main__":
    sys.exit(main())
