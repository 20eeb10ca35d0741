"""Webhook verification and parsing: pure functions, real-shaped payloads.

The fixtures below are trimmed copies of what GitHub and GitLab send (field
names, nesting and URL forms as documented by each provider), so a parser
that works here reads the real thing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse
from pathlib import Path

import pytest
from helpers import wait_for

from gitopsd.daemon import webhook
from gitopsd.daemon.webhook import PushEvent, WebhookError

SECRET = b"It's a Secret to Everybody"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"

GITHUB_PUSH = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": SHA,
    "created": False,
    "deleted": False,
    "forced": False,
    "base_ref": None,
    "compare": "https://github.com/Codertocat/Hello-World/compare/6113728f27ae...0d1a26e67d8f",
    "commits": [
        {
            "id": SHA,
            "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
            "distinct": True,
            "message": "Update README.md",
            "timestamp": "2019-05-15T15:20:30-04:00",
            "url": f"https://github.com/Codertocat/Hello-World/commit/{SHA}",
            "author": {"name": "Codertocat", "email": "21031067+Codertocat@users.noreply.github.com",
                       "username": "Codertocat"},
            "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
            "added": [], "removed": [], "modified": ["README.md"],
        }
    ],
    "head_commit": {"id": SHA, "message": "Update README.md", "timestamp": "2019-05-15T15:20:30-04:00"},
    "repository": {
        "id": 186853002,
        "node_id": "MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=",
        "name": "Hello-World",
        "full_name": "Codertocat/Hello-World",
        "private": False,
        "owner": {"name": "Codertocat", "login": "Codertocat", "id": 21031067},
        "html_url": "https://github.com/Codertocat/Hello-World",
        "url": "https://github.com/Codertocat/Hello-World",
        "git_url": "git://github.com/Codertocat/Hello-World.git",
        "ssh_url": "git@github.com:Codertocat/Hello-World.git",
        "clone_url": "https://github.com/Codertocat/Hello-World.git",
        "svn_url": "https://github.com/Codertocat/Hello-World",
        "mirror_url": None,
        "default_branch": "main",
        "master_branch": "main",
    },
    "pusher": {"name": "Codertocat", "email": "21031067+Codertocat@users.noreply.github.com"},
    "sender": {"login": "Codertocat", "id": 21031067, "type": "User"},
}

GITHUB_PING = {
    "zen": "Keep it logically awesome.",
    "hook_id": 30,
    "hook": {"type": "Repository", "id": 30, "events": ["push"], "active": True,
             "config": {"content_type": "json", "insecure_ssl": "0", "url": "https://gitopsd.example.com/hooks/github"}},
    "repository": GITHUB_PUSH["repository"],
    "sender": GITHUB_PUSH["sender"],
}

GITLAB_PUSH = {
    "object_kind": "push",
    "event_name": "push",
    "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
    "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "ref": "refs/heads/master",
    "ref_protected": True,
    "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "user_id": 4,
    "user_name": "John Smith",
    "user_username": "jsmith",
    "user_email": "john@example.com",
    "project_id": 15,
    "project": {
        "id": 15,
        "name": "Diaspora",
        "description": "",
        "web_url": "http://example.com/mike/diaspora",
        "avatar_url": None,
        "git_ssh_url": "git@example.com:mike/diaspora.git",
        "git_http_url": "http://example.com/mike/diaspora.git",
        "namespace": "Mike",
        "visibility_level": 0,
        "path_with_namespace": "mike/diaspora",
        "default_branch": "master",
        "homepage": "http://example.com/mike/diaspora",
        "url": "git@example.com:mike/diaspora.git",
        "ssh_url": "git@example.com:mike/diaspora.git",
        "http_url": "http://example.com/mike/diaspora.git",
    },
    "commits": [
        {"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "message": "fixed readme",
         "timestamp": "2012-01-03T23:36:29+02:00",
         "url": "http://example.com/mike/diaspora/commit/da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
         "author": {"name": "GitLab dev user", "email": "gitlabdev@dv6700.(none)"},
         "added": ["CHANGELOG"], "modified": ["app/controller/application.rb"], "removed": []}
    ],
    "total_commits_count": 1,
    "repository": {
        "name": "Diaspora",
        "url": "git@example.com:mike/diaspora.git",
        "description": "",
        "homepage": "http://example.com/mike/diaspora",
        "git_http_url": "http://example.com/mike/diaspora.git",
        "git_ssh_url": "git@example.com:mike/diaspora.git",
        "visibility_level": 0,
    },
}

GITLAB_TAG_PUSH = {
    "object_kind": "tag_push",
    "event_name": "tag_push",
    "before": "0000000000000000000000000000000000000000",
    "after": "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",  # the annotated tag object
    "ref": "refs/tags/v1.0.0",
    "ref_protected": True,
    "checkout_sha": "5937ac0a7beb003549fc5fd26fc247adbce4a52e",  # the commit it points at
    "user_id": 1,
    "user_name": "John Smith",
    "project_id": 1,
    "project": {
        "id": 1,
        "name": "Example",
        "web_url": "http://example.com/jsmith/example",
        "git_ssh_url": "git@example.com:jsmith/example.git",
        "git_http_url": "http://example.com/jsmith/example.git",
        "path_with_namespace": "jsmith/example",
        "default_branch": "master",
        "homepage": "http://example.com/jsmith/example",
        "url": "git@example.com:jsmith/example.git",
        "ssh_url": "git@example.com:jsmith/example.git",
        "http_url": "http://example.com/jsmith/example.git",
    },
    "commits": [],
    "total_commits_count": 0,
    "repository": {
        "name": "Example",
        "url": "ssh://git@example.com/jsmith/example.git",
        "homepage": "http://example.com/jsmith/example",
        "git_http_url": "http://example.com/jsmith/example.git",
        "git_ssh_url": "git@example.com:jsmith/example.git",
    },
}


def _body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _refused(fn, **kwargs) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        fn(**kwargs)
    return info.value


def test_github_signature_verified_in_constant_time(monkeypatch):
    body = _body(GITHUB_PUSH)
    good = _sign(body)
    # Header names are case-insensitive; plain dicts work as well as HTTPMessage.
    webhook.verify_github(body=body, headers={"X-Hub-Signature-256": good}, secret=SECRET)
    webhook.verify_github(body=body, headers={"x-hub-signature-256": good}, secret=SECRET)

    # The comparison goes through hmac.compare_digest, not ==.
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    webhook.verify_github(body=body, headers={"X-Hub-Signature-256": good}, secret=SECRET)
    assert len(calls) == 1

    cases = {
        "bad": {"X-Hub-Signature-256": _sign(body, secret=b"another secret")},
        "tampered body": {"X-Hub-Signature-256": _sign(body + b" ")},
        "missing": {},
        "sha1 only": {"X-Hub-Signature": "sha1=" + hmac.new(SECRET, body, hashlib.sha1).hexdigest()},
        "no prefix": {"X-Hub-Signature-256": good.removeprefix("sha256=")},
        "truncated": {"X-Hub-Signature-256": good[:-2]},
        "not hex": {"X-Hub-Signature-256": "sha256=" + "z" * 64},
        "non-ascii": {"X-Hub-Signature-256": "sha256=" + "é" * 64},
    }
    for name, headers in cases.items():
        err = _refused(webhook.verify_github, body=body, headers=headers, secret=SECRET)
        assert err.status == 401, name
        # Neither the secret nor the received signature is echoed.
        assert SECRET.decode() not in err.message and good.split("=")[1] not in err.message, name
    assert "missing" in _refused(webhook.verify_github, body=body, headers={}, secret=SECRET).message
    assert "malformed" in _refused(
        webhook.verify_github, body=body, headers=cases["truncated"], secret=SECRET).message

    # An empty secret disables webhooks, even for a delivery "signed" with it.
    empty = _refused(webhook.verify_github, body=body, headers={"X-Hub-Signature-256": _sign(body, b"")}, secret=b"")
    assert (empty.status, empty.message) == (401, "webhook secret not configured")


def test_gitlab_token_checked():
    webhook.verify_gitlab(headers={"X-Gitlab-Token": SECRET.decode()}, secret=SECRET)
    for headers in ({}, {"X-Gitlab-Token": "wrong"}, {"X-Gitlab-Token": ""}, {"X-Gitlab-Token": SECRET.decode()[:-1]}):
        err = _refused(webhook.verify_gitlab, headers=headers, secret=SECRET)
        assert err.status == 401
        assert SECRET.decode() not in err.message
    err = _refused(webhook.verify_gitlab, headers={"X-Gitlab-Token": ""}, secret=b"")
    assert err.message == "webhook secret not configured"


def test_generic_hmac():
    body = _body({"repo": "https://git.example.com/org/app.git", "ref": "main", "after": SHA})
    webhook.verify_generic(body=body, headers={"X-Gitopsd-Signature": _sign(body)}, secret=SECRET)
    webhook.verify(provider="generic", body=body, headers={"X-Gitopsd-Signature": _sign(body)}, secret=SECRET)
    for headers in ({}, {"X-Gitopsd-Signature": _sign(body, b"x")}, {"X-Hub-Signature-256": _sign(body)}):
        assert _refused(webhook.verify_generic, body=body, headers=headers, secret=SECRET).status == 401

    event = webhook.parse(provider="generic", body=body, headers={})
    assert event == PushEvent(provider="generic", repo_urls=("https://git.example.com/org/app.git",),
                              ref="refs/heads/main", branch="main", tag=None, after=SHA)
    tag = webhook.parse(provider="generic", body=_body({"repo": "/srv/app.git", "ref": "refs/tags/v2"}), headers={})
    assert (tag.ref, tag.branch, tag.tag, tag.after) == ("refs/tags/v2", None, "v2", None)
    for bad in (b"not json", b"[]", _body({"ref": "main"}), _body({"repo": "x"}), _body({"repo": 3, "ref": "main"}),
                _body({"repo": "x", "ref": "HEAD"}), _body({"repo": "x", "ref": "main", "after": 5})):
        assert _refused(webhook.parse, provider="generic", body=bad, headers={}).status == 400, bad


def test_github_push_payload_parsed_with_all_url_forms():
    headers = {"X-GitHub-Event": "push", "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
               "Content-Type": "application/json"}
    event = webhook.parse(provider="github", body=_body(GITHUB_PUSH), headers=headers)
    assert event.provider == "github"
    assert (event.ref, event.branch, event.tag, event.after) == ("refs/heads/main", "main", None, SHA)
    assert set(event.repo_urls) == {
        "https://github.com/Codertocat/Hello-World.git",
        "git@github.com:Codertocat/Hello-World.git",
        "git://github.com/Codertocat/Hello-World.git",
        "https://github.com/Codertocat/Hello-World",
    }
    assert len(event.repo_urls) == len(set(event.repo_urls))

    # A hook configured with content type application/x-www-form-urlencoded.
    form = urllib.parse.urlencode({"payload": json.dumps(GITHUB_PUSH)}).encode()
    form_event = webhook.parse(provider="github", body=form,
                               headers={**headers, "Content-Type": "application/x-www-form-urlencoded"})
    assert form_event == event

    # Deleting a branch: `after` is all zeros and there is no head commit.
    deleted = {**GITHUB_PUSH, "after": "0" * 40, "deleted": True, "head_commit": None}
    assert webhook.parse(provider="github", body=_body(deleted), headers=headers).after is None

    tag = {**GITHUB_PUSH, "ref": "refs/tags/v1.2.0", "base_ref": "refs/heads/main"}
    tag_event = webhook.parse(provider="github", body=_body(tag), headers=headers)
    assert (tag_event.branch, tag_event.tag) == (None, "v1.2.0")

    for bad in (b"{", _body({**GITHUB_PUSH, "ref": None}), _body({**GITHUB_PUSH, "repository": {}})):
        assert _refused(webhook.parse, provider="github", body=bad, headers=headers).status == 400
    assert _refused(webhook.parse, provider="github", body=_body(GITHUB_PUSH), headers={}).status == 400



def test_gitea_deliveries_verify_and_parse_on_the_github_route_as_gitea_sent_them():
    """Captured from a real Gitea 1.27.3 (tests/testdata/webhooks/): it sends GitHub's headers and
    signature beside its own X-Gitea-* ones, so /hooks/github reads it with nothing added for Gitea.
    (tests/test_forge_gitea.py has the same server push to a running daemon.)"""
    captured = json.loads((Path(__file__).parent / "testdata" / "webhooks" / "gitea-1.27.3.json").read_text())
    secret = captured["secret"].encode()
    for kind, tag in (("push", None), ("annotated_tag", "v1")):
        delivery = captured[kind]
        body, headers = delivery["body"].encode(), delivery["headers"]
        assert headers["User-Agent"].startswith("Go-http-client") and "X-Gitea-Signature" in headers
        webhook.verify(provider="github", body=body, headers=headers, secret=secret)
        event = webhook.parse(provider="github", body=body, headers=headers)
        assert (event.branch, event.tag) == (("main", None) if tag is None else (None, tag))
        # For the annotated tag `after` is the tag object; the commit is head_commit's.
        assert event.after == captured["commit"], kind
        assert event.delivery == headers["X-Gitea-Delivery"] == headers["X-GitHub-Delivery"]
        assert webhook.matches(captured["clone_url"], tag or "main", event)
        wrong = _refused(webhook.verify, provider="github", body=body, headers=headers, secret=b"another secret")
        assert wrong.status == 401

def test_gitlab_push_and_tag_push_parsed():
    push = webhook.parse(provider="gitlab", body=_body(GITLAB_PUSH), headers={"X-Gitlab-Event": "Push Hook"})
    assert (push.provider, push.ref, push.branch, push.tag) == ("gitlab", "refs/heads/master", "master", None)
    assert push.after == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert set(push.repo_urls) == {
        "http://example.com/mike/diaspora.git",
        "git@example.com:mike/diaspora.git",
        "http://example.com/mike/diaspora",
    }

    tag = webhook.parse(provider="gitlab", body=_body(GITLAB_TAG_PUSH), headers={"X-Gitlab-Event": "Tag Push Hook"})
    assert (tag.ref, tag.branch, tag.tag) == ("refs/tags/v1.0.0", None, "v1.0.0")
    assert tag.after == "5937ac0a7beb003549fc5fd26fc247adbce4a52e"  # the commit, not the tag object
    assert "ssh://git@example.com/jsmith/example.git" in tag.repo_urls

    system = webhook.parse(provider="gitlab", body=_body(GITLAB_PUSH), headers={"X-Gitlab-Event": "System Hook"})
    assert system.branch == "master"

    mr = {"object_kind": "merge_request", "project": GITLAB_PUSH["project"]}
    assert _refused(webhook.parse, provider="gitlab", body=_body(mr),
                    headers={"X-Gitlab-Event": "Merge Request Hook"}).status == 202
    assert _refused(webhook.parse, provider="gitlab", body=_body(mr),
                    headers={"X-Gitlab-Event": "System Hook"}).status == 202
    assert _refused(webhook.parse, provider="gitlab", body=b"\xff",
                    headers={"X-Gitlab-Event": "Push Hook"}).status == 400


def test_ping_is_ignored():
    err = _refused(webhook.parse, provider="github", body=_body(GITHUB_PING), headers={"X-GitHub-Event": "ping"})
    assert err.status == 202 and "ping" in err.message
    other = _refused(webhook.parse, provider="github", body=b"{}", headers={"X-GitHub-Event": "issues"})
    assert other.status == 202 and "issues" in other.message


def test_normalize_repo_url_equates_https_ssh_and_scp_forms(tmp_path):
    norm = lambda url: webhook.normalize_repo_url(url=url)  # noqa: E731
    same = [
        "https://github.com/Org/Repo.git",
        "https://github.com/org/repo",
        "https://github.com/org/repo/",
        "http://github.com/Org/Repo",
        "https://user:token@github.com/Org/Repo.git",
        "https://GitHub.com:443/Org/Repo.git",
        "git@github.com:Org/Repo.git",
        "ssh://git@github.com/org/repo",
        "ssh://git@github.com:22/Org/Repo.git",
        "git://github.com/Org/Repo.git",
    ]
    assert {norm(u) for u in same} == {"github.com/org/repo"}
    # Credentials never survive normalisation.
    assert "token" not in norm("https://user:token@git.example.com/a/b.git")

    # Elsewhere the path's case is significant, and a non-default port is another server.
    assert norm("https://git.example.com/Org/Repo.git") == "git.example.com/Org/Repo"
    assert norm("https://git.example.com/Org/Repo") != norm("https://git.example.com/org/repo")
    assert norm("git@git.example.com:Org/Repo.git") == norm("https://git.example.com/Org/Repo")
    assert norm("ssh://git@git.example.com:2222/org/repo.git") == "git.example.com:2222/org/repo"
    assert norm("ssh://git@git.example.com:2222/org/repo") != norm("ssh://git@git.example.com/org/repo")
    assert norm("https://[::1]:8443/org/repo") == "[::1]:8443/org/repo"

    bare = tmp_path / "x.git"
    forms = [f"file://{bare}", str(bare), f"{bare}/", f"file://{tmp_path}/x", str(tmp_path / "sub" / ".." / "x.git")]
    assert {norm(u) for u in forms} == {f"file:{Path(tmp_path).resolve()}/x"}
    assert norm("") == ""


def test_matches_branch_tag_head_and_pinned_sha():
    headers = {"X-GitHub-Event": "push"}
    branch = webhook.parse(provider="github", body=_body(GITHUB_PUSH), headers=headers)
    tag = webhook.parse(provider="github", body=_body({**GITHUB_PUSH, "ref": "refs/tags/v1"}), headers=headers)
    repo = "git@github.com:codertocat/hello-world"

    def match(app_repo: str, app_ref: str, event: PushEvent) -> bool:
        return webhook.matches(app_repo=app_repo, app_ref=app_ref, event=event)

    assert match(repo, "main", branch)
    assert match("https://github.com/Codertocat/Hello-World.git", "refs/heads/main", branch)
    assert match(repo, "HEAD", branch)
    assert not match(repo, "develop", branch)
    assert not match(repo, "v1", branch)
    assert not match("https://github.com/Codertocat/Other", "main", branch)
    assert not match("https://git.example.com/Codertocat/Hello-World", "main", branch)
    assert not match("", "main", branch)

    assert match(repo, "v1", tag)
    assert match(repo, "refs/tags/v1", tag)
    assert not match(repo, "HEAD", tag)  # tag pushes never move HEAD
    assert not match(repo, "main", tag)

    # A pinned commit never moves, even when it is the pushed one.
    assert not match(repo, SHA, branch)
    assert not match(repo, SHA.upper(), branch)
    assert not match(repo, "a" * 64, branch)


def test_public_functions_accept_positional_arguments():
    """The daemon calls the agreed interface positionally (``matches(repo, ref, event)``)."""
    body = _body(GITHUB_PUSH)
    webhook.verify_github(body, {"X-Hub-Signature-256": _sign(body)}, SECRET)
    webhook.verify_gitlab({"X-Gitlab-Token": SECRET.decode()}, SECRET)
    event = webhook.parse("github", body, {"X-GitHub-Event": "push"})
    assert webhook.matches("git@github.com:Codertocat/Hello-World.git", "main", event)
    assert webhook.normalize_repo_url("git@github.com:Codertocat/Hello-World.git") == "github.com/codertocat/hello-world"


def test_delivery_id_is_read_from_each_senders_header():
    uuid = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    for header in ("X-GitHub-Delivery", "X-Gitea-Delivery", "X-Gogs-Delivery", "Idempotency-Key",
                   "X-Gitlab-Event-UUID", "X-Request-UUID", "X-Gitopsd-Delivery"):
        assert webhook.delivery_id({header: uuid}) == uuid, header
        assert webhook.delivery_id({header.lower(): f"  {uuid} "}) == uuid, header
    # GitLab: the key that stays the same across retries wins over the per-request one.
    assert webhook.delivery_id({"X-Gitlab-Event-UUID": "per-request", "Idempotency-Key": "per-event"}) == "per-event"
    # Bitbucket's X-Hook-UUID names the hook (the same for every delivery): never an id.
    assert webhook.delivery_id({"X-Hook-UUID": uuid}) is None
    assert webhook.delivery_id({}) is None and webhook.delivery_id({"X-GitHub-Delivery": "  "}) is None
    # It comes from the network and is logged: printable and bounded.
    odd = webhook.delivery_id({"X-GitHub-Delivery": "a\x1b[31mb\n" + "c" * 1000})
    assert odd.startswith("a[31mb") and len(odd) == webhook.MAX_DELIVERY_ID and odd.isprintable()

    event = webhook.parse(provider="github", body=_body(GITHUB_PUSH),
                          headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": uuid})
    assert event.delivery == uuid


def test_delivery_key_tells_apart_pushes_sharing_one_event_uuid():
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "one-request"}
    branch = webhook.parse(provider="gitlab", body=_body(GITLAB_PUSH), headers=headers)
    tag = webhook.parse(provider="gitlab", body=_body(GITLAB_TAG_PUSH), headers={**headers,
                                                                               "X-Gitlab-Event": "Tag Push Hook"})
    assert webhook.delivery_key(branch) != webhook.delivery_key(tag)
    again = webhook.parse(provider="gitlab", body=_body(GITLAB_PUSH), headers=headers)
    assert webhook.delivery_key(again) == webhook.delivery_key(branch)
    # The same push forwarded by a standby (a generic hook with the same id) is the same delivery.
    forwarded = webhook.parse(provider="generic", headers={"X-Gitopsd-Delivery": "one-request"}, body=_body(
        {"repo": branch.repo_urls[0], "ref": branch.ref, "after": branch.after}))
    assert webhook.delivery_key(forwarded) == webhook.delivery_key(branch)
    assert webhook.delivery_key(webhook.parse(provider="gitlab", body=_body(GITLAB_PUSH),
                                              headers={"X-Gitlab-Event": "Push Hook"})) is None


def test_recent_deliveries_expire_and_stay_bounded():
    now = [1000.0]
    recent = webhook.RecentDeliveries(ttl=60.0, max_entries=3, clock=lambda: now[0])
    assert recent.claim("a") and not recent.claim("a")
    now[0] += 59
    assert not recent.claim("a")          # a duplicate within the TTL
    now[0] += 2
    assert recent.claim("a")              # remembered no longer: acted on again
    for key in ("b", "c", "d", "e"):
        assert recent.claim(key)
    assert len(recent) == 3               # the oldest went first
    assert recent.claim("a") and not recent.claim("e")
    recent.release("e")
    assert recent.claim("e")              # released: its retry is acted on
    many = webhook.RecentDeliveries(ttl=3600.0, max_entries=1000)
    for i in range(50_000):               # a flood of fresh ids costs a fixed amount of memory
        many.claim(str(i))
    assert len(many) == 1000


def test_a_push_refreshes_each_matching_repository_once_and_wakes_each_matching_app_once(tmp_path):
    """PushRouter (gitopsd.daemon.triggers) with fake runners: the routing alone, no daemon."""
    import threading
    from types import SimpleNamespace

    from gitopsd.daemon.triggers import PushRouter, Schedule
    from gitopsd.engine.source_share import SharedFetches

    class Fetches(SharedFetches):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.refreshed: list[tuple[str, str]] = []

        def refresh(self, url: str, ref: str) -> float:
            self.refreshed.append((url, ref))
            return super().refresh(url, ref)

    def runner(name: str, repo: str, ref: str = "main"):
        woken: list = []
        return SimpleNamespace(cfg=SimpleNamespace(name=name, key=name, repo=repo, ref=ref), woken=woken,
                               trigger=lambda reason, sha=None: woken.append((reason, sha)))

    mono, other = "https://git.example.com/org/mono.git", "https://git.example.com/org/other.git"
    runners = {r.cfg.name: r for r in (
        runner("web", mono), runner("api", mono), runner("db", "git@git.example.com:org/mono.git"),
        runner("pinned", mono, ref=SHA), runner("release", mono, ref="release"), runner("elsewhere", other))}
    fetches = Fetches(cache_dir=tmp_path)
    daemon = SimpleNamespace(elector=None, _leading=True, _stop=threading.Event(), runners=runners, shards=None,
                             schedule=Schedule(threading.Event(), fetches=fetches))
    event = PushEvent(provider="generic", repo_urls=(mono,), ref="refs/heads/main", branch="main", tag=None,
                      after=SHA)

    triggered = PushRouter(daemon).on_push(event)

    assert sorted(triggered) == ["api", "db", "web"]
    # Woken by the push's look at the repository, on a thread of its own (here: the fetch fails, which wakes
    # every app pushed to, for each to report it).
    wait_for("the pushed apps woken", lambda: all(runners[n].woken for n in triggered), 60)
    for name in triggered:
        assert runners[name].woken == [("webhook", SHA)]
    assert not any(runners[n].woken for n in ("pinned", "release", "elsewhere"))
    # Two spellings of one repository are two cache keys, each refreshed once; never a repository not pushed.
    assert sorted(fetches.refreshed) == sorted({(mono, "main"), ("git@git.example.com:org/mono.git", "main")})
