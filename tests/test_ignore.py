"""Pure logic of gitopsd.engine.ignore: which fields an app leaves to other field managers.

The managedFields here are written as the apiserver writes them (fieldsV1
trees); tests/test_ignore_differences.py proves the same against the real
control plane and a real HorizontalPodAutoscaler.
"""

from __future__ import annotations

import pytest

from gitopsd import config
from gitopsd.engine import ignore
from gitopsd.engine.diff import dotted
from gitopsd.engine.ignore import Ignore, Rule
from gitopsd.engine.plan import HASH_ANNOTATION, still_ours
from gitopsd.objects import ref_of

PART_OF = "applyset.kubernetes.io/part-of"


def web(replicas: int = 2, **annotations) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web", PART_OF: "applyset-x-v1"},
                         "annotations": {HASH_ANNOTATION: "h1", **annotations}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx:1.27",
                                                           "args": ["--port", "80"]}]}}}}


def entry(manager: str, fields: dict, *, operation: str = "Update", subresource: str | None = None) -> dict:
    out = {"manager": manager, "operation": operation, "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
           "fieldsV1": fields}
    if subresource:
        out["subresource"] = subresource
    return out


def gitopsd_owns(*, replicas: bool = True, annotations: tuple[str, ...] = ()) -> dict:
    """gitopsd's Apply entry for web(): all of it, less what others took."""
    spec = {"f:selector": {}, "f:template": {"f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {
        "f:containers": {'k:{"name":"web"}': {".": {}, "f:name": {}, "f:image": {}, "f:args": {}}}}}}
    if replicas:
        spec["f:replicas"] = {}
    return entry("gitopsd", {"f:metadata": {
        "f:labels": {"f:app": {}, f"f:{PART_OF}": {}},
        "f:annotations": {f"f:{HASH_ANNOTATION}": {}, **{f"f:{a}": {} for a in annotations}}},
        "f:spec": spec}, operation="Apply")


def live(desired: dict, *entries: dict, **changes) -> dict:
    obj = {**desired, "metadata": {**desired["metadata"], "managedFields": list(entries)}}
    obj["spec"] = {**desired["spec"], **changes}
    return obj


REPLICAS_RULE = Ignore(rules=(Rule(kind="Deployment", name="web", pointers=("/spec/replicas",)),))
SCALED = entry("autoscaler", {"f:spec": {"f:replicas": {}}}, subresource="scale")


def test_a_field_another_manager_took_is_left_out_of_what_gitopsd_applies():
    desired = web(replicas=2)
    body, left = REPLICAS_RULE.leave_alone(desired, live(desired, gitopsd_owns(replicas=False), SCALED,
                                                           replicas=7))
    assert left == ("spec.replicas",)
    assert "replicas" not in body["spec"] and body["spec"]["template"] == desired["spec"]["template"]
    assert desired["spec"]["replicas"] == 2, "the desired object (what self-heal re-creates from) is untouched"


def test_an_ignored_field_gitopsd_alone_owns_keeps_following_git():
    # The SSA pitfall: dropping a field gitopsd owns alone would make the apiserver remove it
    # (spec.replicas back to 1). Nobody else owns it, so it stays in what gitopsd applies.
    desired = web(replicas=3)
    body, left = REPLICAS_RULE.leave_alone(desired, live(desired, gitopsd_owns()))
    assert body is desired and left == ()


def test_a_field_shared_with_another_manager_is_safe_to_leave_out():
    desired = web(replicas=3)
    _, left = REPLICAS_RULE.leave_alone(desired, live(desired, gitopsd_owns(), SCALED))
    assert left == ("spec.replicas",)


def test_fields_of_a_manager_on_the_allow_list_are_left_to_it_without_a_rule():
    desired = web(replicas=1)
    hpa = entry("kube-controller-manager", {"f:spec": {"f:replicas": {}}}, subresource="scale")
    body, left = Ignore(managers=frozenset(ignore.DEFAULT_MANAGERS)).leave_alone(
        desired, live(desired, gitopsd_owns(replicas=False), hpa, replicas=3))
    assert left == ("spec.replicas",) and "replicas" not in body["spec"]


def test_a_manager_not_on_the_list_and_no_rule_leaves_nothing_out():
    desired = web(replicas=2)
    edit = entry("kubectl-edit", {"f:spec": {"f:replicas": {}}})
    body, left = Ignore(managers=frozenset(ignore.DEFAULT_MANAGERS)).leave_alone(
        desired, live(desired, gitopsd_owns(replicas=False), edit, replicas=9))
    assert body is desired and left == ()


def test_status_writers_and_gitopsd_itself_are_no_other_manager():
    desired = web(replicas=2)
    status = entry("kube-controller-manager", {"f:spec": {"f:replicas": {}}}, subresource="status")
    body, left = Ignore(managers=frozenset(ignore.DEFAULT_MANAGERS)).leave_alone(
        desired, live(desired, gitopsd_owns(), status))
    assert body is desired and left == ()


@pytest.mark.parametrize(("rule", "matches"), [
    (Rule(kind="Deployment"), True),
    (Rule(kind="Deploy*", name="w?b"), True),
    (Rule(group="apps", namespace="shop"), True),
    (Rule(group="", kind="Deployment"), False),          # "" is the core group
    (Rule(kind="Deployment", name="web-*"), False),
    (Rule(kind="Deployment", namespace="other"), False),
])
def test_rules_match_objects_by_globs_and_an_absent_key_matches_any(rule, matches):
    assert rule.matches(ref_of(web())) is matches


def test_dotted_paths_match_keys_with_dots_and_wildcards_match_any_item():
    desired = web(**{"example.com/injected": "false"})
    injector = entry("sidecar-injector", {"f:metadata": {"f:annotations": {"f:example.com/injected": {}}},
                                          "f:spec": {"f:template": {"f:spec": {"f:containers": {
                                              'k:{"name":"web"}': {"f:image": {}}}}}}})
    rules = Ignore(rules=(Rule(kind="Deployment", fields=("metadata.annotations.example.com/injected",
                                                          "spec.template.spec.containers[*].image")),))
    body, left = rules.leave_alone(desired, live(desired, gitopsd_owns(), injector))
    assert left == ("metadata.annotations.example.com/injected", "spec.template.spec.containers[0].image")
    assert "example.com/injected" not in body["metadata"]["annotations"]
    assert body["spec"]["template"]["spec"]["containers"] == [{"name": "web", "args": ["--port", "80"]}], \
        "the item keeps its key field (name) and what nobody else owns"


def test_identity_key_fields_and_gitopsds_own_labels_are_never_left_out():
    desired = web()
    labeller = entry("labeller", {"f:metadata": {"f:labels": {"f:app": {}, f"f:{PART_OF}": {}}},
                                  "f:spec": {"f:template": {"f:spec": {"f:containers": {
                                      'k:{"name":"web"}': {".": {}, "f:name": {}, "f:image": {}}}}}}})
    rules = Ignore(rules=(Rule(pointers=("/metadata/labels", "/spec/template/spec/containers/0")),))
    body, left = rules.leave_alone(desired, live(desired, gitopsd_owns(), labeller))
    assert body["metadata"]["labels"] == {PART_OF: "applyset-x-v1"}, "the ApplySet label stays gitopsd's"
    assert body["spec"]["template"]["spec"]["containers"] == [{"name": "web", "args": ["--port", "80"]}], \
        "the item keeps its key field, and the args nobody else owns"
    assert set(left) == {"metadata.labels.app", "spec.template.spec.containers[0].image"}


def test_an_atomic_list_is_left_out_whole():
    desired = web()
    argv = entry("argv-writer", {"f:spec": {"f:template": {"f:spec": {"f:containers": {
        'k:{"name":"web"}': {"f:args": {}}}}}}})
    body, left = Ignore(rules=(Rule(fields=("spec.template.spec.containers[0].args[1]",)),)).leave_alone(
        desired, live(desired, gitopsd_owns(), argv))
    assert left == ("spec.template.spec.containers[0].args[1]",) and \
        body["spec"]["template"]["spec"]["containers"][0]["args"] == ["--port"], \
        "owned whole by another manager, so any part of it may be left out"


def test_still_ours_asks_only_for_the_fields_gitopsd_still_applies():
    desired = web(replicas=2)
    scaled = live(desired, gitopsd_owns(replicas=False), SCALED, replicas=7)
    assert not still_ours(scaled, desired), "without the rule: drift (a dry-run, then a revert)"
    assert still_ours(scaled, desired, ignore=REPLICAS_RULE), "with it: no drift, no dry-run"
    edited = live(desired, gitopsd_owns(replicas=False),
                  entry("kubectl-edit", {"f:spec": {"f:template": {"f:spec": {"f:containers": {
                      'k:{"name":"web"}': {"f:image": {}}}}}}}), replicas=7)
    edited["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"][
        'k:{"name":"web"}'].pop("f:image")
    assert not still_ours(edited, desired, ignore=REPLICAS_RULE), "an edit the rule does not name is drift"


def test_a_drift_suggestion_is_a_rule_the_config_accepts_and_that_names_the_same_fields():
    desired = web(**{"example.com/v": "1"})
    text = ignore.suggestion(ref_of(desired), ["spec.replicas", "metadata.annotations.example.com/v",
                                               "spec.template.spec.containers[0].image"], desired)
    assert text == ("ignoreDifferences: [{kind: Deployment, name: web, jsonPointers: [/spec/replicas, "
                    "/metadata/annotations/example.com~1v, /spec/template/spec/containers/0/image]}]")
    (rule,) = config.parse_ignore_rules(text)
    paths = {dotted(p) for p in rule.compiled().paths(desired)}
    assert paths == {"spec.replicas", "metadata.annotations.example.com/v", "spec.template.spec.containers[0].image"}
    many = [f"data.key{i}" for i in range(ignore.MAX_SUGGESTED + 1)]
    assert ignore.suggestion(ref_of(desired), many, desired) is None, "no rule for a drift of that many fields"


@pytest.mark.parametrize(("path", "why"), [
    ("spec/replicas", "must start with '/'"),
    ("/spec/~2x", "'~' must be followed by 0 or 1"),
    ("/spec//replicas", "empty step"),
    ("/metadata/name", "identity"),
    ("/kind", "identity"),
])
def test_a_bad_json_pointer_is_refused_saying_why(path, why):
    with pytest.raises(ValueError, match=why):
        ignore.check_pointer(path)


@pytest.mark.parametrize("path", [".spec", "spec..replicas", "spec.containers[x]", "spec.containers[0]image",
                                  "metadata.namespace"])
def test_a_bad_field_path_is_refused(path):
    with pytest.raises(ValueError):
        ignore.check_field_path(path)
