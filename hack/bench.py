#!/usr/bin/env python3
"""hack/bench.py: gitopsd against `kubectl apply --server-side`, side by side.

    make bench                       # = .venv/bin/python hack/bench.py
    .venv/bin/python hack/bench.py --objects 500 --repeat 3 --json bench.json

The machine is shared and noisy, so absolute times mean little: both tools run
in the same run, against the same local control plane (cluster "bench",
started here and stopped at the end), one after the other, alternating which
goes first, and the figures to quote are the gitopsd/kubectl ratios.

Each repetition uses fresh namespaces (bench-g-R for gitopsd, bench-k-R for
kubectl, bench-w-R for kubectl+wait) so the tools never touch each other's
objects, and measures:

1. initial sync of N objects: `gitopsd sync` (the real CLI, a cold Git cache,
   a clone of a local bare repo over file://) vs `kubectl apply --server-side`
   of the same files written to disk. gitopsd's figure includes what kubectl
   does not do: the clone, a server-side dry-run of every object (the plan),
   the ApplySet parent, the audit record and the health wait. Hence a second
   peer, "kubectl+wait": the same apply followed by `kubectl wait
   --for=condition=Available deployment --all`, which also returns only once
   the controllers have rolled the Deployments out.
2. no-op re-sync of the same commit: gitopsd sync again vs kubectl apply
   --server-side again (which PATCHes every object again).
3. drift detection on the unchanged state: `gitopsd diff` vs
   `kubectl diff --server-side` (both must exit 0: "no drift").

The objects: 60% ConfigMaps, 15% Secrets, 15% headless Services, 10%
Deployments. Deployments have replicas 0 by default, to keep the benchmark
about apply cost rather than KWOK's pod lifecycle (--replicas 1 brings pods up;
gitopsd then waits for them). Services are headless because the test bed's
service CIDR is a /24 (254 cluster IPs), too few for several namespaces of them.

What is measured per run:
- seconds: wall time of the child process (interpreter start-up included: the
  honest user path);
- peak RSS: the child's ru_maxrss (via /usr/bin/time -f %M, else os.wait4);
- requests: the delta of the apiserver's own apiserver_request_total between
  just before and just after the run, scraped from /metrics with the admin
  client certificate. It counts both tools the same way but cannot tell
  clients apart, so it is split by verb: GET/LIST/APPLY/PATCH/DELETE on the
  main resource (and discovery/OpenAPI GETs) is what the tools send — neither
  tool POSTs or PUTs, but for the ConfigMap that starts gitopsd's audit trail —
  while the other POSTs, PUT, status subresources and WATCH are the
  controllers reacting (ReplicaSets, EndpointSlices, Events, status updates;
  printed as "ctl"), as is anything on nodes, leases and events (KWOK's
  heartbeats). An idle window at the start measures the background rate,
  which is subtracted from both columns (and printed). Before each run the
  benchmark waits until the apiserver is quiet again.

Each figure is the median of --repeat runs; a ratio row is the median of the
per-repetition ratios (the runs of one repetition are seconds apart, so their
ratio is steadier than either figure).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

from testbed import build as tb_build  # noqa: E402
from testbed import cluster as tb  # noqa: E402

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}
SCENARIOS = ("initial", "noop", "diff")
# Who runs in each scenario. "kubectl+wait" is kubectl apply followed by
# `kubectl wait --for=condition=Available deployment --all`: the peer that,
# like gitopsd sync, returns only once the workloads are up.
TOOLS = {"initial": ("gitopsd", "kubectl", "kubectl+wait"), "noop": ("gitopsd", "kubectl"),
         "diff": ("gitopsd", "kubectl")}
SCENARIO_TITLE = {"initial": "initial sync", "noop": "no-op re-sync", "diff": "drift detection"}
TOOL_VERBS = {"GET", "LIST", "APPLY", "PATCH", "DELETE", "DELETECOLLECTION"}
# Neither tool touches these; KWOK's node heartbeats and the controllers do.
BACKGROUND_RESOURCES = {"nodes", "leases", "events"}
APP = "bench"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the objects

def generate(n: int, replicas: int) -> list[tuple[str, dict]]:
    """N objects, (path inside the repo, object): 60% CM, 15% Secret, 15% Service, rest Deployments."""
    n_cm, n_secret, n_svc = int(n * 0.60), int(n * 0.15), int(n * 0.15)
    n_deploy = n - n_cm - n_secret - n_svc
    out: list[tuple[str, dict]] = []

    def labels(app: str, tier: str) -> dict:
        return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "bench", "tier": tier}

    for i in range(n_cm):
        app = f"svc-{i % max(n_deploy, 1):04d}"
        out.append((f"manifests/configmaps/cm-{i:04d}.yaml", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i:04d}", "labels": labels(app, "config"),
                         "annotations": {"owner": "team-bench", "ticket": f"OPS-{1000 + i}"}},
            "data": {
                "LOG_LEVEL": ("debug", "info", "warn")[i % 3],
                "FEATURE_FLAGS": ",".join(f"flag-{(i + k) % 17}" for k in range(5)),
                "UPSTREAM_URL": f"http://upstream-{i % 23}.internal:8080/api/v{i % 3 + 1}",
                "app.properties": "\n".join(f"setting.{k}=value-{i}-{k}" for k in range(12)) + "\n",
            },
        }))
    for i in range(n_secret):
        app = f"svc-{i % max(n_deploy, 1):04d}"
        out.append((f"manifests/secrets/secret-{i:04d}.yaml", {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"secret-{i:04d}", "labels": labels(app, "secret")},
            "data": {k: base64.b64encode(f"{k}-{i}-not-really-secret".encode()).decode()
                     for k in ("username", "password", "api-token")},
        }))
    for i in range(n_svc):
        app = f"svc-{i % max(n_deploy, 1):04d}"
        out.append((f"manifests/services/svc-{i:04d}.yaml", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i:04d}", "labels": labels(app, "network")},
            "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": app},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                               {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]},
        }))
    for i in range(n_deploy):
        app = f"svc-{i:04d}"
        sel = {"app.kubernetes.io/name": app}
        out.append((f"manifests/deployments/deploy-{i:04d}.yaml", {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"deploy-{i:04d}", "labels": labels(app, "workload")},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": sel},
                "template": {
                    "metadata": {"labels": {**labels(app, "workload")}},
                    "spec": {"containers": [{
                        "name": "app", "image": f"registry.example.com/bench/app:1.{i % 7}.0",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "LOG_LEVEL", "value": "info"}],
                        "envFrom": [{"configMapRef": {"name": f"cm-{i % max(n_cm, 1):04d}"}}],
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                      "limits": {"memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                           "periodSeconds": 10},
                    }]},
                },
            },
        }))
    return out


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, objects: list[tuple[str, dict]]) -> tuple[str, Path]:
    """A bare repo (the remote) and its work tree; returns (file:// URL, manifests dir on disk)."""
    bare, work = root / "remote.git", root / "work"
    root.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    git("init", "-q", "-b", "main", str(work), cwd=root)
    for rel, obj in objects:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", f"{len(objects)} objects", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    return f"file://{bare}", work / "manifests"


# ---------------------------------------------------------------- the apiserver's own counters

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ApiMetrics:
    """Scrapes apiserver_request_total from /metrics with the admin client certificate."""

    def __init__(self, cluster: tb.Cluster) -> None:
        pki = cluster.dir / "pki"
        self.url = cluster.server + "/metrics"
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def snapshot(self) -> dict[tuple, float]:
        with urllib.request.urlopen(self.url, context=self.ctx, timeout=30) as resp:
            text = resp.read().decode()
        out: dict[tuple, float] = {}
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            lab = dict(_LABEL.findall(labels))
            key = (lab.get("verb", ""), lab.get("resource", ""), lab.get("subresource", ""),
                   lab.get("dry_run", ""))
            out[key] = out.get(key, 0.0) + float(value)
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[tuple, int]:
        return {k: int(after.get(k, 0) - before.get(k, 0)) for k in after
                if after.get(k, 0) - before.get(k, 0) > 0}

    @staticmethod
    def split(delta: dict[tuple, int]) -> tuple[int, int, dict[str, int], dict[str, int]]:
        """(tool-like requests, controller-like requests, tool requests by verb, every request by verb+resource)."""
        tool = ctl = 0
        by_verb: dict[str, int] = {}
        detail: dict[str, int] = {}
        for (verb, resource, sub, dry), n in delta.items():
            # Non-resource requests (discovery, /openapi) have the path in `subresource`.
            # POST configmaps: gitopsd's audit trail segment (controllers create ConfigMaps only with a
            # new namespace, which happens outside the measured windows).
            is_tool = (verb in TOOL_VERBS or (verb, resource) == ("POST", "configmaps")) and \
                (resource == "" or sub == "") and resource not in BACKGROUND_RESOURCES
            name = verb + (" dry-run" if dry else "") if resource else f"{verb} {sub}"
            if is_tool:
                tool += n
                by_verb[name] = by_verb.get(name, 0) + n
            else:
                ctl += n
            full = f"{name} {resource}{'/' + sub if resource and sub else ''}".strip()
            detail[full] = detail.get(full, 0) + n
        return tool, ctl, by_verb, detail

    def settle(self, *, quiet: int = 3, window: float = 1.0, timeout: float = 60.0) -> float:
        """Wait until a `window` sees at most `quiet` requests; returns the seconds waited."""
        start = time.monotonic()
        prev = sum(self.snapshot().values())
        calm = 0
        while time.monotonic() - start < timeout:
            time.sleep(window)
            now = sum(self.snapshot().values())
            calm = calm + 1 if now - prev <= quiet else 0
            prev = now
            if calm >= 2:
                break
        return time.monotonic() - start


# ---------------------------------------------------------------- running one child

@dataclass
class Run:
    tool: str
    scenario: str
    rep: int
    seconds: float
    rss_mib: float
    rc: int
    requests: int = 0              # tool-like, net of the idle rate
    ctl_requests: int = 0          # controller-like, net of the idle rate
    raw_tool: int = 0
    raw_ctl: int = 0
    by_verb: dict = field(default_factory=dict)        # tool-like requests by verb
    by_request: dict = field(default_factory=dict)     # every request in the window, by verb and resource
    inner_seconds: float | None = None    # gitopsd's own duration_seconds (no start-up)
    note: str = ""


TIME_BIN = Path("/usr/bin/time")


def run_children(argvs: list[list[str]], env: dict, workdir: Path) -> tuple[float, float, int, str, str]:
    """Run the commands one after the other, stopping at the first failure.

    Returns (wall seconds of all, the largest peak RSS MiB, the last exit code, stdout, stderr)."""
    seconds, rss, rc, outs, errs = 0.0, 0.0, 0, [], []
    for argv in argvs:
        s, r, rc, out, err = run_child(argv, env, workdir)
        seconds, rss = seconds + s, max(rss, r)
        outs.append(out)
        errs.append(err)
        if rc != 0:
            break
    return seconds, rss, rc, "".join(outs), "".join(errs)


def run_child(argv: list[str], env: dict, workdir: Path) -> tuple[float, float, int, str, str]:
    """Run argv; return (wall seconds, peak RSS MiB, exit code, stdout, stderr)."""
    out_path, err_path, rss_path = workdir / "out", workdir / "err", workdir / "rss"
    use_time = TIME_BIN.exists() and os.access(TIME_BIN, os.X_OK)
    cmd = [str(TIME_BIN), "-f", "%M", "-o", str(rss_path), *argv] if use_time else argv
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kib = float(usage.ru_maxrss)
    if use_time:
        try:
            rss_kib = float(rss_path.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            pass  # fall back to wait4's figure (the max over time and its child)
    return (seconds, rss_kib / 1024.0, proc.returncode, out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"))


# ---------------------------------------------------------------- the benchmark

class Bench:
    def __init__(self, args, cluster: tb.Cluster, tmp: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.tmp = tmp
        self.metrics = ApiMetrics(cluster)
        self.kubectl = str(tb_build.binary("kubectl"))
        self.runs: list[Run] = []
        self.idle_rate_tool = 0.0
        self.idle_rate_ctl = 0.0
        self.idle_window = 0.0
        self.warnings: list[str] = []

    # -- cluster housekeeping (never timed)

    def create_namespace(self, name: str) -> None:
        status, body = tb.request(self.cluster, "POST", "/api/v1/namespaces",
                                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if status not in (201, 409):
            raise RuntimeError(f"creating namespace {name}: {status} {body}")

    def delete_namespace(self, name: str, timeout: float = 180.0) -> None:
        tb.request(self.cluster, "DELETE", f"/api/v1/namespaces/{name}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = tb.request(self.cluster, "GET", f"/api/v1/namespaces/{name}")
            if status == 404:
                return
            time.sleep(0.5)
        self.warnings.append(f"namespace {name} still terminating after {timeout:.0f}s")

    def measure_idle(self, window: float) -> None:
        self.metrics.settle()
        before = self.metrics.snapshot()
        time.sleep(window)
        after = self.metrics.snapshot()
        tool, ctl, _, _ = ApiMetrics.split(ApiMetrics.delta(before, after))
        self.idle_window = window
        self.idle_rate_tool, self.idle_rate_ctl = tool / window, ctl / window

    # -- one measured run

    def measure(self, tool: str, scenario: str, rep: int, argvs: list[list[str]], env: dict,
                ok_codes: tuple[int, ...] = (0,)) -> tuple[Run, str, str]:
        self.metrics.settle()
        before = self.metrics.snapshot()
        seconds, rss, rc, out, err = run_children(argvs, env, self.tmp)
        after = self.metrics.snapshot()
        tool_n, ctl_n, by_verb, detail = ApiMetrics.split(ApiMetrics.delta(before, after))
        run = Run(tool=tool, scenario=scenario, rep=rep, seconds=seconds, rss_mib=rss, rc=rc,
                  raw_tool=tool_n, raw_ctl=ctl_n, by_verb=by_verb, by_request=detail,
                  requests=max(0, round(tool_n - self.idle_rate_tool * seconds)),
                  ctl_requests=max(0, round(ctl_n - self.idle_rate_ctl * seconds)))
        if rc not in ok_codes:
            cmdline = " && ".join(" ".join(a) for a in argvs)
            raise RuntimeError(f"{tool} {scenario} (rep {rep}) exited {rc}; argv: {cmdline}\n"
                               f"stdout (tail):\n{out[-3000:]}\nstderr (tail):\n{err[-3000:]}")
        self.runs.append(run)
        say(f"    {SCENARIO_TITLE[scenario]:<16} {tool:<12} {seconds:7.2f}s  {rss:6.1f} MiB  "
            f"{run.requests:5d} req (+{run.ctl_requests} ctl)  exit {rc}")
        return run, out, err

    def gitopsd(self, scenario: str, rep: int, command: str, url: str, ns: str, cache: Path) -> Run:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), "GITOPSD_CACHE": str(cache)}
        argv = [sys.executable, "-m", "gitopsd", command, "--repo", url, "--ref", "main", "--path", "manifests",
                "--namespace", ns, "--app", APP, "--inventory-namespace", ns, "-o", "json"]
        if command == "sync":
            argv += ["--timeout", "600"]
        run, out, _ = self.measure("gitopsd", scenario, rep, [argv], env)
        doc = json.loads(out)
        run.inner_seconds = doc.get("duration_seconds")
        n = self.args.objects
        if scenario == "initial":
            created = (doc.get("plan") or {}).get("counts", {}).get("create")
            if doc.get("outcome") != "Applied" or created != n:
                raise RuntimeError(f"gitopsd initial sync: outcome {doc.get('outcome')}, {created} created "
                                   f"(wanted Applied, {n}): {doc.get('reason')}")
        elif scenario == "noop":
            if doc.get("outcome") != "NoChange":
                raise RuntimeError(f"gitopsd no-op re-sync: outcome {doc.get('outcome')} (wanted NoChange): "
                                   f"{doc.get('reason')} {doc.get('plan', {}).get('counts')}")
        elif scenario == "diff":
            if not doc.get("in_sync"):
                raise RuntimeError(f"gitopsd diff found drift on an unchanged state: {doc.get('counts')}")
        return run

    def kubectl_run(self, tool: str, scenario: str, rep: int, manifests: Path, ns: str) -> Run:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        verb = "diff" if scenario == "diff" else "apply"
        argvs = [[self.kubectl, verb, "--server-side", "--field-manager=bench", "-n", ns, "-f", str(manifests), "-R"]]
        if tool == "kubectl+wait":
            argvs.append([self.kubectl, "wait", "--for=condition=Available", "deployment", "--all", "-n", ns,
                          "--timeout=600s"])
        # kubectl diff exits 1 on drift: accept it, but say so (it should find none).
        run, out, _ = self.measure(tool, scenario, rep, argvs, env, ok_codes=(0, 1) if verb == "diff" else (0,))
        if verb == "diff" and run.rc == 1:
            run.note = "kubectl diff reported drift"
            self.warnings.append(f"rep {rep}: kubectl diff exited 1 (drift) on an unchanged state:\n"
                                 + "\n".join(out.splitlines()[:20]))
        if verb == "apply" and scenario == "initial":
            applied = sum(1 for line in out.splitlines() if "serverside-applied" in line)
            if applied != self.args.objects:
                raise RuntimeError(f"kubectl applied {applied} objects, wanted {self.args.objects}:\n{out[-2000:]}")
        return run

    # -- the whole thing

    def run(self) -> None:
        a = self.args
        objects = generate(a.objects, a.replicas)
        url, manifests = make_repo(self.tmp / "repo", objects)
        say(f"generated {len(objects)} objects into {url} (deployments: replicas {a.replicas})")
        say(f"measuring the apiserver's idle request rate over {a.idle:.0f}s ...")
        self.measure_idle(a.idle)
        say(f"  idle: {self.idle_rate_tool:.2f} tool-like + {self.idle_rate_ctl:.2f} other requests/s")
        for rep in range(a.repeat):
            ns = {"gitopsd": f"bench-g-{rep}", "kubectl": f"bench-k-{rep}", "kubectl+wait": f"bench-w-{rep}"}
            for name in ns.values():
                self.create_namespace(name)
            cache = self.tmp / f"gitopsd-cache-{rep}"   # cold Git cache for the initial sync
            cache.mkdir()
            say(f"repetition {rep + 1}/{a.repeat} ({'gitopsd' if rep % 2 == 0 else 'the peers'} first)")
            for scenario in SCENARIOS:
                order = TOOLS[scenario] if rep % 2 == 0 else tuple(reversed(TOOLS[scenario]))
                for tool in order:
                    if tool == "gitopsd":
                        self.gitopsd(scenario, rep, "diff" if scenario == "diff" else "sync", url,
                                     ns["gitopsd"], cache)
                    else:
                        self.kubectl_run(tool, scenario, rep, manifests, ns[tool])
            if rep < a.repeat - 1 or a.keep_cluster:
                for name in ns.values():   # free the nodes' pod capacity and the etcd space for the next pair
                    self.delete_namespace(name)

    # -- reporting

    def summary(self) -> dict:
        n = self.args.objects
        rows = {}
        for scenario in SCENARIOS:
            per_tool = {}
            for tool in TOOLS[scenario]:
                runs = [r for r in self.runs if r.scenario == scenario and r.tool == tool]
                if not runs:
                    continue
                sec = statistics.median(r.seconds for r in runs)
                per_tool[tool] = {
                    "seconds": sec, "objects_per_second": n / sec if sec else None,
                    "requests": statistics.median(r.requests for r in runs),
                    "controller_requests": statistics.median(r.ctl_requests for r in runs),
                    "peak_rss_mib": statistics.median(r.rss_mib for r in runs),
                    "runs": len(runs),
                }
            pairs: dict[int, dict[str, Run]] = {}
            for r in self.runs:
                if r.scenario == scenario:
                    pairs.setdefault(r.rep, {})[r.tool] = r
            ratios = {}
            for peer in TOOLS[scenario][1:]:
                ratios[peer] = {}
                for metric, get in (("seconds", lambda r: r.seconds), ("requests", lambda r: r.requests),
                                    ("peak_rss_mib", lambda r: r.rss_mib)):
                    vals = [get(p["gitopsd"]) / get(p[peer]) for p in pairs.values()
                            if "gitopsd" in p and peer in p and get(p[peer])]
                    ratios[peer][metric] = statistics.median(vals) if vals else None
            rows[scenario] = {"tools": per_tool, "ratio_gitopsd_over": ratios}
        return rows

    def table(self, summary: dict) -> str:
        n = self.args.objects
        head = (f"{'scenario':<24} {'tool':<13} {'seconds':>8} {'objects/s':>10} {'requests':>9} "
                f"{'(+ctl)':>7} {'peak RSS MiB':>13}")
        lines = [head, "-" * len(head)]

        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        for scenario in SCENARIOS:
            row = summary[scenario]
            label = f"{SCENARIO_TITLE[scenario]} ({n})"
            for tool in TOOLS[scenario]:
                t = row["tools"].get(tool)
                if not t:
                    continue
                lines.append(f"{label:<24} {tool:<13} {t['seconds']:8.2f} {num(t['objects_per_second'], '10.0f')} "
                             f"{t['requests']:9.0f} {'+' + format(t['controller_requests'], '.0f'):>7} "
                             f"{t['peak_rss_mib']:13.1f}")
            for peer, r in row["ratio_gitopsd_over"].items():
                lines.append(f"{'ratio gitopsd/' + peer:<38} {num(r['seconds'], '8.2f')} {'':>10} "
                             f"{num(r['requests'], '9.2f')} {'':>7} {num(r['peak_rss_mib'], '13.2f')}")
            lines.append("")
        lines.append(f"medians of {self.args.repeat} runs per tool, order alternated; ratios are medians of the "
                     f"per-repetition ratios")
        lines.append("requests: GET/LIST/APPLY/PATCH/DELETE + discovery, as counted by the apiserver during the run; "
                     "(+ctl): POST/PUT/status/WATCH by the controllers meanwhile")
        lines.append(f"idle background over {self.idle_window:.0f}s: {self.idle_rate_tool:.2f} + "
                     f"{self.idle_rate_ctl:.2f} requests/s (subtracted)")
        lines.append("kubectl+wait: kubectl apply --server-side, then kubectl wait --for=condition=Available "
                     "deployment --all (gitopsd sync also waits for health)")
        for scenario in ("initial", "noop"):
            gi = [r.inner_seconds for r in self.runs if r.tool == "gitopsd" and r.inner_seconds is not None
                  and r.scenario == scenario]
            gw = [r.seconds for r in self.runs if r.tool == "gitopsd" and r.scenario == scenario]
            if gi and gw:
                lines.append(f"gitopsd {SCENARIO_TITLE[scenario]}: {statistics.median(gi):.2f}s inside sync() of "
                             f"{statistics.median(gw):.2f}s wall (the rest: interpreter start-up, imports, "
                             f"connect, audit record)")
        lines.append("requests by verb (medians):")
        for scenario in SCENARIOS:
            for tool in TOOLS[scenario]:
                runs = [r for r in self.runs if r.scenario == scenario and r.tool == tool]
                names = sorted({v for r in runs for v in r.by_verb})
                medians = [(v, statistics.median(r.by_verb.get(v, 0) for r in runs)) for v in names]
                parts = ", ".join(f"{v} {m:g}" for v, m in medians if m)
                if runs:
                    lines.append(f"  {scenario + '/' + tool:<22} {parts}")
        return "\n".join(lines)


def versions(kubectl: str) -> dict:
    out = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        from importlib.metadata import version
        out["gitopsd"] = version("gitopsd")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        doc = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True,
                                        text=True, timeout=30).stdout)
        out["kubectl"] = doc["clientVersion"]["gitVersion"]
    except Exception:  # noqa: BLE001
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=500, help="objects per sync (default 500)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and scenario; the median is shown (default 3)")
    p.add_argument("--replicas", type=int, default=0, choices=[0, 1],
                   help="Deployment replicas: 0 (default) measures apply cost only; 1 brings KWOK pods up "
                        "(the nodes hold 330 pods, 3 namespaces of N/10 each run at once: keep --objects <= 1000)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures (and every run) to FILE")
    p.add_argument("--cluster", default="bench", help="cluster name (default bench; started and stopped here)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle baseline (default 10)")
    p.add_argument("--keep-cluster", action="store_true",
                   help="leave the cluster running at the end (for iterating; then `hack/cluster down NAME`)")
    args = p.parse_args(argv)
    if args.cluster == "dev" or args.cluster.startswith("pytest-"):
        p.error(f"refusing to use cluster {args.cluster!r}: it belongs to someone else")
    if args.objects < 10 or args.repeat < 1:
        p.error("--objects must be >= 10 and --repeat >= 1")

    started = time.monotonic()
    say(f"starting cluster {args.cluster!r} ...")
    try:
        cluster = tb.up(args.cluster, out=sys.stderr)
    except tb.ClusterError as exc:   # seen once on the shared machine: etcd gone before /health; retry once
        say(f"cluster {args.cluster!r} did not start ({str(exc).splitlines()[0]}); retrying once")
        cluster = tb.up(args.cluster, out=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="gitopsd-bench-"))
    try:
        bench = Bench(args, cluster, tmp)
        try:
            bench.run()
        except BaseException:
            if bench.runs:   # what was measured before the failure, for the record
                say("PARTIAL results before the failure:\n" + bench.table(bench.summary()))
            raise
        summary = bench.summary()
        table = bench.table(summary)
        when = dt.datetime.now().astimezone()
        print(f"gitopsd vs kubectl apply --server-side, {args.objects} objects, replicas {args.replicas}, "
              f"{when:%Y-%m-%d}, {os.cpu_count()} cores\n")
        print(table)
        for w in bench.warnings:
            print(f"warning: {w}")
        if args.json:
            doc = {"date": when.isoformat(timespec="seconds"), "objects": args.objects, "replicas": args.replicas,
                   "repeat": args.repeat, "versions": versions(bench.kubectl),
                   "idle": {"window_seconds": bench.idle_window, "tool_requests_per_second": bench.idle_rate_tool,
                            "other_requests_per_second": bench.idle_rate_ctl},
                   "summary": summary, "runs": [asdict(r) for r in bench.runs], "warnings": bench.warnings,
                   "elapsed_seconds": round(time.monotonic() - started, 1)}
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            say(f"wrote {args.json}")
        say(f"benchmark took {time.monotonic() - started:.0f}s")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if args.keep_cluster:
            say(f"cluster {args.cluster!r} left running: hack/cluster down {args.cluster}")
        else:
            tb.down(args.cluster)
            say(f"cluster {args.cluster!r} stopped")


if __name__ == "__main__":
    sys.exit(main())
