"""dependsOn's rules as pure logic (gitopsd.daemon.dependencies): when a dependency is ready, and
whom its end wakes. The behaviour in a running daemon is proven in tests/test_depends_on.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from gitopsd.config import AppConfig, Config
from gitopsd.daemon.dependencies import Dependencies, local_readiness, record_readiness
from gitopsd.engine.health import ObjectHealth, Status
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.objects import ObjectRef


def record(**fields) -> dict:
    return {"app": "infra", "result": "Applied", "health": "Healthy", "reason": "3 created", **fields}


def test_another_replicas_dependency_is_ready_when_its_record_says_applied_and_healthy() -> None:
    assert record_readiness(record()) is None
    assert record_readiness(record(result="NoChange", reason="in sync")) is None
    assert record_readiness(record(result="Failed", health="Unknown", reason="apply failed: x")) == \
        "Failed: apply failed: x"
    assert record_readiness(record(health="Unhealthy", reason="1 of 2 objects not healthy")) == \
        "Unhealthy: 1 of 2 objects not healthy"
    assert record_readiness(record(suspended=True)) == "suspended"
    assert record_readiness(record(result="Waiting", reason="waiting for crds: reconciling")) == \
        "waiting for crds: reconciling"
    assert record_readiness(None).startswith("no status recorded yet")
    assert record_readiness({"app": "infra", "error": "not JSON"}) == "its status is unreadable: not JSON"


class FakeRunner:
    """What the dependency rules read of an AppRunner."""

    def __init__(self, name: str, *, depends_on: tuple[str, ...] = (), outcome: Outcome | None = None,
                 unhealthy: bool = False, **state) -> None:
        self.cfg = AppConfig(name=name, repo="r", depends_on=depends_on, suspend=state.pop("suspend", False))
        self.lock = threading.Lock()
        self.running = state.pop("running", False)
        self.waiting: tuple[str, ...] = state.pop("waiting", ())
        health = [ObjectHealth(ObjectRef("apps", "Deployment", "ns", "web"), Status.IN_PROGRESS, "1/2 ready")] \
            if unhealthy else []
        self.last_result = SyncResult(app=name, outcome=outcome, reason="why", health=health) if outcome else None
        self.triggered: list[str] = []
        self.link = SimpleNamespace(reachable=True)

    def verdict(self):
        from gitopsd.daemon.runner import AppRunner

        return AppRunner.verdict(self)

    def trigger(self, reason: str) -> None:
        self.triggered.append(reason)


def test_a_local_dependency_is_ready_only_once_its_latest_reconcile_converged() -> None:
    assert local_readiness(FakeRunner("infra", outcome=Outcome.APPLIED)) is None
    assert local_readiness(FakeRunner("infra", outcome=Outcome.NO_CHANGE)) is None
    assert local_readiness(FakeRunner("infra")) == "not reconciled yet"
    assert local_readiness(FakeRunner("infra", outcome=Outcome.APPLIED, running=True)) == "reconciling"
    assert local_readiness(FakeRunner("infra", outcome=Outcome.APPLIED, suspend=True)) == "suspended"
    assert local_readiness(FakeRunner("infra", outcome=Outcome.UNHEALTHY, unhealthy=True)) == "Unhealthy: why"
    assert local_readiness(FakeRunner("infra", outcome=Outcome.REFUSED)) == "Refused: why"
    assert local_readiness(FakeRunner("infra", outcome=Outcome.APPLIED, waiting=("crds: reconciling",))) == \
        "waiting for crds: reconciling"


def test_the_end_of_a_dependencys_runs_wakes_only_the_apps_waiting_for_it() -> None:
    runners = {"infra": FakeRunner("infra", outcome=Outcome.APPLIED),
               "web": FakeRunner("web", depends_on=("infra",), waiting=("infra: reconciling",)),
               "api": FakeRunner("api", depends_on=("infra",)),                        # not waiting
               "db": FakeRunner("db", waiting=("other: reconciling",))}
    deps = Dependencies(kube=None, namespace="gitopsd-system", runners=lambda: runners, local=lambda _app: True)
    deps.update(Config(apps=tuple(r.cfg for r in runners.values())))

    before = deps.ends(["infra"])
    deps.settled("infra")

    assert deps.ends(["infra"]) == before + 1 and deps.ends(["db"]) == 0   # what a judging app compares
    assert {name: r.triggered for name, r in runners.items()} == {"infra": [], "web": ["dependency"], "api": [],
                                                                  "db": []}
    assert deps.blocking(runners["web"].cfg) == ([], False)
    runners["infra"].running = True
    assert deps.blocking(runners["web"].cfg) == (["infra: reconciling"], False)


def test_the_status_watch_may_list_before_its_constructor_returns(monkeypatch) -> None:
    """The reflector's first list calls back into the watch (on_synced reads the record): a list that
    finishes before the constructor has stored the reflector must find it stored, not end the watch."""
    from gitopsd.daemon import dependencies
    from gitopsd.daemon.reflector import Reflector

    def start_and_list_at_once(self):   # a thread that gets to its first list before its starter goes on
        self._list()
        return self

    monkeypatch.setattr(Reflector, "start", start_and_list_at_once)
    kube = SimpleNamespace(resource=lambda api, kind: SimpleNamespace(kind=kind, group=""),
                           list_with_version=lambda res, namespace, label_selector: ([], "7"))
    woken = []
    watch = dependencies._StatusWatch(kube, "gitopsd", wanted=lambda: frozenset({"platform"}),
                                      changed=woken.append)
    assert woken == ["platform"] and watch.covers("platform") and watch.record("platform") is None
