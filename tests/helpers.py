"""Helpers shared by the cluster tests: real Git repositories and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada Author", "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Cy Committer", "GIT_COMMITTER_EMAIL": "cy@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}


class GitRepo:
    """A working clone pushing to a local bare repository (the "remote"), or
    to `remote` when given (a forge's push URL: no local bare one then)."""

    def __init__(self, root: Path, *, remote: str | None = None) -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        root.mkdir(parents=True, exist_ok=True)
        if remote is None:
            self._git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        self._git("init", "-q", "-b", "main", str(self.work), cwd=root)
        self._git("remote", "add", "origin", remote or str(self.bare))

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        env = {**os.environ, **GIT_ENV}
        return subprocess.run(["git", *args], cwd=cwd or self.work, env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    def write(self, path: str, content) -> None:
        """Write a file; dicts and lists of dicts become (multi-document) YAML."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        elif isinstance(content, list):
            content = yaml.safe_dump_all(content, sort_keys=False)
        target.write_text(content)

    def remove(self, path: str) -> None:
        self._git("rm", "-q", "-r", path)

    def commit(self, message: str = "change") -> str:
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        self._git("push", "-q", "origin", "main")
        return self._git("rev-parse", "HEAD")


def gitopsd(*args: str, kubeconfig: Path, cache: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real `gitopsd` command line; returns the completed process."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GITOPSD_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "gitopsd", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def gitopsd_json(*args: str, kubeconfig: Path, cache: Path, expect: int | None = None) -> tuple[int, dict]:
    proc = gitopsd(*args, "--output", "json", kubeconfig=kubeconfig, cache=cache)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (exit {proc.returncode}):\n{proc.stdout}\nstderr:\n{proc.stderr}") from None


def configmap(name: str, data: dict, **meta) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": data}


def deployment(name: str, *, replicas: int = 1, image: str = "nginx:1.27", **spec_extra) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": name, "image": image,
                                                       "ports": [{"containerPort": 80}]}]}},
                 **spec_extra},
    }


def release_cli(kubeconfig: Path, namespace: str, *args: str, wait: str = "60s") -> subprocess.CompletedProcess:
    """`gitopsd rollback|hold|resume ...` against the daemon of `namespace`, waiting for it to act."""
    return subprocess.run([sys.executable, "-m", "gitopsd", *args, "--namespace", namespace,
                           "--kubeconfig", str(kubeconfig), "--wait", wait],
                          capture_output=True, text=True, timeout=120)


def wait_for(what: str, check, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class DaemonProcess:
    """A real `gitopsd run` subprocess with JSON logs captured to a file."""

    def __init__(self, *, config: Path, kubeconfig: Path, namespace: str, workdir: Path, cache: Path,
                 extra: tuple[str, ...] = (), env: dict | None = None, name: str = "daemon") -> None:
        import socket as _socket

        with _socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = workdir / f"{name}.log"
        self.log_file = self.log_path.open("w")
        full_env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GITOPSD_CACHE": str(cache), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gitopsd", "run", "--config", str(config), "--namespace", namespace,
             "--http-address", "127.0.0.1", "--http-port", str(self.port), "--log-format", "json",
             "--instance", name, *extra],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env)
        self.url = f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_event(self, predicate, what: str, timeout: float = 30.0) -> dict:
        return wait_for(what, lambda: next((e for e in self.events() if predicate(e)), None), timeout,
                        interval=0.05)

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gitopsd run exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            return self.get("/readyz")[0] == 200
        wait_for("gitopsd /readyz", ready, timeout)

    def stop(self, sig=None) -> int:
        import signal as _signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or _signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


SECRET = "webhook-test-secret"   # the daemons started by the start_daemon fixture use it


def write_config(path: Path, apps: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"apps": apps}, sort_keys=False))
    return path


def app_entry(name: str, repo_url: str, namespace: str, **extra) -> dict:
    return {"name": name, "repo": repo_url, "ref": "main", "path": ".", "namespace": namespace,
            "interval": "1h", **extra}


def post_generic(daemon: DaemonProcess, repo_url: str, sha: str, *, secret: str = SECRET) -> tuple[int, str]:
    """A signed generic push webhook, as a CI job would send it."""
    import hashlib
    import hmac

    body = json.dumps({"repo": repo_url, "ref": "main", "after": sha}).encode()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return daemon.post("/hooks/generic", body, {"X-Gitopsd-Signature": sig, "Content-Type": "application/json"})


def cm_data(kube, namespace: str, name: str) -> dict | None:
    obj = kube.get(kube.resource("v1", "ConfigMap"), name, namespace)
    return None if obj is None else obj.get("data")


def blue_app_running(repo, kube, namespace, tmp_path, start_daemon, name: str, *flags: str, **entry):
    """The common daemon start: a repo with ConfigMap settings (color: blue), one
    app, a running daemon, and the first sync done."""
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    config = write_config(tmp_path / "config.yaml", [app_entry(name, repo.url, namespace, **entry)])
    daemon = start_daemon(config, *flags)
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)
    return daemon


def github_push(repo_url: str, sha: str, *, message: str = "a push") -> bytes:
    """The body GitHub sends for a push to main (trimmed to the fields gitopsd reads)."""
    return json.dumps({
        "ref": "refs/heads/main", "before": "0" * 39 + "1", "after": sha,
        "repository": {"full_name": "org/fleet", "clone_url": repo_url, "html_url": "https://github.com/org/fleet"},
        "head_commit": {"id": sha, "message": message},
    }).encode()


def post_github(daemon: DaemonProcess, body: bytes, *, delivery: str | None = None,
                secret: str = SECRET) -> tuple[int, str]:
    """A signed GitHub push delivery (a fresh delivery id unless `delivery` repeats one)."""
    import hashlib
    import hmac
    import uuid

    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return daemon.post("/hooks/github", body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": sig,
                                               "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
                                               "Content-Type": "application/json"})


def transitions(daemon: DaemonProcess, app: str | None = None) -> list[dict]:
    """The transition records the daemon logged (one JSON line each; drift records left out), oldest first."""
    return [e for e in daemon.events() if e.get("event") == "audit" and e.get("type") == "transition"
            and (app is None or e.get("app") == app)]


def wait_transition(daemon: DaemonProcess, what: str, timeout: float = 30.0, **fields) -> dict:
    """The first logged transition record whose fields include `fields`."""
    return daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("type") == "transition"
                             and all(e.get(k) == v for k, v in fields.items()), what, timeout)


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, read from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text = daemon.get("/metrics")
    assert code == 200, text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def replace_file(path: Path, text: str | bytes) -> None:
    """Write a file the way editors save and tools deploy: a new file renamed over the old."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)


# ---------------------------------------------------------------- faults (tests/test_faults.py)

TRACEBACK = "Traceback (most recent call last)"


def assert_no_traceback(text: str, where: str) -> None:
    """A user-facing stream (CLI stderr, daemon log) never carries a Python traceback."""
    assert TRACEBACK not in text, f"a Python traceback in {where}:\n{text[max(0, text.index(TRACEBACK) - 300):][:3000]}"
    if where.startswith("daemon"):
        crashes = [line for line in text.splitlines() if '"exception":' in line]
        assert not crashes, f"an exception logged in {where}:\n{crashes[0][:3000]}"


def snapshot(kube, namespace: str, *, api_version: str = "v1", kind: str = "ConfigMap",
             selector: str | None = None) -> dict[str, tuple[str, str]]:
    """{name: (uid, resourceVersion)} of every object of a kind in a namespace, to compare before/after."""
    res = kube.resource(api_version, kind)
    return {o["metadata"]["name"]: (o["metadata"]["uid"], o["metadata"]["resourceVersion"])
            for o in kube.list(res, namespace=namespace, label_selector=selector)}


def audit_verify(app: str, *, kubeconfig: Path, namespace: str, cache: Path, ok: bool = True) -> str:
    """Run `gitopsd audit verify APP`; assert the verdict (exit 0 and OK, or exit 1 and BROKEN)."""
    proc = gitopsd("audit", "verify", app, "--namespace", namespace, kubeconfig=kubeconfig, cache=cache)
    assert_no_traceback(proc.stderr, "`gitopsd audit verify` stderr")
    want = 0 if ok else 1
    assert proc.returncode == want, f"audit verify exit {proc.returncode}, wanted {want}:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith("OK:" if ok else "BROKEN:"), proc.stdout
    return proc.stdout.strip()


def audit_events(daemon: DaemonProcess, app: str | None = None, **match) -> list[dict]:
    """The audit records a daemon logged, optionally only those whose fields equal `match`."""
    return [e for e in daemon.events() if e.get("event") == "audit" and (app is None or e.get("app") == app)
            and all(e.get(k) == v for k, v in match.items())]


def wait_audit(daemon: DaemonProcess, what: str, *, timeout: float = 60.0, after: int = 0, **match) -> dict:
    """The first audit record (beyond the first `after` matching ones) whose fields equal `match`."""
    return wait_for(what, lambda: (audit_events(daemon, **match)[after:] or [None])[0], timeout, interval=0.1)


def assert_serving(daemon: DaemonProcess, *, ready: bool = True) -> None:
    """The daemon's HTTP port answers: /healthz ok (and /readyz ok when `ready`)."""
    code, body = daemon.get("/healthz")
    assert code == 200, f"/healthz answered {code}: {body}"
    if ready:
        code, body = daemon.get("/readyz")
        assert code == 200, f"/readyz answered {code}: {body}"


def configmaps(count: int, prefix: str = "cm", **data) -> list[dict]:
    """`count` small ConfigMaps, for apps whose apply takes long enough to be interrupted."""
    return [configmap(f"{prefix}-{i:03d}", {"i": str(i), **data}) for i in range(count)]


def list_pages(kube, api_version: str, kind: str, *, label_selector: str, page: int = 500) -> int:
    """Requests a list of these objects takes now, `page` to a request (at least one).

    A shared test cluster holds other tests' objects too, so a test that
    counts an informer's list requests counts its pages as they are.
    """
    found = kube.list(kube.resource(api_version, kind), label_selector=label_selector)
    return max(1, -(-len(found) // page))


def service_account_kubeconfig(kube, kubeconfig: Path, namespace: str, directory: Path, *, name: str,
                               rules: list[dict]) -> Path:
    """A kubeconfig for a new ServiceAccount `name` in `namespace` that holds only `rules`
    (a ClusterRole of the same name, cluster-wide), with a token from a TokenRequest.

    Admin certificates are in system:masters, which RBAC lets do anything and
    API Priority and Fairness exempts; this identity is an ordinary one.
    The ClusterRole and its binding are cluster-scoped: delete them with
    delete_service_account_rbac(kube, name).
    """
    kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                 body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.request("POST", f"{rbac}/clusterroles", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
        "rules": rules})
    kube.request("POST", f"{rbac}/clusterrolebindings", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
    token = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                         body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": 3600}})["status"]["token"]
    admin = yaml.safe_load(kubeconfig.read_text())
    user = admin["contexts"][0]["context"]["user"]
    admin["users"] = [{"name": user, "user": {"token": token}}]
    path = directory / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    return path


def delete_service_account_rbac(kube, name: str) -> None:
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for kind in ("clusterrolebindings", "clusterroles"):
        try:
            kube.request("DELETE", f"{rbac}/{kind}/{name}")
        except Exception:  # noqa: BLE001 - already gone
            pass


def put_secret(kube, namespace: str, name: str, data: dict[str, str]) -> None:
    """Create a Secret of `data` (stringData) in `namespace`."""
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})
