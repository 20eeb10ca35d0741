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

With --clusters 2 (`make run CLUSTERS=2`) it also starts a second cluster,
NAME-b, stores a self-contained kubeconfig for it (a client certificate of
user `gitopsd` in system:masters, minted by that cluster's CA) in the Secret
`cluster-b-kubeconfig` (key `value`) in the home cluster's `gitopsd-system`
namespace (or $GITOPSD_NAMESPACE), and adds to the config a `clusters:`
section naming it `b` (labels env: staging); `web-dev` then fans out to both
clusters (`clusters: [in-cluster, b]`): one target per cluster, each its own
ApplySet, status and audit trail (`web-dev` and `web-dev@b` in the log). --dry-config stops after writing the config (and
the Secret), before gitopsd runs; --home puts the Git remote and the config
elsewhere than ~/.cache/gitopsd/quickstart.
"""

from __future__ import annotations

import argparse
import base64
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
# gitopsd's own namespace when --namespace is not given (gitopsd/cli.py): where it reads cluster Secrets.
DAEMON_NAMESPACE = os.environ.get("GITOPSD_NAMESPACE") or "gitopsd-system"
# The second cluster of --clusters 2: its name in the config, the Secret holding its kubeconfig, its labels.
CLUSTER_B = "b"
CLUSTER_B_SECRET = "cluster-b-kubeconfig"
CLUSTER_B_LABELS = {"env": "staging"}


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


def _app(name: str, remote: Path, env: str, namespace: str) -> list[str]:
    return [f"  - name: {name}", f"    repo: file://{remote}", "    ref: main",
            f"    path: apps/web/overlays/{env}", f"    namespace: {namespace}", "    interval: 1m",
            "    prune: true", "    selfHeal: true", "    timeout: 2m"]


def write_config(path: Path, remote: Path, *, clusters: int = 1) -> None:
    """One app per environment of sample-repo; with clusters=2 also cluster `b`
    (its kubeconfig in the Secret CLUSTER_B_SECRET), and web-dev on both."""
    if clusters == 1:
        lines = ["# Written by hack/quickstart.py: one app per environment of sample-repo.", "apps:"]
    else:
        labels = ", ".join(f"{k}: {v}" for k, v in CLUSTER_B_LABELS.items())
        lines = ["# Written by hack/quickstart.py --clusters 2: one app per environment of sample-repo on",
                 "# gitopsd's own cluster (in-cluster); web-dev on it and on cluster b (a fan-out).",
                 "clusters:",
                 f"  {CLUSTER_B}:",
                 f"    kubeconfig:  # in {DAEMON_NAMESPACE}, key `value`: written by hack/quickstart.py",
                 f"      secretRef: {{name: {CLUSTER_B_SECRET}}}",
                 f"    labels: {{{labels}}}",
                 "apps:"]
    for env in ENVIRONMENTS:
        lines += _app(f"web-{env}", remote, env, f"web-{env}")
        if clusters > 1 and env == "dev":
            lines.append(f"    clusters: [in-cluster, {CLUSTER_B}]")
    path.write_text("\n".join(lines) + "\n")


def store_cluster_kubeconfig(home: cluster.Cluster, target: cluster.Cluster, *, namespace: str, secret: str,
                             context: str) -> None:
    """Put a self-contained kubeconfig for `target` (user gitopsd, system:masters; a new client
    certificate each run) into Secret `secret`, key `value`, in `home`'s `namespace`.
    Stdlib requests as the test bed's admin: no kubectl needed."""
    def check(status: int, body, what: str, ok: tuple[int, ...]) -> int:
        if status not in ok:
            raise cluster.ClusterError(f"{what} in cluster {home.name!r} failed ({status}): {body}")
        return status

    check(*cluster.request(home, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                                 "metadata": {"name": namespace}}),
          f"creating namespace {namespace}", (201, 409))
    text = cluster.inline_kubeconfig_yaml(target, user="gitopsd", groups=("system:masters",), context=context)
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "gitopsd-quickstart"}},
            "data": {"value": base64.b64encode(text.encode()).decode()}}
    secrets = f"/api/v1/namespaces/{namespace}/secrets"
    if check(*cluster.request(home, "POST", secrets, body), f"creating Secret {namespace}/{secret}",
             (201, 409)) == 409:
        check(*cluster.request(home, "PUT", f"{secrets}/{secret}", body), f"replacing Secret {namespace}/{secret}",
              (200,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--clusters", type=int, choices=(1, 2), default=1,
                        help="2: also start CLUSTER-b and deploy web-dev to both (default 1)")
    parser.add_argument("--dry-config", action="store_true",
                        help="start the cluster(s), write the config (and cluster b's Secret), print where, "
                             "and exit without running gitopsd")
    parser.add_argument("--home", type=Path, default=None,
                        help="directory of the Git remote and the config (default ~/.cache/gitopsd/quickstart)")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[cluster.Cluster, Path]:
    """Everything before gitopsd runs: cluster(s) up, Git remote, (Secret,) config,
    the banner. Returns the home cluster and the config path."""
    if not build.all_built():
        print("building the local control plane (first run only; ~10 minutes on 2 cores)", flush=True)
        build.build()
    c = cluster.up(args.cluster, out=sys.stdout)
    b = cluster.up(f"{args.cluster}-b", out=sys.stdout) if args.clusters > 1 else None
    home = args.home or build.cache_dir() / "quickstart"
    remote = home / "fleet.git"
    seed_remote(remote)
    if b is not None:
        store_cluster_kubeconfig(c, b, namespace=DAEMON_NAMESPACE, secret=CLUSTER_B_SECRET, context=CLUSTER_B)
        print(f"stored a kubeconfig for cluster {b.name!r} (as `{CLUSTER_B}`) in Secret "
              f"{DAEMON_NAMESPACE}/{CLUSTER_B_SECRET} of cluster {c.name!r}", flush=True)
    config = home / "gitopsd.yaml"
    write_config(config, remote, clusters=args.clusters)
    print(f"\nweb view: http://127.0.0.1:{args.http_port}/   (apps, drift, history; live)\n"
          f"config: {config}\nkubeconfig: {c.kubeconfig}\n"
          f"try:    git clone {remote} /tmp/fleet   (edit, commit, push: gitopsd deploys it)\n"
          f"        KUBECONFIG={c.kubeconfig} {ROOT / '.venv/bin/gitopsd'} status"
          + (f" --config {config}   (a row per target, on both clusters)" if b is not None else "") + "\n",
          flush=True)
    if b is not None:
        print(f"cluster b ({b.name}, web-dev's second target): kubeconfig {b.kubeconfig}\n"
              f"        KUBECONFIG={b.kubeconfig} {build.bin_dir() / 'kubectl'} get deployments -A\n", flush=True)
    return c, config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    c, config = prepare(args)
    if args.dry_config:
        return 0
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
