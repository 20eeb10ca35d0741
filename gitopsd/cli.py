"""The `gitopsd` command line.

`diff` and `sync` run the same pipeline the daemon runs (gitopsd.sync), once.
Exit codes follow `kubectl diff`: diff exits 0 in sync, 1 on drift, 2 on
error; sync exits 0 when applied (or nothing to do), 1 when Unhealthy or
refused by the prune guard, 2 when it failed. A sync (not --dry-run) writes
one audit record (trigger "cli") to the app's trail in --inventory-namespace.

`history` and `audit verify` read that trail (gitopsd.audit): history exits
1 when nothing is recorded (or, with --at, nothing was live then); verify
exits 1 when the chain is broken. Both exit 2 on errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from pathlib import Path

import orjson

from gitopsd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gitopsd",
        description="Keep a Kubernetes cluster converged to the manifests in a Git repository.",
    )
    parser.add_argument("--version", action="version", version=f"gitopsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("source and render")
    g.add_argument("--repo", required=True, help="Git URL (file://, https://, ssh://) or a local path")
    g.add_argument("--ref", default="HEAD", help="branch, tag or commit SHA (default: the remote's HEAD)")
    g.add_argument("--path", default=".", help="directory inside the repository to render (default: root)")
    g.add_argument("--render", default="auto", choices=["auto", "plain", "kustomize", "helm"],
                   help="how to render PATH (default: auto-detect kustomization.yaml / Chart.yaml)")
    g.add_argument("--values", action="append", default=[], metavar="FILE",
                   help="helm values file, relative to the repository root (repeatable)")
    g.add_argument("--namespace", "-n", default="default",
                   help="namespace for namespaced objects that name none (default: default)")
    g.add_argument("--git-token-file", type=Path, help="file holding an https token (or set GITOPSD_GIT_TOKEN)")
    g.add_argument("--git-username", default=None, help="https username to pair with the token")
    g.add_argument("--ssh-key", type=Path, help="private key for ssh:// remotes")
    g.add_argument("--known-hosts", type=Path, help="known_hosts file for ssh:// remotes (host keys are checked)")
    k = common.add_argument_group("cluster")
    k.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    k.add_argument("--context", default=None, help="kubeconfig context")
    k.add_argument("--app", default=None,
                   help="app name = ApplySet name (default: derived from the repository and path)")
    k.add_argument("--inventory-namespace", default=os.environ.get("GITOPSD_NAMESPACE", "gitopsd-system"),
                   help="namespace of the ApplySet parent (default: $GITOPSD_NAMESPACE or gitopsd-system)")
    k.add_argument("--concurrency", type=int, default=16, help="parallel apiserver requests (default 16)")
    common.add_argument("--output", "-o", default="text", choices=["text", "json"])

    sub.add_parser("diff", parents=[common], help="show how the cluster differs from the commit",
                   description="Print the drift report. Exit 0 in sync, 1 on drift, 2 on error.")
    s = sub.add_parser("sync", parents=[common], help="apply the commit to the cluster",
                       description="Apply, prune, wait for health. Exit 0 ok, 1 Unhealthy/refused, 2 failed.")
    s.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                   help="delete objects that left Git (default: on)")
    s.add_argument("--prune-guard", type=float, default=0.5, metavar="SHARE",
                   help="refuse a prune of more than this share of the app's objects (default 0.5)")
    s.add_argument("--allow-prune-all", action="store_true", help="lift the prune guard")
    s.add_argument("--recreate", action="store_true",
                   help="delete and re-create objects whose immutable fields changed")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for health (default 300)")
    s.add_argument("--dry-run", action="store_true", help="plan and validate, write nothing")

    r = sub.add_parser("run", help="run the daemon: keep every app in the config converged",
                       description="Reconcile the apps in --config continuously: polling, push webhooks, "
                                   "self-heal on drift, hot-reloaded config, leader election.")
    r.add_argument("--config", required=True, type=Path, help="the apps file (YAML); hot-reloaded on change")
    r.add_argument("--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    r.add_argument("--context", default=None)
    r.add_argument("--namespace", default=os.environ.get("GITOPSD_NAMESPACE", "gitopsd-system"),
                   help="gitopsd's own namespace: ApplySet parents, status, lease (default $GITOPSD_NAMESPACE "
                        "or gitopsd-system)")
    r.add_argument("--http-port", type=int, default=int(os.environ.get("GITOPSD_HTTP_PORT", "8080")),
                   help="port for webhooks, /healthz, /readyz, /metrics, /status (default 8080; 0 = any free)")
    r.add_argument("--http-address", default=os.environ.get("GITOPSD_HTTP_ADDRESS", "0.0.0.0"),
                   help="address to listen on (default 0.0.0.0 in a pod; use 127.0.0.1 on a laptop)")
    r.add_argument("--advertise-url", default=os.environ.get("GITOPSD_ADVERTISE_URL"),
                   help="URL other replicas use to forward webhooks to this one when it leads "
                        "(default: http://ADDRESS:PORT when --http-address is concrete; deploy/ uses the pod IP)")
    r.add_argument("--log-format", default=os.environ.get("GITOPSD_LOG_FORMAT", "auto"),
                   choices=["auto", "json", "console"], help="auto: readable on a terminal, JSON otherwise")
    r.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="elect a leader with a Lease so replicas never apply at once (default on)")
    r.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    r.add_argument("--lease-renew", type=float, default=5.0, help="seconds between renewals (default 5)")
    r.add_argument("--instance", default=None, help="identity in the lease and audit (default hostname-pid)")
    r.add_argument("--watch-local", action=argparse.BooleanOptionalAction, default=True,
                   help="for file:// and local-path repos, reconcile within a second of a change (default on)")
    r.add_argument("--concurrency", type=int, default=16, help="parallel apiserver requests per app (default 16)")

    st = sub.add_parser("status", help="show each app's last revision, result, health and drift")
    st.add_argument("app", nargs="?", help="one app (default: all)")
    st.add_argument("--kubeconfig", default=None)
    st.add_argument("--context", default=None)
    st.add_argument("--namespace", default=os.environ.get("GITOPSD_NAMESPACE", "gitopsd-system"),
                    help="gitopsd's namespace (default $GITOPSD_NAMESPACE or gitopsd-system)")
    st.add_argument("--output", "-o", default="text", choices=["text", "json"])

    h = sub.add_parser("history", help="the app's audit trail, newest first; or what was live at an instant",
                       description="List the app's audit records (transitions and drift), newest first. With "
                                   "--at: the revision live at that instant, its author and message, and the "
                                   "drift open then. Exit 1 when nothing is recorded.")
    h.add_argument("app", help="the app (= ApplySet) name")
    h.add_argument("--since", metavar="TIME", help="only records at or after TIME (ISO 8601, or an age: 90m, 2h, 7d)")
    h.add_argument("--limit", type=int, metavar="N", help="at most N records")
    h.add_argument("--at", metavar="TIME", help="which revision was live at TIME (ISO 8601, e.g. 2026-11-20T14:00:00Z)")
    _audit_store_args(h)

    a = sub.add_parser("audit", help="check the audit trail")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = asub.add_parser("verify", help="check the app's hash chain; exit 1 and name the first broken link",
                        description="Re-compute the app's audit hash chain. Exit 0 intact, 1 broken (the first "
                                    "edited, missing or out-of-order record is named), 2 on error.")
    v.add_argument("app", help="the app (= ApplySet) name")
    _audit_store_args(v)
    return parser


def _audit_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", default=os.environ.get("GITOPSD_NAMESPACE", "gitopsd-system"),
                   help="gitopsd's namespace, where the audit trail lives (default $GITOPSD_NAMESPACE or "
                        "gitopsd-system; a CLI sync records in its --inventory-namespace)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    p.add_argument("--context", default=None)
    p.add_argument("--output", "-o", default="text", choices=["text", "json"])


def default_app_name(repo: str, path: str) -> str:
    base = re.sub(r"\.git$", "", repo.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
    tail = "" if path in (".", "") else "-" + path.strip("/").replace("/", "-")
    name = re.sub(r"[^a-z0-9-]+", "-", f"{base}{tail}".lower()).strip("-")
    return name[:40].strip("-") or "app"   # the config file's limit for app names


def _app_spec(args):
    from gitopsd import source
    from gitopsd.sync import AppSpec

    token = os.environ.get("GITOPSD_GIT_TOKEN")
    if args.git_token_file:
        token = args.git_token_file.read_text().strip()
    creds = None
    if token or args.ssh_key or args.known_hosts:
        creds = source.Credentials(username=args.git_username, token=token, ssh_key_file=args.ssh_key,
                                   known_hosts_file=args.known_hosts)
    extra = {}
    if args.command == "sync":
        extra = dict(prune=args.prune, prune_guard=args.prune_guard, allow_prune_all=args.allow_prune_all,
                     recreate=args.recreate, timeout=args.timeout)
    return AppSpec(name=args.app or default_app_name(args.repo, args.path), repo=args.repo, ref=args.ref,
                   path=args.path, namespace=args.namespace, render=args.render, helm_values=tuple(args.values),
                   credentials=creds, inventory_namespace=args.inventory_namespace, **extra)


def _print(data, *, output: str, text: str) -> None:
    if output == "json":
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


def cmd_diff(args) -> int:
    from gitopsd import report
    from gitopsd.errors import GitopsdError
    from gitopsd.kube import Kube
    from gitopsd.sync import fetch_and_plan

    app = _app_spec(args)
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context, max_workers=args.concurrency)
        rev, plan = fetch_and_plan(kube, app)
    except GitopsdError as exc:
        _print({"app": app.name, "error": str(exc)}, output=args.output, text=f"error: {exc}")
        return 2
    _print({"app": app.name, "revision": report.revision_dict(rev), **report.plan_dict(plan),
            "in_sync": plan.in_sync},
           output=args.output, text=report.plan_text(plan, rev, header=f"diff {app.name}:"))
    if plan.errors:
        return 2
    return 0 if plan.in_sync else 1


class _TerminalProgress:
    """One self-overwriting progress line on a terminal; silent otherwise."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.count = 0
        self.lock = threading.Lock()

    def applied(self, verb, change) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.count += 1
            self.stream.write(f"\r\033[K  {self.count} written: {verb} {change.ref}")
            self.stream.flush()

    def health(self, h) -> None:
        if self.enabled:
            with self.lock:
                self.stream.write(f"\r\033[K  health {h.ref}: {h.status.value} {h.message[:80]}")
                self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.count:
            self.stream.write("\r\033[K")
            self.stream.flush()


def cmd_sync(args) -> int:
    from gitopsd import report
    from gitopsd.errors import GitopsdError
    from gitopsd.kube import Kube
    from gitopsd.sync import Outcome, sync

    app = _app_spec(args)
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context, max_workers=args.concurrency)
    except GitopsdError as exc:
        _print({"app": app.name, "error": str(exc)}, output=args.output, text=f"error: {exc}")
        return 2
    progress = _TerminalProgress(sys.stderr)
    result = sync(kube, app, dry_run=args.dry_run, on_progress=progress.applied, on_health=progress.health)
    progress.done()
    _print(report.result_dict(result), output=args.output, text=report.result_text(result))
    if not args.dry_run:
        _record_sync(kube, app, result)
    if result.ok:
        return 0
    return 1 if result.outcome in (Outcome.UNHEALTHY, Outcome.REFUSED) else 2


def _record_sync(kube, app, result) -> None:
    """Write the one audit record of a CLI sync (trigger "cli") into the app's trail.

    The structured log line goes to stderr: stdout is the command's own output
    (one JSON document with -o json). A record the store refuses is reported
    on stderr but does not change the exit code: the cluster change happened.
    """
    from gitopsd import audit, log
    from gitopsd.errors import GitopsdError

    log.configure(stream=sys.stderr)
    namespace = app.inventory_namespace
    try:
        previous = audit.last_revision(kube, namespace=namespace, app=app.name)
    except GitopsdError:
        previous = None  # the append below reports the store's trouble
    trail = audit.AuditLog(kube, namespace=namespace, instance=audit.cli_instance())
    rec = trail.record(audit.transition_record(result, trigger="cli", previous=previous, instance=trail.instance,
                                               source=app.repo, ref=app.ref))
    if "hash" not in rec:
        print(f"warning: the audit record of this sync was not stored: {trail.store_error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return COMMANDS[args.command](args)


def cmd_run(args) -> int:
    from gitopsd.daemon import main as daemon_main

    return daemon_main(args)


def cmd_status(args) -> int:
    from gitopsd import status
    from gitopsd.errors import GitopsdError
    from gitopsd.kube import Kube

    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
        apps = status.read_all(kube, namespace=args.namespace, app=args.app)
    except GitopsdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.app and not apps:
        print(f"error: no status for app {args.app!r} in namespace {args.namespace}", file=sys.stderr)
        return 1
    _print(apps, output=args.output, text=status.table(apps))
    return 0


def cmd_history(args) -> int:
    from gitopsd import audit
    from gitopsd.errors import GitopsdError
    from gitopsd.kube import Kube

    try:
        since = audit.parse_time(args.since) if args.since else None
        at = audit.parse_time(args.at) if args.at else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
        if at is not None:
            answer = audit.live_at(kube, namespace=args.namespace, app=args.app, when=at)
            _print(answer, output=args.output, text=audit.live_at_text(answer))
            return 0 if answer["revision"] else 1
        records = audit.history(kube, namespace=args.namespace, app=args.app, since=since, limit=args.limit)
    except GitopsdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = "\n".join(audit.summary_line(r) for r in records) or \
        f"no audit records for app {args.app} in namespace {args.namespace}" + (" since then" if since else "")
    _print(records, output=args.output, text=text)
    return 0 if records else 1


def cmd_audit(args) -> int:
    from gitopsd import audit
    from gitopsd.errors import GitopsdError
    from gitopsd.kube import Kube

    # One subcommand today (verify); argparse requires it.
    try:
        kube = Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
        ok, message = audit.verify(kube, namespace=args.namespace, app=args.app)
    except GitopsdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print({"app": args.app, "ok": ok, "message": message}, output=args.output,
           text=message if ok else f"BROKEN: {message}")
    return 0 if ok else 1


COMMANDS = {"diff": cmd_diff, "sync": cmd_sync, "run": cmd_run, "status": cmd_status, "history": cmd_history,
            "audit": cmd_audit}
