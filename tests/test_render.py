"""Render: plain directories, kustomize overlays and helm charts into manifests.

The kustomize and helm tests run the real, pinned binaries (built by
`hack/cluster build` into ~/.cache/gitopsd/bin); when they are missing these
tests fail with find_tool's message, they never skip. No cluster is needed:
the renderer never talks to one.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gitopsd.engine.render import Manifest, builtin_is_namespaced, find_tool, render
from gitopsd.errors import RenderError
from gitopsd.objects import ObjectRef

DATA = Path(__file__).resolve().parent / "testdata" / "render"


def by_ref(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {str(m.ref): m for m in manifests}


def render_error(*args, **kwargs) -> RenderError:
    with pytest.raises(RenderError) as info:
        render(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------
# plain directories


def test_plain_directory_is_recursive_and_multidocument():
    manifests = render(DATA, "plain")

    # Depth-first in name order; the List's items in place of the List;
    # hidden directories and non-manifest files ignored.
    assert [(str(m.ref), m.source) for m in manifests] == [
        ("ServiceAccount/default/web", "plain/list.yaml items[0]"),
        ("Service/default/web", "plain/list.yaml items[1]"),
        ("ConfigMap/default/settings", "plain/settings.json"),
        ("Deployment.apps/default/web", "plain/web/deployment.yaml#0"),
        ("ClusterRole.rbac.authorization.k8s.io/web-reader", "plain/web/rbac.yml#0"),
        ("Role.rbac.authorization.k8s.io/web-system/web-editor", "plain/web/rbac.yml#1"),
    ]


def test_render_order_is_deterministic():
    assert [m.source for m in render(DATA, "plain")] == [m.source for m in render(DATA, "plain")]


def test_empty_documents_are_ignored():
    assert render(DATA, "plain/empty") == []
    # ...and in a file mixing them with an object, only the object counts.
    assert [m.source for m in render(DATA, "plain/web/deployment.yaml")] == ["plain/web/deployment.yaml#0"]


def test_json_files_are_read_and_dates_stay_strings():
    (settings,) = render(DATA, "plain/settings.json")
    assert settings.obj["data"] == {"greeting": "hello", "released": "2024-01-01"}


def test_yaml_dates_and_bare_equals_sign_stay_strings(tmp_path):
    # PyYAML would turn the date into a datetime (perpetual drift against the
    # apiserver's string) and fail on a bare "=" (a YAML 1.1 "value" tag).
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {day: 2024-01-01, sep: =}\n")
    (cm,) = render(tmp_path)
    assert cm.obj["data"] == {"day": "2024-01-01", "sep": "="}


def test_namespaced_objects_get_the_app_namespace():
    manifests = by_ref(render(DATA, "plain", namespace="web-staging"))

    assert manifests["Deployment.apps/web-staging/web"].obj["metadata"]["namespace"] == "web-staging"
    assert manifests["ConfigMap/web-staging/settings"].obj["metadata"]["namespace"] == "web-staging"
    # An explicit namespace is kept; cluster-scoped objects get none.
    assert "Role.rbac.authorization.k8s.io/web-system/web-editor" in manifests
    assert "namespace" not in manifests["ClusterRole.rbac.authorization.k8s.io/web-reader"].obj["metadata"]


def test_is_namespaced_callback_decides_scope_and_unknown_kinds_are_left_alone(tmp_path):
    (tmp_path / "objs.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
        "apiVersion: example.com/v1\nkind: Thing\nmetadata: {name: t}\n")
    asked = []

    def is_namespaced(group: str, kind: str) -> bool | None:
        asked.append((group, kind))
        return None

    manifests = render(tmp_path, is_namespaced=is_namespaced)
    assert all("namespace" not in m.obj["metadata"] for m in manifests)
    assert asked == [("", "ConfigMap"), ("example.com", "Thing")]


def test_builtin_scope_table_knows_core_kinds_only():
    assert builtin_is_namespaced("", "Namespace") is False
    assert builtin_is_namespaced("rbac.authorization.k8s.io", "ClusterRoleBinding") is False
    assert builtin_is_namespaced("admissionregistration.k8s.io", "MutatingWebhookConfiguration") is False
    assert builtin_is_namespaced("apps", "Deployment") is True
    assert builtin_is_namespaced("", "Secret") is True
    assert builtin_is_namespaced("example.com", "Widget") is None
    # The group matters: a custom Deployment kind is not apps' Deployment.
    assert builtin_is_namespaced("example.com", "Deployment") is None


def test_crd_in_same_commit_decides_scope():
    manifests = by_ref(render(DATA, "crd", namespace="team"))

    assert "Widget.example.com/team/blue" in manifests            # Namespaced CRD: defaulted
    assert "Gadget.example.com/shared" in manifests               # Cluster CRD: left without one
    assert "Thing.other.example.com/unknown" in manifests         # unknown: as written
    assert "namespace" not in manifests["Thing.other.example.com/unknown"].obj["metadata"]


def test_crd_in_the_commit_overrides_the_cluster_answer():
    # The cluster may not know the kind yet, or know an older definition.
    manifests = by_ref(render(DATA, "crd", is_namespaced=lambda g, k: False if g == "example.com" else None))
    assert "Widget.example.com/default/blue" in manifests


def test_cluster_scoped_object_naming_a_namespace_is_an_error():
    err = render_error(DATA, "broken/scope")
    assert err.problems == [
        "broken/scope/clusterrole.yaml: ClusterRole/reader is cluster-scoped but names namespace web"]


def test_status_and_null_creation_timestamp_are_stripped(tmp_path):
    (tmp_path / "d.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, creationTimestamp: null}\nstatus: {phase: x}\n")
    (cm,) = render(tmp_path)
    assert cm.obj == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}}


def test_objects_copied_from_kubectl_get_are_refused():
    err = render_error(DATA, "broken/copied")
    (problem,) = err.problems
    assert problem.startswith("broken/copied/from-kubectl.yaml: ConfigMap/settings carries "
                              "metadata.managedFields, metadata.resourceVersion, metadata.uid")
    assert "server-side apply" in err.hint


def test_kustomization_in_plain_mode_points_at_kustomize():
    err = render_error(DATA, "kustomize/base", kind="plain")
    assert err.problems == ["kustomize/base/kustomization.yaml: looks like a kustomize overlay in a plain directory"]
    assert "use render: kustomize or auto" in err.hint


# --------------------------------------------------------------------------
# errors: all at once, with file names


def test_every_problem_is_reported_at_once_with_file_names():
    err = render_error(DATA, "broken/many")

    # One problem per broken document, listing everything wrong with it.
    assert err.problems == [
        "broken/many/malformed.yaml: invalid YAML at line 7, column 1: did not find expected ',' or ']' "
        "(while parsing a flow sequence that began at line 6)",
        "broken/many/sub/nameless.yaml#1: missing metadata.name",
        "broken/many/sub/nameless.yaml#2: document is a string, not a Kubernetes object",
        "broken/many/sub/nameless.yaml#3: missing apiVersion; metadata.name must be a string, not number (42)",
    ]
    # One message carries them all, with a hint for the fix.
    assert "4 problems" in str(err) and "apiVersion, kind and metadata.name" in err.hint


def test_duplicate_objects_are_an_error_naming_both_files():
    err = render_error(DATA, "broken/duplicates")
    assert err.problems == [
        "ConfigMap/default/settings is defined twice: in broken/duplicates/team-a/settings.yaml "
        "and in broken/duplicates/team-b/settings.yaml"]


def test_generate_name_gets_its_own_hint(tmp_path):
    (tmp_path / "job.yaml").write_text("apiVersion: batch/v1\nkind: Job\nmetadata: {generateName: migrate-}\n")
    err = render_error(tmp_path)
    assert err.problems == ["job.yaml: missing metadata.name"]
    assert "generateName is not supported" in err.hint


@pytest.mark.parametrize("annotation", ["argocd.argoproj.io/hook: PreSync", "helm.sh/hook: pre-install"])
def test_a_hook_with_a_generated_name_says_gitopsd_runs_no_hooks(tmp_path, annotation):
    (tmp_path / "job.yaml").write_text("apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: migrate-\n"
                                       f"  annotations: {{{annotation}}}\n")
    err = render_error(tmp_path)
    assert err.problems == ["job.yaml: missing metadata.name"]
    assert f"a sync hook ({annotation}) with a generated name: gitopsd runs no hooks" in err.hint


def test_a_directory_of_only_jsonnet_is_an_error_not_an_app_of_no_objects(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "guestbook.jsonnet").write_text("{}\n")
    (tmp_path / "app" / "params.libsonnet").write_text("{}\n")
    err = render_error(tmp_path, "app")
    assert err.problems == ["app: no manifests, only Jsonnet (app/guestbook.jsonnet and 1 more), which gitopsd "
                            "does not render"]
    assert "render it to YAML in CI" in err.hint
    (tmp_path / "app" / "rendered.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    assert [m.obj["metadata"]["name"] for m in render(tmp_path, "app", kind="plain")] == ["a"]


def test_invalid_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "apiVersion": "v1",\n}\n')
    err = render_error(tmp_path)
    assert err.problems[0].startswith("bad.json: invalid JSON at line 2, column 21: trailing comma")


# --------------------------------------------------------------------------
# paths stay inside the repository


def test_path_escaping_the_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    outside = tmp_path / "outside"
    (repo / "apps").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stolen}\n")
    (repo / "link").symlink_to(outside)

    assert "escapes the repository through '..'" in render_error(repo, "../outside").problems[0]
    assert "escapes the repository" in render_error(repo, "apps/../../outside").problems[0]
    assert "resolves outside the repository through a symlink" in render_error(repo, "link").problems[0]
    assert "is absolute" in render_error(repo, str(outside)).problems[0]


def test_symlinks_inside_a_plain_tree_may_not_point_outside(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stolen}\n")
    (repo / "cm.yaml").symlink_to(tmp_path / "outside.yaml")
    (repo / "dir").symlink_to(tmp_path)

    err = render_error(repo)
    assert err.problems == [f"cm.yaml: symlink to '{tmp_path / 'outside.yaml'}' resolves outside the repository",
                            f"dir: symlink to '{tmp_path}' resolves outside the repository"]


def test_symlinks_within_the_repository_are_followed(tmp_path):
    shutil.copytree(DATA / "plain" / "web", tmp_path / "shared")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "web").symlink_to(tmp_path / "shared")
    (tmp_path / "app" / "loop").symlink_to(tmp_path / "app")  # a loop is walked once

    assert [m.source for m in render(tmp_path, "app")] == [
        "app/web/deployment.yaml#0", "app/web/rbac.yml#0", "app/web/rbac.yml#1"]


def test_helm_values_file_escaping_the_repository_is_refused():
    err = render_error(DATA, "helm/web", helm_values=["../../../etc/passwd", "helm/web/missing.yaml"])
    assert err.problems == ["helm values file '../../../etc/passwd' escapes the repository through '..'",
                            "helm values file 'helm/web/missing.yaml' does not exist in the repository"]


# --------------------------------------------------------------------------
# kustomize (the real binary)


def test_auto_detects_kustomize_and_helm():
    assert {m.source for m in render(DATA, "kustomize/overlays/dev")} == {"kustomize build kustomize/overlays/dev"}
    assert all(m.source.startswith("helm/web/") for m in render(DATA, "helm/web"))


def test_kustomize_overlays_render_different_replicas():
    dev = by_ref(render(DATA, "kustomize/overlays/dev", kind="kustomize", namespace="web-dev"))
    prod = by_ref(render(DATA, "kustomize/overlays/prod", kind="kustomize", namespace="ignored"))

    assert dev["Deployment.apps/web-dev/web"].obj["spec"]["replicas"] == 2
    assert set(dev) == {"Deployment.apps/web-dev/web", "Service/web-dev/web"}
    # The overlay's own namespace wins over the app's default.
    assert prod["Deployment.apps/web-prod/web"].obj["spec"]["replicas"] == 4
    assert prod["Deployment.apps/web-prod/web"].source == "kustomize build kustomize/overlays/prod"


def test_kustomize_failure_shows_its_stderr():
    err = render_error(DATA, "kustomize/overlays/broken")
    (problem,) = err.problems
    assert problem.startswith("kustomize build kustomize/overlays/broken: failed (exit 1): Error:")
    assert "does-not-exist.yaml" in problem


def test_kustomize_without_a_kustomization_is_an_error():
    err = render_error(DATA, "plain", kind="kustomize")
    assert err.problems[0].startswith("plain: no kustomization.yaml")


# --------------------------------------------------------------------------
# helm (the real binary)


def test_helm_chart_renders_with_values_files():
    default = by_ref(render(DATA, "helm/web", namespace="web"))
    prod = by_ref(render(DATA, "helm/web", kind="helm", namespace="web", helm_release="shop",
                         helm_values=["helm/web/values-prod.yaml"]))

    assert default["Deployment.apps/web/web"].obj["spec"]["replicas"] == 1    # release named after the chart
    deployment = prod["Deployment.apps/web/shop"].obj
    assert deployment["spec"]["replicas"] == 4
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/web:1.1"


def test_helm_sources_name_the_template_file():
    manifests = render(DATA, "helm/web", namespace="web")
    assert {str(m.ref): m.source for m in manifests} == {
        # crds/ are included: the chart's resources need them.
        "CustomResourceDefinition.apiextensions.k8s.io/gadgets.example.com": "helm/web/crds/gadgets.yaml",
        "Service/web/web": "helm/web/templates/service.yaml#0",
        "Service/web/web-headless": "helm/web/templates/service.yaml#1",
        "Deployment.apps/web/web": "helm/web/templates/deployment.yaml",
        # No Ingress (disabled: an empty template) and no test Pod (helm test hooks are skipped).
    }


def test_helm_never_writes_into_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GITOPSD_HELM", str(find_tool("helm")))  # found before HOME moves
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)

    render(DATA, "helm/web")
    assert list(home.iterdir()) == []


def test_helm_gets_private_homes_and_repo_relative_arguments(tmp_path, monkeypatch):
    # A stand-in helm that records how it was called: the real one writes
    # nothing for a local chart, so this is where the isolation is visible.
    record = tmp_path / "record"
    fake = tmp_path / "helm"
    fake.write_text(f'#!/bin/sh\n{{ pwd; echo "$@"; env | grep ^HELM_ | sort; }} > "{record}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("GITOPSD_HELM", str(fake))

    assert render(DATA, "helm/web", namespace="shop", helm_values=["helm/web/values-prod.yaml"]) == []
    cwd, argv, *helm_env = record.read_text().splitlines()
    assert cwd == str(DATA)
    assert argv == ("template web helm/web --namespace shop --include-crds --skip-tests "
                    "-f helm/web/values-prod.yaml")
    homes = dict(line.split("=", 1) for line in helm_env)
    assert set(homes) == {"HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"}
    for home in homes.values():
        assert not home.startswith(str(Path.home())) and not Path(home).exists()  # removed afterwards


def test_helm_template_errors_are_reported(tmp_path):
    shutil.copytree(DATA / "helm" / "web", tmp_path / "chart")
    (tmp_path / "chart" / "templates" / "bad.yaml").write_text("kind: {{ .Values.nope.deeper }}\n")
    err = render_error(tmp_path, "chart")
    assert err.problems[0].startswith("helm template chart: failed (exit 1): Error:")
    assert "nope" in err.problems[0]


# --------------------------------------------------------------------------
# finding and running the tools


def test_find_tool_prefers_the_environment_variable(tmp_path, monkeypatch):
    fake = tmp_path / "my-kustomize"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GITOPSD_KUSTOMIZE", str(fake))
    assert find_tool("kustomize") == fake

    monkeypatch.setenv("GITOPSD_KUSTOMIZE", str(tmp_path / "missing"))
    with pytest.raises(RenderError, match="GITOPSD_KUSTOMIZE names .* not an executable file"):
        find_tool("kustomize")


def test_find_tool_names_every_place_searched_when_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("GITOPSD_HELM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setenv("GITOPSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    with pytest.raises(RenderError) as info:
        find_tool("helm")
    message = str(info.value)
    assert "$GITOPSD_HELM (unset), PATH" in message
    assert str(tmp_path / "cache" / "bin" / "helm") in message
    assert str(tmp_path / "home" / ".cache" / "gitopsd" / "bin" / "helm") in message
    assert "hack/cluster build --only helm" in message


def test_find_tool_falls_back_to_the_cache(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "bin" / "kustomize"
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    monkeypatch.delenv("GITOPSD_KUSTOMIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setenv("GITOPSD_CACHE", str(tmp_path / "cache"))
    assert find_tool("kustomize") == cached


def test_a_renderer_that_hangs_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    hang = tmp_path / "kustomize"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setenv("GITOPSD_KUSTOMIZE", str(hang))

    err = render_error(DATA, "kustomize/overlays/dev", timeout=0.5)
    assert err.problems == ["kustomize build kustomize/overlays/dev: timed out after 0.5s"]


def test_unknown_render_kind_is_refused():
    err = render_error(DATA, "plain", kind="jsonnet")
    assert "unknown render kind 'jsonnet'" in err.problems[0]


def test_manifest_ref_is_the_object_identity():
    m = Manifest(obj={"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w", "namespace": "n"}},
                 source="x.yaml")
    assert m.ref == ObjectRef(group="apps", kind="Deployment", namespace="n", name="w")


def test_plain_render_of_many_files_is_fast(tmp_path):
    # 2,000 objects in 200 files: a monorepo-sized directory renders well
    # inside a reconcile interval (the C loader makes the difference).
    doc = ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\n  labels: {{app: web, tier: x}}\n"
           "data:\n  a: '1'\n  b: two\n  c: three\n---\n")
    for f in range(200):
        (tmp_path / f"f{f:03}.yaml").write_text("".join(doc.format(i=f * 10 + i) for i in range(10)))
    start = time.monotonic()
    assert len(render(tmp_path)) == 2000
    assert time.monotonic() - start < 5, "plain render of 2,000 objects took more than 5s"


def test_a_chart_symlink_out_of_the_repository_is_refused(tmp_path):
    secret = tmp_path / "outside" / "token"
    secret.parent.mkdir()
    secret.write_text("the-daemon-serviceaccount-token")
    chart = tmp_path / "repo" / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "files").mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: leak\nversion: 0.1.0\n")
    (chart / "files" / "token").symlink_to(secret)
    (chart / "templates" / "cm.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: leak\ndata:\n  t: {{ .Files.Get "files/token" | quote }}\n')

    err = render_error(tmp_path / "repo", "chart", kind="helm", namespace="tenant")

    assert f"chart/files/token: symlink to '{secret}' resolves outside the repository" in str(err)
    assert "the-daemon-serviceaccount-token" not in str(err)


def test_secret_values_must_be_strings_and_the_error_names_only_the_key(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  pin: 73519284\n  ok: fine\n")

    err = render_error(tmp_path, ".", namespace="app")

    assert "Secret/db: stringData values must be strings; not: pin" in str(err)
    assert "73519284" not in str(err)


def test_mapping_keys_become_strings_as_kubernetes_reads_them(tmp_path):
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tcp-services\ndata:\n  9000: ns/svc:8080\n")

    (m,) = render(tmp_path, ".", namespace="ingress")

    assert m.obj["data"] == {"9000": "ns/svc:8080"}
