#!/usr/bin/env python3
"""hack/fleet_bench.py: one `gitopsd run` daemon keeping a fleet of apps converged.

    .venv/bin/python hack/fleet_bench.py                          # 1000 apps x 5 ConfigMaps, one repo
    .venv/bin/python hack/fleet_bench.py --apps 100 --steady 30   # a couple of minutes
    .venv/bin/python hack/fleet_bench.py --apps-per-repo 100      # repos of 100 apps each
    .venv/bin/python hack/fleet_bench.py --json fleet.json [--profile 30]
    .venv/bin/python hack/fleet_bench.py --replicas 2 --shards 4  # two replicas splitting the fleet

The fleet benchmark of issue 10. It starts its own cluster "fleet-bench"
(hack/testbed, loopback only), writes N apps of M ConfigMaps each into local
bare Git repos, starts the real `gitopsd run --log-format json` (leader
election on, --no-watch-local so a push reaches it by the signed generic
webhook, as from a CI job) and measures from outside:

- converge: seconds from starting the daemon process until its GET /status
  shows every app with result Applied (or NoChange) and health Healthy
  (one daemon: GET /status?summary, the counts, every 0.25 s; several: the
  full status, whose rows name the apps each one runs, every 0.25 s per
  thousand apps so that the polling does not load them; no sleeps);
- RSS: VmRSS of the daemon sampled every 2 s over --steady seconds after
  convergence (median and max), and its peak VmHWM;
- connections: the daemon's ESTABLISHED TCP sockets (its socket inodes in
  /proc/PID/fd matched against /proc/PID/net/tcp{,6}), in all and to the
  apiserver, at convergence and at the end of the steady window; threads too;
- apiserver requests during convergence and per minute at steady state: the
  apiserver's own apiserver_request_total (scraped as hack/bench.py does),
  net of the idle background rate measured per verb before the daemon starts
  (KWOK's node heartbeats), split by verb; plus the daemon's own
  gitopsd_apiserver_requests_total as a cross-check that names the client.
  Note the apiserver counts a WATCH when it ends (a watch timeout/renewal);
- edit -> reverted p50/p95: --edits hand edits (a PUT by field manager
  kubectl-edit, one ConfigMap each of --edits different apps, one after the
  other), timed until a GET shows gitopsd has restored the value;
- push -> applied p50/p95: --pushes commits changing one ConfigMap of the
  first app, each followed by the generic webhook for its repo, timed until
  the new value is live. The webhook wakes every app on that repo: with one
  repo for the fleet that is the whole fleet.

Both latency loops are hack/latency.py's (push_to_applied, edit_to_reverted).

Where the memory goes, at the end of the steady window (before the latency
loops): the daemon's mappings from /proc/PID/smaps by kind (glibc's main heap,
its other malloc arenas, thread stacks, other anonymous memory — mostly
CPython's object arenas and large buffers —, and files: the interpreter and
its extension modules) and the Python threads by name (a signal handler the
bench installs in the daemon through a sitecustomize on its PYTHONPATH;
harmless to the figures: it allocates nothing until asked). --tracemalloc N
also starts the daemon under tracemalloc (N frames per allocation) and takes
a snapshot there: the live Python allocations by file:line and by file.
tracemalloc roughly doubles the memory and slows the daemon down, so the RSS
and timing figures of such a run are not the daemon's: measure them without it.

--replicas R (with --shards S) starts R daemons that split the apps between
them (gitopsd.daemon.shards); an app counts as converged when any replica
reports it Applied+Healthy (the others report it Pending). RSS, threads and
connections are then per replica: the table gives the sum and the largest.
Pushes go to the first replica, which forwards those of apps it does not own.

Layout (--apps-per-repo K): 0 (default) puts every app in one repo, each under
its own path apps/APP (the monorepo); K puts K apps per repo (100: the "100
apps share one repo" case of the issue; 1: a repo per app). Apps live in
namespaces of 100 (fleet-00, fleet-01, ...), the daemon in fleet-system.

The machine is shared: the cluster's etcd and apiserver share its cores with
the daemon and with whatever else runs. Quote figures with that caveat.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench import ApiMetrics  # noqa: E402
from helpers import DaemonProcess, GitRepo, configmap  # noqa: E402
from latency import SECRET, edit_to_reverted, label, pct, push_to_applied, samples  # noqa: E402
from testbed import cluster as tb  # noqa: E402

from gitopsd.kube import Kube  # noqa: E402

DAEMON_NS = "fleet-system"
APPS_PER_NAMESPACE = 100
DONE_RESULTS = {"Applied", "NoChange"}
BACKGROUND = {"nodes"}   # KWOK's node status heartbeats; leases stay in (ours renew too), net of the idle rate


def summary_done(summary: dict) -> tuple[int, int]:
    """From GET /status?summary: the apps Applied (or NoChange) and Healthy, and the apps reported."""
    results = summary.get("results", {})
    return sum(results.get(r, {}).get("Healthy", 0) for r in DONE_RESULTS), summary.get("apps", 0)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the fleet

def app_name(i: int) -> str:
    return f"app-{i:04d}"


def app_namespace(i: int) -> str:
    return f"fleet-{i // APPS_PER_NAMESPACE:02d}"


def build_fleet(root: Path, apps: int, objects: int, per_repo: int, interval: str) -> tuple[list[dict], dict]:
    """Write the repos; returns (config entries, {app index: GitRepo})."""
    per_repo = per_repo or apps
    entries, repo_of = [], {}
    for first in range(0, apps, per_repo):
        repo = GitRepo(root / f"repo-{first // per_repo:03d}")
        for i in range(first, min(apps, first + per_repo)):
            name = app_name(i)
            repo.write(f"apps/{name}/cms.yaml",
                       [configmap(f"{name}-cm-{j}", {"value": "0", "app": name, "index": str(j)})
                        for j in range(objects)])
            entries.append({"name": name, "repo": repo.url, "ref": "main", "path": f"apps/{name}",
                            "namespace": app_namespace(i), "interval": interval})
            repo_of[i] = repo
        repo.commit(f"apps {first}..{min(apps, first + per_repo) - 1}")
    return entries, repo_of


# ---------------------------------------------------------------- the daemon from outside

SITECUSTOMIZE = """\
# Installed by hack/fleet_bench.py in the daemon it starts: on SIGUSR2, write the
# Python threads' names, a census of what the daemon's parts hold (deep sizes) and,
# under tracemalloc, a snapshot, next to $GITOPSD_BENCH_PROBE.
import gc, json, os, signal, sys, threading, tracemalloc, types

_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
           types.MethodType, types.FrameType, threading.Thread)


def _deep(roots, seen):
    # Bytes reachable from roots not yet in seen (modules, classes, functions, bound methods and
    # threads are not entered: they lead to everything).
    total, stack = 0, list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _OPAQUE):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o, 0)
        stack.extend(gc.get_referents(o))
    return total


def _mallinfo():
    import ctypes

    class M(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = M
    m = f()
    return {"in_use_mib": round(m.uordblks / 2**20, 1), "free_mib": round(m.fordblks / 2**20, 1),
            "mmapped_mib": round(m.hblkhd / 2**20, 1)}


def _managed_fields(objs) -> int:
    # The informers' managedFields weighed as dicts (kept packed by gitopsd.daemon.reflector.Packer
    # or, before, as dicts). The objects decoded for it are gone when this returns: left alive they
    # were weighed again under "everything else", ~3 KiB an object (the "unattributed" 15 KiB an app).
    decoded = [r._packer.unpack(o) if isinstance(o, bytes) else o for r, o in objs]
    return _deep([(o.get("metadata") or {}).get("managedFields") for o in decoded], set())


def _census():
    daemon = next((o for o in gc.get_objects() if type(o).__name__ == "Daemon"
                   and type(o).__module__ == "gitopsd.daemon.core"), None)
    if daemon is None:
        return {}
    glibc = _mallinfo()   # before the walks below allocate their own bookkeeping
    seen, mib, out, attrs = {id(daemon), id(vars(daemon))}, 2 ** -20, {}, {}   # parts by name, not via a back-link
    reflectors = [s for k in daemon.informers._kinds.values() for s in k.streams.values()]
    objs = [(r, o) for r in reflectors for b in list(r._buckets.values()) for o in list(b.values())]
    mf = _managed_fields(objs)
    out["informers"] = _deep([daemon.informers], seen) * mib
    out["  of which managedFields (as dicts)"] = mf * mib
    for r in list(daemon.runners.values()):
        for k, v in vars(r).items():
            attrs[k] = attrs.get(k, 0) + _deep([v], seen)
    out["runners"] = sum(attrs.values()) * mib
    for name in ("renders", "fetches", "schedule", "audit", "leadership", "server", "credentials", "pushes",
                 "config_watch", "kube", "pool"):
        out[name] = _deep([getattr(daemon, name, None)], seen) * mib
    for mod in ("gitopsd.redact", "gitopsd.metrics", "structlog", "logging"):
        m = sys.modules.get(mod)
        out[mod] = _deep([v for v in vars(m).values()] if m else [], seen) * mib
    everything = gc.get_objects()
    seen.update({id(everything), id(seen), id(objs), id(out), id(attrs)})   # the probe's own
    out["everything else (modules, code, classes, caches)"] = _deep(everything, seen) * mib
    del everything
    # Unreachable cycles the collector has not reached yet (gc.collect with DEBUG_SAVEALL keeps them
    # in gc.garbage to be weighed; they are part of the figure above).
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        out["  of which uncollected cycles"] = _deep(list(gc.garbage), set()) * mib
        garbage_objects = len(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return {"glibc": glibc, "garbage_objects": garbage_objects,
            "parts_mib": {k: round(v, 2) for k, v in out.items()},
            "runner_attrs_mib": {k: round(v * mib, 2) for k, v in sorted(attrs.items(), key=lambda kv: -kv[1])[:12]},
            "informer_objects": len(objs), "runners": len(daemon.runners)}


def _probe(signum, frame):
    out = os.environ["GITOPSD_BENCH_PROBE"]
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(out + ".snapshot")
    answer = {"threads": [t.name for t in threading.enumerate()]}
    try:
        answer["census"] = _census()
    except Exception as exc:   # a probe of a bench, not of the product: say why and go on
        answer["census_error"] = repr(exc)
    with open(out + ".tmp", "w") as f:
        json.dump(answer, f)
    os.replace(out + ".tmp", out)

if os.environ.get("GITOPSD_BENCH_PROBE"):
    signal.signal(signal.SIGUSR2, _probe)
"""


def probe_env(tmp: Path, name: str, frames: int) -> dict[str, str]:
    """The environment that installs the probe (and tracemalloc) in a daemon; see SITECUSTOMIZE."""
    hook = tmp / "probe-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"GITOPSD_BENCH_PROBE": str(tmp / f"probe-{name}.json"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    if frames:
        env["PYTHONTRACEMALLOC"] = str(frames)
    return env


def probe(pid: int, out: Path, timeout: float = 120.0) -> dict:
    """Ask the daemon for its threads (and tracemalloc snapshot); wait for its answer file."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not out.exists():
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.1)
    return json.loads(out.read_text())


def thread_census(names: list[str]) -> dict[str, int]:
    """Threads by name with trailing numbers folded (ThreadPoolExecutor-0_12 -> ThreadPoolExecutor-N_N)."""
    out: dict[str, int] = {}
    for n in names:
        key = "".join("N" if c.isdigit() else c for c in n)
        while "NN" in key:
            key = key.replace("NN", "N")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def smaps_by_kind(pid: int) -> dict[str, float]:
    """Rss (MiB) of the daemon's mappings by kind.

    glibc gives every thread that contends for malloc an arena of its own
    (up to 8 x cores), each a 64 MiB reservation whose used part is an
    anonymous rw mapping followed by a PROT_NONE rest; thread stacks are
    anonymous 8 MiB mappings (ulimit -s) below a guard page; [heap] is the
    main arena (brk); other anonymous memory is mostly CPython's own object
    arenas and large buffers (mmap'd by malloc above its threshold).
    """
    maps: list[tuple[int, int, str, str, float]] = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = [lo, hi, head[1], head[5] if len(head) > 5 else "", 0.0]
                maps.append(cur)
            elif head[0] == "Rss:" and cur is not None:
                cur[4] = int(head[1]) / 1024.0
    out = {"heap (main arena)": 0.0, "malloc arenas": 0.0, "thread stacks": 0.0, "other anonymous": 0.0,
           "files": 0.0}
    arenas = 0
    for i, (lo, hi, perms, path, rss) in enumerate(maps):
        nxt = maps[i + 1] if i + 1 < len(maps) else None
        prev = maps[i - 1] if i else None
        if path == "[heap]":
            out["heap (main arena)"] += rss
        elif path.startswith("/"):
            out["files"] += rss
        elif path:
            continue   # [stack], [vdso], ...
        elif perms.startswith("rw") and nxt and not nxt[3] and nxt[2].startswith("---") and nxt[0] == hi \
                and (nxt[1] - lo) == 64 << 20:
            out["malloc arenas"] += rss
            arenas += 1
        elif perms.startswith("rw") and prev and prev[2].startswith("---") and prev[1] == lo \
                and (prev[1] - prev[0]) <= 64 << 10 and (hi - lo) >= 1 << 20:
            out["thread stacks"] += rss
        else:
            out["other anonymous"] += rss
    out = {k: round(v, 1) for k, v in out.items()}
    out["arenas (count)"] = arenas
    return out


def summarize_snapshot(path: Path, top: int = 25) -> dict:
    """tracemalloc snapshot -> the largest live allocation sites (file:line) and files, MiB."""
    import tracemalloc

    snap = tracemalloc.Snapshot.load(str(path)).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")])

    def short(fname: str) -> str:
        for mark in ("/site-packages/", f"/lib/python{sys.version_info[0]}.{sys.version_info[1]}/", str(ROOT) + "/"):
            if mark in fname:
                return fname.split(mark, 1)[1]
        return fname

    def rows(kind: str) -> list[tuple[str, float, int]]:
        out = []
        for st in snap.statistics(kind)[:top]:
            f = st.traceback[0]
            where = short(f.filename) + (f":{f.lineno}" if kind == "lineno" else "")
            out.append((where, round(st.size / 2**20, 2), st.count))
        return out

    def stacks() -> list[tuple[str, float, int]]:
        out = []
        for st in snap.statistics("traceback")[:top]:
            frames = " < ".join(f"{short(f.filename).rsplit('/', 1)[-1]}:{f.lineno}" for f in st.traceback)
            out.append((frames, round(st.size / 2**20, 2), st.count))
        return out

    total = sum(st.size for st in snap.statistics("filename"))
    return {"traced_mib": round(total / 2**20, 1), "by_line": rows("lineno"), "by_file": rows("filename"),
            "by_stack": stacks()}


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def kib(v: str) -> float:
    return float(v.split()[0]) / 1024.0   # "123456 kB" -> MiB


def tcp_connections(pid: int, apiserver_port: int) -> dict[str, int]:
    """The daemon's ESTABLISHED TCP sockets: all, and to the apiserver's port."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    total = api = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes and f[3] == "01":   # 01 = ESTABLISHED
                total += 1
                if int(f[2].rsplit(":", 1)[1], 16) == apiserver_port:
                    api += 1
    return {"established": total, "to_apiserver": api, "fds": len(inodes)}


def daemon_counters(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's own apiserver requests, by verb."""
    out: dict[str, float] = {}
    for key, v in samples(daemon, "gitopsd_apiserver_requests_total").items():
        verb = label(key, "verb")
        out[verb] = out.get(verb, 0.0) + v
    return out


def by_verb(delta: dict[tuple, int]) -> dict[str, int]:
    """Requests by verb (dry-runs apart), leaving out nodes (KWOK's heartbeats)."""
    out: dict[str, int] = {}
    for (verb, resource, _sub, dry), n in delta.items():
        if resource in BACKGROUND:
            continue
        name = verb + (" dry-run" if dry else "")
        out[name] = out.get(name, 0) + n
    return out


def net(counts: dict[str, int], idle_rate: dict[str, float], seconds: float) -> dict[str, int]:
    out = {}
    for verb, n in counts.items():
        v = round(n - idle_rate.get(verb, 0.0) * seconds)
        if v > 0:
            out[verb] = v
    return out


def summed(counts) -> dict:
    """Per-key sums of several replicas' figures."""
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def dsub(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0) > 0}


# ---------------------------------------------------------------- the benchmark

class Fleet:
    def __init__(self, args, cluster: tb.Cluster, tmp: Path) -> None:
        self.args, self.cluster, self.tmp = args, cluster, tmp
        self.metrics = ApiMetrics(cluster)
        self.kube = Kube.connect(kubeconfig=cluster.kubeconfig)
        self.api_port = int(cluster.server.rsplit(":", 1)[1].rstrip("/"))
        self.result: dict = {}
        self.daemons: list[DaemonProcess] = []

    def namespaces(self) -> None:
        names = {DAEMON_NS} | {app_namespace(i) for i in range(self.args.apps)}
        for name in sorted(names):
            status, body = tb.request(self.cluster, "POST", "/api/v1/namespaces",
                                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            if status not in (201, 409):
                raise RuntimeError(f"creating namespace {name}: {status} {body}")

    def idle(self, window: float) -> dict[str, float]:
        self.metrics.settle()
        before = self.metrics.snapshot()
        time.sleep(window)
        after = self.metrics.snapshot()
        return {v: n / window for v, n in by_verb(ApiMetrics.delta(before, after)).items()}

    def converge(self, daemons: list[DaemonProcess], t0: float) -> dict:
        a = self.args
        last_say, ready_at, seen, done = 0.0, None, (0, 0), 0
        while True:
            now = time.monotonic()
            if now - t0 > a.timeout:
                raise RuntimeError(f"not converged after {a.timeout:.0f}s: {seen[0]}/{a.apps} Applied+Healthy "
                                   f"({seen[1]} reported); daemon logs: {[str(d.log_path) for d in daemons]}")
            done_apps: set[str] = set()
            reported = 0
            for daemon in daemons:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"gitopsd run exited {daemon.proc.returncode}:\n"
                                       f"{daemon.log_path.read_text()[-3000:]}")
                code, body = daemon.get("/status?summary" if len(daemons) == 1 else "/status")
                if code != 200:
                    continue
                ready_at = ready_at or now
                doc = json.loads(body)
                if "summary" in doc:
                    done, reported = summary_done(doc["summary"])
                    continue
                apps = doc.get("apps", [])
                reported = max(reported, len(apps))
                done_apps |= {s["app"] for s in apps
                              if s.get("result") in DONE_RESULTS and s.get("health") == "Healthy"}
            if len(daemons) > 1:
                done = len(done_apps)
            seen = (done, reported)
            if done == a.apps:
                return {"seconds": now - t0, "http_up_seconds": ready_at - t0, "failed": 0}
            if now - last_say > 10:
                say(f"  t+{now - t0:5.1f}s  {seen[0]}/{a.apps} apps Applied+Healthy")
                last_say = now
            time.sleep(0.25 if len(daemons) == 1 else 0.25 * max(1.0, a.apps / 1000))

    def run(self) -> dict:
        a = self.args
        entries, repo_of = build_fleet(self.tmp / "git", a.apps, a.objects_per_app, a.apps_per_repo, a.interval)
        repos = len({id(r) for r in repo_of.values()})
        say(f"wrote {a.apps} apps x {a.objects_per_app} ConfigMaps into {repos} repo(s)")
        self.namespaces()
        cfg = self.tmp / "apps.yaml"
        cfg.write_text(json.dumps({"apps": entries}))
        say(f"measuring the apiserver's idle rate over {a.idle:.0f}s ...")
        idle = self.idle(a.idle)
        say(f"  idle: {sum(idle.values()):.2f} requests/s ({', '.join(f'{k} {v:.2f}' for k, v in idle.items())})")

        before = self.metrics.snapshot()
        t0 = time.monotonic()
        extra = ("--no-watch-local",) + (("--shards", str(a.shards)) if a.shards > 1 else ())
        for r in range(a.replicas):
            self.daemons.append(DaemonProcess(
                config=cfg, kubeconfig=self.cluster.kubeconfig, namespace=DAEMON_NS, workdir=self.tmp,
                cache=self.tmp / f"cache-{r}", extra=extra,
                env={"GITOPSD_WEBHOOK_SECRET": SECRET, **probe_env(self.tmp, f"fleet-{r}", a.tracemalloc)},
                name="fleet" if a.replicas == 1 else f"fleet-{r}"))
        daemons, daemon = self.daemons, self.daemons[0]
        pids = [d.proc.pid for d in daemons]
        spy = self.start_profile(pids[0], a.profile) if a.profile else None
        say(f"gitopsd run started (pids {pids}, logs {[str(d.log_path) for d in daemons]}); "
            f"waiting for {a.apps} apps ...")
        conv = self.converge(daemons, t0)
        at_conv = self.metrics.snapshot()
        conv_req = by_verb(ApiMetrics.delta(before, at_conv))
        conv["requests"] = net(conv_req, idle, conv["seconds"])
        conv["requests_total"] = sum(conv["requests"].values())
        conv["daemon_requests"] = summed(daemon_counters(d) for d in daemons)
        conv["tcp"] = summed(tcp_connections(pid, self.api_port) for pid in pids)
        conv["threads"] = sum(int(proc_status(pid)["Threads"]) for pid in pids)
        say(f"converged in {conv['seconds']:.1f}s; {conv['requests_total']} requests; tcp {conv['tcp']}")

        # Steady state: nothing changes; the daemon polls on its interval.
        say(f"steady state for {a.steady:.0f}s ...")
        s_before, d_before = self.metrics.snapshot(), summed(daemon_counters(d) for d in daemons)
        rss, rss_each, tcp, threads = [], [], [], []
        t_s = time.monotonic()
        while time.monotonic() - t_s < a.steady:
            sts = [proc_status(pid) for pid in pids]
            rss.append(sum(kib(st["VmRSS"]) for st in sts))
            rss_each.append(max(kib(st["VmRSS"]) for st in sts))
            threads.append(sum(int(st["Threads"]) for st in sts))
            tcp.append(sum(tcp_connections(pid, self.api_port)["established"] for pid in pids))
            time.sleep(2.0)
        window = time.monotonic() - t_s
        s_after, d_after = self.metrics.snapshot(), summed(daemon_counters(d) for d in daemons)
        per_min = 60.0 / window
        steady_req = net(by_verb(ApiMetrics.delta(s_before, s_after)), idle, window)
        steady = {
            "seconds": window,
            "rss_mib_median": statistics.median(rss), "rss_mib_max": max(rss),
            "rss_mib_largest_replica_median": statistics.median(rss_each),
            "vmhwm_mib": max(kib(proc_status(pid)["VmHWM"]) for pid in pids),
            "tcp_established_median": statistics.median(tcp), "tcp_established_max": max(tcp),
            "threads_median": statistics.median(threads),
            "requests_per_minute": {k: round(v * per_min, 1) for k, v in steady_req.items()},
            "requests_per_minute_total": round(sum(steady_req.values()) * per_min, 1),
            "daemon_requests_per_minute": {k: round(v * per_min, 1) for k, v in dsub(d_after, d_before).items()},
        }
        steady["daemon_requests_per_minute_total"] = round(sum(steady["daemon_requests_per_minute"].values()), 1)
        steady["tcp_end"] = summed(tcp_connections(pid, self.api_port) for pid in pids)
        say(f"steady: RSS {steady['rss_mib_median']:.0f} MiB, {steady['requests_per_minute_total']:.0f} req/min")
        memory = self.where_memory_goes(pids[0])

        profile = self.finish_profile(spy) if spy else None

        # edit -> reverted: one ConfigMap in each of --edits apps spread over the fleet (never app 0, pushed below).
        n_edits = min(a.edits, max(a.apps - 1, 0))
        step = max((a.apps - 1) // max(n_edits, 1), 1)
        targets = [(app_namespace(i), f"{app_name(i)}-cm-0", "value", "0")
                   for i in range(1, a.apps, step)][:n_edits]
        say(f"edit -> reverted over {len(targets)} apps ...")
        revert = edit_to_reverted(self.kube, targets, timeout=a.latency_timeout)

        # push -> applied: change app 0's first ConfigMap, webhook for its repo.
        repo, name, ns = repo_of[0], app_name(0), app_namespace(0)
        cms = self.kube.resource("v1", "ConfigMap")

        def change(i: int) -> None:
            repo.write(f"apps/{name}/cms.yaml",
                       [configmap(f"{name}-cm-{j}", {"value": f"push-{i}" if j == 0 else "0", "app": name,
                                                    "index": str(j)}) for j in range(a.objects_per_app)])

        def applied(i: int) -> bool:
            obj = self.kube.get(cms, f"{name}-cm-0", ns)
            return obj is not None and obj["data"].get("value") == f"push-{i}"

        say(f"push -> applied, {a.pushes} pushes ...")
        push = push_to_applied(daemon, repo, a.pushes, change=change, applied=applied, timeout=a.latency_timeout)
        vmhwm_end = max(kib(proc_status(pid)["VmHWM"]) for pid in pids)
        rss_end = sum(kib(proc_status(pid)["VmRSS"]) for pid in pids)

        def lat(vals: list[float]) -> dict:
            return ({"n": len(vals), "p50_ms": statistics.median(vals) * 1000, "p95_ms": pct(vals, 0.95) * 1000,
                     "max_ms": max(vals) * 1000} if vals else {"n": 0})

        return {"converge": conv, "steady": steady, "edit_to_reverted": lat(revert), "push_to_applied": lat(push),
                "vmhwm_mib_end": vmhwm_end, "rss_mib_end": rss_end, "memory": memory, "repos": repos,
                "idle_requests_per_second": idle, "profile": profile}

    def where_memory_goes(self, pid: int) -> dict:
        """The first daemon's mappings by kind, its threads by name, and (--tracemalloc) its allocations."""
        out: dict = {"smaps_mib": smaps_by_kind(pid)}
        answer = probe(pid, self.tmp / "probe-fleet-0.json")
        out["threads"] = thread_census(answer.get("threads") or [])
        out["census"] = answer.get("census") or {"error": answer.get("census_error")}
        snapshot = self.tmp / "probe-fleet-0.json.snapshot"
        if self.args.tracemalloc and snapshot.exists():
            say("summarising the tracemalloc snapshot ...")
            out["tracemalloc"] = summarize_snapshot(snapshot)
        return out

    def start_profile(self, pid: int, seconds: float):
        """py-spy the daemon from its start, over the convergence (when py-spy is installed and may attach)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            say("no py-spy: skipping the profile (.venv/bin/pip install py-spy)")
            return None
        out = self.tmp / "profile.txt"
        say(f"py-spy record over the first {seconds:.0f}s of the daemon ...")
        # py-spy walks every thread's stack per sample: with a thread per app and watch it falls behind at
        # 50 Hz (seen: 6 minutes for a 60 s record at 1000 apps), so the rate drops with the fleet.
        rate = max(5, min(50, 5000 // max(self.args.apps, 1)))
        proc = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
                                 "-o", str(out), "--nonblocking"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        return proc, out

    def finish_profile(self, spy) -> dict | None:
        proc, out = spy
        try:
            _, err = proc.communicate(timeout=2 * self.args.profile)
        except subprocess.TimeoutExpired:   # still behind: SIGINT makes py-spy write what it has
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            say(f"py-spy failed ({proc.returncode}): {err.strip()[-500:]}")
            return None
        return summarize_stacks(out.read_text(), self.args.profile_out)


def summarize_stacks(raw: str, keep: Path | None) -> dict:
    """Collapsed stacks -> share of samples per leaf frame and per frame anywhere in the stack (top 15)."""
    if keep:
        keep.write_text(raw)
    leaf: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for f in set(frames):
            if "(threading.py)" not in f:
                incl[f] = incl.get(f, 0) + n
    top = lambda d: [(k, round(100.0 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:15]]  # noqa: E731
    return {"samples": total, "leaf_percent": top(leaf), "inclusive_percent": top(incl)}


def table(args, r: dict) -> str:
    c, s, e, p = r["converge"], r["steady"], r["edit_to_reverted"], r["push_to_applied"]

    def verbs(d: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    def ms(d: dict, key: str) -> str:
        return f"{d[key]:.0f} ms" if key in d else "-"

    layout = ("one repo, a path per app" if not args.apps_per_repo else f"{args.apps_per_repo} apps per repo")
    if args.replicas > 1:
        layout += f"; {args.replicas} replicas, --shards {args.shards}: figures summed over them"
    rows = [
        ("apps x ConfigMaps", f"{args.apps} x {args.objects_per_app} ({layout}, {r['repos']} repo(s)), "
                              f"interval {args.interval}"),
        ("converged (start -> all Applied+Healthy)", f"{c['seconds']:.1f} s (HTTP up at {c['http_up_seconds']:.1f} s)"),
        ("RSS steady (median / max)", f"{s['rss_mib_median']:.0f} / {s['rss_mib_max']:.0f} MiB"
                                      + (f" (largest replica {s['rss_mib_largest_replica_median']:.0f})"
                                         if args.replicas > 1 else "")),
        ("peak RSS (VmHWM) steady / end", f"{s['vmhwm_mib']:.0f} / {r['vmhwm_mib_end']:.0f} MiB"),
        ("RSS after the edits and pushes", f"{r.get('rss_mib_end', 0):.0f} MiB"),
        ("TCP established at convergence", f"{c['tcp']['established']} ({c['tcp']['to_apiserver']} to the apiserver)"),
        ("TCP established steady (median/max)", f"{s['tcp_established_median']:.0f} / {s['tcp_established_max']}"),
        ("threads (convergence / steady)", f"{c['threads']} / {s['threads_median']:.0f}"),
        ("apiserver requests, convergence", f"{c['requests_total']} ({verbs(c['requests'])})"),
        ("  daemon's own count", f"{sum(c['daemon_requests'].values())} ({verbs(c['daemon_requests'])})"),
        ("apiserver requests / steady minute", f"{s['requests_per_minute_total']:.0f} ({verbs(s['requests_per_minute'])})"),
        ("  daemon's own count", f"{s['daemon_requests_per_minute_total']:.0f} "
                                 f"({verbs(s['daemon_requests_per_minute'])})"),
        ("edit -> reverted p50 / p95", f"{ms(e, 'p50_ms')} / {ms(e, 'p95_ms')} (n={e['n']}, max {ms(e, 'max_ms')})"),
        ("push -> applied p50 / p95", f"{ms(p, 'p50_ms')} / {ms(p, 'p95_ms')} (n={p['n']}, max {ms(p, 'max_ms')})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"(steady window {s['seconds']:.0f}s; requests net of the idle rate "
                 f"{sum(r['idle_requests_per_second'].values()):.2f}/s measured before the daemon started; node "
                 f"heartbeats left out; the apiserver counts a WATCH when it ends)")
    mem = r.get("memory") or {}
    if mem:
        lines.append("where the memory goes (first daemon, end of the steady window), smaps Rss MiB: "
                     + ", ".join(f"{k} {v:g}" for k, v in mem["smaps_mib"].items()))
        lines.append("threads: " + ", ".join(f"{k} {v}" for k, v in mem["threads"].items()))
        census = mem.get("census") or {}
        if census.get("parts_mib"):
            lines.append(f"deep sizes of the daemon's parts (Python objects, MiB; {census['runners']} runners, "
                         f"{census['informer_objects']} cached objects):")
            lines.extend(f"  {v:8.2f}  {k}" for k, v in census["parts_mib"].items())
            lines.append(f"  glibc malloc (mallinfo2, MiB): {census.get('glibc')}")
            lines.append("  per runner attribute, all runners: "
                         + ", ".join(f"{k} {v:g}" for k, v in census["runner_attrs_mib"].items()))
        elif census:
            lines.append(f"census failed: {census}")
    if mem.get("tracemalloc"):
        tm = mem["tracemalloc"]
        lines.append(f"tracemalloc: {tm['traced_mib']} MiB of live Python allocations; largest sites (MiB, blocks):")
        lines.extend(f"  {mib:7.2f}  {count:8d}  {where}" for where, mib, count in tm["by_line"])
        lines.append("  by file:")
        lines.extend(f"  {mib:7.2f}  {count:8d}  {where}" for where, mib, count in tm["by_file"][:15])
        lines.append("  by stack:")
        lines.extend(f"  {mib:7.2f}  {count:8d}  {where}" for where, mib, count in tm["by_stack"][:15])
    if r.get("profile"):
        prof = r["profile"]
        lines.append(f"py-spy over the daemon's first {args.profile:.0f}s, {prof['samples']} busy samples; "
                     f"top frames, inclusive % / leaf %:")
        for (name, share), (lname, lshare) in zip(prof["inclusive_percent"], prof["leaf_percent"]):
            lines.append(f"  {share:5.1f}%  {name[:60]:<60}  {lshare:5.1f}%  {lname[:60]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--apps", type=int, default=1000, help="apps in the config (default 1000)")
    p.add_argument("--objects-per-app", type=int, default=5, help="ConfigMaps per app (default 5)")
    p.add_argument("--apps-per-repo", type=int, default=0, metavar="K",
                   help="0 (default): every app in one repo under its own path; K: K apps per repo")
    p.add_argument("--interval", default="1m", help="each app's poll interval (default 1m)")
    p.add_argument("--replicas", type=int, default=1, help="daemons started (default 1)")
    p.add_argument("--shards", type=int, default=0, help="--shards of each daemon (default: 2 x replicas "
                                                          "when --replicas > 1, else 1)")
    p.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured (default 60)")
    p.add_argument("--edits", type=int, default=30, help="hand edits timed to their revert (default 30)")
    p.add_argument("--pushes", type=int, default=10, help="pushes timed to applied (default 10)")
    p.add_argument("--latency-timeout", type=float, default=120.0, help="give up on one edit/push after (s)")
    p.add_argument("--timeout", type=float, default=1200.0, help="give up on convergence after (s)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle background (default 10)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="py-spy the daemon for its first SECONDS, i.e. the convergence (needs py-spy in the venv)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="run the daemon under tracemalloc (FRAMES per allocation) and report its largest live "
                        "allocations at the end of the steady window (the RSS figures are then not the daemon's)")
    p.add_argument("--profile-out", type=Path, metavar="FILE", help="keep py-spy's collapsed stacks in FILE")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--cluster", default="fleet-bench", help="cluster name (default fleet-bench; started and "
                                                             "stopped here)")
    p.add_argument("--keep-cluster", action="store_true", help="leave the cluster running at the end")
    args = p.parse_args(argv)
    if args.cluster == "dev" or args.cluster.startswith("pytest-") or args.cluster == "shared":
        p.error(f"refusing to use cluster {args.cluster!r}: it belongs to someone else")
    if args.apps < 1 or args.objects_per_app < 1 or args.apps_per_repo < 0 or args.replicas < 1:
        p.error("--apps, --objects-per-app and --replicas must be >= 1, --apps-per-repo >= 0")
    args.shards = args.shards or (2 * args.replicas if args.replicas > 1 else 1)

    started = time.monotonic()
    say(f"starting cluster {args.cluster!r} ...")
    try:
        cluster = tb.up(args.cluster, out=sys.stderr)
    except tb.ClusterError as exc:
        say(f"cluster {args.cluster!r} did not start ({str(exc).splitlines()[0]}); retrying once")
        cluster = tb.up(args.cluster, out=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="gitopsd-fleet-"))
    fleet = None
    try:
        fleet = Fleet(args, cluster, tmp)
        result = fleet.run()
        when = dt.datetime.now().astimezone()
        print(f"gitopsd fleet benchmark, {when:%Y-%m-%d}, {os.cpu_count()} cores (shared machine)\n")
        print(table(args, result))
        if args.json:
            doc = {"date": when.isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
                   **result, "elapsed_seconds": round(time.monotonic() - started, 1)}
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            say(f"wrote {args.json}")
        say(f"benchmark took {time.monotonic() - started:.0f}s")
        return 0
    finally:
        for d in (fleet.daemons if fleet is not None else []):
            rc = d.stop()
            if rc not in (0, None):
                say(f"gitopsd run exited {rc} on SIGTERM; log tail:\n{d.log_path.read_text()[-2000:]}")
        if args.keep_cluster:
            say(f"cluster {args.cluster!r} left running: hack/cluster down {args.cluster}; files in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            tb.down(args.cluster)
            say(f"cluster {args.cluster!r} stopped")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
