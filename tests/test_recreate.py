"""Immutable fields: a clear failure by default, delete + create when opted in."""

from __future__ import annotations

import pytest
from helpers import deployment

pytestmark = pytest.mark.cluster


def _with_selector(extra: str) -> dict:
    d = deployment("web")
    d["spec"]["selector"]["matchLabels"]["tier"] = extra
    d["spec"]["template"]["metadata"]["labels"]["tier"] = extra
    return d


def test_immutable_change_fails_clearly_without_opt_in(app, repo, kube, namespace):
    repo.write("web.yaml", _with_selector("a"))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    uid = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)["metadata"]["uid"]

    repo.write("web.yaml", _with_selector("b"))
    repo.commit("change the selector")
    result = app.sync()

    assert result.outcome.value == "Failed"
    (error,) = result.errors
    assert "web.yaml" in error and "immutable" in error and "gitopsd.io/recreate" in error
    assert kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)["metadata"]["uid"] == uid


@pytest.mark.parametrize("annotations", [
    {"gitopsd.io/recreate": "enabled"},
    {"kustomize.toolkit.fluxcd.io/force": "enabled"},          # a repository written for Flux
    {"argocd.argoproj.io/sync-options": "Replace=true,Force=true"},   # ... for Argo CD
], ids=["gitopsd", "flux", "argo-cd"])
def test_immutable_change_recreates_with_annotation(app, repo, kube, namespace, annotations):
    repo.write("web.yaml", _with_selector("a"))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    uid = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)["metadata"]["uid"]

    changed = _with_selector("b")
    changed["metadata"]["annotations"] = annotations
    repo.write("web.yaml", changed)
    repo.commit("change the selector, allow recreate")
    result = app.sync()

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    assert [c.action.value for c in result.applied] == ["recreate"]
    live = kube.get(kube.resource("apps/v1", "Deployment"), "web", namespace)
    assert live["metadata"]["uid"] != uid
    assert live["spec"]["selector"]["matchLabels"]["tier"] == "b"


def test_immutable_change_recreates_when_the_app_opts_in(app, repo, kube, namespace):
    repo.write("web.yaml", _with_selector("a"))
    repo.commit()
    assert app.sync().outcome.value == "Applied"
    repo.write("web.yaml", _with_selector("b"))
    repo.commit()

    result = app.sync(recreate=True)

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    assert [c.action.value for c in result.applied] == ["recreate"]
