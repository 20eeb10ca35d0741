"""Command-line face of the test bed (`hack/cluster`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import build, cluster, node, prometheus


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build the pinned binaries into the cache (skips what is built)")
    b.add_argument("--only", nargs="*", help="build only these binaries (e.g. kubectl helm)")
    b.add_argument("--skip", nargs="*", default=(), help="never these (e.g. gitea: make test builds it meanwhile)")
    b.add_argument("--background", action="store_true",
                   help="start the build (of --only) in a detached process under nice 19 and return")
    for verb, text in (("up", "start a cluster and print its kubeconfig path"),
                       ("down", "stop a cluster (and its Prometheus, if any) and remove its state"),
                       ("status", "show clusters and their processes"),
                       ("kubeconfig", "print a cluster's kubeconfig path")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", nargs="?", default=None if verb == "status" else "default")
        if verb == "up":
            p.add_argument("--nodes", type=int, default=3, help="number of KWOK fake nodes (default 3)")
    p = sub.add_parser("prometheus", help="start or stop the test bed's Prometheus and its test exporter")
    p.add_argument("action", choices=("up", "down", "status"),
                   help="up: start (building it first if needed) and print PROMETHEUS_URL= and EXPORTER_URL=")
    p.add_argument("name", nargs="?", default="default", help="the test bed name (a cluster need not run)")
    p = sub.add_parser("node", help="a real node (kubelet, containerd, runc, CNI bridge) for a running cluster")
    p.add_argument("action", choices=("up", "down", "status"),
                   help="up: start it (building the kubelet first if needed) and wait until it is Ready")
    p.add_argument("name", nargs="?", default="default", help="the cluster's name")
    p.add_argument("--import", dest="archives", nargs="*", default=(), metavar="ARCHIVE",
                   help="with up: also import these OCI/docker image archives into the node's containerd")
    args = parser.parse_args(argv)

    try:
        if args.verb == "build":
            if args.background:
                build.start_background(args.only or [])
                return 0
            print(f"building test-bed binaries into {build.bin_dir()}", flush=True)
            build.build(only=args.only, skip=tuple(args.skip))
        elif args.verb == "up":
            if todo := build.missing(build.control_plane()):
                print(f"missing: {', '.join(todo)}; building them first", file=sys.stderr, flush=True)
                build.build(only=todo, out=sys.stderr)
            c = cluster.up(args.name, nodes=args.nodes, out=sys.stderr)
            print(c.kubeconfig)
        elif args.verb == "down":
            stopped = cluster.down(args.name)
            print(f"cluster {args.name!r} down; stopped: {', '.join(stopped) or 'nothing was running'}",
                  file=sys.stderr)
        elif args.verb == "prometheus":
            return _prometheus(args.action, args.name)
        elif args.verb == "node":
            return _node(args.action, args.name, args.archives)
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


def _prometheus(action: str, name: str) -> int:
    if action == "up":
        if build.missing(["prometheus"]):
            print("prometheus is not built yet; building it first", file=sys.stderr, flush=True)
            build.build(only=["prometheus"], out=sys.stderr)
        prom = prometheus.up(name, out=sys.stderr)
        print(f"PROMETHEUS_URL={prom.url}\nEXPORTER_URL={prom.exporter_url}")
    elif action == "down":
        stopped = prometheus.down(name)
        print(f"prometheus {name!r} down; stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    else:
        found = prometheus.status(name)
        if found is None:
            print(f"no prometheus {name!r}: start it with `hack/cluster prometheus up {name}`", file=sys.stderr)
            return 1
        print(json.dumps(found, indent=2))
    return 0


def _node(action: str, name: str, archives) -> int:
    if action == "up":
        n = node.up(name, out=sys.stderr)
        for archive in archives:
            print(f"imported {', '.join(node.import_image(name, archive))} from {archive}", file=sys.stderr)
        print(json.dumps(node.status(name), indent=2))
    elif action == "down":
        stopped = node.down(name)
        print(f"node of {name!r} down; {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    else:
        found = node.status(name)
        if found is None:
            print(f"no node for cluster {name!r}: start it with `hack/cluster node up {name}`", file=sys.stderr)
            return 1
        print(json.dumps(found, indent=2))
    return 0
