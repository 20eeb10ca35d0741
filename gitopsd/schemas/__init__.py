"""The documents gitopsd prints for scripts, as JSON Schema (draft 2020-12) files shipped in the package.

`gitopsd sync -o json` prints a sync result (sync-result.schema.json) and
`gitopsd diff -o json` a drift report (diff.schema.json); either prints an
error document of the same schema when it fails before it has one (a
kubeconfig that does not load, a cluster that does not answer). CI
pipelines parse them, so they are a stable interface:

- The first field, `schema`, names the document and its version
  (`gitopsd.io/sync-result/v1`). Within a version fields are only added;
  removing, renaming or retyping one makes a new version. A reader should
  ignore fields it does not know.
- The schema files are exact for the gitopsd they ship with: every object
  lists its fields and forbids others (additionalProperties: false), and
  tests validate real outputs against them, so a field added to the output
  without being documented here fails the tests.

This module is light on purpose (no engine imports): the CLI's error paths
use the identifiers too.
"""

from __future__ import annotations

import json
from importlib import resources

SYNC_RESULT = "gitopsd.io/sync-result/v1"
DIFF = "gitopsd.io/diff/v1"

#: The schema identifier of each command's JSON output, and the file that describes it.
BY_COMMAND = {"sync": (SYNC_RESULT, "sync-result.schema.json"), "diff": (DIFF, "diff.schema.json")}


def for_command(command: str) -> str | None:
    """The `schema` value of `command`'s JSON output; None for commands without a documented schema."""
    found = BY_COMMAND.get(command)
    return found[0] if found else None


def load(command: str) -> dict:
    """The JSON Schema of `command`'s output (`sync` or `diff`), as shipped in the package."""
    return json.loads(resources.files(__package__).joinpath(BY_COMMAND[command][1]).read_text(encoding="utf-8"))
