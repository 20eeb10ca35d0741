"""Kustomize overlays and Helm charts, through the real binaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import wait_for

from gitopsd.config import Helm

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("sample_namespaces")]   # fixed namespaces: take turns

SAMPLE = Path(__file__).resolve().parent.parent / "sample-repo"


def _delete_sample_namespaces(kube) -> None:
    """The overlays name fixed namespaces: make sure no earlier run's are left (or terminating)."""
    nss = kube.resource("v1", "Namespace")
    for env in ("dev", "staging", "production"):
        kube.delete(nss, f"web-{env}")
    wait_for("sample namespaces gone", lambda: all(kube.get(nss, f"web-{env}") is None
                                                   for env in ("dev", "staging", "production")), 90)


def test_kustomize_overlays_deploy_different_replica_counts(app, repo, kube, namespace):
    shutil.copytree(SAMPLE / "apps", repo.work / "apps")
    repo.commit("sample repo")
    hpas = kube.resource("autoscaling/v2", "HorizontalPodAutoscaler")
    _delete_sample_namespaces(kube)
    try:
        for env, want in (("dev", 1), ("staging", 2), ("production", 4)):
            result = app.sync(name=f"web-{env}", path=f"apps/web/overlays/{env}", timeout=90.0)
            assert result.outcome.value == "Applied", (env, result.reason, result.errors)
            hpa = kube.get(hpas, "web", f"web-{env}")
            assert (hpa and hpa["spec"]["minReplicas"]) == want
        deployments = kube.resource("apps/v1", "Deployment")
        prod = kube.get(deployments, "web", "web-production")
        spread = prod["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        # The strategies ride along as annotations (inert to a one-shot sync, as to kubectl apply -k).
        assert "strategy: canary" in prod["metadata"]["annotations"]["gitopsd.io/rollout"]
        staging = kube.get(deployments, "web", "web-staging")
        assert "blueGreen" in staging["metadata"]["annotations"]["gitopsd.io/rollout"]
        features = [o for o in kube.list(kube.resource("v1", "ConfigMap"), namespace="web-dev")
                    if o["metadata"]["name"].startswith("web-features-")]
        assert [f["data"]["FEATURE_NEW_CHECKOUT"] for f in features] == ["true"]
    finally:
        _delete_sample_namespaces(kube)


def test_helm_chart_with_values_file(app, repo, kube, namespace):
    chart = repo.work / "charts" / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hello\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("replicas: 1\ngreeting: hi\n")
    (repo.work / "values-prod.yaml").write_text("replicas: 3\ngreeting: hello from prod\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n")
    (chart / "templates" / "deploy.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\nspec:\n"
        "  replicas: {{ .Values.replicas }}\n  selector:\n    matchLabels: {app: hello}\n"
        "  template:\n    metadata:\n      labels: {app: hello}\n    spec:\n"
        "      containers:\n        - name: hello\n          image: nginx:1.27\n")
    repo.commit("chart")

    prod = Helm(values_files=("values-prod.yaml",))
    result = app.sync(name="hello", path="charts/hello", helm=prod)

    assert result.outcome.value == "Applied", (result.reason, result.errors)
    dep = kube.get(kube.resource("apps/v1", "Deployment"), "hello", namespace)
    assert dep["spec"]["replicas"] == 3
    cm = kube.get(kube.resource("v1", "ConfigMap"), "hello-greeting", namespace)
    assert cm["data"]["greeting"] == "hello from prod"
    assert app.sync(name="hello", path="charts/hello", helm=prod).outcome.value == "NoChange"
