"""Start, stop and describe named local control planes.

A cluster is a state directory (`$GITOPSD_CACHE/clusters/<name>/`) holding
certificates, an etcd data dir, one log per component, `pids.json` and a
kubeconfig. Processes run in their own sessions so they outlive the command
that started them; `down` stops them by the PIDs it recorded (after checking
that each PID still runs one of *our* binaries), never by name.

Every address is loopback and every port is picked free at start, so several
clusters (say, a developer's and a test run's) can run side by side.

The test bed's Prometheus (prometheus.py) keeps its files in the same state
directory (`prometheus/`) but has a lifecycle of its own: it needs no
apiserver, a (re)start of the control plane leaves it running, and `down`
stops both.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import build, procs, stages

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
NODE_ZONES = ("zone-a", "zone-b", "zone-c")
START_TIMEOUT = 120.0
# Subdirectories of a cluster's state dir that belong to processes with a
# lifecycle of their own: (re)starting the control plane keeps them, `down`
# stops them too.
PROMETHEUS_SUBDIR = "prometheus"
OTHER_TENANTS = (PROMETHEUS_SUBDIR,)


class ClusterError(RuntimeError):
    """A cluster could not start or answer; the message carries a log tail."""


def clusters_dir() -> Path:
    return build.cache_dir() / "clusters"


def state_dir(name: str) -> Path:
    return clusters_dir() / name


def kubeconfig_path(name: str) -> Path:
    return state_dir(name) / "kubeconfig"


@dataclass
class Cluster:
    """A running (or recorded) cluster: where its files are and what it runs."""

    name: str
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return state_dir(self.name)

    @property
    def kubeconfig(self) -> Path:
        return kubeconfig_path(self.name)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def log(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def audit_events(self) -> list[dict]:
        """The apiserver's audit log: one dict per write request (see the policy in up())."""
        path = self.log("audit")
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def log_tail(self, component: str, lines: int = 30) -> str:
        return procs.tail(self.log(component), lines)

    def save(self) -> None:
        (self.dir / "pids.json").write_text(json.dumps({"pids": self.pids, "ports": self.ports}, indent=2))

    @classmethod
    def load(cls, name: str) -> "Cluster | None":
        path = state_dir(name) / "pids.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(name=name, pids=data["pids"], ports=data["ports"])

    def alive(self) -> dict[str, bool]:
        return {comp: procs.is_ours(pid, self.dir) for comp, pid in self.pids.items()}


# ---------------------------------------------------------------- helpers

def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _make_certs(pki: Path) -> None:
    """CA, apiserver serving cert, admin client cert, service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=gitopsd-testbed-ca", cwd=pki)
    (pki / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=pki)
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "serving.ext", cwd=pki)
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "admin.key", "-out", "admin.csr",
             "-subj", "/O=system:masters/CN=admin", cwd=pki)
    _openssl("x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "admin.crt", "-days", "3650", "-extfile", "client.ext", cwd=pki)
    # The apiserver's client certificate towards kubelets (logs, exec, port-forward
    # of a real node, node.py); KWOK's fake kubelet API does not check it.
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver-kubelet-client.key",
             "-out", "apiserver-kubelet-client.csr", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
             cwd=pki)
    _openssl("x509", "-req", "-in", "apiserver-kubelet-client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "apiserver-kubelet-client.crt", "-days", "3650", "-extfile", "client.ext",
             cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _write_kubeconfig(path: Path, server: str, pki: Path, name: str) -> None:
    # Plain JSON is valid YAML; no YAML library needed here.
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": f"{name}-admin", "user": {
            "client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}],
        "current-context": name,
    }
    path.write_text(json.dumps(cfg, indent=2))


def _subject(user: str, groups) -> str:
    """An openssl -subj for a client certificate: one O= per group (the
    apiserver reads every O as a group), CN = the user name."""
    def esc(value: str) -> str:
        if not value or any(ord(ch) < 32 for ch in value):
            raise ValueError(f"a certificate name must be non-empty printable text, got {value!r}")
        for ch in "\\/=+,":
            value = value.replace(ch, "\\" + ch)
        return value
    return "".join(f"/O={esc(g)}" for g in groups) + f"/CN={esc(user)}"


def mint_client_cert(cluster: "Cluster | str", *, user: str, groups=("system:masters",),
                     days: int = 365) -> tuple[bytes, bytes]:
    """A NEW client certificate for `user` in `groups`, signed by the cluster's CA.

    Returns (certificate PEM, private key PEM). Every call makes a fresh key
    and a random serial; nothing is written to the cluster's pki dir.
    """
    if isinstance(groups, str):  # ("system:masters") is a str, not a one-group tuple
        groups = (groups,)
    name = cluster if isinstance(cluster, str) else cluster.name
    pki = state_dir(name) / "pki"
    if not (pki / "ca.key").exists():
        raise ClusterError(f"no CA for cluster {name!r} ({pki / 'ca.key'} is missing): is it up?")
    subj = _subject(user, groups)
    with tempfile.TemporaryDirectory(prefix="tb-client-") as tmp:
        work = Path(tmp)
        (work / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
                 "-subj", subj, cwd=work)
        # A random 127-bit serial instead of -CAcreateserial: no shared ca.srl to race on.
        _openssl("x509", "-req", "-in", "client.csr", "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
                 "-set_serial", str(secrets.randbits(127) | 1), "-out", "client.crt", "-days", str(days),
                 "-extfile", "client.ext", cwd=work)
        return (work / "client.crt").read_bytes(), (work / "client.key").read_bytes()


def client_kubeconfig(cluster: "Cluster | str", *, user: str, groups=("system:masters",),
                      context: str | None = None) -> dict:
    """A self-contained kubeconfig (a dict) for a NEW client certificate of `user`.

    The certificate (CN=user, one O= per group) is minted by
    mint_client_cert(): each call has its own key and serial. CA, certificate
    and key are inline (`certificate-authority-data`, `client-certificate-data`,
    `client-key-data`, base64), with no file paths and no exec plugin, so the
    result can be stored in a Secret and read anywhere. The server is the
    cluster's https URL; one context, named `context` or the cluster's name,
    is the current one.
    """
    c = Cluster.load(cluster) if isinstance(cluster, str) else cluster
    if c is None or "apiserver" not in c.ports:
        raise ClusterError(f"cluster {cluster!r} has no recorded apiserver port: is it up?")
    cert, key = mint_client_cert(c, user=user, groups=groups)
    ca = (c.dir / "pki" / "ca.crt").read_bytes()
    ctx = context or c.name

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": ctx, "cluster": {"server": c.server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": f"{user}@{ctx}", "user": {"client-certificate-data": b64(cert),
                                                       "client-key-data": b64(key)}}],
        "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": f"{user}@{ctx}"}}],
        "current-context": ctx,
    }


def inline_kubeconfig_yaml(cluster: "Cluster | str", *, user: str, groups=("system:masters",),
                           context: str | None = None) -> str:
    """client_kubeconfig() as kubeconfig file text (JSON, which is valid YAML),
    e.g. for a Secret's `value` key."""
    return json.dumps(client_kubeconfig(cluster, user=user, groups=groups, context=context), indent=2) + "\n"


def _ssl_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def request(cluster: Cluster, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    """One admin request to the apiserver (stdlib only, for the test bed itself)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(cluster.server + path, method=method, data=data)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=_ssl_context(cluster.dir / "pki"), timeout=10) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def _start(cluster: Cluster, component: str, argv: list[str]) -> None:
    cluster.pids[component] = procs.spawn(argv, log=cluster.log(component), cwd=cluster.dir)
    cluster.save()


def _wait(cluster: Cluster, what: str, component: str, check, timeout: float = START_TIMEOUT) -> None:
    procs.wait_until(what, name=component, pid=cluster.pids[component], owner=cluster.dir,
                     log=cluster.log(component), check=check, timeout=timeout, error=ClusterError)


def _node(name: str, zone: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "type": "kwok", "topology.kubernetes.io/zone": zone,
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
        },
    }


# ---------------------------------------------------------------- verbs

def up(name: str = "default", *, nodes: int = 3, out=None) -> Cluster:
    """Start a cluster and return once /readyz is ok and every node is Ready.

    A cluster that is already up is returned as it is; a half-dead one is
    stopped and started afresh. A Prometheus running under the same name
    (prometheus.py) is left running: it does not depend on the apiserver.
    """
    say = (lambda msg: print(msg, file=out, flush=True)) if out else (lambda msg: None)
    from . import node  # imports this module

    existing = Cluster.load(name)
    if existing and existing.pids and all(existing.alive().values()):
        say(f"cluster {name!r} already up")
        return existing
    if existing:
        node.down(name)   # a real node belongs to the old CA and apiserver
        stop_processes(existing)

    started = time.monotonic()
    # Ports are picked free but bound later by the components: on a shared
    # machine another process can take one in between. One retry with fresh
    # ports (and a clean state dir) absorbs that race.
    for attempt in (1, 2):
        cluster = Cluster(name=name)
        _clear(cluster.dir)
        (cluster.dir / "logs").mkdir(parents=True)
        pki = cluster.dir / "pki"
        _make_certs(pki)
        cluster.ports = {k: procs.free_port() for k in ("etcd", "etcd-peer", "apiserver", "controller-manager",
                                                   "scheduler", "kwok")}
        cluster.save()
        _write_kubeconfig(cluster.kubeconfig, cluster.server, pki, name)
        try:
            _start_components(cluster, nodes=nodes, say=say)
            break
        except ClusterError as exc:
            stop_processes(cluster)  # never leave processes behind
            if attempt == 2:
                raise
            say(f"  start failed ({str(exc).splitlines()[0]}); retrying once with fresh ports")
        except BaseException:
            stop_processes(cluster)
            raise
    say(f"cluster {name!r} up in {time.monotonic() - started:.1f}s; kubeconfig: {cluster.kubeconfig}")
    return cluster


def _start_components(cluster: Cluster, *, nodes: int, say) -> None:
    d, pki, p = cluster.dir, cluster.dir / "pki", cluster.ports
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    _start(cluster, "etcd", [
        str(build.binary("etcd")), "--name", "default", "--data-dir", str(d / "etcd"),
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", f"http://127.0.0.1:{p['etcd-peer']}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{p['etcd-peer']}",
        "--initial-cluster", f"default=http://127.0.0.1:{p['etcd-peer']}",
        "--unsafe-no-fsync", "--log-level", "warn",
    ])

    def etcd_ok():
        with urllib.request.urlopen(f"{etcd_url}/health", timeout=2) as r:
            body = r.read().decode()
            return '"true"' in body, body
    _wait(cluster, "etcd /health", "etcd", etcd_ok)
    say("  etcd ready")

    # Audit every write (metadata only): the independent record of who wrote
    # what, by user agent, that tests use to prove "no writes in steady state".
    (d / "audit-policy.yaml").write_text(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
        "  - level: Metadata\n    verbs: [create, update, patch, delete, deletecollection]\n"
        "  - level: None\n")
    _start(cluster, "kube-apiserver", [
        str(build.binary("kube-apiserver")),
        f"--etcd-servers={etcd_url}", f"--cert-dir={d / 'apiserver-certs'}",
        f"--secure-port={p['apiserver']}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}", "--authorization-mode=RBAC",
        f"--service-cluster-ip-range={SERVICE_CIDR}", f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--allow-privileged=true", "--endpoint-reconciler-type=none", "--v=1",
        # For a real kubelet (node.py): authenticate to it with a client cert,
        # and reach it at its InternalIP (its Hostname address does not resolve),
        # as kubeadm configures it.
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP,Hostname,InternalDNS,ExternalDNS,ExternalIP",
        f"--audit-policy-file={d / 'audit-policy.yaml'}", f"--audit-log-path={cluster.log('audit')}",
        "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
    ])

    def readyz():
        status, body = request(cluster, "GET", "/readyz")
        return status == 200, f"/readyz {status}: {str(body)[-200:]}"
    _wait(cluster, "kube-apiserver /readyz", "kube-apiserver", readyz)
    say("  kube-apiserver ready")

    kubeconfig = str(cluster.kubeconfig)
    _start(cluster, "kube-controller-manager", [
        str(build.binary("kube-controller-manager")), f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        "--leader-elect=false", f"--secure-port={p['controller-manager']}", "--bind-address=127.0.0.1",
        "--controllers=*", "--use-service-account-credentials=false", "--v=1",
        # 1.37's beta stale-cache checks make a controller drop a sync when its
        # informer lags its own last write and retry with per-object exponential
        # backoff; on a loaded 2-core machine that left a ReplicaSet's ready
        # count stale for over a minute. Off here, for a test bed that reacts
        # like a quiet cluster.
        "--feature-gates=" + ",".join(f"StaleControllerConsistency{k}=false"
                                      for k in ("ReplicaSet", "DaemonSet", "StatefulSet", "Job", "HPA")),
        # KWOK renews the fake nodes' Leases every 10 s; on a loaded 2-core
        # machine a renewal can lag, and past the default 40-50 s grace every
        # node goes NotReady and every pod with it, failing unrelated health
        # waits. The test bed never tests node failure: five minutes.
        "--node-monitor-grace-period=300s",
    ])
    _start(cluster, "kube-scheduler", [
        str(build.binary("kube-scheduler")), f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
        "--leader-elect=false", f"--secure-port={p['scheduler']}", "--bind-address=127.0.0.1", "--v=1",
    ])
    try:
        configs = stages.configs(d)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ClusterError(str(exc)) from None
    _start(cluster, "kwok", [
        str(build.binary("kwok")), f"--kubeconfig={kubeconfig}", "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--server-address=127.0.0.1:{p['kwok']}", "--node-ip=127.0.0.1",
        # Node Leases, renewed every 10 s (a quarter of the duration), as a
        # kubelet keeps them. The flag's default is 0 = no Leases (KWOK's 40 s
        # default applies only through a KwokConfiguration): the nodes'
        # only heartbeat was then the status update of the heartbeat stage,
        # every 10-20 minutes, past the controller-manager's grace period,
        # and every node with every pod on it turned NotReady.
        "--node-lease-duration-seconds=40",
        # KWOK's fast stages and ours (hack/testbed/stages.py: :crashloop, :pullfail, :slow-ready).
        *[f"--config={c}" for c in configs],
    ])

    for i in range(nodes):
        status, body = request(cluster, "POST", "/api/v1/nodes", _node(f"kwok-node-{i}", NODE_ZONES[i % 3]))
        if status not in (201, 409):
            raise ClusterError(f"creating node kwok-node-{i} failed ({status}): {body}")

    def nodes_ready():
        status, body = request(cluster, "GET", "/api/v1/nodes")
        if status != 200:
            return False, f"list nodes {status}"
        ready = [n["metadata"]["name"] for n in body["items"]
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))]
        return len(ready) >= nodes, f"{len(ready)}/{nodes} nodes Ready"
    _wait(cluster, "fake nodes Ready", "kwok", nodes_ready)
    say(f"  {nodes} kwok nodes Ready")

    def default_sa():
        # The controller-manager's serviceaccount controller runs once this exists.
        status, _ = request(cluster, "GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return status == 200, f"default ServiceAccount {status}"
    _wait(cluster, "controller-manager (default ServiceAccount)", "kube-controller-manager", default_sa)
    say("  kube-controller-manager and kube-scheduler running")


def stop_processes(cluster: Cluster, *, grace: float = 10.0) -> list[str]:
    """SIGTERM every recorded process that is still ours, then SIGKILL stragglers."""
    # Reverse start order: clients before the apiserver, the apiserver before etcd.
    return procs.stop(cluster.pids, owner=cluster.dir, grace=grace)


def _clear(state: Path) -> None:
    """Remove the control plane's files from a state dir, keeping what
    OTHER_TENANTS run there."""
    if not state.exists():
        return
    for entry in state.iterdir():
        if entry.name in OTHER_TENANTS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def down(name: str = "default") -> list[str]:
    """Stop every process started under the name (the control plane and the
    test bed's Prometheus) and remove its state directory."""
    from . import node, prometheus  # import this module; imported late to keep the cycle out of load time

    stopped = [f"node: {what}" for what in node.down(name)]   # first: it unmounts what it mounted here
    stopped += prometheus.down(name)
    cluster = Cluster.load(name)
    stopped = (stop_processes(cluster) if cluster else []) + stopped
    shutil.rmtree(state_dir(name), ignore_errors=True)
    return stopped


def status(name: str | None = None) -> list[dict]:
    """Each named cluster's processes, and its Prometheus and real node when started."""
    from . import node, prometheus

    names = [name] if name else sorted(p.name for p in clusters_dir().glob("*") if p.is_dir()) \
        if clusters_dir().exists() else []
    result = []
    for n in names:
        c = Cluster.load(n)
        entry: dict = {"name": n, "state": "absent"}
        if c is not None:
            alive = c.alive()
            state = "up" if alive and all(alive.values()) else ("down" if not any(alive.values()) else "degraded")
            entry = {"name": n, "state": state, "server": c.server if "apiserver" in c.ports else None,
                     "kubeconfig": str(c.kubeconfig),
                     "components": {comp: {"pid": c.pids[comp], "running": ok} for comp, ok in alive.items()}}
        if (prom := prometheus.status(n)) is not None:
            entry["prometheus"] = prom
        if (real := node.status(n)) is not None:
            entry["node"] = real
        result.append(entry)
    return result


# ---------------------------------------------------------------- faults
#
# The fault tests (tests/test_faults.py) stop, kill and restart single
# components of a running cluster. A component is started again with the very
# command line it ran with (read from /proc before the kill and kept in
# argv.json), so a restarted apiserver binds the same port and a restarted
# etcd reuses its data dir: clients reconnect as they would in production.

def _argv_file(cluster: Cluster) -> Path:
    return cluster.dir / "argv.json"


def component_argv(cluster: Cluster, component: str) -> list[str]:
    """The command line `component` runs with; remembered for start_component()."""
    path = _argv_file(cluster)
    saved = json.loads(path.read_text()) if path.exists() else {}
    pid = cluster.pids[component]
    if procs.is_ours(pid, cluster.dir):
        saved[component] = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        path.write_text(json.dumps(saved, indent=2))
    if component not in saved:
        raise ClusterError(f"{component} is not running and its command line was never recorded")
    return saved[component]


def is_running(cluster: Cluster, component: str) -> bool:
    return procs.is_ours(cluster.pids[component], cluster.dir)


def is_paused(cluster: Cluster, component: str) -> bool:
    """True while the component is stopped by SIGSTOP (state T)."""
    try:
        stat = Path(f"/proc/{cluster.pids[component]}/stat").read_text()
    except FileNotFoundError:
        return False
    return is_running(cluster, component) and stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _signal(cluster: Cluster, component: str, sig: signal.Signals) -> None:
    pid = cluster.pids[component]
    if not procs.is_ours(pid, cluster.dir):
        raise ClusterError(f"{component} (pid {pid}) is not running")
    os.kill(pid, sig)


def pause(cluster: Cluster, component: str) -> None:
    """SIGSTOP: the process keeps its sockets (connections are accepted by the
    kernel) but answers nothing until resume()."""
    component_argv(cluster, component)
    _signal(cluster, component, signal.SIGSTOP)


def resume(cluster: Cluster, component: str) -> None:
    _signal(cluster, component, signal.SIGCONT)


def kill(cluster: Cluster, component: str, *, timeout: float = 10.0) -> None:
    """SIGKILL (no clean shutdown) and wait until the process is gone."""
    component_argv(cluster, component)
    pid = cluster.pids[component]
    _signal(cluster, component, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while procs.is_ours(pid, cluster.dir):
        procs.reap(pid)
        if time.monotonic() > deadline:
            raise ClusterError(f"{component} (pid {pid}) still runs {timeout:.0f}s after SIGKILL")
        time.sleep(0.02)
    procs.reap(pid)


def _ready_check(cluster: Cluster, component: str):
    """What "ready" means for a restarted component."""
    if component == "etcd":
        url = f"http://127.0.0.1:{cluster.ports['etcd']}/health"

        def etcd_ok():
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode()
                return '"true"' in body, body
        return etcd_ok
    if component == "kube-apiserver":
        def readyz():
            status, body = request(cluster, "GET", "/readyz")
            return status == 200, f"/readyz {status}: {str(body)[-200:]}"
        return readyz
    port = cluster.ports[{"kube-controller-manager": "controller-manager", "kube-scheduler": "scheduler"}
                         .get(component, component)]

    def listening():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True, f"port {port} open"
    return listening


def start_component(cluster: Cluster, component: str, *, timeout: float = START_TIMEOUT) -> None:
    """Start a stopped component again with its recorded command line; return once it is ready."""
    if is_running(cluster, component):
        raise ClusterError(f"{component} is already running (pid {cluster.pids[component]})")
    _start(cluster, component, component_argv(cluster, component))
    _wait(cluster, f"restarted {component}", component, _ready_check(cluster, component), timeout=timeout)


def restart(cluster: Cluster, component: str) -> None:
    """SIGKILL the component, then start it again and wait until it is ready."""
    kill(cluster, component)
    start_component(cluster, component)


def heal(cluster: Cluster) -> list[str]:
    """Put every component back: resume the paused, start the dead (in start
    order, each waited on until ready). Returns what it did, e.g. ['resumed etcd']."""
    done = []
    for component in list(cluster.pids):
        if is_paused(cluster, component):
            resume(cluster, component)
            done.append(f"resumed {component}")
        elif not is_running(cluster, component):
            start_component(cluster, component)
            done.append(f"started {component}")
    if done:
        _wait(cluster, "kube-apiserver /readyz after healing", "kube-apiserver",
              _ready_check(cluster, "kube-apiserver"))
    return done
