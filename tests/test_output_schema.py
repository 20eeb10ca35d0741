"""`gitopsd sync -o json` and `gitopsd diff -o json` are documented, stable documents.

CI pipelines parse them. The JSON Schemas in gitopsd/schemas/ (shipped in
the package) describe them exactly: real outputs of the real command line
against the real control plane — applied, drifted, failed, and an error
before any result — validate, and a field added to the output without
being added to the schema fails here.
"""

from __future__ import annotations

from datetime import datetime, timezone

import jsonschema
import pytest
from helpers import configmap, deployment, gitopsd, gitopsd_json

from gitopsd import report, schemas
from gitopsd.engine import health, source
from gitopsd.engine.diff import Diff
from gitopsd.engine.inventory import Inventory
from gitopsd.engine.plan import Action, ObjectChange, Plan
from gitopsd.engine.sync import Outcome, SyncResult
from gitopsd.objects import ObjectRef


def validator(command: str) -> jsonschema.Draft202012Validator:
    schema = schemas.load(command)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def assert_valid(command: str, document: dict) -> None:
    errors = sorted(validator(command).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


# ---------------------------------------------------------------- every field, from the code (no cluster)

REF = ObjectRef(group="apps", kind="Deployment", namespace="web", name="web")


def full_plan() -> Plan:
    """A plan with every optional part filled: each field of the output appears."""
    plan = Plan(app="web", inventory=Inventory(app="web", namespace="gitopsd-system"), errors=["a.yaml: bad"],
                missing_namespace="web", take_over=("kubectl-edit",))
    plan.changes = [
        ObjectChange(ref=REF, action=Action.UPDATE, source="web.yaml", diff=Diff(fields=("spec.replicas",),
                                                                                text="-1\n+2\n"),
                     takeover=("kubectl-edit",)),
        ObjectChange(ref=REF, action=Action.UNCHANGED, source="web.yaml"),
        ObjectChange(ref=ObjectRef("", "ConfigMap", "web", "old"), action=Action.PRUNE),
    ]
    plan.kept = [ObjectRef("", "Namespace", "", "keep")]
    plan.kept_reasons = {plan.kept[0]: "gitopsd.io/prune: disabled"}
    plan.orphans = [ObjectRef("", "ConfigMap", "web", "orphan")]
    return plan


def full_result() -> SyncResult:
    rev = source.Revision(url="https://git.example.com/fleet.git", ref="main", sha="a" * 40, author="Ada <a@x>",
                          committer="Cy <c@x>", message="change", time=datetime(2026, 1, 2, tzinfo=timezone.utc))
    plan = full_plan()
    return SyncResult(app="web", outcome=Outcome.UNHEALTHY, reason="r", revision=rev, plan=plan,
                      applied=[plan.changes[0]], pruned=[plan.changes[2]], created_namespace="web",
                      health=[health.ObjectHealth(REF, health.Status.IN_PROGRESS, "1 of 2 updated")],
                      errors=["e"], duration=1.5)


def test_every_field_of_a_sync_result_is_in_its_schema_and_no_other():
    document = report.result_dict(full_result())
    result = schemas.load("sync")["$defs"]["result"]

    assert_valid("sync", document)
    assert set(document) == set(result["properties"]) == set(result["required"])
    plan = schemas.load("sync")["$defs"]["plan"]
    assert set(document["plan"]) == set(plan["properties"])
    change = schemas.load("sync")["$defs"]["change"]
    assert set(document["plan"]["changes"][0]) == set(change["properties"])


def test_every_field_of_a_drift_report_is_in_its_schema_and_no_other():
    rev = full_result().revision
    document = report.diff_dict("web", rev, full_plan())
    drift = schemas.load("diff")["$defs"]["report"]

    assert_valid("diff", document)
    assert set(document) == set(drift["properties"]) == set(drift["required"])


def test_a_new_top_level_field_fails_the_schema():
    for command, document in (("sync", report.result_dict(full_result())),
                              ("diff", report.diff_dict("web", None, full_plan()))):
        with pytest.raises(AssertionError, match="Additional properties are not allowed"):
            assert_valid(command, {**document, "surprise": 1})
        with pytest.raises(AssertionError):
            assert_valid(command, {k: v for k, v in document.items() if k != "app"})


def test_the_document_names_its_schema_and_version():
    assert report.result_dict(full_result())["schema"] == schemas.SYNC_RESULT == "gitopsd.io/sync-result/v1"
    assert report.diff_dict("web", None, full_plan())["schema"] == schemas.DIFF == "gitopsd.io/diff/v1"
    for command in ("sync", "diff"):
        schema = schemas.load(command)
        assert schema["properties"]["schema"]["const"] == schemas.for_command(command)
        assert schema["$id"].endswith(schemas.for_command(command).split("/", 1)[1])


def test_the_two_schemas_describe_their_shared_parts_alike():
    sync, diff = schemas.load("sync"), schemas.load("diff")
    shared = set(sync["$defs"]) & set(diff["$defs"])
    assert {"revision", "counts", "change", "kept", "errors", "error", "create_namespace"} <= shared
    assert {name: sync["$defs"][name] for name in shared} == {name: diff["$defs"][name] for name in shared}
    assert sync["$defs"]["plan"]["properties"].items() <= diff["$defs"]["report"]["properties"].items()


def test_every_object_in_the_schemas_is_closed_and_every_field_described_or_typed():
    def objects(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" or "object" in (node.get("type") or []):
                yield where, node
            for key, sub in node.items():
                yield from objects(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                yield from objects(sub, f"{where}/{i}")

    for command in ("sync", "diff"):
        for where, node in objects(schemas.load(command), command):
            assert node.get("additionalProperties") is False, f"{where}: not closed"


# ---------------------------------------------------------------- real outputs (the real CLI, the real cluster)

def args_for(repo, namespace, *extra: str) -> tuple[str, ...]:
    return ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace, *extra)


@pytest.mark.cluster
def test_real_sync_and_diff_outputs_validate_applied_drifted_and_failed(repo, kube, kubeconfig, source_cache,
                                                                        namespace):
    repo.write("all.yaml", [configmap("settings", {"color": "blue"}), deployment("web")])
    repo.commit()
    args = args_for(repo, namespace)

    _, drifted = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=1)
    _, dry = gitopsd_json("sync", "--dry-run", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    _, applied = gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    _, in_sync = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)
    _, unchanged = gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=0)

    repo.write("all.yaml", [configmap("settings", {"color": "blue"}),
                            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bad"}, "data": {"k": 1}}])
    repo.commit("an invalid object, and the Deployment leaves")
    _, invalid = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=2)
    _, failed = gitopsd_json("sync", *args, kubeconfig=kubeconfig, cache=source_cache, expect=2)

    assert (dry["outcome"], applied["outcome"], unchanged["outcome"], failed["outcome"]) == \
        ("DryRun", "Applied", "NoChange", "Failed")
    assert drifted["in_sync"] is False and in_sync["in_sync"] is True and invalid["errors"]
    for document in (dry, applied, unchanged, failed):
        assert_valid("sync", document)
    for document in (drifted, in_sync, invalid):
        assert_valid("diff", document)


@pytest.mark.cluster
def test_real_error_documents_validate(repo, kubeconfig, source_cache, namespace, tmp_path):
    """An error before any result (no repository; a kubeconfig that does not load): the error document."""
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.commit()

    broken_kubeconfig = tmp_path / "broken-kubeconfig"
    broken_kubeconfig.write_text("clusters: not a list\n")

    _, no_repo = gitopsd_json("diff", "--repo", "file:///nonexistent/repo.git", "--namespace", namespace,
                              kubeconfig=kubeconfig, cache=source_cache, expect=2)
    _, broken = gitopsd_json("sync", *args_for(repo, namespace), "--kubeconfig", str(broken_kubeconfig),
                             kubeconfig=kubeconfig, cache=source_cache, expect=2)

    assert "broken-kubeconfig" in broken["error"] and "nonexistent" in no_repo["error"]
    assert_valid("diff", no_repo)
    assert_valid("sync", broken)
    assert (no_repo["schema"], broken["schema"]) == (schemas.DIFF, schemas.SYNC_RESULT)
