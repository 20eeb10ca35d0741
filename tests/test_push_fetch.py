"""A push's fetch: one git session against the remote, where a poll's costs an ls-remote and a fetch.

Over a real smart-HTTP git server (tests/gitserver.py), which counts the
sessions (each begins with a GET of info/refs), and over file:// remotes
for the resolution rules: what may skip the ls-remote (a ref the cache last
resolved as a branch, HEAD, a full refname) and what may not (a tag, a SHA,
a ref never resolved, a branch the remote deleted).
"""

from __future__ import annotations

import pytest
from gitserver import GitHTTPServer
from test_source import TOKEN, Upstream, git, git_identity, tree_of  # noqa: F401 - git_identity is autouse

from gitopsd.engine import source
from gitopsd.engine.source import Credentials, fetch
from gitopsd.engine.source_share import SharedFetches
from gitopsd.errors import SourceError

CREDS = Credentials(username="deploy", token=TOKEN)


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path / "upstream")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def http_server(tmp_path) -> GitHTTPServer:
    server = GitHTTPServer(root=tmp_path / "upstream", username="deploy", token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def remote_verbs(monkeypatch) -> list[str]:
    """The git commands run against a remote (ls-remote, fetch), in order."""
    verbs: list[str] = []
    real = source._Git.run

    def run(self, *, args, **kw):
        if args[0] in ("ls-remote", "fetch"):
            verbs.append(args[0])
        return real(self, args=args, **kw)

    monkeypatch.setattr(source._Git, "run", run)
    return verbs


def test_a_push_costs_one_git_session_against_the_remote(upstream, http_server, cache):
    upstream.commit({"app/cm.yaml": "v: 1"})
    url = http_server.url("remote.git")
    shared = SharedFetches(cache_dir=cache)
    shared.fetch(url, "main", credentials=CREDS)
    new = upstream.commit({"app/cm.yaml": "v: 2"})

    before = http_server.sessions()
    shared.pushed(url, "main")
    checkout = shared.fetch(url, "main", credentials=CREDS)

    assert http_server.sessions() - before == 1
    assert checkout.revision.sha == new and tree_of(checkout) == {"app/cm.yaml": "v: 2"}
    assert checkout.revision.message == "change" and checkout.revision.ref == "main"


def test_a_poll_looks_with_ls_remote_before_fetching(upstream, http_server, cache):
    upstream.commit({"f": "1"})
    url = http_server.url("remote.git")
    shared = SharedFetches(cache_dir=cache)
    shared.fetch(url, "main", credentials=CREDS)

    before = http_server.sessions()
    shared.refresh(url, "main")
    shared.fetch(url, "main", credentials=CREDS)          # nothing new: the ls-remote alone
    nothing_new = http_server.sessions() - before
    new = upstream.commit({"f": "2"})
    shared.refresh(url, "main")
    found = shared.fetch(url, "main", credentials=CREDS)  # something new: ls-remote, then fetch

    assert nothing_new == 1
    assert http_server.sessions() - before == 3 and found.revision.sha == new


def test_a_poll_that_finds_nothing_new_runs_no_fetch(upstream, cache, remote_verbs):
    upstream.commit({"f": "1"})
    shared = SharedFetches(cache_dir=cache)
    shared.fetch(upstream.url, "main")
    shared.pushed(upstream.url, "main")
    shared.fetch(upstream.url, "main")
    remote_verbs.clear()

    shared.refresh(upstream.url, "main")     # a poll after a push looks before it fetches again
    shared.fetch(upstream.url, "main")

    assert remote_verbs == ["ls-remote"]


@pytest.mark.parametrize("ref", ["main", "HEAD", "refs/heads/main"])
def test_a_moved_branch_is_fetched_without_ls_remote(upstream, cache, remote_verbs, ref):
    upstream.commit({"f": "1"})
    fetch(upstream.url, ref, cache_dir=cache)
    new = upstream.commit({"f": "2"})
    remote_verbs.clear()

    checkout = fetch(upstream.url, ref, cache_dir=cache, moved=True)

    assert remote_verbs == ["fetch"]
    assert checkout.revision.sha == new and tree_of(checkout) == {"f": "2"}


def test_a_moved_ref_never_resolved_before_is_looked_up_first(upstream, cache, remote_verbs):
    sha = upstream.commit({"f": "1"})

    checkout = fetch(upstream.url, "main", cache_dir=cache, moved=True)

    assert remote_verbs == ["ls-remote", "fetch"] and checkout.revision.sha == sha


@pytest.mark.parametrize("annotated", [False, True])
def test_a_moved_tag_is_looked_up_not_fetched_as_a_branch(upstream, cache, remote_verbs, annotated):
    first = upstream.commit({"f": "1"})
    upstream.tag("v1", first, annotated=annotated)
    upstream.commit({"f": "2"}, branch="v1")              # a branch of the same name: the tag wins, as in git
    fetch(upstream.url, "v1", cache_dir=cache)
    git("tag", "-f", "-a" if annotated else "-f", *(["-m", "again"] if annotated else []), "v1",
        upstream.commit({"f": "3"}), cwd=upstream.work)
    git("push", "--quiet", "--force", "origin", "refs/tags/v1", cwd=upstream.work)
    moved_to = git("rev-parse", "v1^{commit}", cwd=upstream.work)
    remote_verbs.clear()

    checkout = fetch(upstream.url, "v1", cache_dir=cache, moved=True)

    assert remote_verbs[0] == "ls-remote"
    assert checkout.revision.sha == moved_to and tree_of(checkout) == {"f": "3"}


def test_a_moved_branch_deleted_on_the_remote_is_no_such_ref(upstream, cache):
    upstream.commit({"f": "1"}, branch="feature")
    fetch(upstream.url, "feature", cache_dir=cache)
    git("push", "--quiet", "origin", ":refs/heads/feature", cwd=upstream.work)

    with pytest.raises(SourceError) as gone:
        fetch(upstream.url, "feature", cache_dir=cache, moved=True)

    assert gone.value.message == f"ref 'feature' not found in {upstream.url}: no such branch, tag or commit"


def test_a_moved_branch_whose_remote_refuses_the_credentials_is_an_auth_error(upstream, http_server, cache):
    upstream.commit({"f": "1"})
    url = http_server.url("remote.git")
    good = fetch(url, "main", cache_dir=cache, credentials=CREDS)
    upstream.commit({"f": "2"})

    with pytest.raises(SourceError) as refused:
        fetch(url, "main", cache_dir=cache, credentials=Credentials(username="deploy", token="wrong"), moved=True)
    again = fetch(url, "main", cache_dir=cache, credentials=CREDS)   # the failed fetch left the cache usable

    assert refused.value.message.startswith(f"authentication to {url} failed while fetching ref 'main': ")
    assert TOKEN not in str(refused.value) and "wrong" not in refused.value.message
    assert again.revision.sha != good.revision.sha and tree_of(again) == {"f": "2"}


def test_a_sha_is_never_fetched_as_moved(upstream, cache, remote_verbs):
    sha = upstream.commit({"f": "1"})
    fetch(upstream.url, "main", cache_dir=cache)
    remote_verbs.clear()

    checkout = fetch(upstream.url, sha, cache_dir=cache, moved=True)

    assert remote_verbs == [] and checkout.revision.sha == sha


def test_commit_metadata_is_the_raw_commit_whatever_the_users_git_config(upstream, cache, tmp_path, monkeypatch):
    """Raw names (no mailmap), the message re-encoded from the commit's own encoding, nothing a user's
    config adds to git log's output (signatures, notes)."""
    upstream.commit({".mailmap": "Mapped Name <mapped@example.org> Alice Author <alice@example.org>\n"})
    (upstream.work / "f").write_text("1")
    git("add", "f", cwd=upstream.work)
    message = "Café crème\n\nLatin-1 body: déjà vu.\n"
    (tmp_path / "msg").write_bytes(message.encode("latin-1"))
    git("-c", "i18n.commitEncoding=ISO-8859-1", "commit", "--quiet", "-F", str(tmp_path / "msg"), cwd=upstream.work)
    git("notes", "add", "-m", "a note", cwd=upstream.work)
    git("push", "--quiet", "origin", "HEAD:refs/heads/main", cwd=upstream.work)
    config = tmp_path / "gitconfig"
    config.write_text("[log]\n\tshowSignature = true\n\tmailmap = true\n[notes]\n\tdisplayRef = refs/notes/*\n"
                      "[color]\n\tui = always\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))

    rev = fetch(upstream.url, "main", cache_dir=cache).revision

    assert rev.author == "Alice Author <alice@example.org>"
    assert rev.message == "Café crème\n\nLatin-1 body: déjà vu."
    assert rev.sha == git("rev-parse", "HEAD", cwd=upstream.work)


def test_a_tag_of_a_tree_is_not_a_commit(upstream, cache):
    upstream.commit({"f": "1"})
    tree = git("rev-parse", "HEAD^{tree}", cwd=upstream.work)
    git("tag", "a-tree", tree, cwd=upstream.work)
    git("push", "--quiet", "origin", "refs/tags/a-tree", cwd=upstream.work)

    with pytest.raises(SourceError) as wrong:
        fetch(upstream.url, "a-tree", cache_dir=cache)

    assert wrong.value.message == f"ref 'a-tree' in {upstream.url} points at {tree}, which is not a commit"


def test_the_paths_a_patched_checkout_changed_are_known_without_another_diff(upstream, cache, monkeypatch):
    first = upstream.commit({"apps/a/cm.yaml": "a: 1", "apps/b/cm.yaml": "b: 1", "old": "x"})
    fetch(upstream.url, "main", cache_dir=cache)
    upstream.commit({"apps/a/cm.yaml": "a: 2", "old": None, "new/file": "y"})
    checkout = fetch(upstream.url, "main", cache_dir=cache)
    diffs = []
    real = source._Trees._git
    monkeypatch.setattr(source._Trees, "_git", lambda self, *args: diffs.append(args) or real(self, *args))

    changed = source.changed_paths(checkout, since=first)

    assert changed == {"apps/a/cm.yaml", "old", "new/file"}
    assert diffs == []
    assert source.changed_paths(checkout, since=checkout.revision.sha) == frozenset() and len(diffs) == 1


def test_git_auto_maintenance_runs_after_the_fetch_returned_not_inside_it(upstream, cache, monkeypatch):
    from helpers import wait_for

    runs: list[list[str]] = []
    real = source._Git.run
    monkeypatch.setattr(source._Git, "run", lambda self, *, args, **kw: runs.append(list(args)) or real(
        self, args=args, **kw))
    upstream.commit({"f": "1"})

    checkout = fetch(upstream.url, "main", cache_dir=cache)
    during = list(runs)
    spare = checkout.path.parent.parent / "spares" / checkout.revision.sha
    wait_for("the spare, made after the maintenance under the cache's lock", spare.is_dir, 30, 0.05)

    fetches = [args for args in during if args[0] == "fetch"]
    assert fetches and all("--no-auto-maintenance" in args for args in fetches)
    assert not any(args[0] == "maintenance" for args in during)
    assert ["maintenance", "run", "--auto", "--quiet"] in runs[len(during):]
