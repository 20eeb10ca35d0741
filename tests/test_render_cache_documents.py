"""A render parses only the documents it has not seen (gitopsd.engine.yamlload.Documents).

A commit that changes one object of a thousand must not cost a parse of the
thousand: the renderer keeps each document's parse by the digest of its
text. These tests render real files with the real renderer and compare with
a parse of the whole text, which stays the reference for what YAML means,
for errors and their line numbers, and for the limits.
"""

from __future__ import annotations

import pytest
import yaml
from helpers import configmap

from gitopsd.engine import render, yamlload
from gitopsd.errors import RenderError


@pytest.fixture
def documents(monkeypatch) -> yamlload.Documents:
    """A memo of the test's own, used by the renderer."""
    memo = yamlload.Documents()
    monkeypatch.setattr(yamlload, "DOCUMENTS", memo)
    return memo


def fillers(n: int, *, changed: int | None = None) -> str:
    return yaml.safe_dump_all([configmap(f"filler-{i:04d}", {"i": str(i) + ("-changed" if i == changed else "")})
                               for i in range(n)])


def test_a_commit_that_changes_one_document_of_a_thousand_parses_only_that_one(tmp_path, documents, monkeypatch):
    (tmp_path / "app").mkdir()
    (tmp_path / "app/more.yaml").write_text(fillers(1000))
    first = render.render(tmp_path, "app")
    assert documents.parsed == 1000

    (tmp_path / "app/more.yaml").write_text(fillers(1000, changed=500))
    again = render.render(tmp_path, "app")

    assert documents.parsed == 1001
    monkeypatch.setattr(yamlload, "DOCUMENTS", yamlload.Documents())   # the reference: everything parsed
    assert [m.obj for m in again] == [m.obj for m in render.render(tmp_path, "app")] != [m.obj for m in first]
    assert again[500].obj["data"] == {"i": "500-changed"} and again[500].source == "app/more.yaml#500"


def test_files_left_alone_are_not_parsed_again(tmp_path, documents):
    for i in range(50):
        (tmp_path / f"cm-{i:02d}.yaml").write_text(yaml.safe_dump(configmap(f"cm-{i:02d}", {"v": "1"})))
    render.render(tmp_path, ".")
    (tmp_path / "cm-07.yaml").write_text(yaml.safe_dump(configmap("cm-07", {"v": "2"})))

    [*_, changed] = [m for m in render.render(tmp_path, ".") if m.obj["metadata"]["name"] == "cm-07"]

    assert documents.parsed == 51 and changed.obj["data"] == {"v": "2"}


def test_documents_from_the_memo_are_fresh_copies(tmp_path, documents):
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(configmap("a", {"v": "1"})))
    first = render.render(tmp_path, "cm.yaml")[0].obj
    first["data"]["v"] = "changed by a caller"

    assert render.render(tmp_path, "cm.yaml")[0].obj["data"] == {"v": "1"}


@pytest.mark.parametrize("text", [
    "a: 1\n---\nb: 2\n",
    "---\na: 1\n",
    "a: 1\n---\n",                              # a trailing empty document
    "a: 1\n---\n---\nb: 2",                     # an empty document between two
    "# only a comment\n---\na: 1\n---\n# a comment\n---\nb: [1, 2]\n",
    "--- |\n  text on the marker line\n---\na: 1\n",
    "a: &x {k: v}\nb: *x\n---\nc: 1\n",       # anchors belong to their document
    "%YAML 1.1\n---\na: 1\n",                   # a directive: parsed whole
    "a: 1\n...\n---\nb: 2\n",                   # an end marker: parsed whole
    "a: .nan\n---\nb: 1\n",                     # NaN: JSON cannot hold it
    "a: 123456789012345678901234567890\n",      # beyond 64 bits
    "a: !!binary aGVsbG8=\n",
    "a: |\n  block\n---\nb: 1\n",
    "\ufeffa: 1\n---\n\ufeffb: 2\n",
])
def test_documents_read_as_a_parse_of_the_whole_text(text, documents):
    whole = yamlload.load_all(text)

    assert repr(documents.load_all(text)) == repr(whole)
    assert repr(documents.load_all(text)) == repr(whole)   # again, from the memo


def test_an_error_names_the_line_of_the_whole_file(tmp_path, documents):
    good = fillers(20)
    (tmp_path / "cm.yaml").write_text(good)
    render.render(tmp_path, ".")
    (tmp_path / "cm.yaml").write_text(good + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: [unclosed\n")

    with pytest.raises(RenderError) as err:
        render.render(tmp_path, ".")

    line = good.count("\n") + 4   # of the unclosed sequence, counted in the whole file
    [problem] = err.value.problems
    assert problem.startswith(f"cm.yaml: invalid YAML at line {line + 1}") and f"began at line {line})" in problem


def test_the_node_limit_counts_documents_from_the_memo(tmp_path, documents, monkeypatch):
    """Each file alone is fine, together they are too many nodes: also when two were seen before."""
    monkeypatch.setattr(yamlload, "MAX_NODES", 3000)
    for n in range(3):
        (tmp_path / f"f{n}.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c" + str(n) +
                                             "\ndata:\n" + "".join(f"  k{i}: v\n" for i in range(600)))
    for n in range(2):
        render.render(tmp_path, f"f{n}.yaml")

    with pytest.raises(RenderError) as err:
        render.render(tmp_path, ".")

    assert err.value.problems == ["f2.yaml: takes the render past 3,000 YAML nodes (line 6)"]


def test_the_alias_limit_counts_documents_from_the_memo(documents, monkeypatch):
    monkeypatch.setattr(yamlload, "MAX_ALIASES", 10)
    doc = "v: &v x\nlist: [" + ", ".join(["*v"] * 6) + "]\n"
    assert documents.load_all(doc + "---\nother: 1\n")

    with pytest.raises(yamlload.YAMLLimitError, match="uses more than 10 aliases"):
        documents.load_all(doc + "---\n" + doc)


def test_the_memo_is_bounded(documents):
    small = yamlload.Documents(max_documents=10)
    small.load_all(fillers(25))

    assert len(small) == 10
