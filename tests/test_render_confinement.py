"""Confinement: a commit cannot make a renderer read files outside its checkout.

Every case builds a real checkout ("repo") beside a directory it must never
read ("outside", standing for another app's checkout or a mounted
credential), whose every file carries SENTINEL. Each asserts the clear error
(naming the file and the way out) and that SENTINEL appears nowhere: not in
the error, not in any rendered object. The kustomize and helm cases run the
real binaries (fail, never skip, when they are missing). The last case goes
through the real CLI against the control plane.

Secret generator values are here too: a tool's error about its input must
not carry a secret value into a message.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gitopsd import redact
from gitopsd.engine.diff import REDACTED
from gitopsd.engine.render import render
from gitopsd.errors import RenderError

SENTINEL = "sentinel-from-outside-4d1c9e"
APP = "apps/web"
KFILE = f"{APP}/kustomization.yaml"


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def configmap(name: str, value: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"value": value}}


@pytest.fixture
def tree(tmp_path):
    """repo/apps/web: a kustomization that builds one ConfigMap; outside/: what it must never read."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    write(repo / APP / "cm.yaml", configmap("web", "ok"))
    write(outside / "cm.yaml", configmap("stolen", SENTINEL))
    write(outside / "kustomization.yaml", f"# {SENTINEL}\nresources: [cm.yaml]\n")
    write(outside / "component" / "kustomization.yaml",
          f"# {SENTINEL}\napiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n")
    write(outside / "patch.yaml", configmap("web", SENTINEL))
    write(outside / "patch.json", f'[{{"op": "add", "path": "/data/x", "value": "{SENTINEL}"}}]')
    write(outside / "crd.json", f'{{"definitions": {{"{SENTINEL}": {{}}}}}}')
    write(outside / "config.yaml", f"namePrefix:\n- path: {SENTINEL}\n")
    write(outside / "replacement.yaml", f"source: {{kind: ConfigMap, name: {SENTINEL}}}\n")
    write(outside / "schema.json", f'{{"{SENTINEL}": 1}}')
    write(outside / "transformer.yaml", f"apiVersion: builtin\nkind: LabelTransformer\nmetadata:\n  name: t\n"
                                        f"labels:\n  stolen: {SENTINEL}\nfieldSpecs: [{{path: metadata/labels}}]\n")
    write(outside / "token", SENTINEL)
    write(outside / "token.env", f"TOKEN={SENTINEL}\n")
    write(outside / "values.yaml", f"stolen: {SENTINEL}\n")
    return SimpleNamespace(repo=repo, outside=outside, app=repo / APP)


def kustomization(directory: Path, **fields) -> None:
    """A kustomization file; `resources: [cm.yaml]` unless the case names resources in any case."""
    if not any(k.casefold() == "resources" for k in fields):
        fields["resources"] = ["cm.yaml"]
    write(directory / "kustomization.yaml", fields)


def refused(repo: Path, path: str = APP, **kwargs) -> RenderError:
    """Render, expect a RenderError, and check nothing of outside/ is in it."""
    with pytest.raises(RenderError) as info:
        render(repo, path, **kwargs)
    err = info.value
    assert SENTINEL not in str(err), str(err)
    assert not any(SENTINEL in p for p in err.problems)
    return err


def outside_via_dotdot(where: str, entry: str) -> str:
    return f"{KFILE}: {where} {entry!r} resolves outside the repository through '..'"


# --------------------------------------------------------------------------
# kustomize: every field that names a file or a directory


FIELD_CASES = {
    "resources-dir": ({"resources": ["cm.yaml", "../../../outside"]}, "resources[1]", "../../../outside"),
    "resources-file": ({"resources": ["cm.yaml", "../../../outside/cm.yaml"]}, "resources[1]",
                       "../../../outside/cm.yaml"),
    "bases": ({"bases": ["../../../outside"]}, "bases[0]", "../../../outside"),
    "components": ({"components": ["../../../outside/component"]}, "components[0]", "../../../outside/component"),
    "crds": ({"crds": ["../../../outside/crd.json"]}, "crds[0]", "../../../outside/crd.json"),
    "configurations": ({"configurations": ["../../../outside/config.yaml"]}, "configurations[0]",
                       "../../../outside/config.yaml"),
    "patches": ({"patches": [{"path": "../../../outside/patch.yaml"}]}, "patches[0].path",
                "../../../outside/patch.yaml"),
    "patchesStrategicMerge": ({"patchesStrategicMerge": ["../../../outside/patch.yaml"]},
                              "patchesStrategicMerge[0]", "../../../outside/patch.yaml"),
    "patchesJson6902": ({"patchesJson6902": [{"target": {"version": "v1", "kind": "ConfigMap", "name": "web"},
                                              "path": "../../../outside/patch.json"}]},
                        "patchesJson6902[0].path", "../../../outside/patch.json"),
    "replacements": ({"replacements": [{"path": "../../../outside/replacement.yaml"}]}, "replacements[0].path",
                     "../../../outside/replacement.yaml"),
    "openapi": ({"openapi": {"path": "../../../outside/schema.json"}}, "openapi.path",
                "../../../outside/schema.json"),
    "generators-dir": ({"generators": ["../../../outside"]}, "generators[0]", "../../../outside"),
    "transformers-file": ({"transformers": ["../../../outside/transformer.yaml"]}, "transformers[0]",
                          "../../../outside/transformer.yaml"),
    "validators-file": ({"validators": ["../../../outside/transformer.yaml"]}, "validators[0]",
                        "../../../outside/transformer.yaml"),
    "configMapGenerator-files": ({"configMapGenerator": [{"name": "c", "files": ["key=../../../outside/token"]}]},
                                 "configMapGenerator[0].files[0]", "../../../outside/token"),
    "configMapGenerator-envs": ({"configMapGenerator": [{"name": "c", "envs": ["../../../outside/token.env"]}]},
                                "configMapGenerator[0].envs[0]", "../../../outside/token.env"),
    "secretGenerator-env": ({"secretGenerator": [{"name": "s", "env": "../../../outside/token.env"}]},
                            "secretGenerator[0].env", "../../../outside/token.env"),
    "secretGenerator-files": ({"secretGenerator": [{"name": "s", "files": ["../../../outside/token"]}]},
                              "secretGenerator[0].files[0]", "../../../outside/token"),
    "helmCharts-valuesFile": ({"helmCharts": [{"name": "c", "valuesFile": "../../../outside/values.yaml"}]},
                              "helmCharts[0].valuesFile", "../../../outside/values.yaml"),
    "helmGlobals-chartHome": ({"helmGlobals": {"chartHome": "../../../outside"}}, "helmGlobals.chartHome",
                              "../../../outside"),
    # kustomize matches keys regardless of case (Go's JSON decoder): so do we.
    "Resources-capitalised": ({"Resources": ["../../../outside"]}, "resources[0]", "../../../outside"),
    "PATCHES-path-upper-case": ({"PATCHES": [{"PATH": "../../../outside/patch.yaml"}]}, "patches[0].path",
                                "../../../outside/patch.yaml"),
}


@pytest.mark.parametrize("fields,where,entry", FIELD_CASES.values(), ids=FIELD_CASES.keys())
def test_kustomize_field_naming_a_path_outside_the_checkout_is_refused(tree, fields, where, entry):
    kustomization(tree.app, **fields)

    err = refused(tree.repo)

    assert outside_via_dotdot(where, entry) in err.problems
    assert "kustomize build" not in str(err), "kustomize never ran"


def test_kustomize_resource_outside_checkout_is_refused(tree):
    # The issue's own case: another directory on the disk, four levels up.
    kustomization(tree.app, resources=["cm.yaml", "../../../outside"])

    err = refused(tree.repo)

    assert err.problems == [outside_via_dotdot("resources[1]", "../../../outside")]
    assert "keep paths inside it" in err.hint


def test_kustomize_base_symlink_out_is_refused(tree):
    (tree.app / "base").symlink_to(tree.outside)
    kustomization(tree.app, resources=["cm.yaml", "base"])

    err = refused(tree.repo)

    assert f"{KFILE}: resources[1] 'base' resolves outside the repository through the symlink {APP}/base" \
        in err.problems
    assert f"{APP}/base: symlink to '{tree.outside}' resolves outside the repository" in err.problems


def test_kustomize_file_symlink_inside_a_referenced_base_is_refused(tree):
    base = tree.repo / "bases" / "web"
    kustomization(base, resources=["cm.yaml"])
    (base / "cm.yaml").symlink_to(tree.outside / "cm.yaml")
    kustomization(tree.app, resources=["../../bases/web"])

    err = refused(tree.repo)

    assert f"bases/web/cm.yaml: symlink to '{tree.outside / 'cm.yaml'}' resolves outside the repository" \
        in err.problems


def test_kustomize_link_to_a_dir_that_itself_links_out_is_refused(tree):
    shared = tree.repo / "shared" / "base"
    kustomization(shared, resources=["deps"])
    (shared / "deps").symlink_to(tree.outside)
    (tree.app / "base").symlink_to(Path("../../shared/base"))  # a link inside the repository...
    kustomization(tree.app, resources=["base"])

    err = refused(tree.repo)

    # ...to a kustomization whose own base leads out.
    assert ("shared/base/kustomization.yaml: resources[0] 'deps' resolves outside the repository "
            "through the symlink shared/base/deps") in err.problems


def test_kustomize_dotdot_counts_from_the_real_directory_as_kustomize_does(tree):
    # apps/team/web/base -> lib/base. From the link's own path '../../../outside'
    # would be apps/outside (inside); kustomize resolves it from lib/base,
    # where it is the directory beside the checkout.
    lib = tree.repo / "lib" / "base"
    kustomization(lib, resources=["../../../outside"])
    team = tree.repo / "apps" / "team" / "web"
    team.mkdir(parents=True)
    (team / "base").symlink_to(Path("../../../lib/base"))
    kustomization(team, resources=["base"])

    err = refused(tree.repo, "apps/team/web")

    assert ("lib/base/kustomization.yaml: resources[0] '../../../outside' resolves outside the repository "
            "through '..'") in err.problems


def test_kustomization_file_linked_out_is_never_read(tree):
    (tree.app / "kustomization.yaml").symlink_to(tree.outside / "kustomization.yaml")

    err = refused(tree.repo)

    assert err.problems == [f"{KFILE}: symlink to '{tree.outside / 'kustomization.yaml'}' "
                            "resolves outside the repository"]


def test_kustomize_unreferenced_link_out_in_a_kustomization_dir_is_refused(tree):
    # kustomize reads what a directory holds; a link out there is refused
    # even when no field names it yet.
    kustomization(tree.app)
    (tree.app / "notes").symlink_to(tree.outside / "token")

    err = refused(tree.repo)

    assert err.problems == [f"{APP}/notes: symlink to '{tree.outside / 'token'}' resolves outside the repository"]


def test_kustomize_absolute_path_is_refused(tree):
    kustomization(tree.app, resources=["cm.yaml", str(tree.outside)])

    err = refused(tree.repo)

    assert (f"{KFILE}: resources[1] '{tree.outside}' is an absolute path; it resolves outside the repository"
            in err.problems)


def test_kustomize_yaml_1_1_booleans_are_read_as_paths(tree):
    # `on` is a boolean to YAML 1.1 but a directory name to kustomize.
    (tree.app / "on").symlink_to(tree.outside)
    write(tree.app / "kustomization.yaml", "resources:\n- cm.yaml\n- on\n")

    err = refused(tree.repo)

    assert f"{KFILE}: resources[1] 'on' resolves outside the repository through the symlink {APP}/on" \
        in err.problems


def test_kustomize_keys_differing_only_in_case_are_refused(tree):
    # Which one kustomize uses depends on its decoder's ordering: neither is guessed.
    write(tree.app / "kustomization.yaml", "resources: [cm.yaml]\nResources: [../../../outside]\n")

    err = refused(tree.repo)

    assert err.problems == [f"{KFILE}: keys 'resources' and 'Resources' are one key to kustomize, "
                            "which matches keys regardless of case"]


def test_kustomize_transformer_config_pointing_outside_is_refused(tree):
    write(tree.app / "patcher.yaml", "apiVersion: builtin\nkind: PatchTransformer\nmetadata:\n  name: p\n"
                                     "path: ../../../outside/patch.yaml\n")
    kustomization(tree.app, transformers=["patcher.yaml"])

    err = refused(tree.repo)

    assert (f"{APP}/patcher.yaml: path '../../../outside/patch.yaml' resolves outside the repository "
            "through '..'") in err.problems


def test_kustomize_inline_generator_config_pointing_outside_is_refused(tree):
    inline = ("apiVersion: builtin\nkind: SecretGenerator\nmetadata:\n  name: s\n"
              "files:\n- ../../../outside/token\n")
    kustomization(tree.app, generators=[inline])

    err = refused(tree.repo)

    assert f"{KFILE}: files[0] '../../../outside/token' resolves outside the repository through '..'" \
        in err.problems


def test_kustomize_unparseable_kustomization_is_refused_before_kustomize_runs(tree):
    # What we cannot read we cannot check: kustomize must not read it for us.
    write(tree.app / "kustomization.yaml", "resources: [cm.yaml\n")

    err = refused(tree.repo)

    (problem,) = err.problems
    assert problem.startswith(f"{KFILE}: invalid YAML at line 2")


REMOTE_ENTRIES = [
    "https://github.com/example/repo//deploy?ref=v1.2.3",
    "github.com/example/repo/deploy?ref=main",
    "git@github.com:example/repo.git//deploy",
    "ssh://git@git.example.com/example/repo.git",
    "git::https://github.com/example/repo",
    "https://example.com/raw/cm.yaml",
]


@pytest.mark.parametrize("entry", REMOTE_ENTRIES)
def test_kustomize_remote_base_is_refused_unless_the_app_opts_in(tree, entry):
    kustomization(tree.app, resources=["cm.yaml", entry])

    err = refused(tree.repo)

    assert err.problems == [f"{KFILE}: resources[1] {entry!r} is a remote base, and remote bases are off "
                            "for this app"]
    assert "vendor the remote base into the repository" in err.hint


def test_kustomize_remote_base_opt_in_lets_kustomize_fetch(tree):
    # Nothing listens on port 9: kustomize's fetch fails fast, in its own words.
    entry = "https://127.0.0.1:9/example/repo//deploy?ref=v1"
    kustomization(tree.app, resources=["cm.yaml", entry])

    err = refused(tree.repo, allow_remote_bases=True, timeout=60)

    (problem,) = err.problems
    assert problem.startswith(f"kustomize build {APP}: failed (exit 1)")
    assert "remote bases are off" not in problem


def test_kustomize_file_url_base_is_refused_even_with_remote_bases_on(tree):
    entry = f"file://{tree.outside}"
    kustomization(tree.app, resources=["cm.yaml", entry])

    err = refused(tree.repo, allow_remote_bases=True)

    assert err.problems == [f"{KFILE}: resources[1] {entry!r} is a file:// repository on the daemon's disk"]


def test_kustomize_base_cycle_is_walked_once(tree):
    kustomization(tree.repo / "apps" / "a", resources=["../b"])
    kustomization(tree.repo / "apps" / "b", resources=["../a"])

    err = refused(tree.repo, "apps/a")

    # The walk ends; kustomize then reports the cycle itself.
    (problem,) = err.problems
    assert problem.startswith("kustomize build apps/a: failed (exit 1)")


def test_kustomize_links_inside_the_repository_still_render(tree):
    base = tree.repo / "bases" / "web"
    kustomization(base, resources=["cm.yaml"])
    write(base / "cm.yaml", configmap("web", "ok"))
    (tree.app / "base").symlink_to(Path("../../bases/web"))
    kustomization(tree.app.parent / "prod", resources=["../web/base"], namePrefix="prod-")

    (m,) = render(tree.repo, "apps/prod", namespace="shop")

    assert (m.obj["metadata"]["name"], m.obj["data"]) == ("prod-web", {"value": "ok"})


@pytest.mark.parametrize("tool", ["kustomize", "helm"])
def test_renderers_get_a_minimal_environment(tmp_path, monkeypatch, tool):
    # A stand-in that records the environment it was given: nothing of the
    # daemon's (credentials, tokens, kubeconfig, its HOME) may reach it.
    record = tmp_path / "env"
    fake = tmp_path / tool
    fake.write_text(f'#!/bin/sh\nenv > "{record}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv(f"GITOPSD_{tool.upper()}", str(fake))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent"))
    repo = tmp_path / "repo"
    if tool == "kustomize":
        kustomization(repo)
        write(repo / "cm.yaml", configmap("web", "ok"))
    else:
        write(repo / "Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")

    assert render(repo, ".") == []

    env = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert SENTINEL not in record.read_text()
    assert not {"AWS_SECRET_ACCESS_KEY", "KUBECONFIG", "SSH_AUTH_SOCK"} & set(env)
    assert env["HOME"] != os.environ["HOME"] and not Path(env["HOME"]).exists()  # private, and removed
    assert env["GIT_CONFIG_GLOBAL"] == "/dev/null" and "file" not in env["GIT_ALLOW_PROTOCOL"].split(":")


# --------------------------------------------------------------------------
# helm: the chart is walked the way helm loads it


@pytest.fixture
def chart(tree):
    chart = tree.repo / "charts" / "web"
    write(chart / "Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")
    write(chart / "values.yaml", "greeting: hi\n")
    write(tree.repo / "shared" / "cm.yaml",
          "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  greeting: {{ .Values.greeting | quote }}\n")
    return chart


def test_helm_templates_dir_link_with_file_link_out_is_refused(tree, chart):
    (chart / "templates").symlink_to(Path("../../shared"))  # a directory link inside the repository
    (tree.repo / "shared" / "leak.yaml").symlink_to(tree.outside / "cm.yaml")  # a file link out under it

    err = refused(tree.repo, "charts/web", namespace="shop")

    assert err.problems == [f"charts/web/templates/leak.yaml: symlink to '{tree.outside / 'cm.yaml'}' "
                            "resolves outside the repository"]


def test_helm_templates_dir_link_inside_still_renders(tree, chart):
    (chart / "templates").symlink_to(Path("../../shared"))

    (m,) = render(tree.repo, "charts/web", namespace="shop")

    assert (m.source, m.obj["data"]) == ("charts/web/templates/cm.yaml", {"greeting": "hi"})


def test_helm_subchart_link_out_is_refused(tree, chart):
    write(tree.outside / "sub" / "Chart.yaml", f"apiVersion: v2\nname: sub\nversion: 0.1.0\n# {SENTINEL}\n")
    (chart / "charts").mkdir()
    (chart / "charts" / "sub").symlink_to(tree.outside / "sub")

    err = refused(tree.repo, "charts/web", namespace="shop")

    assert err.problems == [f"charts/web/charts/sub: symlink to '{tree.outside / 'sub'}' "
                            "resolves outside the repository"]


def test_helm_subchart_linked_inside_with_a_file_link_out_is_refused(tree, chart):
    lib = tree.repo / "lib" / "sub"
    write(lib / "Chart.yaml", "apiVersion: v2\nname: sub\nversion: 0.1.0\n")
    (lib / "files").mkdir()
    (lib / "files" / "token").symlink_to(tree.outside / "token")
    (chart / "charts").mkdir()
    (chart / "charts" / "sub").symlink_to(Path("../../../lib/sub"))

    err = refused(tree.repo, "charts/web", namespace="shop")

    assert err.problems == [f"charts/web/charts/sub/files/token: symlink to '{tree.outside / 'token'}' "
                            "resolves outside the repository"]


def test_helm_values_file_symlink_out_is_refused(tree, chart):
    (tree.repo / "values-prod.yaml").symlink_to(tree.outside / "values.yaml")

    err = refused(tree.repo, "charts/web", helm_values=["values-prod.yaml"])

    assert err.problems == ["helm values file 'values-prod.yaml' resolves outside the repository through a symlink"]


def test_helm_values_file_through_a_dir_link_out_is_refused(tree, chart):
    (tree.repo / "config").symlink_to(tree.outside)

    err = refused(tree.repo, "charts/web", helm_values=["config/values.yaml"])

    assert err.problems == ["helm values file 'config/values.yaml' resolves outside the repository through a symlink"]


def test_helm_chart_with_a_link_loop_and_a_link_out_is_refused(tree, chart):
    (chart / "templates").mkdir()
    (chart / "templates" / "again").symlink_to(Path(".."))        # a loop: walked once
    (chart / "templates" / "self").symlink_to(Path("self"))       # a link to itself: never resolves
    (chart / "files").symlink_to(tree.outside)

    err = refused(tree.repo, "charts/web", namespace="shop")

    assert err.problems == [f"charts/web/files: symlink to '{tree.outside}' resolves outside the repository"]


# --------------------------------------------------------------------------
# secret values never reach a message


SECRET = "hunter2-Zq8vX1"


def test_secret_generator_typo_never_prints_value(tree):
    # `password:VALUE` for `password=VALUE`: kustomize's error quotes every
    # literal of the generator.
    kustomization(tree.app, secretGenerator=[{"name": "db", "literals": [f"password:{SECRET}", "user=dbadmin"]}])

    err = refused(tree.repo)

    (problem,) = err.problems
    assert problem.startswith(f"kustomize build {APP}: failed (exit 1)")
    assert "invalid literal source" in problem and REDACTED in problem
    assert SECRET not in str(err)


def test_secret_generator_env_file_typo_never_prints_value(tree):
    # kustomize takes the line whole as a key with an empty value; the
    # apiserver would quote that key back in its refusal.
    write(tree.app / "db.env", f"user=app\npassword {SECRET}\n")  # a space for the `=`
    kustomization(tree.app, secretGenerator=[{"name": "db", "envs": ["db.env"]}])

    err = refused(tree.repo)

    (problem,) = err.problems
    assert problem.startswith(f"kustomize build {APP}: Secret/db-")
    assert problem.endswith(": data has 1 key(s) that are not valid Secret keys (letters, digits, '-', '_' and '.' "
                            "only; not shown, as such a key may hold a value)")
    assert "env file" in err.hint
    assert SECRET not in str(err)


def test_secret_generator_values_are_known_to_the_redactor_after_a_failed_render(tree):
    write(tree.app / "tls.key", f"-----BEGIN KEY-----\n{SECRET}\n-----END KEY-----\n")
    kustomization(tree.app, resources=["cm.yaml", "missing.yaml"],
                  secretGenerator=[{"name": "db", "literals": [f"password={SECRET}-lit"], "files": ["tls.key"]}])

    err = refused(tree.repo)

    # Known to the last line of defence, for whoever logs or records anything else about this render.
    for value in (f"{SECRET}-lit", f"password={SECRET}-lit", SECRET):
        assert redact.scrub(value) == REDACTED, value


def test_malformed_secret_in_output_names_the_key_never_the_value(tmp_path):
    write(tmp_path / "list.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: as-list\n"
                                  f"stringData:\n- password: {SECRET}\n")
    write(tmp_path / "number.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: as-number\n"
                                    "stringData:\n  pin: 73519284\n")

    with pytest.raises(RenderError) as info:
        render(tmp_path, ".")

    err = info.value
    assert err.problems == [
        "list.yaml: Secret/as-list: stringData must be a mapping of keys to strings, not a list",
        "number.yaml: Secret/as-number: stringData values must be strings; not: pin",
    ]
    assert SECRET not in str(err) and "73519284" not in str(err)
    assert redact.scrub("73519284") == REDACTED


# --------------------------------------------------------------------------
# through the real CLI and control plane


@pytest.mark.cluster
def test_cli_refuses_a_base_linked_out_and_leaves_the_cluster_untouched(repo, kube, kubeconfig, source_cache,
                                                                        namespace, tmp_path):
    from helpers import configmap as cm
    from helpers import gitopsd

    outside = tmp_path / "other-app-checkout"
    write(outside / "kustomization.yaml", "resources: [cm.yaml]\n")
    write(outside / "cm.yaml", cm("stolen", {"token": SENTINEL}))
    write(repo.work / APP / "cm.yaml", cm("web", {"k": "v1"}))
    write(repo.work / KFILE, "resources: [cm.yaml]\n")
    repo.commit("web")
    args = ("--repo", repo.url, "--ref", "main", "--path", APP, "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)
    first = gitopsd("sync", *args, kubeconfig=kubeconfig, cache=source_cache)
    assert first.returncode == 0, first.stdout + first.stderr
    kinds = (kube.resource("v1", "ConfigMap"), kube.resource("v1", "Secret"))

    def live() -> dict:
        """Every object of the namespace but the audit trail (a failed sync is recorded: it grows,
        and so does the chain head kept on the app's parent); of the parent, its inventory."""
        out = {}
        for r in kinds:
            for o in kube.list(r, namespace=namespace):
                name = o["metadata"]["name"]
                if name.startswith("gitopsd-audit"):
                    continue
                if name == f"gitopsd-{namespace}":
                    notes = o["metadata"].get("annotations") or {}
                    out[(o["kind"], name)] = {k: v for k, v in notes.items() if k.startswith("applyset.")}
                else:
                    out[(o["kind"], name)] = o["metadata"]["resourceVersion"]
        return out

    before = live()
    (repo.work / APP / "base").symlink_to(outside)  # committed as a link to the other app's checkout
    write(repo.work / KFILE, "resources: [cm.yaml, base]\n")
    write(repo.work / APP / "cm.yaml", cm("web", {"k": "v2"}))
    repo.commit("base from elsewhere")

    for command in ("diff", "sync"):
        proc = gitopsd(command, *args, kubeconfig=kubeconfig, cache=source_cache)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        out = proc.stdout + proc.stderr
        assert f"{KFILE}: resources[1] 'base' resolves outside the repository through the symlink {APP}/base" in out
        assert SENTINEL not in out and "Traceback" not in out
    assert live() == before
    assert ("ConfigMap", "stolen") not in before
    assert SENTINEL not in str(kube.list(kinds[0], namespace=namespace)), "nor in the audit trail"


@pytest.mark.cluster
def test_cli_remote_bases_are_refused_unless_allowed_and_then_kustomize_fetches(repo, kubeconfig, source_cache,
                                                                                namespace):
    # The app setting allowRemoteBases and its flag --allow-remote-bases reach the renderer. Nothing
    # listens on port 9, so with the opt-in kustomize's own fetch fails: proof the walk let it pass.
    from helpers import configmap as cm
    from helpers import gitopsd

    entry = "https://127.0.0.1:9/example/repo//deploy?ref=v1"
    write(repo.work / APP / "cm.yaml", cm("web", {"k": "v1"}))
    write(repo.work / KFILE, f"resources: [cm.yaml, '{entry}']\n")
    repo.commit("a remote base")
    args = ("--repo", repo.url, "--ref", "main", "--path", APP, "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)

    for command in ("diff", "sync"):
        refused_ = gitopsd(command, *args, kubeconfig=kubeconfig, cache=source_cache)
        out = refused_.stdout + refused_.stderr
        assert refused_.returncode == 2, out
        assert f"{KFILE}: resources[1] {entry!r} is a remote base, and remote bases are off for this app" in out
        assert "allowRemoteBases: true" in out, "the hint names the opt-in"

        fetched = gitopsd(command, *args, "--allow-remote-bases", kubeconfig=kubeconfig, cache=source_cache)
        out = fetched.stdout + fetched.stderr
        assert fetched.returncode == 2, out
        assert f"kustomize build {APP}: failed (exit 1)" in out and f"accumulating resources from '{entry}'" in out
        assert "remote bases are off" not in out and "Traceback" not in out
