"""Command-line face of the test bed (`hack/cluster`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import build, cluster


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build the pinned binaries into the cache (skips what is built)")
    b.add_argument("--only", nargs="*", help="build only these binaries (e.g. kubectl helm)")
    for verb, text in (("up", "start a cluster and print its kubeconfig path"),
                       ("down", "stop a cluster and remove its state"),
                       ("status", "show clusters and their processes"),
                       ("kubeconfig", "print a cluster's kubeconfig path")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", nargs="?", default=None if verb == "status" else "default")
        if verb == "up":
            p.add_argument("--nodes", type=int, default=3, help="number of KWOK fake nodes (default 3)")
    args = parser.parse_args(argv)

    try:
        if args.verb == "build":
            print(f"building test-bed binaries into {build.bin_dir()}", flush=True)
            build.build(only=args.only)
        elif args.verb == "up":
            if not build.all_built():
                print("some binaries are missing; building them first", file=sys.stderr, flush=True)
                build.build(out=sys.stderr)
            c = cluster.up(args.name, nodes=args.nodes, out=sys.stderr)
            print(c.kubeconfig)
        elif args.verb == "down":
            stopped = cluster.down(args.name)
            print(f"cluster {args.name!r} down; stopped: {', '.join(stopped) or 'nothing was running'}",
                  file=sys.stderr)
        elif args.verb == "status":
            print(json.dumps(cluster.status(args.name), indent=2))
        elif args.verb == "kubeconfig":
            path = cluster.kubeconfig_path(args.name)
            if not path.exists():
                print(f"no cluster {args.name!r}: start it with `hack/cluster up {args.name}`", file=sys.stderr)
                return 1
            print(path)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"hack/cluster {args.verb}: {exc}", file=sys.stderr)
        return 1
    return 0
