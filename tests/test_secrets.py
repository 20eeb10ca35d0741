"""No Secret value appears in any output: diff text, diff JSON, sync output, errors."""

from __future__ import annotations

import base64
import re

import pytest

from helpers import gitopsd

pytestmark = pytest.mark.cluster

VALUE_1 = "hunter2-very-secret-value"
VALUE_2 = "rotated-s3cret-value-xyz"


def _secret(value: str, extra: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "type": "Opaque",
            "data": {"password": base64.b64encode(value.encode()).decode(), **(extra or {})},
            "stringData": {"token": value + "-token"}}


def test_no_secret_value_appears_in_any_output(repo, kubeconfig, source_cache, namespace):
    args = ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace)
    outputs = []

    repo.write("secret.yaml", _secret(VALUE_1))
    repo.commit()
    for cmd in (("diff",), ("diff", "-o", "json"), ("sync",)):
        outputs.append(gitopsd(*cmd, *args, kubeconfig=kubeconfig, cache=source_cache))

    repo.write("secret.yaml", _secret(VALUE_2))
    repo.commit("rotate")
    for cmd in (("diff",), ("diff", "-o", "json")):
        proc = gitopsd(*cmd, *args, kubeconfig=kubeconfig, cache=source_cache)
        assert proc.returncode == 1
        assert "password" in proc.stdout, "the diff names the changed key"
        assert not re.search(r"desired-hash\W+[0-9a-f]{32}", proc.stdout), \
            "a hash of the values would let a short secret be guessed"
        outputs.append(proc)
    outputs.append(gitopsd("sync", "-o", "json", *args, kubeconfig=kubeconfig, cache=source_cache))

    # An invalid Secret: the server's error must not echo the value either.
    repo.write("secret.yaml", _secret(VALUE_2, {"bad key!": base64.b64encode(VALUE_1.encode()).decode()}))
    repo.commit("invalid key")
    bad = gitopsd("sync", *args, kubeconfig=kubeconfig, cache=source_cache)
    assert bad.returncode == 2
    outputs.append(bad)

    forbidden = [VALUE_1, VALUE_2, VALUE_2 + "-token"]
    forbidden += [base64.b64encode(v.encode()).decode() for v in forbidden]
    for proc in outputs:
        for text in (proc.stdout, proc.stderr):
            for value in forbidden:
                assert value not in text, f"secret value leaked in `{' '.join(proc.args[2:4])}` output"
