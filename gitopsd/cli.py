"""The `gitopsd` command line.

`diff` and `sync` run the same pipeline the daemon runs (gitopsd.engine.sync), once.
Exit codes follow `kubectl diff`: diff exits 0 in sync, 1 on drift, 2 on
error; sync exits 0 when applied (or nothing to do), 1 when Unhealthy or
refused by the prune guard, 2 when it failed. A sync (not --dry-run) writes
one audit record (trigger "cli") to the app's trail in --inventory-namespace.

`config schema` prints the config file's JSON Schema (for editors);
`config validate FILE` checks a file as the daemon would and exits 1 when
it is invalid, naming every problem.

`history` and `audit verify` read that trail (gitopsd.audit): history exits
1 when nothing is recorded (or, with --at, nothing was live then); verify
exits 1 when the chain is broken. `status APP` exits 1 when APP never
reported a status and 2 when its stored status is unreadable; `status`
without APP reports unreadable ones and exits 0.

Every command exits 2 on any error, never 1: a script reads 1 as "drift" or
"refused". Every flag is checked before anything runs, with the validators
the config file uses (gitopsd.config: same durations, same bounds, same
words), and a bad value is an argparse usage error (exit 2) naming the flag,
the value and why. Errors a user can cause print one message, no traceback
(`--debug` adds it); an unexpected exception is a bug: one line saying so,
then its traceback once, exit 2.

Every command takes ``--log-level`` (debug, info, warning, error; default
$GITOPSD_LOG_LEVEL or info). The daemon logs to stdout (its pod log); the
other commands log to stderr, so stdout stays their own output (one JSON
document with -o json).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import orjson

from gitopsd import __version__
from gitopsd import config as cfg
from gitopsd.errors import GitopsdError

#: More parallel requests than this only trip the apiserver's priority and
#: fairness limits (and each is a thread and a pooled connection).
MAX_CONCURRENCY = 256
MAX_SHARDS = 256
#: gitopsd.budget.DEFAULT_CONCURRENCY, spelled out so that parsing flags does
#: not import the metrics (tests/test_budget.py checks that they agree).
DEFAULT_CONCURRENCY = 16
#: `history --limit`: a bound so a typo cannot ask for a billion records.
MAX_LIMIT = 1_000_000
#: `--log-level` (gitopsd.log.LEVELS; not imported from there: `--help` should not wait for structlog).
LOG_LEVELS = ("debug", "info", "warning", "error")


# --------------------------------------------------------------------------
# Flag types: the config's validators, so flags and file accept the same


def _flag(check: Callable, **options) -> Callable[[str], object]:
    """An argparse ``type=`` from a validator that raises ValueError.

    argparse turns the ArgumentTypeError into `gitopsd sync: error: argument
    --prune-guard: 50 is out of range: ...` and exit code 2.
    """
    def convert(text: str):
        try:
            return check(text, **options)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def _check_text(value: str) -> str:
    """A plain word: not empty, no whitespace or control characters (a context, a username, an instance)."""
    if not value.strip():
        raise ValueError("is empty")
    if re.search(r"[\s\x00-\x1f\x7f]", value) or len(value) > 253:
        raise ValueError(f"{value[:60]!r} is not a name (no spaces or control characters, at most 253 characters)")
    return value


def _check_token_file(value: str) -> Path:
    """A readable file that holds a token (not empty; its value never appears in a message)."""
    path = cfg.check_readable_file(value)
    if path.is_file():  # a pipe (/dev/stdin) is read once, later
        try:
            if not path.read_bytes().strip():
                raise ValueError(f"{value}: is empty; it must hold the token")
        except OSError as exc:
            raise ValueError(f"{value}: cannot be read ({exc.strerror})") from None
    return path


def _check_field_managers(value: str) -> tuple[str, ...]:
    """A comma-separated list of field managers as takeOverManagers reads them; empty: none."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    return tuple(dict.fromkeys(cfg.check_field_manager(n) for n in names))


def _check_time(value: str):
    """An instant: ISO 8601 or an age (a duration as the config reads it; at most ten years back)."""
    from gitopsd import (
        audit,  # imported late: it pulls in the whole pipeline, `--help` should not wait for it
    )

    return audit.parse_time(value)


def _check_address(value: str) -> str:
    """An address to listen on: an IP address or a host name."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
                        value):
        raise ValueError(f"{value[:60]!r} is not an IP address or host name (e.g. 0.0.0.0, 127.0.0.1, ::)")
    return value


def _check_url(value: str) -> str:
    """An http(s) URL of this replica, for the others to forward webhooks to."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{value[:80]!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value[:80]!r} is not an http(s) URL such as http://10.0.0.7:8080")
    if parts.username or parts.password:
        raise ValueError("carries credentials; webhooks between replicas are signed, give the URL without them")
    return value


DURATION_TIMEOUT = _flag(cfg.check_duration, minimum=cfg.MIN_TIMEOUT, why=cfg.TIMEOUT_WHY)
DURATION_WAIT = _flag(cfg.check_duration, minimum=0.0)
SHARE = _flag(cfg.check_share)
CONCURRENCY = _flag(cfg.check_count, minimum=1, maximum=MAX_CONCURRENCY,
                    why="parallel apiserver requests")
PORT = _flag(cfg.check_count, minimum=0, maximum=65535, why="0 picks any free port")
SHARDS = _flag(cfg.check_count, minimum=1, maximum=MAX_SHARDS, why="one Lease per shard")
LIMIT = _flag(cfg.check_count, minimum=1, maximum=MAX_LIMIT)
APP = _flag(cfg.check_app_name)
CLUSTER = _flag(cfg.check_cluster_name)
NAMESPACE = _flag(cfg.check_namespace)
SERVICE_ACCOUNT = _flag(cfg.check_service_account_name)
REPO = _flag(cfg.check_repo_url, instead="--git-token-file or $GITOPSD_GIT_TOKEN")
REF = _flag(cfg.check_ref)
REPO_PATH = _flag(cfg.check_repo_path)
VALUES_FILE = _flag(cfg.check_repo_path, what="values file")
FILE = _flag(cfg.check_readable_file)
TOKEN_FILE = _flag(_check_token_file)
TEXT = _flag(_check_text)
FIELD_MANAGERS = _flag(_check_field_managers)
TIME = _flag(_check_time)
ADDRESS = _flag(_check_address)
URL = _flag(_check_url)
IGNORE_RULES = _flag(cfg.parse_ignore_rules)


def _check_managers(value: str) -> tuple[str, ...]:
    """Field managers, comma-separated; "" for none."""
    return tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


MANAGERS = _flag(_check_managers)
LEASE_DURATION = _flag(cfg.check_duration, minimum=2.0, why="the Lease is written in whole seconds and renewed "
                                                              "within it")
LEASE_RENEW = _flag(cfg.check_duration, minimum=0.1, why="renewing more often only loads the apiserver")


class _EnvDefault:
    """A flag whose default comes from an environment variable, checked like the flag.

    argparse would take the variable's text unchecked (and `int()` of it at
    import time was a traceback); `_apply_env_defaults` checks it with the
    flag's own type and names the variable in the error.
    """

    def __init__(self, dest: str, flag: str, env: str, fallback, convert: Callable[[str], object] | None = None,
                 choices: tuple[str, ...] | None = None) -> None:
        self.dest, self.flag, self.env, self.fallback = dest, flag, env, fallback
        self.convert, self.choices = convert, choices

    def resolve(self) -> object:
        raw = os.environ.get(self.env)
        if raw is None:
            return self.fallback
        if self.choices is not None and raw not in self.choices:
            raise ValueError(f"{raw[:60]!r} is not one of {', '.join(self.choices)}")
        if self.convert is None:
            return raw
        try:
            return self.convert(raw)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None


_NS_ENV = "GITOPSD_NAMESPACE"
#: Environment defaults of every command's own flags (`_ENV_DEFAULTS` has the others).
_CONFIG_ENV = _EnvDefault("config", "--config", "GITOPSD_CONFIG", None, FILE)
_COMMON_ENV_DEFAULTS = (_EnvDefault("log_level", "--log-level", "GITOPSD_LOG_LEVEL", "info", choices=LOG_LEVELS),)
_ENV_DEFAULTS: dict[str, tuple[_EnvDefault, ...]] = {
    "diff": (_EnvDefault("inventory_namespace", "--inventory-namespace", _NS_ENV, "gitopsd-system", NAMESPACE),),
    "sync": (_EnvDefault("inventory_namespace", "--inventory-namespace", _NS_ENV, "gitopsd-system", NAMESPACE),),
    "run": (
        _EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE),
        _EnvDefault("http_port", "--http-port", "GITOPSD_HTTP_PORT", 8080, PORT),
        _EnvDefault("http_address", "--http-address", "GITOPSD_HTTP_ADDRESS", "0.0.0.0", ADDRESS),
        _EnvDefault("advertise_url", "--advertise-url", "GITOPSD_ADVERTISE_URL", None, URL),
        _EnvDefault("prometheus_url", "--prometheus-url", "GITOPSD_PROMETHEUS_URL", None, URL),
        _EnvDefault("ui_url", "--ui-url", "GITOPSD_UI_URL", None, URL),
        _EnvDefault("ui_token_file", "--ui-token-file", "GITOPSD_UI_TOKEN_FILE", None, TOKEN_FILE),
        _EnvDefault("log_format", "--log-format", "GITOPSD_LOG_FORMAT", "auto", choices=("auto", "json", "console")),
    ),
    "status": (_EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE), _CONFIG_ENV),
    "history": (_EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE), _CONFIG_ENV),
    "export": (_EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE),),
    "audit": (_EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE), _CONFIG_ENV),
    **{action: (_EnvDefault("namespace", "--namespace", _NS_ENV, "gitopsd-system", NAMESPACE), _CONFIG_ENV)
       for action in ("rollback", "hold", "resume")},
}


# --------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the subcommand, a subparser default never resets it.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error too")
    debug.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help="debug shows the libraries' lines too (urllib3, apscheduler, ...), which stay at "
                            "warning otherwise (default $GITOPSD_LOG_LEVEL or info)")
    parser = argparse.ArgumentParser(
        prog="gitopsd", parents=[debug],
        description="Keep a Kubernetes cluster converged to the manifests in a Git repository.",
    )
    parser.add_argument("--version", action="version", version=f"gitopsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    g = common.add_argument_group("source and render")
    g.add_argument("--repo", required=True, type=REPO, help="Git URL (file://, https://, ssh://) or a local path")
    g.add_argument("--ref", default="HEAD", type=REF,
                   help="branch, tag or commit SHA (default: the remote's HEAD)")
    g.add_argument("--path", default=".", type=REPO_PATH,
                   help="directory inside the repository to render (default: root)")
    g.add_argument("--render", default="auto", choices=["auto", "plain", "kustomize", "helm"],
                   help="how to render PATH (default: auto-detect kustomization.yaml / Chart.yaml)")
    g.add_argument("--values", action="append", default=[], metavar="FILE", type=VALUES_FILE,
                   help="helm values file, relative to the repository root (repeatable)")
    g.add_argument("--allow-remote-bases", action="store_true",
                   help="let kustomize fetch remote bases (URLs) at render time, as the app setting "
                        "allowRemoteBases: true (default: refused)")
    g.add_argument("--allow-remote-charts", action="store_true",
                   help="let `helm dependency build` fetch chart dependencies that are not vendored under "
                        "charts/ from their repositories, as the app setting helm: {allowRemoteDependencies: "
                        "true} (default: refused; file:// dependencies in the repository are always built)")
    g.add_argument("--namespace", "-n", default="default", type=NAMESPACE,
                   help="namespace for namespaced objects that name none (default: default)")
    g.add_argument("--create-namespace", action="store_true",
                   help="create --namespace if it is missing, labelled gitopsd.io/created-by=APP and never pruned, "
                        "as the app setting createNamespace: true (diff and --dry-run only report it)")
    g.add_argument("--git-token-file", type=TOKEN_FILE, metavar="FILE",
                   help="file holding an https token (or set GITOPSD_GIT_TOKEN)")
    g.add_argument("--git-username", default=None, type=TEXT, help="https username to pair with the token")
    g.add_argument("--ssh-key", type=FILE, metavar="FILE", help="private key for ssh:// remotes")
    g.add_argument("--known-hosts", type=FILE, metavar="FILE",
                   help="known_hosts file for ssh:// remotes (host keys are checked)")
    g.add_argument("--git-ca-file", type=FILE, metavar="FILE",
                   help="PEM CA bundle an https remote's certificate must chain to, in place of the system's "
                        "(a server with a private CA), as the app setting credentials.caFile")
    g.add_argument("--sops-age-keys", type=FILE, metavar="PATH",
                   help="file of age identities (age-keygen's key file) to decrypt SOPS-encrypted files with, "
                        "as the app setting decryption.keysFrom.file")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--verify-ssh-keys", type=FILE, metavar="FILE",
                   help="deploy (or diff) the commit only if it is signed by one of the ssh public keys in FILE "
                        "(authorized-keys or allowed-signers lines), as the app setting verify: {provider: ssh, "
                        "keysFrom: {file: FILE}}")
    v.add_argument("--verify-openpgp-keys", type=FILE, metavar="FILE",
                   help="the same with ASCII-armored OpenPGP public keys (verify: {provider: openpgp, ...})")
    d = common.add_argument_group("drift to allow")
    d.add_argument("--ignore-differences", action="append", default=[], metavar="RULE", type=IGNORE_RULES,
                   help="an ignore rule as the config file's ignoreDifferences writes it, e.g. '{kind: Deployment, "
                        "name: web, jsonPointers: [/spec/replicas]}' (repeatable; a drift report's suggestion "
                        "can be pasted whole)")
    d.add_argument("--ignore-managers", default=None, metavar="NAMES", type=MANAGERS,
                   help="field managers whose fields are left to them, comma-separated; '' for none (default: "
                        "kube-controller-manager, the HPA's)")
    k = common.add_argument_group("cluster")
    _cluster_args(k)
    k.add_argument("--take-over-managers", type=FIELD_MANAGERS, default=cfg.DEFAULT_TAKE_OVER_MANAGERS,
                   metavar="NAMES",
                   help="field managers whose fields gitopsd takes over on the objects it applies, comma-separated "
                        "(NAME* is a prefix; '' for none), as the app setting takeOverManagers "
                        f"(default: {','.join(cfg.DEFAULT_TAKE_OVER_MANAGERS)})")
    k.add_argument("--service-account", default=None, type=SERVICE_ACCOUNT, metavar="NAME",
                   help="make the app's dry-runs, applies and prunes as this ServiceAccount (impersonated), as the "
                        "app setting serviceAccountName: a write it may not do fails the app (default: as yourself)")
    k.add_argument("--service-account-namespace", default=None, type=NAMESPACE, metavar="NS",
                   help="the namespace of --service-account (default: --namespace)")
    k.add_argument("--app", default=None, type=APP,
                   help="app name = ApplySet name (default: derived from the repository and path)")
    k.add_argument("--inventory-namespace", default=None, type=NAMESPACE,
                   help="namespace of the ApplySet parent (default: $GITOPSD_NAMESPACE or gitopsd-system)")
    k.add_argument("--concurrency", type=CONCURRENCY, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"apiserver requests in flight at once, 1 to {MAX_CONCURRENCY}, shared by the dry-runs, "
                        f"applies and LISTs of the sync; fewer while the apiserver throttles "
                        f"(default {DEFAULT_CONCURRENCY})")
    common.add_argument("--output", "-o", default="text", choices=["text", "json"])

    sub.add_parser("diff", parents=[common], help="show how the cluster differs from the commit",
                   description="Print the drift report. Exit 0 in sync, 1 on drift, 2 on error.")
    s = sub.add_parser("sync", parents=[common], help="apply the commit to the cluster",
                       description="Apply, prune, wait for health. Exit 0 ok, 1 Unhealthy/refused, 2 failed.")
    s.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                   help="delete objects that left Git (default: on)")
    s.add_argument("--prune-guard", type=SHARE, default=0.5, metavar="SHARE",
                   help="refuse a prune of more than this share (0 < SHARE <= 1) of the app's objects (default 0.5)")
    s.add_argument("--allow-prune-all", action="store_true", help="lift the prune guard")
    s.add_argument("--recreate", action="store_true",
                   help="delete and re-create objects whose immutable fields changed")
    s.add_argument("--timeout", type=DURATION_TIMEOUT, default=300.0, metavar="DURATION",
                   help="how long to wait for health: 90s, 5m, 1h30m, or seconds (default 5m)")
    s.add_argument("--dry-run", action="store_true", help="plan and validate, write nothing")

    r = sub.add_parser("run", parents=[debug], help="run the daemon: keep every app in the config converged",
                       description="Reconcile the apps in --config continuously: polling, push webhooks, "
                                   "self-heal on drift, hot-reloaded config, leader election.")
    r.add_argument("--config", required=True, type=FILE, help="the apps file (YAML); hot-reloaded on change")
    _cluster_args(r)
    r.add_argument("--namespace", default=None, type=NAMESPACE,
                   help="gitopsd's own namespace: ApplySet parents, status, lease (default $GITOPSD_NAMESPACE "
                        "or gitopsd-system)")
    r.add_argument("--http-port", type=PORT, default=None,
                   help="port for webhooks, /healthz, /readyz, /metrics, /status (default $GITOPSD_HTTP_PORT or "
                        "8080; 0 = any free)")
    r.add_argument("--http-address", type=ADDRESS, default=None,
                   help="address to listen on (default $GITOPSD_HTTP_ADDRESS or 0.0.0.0 in a pod; use 127.0.0.1 "
                        "on a laptop)")
    r.add_argument("--advertise-url", type=URL, default=None,
                   help="URL other replicas use to forward webhooks to this one when it leads (default "
                        "$GITOPSD_ADVERTISE_URL, or http://ADDRESS:PORT when --http-address is concrete; deploy/ "
                        "uses the pod IP)")
    r.add_argument("--prometheus-url", type=URL, default=None,
                   help="the Prometheus HTTP API that progressive-delivery gates query when their `address` "
                        "names none (default $GITOPSD_PROMETHEUS_URL)")
    r.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the read-only web view at / on the HTTP port (default on; --no-ui: / and /api/ "
                        "answer 404)")
    r.add_argument("--ui-token-file", type=TOKEN_FILE, default=None,
                   help="a file holding the bearer token the web view's data asks for (read at each request, so "
                        "a rotated Secret takes effect at once; default $GITOPSD_UI_TOKEN_FILE, else no token)")
    r.add_argument("--ui-url", type=URL, default=None,
                   help="the web view's address as people reach it (an Ingress); notifications link to it "
                        "(default $GITOPSD_UI_URL, else no link)")
    r.add_argument("--log-format", default=None, choices=["auto", "json", "console"],
                   help="auto: readable on a terminal, JSON otherwise (default $GITOPSD_LOG_FORMAT or auto)")
    r.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="elect a leader with a Lease so replicas never apply at once (default on)")
    r.add_argument("--lease-duration", type=LEASE_DURATION, default=15.0, metavar="DURATION",
                   help="how long a lease holds without renewal: 15s, 1m, or seconds (default 15s)")
    r.add_argument("--lease-renew", type=LEASE_RENEW, default=5.0, metavar="DURATION",
                   help="time between renewals, shorter than --lease-duration (default 5s)")
    r.add_argument("--shards", type=SHARDS, default=1, metavar="N",
                   help="split the apps over N Leases (gitopsd-shard-I-of-N) so that replicas share them; 1 = one "
                        "leader reconciles every app (default 1; deploy/ uses 4)")
    r.add_argument("--instance", default=None, type=TEXT,
                   help="identity in the lease and audit (default hostname-pid)")
    r.add_argument("--watch-local", action=argparse.BooleanOptionalAction, default=True,
                   help="for file:// and local-path repos, reconcile within a second of a change (default on)")
    r.add_argument("--concurrency", type=CONCURRENCY, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"apiserver requests in flight at once for the whole daemon, all apps together, 1 to "
                        f"{MAX_CONCURRENCY}; fewer while the apiserver throttles. Also sizes the shared fan-out "
                        f"and the reconciles that may run at once (4 per request) (default {DEFAULT_CONCURRENCY})")

    st = sub.add_parser("status", parents=[debug], help="show each app's last revision, result, health and drift",
                        description="Each app's stored status. Exit 0 shown (an unreadable status of another app "
                                    "is reported, not fatal), 1 when APP has no status, 2 when APP's status is "
                                    "unreadable or on error.")
    st.add_argument("app", nargs="?", type=APP, help="one app (default: all)")
    _cluster_args(st)
    _target_args(st)
    st.add_argument("--namespace", default=None, type=NAMESPACE,
                    help="gitopsd's namespace (default $GITOPSD_NAMESPACE or gitopsd-system)")
    st.add_argument("--output", "-o", default="text", choices=["text", "json"])

    h = sub.add_parser("history", parents=[debug],
                       help="the app's audit trail, newest first; or what was live at an instant",
                       description="List the app's audit records (transitions and drift), newest first. With "
                                   "--at: the revision live at that instant, its author and message, and the "
                                   "drift open then. Exit 1 when nothing is recorded, 2 on error.")
    h.add_argument("app", type=APP, help="the app (= ApplySet) name")
    h.add_argument("--since", metavar="TIME", type=TIME,
                   help="only records at or after TIME (ISO 8601, or an age: 90m, 2h, 7d)")
    h.add_argument("--limit", type=LIMIT, metavar="N", help="at most N records")
    h.add_argument("--at", metavar="TIME", type=TIME,
                   help="which revision was live at TIME (ISO 8601, e.g. 2026-11-20T14:00:00Z, or an age)")
    _audit_store_args(h)

    release = {}
    for action, helptext, description in (
            ("rollback", "go back to an earlier revision now, and hold there",
             "Ask the running daemon to re-apply an earlier revision of APP (default: the last one recorded "
             "Applied and Healthy before what runs; rendered again from its commit) and to hold there until "
             "`gitopsd resume`. Works from anywhere with a kubeconfig: the request is stored in the cluster."),
            ("hold", "stop following the ref: new commits are recorded, not applied",
             "Ask the running daemon to keep APP at a revision (default: what runs now); self-heal keeps that "
             "revision, new commits are recorded as Held. Stored in the cluster like rollback."),
            ("resume", "follow the ref again (apply its newest commit)",
             "Ask the running daemon to follow APP's ref again: the newest commit is applied at once.")):
        p = sub.add_parser(action, parents=[debug], help=helptext,
                           description=description + " Exit 0 once the daemon has acted, 1 when it has not "
                                                     "within --wait (the request stays stored), 2 on error.")
        p.add_argument("app", type=APP, help="the app (= ApplySet) name")
        if action in ("rollback", "hold"):
            p.add_argument("--to", type=TEXT, metavar="SHA", default=None,
                           help="the revision: a commit SHA, or the prefix of one the audit trail records")
        p.add_argument("--wait", type=DURATION_WAIT, default=60.0, metavar="DURATION",
                       help="how long to wait for the daemon to act (default 60s; 0: do not wait)")
        _audit_store_args(p)
        release[action] = p
    ex = sub.add_parser("export", parents=[debug], help="write the manifests that ran at an instant, re-rendered "
                                                        "from Git (Secrets as references)",
                        description="Find in the app's audit trail the commit that was live at TIME, render it "
                                    "again from Git with the app's settings in --config, and write one file per "
                                    "object to DIR, with EXPORT.md naming the commit, the record that made it "
                                    "live and the drift open then. Secret values are never written. Exit 0 "
                                    "exported, 1 exported but the audit chain is broken, 2 on error (nothing "
                                    "was live at TIME, the commit is gone, DIR is not empty).")
    ex.add_argument("app", type=APP, help="the app (= ApplySet) name")
    ex.add_argument("--at", required=True, metavar="TIME", type=TIME,
                    help="the instant: ISO 8601 with a zone (2026-03-03T14:00:00Z, 2026-03-03T15:00:00+01:00); "
                         "a date-time without a zone is UTC; or an age (90m, 2h, 7d)")
    ex.add_argument("--config", required=True, type=FILE, metavar="FILE",
                    help="the apps file `gitopsd run` reads: the app's repository, path, render settings and "
                         "credentials (today's: the trail records the commit, not the settings)")
    ex.add_argument("-o", "--output-dir", dest="output_dir", type=Path, metavar="DIR", default=None,
                    help="where to write (created; must not exist or be empty; default ./APP-SHORTSHA)")
    ex.add_argument("--namespace", "-n", default=None, type=NAMESPACE,
                    help="gitopsd's namespace: the audit trail and credentials Secrets (default $GITOPSD_NAMESPACE "
                         "or gitopsd-system)")
    _cluster_args(ex)
    ex.add_argument("--cluster", default=None, type=CLUSTER, metavar="NAME",
                    help="the app's target on this cluster of --config's `clusters` (default: in-cluster)")
    ex.set_defaults(usage_error=ex.error)

    a = sub.add_parser("audit", parents=[debug], help="check the audit trail")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = asub.add_parser("verify", parents=[debug], help="check the app's hash chain; exit 1 and name the first "
                                                        "broken link",
                        description="Re-compute the app's audit hash chain. Exit 0 intact, 1 broken (the first "
                                    "edited, missing or out-of-order record is named), 2 on error.")
    v.add_argument("app", type=APP, help="the app (= ApplySet) name")
    _audit_store_args(v)

    c = sub.add_parser("config", parents=[debug], help="the config file: its JSON Schema, or check a file")
    csub = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    cs = csub.add_parser("schema", parents=[debug], help="print the config file's JSON Schema (for editors)",
                         description="Print the JSON Schema (draft 2020-12) of `gitopsd run --config FILE`. Point "
                                     "your editor at it, e.g. with a first line `# yaml-language-server: "
                                     "$schema=gitopsd-config.schema.json` (VS Code's YAML extension, Neovim, "
                                     "Helix).")
    cv = csub.add_parser("validate", parents=[debug], help="check a config file as the daemon would",
                         description="Check FILE as `gitopsd run` reads it, without a cluster. Exit 0 valid, 1 "
                                     "invalid (every problem named), 2 on error.")
    cv.add_argument("file", type=FILE, metavar="FILE", help="the apps file (YAML)")
    cv.add_argument("--output", "-o", default="text", choices=["text", "json"])
    for p in (sub.choices["diff"], s, r, st, h, v, cs, cv, *release.values()):
        p.set_defaults(usage_error=p.error)   # for the rules between flags, checked after parsing
    return parser


def _cluster_args(p) -> None:
    p.add_argument("--kubeconfig", default=None, type=FILE, metavar="FILE",
                   help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    p.add_argument("--context", default=None, type=TEXT, help="kubeconfig context")


def _target_args(p) -> None:
    """--cluster (and the --config that says how to reach it): an app's target on another cluster."""
    p.add_argument("--cluster", default=None, type=CLUSTER, metavar="NAME",
                   help="the app's target on this cluster of the config's `clusters` (default: in-cluster, the "
                        "one --kubeconfig reaches); its status and audit trail live there")
    p.add_argument("--config", default=None, type=FILE, metavar="FILE",
                   help="the file `gitopsd run` reads, for how to reach --cluster (default $GITOPSD_CONFIG)")


def _audit_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", default=None, type=NAMESPACE,
                   help="gitopsd's namespace, where the audit trail lives (default $GITOPSD_NAMESPACE or "
                        "gitopsd-system; a CLI sync records in its --inventory-namespace)")
    _cluster_args(p)
    _target_args(p)
    p.add_argument("--output", "-o", default="text", choices=["text", "json"])


def _finish_args(args: argparse.Namespace) -> None:
    """Defaults from the environment, and rules between flags; a problem is a
    usage error (exit 2) like a bad flag."""
    error = args.usage_error
    for d in (*_COMMON_ENV_DEFAULTS, *_ENV_DEFAULTS.get(args.command, ())):
        if getattr(args, d.dest, None) is None:
            try:
                setattr(args, d.dest, d.resolve())
            except ValueError as exc:
                error(f"${d.env} (the default of {d.flag}): {exc}")
    if args.command == "run" and args.shards > 1 and not args.leader_elect:
        error(f"argument --shards: {args.shards} shards need Leases; drop --no-leader-elect (or use --shards 1)")
    if args.command == "run" and args.lease_renew >= args.lease_duration:
        error(f"argument --lease-renew: {args.lease_renew:g}s is not shorter than --lease-duration "
              f"{args.lease_duration:g}s; a lease must be renewed before it runs out")
    if args.command == "history" and args.at is not None and (args.since is not None or args.limit is not None):
        error("argument --at: answers for one instant; --since and --limit do not apply to it")
    if args.command in ("diff", "sync") and args.values and args.render not in ("helm", "auto"):
        error(f"argument --values: only used with --render helm or auto, and --render is {args.render}")
    if args.command in ("diff", "sync") and args.git_username and not (
            args.git_token_file or os.environ.get("GITOPSD_GIT_TOKEN")):
        error("argument --git-username: is paired with a token; give --git-token-file or set GITOPSD_GIT_TOKEN")


def default_app_name(repo: str, path: str) -> str:
    base = re.sub(r"\.git$", "", repo.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
    tail = "" if path in (".", "") else "-" + path.strip("/").replace("/", "-")
    name = re.sub(r"[^a-z0-9-]+", "-", f"{base}{tail}".lower()).strip("-")
    return name[:40].strip("-") or "app"   # the config file's limit for app names


def _app_spec(args):
    from gitopsd.config import Helm
    from gitopsd.engine import source
    from gitopsd.engine.sync import AppSpec
    from gitopsd.errors import GitopsdError

    token = os.environ.get("GITOPSD_GIT_TOKEN")
    if args.git_token_file:
        try:
            token = args.git_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:   # checked when parsed; gone or changed since
            raise GitopsdError(f"--git-token-file {args.git_token_file}: cannot be read ({exc})") from None
    creds = None
    if args.git_ca_file:
        from gitopsd.daemon.credentials import check_ca_bundle   # the daemon's check, one place

        try:
            check_ca_bundle(args.git_ca_file.read_text(errors="replace"), where=f"--git-ca-file {args.git_ca_file}")
        except OSError as exc:
            raise GitopsdError(f"--git-ca-file {args.git_ca_file}: cannot be read ({exc.strerror})") from None
    if token or args.ssh_key or args.known_hosts or args.git_ca_file:
        creds = source.Credentials(username=args.git_username, token=token, ssh_key_file=args.ssh_key,
                                   known_hosts_file=args.known_hosts, ca_file=args.git_ca_file)
    if args.service_account_namespace and not args.service_account:
        raise GitopsdError("--service-account-namespace: only used with --service-account; name the account")
    keys = None
    if args.sops_age_keys:
        from gitopsd.daemon.credentials import read_keys   # the daemon's reading of keys, one place

        keys = read_keys(args.sops_age_keys, what="--sops-age-keys")
    verify = trusted = None
    if args.verify_ssh_keys or args.verify_openpgp_keys:
        from gitopsd.config import TrustedKeysFrom, Verify
        from gitopsd.daemon.credentials import key_files   # the daemon's reading of keys, one place
        from gitopsd.engine import signature

        provider, path = ("ssh", args.verify_ssh_keys) if args.verify_ssh_keys else \
            ("openpgp", args.verify_openpgp_keys)
        flag = f"--verify-{provider}-keys"
        try:
            trusted = signature.TrustedKeys(provider=provider, entries=tuple(key_files(path)),
                                            origin=f"{flag} {path}")
        except GitopsdError as exc:
            raise GitopsdError(f"{flag}: {exc.message}", hint=exc.hint) from None
        verify = Verify(provider=provider, keys_from=TrustedKeysFrom(file=path))
    extra = {}
    if args.command == "sync":
        extra = dict(prune=args.prune, prune_guard=args.prune_guard, allow_prune_all=args.allow_prune_all,
                     recreate=args.recreate, timeout=args.timeout)
    return AppSpec(name=args.app or default_app_name(args.repo, args.path), repo=args.repo, ref=args.ref,
                   path=args.path, namespace=args.namespace, create_namespace=args.create_namespace,
                   take_over_managers=args.take_over_managers, render=args.render,
                   helm=Helm(values_files=tuple(args.values), allow_remote_dependencies=args.allow_remote_charts)
                   if args.values or args.allow_remote_charts else None,
                   allow_remote_bases=args.allow_remote_bases, credentials=creds, decryption_keys=keys,
                   verify=verify, trusted_keys=trusted,
                   inventory_namespace=args.inventory_namespace,
                   ignore_differences=tuple(rule for rules in args.ignore_differences for rule in rules),
                   ignore_managers=args.ignore_managers, service_account_name=args.service_account,
                   service_account_namespace=args.service_account_namespace, **extra)


def _print(data, *, output: str, text: str) -> None:
    if output == "json":
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


def _connect(args):
    """The Kube of `diff` and `sync`, with the process's one budget sized by --concurrency.

    Log lines (a throttle episode) go to stderr: stdout is the command's report.
    """
    from gitopsd import log
    from gitopsd.budget import Budget
    from gitopsd.kube import Kube

    log.configure(stream=sys.stderr)
    return Kube.connect(kubeconfig=args.kubeconfig, context=args.context, budget=Budget(limit=args.concurrency))


def cmd_diff(args) -> int:
    from gitopsd import report
    from gitopsd.engine.sync import fetch_and_plan
    from gitopsd.errors import GitopsdError

    app = _app_spec(args)
    try:
        kube = _connect(args)
        rev, plan = fetch_and_plan(kube, app)
    except GitopsdError as exc:
        return _report_error(args, exc, app=app.name)
    _print(report.diff_dict(app.name, rev, plan), output=args.output,
           text=report.plan_text(plan, rev, header=f"diff {app.name}:"))
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
    from gitopsd.engine.sync import Outcome, sync
    from gitopsd.errors import GitopsdError

    app = _app_spec(args)
    try:
        kube = _connect(args)
    except GitopsdError as exc:
        return _report_error(args, exc, app=app.name)
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

    The structured log line goes to stderr (`main` configured it): stdout is
    the command's own output (one JSON document with -o json). A record the
    store refuses is reported on stderr but does not change the exit code:
    the cluster change happened.
    """
    from gitopsd import audit
    from gitopsd.errors import GitopsdError

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


def cmd_run(args) -> int:
    from gitopsd.daemon import main as daemon_main

    return daemon_main(args)


def _home(args):
    from gitopsd.kube import Kube

    return Kube.connect(kubeconfig=args.kubeconfig, context=args.context)


def _clusters_config(args) -> cfg.Config:
    if args.config is None:
        raise GitopsdError("--cluster needs the config file that says how to reach the cluster",
                           hint="pass --config FILE (the file `gitopsd run` reads) or set $GITOPSD_CONFIG")
    return cfg.load(args.config)


def _target_kube(args, home, cluster: str | None = None):
    """The Kube of --cluster (or `cluster`): `home` for in-cluster, else connected as the config says."""
    from gitopsd import clusters

    name = cluster or args.cluster
    if name in (None, cfg.IN_CLUSTER):
        return home
    config = _clusters_config(args)
    if name not in config.clusters:
        raise GitopsdError(f"cluster {name!r} is not in {args.config} (clusters: {', '.join(config.cluster_names)})")
    return clusters.connect(home, name, config.cluster(name), namespace=args.namespace)


def cmd_status(args) -> int:
    from gitopsd.daemon import status

    home = _home(args)
    if args.cluster is None and args.config is not None:
        # Every cluster of the config: one row per target, read where each target keeps it.
        apps = []
        for name in _clusters_config(args).cluster_names:
            try:
                kube = _target_kube(args, home, name)
                found = status.read_all(kube, namespace=args.namespace, app=args.app)
            except GitopsdError as exc:
                found = [{"app": args.app or "*", "cluster": name, "error": f"cluster {name}: {exc.message}"}]
            apps += [{**a, "cluster": a.get("cluster") or name} for a in found]
    else:
        apps = status.read_all(_target_kube(args, home), namespace=args.namespace, app=args.app)
    if args.app and not apps:
        print(f"error: no status for app {args.app!r} in namespace {args.namespace}", file=sys.stderr)
        return 1
    _print(apps, output=args.output, text=status.table(apps))
    broken = [a for a in apps if "error" in a]
    for a in broken:
        print(f"{'error' if args.app else 'warning'}: app {a['app']}: unreadable status: {a['error']}\n"
              f"  hint: {status.problem_hint(a)}", file=sys.stderr)
    return 2 if args.app and broken else 0


def cmd_history(args) -> int:
    from gitopsd import audit
    from gitopsd.kube import Kube

    since, at = args.since, args.at   # instants already: the flag type parsed them
    kube = _target_kube(args, Kube.connect(kubeconfig=args.kubeconfig, context=args.context))
    if at is not None:
        answer = audit.live_at(kube, namespace=args.namespace, app=args.app, when=at)
        _print(answer, output=args.output, text=audit.live_at_text(answer))
        return 0 if answer["revision"] else 1
    records = audit.history(kube, namespace=args.namespace, app=args.app, since=since, limit=args.limit)
    text = "\n".join(audit.summary_line(r) for r in records) or \
        f"no audit records for app {args.app} in namespace {args.namespace}" + (" since then" if since else "")
    _print(records, output=args.output, text=text)
    return 0 if records else 1


def cmd_release(args) -> int:
    """`gitopsd rollback|hold|resume APP`: store the request, wait for the daemon to act on it."""
    from gitopsd import audit
    from gitopsd.daemon import release
    from gitopsd.kube import Kube

    # The request is stored in gitopsd's own cluster, for the target (`app@cluster`); the app's trail and
    # status are read where the target keeps them (gitopsd.daemon.clusters).
    home = Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
    kube = _target_kube(args, home)
    target = cfg.target_key(args.app, args.cluster or cfg.IN_CLUSTER)
    request = release.make_request(kube, namespace=args.namespace, app=args.app, action=args.command,
                                   to=getattr(args, "to", None), by=audit.cli_instance())
    release.write_request(home, namespace=args.namespace, app=target, request=request)
    at = f" at {request.revision[:12]}" if request.revision else ""
    print(f"{args.command}{at} requested for app {target} (request {request.id[:8]})", file=sys.stderr)
    deadline = time.monotonic() + args.wait
    while (state := release.acted_on(kube, namespace=args.namespace, app=args.app, request=request)) is None:
        if time.monotonic() >= deadline:
            if args.wait:
                print(f"the daemon has not acted on it within {args.wait:g}s; the request stays stored and is "
                      f"acted on when gitopsd runs the app (is it running?)", file=sys.stderr)
            return 1
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))   # a CLI waiting on a person's request
    _print(state, output=args.output, text=f"app {args.app}: {state.get('state')}"
           + (f" at {state['revision'][:12]}" if state.get("revision") else "") + f" ({state.get('reason', '')})")
    return 0


def cmd_export(args) -> int:
    from gitopsd import export
    from gitopsd.kube import Kube

    home = Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
    done = export.export(_target_kube(args, home), config_file=args.config, app=args.app, namespace=args.namespace,
                         at=args.at, directory=args.output_dir, home=home)
    print(export.summary_line(done))
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not done.chain_ok:
        print(f"warning: the audit chain of app {args.app} is broken: {done.chain}", file=sys.stderr)
    return 0 if done.chain_ok else 1


def cmd_audit(args) -> int:
    from gitopsd import audit
    from gitopsd.kube import Kube

    # One subcommand today (verify); argparse requires it. Errors: main() reports them, exit 2.
    kube = _target_kube(args, Kube.connect(kubeconfig=args.kubeconfig, context=args.context))
    ok, message = audit.verify(kube, namespace=args.namespace, app=args.app)
    _print({"app": args.app, "ok": ok, "message": message}, output=args.output,
           text=message if ok else f"BROKEN: {message}")
    return 0 if ok else 1


def cmd_config(args) -> int:
    if args.config_command == "schema":
        sys.stdout.write(orjson.dumps(cfg.schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    # validate: the file's problems are this command's answer (exit 1), not an error
    try:
        config = cfg.load(args.file)
    except cfg.ConfigError as exc:
        _print({"file": str(args.file), "valid": False, "problems": exc.problems, "hint": exc.hint},
               output=args.output, text=str(exc))
        return 1
    names = [a.name for a in config.apps]
    targets = [a.key for a in config.targets]
    fanned = f" ({len(targets)} targets: {', '.join(targets)})" if targets != names else ""
    _print({"file": str(args.file), "valid": True, "apps": names, "targets": targets,
            "clusters": config.cluster_names}, output=args.output,
           text=f"{args.file}: valid, {len(names)} app{'' if len(names) == 1 else 's'}"
                + (f": {', '.join(names)}" if names else "") + fanned)
    return 0


COMMANDS = {"diff": cmd_diff, "sync": cmd_sync, "run": cmd_run, "status": cmd_status, "history": cmd_history,
            "export": cmd_export, "audit": cmd_audit, "config": cmd_config, "rollback": cmd_release,
            "hold": cmd_release, "resume": cmd_release}


def main(argv: list[str] | None = None) -> int:
    """Parse, check and run one command; the process's exit code.

    Exit 2 on every error, whatever raised it, so 1 keeps its meaning (drift,
    refused, broken chain). A GitopsdError is the user's to fix: its message
    only (`--debug` adds the traceback). Anything else is a bug: one line
    that says so, then the traceback, once.
    """
    parser = build_parser()
    args = parser.parse_args(argv)   # a bad flag: usage error, exit 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _finish_args(args)
    if args.command != "run":   # the daemon's log goes to stdout, as --log-format says (gitopsd.daemon.core)
        from gitopsd import log

        log.configure(level=args.log_level, stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gitopsd history app | head -1`): nothing left to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into exit 2
        from gitopsd.errors import GitopsdError

        if isinstance(exc, GitopsdError):
            return _report_error(args, exc)
        _report_bug(args, exc)
        return 2


def _report_error(args, exc: Exception, *, app: str | None = None) -> int:
    """An error the user can fix: its message, no traceback unless --debug; returns exit code 2.

    With -o json the error is a JSON document on stdout, so a script always
    reads JSON there. In text, diff and sync print it where their report
    goes (stdout); the other commands on stderr.
    """
    if getattr(args, "output", "text") == "json":
        from gitopsd import report

        _print(report.error_dict(args.command, str(exc), app=app), output="json", text="")
    else:
        print(f"error: {exc}", file=sys.stdout if args.command in ("diff", "sync") else sys.stderr)
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return 2


def _report_bug(args, exc: Exception) -> None:
    """One line that says this is a bug, then the traceback once: at error
    level in the daemon's log (JSON or console, as configured), on stderr
    for the other commands."""
    line = (f"internal error: this is a bug in gitopsd {__version__}, please report it with the traceback "
            f"below ({type(exc).__name__}: {str(exc)[:200]})")
    if args.command == "run":
        import structlog

        structlog.get_logger("gitopsd").error(line, exc_info=exc)
        return
    if getattr(args, "output", "text") == "json":
        from gitopsd import schemas

        schema = schemas.for_command(args.command)
        _print({**({"schema": schema} if schema else {}), "error": line}, output="json", text="")
    import traceback

    print(f"error: {line}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
