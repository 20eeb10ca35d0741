"""The web view's routes and documents, read over HTTP from a real daemon on the real control plane.

What a browser sees is tested in tests/test_web_browser.py; here, the
documents it is made from: what each holds, that no Secret value is in any
of them, that reading them sends no request to the apiserver, the event
stream, the token and the switch that turns the view off.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request

import pytest
from helpers import app_entry, configmap, wait_audit, wait_for, write_config

pytestmark = pytest.mark.cluster

SECRET_OLD = "web-view-old-secret-value-7Qx"
SECRET_NEW = "web-view-new-secret-value-9Kz"


def secret(name: str, value: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "stringData": {"password": value}}


def get(daemon, path: str, *, token: str | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) of a GET."""
    req = urllib.request.Request(daemon.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            status, headers = r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        body, status, headers = exc.read(), exc.code, dict(exc.headers)
    doc = json.loads(body) if headers.get("Content-Type", "").startswith("application/json") and body else {}
    return status, headers, doc


def raw(daemon, path: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(daemon.url + path, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def requests_sent(daemon) -> dict[str, float]:
    """gitopsd_apiserver_requests_total by labels, watches left out (they are open, not per view)."""
    out: dict[str, float] = {}
    for line in daemon.get("/metrics")[1].splitlines():
        if line.startswith("gitopsd_apiserver_requests_total{") and 'verb="watch"' not in line:
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


@pytest.fixture
def web_app(repo, namespace, tmp_path, start_daemon):
    """A daemon running one app of two ConfigMaps and a Secret, applied once."""
    repo.write("app.yaml", [configmap("settings", {"mode": "blue"}), configmap("other", {"k": "v"}),
                            secret("creds", SECRET_OLD)])
    repo.commit("first: blue settings and creds")
    cfg = write_config(tmp_path / "config.yaml", [app_entry("shop", repo.url, namespace, interval="1h")])
    daemon = start_daemon(cfg, "--no-leader-elect")
    wait_audit(daemon, "the first transition", app="shop", result="Applied")
    return daemon


def test_the_page_and_its_deep_links_are_one_static_file_with_a_strict_content_policy(web_app):
    status, headers, page = raw(web_app, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="/ui/app.js"' in page and b"http" not in page.replace(b"http-equiv", b""), \
        "the page loads nothing from elsewhere"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    for deep in ("/apps/shop", "/apps/shop/", "/apps/shop/history/1"):
        assert raw(web_app, deep)[2] == page, deep
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, headers, body = raw(web_app, f"/ui/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and body, name
    assert get(web_app, "/ui/../core.py")[0] == 404
    assert get(web_app, "/ui/nothing.js")[0] == 404
    assert get(web_app, "/apps/shop/nothing")[0] == 404


def test_the_apps_document_has_each_app_with_its_commit_result_and_health(web_app, namespace):
    status, _, doc = get(web_app, "/api/v1/apps")
    assert status == 200
    (row,) = doc["apps"]
    assert row["target"] == "shop" and row["app"] == "shop" and row["cluster"] == "in-cluster"
    assert row["result"] == "Applied" and row["health"] == "Healthy"
    assert row["commit"]["subject"] == "first: blue settings and creds"
    assert row["commit"]["author"] and row["commit"]["sha"] == row["revision"]
    assert row["nextRun"] and "running" in row and doc["leader"] is True


def test_the_app_document_has_objects_plan_drift_with_its_manager_history_and_a_verified_chain(
        web_app, repo, kube, namespace):
    repo.write("app.yaml", [configmap("settings", {"mode": "green"}), configmap("other", {"k": "v"}),
                            secret("creds", SECRET_OLD)])
    sha = repo.commit("second: green")
    wait_audit(web_app, "the push applied", app="shop", result="Applied", revision=sha)
    cms = kube.resource("v1", "ConfigMap")
    kube.request("PATCH", f"{cms.path(namespace)}/other", query={"fieldManager": "hand-editor"},
                 content_type="application/merge-patch+json", body={"data": {"k": "changed by hand"}})
    wait_audit(web_app, "the drift corrected", app="shop", type="drift", action="corrected")

    doc = wait_for("the drift on the app page", lambda: (d := get(web_app, "/api/v1/apps/shop")[2])["drifts"] and d)
    objects = {(o["kind"], o["name"]): o for o in doc["objects"]}
    assert set(objects) == {("ConfigMap", "settings"), ("ConfigMap", "other"), ("Secret", "creds")}
    assert all(o["health"] == "Current" and o["file"].startswith("app.yaml#") for o in objects.values()), objects
    last = doc["lastTransition"]
    assert last["revision"] == sha and last["result"] == "Applied"
    (changed,) = [o for o in last["plan"]["objects"]]
    assert (changed["name"], changed["action"], changed["fields"]) == ("settings", "configured", ["data.mode"])
    (drift,) = doc["drifts"]
    assert drift["object"]["name"] == "other" and drift["managers"] == ["hand-editor (Update)"]
    assert drift["fields"] == ["data.k"] and drift["action"] == "corrected"
    assert [t["subject"] for t in doc["transitions"]][:2] == ["second: green", "first: blue settings and creds"]
    assert doc["transitions"][0]["trigger"] and doc["transitions"][0]["duration"] is not None
    assert doc["verify"]["ok"] is True and doc["verify"]["message"].startswith("OK: ")
    assert doc["repo"]["url"] == repo.url


def test_a_transition_page_shows_its_diff_with_secret_values_masked_and_none_anywhere(web_app, repo, namespace):
    repo.write("app.yaml", [configmap("settings", {"mode": "red"}), configmap("other", {"k": "v"}),
                            secret("creds", SECRET_NEW)])
    sha = repo.commit("rotate creds, red settings")
    rec = wait_audit(web_app, "the rotation applied", app="shop", result="Applied", revision=sha)
    status, _, doc = get(web_app, f"/api/v1/apps/shop/history/{rec['seq']}")
    assert status == 200 and doc["record"]["revision"] == sha
    diff = doc["diff"]
    assert "~ update ConfigMap/" in diff and "-  mode: blue" in diff and "+  mode: red" in diff, diff
    assert "Secret/" in diff and "<redacted: changed>" in diff, diff
    first = get(web_app, "/api/v1/apps/shop/history/1")[2]
    assert first["diffNote"] is None and "+ create Secret/" in first["diff"]
    everything = "".join(json.dumps(get(web_app, path)[2]) for path in (
        "/api/v1/apps", "/api/v1/apps/shop", "/api/v1/apps/shop/history/1", f"/api/v1/apps/shop/history/{rec['seq']}"))
    assert SECRET_OLD not in everything and SECRET_NEW not in everything
    assert get(web_app, "/api/v1/apps/shop/history/999")[0] == 404
    assert get(web_app, "/api/v1/apps/nobody")[0] == 404


def test_page_views_send_no_request_to_the_apiserver(web_app):
    paths = ("/api/v1/apps", "/api/v1/apps/shop", "/api/v1/apps/shop/history/1")
    for path in paths:   # the first view of an app reads its trail and verifies it once
        assert get(web_app, path)[0] == 200
    before = requests_sent(web_app)
    for _ in range(20):
        for path in paths:
            assert get(web_app, path)[0] == 200
    after = requests_sent(web_app)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {}


def test_the_event_stream_announces_a_push_and_the_document_has_it(web_app, repo, namespace):
    conn = http.client.HTTPConnection("127.0.0.1", web_app.port, timeout=30)
    conn.request("GET", "/api/v1/events")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

    def next_event() -> int:
        lines = []
        while (line := resp.readline().decode()) != "\n":
            lines.append(line)
        if lines and lines[0].startswith(":"):
            return next_event()   # a heartbeat
        assert lines[0] == "event: change\n", lines
        return int(lines[1].removeprefix("data: "))

    first = next_event()   # at once: the page reads its document
    repo.write("app.yaml", [configmap("settings", {"mode": "pushed"}), configmap("other", {"k": "v"}),
                            secret("creds", SECRET_OLD)])
    sha = repo.commit("pushed while watching")
    while (version := next_event()) and get(web_app, "/api/v1/apps")[2]["apps"][0]["revision"] != sha:
        assert version > first
    assert get(web_app, "/api/v1/apps")[2]["apps"][0]["commit"]["subject"] == "pushed while watching"
    conn.close()


def test_a_ui_token_guards_the_data_not_the_page_and_a_rotation_counts_at_once(repo, namespace, tmp_path,
                                                                               start_daemon):
    repo.write("app.yaml", [configmap("settings", {"mode": "blue"})])
    repo.commit("one")
    token = tmp_path / "ui-token"
    token.write_text("first-token-abc123\n")
    cfg = write_config(tmp_path / "config.yaml", [app_entry("guarded", repo.url, namespace)])
    daemon = start_daemon(cfg, "--no-leader-elect", "--ui-token-file", str(token))
    wait_audit(daemon, "applied", app="guarded", result="Applied")
    assert raw(daemon, "/")[0] == 200 and raw(daemon, "/ui/app.js")[0] == 200
    for path in ("/api/v1/apps", "/api/v1/apps/guarded", "/api/v1/events"):
        status, headers, doc = get(daemon, path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert "first-token" not in json.dumps(doc)
        assert get(daemon, path, token="wrong")[0] == 401
    assert get(daemon, "/api/v1/apps", token="first-token-abc123")[0] == 200
    token.write_text("second-token-def456")
    assert get(daemon, "/api/v1/apps", token="first-token-abc123")[0] == 401
    assert get(daemon, "/api/v1/apps", token="second-token-def456")[0] == 200
    assert "first-token" not in daemon.log_path.read_text() and "second-token" not in daemon.log_path.read_text()


def test_no_ui_turns_the_view_off_and_leaves_the_other_routes(repo, namespace, tmp_path, start_daemon):
    repo.write("app.yaml", [configmap("settings", {"mode": "blue"})])
    repo.commit("one")
    cfg = write_config(tmp_path / "config.yaml", [app_entry("dark", repo.url, namespace)])
    daemon = start_daemon(cfg, "--no-leader-elect", "--no-ui")
    for path in ("/", "/apps/dark", "/ui/app.js", "/api/v1/apps", "/api/v1/events"):
        assert get(daemon, path)[0] == 404, path
    assert daemon.get("/status")[0] == 200 and daemon.get("/metrics")[0] == 200
    started = next(e for e in daemon.events() if e.get("event") == "gitopsd started")
    assert started["ui"] == "off"


def test_the_started_line_says_where_the_web_view_is(web_app):
    started = next(e for e in web_app.events() if e.get("event") == "gitopsd started")
    assert re.fullmatch(rf"http://127\.0\.0\.1:{web_app.port}/", started["ui"])


def test_each_replica_shows_every_app_and_the_page_of_an_app_another_replica_runs(repo, namespace, tmp_path,
                                                                                 start_daemon):
    from test_sharding import CALM, configure, converged, wait_split, write_apps

    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    a, b = (start_daemon(config, *CALM, "--shards", "4", name=n) for n in ("replica-a", "replica-b"))
    wait_split([a, b], 4)
    names = [f"app-{i:02d}" for i in range(8)]
    sha = write_apps(repo, names, "1")
    configure(config, repo, namespace, names)
    wait_for("8 apps converged", lambda: len(converged([a, b], sha)) == 8, 120, interval=0.25)
    owner = {app: instances[0] for app, instances in converged([a, b], sha).items()}
    assert set(owner.values()) == {"replica-a", "replica-b"}, owner
    for here, there in ((a, b), (b, a)):
        rows = settled_table(here, names)
        assert {t for t, r in rows.items() if r.get("replica") == there.url} == \
               {n for n, o in owner.items() if o == there.log_path.stem}
        theirs = next(n for n, o in owner.items() if o == there.log_path.stem)
        status, _, doc = get(here, f"/api/v1/apps/{theirs}")
        assert status == 200 and doc["replica"] == there.url and doc["lastTransition"]["revision"] == sha
        assert get(here, f"/api/v1/apps/{theirs}/history/1")[2]["record"]["instance"] == there.log_path.stem
    there_gone = b.url
    b.stop()
    rows = {r["target"]: r for r in get(a, "/api/v1/apps")[2]["apps"]}
    assert all(r["result"] == "Applied" or there_gone in r.get("reason", "") for r in rows.values()), rows


def settled_table(daemon, names: list[str], timeout: float = 30.0) -> dict[str, dict]:
    """The apps table once it shows every app Applied, by target. A replica learns who holds a
    shard from the Leases it lists every renewal and asks the holder for its rows; until both have
    caught up a row is this replica's own (Pending, with the reason). Fails with each row's reason."""
    seen: dict[str, dict] = {}

    def applied() -> bool:
        seen.clear()
        seen.update({r["target"]: r for r in get(daemon, "/api/v1/apps")[2]["apps"]})
        return {t: r["result"] for t, r in seen.items()} == {n: "Applied" for n in names}

    try:
        wait_for(f"every app Applied in {daemon.log_path.stem}'s table", applied, timeout, interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[(t, r['result'], r.get('reason')) for t, r in seen.items()]}") from None
    return dict(seen)
