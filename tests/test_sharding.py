"""Sharding (gitopsd.daemon.shards): replicas split the apps over shard Leases.

The rules are pure functions, tested first. Then real `gitopsd run` processes
on the real control plane: two replicas split twenty apps, one is killed and
the other takes its apps within the lease duration, one paused mid-apply
wakes fenced, a push to the replica that does not own an app reaches the
owner, a third replica joins and takes its share, a SIGTERM hands over at
once, sharded replicas wait while a single leader leads, and --shards 1 is
the single leader of before.

Replicas start with no apps and get them by a config reload once the shards
are split, so that each app is reconciled by its owner from its very first
run: a replica that came up alone would otherwise start every app and hand
half of them over a moment later (correct — the fence and the hand-over
keep the two apart — but then "each app applied once, by one replica"
would not be what the test sees).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from datetime import datetime, timezone

import pytest
import yaml
from helpers import (
    app_entry,
    assert_no_traceback,
    cm_data,
    configmap,
    configmaps,
    gitopsd,
    metric,
    post_generic,
    replace_file,
    wait_for,
)
from test_faults import ApiLog

from gitopsd import audit
from gitopsd.daemon.shards import (
    Member,
    eligible,
    may_campaign,
    member_lease_name,
    preferred_owners,
    shard_lease_name,
    shard_of,
    should_hand_over,
)

# Short leases where failover time is the behaviour; elsewhere leases long enough that a loaded
# machine (a renewal starved for seconds) does not end a term in the middle of what is measured.
LEASE_S, RENEW_S = 3, 1
FLAGS = ("--lease-duration", str(LEASE_S), "--lease-renew", str(RENEW_S), "--no-watch-local")
CALM = ("--lease-duration", "10", "--lease-renew", "2", "--no-watch-local")


# ---------------------------------------------------------------- the rules (pure)

def test_shard_of_is_a_stable_hash_of_the_app_name():
    # sha256, not Python's salted hash(): the same in every process, version and restart.
    assert [shard_of(f"app-{i:02d}", 4) for i in range(8)] == [2, 2, 0, 1, 2, 2, 1, 3]
    assert shard_of("web-production", 1) == 0
    assert Counter(shard_of(f"app-{i:04d}", 8) for i in range(8000)).most_common()[-1][1] > 900


def test_preferred_owners_are_the_same_whatever_the_order_the_members_are_seen_in():
    members = ["gitopsd-7d9f-x2", "gitopsd-7d9f-k8", "gitopsd-7d9f-q1"]
    first = preferred_owners(8, members)
    assert preferred_owners(8, list(reversed(members))) == first == preferred_owners(8, set(members))
    assert sorted(first) == list(range(8)) and set(first.values()) == set(members)


@pytest.mark.parametrize("count", [2, 3])
def test_preferred_owners_balance_eight_shards_within_one(count):
    for trial in range(200):
        members = [f"replica-{trial}-{i}" for i in range(count)]
        load = Counter(preferred_owners(8, members).values())
        assert sum(load.values()) == 8 and set(load) == set(members), members
        assert max(load.values()) - min(load.values()) <= 1, (members, load)


def test_a_joining_member_takes_shards_and_the_others_keep_most_of_theirs():
    moved_to_others = 0
    for trial in range(100):
        before = preferred_owners(12, [f"r{trial}-a", f"r{trial}-b"])
        after = preferred_owners(12, [f"r{trial}-a", f"r{trial}-b", f"r{trial}-c"])
        assert Counter(after.values())[f"r{trial}-c"] == 4
        moved_to_others += sum(1 for s in after if after[s] != before[s] and after[s] != f"r{trial}-c")
    # Moves between the old members are the price of the capacity bound: rare, not zero.
    assert moved_to_others / 100 < 1.0, moved_to_others


def test_a_member_campaigns_for_its_preferred_shards_and_for_others_only_once_they_stayed_free():
    owners = {0: "a", 1: "b"}
    rule = dict(me="a", members={"a", "b"}, owners=owners, grace=3.0)
    assert may_campaign(shard=0, vacant_for=-10, **rule), "its own: try (the elector waits for expiry)"
    assert not may_campaign(shard=1, vacant_for=2.9, **rule), "b's, free for less than a lease duration"
    assert may_campaign(shard=1, vacant_for=3.0, **rule), "b did not take it: availability wins"
    assert not may_campaign(shard=0, me="c", members={"a", "b"}, owners=owners, vacant_for=99, grace=3.0), \
        "a member of another configuration never campaigns"


def test_a_holder_hands_over_a_shard_preferred_by_another_member_only_when_idle():
    owners = {0: "a", 1: "b"}
    rule = dict(me="a", members={"a", "b"}, owners=owners)
    assert should_hand_over(shard=1, busy=False, **rule)
    assert not should_hand_over(shard=1, busy=True, **rule), "a run of the shard is in flight"
    assert not should_hand_over(shard=0, busy=False, **rule), "its own"
    assert not should_hand_over(shard=1, busy=False, keep=True, **rule), "kept after a fallback"
    assert should_hand_over(shard=0, busy=False, keep=True, me="a", members={"b"}, owners={0: "b", 1: "b"}), \
        "a member that may hold nothing releases even what it keeps"


def test_the_oldest_members_shard_count_wins_and_a_live_single_leader_holds_everything_back():
    old = [Member("a", 4, "2026-12-01T10:00:00Z"), Member("b", 4, "2026-12-01T10:00:05Z")]
    new = Member("c", 8, "2026-12-01T11:00:00Z")
    assert eligible([*old, new], leader_held=False) == {"a", "b"}
    assert eligible([new, Member("b", 4, "2026-12-01T12:00:00Z")], leader_held=False) == {"c"}
    assert eligible([*old, new], leader_held=True) == set()
    assert eligible([Member("me", 4, "~"), *old], leader_held=False) == {"a", "b", "me"}, \
        "a member not yet listed counts as the newest"


def test_member_and_shard_lease_names_are_valid_object_names():
    assert member_lease_name("replica-a") == "gitopsd-member-replica-a"
    odd = member_lease_name("Node_1.example/42")
    assert odd.startswith("gitopsd-member-node-1-example-42-") and odd == odd.lower()
    assert member_lease_name("A") != member_lease_name("a"), "an altered identity keeps a hash of the original"
    assert shard_lease_name(3, 4) == "gitopsd-shard-3-of-4"


@pytest.mark.parametrize("args, error", [
    (["--shards", "0"], "argument --shards: 0 is out of range: use 1 to 256"),
    (["--shards", "many"], "argument --shards: \"many\" is not a whole number"),
    (["--shards", "4", "--no-leader-elect"], "argument --shards: 4 shards need Leases; drop --no-leader-elect"),
])
def test_a_bad_shards_flag_is_a_usage_error_before_anything_runs(args, error, tmp_path):
    config = tmp_path / "apps.yaml"
    config.write_text("apps: []\n")
    proc = gitopsd("run", "--config", str(config), *args, kubeconfig=tmp_path / "none", cache=tmp_path / "cache")
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- helpers for real replicas

def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def status(daemon) -> dict:
    code, body = daemon.get("/status")
    assert code == 200, body
    return json.loads(body)


def held(daemon) -> list[int]:
    return status(daemon)["shards"]["held"]


def wait_split(daemons, shards: int, timeout: float = 30.0) -> dict[str, list[int]]:
    """Until every replica holds exactly its preferred share (preferred_owners over the replicas)."""
    names = {d.log_path.stem: d for d in daemons}
    want = {n: sorted(s for s, o in preferred_owners(shards, names).items() if o == n) for n in names}
    wait_for(f"shards split as {want}", lambda: all(held(d) == want[n] for n, d in names.items()), timeout,
             interval=0.1)
    return want


def write_apps(repo, names: list[str], rev: str) -> str:
    for name in names:
        repo.write(f"apps/{name}/cm.yaml", configmap(f"cm-{name}", {"rev": rev}))
    return repo.commit(f"rev {rev}")


def configure(path, repo, namespace, names: list[str]) -> None:
    apps = [app_entry(n, repo.url, namespace, path=f"apps/{n}") for n in names]
    replace_file(path, yaml.safe_dump({"apps": apps}, sort_keys=False))


def applied(daemons, sha: str, results: tuple[str, ...] = ("Applied",)) -> dict[str, list[str]]:
    """{app: [instance, ...]} of the transitions to `sha` (Applied, or `results`) the replicas logged."""
    out: dict[str, list[str]] = {}
    for d in daemons:
        for e in d.events():
            if e.get("event") == "audit" and e.get("result") in results and e.get("revision") == sha:
                out.setdefault(e["app"], []).append(e["instance"])
    return out


def converged(daemons, sha: str) -> dict[str, list[str]]:
    """Applied or NoChange: a run fenced after its apply (a term lost to a starved renewal) records
    nothing, and the next term finds the commit already live."""
    return applied(daemons, sha, ("Applied", "NoChange"))


def owners_now(daemons) -> dict[str, str]:
    """{app: instance} from the replicas' own /status (each names itself for the apps it holds)."""
    out = {}
    for d in daemons:
        me = d.log_path.stem
        for a in status(d)["apps"]:
            if a["owner"] == me:
                out[a["app"]] = me
    return out


def assert_one_replica_at_a_time(kube, namespace: str, names: list[str]) -> None:
    """Each app's durable trail: where the recording replica changes, the new one's run started after
    the old one's run ended (`started` and `time` of the records; the replicas share this host's clock)."""
    for name in names:
        trail = list(reversed(audit.history(kube, namespace=namespace, app=name)))
        for before, after in zip(trail, trail[1:]):
            if before["instance"] != after["instance"]:
                assert after.get("started", after["time"]) >= before["time"], (
                    f"{name}: {after['instance']} began #{after['seq']} before {before['instance']} "
                    f"ended #{before['seq']}")


@pytest.fixture
def sharded(repo, namespace, tmp_path, start_daemon):
    """start(names, shards, apps): replicas with no apps, split; then `apps` configured and applied once."""
    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    repo.write("README", "fleet\n")
    repo.commit("init")

    def start(replicas: list[str], *, shards: int, apps: int, flags: tuple[str, ...] = CALM):
        daemons = [start_daemon(config, *flags, "--shards", str(shards), name=n) for n in replicas]
        split = wait_split(daemons, shards)
        names = [f"app-{i:02d}" for i in range(apps)]
        sha = write_apps(repo, names, "1")
        configure(config, repo, namespace, names)
        wait_for(f"{apps} apps converged", lambda: len(converged(daemons, sha)) == apps, 120, interval=0.25)
        return daemons, names, sha, split

    start.config = config
    return start


# ---------------------------------------------------------------- real replicas

def test_two_replicas_split_twenty_apps_and_each_app_is_applied_once_by_its_owner(sharded, kube, namespace):
    (a, b), names, sha, split = sharded(["replica-a", "replica-b"], shards=4, apps=20)

    assert split["replica-a"] and split["replica-b"], "both hold at least one shard"
    by = applied([a, b], sha)
    assert all(len(by[n]) == 1 for n in names), {n: i for n, i in by.items() if len(i) != 1}
    owners = owners_now([a, b])
    for n in names:
        want = "replica-a" if shard_of(n, 4) in split["replica-a"] else "replica-b"
        assert by[n] == [want] and owners[n] == want, n
        assert {r["instance"] for r in audit.history(kube, namespace=namespace, app=n)} == {want}
    # Each replica's /status names the owner of the apps it does not run, too — as its view of the
    # Leases has it: that view is refreshed once per renewal, so on a loaded machine it may trail.
    wait_for("replica-a's view of every owner",
             lambda: {x["app"]: x["owner"] for x in status(a)["apps"]} == owners, 30)
    assert metric(a, "gitopsd_shards_held") == len(split["replica-a"])
    assert a.get("/readyz")[1].startswith(f"ok (shards {','.join(map(str, split['replica-a']))} of 4, 20 apps")


def test_a_killed_replicas_apps_converge_on_the_survivor_within_the_lease_duration(sharded, kube, namespace, repo):
    (a, b), names, _, split = sharded(["replica-a", "replica-b"], shards=4, apps=20, flags=FLAGS)
    orphans = [n for n in names if shard_of(n, 4) in split["replica-a"]]
    sha = write_apps(repo, names, "2")   # committed, not pushed: only taking over reconciles now

    a.stop(signal.SIGKILL)
    died = datetime.now(timezone.utc)
    wait_for("survivor holds every shard", lambda: held(b) == [0, 1, 2, 3], 20, interval=0.05)
    # Timed by the survivor's own log lines, not by this test's polling (which a loaded machine delays).
    took = max(_time(e["timestamp"]) for e in b.events() if e.get("event") == "shard acquired") - died
    # Lease duration, plus one LIST interval to see it, plus half a renewal to act, plus a second of slack.
    assert took.total_seconds() <= LEASE_S + RENEW_S + RENEW_S / 2 + 1, f"took {took.total_seconds():.1f}s"

    wait_for("orphaned apps at rev 2", lambda: set(converged([b], sha)) >= set(orphans), 60, interval=0.1)
    assert all(cm_data(kube, namespace, f"cm-{n}") == {"rev": "2"} for n in orphans)
    assert_one_replica_at_a_time(kube, namespace, names)


def test_a_paused_replica_wakes_fenced_and_writes_nothing_for_the_shard_it_lost(sharded, kube, namespace, repo,
                                                                                 cluster):
    """SIGSTOP mid-apply, past the lease: the other replica takes the shard and converges the app;
    the paused one, woken, sends nothing but the writes already past the fence and records nothing."""
    (a, b), names, _, split = sharded(["replica-a", "replica-b"], shards=4, apps=4, flags=FLAGS)
    big = next(n for n in names if shard_of(n, 4) in split["replica-a"])
    repo.write(f"apps/{big}/many.yaml", configmaps(300, prefix=big))
    sha = repo.commit("300 more ConfigMaps")
    api = ApiLog(cluster)
    post_generic(a, repo.url, sha)
    wait_for("a's apply under way", lambda: len(api.writes(namespace=namespace, agent="(replica-a)")) >= 5, 60,
             interval=0.01)

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for("b holds every shard", lambda: held(b) == [0, 1, 2, 3], 30, interval=0.1)
        wait_for("b converges the app", lambda: converged([b], sha).get(big), 120, interval=0.2)
    finally:
        woke = datetime.now(timezone.utc)
        os.kill(a.proc.pid, signal.SIGCONT)
    a.wait_event(lambda e: str(e.get("event")).startswith("leadership lost mid-reconcile") and e.get("app") == big,
                 "a's run ends fenced", 60)
    wait_split([a, b], 4)   # b hands a's shards back once a is live again: new terms, new work
    regained = min(_time(e["timestamp"]) for e in a.events()
                   if e.get("event") == "shard acquired" and _time(e["timestamp"]) > woke)

    # As for the single leader (test_faults): between waking and its new terms, only writes already past
    # the fence, one per worker, may land — app objects b converged anyway. Its Leases are its own to renew.
    # The test's namespace holds everything a writes; other tests' daemons may be named replica-a too.
    late = [e for e in api.writes(agent="(replica-a)", resource=None, since=woke, namespace=namespace)
            if e["objectRef"].get("resource") != "leases" and _time(e["requestReceivedTimestamp"]) < regained]
    in_flight = [e for e in late if e["objectRef"].get("resource") == "configmaps" and e["verb"] == "patch"
                 and e["objectRef"].get("name", "").startswith(f"{big}-")]
    assert len(in_flight) == len(late) <= 16, [f"{e['verb']} {e['objectRef']}" for e in late]
    assert not [e for e in a.events() if e.get("event") == "audit" and e.get("app") == big
                and e.get("revision") == sha and _time(e["started"]) < regained], "the fenced run recorded nothing"
    assert len([n for n in (x["metadata"]["name"] for x in kube.list(kube.resource("v1", "ConfigMap"),
                                                                       namespace=namespace))
                if n.startswith(f"{big}-")]) == 300
    assert audit.verify(kube, namespace=namespace, app=big)[0]
    assert_one_replica_at_a_time(kube, namespace, names)
    assert_no_traceback(a.log_path.read_text(), f"daemon log {a.log_path}")


def test_a_push_to_the_replica_that_does_not_own_the_app_reaches_the_owner(sharded, kube, namespace, repo):
    (a, b), names, _, split = sharded(["replica-a", "replica-b"], shards=4, apps=8)
    theirs = [n for n in names if shard_of(n, 4) in split["replica-a"]]
    assert theirs
    wait_for("b knows the owner of every app", lambda: all(
        x["owner"] == ("replica-a" if x["app"] in theirs else "replica-b") for x in status(b)["apps"]), 10)
    sha = write_apps(repo, names, "2")

    started = time.monotonic()
    code, body = post_generic(b, repo.url, sha)
    assert code == 202 and set(json.loads(body)["triggered"]) == set(names), body
    wait_for("a's apps at rev 2", lambda: all(cm_data(kube, namespace, f"cm-{n}") == {"rev": "2"} for n in theirs),
             20, interval=0.05)
    assert time.monotonic() - started < 10, "the push, not a poll (the interval is 1h)"

    forwarded = [e for e in b.events() if e.get("event") == "push forwarded to the owner"]
    assert len(forwarded) == 1 and forwarded[0]["owner"] == a.url, forwarded
    wait_for("every app at rev 2", lambda: len(applied([a, b], sha)) == len(names), 30)
    by = applied([a, b], sha)
    assert all(by[n] == (["replica-a"] if n in theirs else ["replica-b"]) for n in names), by


def test_a_joining_replica_takes_its_share_and_no_app_runs_on_two_replicas(sharded, start_daemon, kube, namespace,
                                                                            repo):
    (a, b), names, _, _ = sharded(["replica-a", "replica-b"], shards=6, apps=12)

    c = start_daemon(sharded.config, *CALM, "--shards", "6", name="replica-c")
    split = wait_split([a, b, c], 6)
    assert all(len(s) == 2 for s in split.values()), split

    sha = write_apps(repo, names, "2")
    post_generic(c, repo.url, sha)
    wait_for("every app at rev 2", lambda: len(applied([a, b, c], sha)) == len(names), 60, interval=0.1)
    by, owners = applied([a, b, c], sha), owners_now([a, b, c])
    assert all(by[n] == [owners[n]] for n in names), (by, owners)
    assert {owners[n] for n in names} == {"replica-a", "replica-b", "replica-c"}
    assert_one_replica_at_a_time(kube, namespace, names)


def test_sigterm_hands_a_replicas_shards_over_at_once(repo, tmp_path, start_daemon, kube, namespace):
    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    flags = ("--lease-duration", "15", "--lease-renew", "2", "--no-watch-local", "--shards", "4")
    a = start_daemon(config, *flags, name="replica-a")
    b = start_daemon(config, *flags, name="replica-b")
    wait_split([a, b], 4)

    assert a.stop(signal.SIGTERM) == 0
    stopped = time.monotonic()
    wait_for("b holds every shard", lambda: held(b) == [0, 1, 2, 3], 15, interval=0.05)
    assert time.monotonic() - stopped < 8, "released and re-balanced, not expired after 15 s"
    leases = kube.resource("coordination.k8s.io/v1", "Lease")
    assert kube.get(leases, member_lease_name("replica-a"), namespace) is None, "the member Lease is gone"


def test_sharded_replicas_hold_no_shard_while_a_single_leader_holds_the_leader_lease(repo, tmp_path, start_daemon,
                                                                                     kube, namespace):
    """The upgrade from one leader to shards: never two writers for an app."""
    config = tmp_path / "config.yaml"
    config.write_text("apps: []\n")
    old = start_daemon(config, *FLAGS, name="single-leader")
    wait_for("single leader leads", lambda: status(old)["leader"], 10)
    new = start_daemon(config, *FLAGS, "--shards", "4", name="replica-a")
    new.wait_event(lambda e: e.get("event") == "membership acquired", "member lease", 10)
    time.sleep(LEASE_S + RENEW_S)   # the behaviour is that nothing happens: give it a lease duration to happen
    assert held(new) == []

    assert old.stop(signal.SIGTERM) == 0   # releases gitopsd-leader
    wait_for("the sharded replica takes every shard", lambda: held(new) == [0, 1, 2, 3], 15, interval=0.1)


def test_one_shard_is_the_single_leader_of_before(repo, tmp_path, start_daemon, kube, namespace):
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"apps": [app_entry("solo", repo.url, namespace)]}))
    d = start_daemon(config, *FLAGS, "--shards", "1", name="solo-replica")
    wait_for("first sync", lambda: cm_data(kube, namespace, "settings") == {"color": "blue"}, 30)

    leases = kube.list(kube.resource("coordination.k8s.io/v1", "Lease"), namespace=namespace)
    assert [(x["metadata"]["name"], x["spec"]["holderIdentity"]) for x in leases] == \
        [("gitopsd-leader", "solo-replica")], "one Lease, no member or shard Leases"
    doc = status(d)
    assert doc["leader"] is True and "shards" not in doc and "owner" not in doc["apps"][0]
    assert d.get("/readyz")[1].startswith("ok (leader, 1 apps)")
    assert metric(d, "gitopsd_shards_held") == 1 and metric(d, "gitopsd_leader") == 1
