"""Hostile YAML: one commit must not be able to take the daemon's memory or
crash a render with a message nobody can act on.

An alias bomb ("billion laughs": 9 levels of 9 aliases, a few hundred
bytes, 387 million nodes once expanded), a 300-deep document, a list that
contains itself, files too big to read: each is refused with an error naming
the file, for plain directories, kustomize (before kustomize runs: it would
choke first) and helm output, and for the daemon's own config file. Memory
is measured with tracemalloc around the render, never with a clock. Real
repositories stay well inside the limits: a 5 MB bundle of CRDs renders.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import yaml

from gitopsd import config
from gitopsd.engine import yamlload
from gitopsd.engine.render import render
from gitopsd.errors import RenderError

HINT = "a render may read at most 64 MiB, expand to 2,000,000 YAML nodes and nest 100 levels deep"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def laughs(indent: str = "  ") -> str:
    """The classic bomb, nine levels of nine: 387,420,489 strings once expanded."""
    lines = [f"{indent}a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BOMB = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: laughs\ndata:\n" + laughs()
BOMB_PROBLEM = "YAML expands past 2,000,000 nodes through aliases (an alias bomb?)"


def nested(depth: int) -> str:
    """A custom resource whose spec is `depth` mappings deep (the object itself is one more level)."""
    body = "leaf"
    for _ in range(depth):
        body = "{a: " + body + "}"
    return f"apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: deep\nspec: {body}\n"


def refused(root: Path, path: str = ".", **kwargs) -> RenderError:
    with pytest.raises(RenderError) as info:
        render(root, path, **kwargs)
    return info.value


def peak_bytes_of(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# --------------------------------------------------------------------------
# plain files


def test_alias_bomb_is_refused_without_growing_memory(tmp_path):
    write(tmp_path / "apps" / "x.yaml", BOMB)
    assert len(BOMB) < 600
    errors = []

    peak = peak_bytes_of(lambda: errors.append(refused(tmp_path)))

    (err,) = errors
    assert err.problems == [f"apps/x.yaml: {BOMB_PROBLEM} (line 12)"]
    assert HINT in err.hint
    assert peak < 10 * 1024 * 1024, f"refusing the bomb took {peak / 2**20:.1f} MiB"


def test_alias_bomb_through_merge_keys_is_refused(tmp_path):
    # `<<:` copies a mapping's keys: nine merges of nine merges of ... .
    lines = ["a0: &a0 {" + ", ".join(f"k{i}: v" for i in range(9)) + "}"]
    for n in range(1, 9):
        lines.append(f"a{n}: &a{n} {{" + ", ".join(f"m{i}: *a{n - 1}" for i in range(9)) + "}")
    write(tmp_path / "merge.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m\n"
                                   "x:\n" + "".join(f"  {line}\n" for line in lines) + "  last:\n    <<: *a8\n")

    err = refused(tmp_path)

    (problem,) = err.problems
    assert problem.startswith(f"merge.yaml: {BOMB_PROBLEM}")


def test_deep_nesting_is_a_clear_error(tmp_path):
    write(tmp_path / "apps" / "deep.yaml", nested(300))

    err = refused(tmp_path)

    assert err.problems == ["apps/deep.yaml: nested deeper than 100 levels (line 5)"]
    assert "Recursion" not in str(err)


def test_nesting_at_the_limit_renders_and_one_more_level_is_refused(tmp_path):
    # The top-level object is a level too: spec at 100 levels makes 101.
    write(tmp_path / "ok" / "w.yaml", nested(99))
    write(tmp_path / "deep" / "w.yaml", nested(100))

    (widget,) = render(tmp_path, "ok")

    assert widget.obj["metadata"]["name"] == "deep"
    assert refused(tmp_path, "deep").problems == ["deep/w.yaml: nested deeper than 100 levels (line 5)"]


def test_nesting_past_the_parsers_own_limit_is_a_clear_error(tmp_path):
    # libyaml stops at 1,000 levels by itself; the message still names the file.
    write(tmp_path / "flow.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")

    (problem,) = refused(tmp_path).problems

    assert problem.startswith("flow.yaml: ") and "nesting depth" in problem


def test_recursive_alias_is_a_clear_error(tmp_path):
    write(tmp_path / "loop.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: loop\n"
                                  "data: &d\n  self: *d\n")

    err = refused(tmp_path)

    assert err.problems == ["loop.yaml: an alias refers to a node that contains it (a structure that never ends) "
                            "(line 5)"]


def test_too_many_aliases_are_refused(tmp_path):
    refs = ", ".join(["*v"] * (yamlload.MAX_ALIASES + 1))
    write(tmp_path / "many.yaml", f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m\nv: &v x\nlist: [{refs}]\n")

    (problem,) = refused(tmp_path).problems

    assert problem.startswith("many.yaml: uses more than 10,000 aliases")


def test_deep_json_is_a_clear_error(tmp_path):
    spec = {"leaf": 1}
    for _ in range(300):
        spec = {"a": spec}
    write(tmp_path / "deep.json", json.dumps({"apiVersion": "example.com/v1", "kind": "Widget",
                                              "metadata": {"name": "w"}, "spec": spec}))

    assert refused(tmp_path).problems == ["deep.json: nested deeper than 100 levels"]


def test_oversized_file_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(yamlload.MAX_FILE_BYTES + 1)  # sparse: costs no disk, would cost 32 MiB to read
    errors = []

    peak = peak_bytes_of(lambda: errors.append(refused(tmp_path)))

    (err,) = errors
    assert err.problems == ["big.yaml: is larger than the 32 MiB a file may have (33,554,433 bytes)"]
    assert peak < 4 * 1024 * 1024


def test_render_input_is_bounded_in_total(tmp_path):
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        with (tmp_path / name).open("wb") as f:
            f.truncate(25 * 1024 * 1024)

    err = refused(tmp_path)

    assert "c.yaml: takes the render past 64 MiB of input in total" in err.problems


def test_node_budget_is_shared_by_the_files_of_a_render(tmp_path, monkeypatch):
    # Each file alone is fine; together they are more than a render may
    # build. (The limit lowered to keep the test small: 3,000 nodes.)
    monkeypatch.setattr(yamlload, "MAX_NODES", 3000)
    for n in range(3):
        write(tmp_path / f"f{n}.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c" + str(n) + "\n"
              "data:\n" + "".join(f"  k{i}: v\n" for i in range(600)))

    assert len(render(tmp_path, "f0.yaml")) == 1
    err = refused(tmp_path)

    assert err.problems == ["f2.yaml: takes the render past 3,000 YAML nodes (line 6)"]


def test_anchors_and_merge_keys_of_real_files_still_render(tmp_path):
    write(tmp_path / "d.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n"
                               "  labels: &labels {app: web, tier: front}\nspec:\n"
                               "  selector:\n    matchLabels: *labels\n  template:\n    metadata:\n"
                               "      labels:\n        <<: *labels\n        extra: x\n"
                               "    spec:\n      containers: [{name: web, image: nginx}]\n")

    (d,) = render(tmp_path, ".", namespace="shop")

    assert d.obj["spec"]["template"]["metadata"]["labels"] == {"app": "web", "tier": "front", "extra": "x"}


def crd_bundle(min_bytes: int) -> str:
    """CustomResourceDefinitions shaped like real ones (long descriptions,
    nested schemas) until the text is `min_bytes` long."""
    def schema(depth: int) -> dict:
        if depth == 0:
            return {"type": "string", "description": "A field of the resource, described at length as real CRDs do."}
        return {"type": "object", "description": "Nested object.",
                "properties": {f"field{i}": schema(depth - 1) for i in range(4)}}

    docs, size, i = [], 0, 0
    while size < min_bytes:
        doc = yaml.safe_dump({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"things{i}.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"kind": f"Thing{i}", "plural": f"things{i}"},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": schema(5)}}]}}, sort_keys=False)
        docs.append(doc)
        size += len(doc) + 4
        i += 1
    return "---\n".join(docs)


def test_a_5mb_crd_bundle_still_renders(tmp_path):
    write(tmp_path / "crds.yaml", crd_bundle(5 * 1024 * 1024))

    manifests = render(tmp_path, ".")

    assert len(manifests) > 15 and all(m.ref.kind == "CustomResourceDefinition" for m in manifests)


# --------------------------------------------------------------------------
# kustomize: caught before kustomize runs, since kustomize would choke first


def test_alias_bomb_in_a_kustomize_resource_is_refused_before_kustomize_runs(tmp_path):
    write(tmp_path / "apps" / "web" / "kustomization.yaml", "resources: [bomb.yaml]\n")
    write(tmp_path / "apps" / "web" / "bomb.yaml", BOMB)

    err = refused(tmp_path, "apps/web")

    assert err.problems == [f"apps/web/bomb.yaml: {BOMB_PROBLEM} (line 12)"]


def test_alias_bomb_in_a_kustomization_file_is_refused(tmp_path):
    write(tmp_path / "kustomization.yaml", "resources: [cm.yaml]\nnamePrefix: x-\ncommonLabels:\n" + laughs())

    err = refused(tmp_path)

    (problem,) = err.problems
    assert problem.startswith(f"kustomization.yaml: {BOMB_PROBLEM}")


def test_deep_nesting_in_a_kustomize_patch_is_refused(tmp_path):
    write(tmp_path / "kustomization.yaml", "resources: [w.yaml]\npatches:\n- path: patch.yaml\n")
    write(tmp_path / "w.yaml", nested(3))
    write(tmp_path / "patch.yaml", nested(300))

    assert refused(tmp_path).problems == ["patch.yaml: nested deeper than 100 levels (line 5)"]


def test_a_5mb_crd_bundle_still_renders_through_kustomize(tmp_path):
    write(tmp_path / "kustomization.yaml", "resources: [crds.yaml]\n")
    write(tmp_path / "crds.yaml", crd_bundle(5 * 1024 * 1024))

    manifests = render(tmp_path, ".", timeout=300)

    assert len(manifests) > 15 and all(m.ref.kind == "CustomResourceDefinition" for m in manifests)


def test_a_renderer_past_its_memory_cap_is_a_clear_error(tmp_path, monkeypatch):
    # The layer below the walk: were a bomb to slip past it, kustomize would
    # run into its address-space cap (lowered here to keep the test small)
    # instead of the machine's memory.
    from gitopsd.engine import confine
    from gitopsd.engine import render as render_module

    monkeypatch.setattr(render_module, "MAX_TOOL_MEMORY", 3 * 1024**3 // 2)
    monkeypatch.setattr(confine.KustomizeWalk, "_yaml_file", lambda self, path, raw=False: [])
    write(tmp_path / "kustomization.yaml", "resources: [bomb.yaml]\n")
    write(tmp_path / "bomb.yaml", BOMB)

    err = refused(tmp_path, timeout=300)

    assert err.problems == ["kustomize build .: ran out of the 1.5 GiB of memory a renderer may use"]
    assert "alias bomb" in err.hint


def test_renderer_output_past_the_byte_limit_is_stopped(tmp_path, monkeypatch):
    endless = tmp_path / "kustomize"
    endless.write_text("#!/bin/sh\nexec yes 'apiVersion: v1'\n")
    endless.chmod(0o755)
    monkeypatch.setenv("GITOPSD_KUSTOMIZE", str(endless))
    write(tmp_path / "repo" / "kustomization.yaml", "resources: []\n")
    errors = []

    peak = peak_bytes_of(lambda: errors.append(refused(tmp_path / "repo", timeout=300)))

    (err,) = errors
    assert err.problems == ["kustomize build .: wrote more than 64 MiB of manifests; stopped"]
    assert peak < 3 * yamlload.MAX_RENDER_BYTES


# --------------------------------------------------------------------------
# helm output


@pytest.fixture
def chart(tmp_path):
    chart = tmp_path / "chart"
    write(chart / "Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")
    return chart


def test_alias_bomb_in_helm_output_is_refused(tmp_path, chart):
    write(chart / "templates" / "bomb.yaml", BOMB)

    err = refused(tmp_path, "chart", namespace="shop")

    (problem,) = err.problems
    # helm's own YAML reader may see it first; either way the template is named.
    assert problem.startswith(f"chart/templates/bomb.yaml: {BOMB_PROBLEM}") or \
        (problem.startswith("helm template chart: failed") and "bomb.yaml" in problem), problem


def test_deep_nesting_in_helm_output_is_refused(tmp_path, chart):
    write(chart / "templates" / "deep.yaml", nested(300))

    err = refused(tmp_path, "chart", namespace="shop")

    assert err.problems == ["chart/templates/deep.yaml: nested deeper than 100 levels"]


# --------------------------------------------------------------------------
# the daemon's config file


def test_config_alias_bomb_is_refused(tmp_path):
    path = write(tmp_path / "apps.yaml", "apps: []\nx:\n" + laughs())
    errors = []

    peak = peak_bytes_of(lambda: errors.append(pytest.raises(config.ConfigError, config.load, path).value))

    (err,) = errors
    assert f"invalid YAML: {BOMB_PROBLEM}" in str(err) and str(path) in str(err)
    assert peak < 10 * 1024 * 1024


def test_config_deep_nesting_is_refused(tmp_path):
    for depth in (300, 5000):  # under and over the pure-Python parser's recursion limit
        path = write(tmp_path / "apps.yaml", "apps: " + "[" * depth + "]" * depth + "\n")

        with pytest.raises(config.ConfigError) as info:
            config.load(path)

        assert "invalid YAML: nested deeper than 100 levels" in str(info.value)
