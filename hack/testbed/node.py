"""A real node for a test-bed cluster: kubelet, containerd, runc, a CNI bridge.

`up(cluster)` starts, next to a cluster's KWOK fake nodes, one real node named
`real-node` (by default) that runs real containers:

- **kubelet v1.37.2**, built from the control plane's wrapper module
  (build.py, step `kubelet`, on demand), with a KubeletConfiguration file.
  It authenticates with a client certificate for `system:node:<node>` in
  group `system:nodes` (cluster.mint_client_cert). The test bed's apiserver
  authorizes with RBAC only (no Node authorizer), so `up` binds the
  built-in ClusterRole `system:node` to that one user. The node registers
  with the taint `gitopsd.dev/real-node=true:NoSchedule`, so the suite's
  other workloads (made for KWOK nodes, with images that do not exist) never
  land on it; a pod meant for it tolerates the taint and selects
  `kubernetes.io/hostname: <node>`. KWOK only manages nodes annotated
  `kwok.x-k8s.io/node=fake`; this one is not.
- **containerd 1.6.20 and runc 1.1.5 from Debian**, started by us with their
  own config, root, state, socket and runc root under the node's state dir,
  never the system's /run/containerd socket. kubelet 1.37 works with
  containerd 1.6: the only thing 1.6 lacks is the RuntimeConfig RPC, and the
  kubelet then falls back to `cgroupDriver` from its config (its log says
  "CRI implementation should be updated to support RuntimeConfig"; the
  metric says support ends in 1.38).
- **Pod network**: the CNI `bridge` plugin (containernetworking-plugins
  1.1.1) with `host-local` IPAM on a bridge of its own (`gtb<hash>`, subnet
  10.244.<n>.0/24, the first free <n>). Pods get their own network namespace
  and IP (not hostNetwork). The bridge's gateway address (10.244.<n>.1) is
  put on the bridge by `up`, not by the plugin: with `isGateway` the plugin
  also turns on `net.ipv4.ip_forward` machine-wide, which this node never
  needs (pods only talk to this host), so it stays off; no masquerade
  either. Pods reach nothing outside the machine.
- **The kubelet's address** is that gateway (kubelet refuses a loopback node
  IP): it serves its API (logs, exec) on 10.244.<n>.1:<free port>, which
  only this machine and its pods can reach. The apiserver reaches it with
  the client certificate cluster.py gives it (`--kubelet-client-certificate`,
  in group system:masters) and `--kubelet-preferred-address-types=InternalIP,
  Hostname` (as kubeadm sets it: the node's Hostname address does not
  resolve); the kubelet checks that certificate against the cluster CA and
  authorizes with SubjectAccessReviews (webhook), as a production node does.
  A cluster started before these flags existed is refused with a hint.

How a pod reaches the apiserver
-------------------------------
In-cluster clients use KUBERNETES_SERVICE_HOST/PORT, which the kubelet sets to
the `kubernetes` Service's ClusterIP 10.0.0.1:443, plus the ServiceAccount
token and ca.crt it projects. The apiserver listens on 127.0.0.1 only and
runs with `--endpoint-reconciler-type=none`. kube-proxy cannot route to it:
an EndpointSlice may not hold a loopback address (API validation), the
apiserver has one --bind-address, and binding it to 0.0.0.0 would expose it
beyond the machine. So `up` installs the one rule kube-proxy would install for
that Service, pointed at where the apiserver really listens: an nftables
table of its own (`ip gitopsd_<bridge>`), whose prerouting NAT chain
DNATs `iifname <bridge> ip daddr 10.0.0.1 tcp dport 443` to
127.0.0.1:<apiserver port>, with `net.ipv4.conf.<bridge>.route_localnet=1`
(only on this bridge) so the kernel delivers a packet from the bridge to a
loopback address and lets the replies out. The apiserver's certificate
already names 10.0.0.1, so TLS verifies as in a real cluster.
`expose(cluster, port)` adds the same kind of rule for any other loopback
service (a Git server, say): pods then reach 127.0.0.1:<port> at
<gateway>:<port>. Nothing else in the machine's netfilter is touched;
`down` deletes the table.

cgroups (why v1, and why not v2)
--------------------------------
The VM mounts cgroups hybrid: v1 hierarchies for cpu, cpuacct, cpuset,
memory, devices, freezer, blkio, pids (and name=systemd) under
/sys/fs/cgroup, and an empty cgroup2 at /sys/fs/cgroup/unified. Moving the
controllers to v2 at run time would need every v1 hierarchy to have no child
cgroups, and the memory hierarchy does have them: PID 1 (/process_api, the
machine's own supervisor) puts every command it runs into
memory:/process_api/<id> (`cat /proc/self/cgroup`); that is the machinery
running these sessions, and unmounting or emptying its hierarchy is not ours
to do. A controller stays bound to its v1 hierarchy while any cgroup exists
in it, removed ones included: /proc/cgroups counted 41, later 141, memory
cgroups while only 5 directories existed (removed memory cgroups linger,
"dying", until the page cache they were charged for is reclaimed). So
memory cannot move to v2 while this machine runs, and a v2 kubelet/runc
without the memory controller is no node (`cgroup_no_v1=` is a boot
parameter, and the firecracker VM's command line is not ours). (podman
also makes `libpod_parent` cgroups in the v1 hierarchies.) So the node runs
on cgroup v1 with the kubelet's `failCgroupV1: false`: kubelet 1.37 still
supports v1 when told to. With the default (true) it exits at once:
"failed to validate kubelet configuration, error: kubelet is configured to
not run on a host using cgroup v1. cgroup v1 support is unsupported and
will be removed in a future release". runc 1.1.5 sees hybrid mode and uses v1 (plus the unified
hierarchy for its own bookkeeping). cgroupDriver is `cgroupfs` (PID 1 is not
systemd). The kubelet's cgroupRoot is `/gitopsd-node-<cluster>` in each
hierarchy, made by `up` (cpuset.cpus/mems copied from the root) and removed
by `down`, so pods live in a subtree of their own, beside (never inside) the
supervisor's cgroups.

Machine settings the kubelet changes
------------------------------------
At start the kubelet sets vm.overcommit_memory=1, vm.panic_on_oom=0,
kernel.panic=10 and kernel.panic_on_oops=1 (its setupKernelTunables; the
alternative, protectKernelDefaults, only refuses to start instead). `up`
records their values before (in $GITOPSD_CACHE/node-sysctls.json, shared by
the nodes of several clusters), and the `down` of the last running node puts
them back.

Images
------
No registry is reachable, so nothing is ever pulled. The pod sandbox image
is a tiny static Go "pause" (hack/testbed/images/pause: sleeps, reaps
children, exits on SIGTERM), packed as an OCI archive by images.py, imported
with `ctr -n k8s.io images import` and named as containerd's sandbox_image
before the kubelet starts. `import_image(cluster, archive)` imports any OCI
or docker archive (`podman save`, `buildah push oci-archive:`, images.py) and
returns the names it now has; pods use them with imagePullPolicy Never or
IfNotPresent.

Files and processes
-------------------
Everything lives in `<cluster state dir>/node/`: pki, kubeconfig,
kubelet.yaml, containerd.toml, the kubelet root dir, pod logs, containerd's
root/state, runc's root, CNI config and IPAM state, logs/ and `node.json`
(pids, ports, addresses, timings, saved sysctls). containerd and the
kubelet run in their own sessions and are stopped by recorded PID after the
same is-it-ours check as the control plane's (procs.py). `down` stops the
kubelet, kills the node's containers through containerd, stops containerd,
kills any containerd shim left whose command line names the node's socket
(checked per PID) and anything still running in the node's cgroups (only its
containers live there), unmounts everything mounted under the node dir (pod
volumes, the kubelet's rshared bind mount of its root dir, network
namespaces, container root filesystems), deletes the bridge, the nftables
table and the cgroups, removes the kubelet's symlinks in /var/log/containers
(a path fixed in the kubelet) and, when no other node runs, its device-plugin
socket /var/lib/kubelet/device-plugins/kubelet.sock (fixed too) and those
directories when empty, deletes the Node object and the RBAC binding (when
the apiserver still answers), and restores the sysctls. cluster.down()
calls it first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import build, cluster as tb_cluster, images, procs

NODE_NAME = "real-node"
TAINT_KEY = "gitopsd.dev/real-node"
POD_NET = ipaddress.ip_network("10.244.0.0/16")
SERVICE_IP = "10.0.0.1"   # the `kubernetes` Service's ClusterIP: first address of cluster.SERVICE_CIDR
START_TIMEOUT = 120.0
CNI_BIN = Path("/usr/lib/cni")
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "nftables", "iproute2")
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")   # the kubelet's fixed symlink dir
# The kubelet's device manager serves its registration socket at this fixed
# path (pluginapi.DevicePluginPath), whatever --root-dir says; no device
# plugin runs here, so nodes of several clusters do not need it to be theirs.
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")


class NodeError(tb_cluster.ClusterError):
    """The node could not start or stop; the message carries log tails."""


def node_dir(cluster_name: str) -> Path:
    return tb_cluster.state_dir(cluster_name) / "node"


def _short(cluster_name: str) -> str:
    return hashlib.sha256(cluster_name.encode()).hexdigest()[:8]


@dataclass
class Node:
    """A running (or recorded) real node of cluster `cluster`."""

    cluster: str
    name: str = NODE_NAME
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    subnet: str = ""
    bridge: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return node_dir(self.cluster)

    @property
    def gateway(self) -> str:
        """The bridge's address: the node's InternalIP, and where pods reach exposed host ports."""
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def cgroup_parent(self) -> str:
        return f"/gitopsd-node-{self.cluster}"

    @property
    def nft_table(self) -> str:
        return f"gitopsd_{self.bridge}"

    def log(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def save(self) -> None:
        data = {k: getattr(self, k) for k in ("name", "pids", "ports", "subnet", "bridge", "sysctls", "timings")}
        (self.dir / "node.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, cluster_name: str) -> "Node | None":
        path = node_dir(cluster_name) / "node.json"
        if not path.exists():
            return None
        return cls(cluster=cluster_name, **json.loads(path.read_text()))

    def alive(self) -> dict[str, bool]:
        return {comp: procs.is_ours(pid, self.dir) for comp, pid in self.pids.items()}


# ---------------------------------------------------------------- small helpers

def _sh(*argv: str, check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _require_tools() -> None:
    missing = [p for p in (CONTAINERD, CTR, RUNC, str(CNI_BIN / "bridge"), str(CNI_BIN / "host-local"),
                           str(CNI_BIN / "loopback")) if not Path(p).exists()]
    missing += [t for t in ("nft", "ip") if shutil.which(t) is None]
    if missing:
        raise NodeError(f"missing {', '.join(missing)}: install the Debian packages "
                        f"{' '.join(DEBIAN_PACKAGES)} (apt-get install -y ...)")
    if os.geteuid() != 0:
        raise NodeError("a real node needs root (containerd, mounts, cgroups, network namespaces)")


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key


def _pick_subnet() -> str:
    """The first 10.244.<n>.0/24 with no address of this machine in it (one per node)."""
    used = _sh("ip", "-4", "-o", "addr", "show").stdout
    for subnet in POD_NET.subnets(new_prefix=24):
        if subnet.network_address == POD_NET.network_address:
            continue
        gw = str(next(subnet.hosts()))
        if f" {gw}/" not in used:
            return str(subnet)
    raise NodeError(f"no free /24 left in {POD_NET}")


def _apiserver_args(c: tb_cluster.Cluster) -> list[str]:
    pid = c.pids.get("kube-apiserver")
    if pid is None or not procs.is_ours(pid, c.dir):
        raise NodeError(f"cluster {c.name!r} has no running kube-apiserver: `hack/cluster up {c.name}` first")
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _request(c: tb_cluster.Cluster, method: str, path: str, body: dict | None = None, ok=(200, 201)) -> dict:
    status, data = tb_cluster.request(c, method, path, body)
    if status not in ok:
        raise NodeError(f"{method} {path}: {status} {str(data)[:400]}")
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- pieces of up()

def _write_pki(node: Node, c: tb_cluster.Cluster) -> None:
    pki = node.dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    cert, key = tb_cluster.mint_client_cert(c, user=f"system:node:{node.name}", groups=("system:nodes",))
    (pki / "kubelet-client.crt").write_bytes(cert)
    (pki / "kubelet-client.key").write_bytes(key)
    (pki / "kubelet-client.key").chmod(0o600)
    shutil.copy(c.dir / "pki" / "ca.crt", pki / "ca.crt")
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": c.name, "cluster": {"server": c.server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": node.name, "user": {"client-certificate": str(pki / "kubelet-client.crt"),
                                               "client-key": str(pki / "kubelet-client.key")}}],
        "contexts": [{"name": "node", "context": {"cluster": c.name, "user": node.name}}],
        "current-context": "node",
    }
    (node.dir / "kubeconfig").write_text(json.dumps(kubeconfig, indent=2))


def _bind_node_role(node: Node, c: tb_cluster.Cluster) -> None:
    """RBAC for the kubelet's identity (the apiserver runs without the Node authorizer)."""
    name = f"gitopsd-testbed:node:{node.name}"
    body = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": f"system:node:{node.name}"}]}
    _request(c, "POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", body, ok=(201, 409))


def _setup_network(node: Node, c: tb_cluster.Cluster) -> None:
    """Bridge with the gateway address, route_localnet on it, and the nftables DNAT table."""
    br, gw, prefix = node.bridge, node.gateway, ipaddress.ip_network(node.subnet).prefixlen
    if _sh("ip", "link", "show", br, check=False).returncode != 0:
        _sh("ip", "link", "add", br, "type", "bridge")
    _sh("ip", "addr", "replace", f"{gw}/{prefix}", "dev", br)
    _sh("ip", "link", "set", br, "up")
    _sysctl_path(f"net/ipv4/conf/{br}/route_localnet").write_text("1\n")
    _sh("nft", "delete", "table", "ip", node.nft_table, check=False)
    _sh("nft", "-f", "-", input=(
        f"table ip {node.nft_table} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    iifname \"{br}\" ip daddr {SERVICE_IP} tcp dport 443 dnat to 127.0.0.1:{c.ports['apiserver']}\n"
        "  }\n"
        # route_localnet lets the bridge's packets reach 127/8: only those
        # we DNATed may (the kubelet's own KUBE-FIREWALL rule, which it is
        # told not to install machine-wide, scoped to this bridge).
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"    iifname \"{br}\" ip daddr 127.0.0.0/8 ct status dnat accept\n"
        f"    iifname \"{br}\" ip daddr 127.0.0.0/8 drop\n"
        "  }\n"
        "}\n"))
    cni = node.dir / "cni" / "net.d"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-gitopsd.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": f"gitopsd-{node.bridge}",
        "plugins": [{
            "type": "bridge", "bridge": br, "isGateway": False, "isDefaultGateway": False, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(node.dir / "cni" / "ipam"),
                     "ranges": [[{"subnet": node.subnet, "gateway": gw}]],
                     "routes": [{"dst": "0.0.0.0/0", "gw": gw}]},
        }],
    }, indent=2))


def expose(cluster_name: str, port: int, *, protocol: str = "tcp") -> tuple[str, int]:
    """Let the node's pods reach a service listening on 127.0.0.1:`port` of this
    machine: returns (host, port) for the pods, e.g. ('10.244.1.1', 3000)."""
    node = Node.load(cluster_name)
    if node is None or not node.bridge:
        raise NodeError(f"cluster {cluster_name!r} has no node: `hack/cluster node up {cluster_name}` first")
    rule = (f"iifname \"{node.bridge}\" ip daddr {node.gateway} {protocol} dport {port} "
            f"dnat to 127.0.0.1:{port}")
    listing = _sh("nft", "list", "chain", "ip", node.nft_table, "prerouting").stdout
    if not re.search(rf"ip daddr {re.escape(node.gateway)} {protocol} dport {port} dnat to 127\.0\.0\.1:{port}$",
                     listing, re.M):
        _sh("nft", "add", "rule", "ip", node.nft_table, "prerouting", *rule.replace('"', "").split())
    return node.gateway, port


def _make_cgroups(node: Node) -> list[Path]:
    """The kubelet's cgroupRoot in every mounted hierarchy (it refuses a missing one)."""
    made = []
    for hierarchy in _hierarchies():
        path = hierarchy / node.cgroup_parent.lstrip("/")
        path.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists() and (path / "cpuset.cpus").exists():
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (path / f).read_text().strip():
                    (path / f).write_text((hierarchy / f).read_text())
        made.append(path)
    return made


def _hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 ones and the unified one)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            mnt = Path(left.split()[4])
            if CGROUP_ROOT in mnt.parents or mnt == CGROUP_ROOT:
                out.append(mnt)
    return out


def _containerd_config(node: Node) -> Path:
    d = node.dir
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = f"""version = 2
root = "{d / 'containerd' / 'root'}"
state = "{d / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{node.socket}"

[ttrpc]
  address = "{node.socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'containerd' / 'opt'}"

[{cri}]
  sandbox_image = "{images.ref(images.PAUSE)}"
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # This VM takes CAP_SYS_RESOURCE from every process (bounding set), so no
  # one may lower an oom_score_adj: the kubelet asks -998 for sandboxes and
  # runc's init then dies ("failed to update /proc/self/oom_score_adj:
  # Permission denied"). Restricted, containerd raises a score below its own
  # (0) to 0, as it does for rootless containerd.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{d / 'runc'}"
        SystemdCgroup = false

  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d / 'cni' / 'net.d'}"
    max_conf_num = 1
"""
    path = d / "containerd.toml"
    path.write_text(text)
    return path


def _kubelet_config(node: Node) -> Path:
    d = node.dir
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroup v1 on purpose: see the module docstring.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_parent,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "imageServiceEndpoint": f"unix://{node.socket}",
        "address": node.gateway,
        "port": node.ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.ports["kubelet-healthz"],
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(d / "pki" / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "registerNode": True,
        "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
        "podLogsDir": str(d / "pod-logs"),
        "volumePluginDir": str(d / "volume-plugins"),   # default /usr/libexec/kubernetes/kubelet-plugins/volume/exec
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "failSwapOn": False,
        "serializeImagePulls": False,
        # Never delete an imported image (nothing can be pulled back) and never
        # evict on a shared, busy test machine's disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "maxPods": 30,
        "rotateCertificates": False,
        # No KUBE-FIREWALL / KUBE-KUBELET-CANARY / KUBE-IPTABLES-HINT chains in
        # the machine's iptables: nothing here uses them (no kube-proxy), and
        # the one rule that matters (drop un-DNATed packets to 127/8) is in
        # the node's own nftables table.
        "makeIPTablesUtilChains": False,
        "serverTLSBootstrap": False,
    }
    path = d / "kubelet.yaml"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _spawn(node: Node, component: str, argv: list[str]) -> None:
    node.pids[component] = procs.spawn(argv, log=node.log(component), cwd=node.dir)
    node.save()


def _wait(node: Node, what: str, component: str, check, timeout: float = START_TIMEOUT) -> None:
    procs.wait_until(what, name=component, pid=node.pids[component], owner=node.dir, log=node.log(component),
                     check=check, timeout=timeout, error=NodeError)


def _ctr(node: Node, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return _sh(CTR, "--address", str(node.socket), "--namespace", "k8s.io", *args, check=check, timeout=timeout)


def import_image(cluster_name: str, archive: Path | str, *, name: str | None = None) -> list[str]:
    """Import an OCI or docker image archive into the node's containerd (namespace
    k8s.io, where the kubelet looks) and return the image names it now has from it.

    `podman save` (docker-archive) and `buildah push ... oci-archive:` both
    work; an OCI archive whose index names no image needs `name`, which also
    tags any archive's (single) image under that name."""
    node = Node.load(cluster_name)
    if node is None or not node.alive().get("containerd"):
        raise NodeError(f"cluster {cluster_name!r} has no running node: `hack/cluster node up {cluster_name}`")
    archive = Path(archive)
    before = set(_image_names(node))
    out = _ctr(node, "images", "import", str(archive), timeout=600).stdout
    imported = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")]
    if name and name not in imported:
        if len(imported) != 1:
            raise NodeError(f"cannot name {name!r}: the archive holds {imported or 'no named image'}")
        _ctr(node, "images", "tag", "--force", imported[0], name)
        imported.append(name)
    if not imported:
        imported = sorted(set(_image_names(node)) - before)
    if not imported:
        raise NodeError(f"importing {archive} named no image (ctr said: {out.strip()[:400]}); pass name=")
    return imported


def _image_names(node: Node) -> list[str]:
    return [line for line in _ctr(node, "images", "ls", "-q").stdout.splitlines() if line]


def images_on(cluster_name: str) -> list[str]:
    """The image names in the node's containerd (k8s.io namespace)."""
    node = Node.load(cluster_name)
    if node is None:
        raise NodeError(f"cluster {cluster_name!r} has no node")
    return _image_names(node)


def _sysctls_file() -> Path:
    return build.cache_dir() / "node-sysctls.json"


def _save_sysctls() -> dict[str, str]:
    """The machine's values before any node's kubelet changed them: read now,
    unless another node (of another cluster) already saved them and still runs."""
    path = _sysctls_file()
    if path.exists() and _other_nodes_running(None):
        return json.loads(path.read_text())
    values = {k: _sysctl_path(k).read_text().strip() for k in KERNEL_TUNABLES}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    return values


def _other_nodes_running(cluster_name: str | None) -> bool:
    root = tb_cluster.clusters_dir()
    for entry in root.glob("*/node/node.json") if root.exists() else ():
        other = entry.parent.parent.name
        if other != cluster_name and (n := Node.load(other)) is not None and any(n.alive().values()):
            return True
    return False


def _restore_sysctls(node: Node) -> list[str]:
    """Put the saved values back, once the last running node is gone."""
    if _other_nodes_running(node.cluster):
        return []
    problems = []
    for key, value in node.sysctls.items():
        try:
            if _sysctl_path(key).read_text().strip() != value:
                _sysctl_path(key).write_text(value + "\n")
        except OSError as exc:
            problems.append(f"sysctl {key} not restored: {exc}")
    _sysctls_file().unlink(missing_ok=True)
    return problems


# ---------------------------------------------------------------- verbs

def up(cluster_name: str = "default", *, name: str = NODE_NAME, out=None) -> Node:
    """Start the real node of a running cluster and return once it is Ready.

    Idempotent: a node whose containerd and kubelet both run is returned as it
    is; a half-dead one is cleaned up (down) and started afresh. Raises
    NodeError (a ClusterError) with the failing component's log tail."""
    say = (lambda msg: print(msg, file=out, flush=True)) if out else (lambda msg: None)
    _require_tools()
    c = tb_cluster.Cluster.load(cluster_name)
    if c is None:
        raise NodeError(f"no cluster {cluster_name!r}: `hack/cluster up {cluster_name}` first")
    args = _apiserver_args(c)
    if not any(a.startswith("--kubelet-client-certificate=") for a in args):
        raise NodeError(f"cluster {cluster_name!r} was started without --kubelet-client-certificate (before the "
                        f"test bed had real nodes): restart it (`hack/cluster down {cluster_name}; "
                        f"hack/cluster up {cluster_name}`)")
    existing = Node.load(cluster_name)
    if existing and existing.pids and all(existing.alive().values()) and existing.name == name:
        say(f"node {name!r} of cluster {cluster_name!r} already up")
        return existing
    if existing or node_dir(cluster_name).exists():
        down(cluster_name)
    missing = build.missing(["kubelet"])
    if missing:
        say("  kubelet not built yet; building it (hack/cluster build --only kubelet)")
        build.build(only=missing, out=out) if out else build.build(only=missing, out=open(os.devnull, "w"))

    started = time.monotonic()
    node = Node(cluster=cluster_name, name=name)
    node.dir.mkdir(parents=True)
    (node.dir / "logs").mkdir()
    node.bridge = f"gtb{_short(cluster_name)}"
    node.subnet = _pick_subnet()
    node.ports = {"kubelet": procs.free_port(), "kubelet-healthz": procs.free_port()}
    node.sysctls = _save_sysctls()
    node.save()
    try:
        _write_pki(node, c)
        _bind_node_role(node, c)
        _setup_network(node, c)
        _make_cgroups(node)
        pause = images.archive(images.PAUSE)

        _spawn(node, "containerd", [CONTAINERD, "--config", str(_containerd_config(node))])

        def containerd_ok():
            proc = _ctr(node, "version", check=False, timeout=10)
            return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-200:]
        _wait(node, "containerd to answer", "containerd", containerd_ok)
        import_image(cluster_name, pause)
        node.timings["containerd_s"] = round(time.monotonic() - started, 1)
        say(f"  containerd ready, sandbox image {images.ref(images.PAUSE)} imported")

        _spawn(node, "kubelet", [
            str(build.binary("kubelet")), f"--config={_kubelet_config(node)}",
            f"--kubeconfig={node.dir / 'kubeconfig'}", f"--root-dir={node.dir / 'kubelet'}",
            # Its self-signed serving certificate; the default is /var/lib/kubelet/pki whatever --root-dir says.
            f"--cert-dir={node.dir / 'pki' / 'kubelet-serving'}",
            f"--hostname-override={name}", f"--node-ip={node.gateway}", "--v=2",
        ])

        def node_ready():
            status, body = tb_cluster.request(c, "GET", f"/api/v1/nodes/{name}")
            if status != 200:
                return False, f"node {name}: {status}"
            conds = {x["type"]: x for x in body.get("status", {}).get("conditions", [])}
            ready = conds.get("Ready", {})
            return ready.get("status") == "True", f"Ready={ready.get('status')} {ready.get('message', '')}"
        _wait(node, f"node {name} Ready", "kubelet", node_ready)
        node.timings["node_ready_s"] = round(time.monotonic() - started, 1)
        node.save()
    except BaseException as exc:
        tails = "\n".join(f"--- {comp} log (last lines):\n{procs.tail(node.log(comp), 25)}"
                          for comp in ("containerd", "kubelet") if node.log(comp).exists())
        try:
            down(cluster_name)
        except Exception as cleanup:  # report the first failure, mention the second
            tails += f"\n(cleaning up after the failure also failed: {cleanup})"
        if isinstance(exc, NodeError):
            raise NodeError(f"{exc}\n{tails}" if tails and tails not in str(exc) else str(exc)) from None
        if isinstance(exc, Exception):
            raise NodeError(f"starting the node failed: {exc}\n{tails}") from exc
        raise
    say(f"node {name!r} Ready in {node.timings['node_ready_s']}s (pods on {node.subnet}, "
        f"kubelet {node.gateway}:{node.ports['kubelet']})")
    return node


def _node_mounts(root: Path) -> list[str]:
    """Mount points at or under `root`, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].replace("\\040", " ")
        if mnt == str(root) or mnt.startswith(str(root) + "/"):
            found.append(mnt)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def _shims(node: Node) -> list[int]:
    """PIDs of containerd shims started for this node's containerd (their command line names its socket)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith("containerd-shim-runc-v2") and str(node.socket) in cmd:
            pids.append(int(p.name))
    return pids


def _cgroup_pids(node: Node) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        root = hierarchy / node.cgroup_parent.lstrip("/")
        for procs_file in root.rglob("cgroup.procs") if root.exists() else ():
            try:
                pids.update(int(x) for x in procs_file.read_text().split())
            except OSError:
                continue
    return pids


def _kill_leftovers(node: Node, timeout: float = 10.0) -> list[str]:
    """SIGKILL what still runs in the node's cgroups (containers whose shim or
    containerd died first): only pods live there, made by this node's kubelet."""
    left = _cgroup_pids(node)
    if not left:
        return []
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while _cgroup_pids(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [f"{len(left)} leftover container processes killed"]


def down(cluster_name: str = "default") -> list[str]:
    """Stop the node and undo everything up() did; returns what it stopped or removed."""
    node = Node.load(cluster_name)
    d = node_dir(cluster_name)
    if node is None:
        if d.exists():
            for mnt in _node_mounts(d):
                _sh("umount", "-l", mnt, check=False)
            shutil.rmtree(d, ignore_errors=True)
        return []
    done: list[str] = []
    if node.pids.get("kubelet") and procs.is_ours(node.pids["kubelet"], node.dir):
        done += procs.stop({"kubelet": node.pids["kubelet"]}, owner=node.dir)
    if node.pids.get("containerd") and procs.is_ours(node.pids["containerd"], node.dir):
        tasks = _ctr(node, "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            _ctr(node, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
        # containerd's CRI plugin deletes a task itself once it exited; delete
        # what it has not yet, until none is left.
        deadline = time.monotonic() + 15
        while tasks and time.monotonic() < deadline:
            for task in tasks:
                _ctr(node, "tasks", "delete", task, check=False)
            tasks = _ctr(node, "tasks", "ls", "-q", check=False).stdout.split()
            if tasks:
                time.sleep(0.2)
        for ctr_id in _ctr(node, "containers", "ls", "-q", check=False).stdout.split():
            _ctr(node, "containers", "delete", ctr_id, check=False)
        if tasks:
            done.append(f"{len(tasks)} containers did not stop")
        done += procs.stop({"containerd": node.pids["containerd"]}, owner=node.dir)
    for pid in _shims(node):
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"shim {pid}")
        except ProcessLookupError:
            pass
    # Before the network goes: a killed container's TCP connections then
    # close at once instead of keeping its network namespace (and veth) alive
    # while they retransmit into a deleted bridge.
    done += _kill_leftovers(node)
    for mnt in _node_mounts(d):
        _sh("umount", "-l", mnt, check=False)
    if node.bridge:
        _sh("nft", "delete", "table", "ip", node.nft_table, check=False)
        if _sh("ip", "link", "del", node.bridge, check=False).returncode == 0:
            done.append(f"bridge {node.bridge}")
    for hierarchy in _hierarchies():
        root = hierarchy / node.cgroup_parent.lstrip("/")
        if root.exists():
            for sub in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError as exc:
                done.append(f"cgroup {root} left: {exc}")
    if CONTAINER_LOG_LINKS.exists():
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and str(d) in os.readlink(link):
                link.unlink()
    if not _other_nodes_running(cluster_name):
        # The kubelet's fixed paths, once no kubelet of ours uses them; a
        # directory only when empty (it may have been there before).
        DEVICE_PLUGIN_SOCKET.unlink(missing_ok=True)
        for path in (DEVICE_PLUGIN_SOCKET.parent, DEVICE_PLUGIN_SOCKET.parent.parent, CONTAINER_LOG_LINKS):
            try:
                path.rmdir()
            except OSError:
                pass
    done += _restore_sysctls(node)
    c = tb_cluster.Cluster.load(cluster_name)
    if c is not None and c.pids.get("kube-apiserver") and procs.is_ours(c.pids["kube-apiserver"], c.dir):
        tb_cluster.request(c, "DELETE", f"/api/v1/nodes/{node.name}")
        tb_cluster.request(c, "DELETE",
                           f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/gitopsd-testbed:node:{node.name}")
    shutil.rmtree(d, ignore_errors=True)
    return done


def status(cluster_name: str = "default") -> dict | None:
    """The node's processes, addresses and timings; None when there is none."""
    node = Node.load(cluster_name)
    if node is None:
        return None
    alive = node.alive()
    state = "up" if alive and all(alive.values()) else ("down" if not any(alive.values()) else "degraded")
    return {"cluster": cluster_name, "node": node.name, "state": state, "subnet": node.subnet,
            "gateway": node.gateway, "bridge": node.bridge, "kubelet": f"{node.gateway}:{node.ports.get('kubelet')}",
            "containerd_socket": str(node.socket), "cgroup_parent": node.cgroup_parent, "timings": node.timings,
            "components": {comp: {"pid": node.pids[comp], "running": ok} for comp, ok in alive.items()}}
