"""Source stage: fetch a ref from a real git remote into the cache.

Every test builds real repositories in tmp_path with the git CLI (a bare
"remote" and a working clone that pushes to it) and fetches over a real
transport: file://, a local path, smart HTTP (`git http-backend` behind Basic
auth) and ssh (a private sshd on 127.0.0.1).
"""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from gitserver import GitHTTPServer

from gitopsd.engine import source
from gitopsd.engine.source import Checkout, Credentials, fetch
from gitopsd.errors import SourceError

TOKEN = "ghp_s3cr3t-T0KEN-for-tests-only"
WRONG_TOKEN = "ghp_wrong-token-nobody-issued"


@pytest.fixture(autouse=True)
def git_identity(monkeypatch) -> None:
    """Commits made by tests get a fixed identity; no global config is read."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Alice Author")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "alice@example.org")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Bob Committer")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "bob@example.org")
    for key in ("GIT_AUTHOR_DATE", "GIT_COMMITTER_DATE"):
        monkeypatch.delenv(key, raising=False)


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    )
    return done.stdout.strip()


class Upstream:
    """A bare repository (the remote) and a working clone that pushes to it."""

    def __init__(self, root: Path, name: str = "remote.git") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.bare = root / name
        self.work = root / f"{name}-work"
        git("init", "--quiet", "--bare", "--initial-branch=main", str(self.bare), cwd=root)
        git("init", "--quiet", "--initial-branch=main", str(self.work), cwd=root)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(
        self, files: dict[str, str | None], message: str = "change", *, branch: str = "main", date: str | None = None
    ) -> str:
        """Write (or with None delete) files, commit, push; return the SHA."""
        for name, content in files.items():
            path = self.work / name
            if content is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
        git("add", "--all", cwd=self.work)
        env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {}
        git("commit", "--quiet", "--allow-empty", "-m", message, cwd=self.work, env=env)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def tag(self, name: str, rev: str, *, annotated: bool) -> None:
        args = ["tag", "-a", "-m", f"release {name}", name, rev] if annotated else ["tag", name, rev]
        git(*args, cwd=self.work)
        git("push", "--quiet", "origin", f"refs/tags/{name}", cwd=self.work)


def tree_of(checkout: Checkout) -> dict[str, str]:
    """Every file in the checkout (relative path -> content, or '-> target' for symlinks)."""
    found = {}
    for path in sorted(checkout.path.rglob("*")):
        rel = path.relative_to(checkout.path).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = path.read_text()
    return found


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_bytes_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path / "upstream")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --- resolving refs and reading commits -----------------------------------------


def test_fetch_branch_reads_commit_metadata(upstream, cache):
    upstream.commit({"app.yaml": "kind: ConfigMap\n"}, "first")
    sha = upstream.commit(
        {"app.yaml": "kind: Deployment\n"},
        "Scale the web tier\n\nTwo more replicas for the launch.\n",
        date="2024-03-01T12:00:00+02:00",
    )

    checkout = fetch(upstream.url, "main", cache_dir=cache)

    rev = checkout.revision
    assert rev.url == upstream.url
    assert rev.ref == "main"
    assert rev.sha == sha
    assert rev.author == "Alice Author <alice@example.org>"
    assert rev.committer == "Bob Committer <bob@example.org>"
    assert rev.message == "Scale the web tier\n\nTwo more replicas for the launch."
    assert rev.time == datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc)
    assert rev.time.utcoffset().total_seconds() == 0
    assert (checkout.path / "app.yaml").read_text() == "kind: Deployment\n"


def test_fetch_head_follows_the_remote_default_branch_and_plain_paths_work(upstream, cache):
    sha = upstream.commit({"a": "1"})
    upstream.commit({"a": "2"}, branch="other")

    by_uri = fetch(upstream.url, cache_dir=cache)
    by_path = fetch(str(upstream.bare), "HEAD", cache_dir=cache)

    assert by_uri.revision.sha == by_path.revision.sha == sha
    assert by_path.revision.url == str(upstream.bare)


def test_fetch_tag_and_full_sha(upstream, cache):
    old = upstream.commit({"version": "1"}, "v1")
    upstream.tag("v1.0.0", old, annotated=True)
    upstream.tag("light", old, annotated=False)
    new = upstream.commit({"version": "2"}, "v2")

    annotated = fetch(upstream.url, "v1.0.0", cache_dir=cache)
    lightweight = fetch(upstream.url, "light", cache_dir=cache)
    full = fetch(upstream.url, old, cache_dir=tmp_cache(cache, "full"))
    tip = fetch(upstream.url, "main", cache_dir=cache)

    for checkout in (annotated, lightweight, full):
        assert checkout.revision.sha == old  # a tag is peeled to its commit
        assert tree_of(checkout) == {"version": "1"}
    assert full.revision.ref == old
    assert tip.revision.sha == new


def test_abbreviated_sha_is_refused_and_nothing_but_the_ref_is_fetched(upstream, cache):
    old = upstream.commit({"version": "1"}, "v1")
    upstream.commit({"other": "work"}, "pushed elsewhere", branch="feature")
    upstream.tag("v9", upstream.commit({"version": "2"}, "v2"), annotated=False)

    with pytest.raises(SourceError) as err:
        fetch(upstream.url, old[:7], cache_dir=cache)

    assert f"ref '{old[:7]}' is no branch or tag of {upstream.url}" in str(err.value)
    assert "all 40 hex digits" in err.value.hint
    # Nothing of the remote's branches and tags was fetched to look for it.
    [home] = cache.iterdir()
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)"], cwd=home / "repo.git",
                          capture_output=True, text=True, check=True).stdout.split()
    assert refs == []


def test_fetching_a_branch_fetches_that_branch_only(upstream, cache):
    tip = upstream.commit({"f": "1"})
    upstream.commit({"other": "work"}, "pushed elsewhere", branch="feature")
    upstream.tag("v1", tip, annotated=False)

    fetch(upstream.url, "main", cache_dir=cache)

    [home] = cache.iterdir()
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)"], cwd=home / "repo.git",
                          capture_output=True, text=True, check=True).stdout.split()
    assert refs == ["refs/heads/main"]


def tmp_cache(cache: Path, name: str) -> Path:
    """A separate cache, so a SHA lookup cannot be served by an earlier fetch."""
    return cache.parent / f"{cache.name}-{name}"


def test_sha_the_remote_will_not_serve_directly_is_found_by_a_full_fetch(upstream, cache, monkeypatch):
    old = upstream.commit({"f": "old"})
    upstream.commit({"f": "new"})
    # Protocol v0 refuses a `want` for a commit no ref advertises, so the
    # shallow fetch by SHA fails and only the full-fetch fallback can work.
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "protocol.version")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "0")

    checkout = fetch(upstream.url, old, cache_dir=cache)

    assert checkout.revision.sha == old
    assert tree_of(checkout) == {"f": "old"}


def test_full_sha_already_cached_needs_no_network(upstream, cache):
    sha = upstream.commit({"f": "1"})
    first = fetch(upstream.url, sha, cache_dir=cache)
    shutil.rmtree(upstream.bare)  # the remote is gone; the commit is immutable

    again = fetch(upstream.url, sha, cache_dir=cache)

    assert again == first


# --- the cache --------------------------------------------------------------------


def test_second_fetch_reuses_cache_and_sees_new_commit(upstream, cache):
    first_sha = upstream.commit({"f": "1"})
    first = fetch(upstream.url, "main", cache_dir=cache)
    [home] = cache.iterdir()
    repo = home / "repo.git"
    assert (repo / "shallow").is_file(), "the first fetch should be shallow"
    marker = repo / "gitopsd-test-marker"
    marker.write_text("still the same repository")
    inode = repo.stat().st_ino

    second_sha = upstream.commit({"f": "2"})
    second = fetch(upstream.url, "main", cache_dir=cache)

    assert first.revision.sha == first_sha
    assert second.revision.sha == second_sha
    assert marker.read_text() == "still the same repository"  # fetched, not re-cloned
    assert repo.stat().st_ino == inode
    assert (first.path / "f").read_text() == "1"  # an earlier checkout stays readable
    assert (second.path / "f").read_text() == "2"
    assert second.path.parent == first.path.parent == home / "checkouts"


def test_checkout_holds_exactly_the_commit_tree(upstream, cache):
    first = upstream.commit({"base/a.yaml": "a", "base/b.yaml": "b", "README": "hi"})
    upstream.commit({"base/a.yaml": None, "overlays/prod/c.yaml": "c", "base/b.yaml": "b2"})
    script = upstream.work / "hack.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (upstream.work / "link.yaml").symlink_to("base/b.yaml")
    second = upstream.commit({})

    one = fetch(upstream.url, first, cache_dir=cache)
    two = fetch(upstream.url, second, cache_dir=cache)

    assert tree_of(one) == {"README": "hi", "base/a.yaml": "a", "base/b.yaml": "b"}
    assert tree_of(two) == {
        "README": "hi",
        "base/b.yaml": "b2",
        "hack.sh": "#!/bin/sh\n",
        "link.yaml": "-> base/b.yaml",
        "overlays/prod/c.yaml": "c",
    }
    assert os.access(two.path / "hack.sh", os.X_OK)
    assert not (two.path / ".git").exists()
    assert one.path.name == first and two.path.name == second


def test_old_checkouts_are_collected_but_the_newest_kept(upstream, cache):
    shas = [upstream.commit({"n": str(i)}) for i in range(source.KEEP_CHECKOUTS + 2)]

    paths = [fetch(upstream.url, sha, cache_dir=cache).path for sha in shas]

    kept = sorted(p.name for p in paths[0].parent.iterdir())
    assert kept == sorted(shas[-source.KEEP_CHECKOUTS :])
    assert not paths[0].exists() and not paths[1].exists()


def test_concurrent_fetches_of_one_repo_are_safe(upstream, cache):
    old = upstream.commit({f"f{i}": str(i) for i in range(50)}, "old")
    upstream.tag("v1", old, annotated=True)
    tip = upstream.commit({"f0": "changed"}, "tip")
    refs = ["main", "v1", old, "HEAD", "refs/heads/main", tip] * 2
    barrier = threading.Barrier(len(refs))
    results: dict[int, Checkout | BaseException] = {}

    def worker(i: int, ref: str) -> None:
        barrier.wait()
        try:
            results[i] = fetch(upstream.url, ref, cache_dir=cache, timeout=30)
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i, ref)) for i, ref in enumerate(refs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert all(isinstance(r, Checkout) for r in results.values()), results
    assert len(results) == len(refs)
    for i, ref in enumerate(refs):
        checkout = results[i]
        expected = tip if ref in ("main", "HEAD", "refs/heads/main", tip) else old
        assert checkout.revision.sha == expected
        assert len(tree_of(checkout)) == 50
        assert (checkout.path / "f0").read_text() == ("changed" if expected == tip else "0")
    [home] = cache.iterdir()
    assert sorted(p.name for p in (home / "checkouts").iterdir()) == sorted({old, tip})


def test_a_cache_held_by_another_process_is_waited_for_and_the_timeout_kept(upstream, cache):
    import fcntl
    import sys

    upstream.commit({"f": "1"})
    fetch(upstream.url, "main", cache_dir=cache)   # creates the cache and its lock file
    [home] = cache.iterdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({str(home / 'lock')!r}, 'a+b'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SourceError, match="timed out after 0.5s"):
            fetch(upstream.url, "main", cache_dir=cache, timeout=0.5)
        threading.Timer(0.3, lambda: (holder.stdin.write("\n"), holder.stdin.flush())).start()
        assert fetch(upstream.url, "main", cache_dir=cache, timeout=30).revision.sha
    finally:
        holder.kill()
        holder.wait()
    with open(home / "lock", "a+b") as f:   # nobody holds it now: no thread of ours kept it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_describe_names_each_paths_object_without_following_symlinks(upstream, cache):
    upstream.commit({"apps/a/cm.yaml": "a", "apps/b/cm.yaml": "b"})
    os.symlink("apps/a", upstream.work / "current")
    upstream.commit({})
    checkout = fetch(upstream.url, "main", cache_dir=cache)

    described = source.describe(checkout, [".", "apps/a", "apps/a/cm.yaml", "current", "current/cm.yaml", "nope"])

    tree = git("rev-parse", "HEAD:apps/a", cwd=upstream.work)
    assert described["apps/a"] == f"040000 tree {tree}"
    assert described["apps/a/cm.yaml"].startswith("100644 blob ")
    assert described["current"].startswith("120000 blob ")   # the link itself: its target's name
    assert described["current/cm.yaml"] == described["nope"] == "missing"
    assert described["."] == f"040000 tree {git('rev-parse', 'HEAD^{tree}', cwd=upstream.work)}"
    assert source.describe(Checkout(revision=checkout.revision, path=checkout.path), ["."]) is None


# --- errors ---------------------------------------------------------------------


def test_unknown_ref_is_a_clear_error(upstream, cache):
    upstream.commit({"f": "1"})

    for ref in ("nope", "0" * 40):
        with pytest.raises(SourceError) as caught:
            fetch(upstream.url, ref, cache_dir=cache)
        assert caught.value.message == f"ref {ref!r} not found in {upstream.url}: no such branch, tag or commit"
        assert caught.value.hint


def test_ref_with_revision_syntax_is_refused(upstream, cache):
    upstream.commit({"f": "1"})

    for ref in ("main~1", "--upload-pack=evil", "HEAD@{1}", "a:b"):
        with pytest.raises(SourceError, match=r"invalid ref"):
            fetch(upstream.url, ref, cache_dir=cache)


def test_unreachable_remote_is_a_clear_error(tmp_path, cache):
    missing = (tmp_path / "no-such-repo.git").as_uri()
    refused = f"http://127.0.0.1:{closed_port()}/repo.git"

    for url in (missing, refused):
        with pytest.raises(SourceError) as caught:
            fetch(url, "main", cache_dir=cache, timeout=10)
        message = caught.value.message
        assert message.startswith(f"cannot reach {url} (fetching ref 'main'): ")
        assert "hint: check the URL" in str(caught.value)
    assert "does not appear to be a git repository" in str(caught.value) or "Failed to connect" in message


def test_slow_remote_times_out_with_a_clear_error(cache):
    # A listening socket nobody accepts from: the TCP handshake succeeds, and
    # git waits forever for an HTTP answer.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/repo.git"
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            fetch(url, "main", cache_dir=cache, timeout=1.0)
        elapsed = time.monotonic() - started

    assert caught.value.message == f"fetching ref 'main' from {url} timed out after 1s"
    assert elapsed < 5


# --- https with a token -----------------------------------------------------------


@pytest.fixture
def http_server(tmp_path) -> GitHTTPServer:
    server = GitHTTPServer(root=tmp_path / "upstream", username="deploy", token=TOKEN).start()
    yield server
    server.stop()


class ArgvRecorder:
    """Wraps subprocess.Popen to keep every argv and environment git ran with."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        real = subprocess.Popen
        recorder = self

        class Recording(real):  # type: ignore[misc, valid-type]
            def __init__(self, args, *a, **kw):
                recorder.calls.append((list(args), dict(kw.get("env") or os.environ)))
                super().__init__(args, *a, **kw)

        monkeypatch.setattr(source.subprocess, "Popen", Recording)


def test_https_token_auth_against_local_http_server(upstream, http_server, cache, monkeypatch):
    sha = upstream.commit({"f": "1"})
    url = http_server.url("remote.git")
    recorder = ArgvRecorder(monkeypatch)

    ok = fetch(url, "main", cache_dir=cache, credentials=Credentials(username="deploy", token=TOKEN))
    with pytest.raises(SourceError) as wrong:
        fetch(url, "main", cache_dir=cache, credentials=Credentials(username="deploy", token=WRONG_TOKEN))
    with pytest.raises(SourceError) as missing:
        fetch(url, "main", cache_dir=cache)

    assert ok.revision.sha == sha and tree_of(ok) == {"f": "1"}
    header = "Basic " + base64.b64encode(f"deploy:{TOKEN}".encode()).decode()
    assert header in http_server.auth_headers  # it really went over HTTP auth
    assert wrong.value.message.startswith(f"authentication to {url} failed while fetching ref 'main': ")
    assert "token" in wrong.value.hint
    assert missing.value.message.startswith(f"authentication to {url} failed")
    assert "needs credentials" in missing.value.hint
    secrets = [TOKEN, WRONG_TOKEN, base64.b64encode(f"deploy:{TOKEN}".encode()).decode()]
    for secret in secrets:
        for error in (wrong.value, missing.value):
            assert secret not in str(error) and secret not in repr(error)
        assert secret.encode() not in all_bytes_under(cache)
    git_calls = [(argv, env) for argv, env in recorder.calls if argv[0] == "git"]
    assert git_calls
    for argv, env in git_calls:
        assert not any(s in arg for s in secrets for arg in argv)
        assert env["GIT_TERMINAL_PROMPT"] == "0"
        leaks = {k for k, v in env.items() if any(s in v for s in secrets)}
        assert leaks <= {k for k in env if k.startswith("GIT_CONFIG_VALUE_")}


def test_token_in_the_url_is_used_and_never_stored(upstream, http_server, cache):
    sha = upstream.commit({"f": "1"})
    url = http_server.url("remote.git")
    with_secret = url.replace("http://", f"http://deploy:{TOKEN}@")

    checkout = fetch(with_secret, "main", cache_dir=cache)

    assert checkout.revision.sha == sha
    assert checkout.revision.url == url
    assert TOKEN.encode() not in all_bytes_under(cache)
    assert "deploy" not in "".join(p.name for p in cache.iterdir())
    assert TOKEN not in repr(Credentials(token=TOKEN))


# --- ssh ------------------------------------------------------------------------


class SSHServer:
    """sshd on 127.0.0.1 with its own host key, config and authorized_keys."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.host_key = self._keygen("host_key")
        self.user_key = self._keygen("user_key")
        self.stranger_key = self._keygen("stranger_key")
        (root / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.port = closed_port()
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "LogLevel ERROR",
                ]
            )
            + "\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.process = subprocess.Popen(
            [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(config), "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=(root / "sshd.log").open("wb"),
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}") from None
                time.sleep(0.05)
        host_pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        wrong_pub = Path(f"{self.stranger_key}.pub").read_text().split()
        self.wrong_known_hosts = root / "wrong_known_hosts"
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {wrong_pub[0]} {wrong_pub[1]}\n")

    def _keygen(self, name: str) -> Path:
        path = self.root / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
        return path

    def url(self, path: Path) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def sshd(tmp_path) -> SSHServer:
    server = SSHServer(tmp_path / "sshd")
    yield server
    server.stop()


def test_ssh_fetch_with_deploy_key_and_known_hosts(upstream, sshd, cache):
    sha = upstream.commit({"f": "over ssh"})
    url = sshd.url(upstream.bare)

    checkout = fetch(
        url,
        "main",
        cache_dir=cache,
        credentials=Credentials(ssh_key_file=sshd.user_key, known_hosts_file=sshd.known_hosts),
    )

    assert checkout.revision.sha == sha
    assert checkout.revision.url == url  # the ssh user stays: it picks the account
    assert tree_of(checkout) == {"f": "over ssh"}


def test_ssh_wrong_known_hosts_is_a_host_key_error(upstream, sshd, cache):
    upstream.commit({"f": "1"})
    url = sshd.url(upstream.bare)
    empty = sshd.root / "empty_known_hosts"
    empty.write_text("")

    for known_hosts in (sshd.wrong_known_hosts, empty):
        with pytest.raises(SourceError) as caught:
            credentials = Credentials(ssh_key_file=sshd.user_key, known_hosts_file=known_hosts)
            fetch(url, "main", cache_dir=cache, credentials=credentials)
        assert caught.value.message.startswith(
            f"the ssh host key of 127.0.0.1:{sshd.port} could not be verified while fetching ref 'main' from {url}: "
        )
        assert "known_hosts" in caught.value.hint


def test_ssh_unauthorised_key_is_an_auth_error(upstream, sshd, cache):
    upstream.commit({"f": "1"})
    url = sshd.url(upstream.bare)

    credentials = Credentials(ssh_key_file=sshd.stranger_key, known_hosts_file=sshd.known_hosts)

    with pytest.raises(SourceError) as caught:
        fetch(url, "main", cache_dir=cache, credentials=credentials)

    assert caught.value.message.startswith(f"authentication to {url} failed while fetching ref 'main': ")
    assert "Permission denied (publickey)" in caught.value.message
    assert "ssh key" in caught.value.hint


# --- URLs -----------------------------------------------------------------------


def test_url_forms_are_classified_and_stripped_of_secrets(tmp_path):
    def parse(url: str, credentials: Credentials | None) -> source._Remote:
        return source._Remote.parse(url=url, credentials=credentials)

    https = parse("https://me:tok@example.com/org/repo.git", credentials=None)
    assert (https.url, https.kind) == ("https://example.com/org/repo.git", "http")
    assert https.credentials == Credentials(username="me", token="tok")
    explicit = parse("https://me:tok@example.com/r.git", credentials=Credentials(token="other"))
    assert explicit.credentials.token == "other"
    ssh = parse("ssh://git:pw@example.com:2222/org/repo.git", credentials=None)
    assert (ssh.url, ssh.kind, ssh.host) == ("ssh://git@example.com:2222/org/repo.git", "ssh", "example.com:2222")
    scp = parse("git@github.com:org/repo.git", credentials=None)
    assert (scp.url, scp.kind, scp.host) == ("git@github.com:org/repo.git", "ssh", "github.com")
    local = parse(str(tmp_path / "x" / ".." / "repo"), credentials=None)
    assert (local.url, local.kind) == (str(tmp_path / "repo"), "local")
    for bad in ("ext::sh -c touch% /tmp/pwned", "ftp://example.com/repo", "-oProxyCommand=x"):
        with pytest.raises(SourceError):
            parse(bad, credentials=None)
