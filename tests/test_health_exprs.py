"""Custom health checks in CEL (healthCheckExprs), as pure logic: compiling, Flux's order of
evaluation, errors, and how a rule takes over `health.compute` and the wait for its kind.

That a real controller's status drives a sync through them is proven against the
control plane in tests/test_health_exprs_cluster.py.
"""

from __future__ import annotations

import textwrap

import pytest

from gitopsd.config import ConfigError, HealthCheckExpr, parse
from gitopsd.engine import health_exprs
from gitopsd.engine.health import Status, compute, wait
from gitopsd.objects import ref_of


def widget(*, phase: str | None = None, generation: int = 1, observed: int | None = 1, conditions=None,
           **status) -> dict:
    body = {**status}
    if phase is not None:
        body["phase"] = phase
    if observed is not None:
        body["observedGeneration"] = observed
    if conditions is not None:
        body["conditions"] = conditions
    return {"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": "w1", "namespace": "app", "generation": generation},
            "spec": {"size": 3}, "status": body}


PHASES = HealthCheckExpr(api_version="example.com/v1", kind="Widget", current="status.phase == 'Ready'",
                         in_progress="status.phase in ['Pending', 'Provisioning']",
                         failed="status.phase == 'Failed'")


def rules(*entries: HealthCheckExpr):
    return health_exprs.rules_of(entries or (PHASES,))


@pytest.mark.parametrize(("phase", "expected"), [
    ("Ready", Status.CURRENT), ("Failed", Status.FAILED), ("Pending", Status.IN_PROGRESS),
    ("Rebooting", Status.IN_PROGRESS),   # no expression is true: in progress, as Flux
])
def test_the_first_true_expression_decides_the_objects_health(phase: str, expected: Status) -> None:
    status, message = compute(widget(phase=phase), rules=rules())
    assert status is expected
    assert "Widget w1" in message


def test_a_failed_rule_names_the_expression_that_matched() -> None:
    status, message = compute(widget(phase="Failed"), rules=rules())
    assert (status, message) == (Status.FAILED,
                                 "Widget w1 is Failed by its healthCheckExprs (failed: status.phase == 'Failed')")


def test_in_progress_is_evaluated_before_failed_and_current() -> None:
    # Flux's order: inProgress, failed, current. All three true: in progress wins.
    everything = HealthCheckExpr(api_version="example.com/v1", kind="Widget", current="true", failed="true",
                                 in_progress="true")
    assert compute(widget(phase="x"), rules=rules(everything))[0] is Status.IN_PROGRESS
    no_progress = HealthCheckExpr(api_version="example.com/v1", kind="Widget", current="true", failed="true")
    assert compute(widget(phase="x"), rules=rules(no_progress))[0] is Status.FAILED


def test_an_unobserved_generation_is_in_progress_before_any_expression_runs() -> None:
    status, message = compute(widget(phase="Ready", generation=2, observed=1), rules=rules())
    assert status is Status.IN_PROGRESS and "generation 2 not yet observed" in message


def test_a_rule_replaces_the_generic_reading_of_its_kind_only() -> None:
    # Without a rule a Widget with no Ready condition is Current on sight; with one it waits for its phase.
    stalled = widget(phase="Pending", conditions=[{"type": "Stalled", "status": "True", "reason": "Nope"}])
    assert compute(stalled)[0] is Status.FAILED                       # the generic Stalled rule
    assert compute(stalled, rules=rules())[0] is Status.IN_PROGRESS   # the rule is the kind's whole story
    other = dict(widget(phase="Failed"), kind="Gadget")
    assert compute(other, rules=rules())[0] is Status.CURRENT         # another kind: the generic rules


def test_the_version_is_not_matched_only_group_and_kind() -> None:
    v2 = dict(widget(phase="Failed"), apiVersion="example.com/v2")
    assert compute(v2, rules=rules())[0] is Status.FAILED


def test_the_objects_top_level_fields_are_the_variables() -> None:
    generation = HealthCheckExpr(api_version="example.com/v1", kind="Widget",
                                 current="metadata.generation == status.observedGeneration && spec.size > 2.5")
    assert compute(widget(phase="x"), rules=rules(generation))[0] is Status.CURRENT


def test_flux_cheat_sheet_expressions_with_optional_fields_work() -> None:
    ready = HealthCheckExpr(
        api_version="example.com/v1", kind="Widget",
        current="status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'True')",
        failed="status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'False')")
    assert compute(widget(), rules=rules(ready))[0] is Status.IN_PROGRESS
    ok = widget(conditions=[{"type": "Ready", "status": "True"}])
    assert compute(ok, rules=rules(ready))[0] is Status.CURRENT


def test_an_absent_field_makes_the_object_unknown_with_the_error_and_a_hint() -> None:
    status, message = compute(widget(), rules=rules())   # no status.phase yet
    assert status is Status.UNKNOWN
    assert message.startswith('Widget w1: healthCheckExprs inProgress cannot be evaluated: Key not found in map: '
                              '"phase"')
    assert "has(status.x)" in message and "(inProgress: status.phase in ['Pending', 'Provisioning'])" in message


def test_a_result_that_is_no_boolean_makes_the_object_unknown() -> None:
    text = HealthCheckExpr(api_version="example.com/v1", kind="Widget", current="status.phase")
    status, message = compute(widget(phase="Ready"), rules=rules(text))
    assert status is Status.UNKNOWN and "the result is string, not a boolean" in message


def test_a_deleted_object_is_terminating_whatever_the_rule_says() -> None:
    gone = widget(phase="Ready")
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert compute(gone, rules=rules())[0] is Status.TERMINATING


def test_the_wait_uses_the_rule_and_settles_on_failed() -> None:
    live = {"obj": widget(phase="Pending")}
    seen = []

    def get(_ref):
        seen.append(live["obj"]["status"]["phase"])
        if len(seen) == 2:
            live["obj"] = widget(phase="Failed")
        return live["obj"]

    [result] = wait([ref_of(live["obj"])], get=get, timeout=5, interval=0.01, rules=rules())
    assert result.status is Status.FAILED and "status.phase == 'Failed'" in result.message


def test_an_unknown_rule_keeps_the_wait_going_until_the_timeout() -> None:
    obj = widget()   # the phase never comes
    [result] = wait([ref_of(obj)], get=lambda _ref: obj, timeout=0.2, interval=0.01, rules=rules())
    assert result.status is Status.UNKNOWN
    assert result.message.startswith("timed out after 0.2s: Widget w1: healthCheckExprs inProgress cannot be evaluated")


def test_each_expression_is_compiled_once() -> None:
    health_exprs.compile.cache_clear()
    text = "status.phase == 'Compiled-once'"
    entry = HealthCheckExpr(api_version="example.com/v1", kind="Widget", current=text)   # validation compiles it
    for _ in range(3):
        health_exprs.rules_of([entry])
    info = health_exprs.compile.cache_info()
    assert (info.misses, info.hits) == (1, 3)


# --- in the config file ---------------------------------------------------------------------------


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text))
    return info.value.problems


APP = """\
apps:
  - name: web
    repo: https://git.example.com/fleet.git
    healthCheckExprs:
"""


def test_a_bad_expression_is_a_config_error_naming_the_field_and_the_column() -> None:
    assert problems_of(APP + """\
      - apiVersion: example.com/v1
        kind: Widget
        current: "status.phase == 'Ready'"
        failed: "status.phase =="
""") == ["apps[0] (web).healthCheckExprs[0].failed: is not a valid CEL expression: line 1, column 16: Syntax error: "
         "mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, "
         "NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}"]


def test_a_rule_needs_api_version_kind_and_current() -> None:
    assert problems_of(APP + "      - {kind: Widget, failed: 'false'}\n") == [
        "apps[0] (web).healthCheckExprs[0].apiVersion: missing", "apps[0] (web).healthCheckExprs[0].current: missing"]
    assert problems_of(APP + "      - {apiVersion: Example.com/v1, kind: widget, current: 'true'}\n") == [
        'apps[0] (web).healthCheckExprs[0].apiVersion: "Example.com/v1" is not an apiVersion: use group/version '
        "(example.com/v1), or v1 for the core group",
        'apps[0] (web).healthCheckExprs[0].kind: "widget" is not a kind: a CamelCase name such as Certificate']


def test_two_rules_for_one_kind_are_refused() -> None:
    assert problems_of(APP + """\
      - {apiVersion: example.com/v1, kind: Widget, current: 'true'}
      - {apiVersion: example.com/v2, kind: Widget, current: 'false'}
""") == ["apps[0] (web).healthCheckExprs: entries 0 and 1 are both for Widget of example.com; give one rule per kind"]


def test_an_overlong_expression_is_refused() -> None:
    long = " || ".join(["status.phase == 'Ready'"] * 100)
    [problem] = problems_of(APP + f"      - {{apiVersion: example.com/v1, kind: Widget, current: \"{long}\"}}\n")
    assert problem.startswith("apps[0] (web).healthCheckExprs[0].current: ")
    assert "more than the 2048 a health expression may have" in problem
