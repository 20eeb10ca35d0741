"""The web view's routing, token and in-memory trail: pure logic, no cluster (tests/test_web_view.py has the daemon)."""

from __future__ import annotations

from types import SimpleNamespace

from gitopsd.daemon.feed import Event, Feed
from gitopsd.web import site as site_mod
from gitopsd.web import trail as trail_mod
from gitopsd.web.site import Site
from gitopsd.web.trail import Trails
from gitopsd.web.views import NotFound


class _Views:
    """What Site needs of gitopsd.web.views.Views: documents by route."""

    def __init__(self) -> None:
        self.daemon = SimpleNamespace(feed=Feed())

    def apps(self, *, authorization=None, forwarded=False) -> dict:
        return {"apps": []}

    def elsewhere(self, target: str) -> None:
        return None

    def app(self, target: str) -> dict:
        if target not in ("shop", "shop@eu-1"):
            raise NotFound(f"no app {target}")
        return {"app": {"app": target}}

    def transition(self, target: str, seq: int) -> dict:
        return {"record": {"seq": seq}}


def test_site_serves_the_page_for_every_deep_link_and_nothing_else():
    serves = Site.serves
    for path in ("/", "/apps/shop", "/apps/shop/", "/apps/web@eu-1/history/12", "/ui/app.js", "/api/v1/apps"):
        assert serves(path), path
    for path in ("/apps", "/apps/shop/history", "/apps/shop/history/x", "/status", "/metrics", "/hooks/github",
                 "/other"):
        assert not serves(path), path


def test_documents_are_routed_and_unknown_ones_are_404():
    site = Site(views=_Views())
    assert site.answer(path="/api/v1/apps", authorization=None).status == 200
    assert site.answer(path="/api/v1/apps/shop", authorization=None).status == 200
    assert site.answer(path="/api/v1/apps/shop/history/3", authorization=None).body.startswith(b'{"record":{"seq":3}')
    assert site.answer(path="/api/v1/apps/nobody", authorization=None).status == 404
    # A target on another cluster, as a browser encodes it.
    assert site.answer(path="/api/v1/apps/shop%40eu-1", authorization=None).body.startswith(b'{"app":{"app":"shop@eu-1"')
    assert site.answer(path="/api/v1/nothing", authorization=None).status == 404
    assert site.answer(path="/ui/../site.py", authorization=None).status == 404
    stream = site.answer(path="/api/v1/events", authorization=None)
    assert stream.stream and stream.content_type == "text/event-stream"


def test_a_token_file_guards_every_document_and_is_read_at_each_request(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    site = Site(views=_Views(), token_file=token)
    assert site.answer(path="/", authorization=None).status == 200   # the page holds no data
    for auth in (None, "Bearer wrong", "Basic s3cret-token", "Bearer", "s3cret-token"):
        answer = site.answer(path="/api/v1/apps", authorization=auth)
        assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer"), auth
        assert b"s3cret" not in answer.body
    assert site.answer(path="/api/v1/apps", authorization="Bearer s3cret-token").status == 200
    assert site.answer(path="/api/v1/apps", authorization="bearer s3cret-token").status == 200
    token.write_text("rotated")
    assert site.answer(path="/api/v1/apps", authorization="Bearer s3cret-token").status == 401
    token.unlink()
    assert site.answer(path="/api/v1/apps", authorization="Bearer rotated").status == 401   # no file: nobody


def test_an_event_names_the_feed_version():
    assert site_mod.event(7) == b"event: change\ndata: 7\n\n"


def _record(seq: int, **extra) -> dict:
    return {"type": "transition", "app": "shop", "seq": seq, **extra}


def test_the_trail_keeps_records_of_viewed_targets_only_and_forgets_the_least_recently_viewed(monkeypatch):
    monkeypatch.setattr(trail_mod, "TARGETS", 2)
    trails = Trails(where=lambda target: None)
    trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(1)))
    assert trails.records("a") == []   # not viewed when it was written: read from the store at the first view
    trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(2)))
    assert [r["seq"] for r in trails.records("a")] == [2]
    trails.records("b")
    trails.records("c")   # a is the least recently viewed of three: forgotten
    trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(3)))
    assert trails.records("a") == []


def test_the_trail_keeps_diffs_of_stored_records_only_and_cuts_big_ones(monkeypatch):
    monkeypatch.setattr(trail_mod, "DIFF_BYTES", 10)
    trails = Trails(where=lambda target: None)
    trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(1), diff="+ x\n"))
    trails.on_event(Event(kind="record", target="a", cfg=None, record={"type": "transition", "app": "shop"},
                          diff="not stored"))
    trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(2), diff="0123456789abcdef"))
    assert trails.diff("a", 1) == "+ x\n"
    assert trails.diff("a", 2).startswith("0123456789\n… cut at")
    trails.forget("a")
    assert trails.diff("a", 1) is None


def test_the_feed_wakes_a_waiter_and_times_out_without_a_change():
    feed = Feed()
    assert feed.wait_newer(feed.version, timeout=0.01) == feed.version
    seen = []
    feed.listen(seen.append)
    feed.listen(lambda event: 1 / 0)   # a broken listener does not stop the others
    feed.publish(Event(kind="status", target="a", cfg=None))
    assert feed.version == 1 and [e.kind for e in seen] == ["status"]


def test_the_trail_keeps_diffs_within_a_byte_budget_oldest_first(monkeypatch):
    monkeypatch.setattr(trail_mod, "DIFFS_BYTES", 25)
    trails = Trails(where=lambda target: None)
    for seq in (1, 2, 3):
        trails.on_event(Event(kind="record", target="a", cfg=None, record=_record(seq), diff=f"{seq}" * 10))
    assert trails.diff("a", 1) is None and trails.diff("a", 2) == "2" * 10 and trails.diff("a", 3) == "3" * 10
    trails.forget("a")
    trails.on_event(Event(kind="record", target="b", cfg=None, record=_record(1), diff="x" * 25))
    assert trails.diff("b", 1) == "x" * 25   # forgotten bytes were given back
