"""How gitopsd reaches a cluster other than its own: a kubeconfig from a Secret or a mounted file.

The config's `clusters:` section names each cluster and where its
kubeconfig is (gitopsd.config.ClusterConfig). This module turns that into a
connection (gitopsd.kube.Kube), for the daemon (gitopsd.daemon.clusters) and
for the CLI (`gitopsd history --cluster`, `audit verify --cluster`).

What a kubeconfig may hold, and why:

- From a Secret it must be self-contained: the server, its CA
  (`certificate-authority-data`, or `insecure-skip-tls-verify`), and a client
  certificate and key (`client-certificate-data`, `client-key-data`) or a
  bearer `token`. A path (`certificate-authority`, `client-certificate`,
  `tokenFile`) would be read from gitopsd's own file system, where it names
  nothing the Secret's author controls; it is refused, naming the field.
- From a file, paths are allowed (relative to the file's directory, as
  kubectl reads them): a mounted Secret's other keys sit beside it.
- `exec` and `auth-provider` plugins are refused either way: they run a
  program named by the kubeconfig inside gitopsd's pod, so whoever may write
  the Secret could run code as gitopsd (Flux refuses exec the same way unless
  told otherwise). A cloud's short-lived token is put in the Secret by the
  tool that mints it instead.
- The context is `context` from the config, else the kubeconfig's
  current-context; a context that is not in the kubeconfig is an error that
  lists the ones that are.

Certificate and key material is written to private files (0600, in a 0700
directory on /dev/shm when there is one): Python's TLS reads a client
certificate only from a file. Each connection's files are removed when the
connection is replaced (a rotated Secret) or closed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gitopsd.budget import Budget
from gitopsd.engine import yamlload
from gitopsd.errors import ClusterError
from gitopsd.kube import Kube

#: User fields that run a program or reach outside the kubeconfig: refused (module docstring).
_PLUGINS = ("exec", "auth-provider")
#: Fields that name files: allowed only in a kubeconfig read from a file.
_CLUSTER_FILES = ("certificate-authority",)
_USER_FILES = ("client-certificate", "client-key", "tokenFile")
#: Fields gitopsd does not support (it would silently ignore them and connect differently).
_UNSUPPORTED_CLUSTER = ("proxy-url", "disable-compression")
_UNSUPPORTED_USER = ("username", "password", "as", "as-groups", "as-uid", "as-user-extra")


@dataclass(frozen=True)
class Endpoint:
    """What one connection needs, read from a kubeconfig: never logged (it holds a key or token)."""

    server: str
    ca_data: bytes | None = None
    ca_file: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None

    @property
    def digest(self) -> str:
        """Identifies the connection's settings (a rotation changes it); not the secret itself."""
        h = hashlib.sha256()
        for value in (self.server, self.ca_data, self.ca_file, self.insecure, self.tls_server_name, self.cert_data,
                      self.key_data, self.cert_file, self.key_file, self.token, self.token_file):
            h.update(repr(value).encode())
        return h.hexdigest()[:16]


def parse_kubeconfig(text: str | bytes, *, context: str | None, where: str, from_file: Path | None = None) -> Endpoint:
    """The endpoint of `context` (else the current-context) of a kubeconfig; ClusterError naming
    `where` and the field when it cannot be used (module docstring). `from_file`: the file it was read
    from (paths in it are then allowed, relative to its directory)."""
    try:
        # Bounded like every YAML gitopsd reads: an alias bomb in a Secret must not exhaust memory.
        doc = yamlload.load_one(text.decode(errors="replace") if isinstance(text, bytes) else text)
    except yaml.YAMLError as exc:
        raise ClusterError(f"{where}: not a kubeconfig (YAML error: {str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ClusterError(f"{where}: not a kubeconfig (expected a mapping with clusters, users and contexts)")
    contexts = _named(doc, "contexts", where)
    name = context or doc.get("current-context")
    if not name:
        raise ClusterError(f"{where}: no context given and no current-context set",
                           hint=f"set context: in the cluster's config (contexts: {', '.join(contexts) or 'none'})")
    if name not in contexts:
        raise ClusterError(f"{where}: context {name!r} is not in the kubeconfig "
                           f"(contexts: {', '.join(sorted(contexts)) or 'none'})",
                           hint="fix context: in the cluster's config, or the kubeconfig")
    ctx = contexts[name] or {}
    cluster = _named(doc, "clusters", where).get(ctx.get("cluster"))
    user = _named(doc, "users", where).get(ctx.get("user")) if ctx.get("user") else {}
    if cluster is None:
        raise ClusterError(f"{where}: context {name!r} names cluster {ctx.get('cluster')!r}, which is not in the "
                           "kubeconfig")
    if user is None:
        raise ClusterError(f"{where}: context {name!r} names user {ctx.get('user')!r}, which is not in the kubeconfig")
    user = user or {}
    for field in _PLUGINS:
        if field in user:
            raise ClusterError(f"{where}: user {ctx.get('user')!r} uses an {field} plugin, which gitopsd refuses: it "
                               "would run a program the kubeconfig names inside gitopsd",
                               hint="put a token (token:) or a client certificate (client-certificate-data, "
                                    "client-key-data) in the kubeconfig instead")
    for field in (*_UNSUPPORTED_CLUSTER,):
        if field in cluster:
            raise ClusterError(f"{where}: cluster field {field} is not supported by gitopsd")
    for field in _UNSUPPORTED_USER:
        if field in user:
            raise ClusterError(f"{where}: user field {field} is not supported by gitopsd",
                               hint="use a token or a client certificate")
    if from_file is None:
        for field in (*_CLUSTER_FILES,):
            if field in cluster:
                raise ClusterError(f"{where}: cluster field {field} names a file; a kubeconfig in a Secret must be "
                                   f"self-contained", hint=f"use {field}-data (base64) instead")
        for field in _USER_FILES:
            if field in user:
                raise ClusterError(f"{where}: user field {field} names a file; a kubeconfig in a Secret must be "
                                   "self-contained", hint=("put the token itself in token:" if field == "tokenFile"
                                                           else f"use {field}-data (base64) instead"))
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        # Plain http would send the token or the cluster's objects (Secrets among them) in clear.
        raise ClusterError(f"{where}: cluster of context {name!r} has no https:// server"
                           + (f" ({server[:60]!r}: gitopsd talks to an apiserver over TLS only)"
                              if isinstance(server, str) else ""))
    base = from_file.parent if from_file else None

    def path(value) -> str | None:
        if value is None:
            return None
        p = Path(str(value))
        return str(p if p.is_absolute() or base is None else base / p)

    endpoint = Endpoint(
        server=server.rstrip("/"),
        ca_data=_b64(cluster, "certificate-authority-data", where),
        ca_file=path(cluster.get("certificate-authority")),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=cluster.get("tls-server-name"),
        cert_data=_b64(user, "client-certificate-data", where),
        key_data=_b64(user, "client-key-data", where),
        cert_file=path(user.get("client-certificate")),
        key_file=path(user.get("client-key")),
        token=user.get("token"),
        token_file=path(user.get("tokenFile")),
    )
    if bool(endpoint.cert_data or endpoint.cert_file) != bool(endpoint.key_data or endpoint.key_file):
        raise ClusterError(f"{where}: user {ctx.get('user')!r} has a client certificate without its key, or a key "
                           "without its certificate")
    return endpoint


def _named(doc: dict, section: str, where: str) -> dict[str, dict]:
    items = doc.get(section) or []
    if not isinstance(items, list):
        raise ClusterError(f"{where}: {section} must be a list")
    found = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            body = item.get(section[:-1])
            found[item["name"]] = body if isinstance(body, dict) else {}
    return found


def _b64(section: dict, field: str, where: str) -> bytes | None:
    value = section.get(field)
    if value is None:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ClusterError(f"{where}: {field} is not base64") from None


def _private_dir() -> Path:
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="gitopsd-cluster-", dir=parent))


class Connection:
    """An ApiClient for one endpoint and the private files it reads; `close` removes them."""

    def __init__(self, endpoint: Endpoint, *, budget: Budget) -> None:
        from kubernetes import client

        self.endpoint = endpoint
        self.dir = _private_dir()
        cfg = client.Configuration()
        cfg.host = endpoint.server
        try:
            if endpoint.ca_data is not None:
                cfg.ssl_ca_cert = self._write("ca.crt", endpoint.ca_data)
            elif endpoint.ca_file:
                cfg.ssl_ca_cert = endpoint.ca_file
            cfg.verify_ssl = not endpoint.insecure
            if endpoint.tls_server_name:
                cfg.tls_server_name = endpoint.tls_server_name
            if endpoint.cert_data is not None:
                from gitopsd import redact

                redact.remember([endpoint.key_data.decode(errors="replace")] if endpoint.key_data else [])
                cfg.cert_file = self._write("client.crt", endpoint.cert_data)
                cfg.key_file = self._write("client.key", endpoint.key_data or b"")
            elif endpoint.cert_file:
                cfg.cert_file, cfg.key_file = endpoint.cert_file, endpoint.key_file
            token = endpoint.token
            if token is None and endpoint.token_file:
                token = Path(endpoint.token_file).read_text().strip()
            if token:
                cfg.api_key = {"authorization": f"Bearer {token}"}
                from gitopsd import redact

                redact.remember([token])
            cfg.connection_pool_maxsize = budget.connection_pool_size
            self.api_client = client.ApiClient(cfg)
        except (OSError, ValueError) as exc:
            self.close()
            raise ClusterError(f"cannot set up the connection to {endpoint.server}: {exc}") from None

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return str(path)

    def close(self) -> None:
        api_client = getattr(self, "api_client", None)
        if api_client is not None:
            try:
                api_client.close()
            except Exception:  # noqa: BLE001 - closing a pool must not fail a rotation
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def read_source(home: Kube | None, cluster_name: str, cluster, *, namespace: str) -> tuple[str, bytes, Path | None]:
    """(where, the kubeconfig's bytes, the file it came from) for a cluster of the config;
    ClusterError saying what is missing. The Secret is read from gitopsd's `namespace` in `home`."""
    ref = cluster.kubeconfig
    if ref.file is not None:
        where = f"cluster {cluster_name}: kubeconfig file {ref.file}"
        try:
            return where, Path(ref.file).read_bytes(), Path(ref.file)
        except OSError as exc:
            raise ClusterError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    secret_ref = ref.secret_ref
    where = f"cluster {cluster_name}: kubeconfig Secret {namespace}/{secret_ref.name} (key {secret_ref.key})"
    if home is None:
        raise ClusterError(f"{where}: no connection to gitopsd's own cluster to read it from")
    secret = home.get(home.resource("v1", "Secret"), secret_ref.name, namespace)
    if secret is None:
        raise ClusterError(f"{where}: the Secret does not exist",
                           hint=f"kubectl -n {namespace} create secret generic {secret_ref.name} "
                                f"--from-file={secret_ref.key}=KUBECONFIG")
    data = (secret.get("data") or {}).get(secret_ref.key)
    if data is None:
        keys = ", ".join(sorted(secret.get("data") or {})) or "none"
        raise ClusterError(f"{where}: the Secret has no key {secret_ref.key!r} (keys: {keys})")
    try:
        return where, base64.b64decode(data), None
    except ValueError:
        raise ClusterError(f"{where}: the Secret's data is not base64") from None


def connect(home: Kube | None, cluster_name: str, cluster, *, namespace: str, budget: Budget | None = None) -> Kube:
    """A Kube for a cluster of the config (the CLI's way; the daemon keeps its connections in
    gitopsd.daemon.clusters, where they follow a rotated kubeconfig)."""
    where, text, path = read_source(home, cluster_name, cluster, namespace=namespace)
    endpoint = parse_kubeconfig(text, context=cluster.context, where=where, from_file=path)
    budget = budget or Budget()
    conn = Connection(endpoint, budget=budget)
    kube = Kube(conn.api_client, budget=budget)
    kube.on_close(conn.close)
    return kube
