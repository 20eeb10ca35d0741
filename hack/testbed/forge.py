"""A real Gitea for the test bed: a forge on 127.0.0.1 that tests push to.

gitopsd talks to forges twice: a push webhook tells it a branch moved, and
the notifier posts commit statuses back. Both are protocols another server
defines (headers, signatures, payload fields, API paths, token scopes), so
their tests need a real one. Gitea is one Go binary (build.py builds it from
its module, pinned) with a sqlite database: it starts in about two seconds
in a directory of its own and needs no network but loopback.

What `start` sets up, and why (keys in `_app_ini`):

- `I_AM_BEING_UNSAFE_RUNNING_AS_ROOT`: CI and this machine run as root, and
  Gitea refuses to start as root without it.
- `INSTALL_LOCK`, `SECRET_KEY`, `INTERNAL_TOKEN` (random, per start): no
  web installer. The internal token is what the git hooks Gitea installs in
  each repository present to its private API on a push; it is compared as
  an opaque string, so any random one does.
- `[security] ALLOWED_HOST_LIST = loopback`: Gitea refuses to deliver
  webhooks to 127.0.0.1 otherwise ("webhook can only call allowed HTTP
  servers"). Up to 1.26 the key was under `[webhook]`; 1.27 reads it there
  only as a fallback and logs a deprecation error, so a pin below 1.27
  needs it moved back.
- `[queue] TYPE = channel`: in-memory queues. The default level queue
  polls with a backoff and delivered webhooks 2.4-4 s after a push; a
  channel queue takes 0.2-0.8 s.
- `STATIC_ROOT_PATH`: the binary is built without `bindata`, so it reads
  its locales and templates from build.gitea_static_dir() (startup fails
  without the locales).
- No SSH server, no LFS, no mailer, no update checker, no registration, no
  repository indexer: nothing that listens or dials out beyond the HTTP port.

An admin user is made with the `gitea admin` command (it writes the
database directly), then a token of scope `all` through the API with that
user's password, as a person would. Repositories are private unless asked
otherwise, so a fetch without credentials is refused, as on a real forge.

Ports: Gitea binds the port it is given; it cannot pick one and say which.
`free_port` races other processes, so a start that loses is retried once
with a fresh port. Gitea does not exit when its bind fails: it logs the error
and waits for a signal, so the start reads its log for that line rather
than waiting for an exit or a timeout. Processes run in their
own session and are stopped by PID after checking that they still run with
this directory in their command line (procs.py). One log, `log/gitea.log`:
Gitea logs to its console, which goes there with the admin command's output,
so a failure's tail shows what happened in order.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

from . import build, procs

START_TIMEOUT = 60.0
API_TIMEOUT = 10.0
PROBE_TIMEOUT = 2.0  # a process that took our port may accept and never answer
ADMIN = "gitopsd-admin"
PORT_TAKEN = "bind: address already in use"  # Gitea's log line when another process took the port
# Loopback only, never through a proxy a developer's environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ForgeError(RuntimeError):
    """Gitea could not start, or an API call failed; the message says why (with a log tail)."""


@dataclass(frozen=True)
class Repo:
    """A repository on the forge."""

    owner: str
    name: str
    clone_url: str  # http://127.0.0.1:PORT/owner/name.git, without credentials

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class Gitea:
    """A running Gitea: its URL, an admin and the admin's token."""

    dir: Path
    port: int
    pid: int
    password: str
    token: str = ""
    user: str = ADMIN

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (the API is under /api/v1)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return log_path(self.dir)

    def alive(self) -> bool:
        return procs.is_ours(self.pid, self.dir)

    def api(self, method: str, path: str, body: dict | None = None, *, token: str | None = None,
            expect: tuple[int, ...] = (200, 201, 204)) -> object:
        """Call /api/v1`path` with the admin's token (or `token`); the decoded JSON answer.

        Raises ForgeError naming the call, the status and the start of the
        answer when the status is not in `expect`."""
        status, answer = self.request(method, path, body, token=token)
        if status not in expect:
            raise ForgeError(f"{method} {path}: HTTP {status}: {str(answer)[:300]}")
        return answer

    def request(self, method: str, path: str, body: dict | None = None, *, token: str | None = None,
                basic: tuple[str, str] | None = None, timeout: float = API_TIMEOUT) -> tuple[int, object]:
        """(status, decoded JSON or text) of an API call; authenticated by a token unless `basic`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if basic:
            headers["Authorization"] = "Basic " + b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        elif token or self.token:
            headers["Authorization"] = f"token {token or self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/api/v1{path}", data=data, headers=headers, method=method)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError as exc:
            raise ForgeError(f"{method} {path}: Gitea at {self.url} did not answer: {exc}") from None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def create_repo(self, name: str, *, private: bool = True) -> Repo:
        """An empty repository of the admin's, default branch main."""
        made = self.api("POST", "/user/repos", {"name": name, "private": private, "auto_init": False,
                                                 "default_branch": "main"})
        return Repo(owner=made["owner"]["login"], name=made["name"], clone_url=made["clone_url"])

    def add_webhook(self, repo: Repo, *, url: str, secret: str, events: tuple[str, ...] = ("push",)) -> int:
        """A Gitea-type hook posting JSON to `url`, signed with `secret`; returns its id.

        Gitea sends GitHub's headers (X-GitHub-Event, X-Hub-Signature-256,
        X-GitHub-Delivery) beside its own (X-Gitea-*) on every hook type."""
        hook = self.api("POST", f"/repos/{repo.full_name}/hooks", {
            "type": "gitea", "active": True, "events": list(events), "branch_filter": "*",
            "config": {"url": url, "content_type": "json", "secret": secret}})
        return hook["id"]

    def statuses(self, repo: Repo, sha: str) -> list[dict]:
        """Every commit status posted on `sha`, oldest first."""
        return self.api("GET", f"/repos/{repo.full_name}/commits/{sha}/statuses?sort=oldest&limit=50")

    def push_url(self, repo: Repo) -> str:
        """The clone URL with the admin's name and token in it, for `git push` in tests."""
        parts = urllib.parse.urlsplit(repo.clone_url)
        return parts._replace(netloc=f"{self.user}:{self.token}@{parts.netloc}").geturl()

    def stop(self) -> bool:
        """Stop Gitea (SIGTERM, then SIGKILL after 10 s); True when it was running."""
        return bool(procs.stop({"gitea": self.pid}, owner=self.dir))


def _app_ini(*, root: Path, port: int) -> str:
    url = f"http://127.0.0.1:{port}/"
    return f"""\
APP_NAME = gitopsd-test-forge
RUN_MODE = prod
WORK_PATH = {root}
I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true

[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = {port}
DOMAIN = 127.0.0.1
ROOT_URL = {url}
LOCAL_ROOT_URL = {url}
STATIC_ROOT_PATH = {build.gitea_static_dir()}
APP_DATA_PATH = {root / "data"}
DISABLE_SSH = true
START_SSH_SERVER = false
LFS_START_SERVER = false

[database]
DB_TYPE = sqlite3
PATH = {root / "data" / "gitea.db"}
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT = {root / "repos"}
DEFAULT_BRANCH = main

[git]
HOME_PATH = {root / "home"}

[security]
INSTALL_LOCK = true
SECRET_KEY = {secrets.token_urlsafe(32)}
INTERNAL_TOKEN = {secrets.token_urlsafe(48)}
PASSWORD_HASH_ALGO = pbkdf2_hi
ALLOWED_HOST_LIST = loopback

[webhook]
DELIVER_TIMEOUT = 5

[queue]
TYPE = channel

[service]
DISABLE_REGISTRATION = true

[oauth2]
ENABLED = false

[mailer]
ENABLED = false

[cron.update_checker]
ENABLED = false

[indexer]
REPO_INDEXER_ENABLED = false

[log]
MODE = console
LEVEL = Info
ROOT_PATH = {root / "log"}
"""


def log_path(root: Path) -> Path:
    """The log of the Gitea in `root` (its console and the admin command's output)."""
    return root / "log" / "gitea.log"


def _ini(root: Path) -> Path:
    return root / "custom" / "conf" / "app.ini"


def _layout(root: Path, *, port: int) -> None:
    """A fresh directory tree and app.ini for a server on `port`."""
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("custom/conf", "data", "log", "repos", "home"):
        (root / sub).mkdir(parents=True)
    _ini(root).write_text(_app_ini(root=root, port=port))


def _gitea_argv(root: Path, *args: str) -> list[str]:
    return [str(build.binary("gitea")), "--config", str(_ini(root)), "--work-path", str(root),
            "--custom-path", str(root / "custom"), *args]


def _serve(root: Path, *, timeout: float) -> Gitea:
    """Start `gitea web` on a fresh free port; return once its API answers."""
    port = procs.free_port()
    _layout(root, port=port)
    log = log_path(root)
    pid = procs.spawn(_gitea_argv(root, "web"), log=log, cwd=root)
    gitea = Gitea(dir=root, port=port, pid=pid, password=secrets.token_urlsafe(18))

    def answering() -> tuple[bool, str]:
        if PORT_TAKEN in log.read_text(errors="replace"):
            # Gitea logs a failed bind and keeps running, waiting for a signal: fail now.
            raise ForgeError(f"Gitea could not listen on port {port} ({PORT_TAKEN}); log {log}:\n{procs.tail(log)}")
        try:
            status, _ = gitea.request("GET", "/version", timeout=PROBE_TIMEOUT)
        except ForgeError as exc:  # refused while it starts: not a failure yet
            return False, str(exc)
        return status == 200, f"/api/v1/version: HTTP {status}"
    try:
        procs.wait_until("Gitea's API to answer", name="gitea", pid=pid, owner=root, log=log, check=answering,
                         timeout=timeout, error=ForgeError)
    except BaseException:
        gitea.stop()
        raise
    return gitea


def _create_admin(gitea: Gitea) -> None:
    """The admin user, made with the CLI (it writes the database directly: no API user can yet)."""
    argv = _gitea_argv(gitea.dir, "admin", "user", "create", "--admin", "--username", gitea.user,
                       "--password", gitea.password, "--email", f"{gitea.user}@example.invalid",
                       "--must-change-password=false")
    with gitea.log.open("ab") as out:
        proc = subprocess.run(argv, cwd=gitea.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=60)
    if proc.returncode != 0:
        raise ForgeError(f"`gitea admin user create` failed (exit {proc.returncode}); log {gitea.log}:\n"
                         f"{procs.tail(gitea.log)}")


def _create_token(gitea: Gitea) -> None:
    """The admin's token (scope all), asked for with its password as a person would."""
    status, answer = gitea.request("POST", f"/users/{gitea.user}/tokens",
                                   {"name": f"tests-{secrets.token_hex(4)}", "scopes": ["all"]},
                                   basic=(gitea.user, gitea.password))
    if status != 201 or not isinstance(answer, dict) or not answer.get("sha1"):
        raise ForgeError(f"creating the admin's token: HTTP {status}: {str(answer)[:300]}")
    gitea.token = answer["sha1"]


def start(root: Path, *, timeout: float = START_TIMEOUT) -> Gitea:
    """Start a Gitea in `root` (emptied first) with an admin and its token.

    Needs `hack/cluster build` (the gitea binary and its static dirs):
    FileNotFoundError with that hint otherwise. Raises ForgeError with the
    log's tail when it does not come up; nothing is left running then.
    A lost port race is retried once with a fresh port."""
    build.binary("gitea")
    if not (build.gitea_static_dir() / "options").is_dir():
        raise FileNotFoundError(f"{build.gitea_static_dir()}/options is missing: run `hack/cluster build "
                                f"--only gitea` (Gitea reads its locales and templates from there)")
    for attempt in (1, 2):
        try:
            gitea = _serve(root, timeout=timeout)
            break
        except ForgeError as exc:
            if attempt == 2 or PORT_TAKEN not in str(exc):
                raise
    try:
        _create_admin(gitea)
        _create_token(gitea)
    except BaseException:
        gitea.stop()
        raise
    return gitea

