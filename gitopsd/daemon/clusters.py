"""The clusters the daemon deploys to: one connection, one set of informers and one audit log each.

An app's target is (app, cluster) (gitopsd.config: `cluster`, `clusters`,
`clusterSelector`). Everything a target does to its cluster goes through
that cluster's `Link`: the plan's reads and the informers' watches, the
apply and prune, the health wait, the ApplySet parent with the app's status
and audit head, the audit segments and Events. So a target's whole state
lives in the cluster it manages, beside its objects — the same layout as on
gitopsd's own cluster (`in-cluster`), where nothing moved:

- the ApplySet parent must be there anyway (it names the objects of that
  cluster, and a prune reads it), and the audit head is kept on it;
- a cluster that is unreachable cannot be changed, so the records of its
  transitions are written when it is back, with the transition itself;
- two targets of one app never share a chain, a status or a lock;
- losing gitopsd's own cluster loses none of the other clusters' history.

What stays in gitopsd's own cluster: the leases (one leader or one shard
owner for every target: a term fences every cluster's writes), the
kubeconfig Secrets, release requests (`gitopsd hold web --cluster b`) and
the credentials of the apps.

Isolation. Each cluster has its own request budget window (a throttling
cluster pauses only its own requests) and its own fan-out threads. A
cluster other than gitopsd's own is probed (GET /readyz, every
PROBE_INTERVAL, with a short timeout): when it does not answer, or any
request to it gets no answer, the cluster is *unreachable*: its targets'
runs end at once with a ClusterUnreachable result, sending nothing (and
never pruning), and retry with backoff; the probe goes on with backoff
(PROBE_BACKOFF_MAX at most) and, when the cluster answers again, every one
of its targets is woken at once. Targets of other clusters never wait for it.

Credentials. A cluster's kubeconfig is read from its Secret (in gitopsd's
namespace) or file when the daemon starts, and again at every probe: a
changed kubeconfig (a rotated client certificate or token) replaces the
connection in place (gitopsd.kube.Kube.reconnect) — no restart, and the
runners and informers keep their Kube. One cluster's credentials are only
ever in that cluster's connection. A kubeconfig that cannot be used (no
Secret, a missing context, an exec plugin) makes that cluster's targets
fail with the reason; the others run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from gitopsd import audit, metrics
from gitopsd import clusters as clusters_mod
from gitopsd import config as config_mod
from gitopsd.budget import Budget
from gitopsd.daemon.informers import Informers
from gitopsd.daemon.leader import FencedKube
from gitopsd.engine import inventory
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube

log = structlog.get_logger("gitopsd")

#: Seconds between two probes of a reachable cluster (and between two reads of its kubeconfig).
PROBE_INTERVAL = 5.0
#: A probe's timeout: a cluster that does not answer /readyz in this long counts as unreachable.
PROBE_TIMEOUT = 3.0
#: Probes of an unreachable cluster back off from 1 s to this.
PROBE_BACKOFF_MAX = 10.0
#: The address of a cluster not connected yet (its kubeconfig cannot be read): never dialled.
_NOWHERE = "https://unconnected.invalid"


class Link:
    """One cluster the daemon deploys to; see the module docstring."""

    def __init__(self, name: str, kube: Kube, *, namespace: str, instance: str, fence: Callable[..., None],
                 home: bool) -> None:
        self.name = name
        self.home = home
        self.kube = kube
        self.namespace = namespace
        self.informers = Informers(kube)
        self.audit = audit.AuditLog(FencedKube(kube, fence), namespace=namespace, instance=instance, cluster=name)
        self.error: str | None = None           # why the cluster cannot be used at all (its kubeconfig)
        self.unreachable_since: datetime | None = None
        self.unreachable_error = ""
        self.config: config_mod.ClusterConfig | None = None
        self.digest: str | None = None          # the kubeconfig in use
        self.namespace_ready = home             # gitopsd's namespace exists there
        self._lock = threading.Lock()
        self.refreshing = threading.Lock()
        if not home:   # gitopsd's own cluster is not probed: its lease and requests say how it is
            metrics.CLUSTER_REACHABLE.labels(cluster=name).set(1)

    @property
    def log_fields(self) -> dict:
        """What a log line of one of its targets adds: the cluster, when it is not gitopsd's own."""
        return {} if self.home else {"cluster": self.name}

    @property
    def reachable(self) -> bool:
        return self.unreachable_since is None

    def blocked(self) -> str | None:
        """Why a run of a target on this cluster must not start now, or None."""
        if self.error is not None:
            return self.error
        if self.unreachable_since is not None:
            since = self.unreachable_since.strftime("%H:%M:%SZ")
            return (f"ClusterUnreachable: cluster {self.name} does not answer since {since} "
                    f"({self.unreachable_error}); nothing was sent to it, nothing pruned; retrying")
        return None

    def reach(self, answered: bool, error: str) -> None:
        """From every request of this cluster's Kube (Kube.on_reach) and from the probe."""
        if answered:
            if self.unreachable_since is not None:
                self._back()
            return
        with self._lock:
            if self.unreachable_since is not None:
                self.unreachable_error = error
                return
            self.unreachable_since = datetime.now(UTC)
            self.unreachable_error = error
            self.kube.down = True
        metrics.CLUSTER_REACHABLE.labels(cluster=self.name).set(0)
        log.warning("cluster unreachable", cluster=self.name, error=error,
                    hint="its targets report ClusterUnreachable and retry; the other clusters go on")

    def _back(self) -> None:
        with self._lock:
            if self.unreachable_since is None:
                return
            down = (datetime.now(UTC) - self.unreachable_since).total_seconds()
            self.unreachable_since, self.kube.down = None, False
        metrics.CLUSTER_REACHABLE.labels(cluster=self.name).set(1)

        def announce() -> None:   # on a thread of its own: not in the log context of the run that noticed
            log.info("cluster reachable again", cluster=self.name, unreachable_seconds=round(down, 1))
            self.on_back(self.name)
        threading.Thread(target=announce, name=f"cluster-{self.name}-back", daemon=True).start()

    on_back: Callable[[str], None] = staticmethod(lambda name: None)

    def stop(self) -> None:
        self.informers.stop()


class ClusterSet:
    """Every cluster of the running config, by name; `in-cluster` is gitopsd's own connection."""

    def __init__(self, home: Kube, *, namespace: str, instance: str, fence: Callable[..., None],
                 stopped: threading.Event, on_back: Callable[[str], None]) -> None:
        self.home_kube = home
        self.namespace = namespace
        self.instance = instance
        self._fence = fence
        self._stopped = stopped
        self._on_back = on_back
        self._lock = threading.Lock()
        self.links: dict[str, Link] = {}
        self.home = self._link(config_mod.IN_CLUSTER, home, home=True)
        self._probes: dict[str, threading.Thread] = {}

    def _link(self, name: str, kube: Kube, *, home: bool) -> Link:
        link = Link(name, kube, namespace=self.namespace, instance=self.instance, fence=self._fence, home=home)
        link.on_back = self._on_back
        kube.on_reach = None if home else link.reach
        self.links[name] = link
        return link

    def get(self, name: str) -> Link:
        return self.links[name]

    def update(self, config: config_mod.Config) -> None:
        """Connect the clusters the config names (reading their kubeconfigs now), take the changed
        ones' new settings, and stop those it no longer names."""
        wanted = {name: config.cluster(name) for name in config.cluster_names if name != config_mod.IN_CLUSTER}
        for name, cluster in wanted.items():
            with self._lock:
                link = self.links.get(name)
                if link is None:
                    budget = Budget(limit=self.home_kube.budget.limit)
                    kube = Kube(_unconnected(budget), budget=budget)
                    kube.user_agent = self.home_kube.user_agent
                    link = self._link(name, kube, home=False)
            changed = link.config != cluster
            link.config = cluster
            if changed:   # read now; reconnected only when the endpoint differs (a label change is none)
                self.refresh(link)
            if name not in self._probes and not self._stopped.is_set():
                thread = threading.Thread(target=self._probe, args=(link,), name=f"cluster-{name}", daemon=True)
                self._probes[name] = thread
                thread.start()
        for name in [n for n in self.links if n != config_mod.IN_CLUSTER and n not in wanted]:
            link = self.links.pop(name)
            self._probes.pop(name, None)
            link.stop()
            link.kube.close()
            metrics.CLUSTER_REACHABLE.remove(name)
            log.info("cluster removed from the config", cluster=name)

    def refresh(self, link: Link) -> bool:
        """Read the cluster's kubeconfig again; reconnect when it changed. True when usable.
        One at a time per cluster (the probe and a config reload may both ask)."""
        with link.refreshing:
            return self._refresh(link)

    def _refresh(self, link: Link) -> bool:
        cluster = link.config
        if cluster is None:
            return False
        try:
            where, text, path = clusters_mod.read_source(self.home_kube, link.name, cluster, namespace=self.namespace)
            endpoint = clusters_mod.parse_kubeconfig(text, context=cluster.context, where=where, from_file=path)
        except GitopsdError as exc:
            if link.error != str(exc):
                log.error("cannot connect to cluster", cluster=link.name, error=str(exc), hint=exc.hint)
            link.error = str(exc)
            return False
        if endpoint.digest != link.digest:
            try:
                conn = clusters_mod.Connection(endpoint, budget=link.kube.budget)
            except GitopsdError as exc:
                link.error = str(exc)
                log.error("cannot connect to cluster", cluster=link.name, error=str(exc))
                return False
            first = link.digest is None and link.kube.host == _NOWHERE
            link.kube.reconnect(conn.api_client, on_close=conn.close)
            link.digest = endpoint.digest
            log.info("cluster connected" if first else "cluster kubeconfig changed: reconnected",
                     cluster=link.name, server=endpoint.server, source=where)
        was, link.error = link.error, None
        if was is not None:
            self._on_back(link.name)   # usable now: its targets run
        return True

    def ensure_namespace(self, link: Link) -> None:
        """gitopsd's namespace in the cluster (where its targets' parents and audit live), once."""
        if link.namespace_ready:
            return
        inventory.ensure_namespace(link.kube, self.namespace)
        link.namespace_ready = True

    def _probe(self, link: Link) -> None:
        """Every PROBE_INTERVAL: the kubeconfig read again (rotation), then GET /version with a
        short timeout. An unreachable cluster is probed again after 1 s, 2 s, ... PROBE_BACKOFF_MAX."""
        delay, backoff = PROBE_INTERVAL, 1.0
        while not self._stopped.wait(delay):
            if self.links.get(link.name) is not link:
                return
            if not self.refresh(link):
                delay = PROBE_INTERVAL
                continue
            try:
                link.kube.request("GET", "/version", timeout=PROBE_TIMEOUT, max_retries=0, exempt=True)
                ok, error = True, ""
            except GitopsdError as exc:
                # An error answer (403, 500) is an answer: the requests themselves say what fails.
                # Only no answer at all is unreachable.
                ok, error = getattr(exc, "status", None) is not None, str(exc)
            link.reach(ok, error)
            if ok:
                delay, backoff = PROBE_INTERVAL, 1.0
            else:
                delay, backoff = backoff, min(PROBE_BACKOFF_MAX, backoff * 2)

    def stop(self) -> None:
        for link in list(self.links.values()):
            link.stop()
            if not link.home:
                link.kube.close()

    def status(self) -> list[dict]:
        """/status: one row per cluster."""
        rows = []
        for name, link in list(self.links.items()):
            rows.append({"name": name, "server": link.kube.host if not link.error else "",
                         "reachable": link.reachable and link.error is None,
                         **({"error": link.error} if link.error else {}),
                         **({"unreachableSince": link.unreachable_since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             "lastError": link.unreachable_error} if link.unreachable_since else {})})
        return rows


def _unconnected(budget: Budget):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = _NOWHERE
    cfg.connection_pool_maxsize = budget.connection_pool_size
    return client.ApiClient(cfg)
