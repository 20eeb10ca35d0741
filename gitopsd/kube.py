"""A thin, fast door to the Kubernetes API for plain-dict objects.

Why not the generated client's per-kind APIs: they deserialize into models,
which dominates the cost of large lists (DESIGN.md §3), and they need a code
path per kind. We reuse the official client only for what it does well —
loading kubeconfig / in-cluster config, TLS, bearer-token refresh, a pooled
urllib3 connection manager — and speak REST with orjson-parsed dicts.

What this layer adds:
- aggregated discovery (two requests for the whole API surface), with one
  re-discovery on a lookup miss (a CRD applied a moment ago);
- server-side apply, dry-run, list by label selector, delete;
- the process's request budget (gitopsd.budget): at most N requests in
  flight from all reconciles together, and one process-wide pause when the
  apiserver throttles (429, or 503 with Retry-After: API Priority and
  Fairness), instead of every thread finding out on its own;
- bounded retries: a throttled request is sent again after the pause, at most
  MAX_RETRIES times, then fails naming the object and saying the apiserver is
  overloaded; a plain 503, and a GET that could not connect, back off with
  full jitter on their own;
- request counters by verb, so tests and metrics can prove how few calls a
  steady-state reconcile makes;
- impersonation (`Kube.impersonating`): the same connection as a tenant's
  ServiceAccount, for what gitopsd does on behalf of an app that names one
  (gitopsd.engine.sync). A view of this Kube, not a second connection: it
  shares the pool, the budget, discovery and the counters, and only adds
  the `Impersonate-User` header to each request it sends.
"""

from __future__ import annotations

import copy
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import urllib3

from gitopsd import __version__
from gitopsd.budget import Budget, full_jitter
from gitopsd.errors import ClusterError
from gitopsd.metrics import APISERVER_ATTEMPTS, APISERVER_REQUESTS, APISERVER_THROTTLED
from gitopsd.objects import split_api_version

FIELD_MANAGER = "gitopsd"
DISCOVERY_ACCEPT = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
)
METADATA_LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
MAX_RETRIES = 5
REDISCOVERY_MIN_INTERVAL = 2.0


class KubeApiError(ClusterError):
    """A non-2xx answer from the apiserver, parsed from its Status body."""

    def __init__(self, *, status: int, reason: str, message: str, method: str, path: str,
                 causes: list[dict] | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.reason = reason
        self.api_message = message
        self.method = method
        self.path = path
        self.causes = causes or []
        self.retry_after = retry_after
        super().__init__(f"{method} {path}: {status} {reason}: {message}")

    @property
    def path_not_served(self) -> bool:
        """A 404 for the resource path itself, not for an object: the apiserver
        answers those with a plain-text "404 page not found", not a Status.
        The kind is gone (its CRD deleted, its aggregated API down)."""
        return self.status == 404 and self.reason != "NotFound" and "page not found" in self.api_message

    @property
    def impersonation_refused(self) -> bool:
        """A 403 for the impersonation itself (the sender may not act as that account), not for what
        the account asked: the apiserver checks `impersonate` before anything else."""
        return self.status == 403 and "cannot impersonate" in self.api_message

    @property
    def is_immutable_field(self) -> bool:
        text = self.api_message.lower()
        return self.status in (409, 422) and ("immutable" in text or "field is immutable" in text)


@dataclass(frozen=True)
class ServiceAccount:
    """A ServiceAccount that gitopsd acts as (Kube.impersonating): per app, `serviceAccountName`."""

    namespace: str
    name: str

    @property
    def user(self) -> str:
        """The account's user name, as the apiserver authenticates it (and as RBAC errors quote it)."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


#: Errors that mean the apiserver did not answer at all (as opposed to a connection dropped by the peer).
_NO_ANSWER = (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError,
              urllib3.exceptions.ReadTimeoutError)


class ClusterUnreachable(ClusterError):
    """A request that got no answer from a cluster known to be unreachable (gitopsd.daemon.clusters):
    not retried, so that a cluster that is down holds no reconcile of its targets."""


class UnknownKindError(ClusterError):
    """The apiserver serves no resource for this apiVersion/kind."""


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    listable: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{urllib.parse.quote(name, safe='')}"
        return base


class Kube:
    """One connection to one apiserver. Thread-safe; share it.

    `budget` is the process's concurrency budget (gitopsd.budget); the stages
    fan out on it (`kube.budget.map`). Without one, the Kube gets a budget of
    its own with the default size (tests, tools).
    """

    def __init__(self, api_client, *, budget: Budget | None = None) -> None:
        self._api_client = api_client
        cfg = api_client.configuration
        self.host = cfg.host.rstrip("/")
        self.budget = budget or Budget()
        self._pool = api_client.rest_client.pool_manager
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str, str], Resource] = {}
        self._by_group_kind: dict[tuple[str, str], Resource] = {}
        self._discovered_at = 0.0
        self._stale: frozenset[str] = frozenset()   # aggregated APIs that did not answer discovery
        self.requests: Counter[str] = Counter()
        self.user_agent = f"gitopsd/{__version__}"
        self.account: ServiceAccount | None = None   # who this view acts as (impersonating); None: gitopsd itself
        self._root = self                            # the Kube whose discovery and views this one shares
        self._views: dict[ServiceAccount, Kube] = {}
        self._closers: list[Callable[[], None]] = []
        #: Told of every answer (True) and of every request that got none (False, the error): how
        #: gitopsd.daemon.clusters knows a cluster is unreachable without asking it again.
        self.on_reach: Callable[[bool, str], None] | None = None
        self.down = False

    # ------------------------------------------------------------ construction

    @property
    def stale_group_versions(self) -> frozenset[str]:
        """Aggregated APIs (group/version) that did not answer the last discovery: their kinds are unknown."""
        return self._root._stale

    @property
    def max_workers(self) -> int:
        """The budget's size: how many threads may work on one fan-out."""
        return self.budget.limit

    @classmethod
    def connect(cls, *, kubeconfig: str | Path | None = None, context: str | None = None,
                in_cluster: bool | None = None, budget: Budget | None = None) -> "Kube":
        """Connect like kubectl: --kubeconfig, else $KUBECONFIG, else in-cluster, else ~/.kube/config.

        `in_cluster=True` forces the pod's service-account configuration.
        `budget` sizes the connection pool and bounds the requests in flight.
        """
        import os

        from kubernetes import client, config

        cfg = client.Configuration()
        if in_cluster or (in_cluster is None and not kubeconfig and not os.environ.get("KUBECONFIG")
                          and os.environ.get("KUBERNETES_SERVICE_HOST")):
            # The pod's token and CA; the two variables move them (a test lays them out outside /var/run).
            incluster = config.incluster_config
            token = os.environ.get("GITOPSD_SA_TOKEN_FILE") or incluster.SERVICE_TOKEN_FILENAME
            ca = os.environ.get("GITOPSD_SA_CA_FILE") or incluster.SERVICE_CERT_FILENAME
            try:
                incluster.InClusterConfigLoader(token_filename=token, cert_filename=ca).load_and_set(cfg)
            except config.ConfigException as exc:
                raise ClusterError(f"cannot load in-cluster configuration ({token}, {ca}): {exc}",
                                   hint="is the ServiceAccount token mounted (automountServiceAccountToken)?") from None
        else:
            try:
                config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, context=context,
                                        client_configuration=cfg, persist_config=False)
            except (config.ConfigException, FileNotFoundError, OSError) as exc:
                where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
                raise ClusterError(f"cannot load kubeconfig {where}: {exc}",
                                   hint="pass --kubeconfig or set KUBECONFIG (hack/cluster kubeconfig prints one)") from None
        # One kept connection per request slot (plus watches and leases), or
        # urllib3 opens and discards connections beyond it with a warning.
        budget = budget or Budget()
        cfg.connection_pool_maxsize = budget.connection_pool_size
        return cls(client.ApiClient(cfg), budget=budget)

    def unreachable(self) -> bool:
        """Whether the cluster is known to be unreachable now (`down`, set by gitopsd.daemon.clusters for the
        clusters it probes; never for gitopsd's own)."""
        return self._root.down

    def close(self) -> None:
        self._api_client.close()
        for closer in self._closers:
            closer()

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` when this Kube is closed (the private files of its credentials)."""
        self._closers.append(fn)

    def reconnect(self, api_client, *, on_close: Callable[[], None] | None = None) -> None:
        """Send every later request through `api_client` (a rotated kubeconfig: new credentials,
        perhaps a new address), in place: the views, informers and runners holding this Kube keep
        it. Requests in flight finish on the old connection; the old one is then closed. Discovery
        is kept when the address is the same (the same cluster), else read again."""
        root = self._root
        old_client, old_closers = root._api_client, root._closers
        host = api_client.configuration.host.rstrip("/")
        with root._lock:
            root._api_client, root._pool = api_client, api_client.rest_client.pool_manager
            root._closers = [on_close] if on_close else []
            if host != root.host:
                root._discovered_at = 0.0
            root.host = host
            for view in root._views.values():
                view._api_client, view._pool, view.host = root._api_client, root._pool, host
        try:
            old_client.close()
        except Exception:  # noqa: BLE001 - an old pool that will not close is garbage anyway
            pass
        for closer in old_closers:
            closer()

    def impersonating(self, account: ServiceAccount) -> "Kube":
        """This connection as `account`: every request it sends carries `Impersonate-User:
        system:serviceaccount:<ns>:<name>` and the apiserver authorizes it as that account.

        Only the user is sent, no `Impersonate-Group`: for a ServiceAccount user
        the apiserver adds the account's groups itself (system:serviceaccounts,
        system:serviceaccounts:<ns>, system:authenticated) and then checks just
        `impersonate` on that ServiceAccount. Sending the groups would also need
        `impersonate` on groups — for system:serviceaccounts:<ns> of every
        tenant namespace, which RBAC cannot name for all namespaces — for the
        very same identity. The apiserver checks the right at every request,
        so no token is fetched and nothing expires.

        A view, cached per account: it shares this Kube's connection pool,
        request budget, discovery and counters (discovery is gitopsd's own: it
        is the same for every identity), so an app's account costs no second
        connection. Impersonating a ServiceAccount that does not exist still
        authenticates (the apiserver does not look it up): every request is
        then forbidden, as for an account nothing is bound to.
        """
        root = self._root
        with root._lock:
            view = root._views.get(account)
            if view is None:
                view = copy.copy(root)
                view.account = account
                root._views[account] = view
        return view

    # ------------------------------------------------------------ raw requests

    def _headers(self, accept: str) -> dict[str, str]:
        """Accept plus the bearer token, re-read each time (in-cluster tokens rotate)."""
        headers = {"Accept": accept, "User-Agent": self.user_agent}
        for setting in self._api_client.configuration.auth_settings().values():
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        if self.account is not None:
            headers["Impersonate-User"] = self.account.user
        return headers

    def request(self, method: str, path: str, *, query: dict | list | None = None, body=None,
                content_type: str = "application/json", accept: str = "application/json",
                timeout: float = 60.0, max_retries: int | None = None,
                fence: Callable[[], None] | None = None, exempt: bool = False) -> dict:
        """Send one request within the budget; return the parsed JSON body (or {} when empty).

        A throttled request (429, or 503 with Retry-After) is sent again once
        the process-wide pause it caused is over; a plain 503, and a GET that
        could not connect, after a jittered backoff of its own. At most
        `max_retries` (default MAX_RETRIES) times in all; then a throttled
        request fails with an error that says the apiserver is overloaded.

        `exempt`: neither counted against the request budget nor held by its
        pause, for callers whose lateness costs more than their load (lease
        renewals: they are few, small, and must not queue behind a sync).
        """
        url = self.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = orjson.dumps(body) if body is not None and not isinstance(body, bytes) else body
        retries = MAX_RETRIES if max_retries is None else max_retries
        send = _Send(method=method, path=path, url=url, data=data, content_type=content_type, accept=accept,
                     timeout=timeout, fence=fence, exempt=exempt,
                     verb=_verb(method, path, query, content_type))
        started = time.monotonic()
        attempt = 0
        if self._root.down and not exempt:
            raise ClusterUnreachable(f"{method} {path}: the apiserver at {self.host} is unreachable (not sent)")
        try:
            while True:
                try:
                    resp = self._exchange(send)
                except urllib3.exceptions.HTTPError as exc:
                    reach = self._root.on_reach
                    if reach is not None:
                        # No connection, or no answer in time: the cluster may be down (its owner decides,
                        # and probes). A dropped keep-alive connection is not that: retried as before.
                        if isinstance(exc, _NO_ANSWER):
                            reach(False, f"{method} {path}: {exc}")
                        if self._root.unreachable():
                            raise ClusterUnreachable(f"{method} {path}: cannot reach the apiserver at {self.host}: "
                                                     f"{exc}") from None
                    if attempt < retries and method == "GET":
                        time.sleep(full_jitter(attempt))
                        attempt += 1
                        continue
                    raise ClusterError(f"{method} {path}: cannot reach the apiserver at {self.host}: {exc}",
                                       hint="is the cluster up? (hack/cluster status)") from None
                if self._root.on_reach is not None:
                    self._root.on_reach(True, "")
                if 200 <= resp.status < 300:
                    return orjson.loads(resp.data) if resp.data else {}
                _retry_or_raise(_api_error(method, path, resp), attempt=attempt, retries=retries,
                                exempt=exempt, started=started)
                attempt += 1
        finally:
            APISERVER_ATTEMPTS.observe(attempt + 1)

    def _exchange(self, send: "_Send"):
        """One HTTP exchange holding one request slot (unless exempt); a throttle closes the gate."""
        gate = self.budget.requests
        generation = gate.generation if send.exempt else gate.enter()
        accepted = False
        try:
            headers = self._headers(send.accept)
            if send.data is not None:
                headers["Content-Type"] = send.content_type
            with self._lock:
                self.requests[send.verb] += 1
            APISERVER_REQUESTS.labels(verb=send.verb).inc()
            if send.fence is not None:
                # Last thing before the bytes leave (and again before every
                # retry): the write fence of leader election, see leader.py.
                send.fence()
            resp = self._pool.request(send.method, send.url, body=send.data, headers=headers,
                                      preload_content=True, retries=False,
                                      timeout=urllib3.Timeout(connect=min(10.0, send.timeout), read=send.timeout))
            if _is_throttle(resp.status, _retry_after(resp)):
                APISERVER_THROTTLED.labels(verb=send.verb).inc()
                gate.throttled(generation, retry_after=_retry_after(resp), what=f"{send.method} {send.path}")
            else:
                accepted = True
            return resp
        finally:
            if not send.exempt:
                gate.leave(generation, ok=accepted)

    # ------------------------------------------------------------ discovery

    def discover(self) -> None:
        """Refresh the resource map from aggregated discovery (2 requests); a view
        (impersonating) refreshes its root's, as gitopsd."""
        if self._root is not self:
            return self._root.discover()
        resources: dict[tuple[str, str, str], Resource] = {}
        by_gk: dict[tuple[str, str], Resource] = {}
        stale: set[str] = set()
        for root in ("/api", "/apis"):
            doc = self.request("GET", root, accept=DISCOVERY_ACCEPT)
            if doc.get("kind") != "APIGroupDiscoveryList":
                raise ClusterError(f"the apiserver at {self.host} does not serve aggregated discovery "
                                   f"(Kubernetes >= 1.30 is required)")
            for group in doc.get("items", []):
                gname = group.get("metadata", {}).get("name", "")
                for i, version in enumerate(group.get("versions", [])):
                    vname = version["version"]
                    if version.get("freshness") == "Stale":
                        # An aggregated API whose server does not answer: its
                        # kinds are unknown, not absent.
                        stale.add(f"{gname}/{vname}")
                    for r in version.get("resources", []):
                        kind = (r.get("responseKind") or {}).get("kind")
                        if not kind:
                            continue
                        res = Resource(group=gname, version=vname, kind=kind, plural=r["resource"],
                                       namespaced=r.get("scope") == "Namespaced",
                                       listable="list" in (r.get("verbs") or ["list"]))
                        resources[(gname, vname, kind)] = res
                        # versions are listed in preference order: the first wins.
                        by_gk.setdefault((gname, kind), res)
        with self._lock:
            self._resources, self._by_group_kind = resources, by_gk
            self._stale = frozenset(stale)
            self._discovered_at = time.monotonic()

    def _lookup(self, key, table_name: str):
        root = self._root
        table = getattr(root, table_name)
        if key in table:
            return table[key]
        if time.monotonic() - root._discovered_at >= REDISCOVERY_MIN_INTERVAL or not table:
            root.discover()
        return getattr(root, table_name).get(key)

    def resource(self, api_version: str, kind: str) -> Resource:
        group, version = split_api_version(api_version)
        res = self._lookup((group, version, kind), "_resources")
        if res is None:
            raise self._unknown_kind(kind, api_version)
        return res

    @staticmethod
    def _unknown_kind(kind: str, api_version: str) -> UnknownKindError:
        return UnknownKindError(
            f"the cluster serves no {kind} in {api_version}",
            hint="a typo in apiVersion/kind, or a CRD that is not installed or was deleted "
                 "(put the CRD in the same commit)")

    def resource_for_group_kind(self, group: str, kind: str) -> Resource | None:
        return self._lookup((group, kind), "_by_group_kind")

    def namespaced_resources(self) -> list[Resource]:
        """Every listable namespaced kind, preferred version only."""
        root = self._root
        if not root._by_group_kind:
            root.discover()
        return [r for r in root._by_group_kind.values() if r.namespaced and r.listable]

    def is_namespaced(self, group: str, kind: str) -> bool | None:
        """For the renderer: True/False, or None when the cluster does not know the kind."""
        res = self.resource_for_group_kind(group, kind)
        return None if res is None else res.namespaced

    # ------------------------------------------------------------ verbs on objects

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict | None:
        """The live object, or None if it is absent (404)."""
        try:
            return self.request("GET", res.path(namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                self._forget_if_not_served(exc)
                return None
            raise

    def list(self, res: Resource, *, namespace: str | None = None, label_selector: str | None = None) -> list[dict]:
        """Every matching object, as dicts with apiVersion and kind filled in (lists omit them).

        A kind the cluster stopped serving (its CRD deleted) has no objects: [].
        """
        try:
            return self.list_with_version(res, namespace=namespace, label_selector=label_selector)[0]
        except KubeApiError as exc:
            if self._forget_if_not_served(exc):
                return []
            raise

    def list_metadata(self, res: Resource, *, namespace: str | None = None, page: int = 500) -> Iterator[dict]:
        """Every object's metadata (PartialObjectMetadata), `page` objects per request.

        A generator: a caller looking for the first match stops paging early.
        """
        query: dict[str, str] = {"limit": str(page)}
        while True:
            doc = self.request("GET", res.path(namespace), query=query, accept=METADATA_LIST_ACCEPT)
            yield from doc.get("items") or []
            cont = (doc.get("metadata") or {}).get("continue")
            if not cont:
                return
            query["continue"] = cont

    def list_with_version(self, res: Resource, *, namespace: str | None = None,
                          label_selector: str | None = None) -> tuple[list[dict], str]:
        """Like list(), plus the collection's resourceVersion to start a watch from."""
        items: list[dict] = []
        query: dict[str, str] = {"limit": "500"}
        if label_selector:
            query["labelSelector"] = label_selector
        while True:
            doc = self.request("GET", res.path(namespace), query=query)
            for item in doc.get("items", []):
                item.setdefault("apiVersion", res.api_version)
                item.setdefault("kind", res.kind)
                items.append(item)
            meta = doc.get("metadata") or {}
            if not meta.get("continue"):
                return items, meta.get("resourceVersion", "")
            query["continue"] = meta["continue"]

    def watch(self, res: Resource, *, namespace: str | None = None, label_selector: str | None = None,
              resource_version: str = "", timeout_seconds: int = 300,
              on_open: Callable[[Callable[[], None]], None] | None = None):
        """Yield (type, object) watch events until the server ends the stream.

        BOOKMARK events carry only metadata.resourceVersion. An expired
        resourceVersion raises KubeApiError(410): the caller must re-list.
        `on_open(close)` hears that the apiserver accepted the watch, with a
        function that ends the stream from another thread (the blocked read
        returns and this generator raises ClusterError): how an informer is
        stopped at once instead of at its next event.
        """
        query = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            query["labelSelector"] = label_selector
        if resource_version:
            query["resourceVersion"] = resource_version
        url = self.host + res.path(namespace) + "?" + urllib.parse.urlencode(query)
        headers = self._headers("application/json")
        with self._lock:
            self.requests["watch"] += 1
        APISERVER_REQUESTS.labels(verb="watch").inc()
        # A stream, not a request: it takes no slot of the budget, but it does
        # not open while the apiserver has asked the process to hold back.
        gate = self.budget.requests
        generation = gate.wait_open()
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False, retries=False,
                                      timeout=urllib3.Timeout(connect=10.0, read=timeout_seconds + 30))
        except urllib3.exceptions.HTTPError as exc:
            raise ClusterError(f"watch {res.path(namespace)}: cannot reach the apiserver: {exc}") from None
        try:
            if resp.status != 200:
                resp.read()
                if _is_throttle(resp.status, _retry_after(resp)):
                    APISERVER_THROTTLED.labels(verb="watch").inc()
                    gate.throttled(generation, retry_after=_retry_after(resp), what=f"WATCH {res.path(namespace)}")
                raise _api_error("GET", res.path(namespace), resp)
            if on_open is not None:
                on_open(lambda: _shutdown(resp))
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise KubeApiError(status=int(obj.get("code") or 500), reason=obj.get("reason", ""),
                                           message=obj.get("message", ""), method="WATCH",
                                           path=res.path(namespace))
                    obj.setdefault("apiVersion", res.api_version)
                    obj.setdefault("kind", res.kind)
                    yield event["type"], obj
        except urllib3.exceptions.HTTPError as exc:
            raise ClusterError(f"watch {res.path(namespace)} broke: {exc}") from None
        finally:
            resp.release_conn()

    def apply(self, obj: dict, *, dry_run: bool = False, force: bool = True,
              field_manager: str = FIELD_MANAGER, fence: Callable[[], None] | None = None) -> dict:
        """Server-side apply `obj`; with dry_run the server computes the result and persists nothing.

        Raises UnknownKindError when the cluster stopped serving the kind
        since discovery was cached (its CRD deleted), as for a kind it never
        served.
        """
        res = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        query = {"fieldManager": field_manager}
        if force:
            query["force"] = "true"
        if dry_run:
            query["dryRun"] = "All"
        # JSON is YAML: the apply-patch+yaml content type takes a JSON body.
        try:
            return self.request("PATCH", res.path(meta.get("namespace"), meta["name"]), query=query, body=obj,
                                content_type="application/apply-patch+yaml", fence=fence)
        except KubeApiError as exc:
            if self._forget_if_not_served(exc):
                raise self._unknown_kind(res.kind, res.api_version) from None
            raise

    def json_patch(self, res: Resource, name: str, namespace: str | None, operations: list[dict], *,
                   fence: Callable[[], None] | None = None) -> dict:
        """Send a JSON patch (RFC 6902) of one object; returns the object as patched.

        For what server-side apply cannot say: rewriting metadata.managedFields
        (gitopsd.engine.takeover). The apiserver applies it to the object as it
        is then; its `test` operations say what must still hold (422 when not).
        """
        return self.request("PATCH", res.path(namespace, name), query={"fieldManager": FIELD_MANAGER},
                            body=operations, content_type="application/json-patch+json", fence=fence)

    def create(self, res: Resource, obj: dict, *, fence: Callable[[], None] | None = None) -> dict:
        """POST a new object (409 AlreadyExists when its name is taken); returns it as created.

        Only for objects gitopsd creates without applying them (a namespace
        created for an app, gitopsd.engine.apply): a create needs only the
        `create` verb, and leaves no Apply entry of gitopsd's in managedFields.
        """
        return self.request("POST", res.path(obj["metadata"].get("namespace")), query={"fieldManager": FIELD_MANAGER},
                            body=obj, fence=fence)

    def _forget_if_not_served(self, exc: KubeApiError) -> bool:
        """True (after refreshing discovery) when `exc` says the resource path is not served."""
        if not exc.path_not_served:
            return False
        self.discover()
        return True

    def delete(self, res: Resource, name: str, namespace: str | None = None, *, uid: str | None = None,
               propagation: str = "Background", dry_run: bool = False,
               fence: Callable[[], None] | None = None) -> bool:
        """Delete one object; False if it was already gone. `uid` guards against
        deleting a same-named object created since we looked."""
        body: dict = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        query = {"dryRun": "All"} if dry_run else None
        try:
            self.request("DELETE", res.path(namespace, name), body=body, query=query, fence=fence)
            return True
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise


def _shutdown(resp) -> None:
    """End a streaming response from another thread; a stream already over is left alone.
    (HTTPResponse.shutdown is urllib3 >= 2.3; before it, the stream ends at its next event.)"""
    try:
        resp.shutdown()
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass


def _verb(method: str, path: str, query, content_type: str = "") -> str:
    if method == "GET":
        last = path.rstrip("/").rsplit("/", 1)[-1]
        # A collection path ends in a plural; a named GET has a name after it.
        # Cheap heuristic good enough for counters: lists carry limit=.
        return "list" if query and "limit" in (query if isinstance(query, dict) else dict(query)) else \
            ("discovery" if last in ("api", "apis") else "get")
    if method == "PATCH" and content_type == "application/json-patch+json":
        return "patch"   # not an apply: a field-manager takeover (gitopsd.engine.takeover)
    if method == "PATCH":
        dry = query and ("dryRun" in (query if isinstance(query, dict) else dict(query)))
        return "apply-dry-run" if dry else "apply"
    return method.lower()


@dataclass(frozen=True)
class _Send:
    """One request as Kube.request was asked for it, resent unchanged on a retry."""
    method: str
    path: str
    url: str
    data: bytes | None
    content_type: str
    accept: str
    timeout: float
    fence: Callable[[], None] | None
    exempt: bool
    verb: str


def _retry_after(resp) -> float | None:
    """The Retry-After header in seconds (the apiserver sends whole seconds; a date is not used)."""
    header = resp.headers.get("Retry-After")
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None


def _is_throttle(status: int, retry_after: float | None) -> bool:
    """The apiserver asks the client to come back later: 429 (API Priority and
    Fairness, max-inflight), or 503 with Retry-After. A 503 without one is a
    broken backend (an aggregated API down), not load."""
    return status == 429 or (status == 503 and retry_after is not None)


def _retry_or_raise(err: KubeApiError, *, attempt: int, retries: int, exempt: bool, started: float) -> None:
    """Raise `err` when it is final; otherwise return once this request may be sent again.

    A throttled request waits at the gate it closed (in Kube._exchange), not
    here. A plain 503 is this request's own trouble (an aggregated API down),
    no reason to hold back the rest: it backs off alone, as does an exempt
    request, which does not wait at the gate.
    """
    throttled = _is_throttle(err.status, err.retry_after)
    if throttled and attempt >= retries:
        raise _overloaded(err, attempts=attempt + 1, seconds=time.monotonic() - started)
    if attempt >= retries or err.status not in (429, 503):
        raise err
    if exempt or not throttled:
        time.sleep((err.retry_after or 0.0) + full_jitter(attempt))


def _overloaded(err: KubeApiError, *, attempts: int, seconds: float) -> KubeApiError:
    """The error of a request still throttled after the retry cap: the object (its path) and the reason."""
    return KubeApiError(
        status=err.status, reason=err.reason or "TooManyRequests", method=err.method, path=err.path,
        retry_after=err.retry_after,
        message=f"the apiserver is overloaded: it refused this request {attempts} time{'s' if attempts != 1 else ''} over {seconds:.1f}s "
                f"({err.api_message or 'API Priority and Fairness'}); gitopsd paused and sent fewer requests "
                f"meanwhile, and the next reconcile tries again (hint: lower --concurrency, or give gitopsd's "
                f"FlowSchema a priority level with more concurrency)")


def _api_error(method: str, path: str, resp) -> KubeApiError:
    try:
        status = orjson.loads(resp.data) if resp.data else {}
    except orjson.JSONDecodeError:
        status = {"message": resp.data.decode(errors="replace")[:500]}
    retry_after = _retry_after(resp)
    if status.get("kind") != "Status":   # plain text or foreign JSON: no Status reason to trust
        status = {"message": status.get("message", "")}
    return KubeApiError(status=resp.status, reason=status.get("reason") or resp.reason or "",
                        message=status.get("message", ""), method=method, path=path,
                        causes=(status.get("details") or {}).get("causes"), retry_after=retry_after)
