"""No Secret value appears in any output: diff text, diff JSON, sync output, errors.

The cluster test drives the real CLI; the rest prove the last line of
defence (gitopsd.redact) and where it is wired in, on plain values.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import subprocess
import sys
import urllib.parse
import uuid

import pytest
import structlog
from helpers import gitopsd

from gitopsd import log as gitopsd_log
from gitopsd import redact
from gitopsd.engine.render import render
from gitopsd.engine.sync import _cause
from gitopsd.errors import GitopsdError, RenderError

VALUE_1 = "hunter2-very-secret-value"
VALUE_2 = "rotated-s3cret-value-xyz"


def _secret(value: str, extra: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "type": "Opaque",
            "data": {"password": base64.b64encode(value.encode()).decode(), **(extra or {})},
            "stringData": {"token": value + "-token"}}


def _unique(tag: str = "v") -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


@pytest.mark.cluster
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


# ------------------------------------------------------------------ the registry (pure logic)

def test_scrub_replaces_a_value_in_every_cheap_encoding():
    value = _unique("pa ss/wörd\"&")
    redact.remember([value])
    raw = value.encode()
    encodings = {
        "raw": value,
        "base64": base64.b64encode(raw).decode(),
        "base64 url-safe": base64.urlsafe_b64encode(raw).decode(),
        "url-encoded": urllib.parse.quote(value, safe=""),
        "form-encoded": urllib.parse.quote_plus(value),
        "JSON-escaped": json.dumps(value),
        "JSON-escaped, ASCII only": json.dumps(value, ensure_ascii=True),
        "Python repr": repr(value),
    }
    for what, encoded in encodings.items():
        text = f"error: the server said {encoded}; try again"
        assert redact.scrub(text) != text, f"the {what} form was not scrubbed"
        assert value not in redact.scrub(text) and encoded.strip('"\'') not in redact.scrub(text), what
    assert redact.scrub(f"a{value}b{value}") == f"a{redact.REDACTED}b{redact.REDACTED}"


def test_scrub_finds_each_line_of_a_multi_line_value():
    lines = [_unique("line-one"), _unique("line-two"), _unique("line-three")]
    redact.remember(["-----BEGIN KEY-----\n" + "\n".join(lines) + "\n-----END KEY-----\n"])
    assert redact.scrub(f"tool: bad input at {lines[1]}") == f"tool: bad input at {redact.REDACTED}"


def test_values_shorter_than_the_minimum_are_not_scrubbed_everywhere():
    short = "x" * (redact.MIN_LENGTH - 1)
    redact.remember([short, "true", "1"])
    text = f"replicas 1 of 3 ready: true ({short})"
    assert redact.scrub(text) == text


def test_the_registry_keeps_no_value_in_plaintext():
    value = _unique("plaintext-never-kept")
    redact.remember([value])
    state = redact._registry._state
    dumped = pickle.dumps((state.order, state.digests, state.anchors))
    for form in (value, base64.b64encode(value.encode()).decode().rstrip("=")):
        assert form.encode() not in dumped and form.encode("utf-16-le") not in dumped
    assert value not in repr(redact._registry)
    assert redact.scrub(value) == redact.REDACTED, "and still finds it"


def test_the_registry_is_bounded_and_forgets_the_value_seen_least_recently(monkeypatch):
    redact.forget_all()
    monkeypatch.setattr(redact, "MAX_ENTRIES", 8)
    stale, in_use = _unique("stale-value"), _unique("still-in-use")
    redact.remember([stale, in_use])
    assert redact.scrub(stale) == redact.scrub(in_use) == redact.REDACTED
    for _ in range(10):
        redact.remember([_unique("newer")])
        redact.remember([in_use])   # rendered again by every sync
    assert len(redact._registry) <= redact.MAX_ENTRIES
    assert redact.scrub(stale) == stale, "the value nobody renders any more left the bounded registry"
    assert redact.scrub(in_use) == redact.REDACTED, "a value seen at every sync is never the one forgotten"


def test_malformed_secret_bodies_register_what_looks_like_a_value():
    item, scalar, nested, number = _unique("list-item"), _unique("scalar"), _unique("nested"), 918273645546
    pasted = _unique("pasted-into-a-key")
    bodies = [
        {"stringData": [f"password={item}"]},
        {"stringData": {f"password={pasted}": "", "user": "admin"}},
        {"data": f"token: {scalar}"},
        {"stringData": {"db": {"password": nested}}},
        {"stringData": {"pin": number}},
    ]
    redact.remember_objects({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, **b} for b in bodies)
    for value in (item, f"password={item}", scalar, nested, str(number), pasted):
        assert redact.scrub(f"got &{{[{value}]}}") == f"got &{{[{redact.REDACTED}]}}", value


def test_a_data_value_is_known_raw_and_decoded():
    value = _unique("decoded-value")
    encoded = base64.b64encode(value.encode()).decode()
    redact.remember_secret({"apiVersion": "v1", "kind": "Secret", "data": {"k": encoded}})
    assert value not in redact.scrub(f"decoded {value}") and encoded not in redact.scrub(f"raw {encoded}")


def test_malformed_secret_bodies_are_refused_by_the_renderer_naming_the_field_never_the_value(tmp_path):
    value = _unique("never-in-a-message")
    cases = {
        "stringData as a list": ({"stringData": [f"password={value}"]},
                                 "stringData must be a mapping of keys to strings, not a list", "key: value"),
        "data as a list": ({"data": [value]}, "data must be a mapping of keys to strings, not a list", "key: value"),
        "stringData as text": ({"stringData": f"password={value}"},
                               "stringData must be a mapping of keys to strings, not a string", "key: value"),
        "data nested": ({"data": {"db": {"password": value}}}, "data values must be strings; not: db", "quote"),
        "a number": ({"stringData": {"pin": 123456789}}, "stringData values must be strings; not: pin", "quote"),
        "a value in a key": ({"stringData": {f"password {value}": ""}}, "stringData has 1 key(s) that are not valid",
                             "env file"),
        "not base64": ({"data": {"password": value + "!"}}, "data.password is not valid base64", "stringData"),
    }
    for what, (body, field, hint) in cases.items():
        app = tmp_path / what.replace(" ", "-")
        app.mkdir()
        (app / "s.yaml").write_text(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                                **body}))
        with pytest.raises(RenderError) as info:
            render(app, ".")
        (problem,) = info.value.problems
        assert problem.startswith("s.yaml: Secret/s: ") and field in problem, (what, problem)
        assert hint in info.value.hint, (what, info.value.hint)
        assert value not in str(info.value) and "123456789" not in str(info.value), what
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "s.yaml").write_text(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                           "data": {"a": "aGk=\n"}, "stringData": {"b": "x"}}))
    (ok / "cm.yaml").write_text(json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                                            "data": ["x"]}))   # not a Secret: the apiserver's to judge
    assert len(render(ok, ".")) == 2


def test_a_server_message_about_a_secret_is_scrubbed_of_its_values_not_yet_known():
    value = _unique("echoed-by-the-apiserver")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"password": value}}
    assert value in redact.scrub(f"Invalid value: {value!r}"), "not known before"
    assert redact.scrub_about(f"Invalid value: {value!r}", secret) == f"Invalid value: '{redact.REDACTED}'"
    assert redact.scrub_about("nothing secret here", {"kind": "ConfigMap", "data": {"k": value}}) \
        == "nothing secret here"


# ------------------------------------------------------------------ where it is wired in

def test_every_log_field_and_traceback_is_scrubbed():
    value = _unique("log-sentinel")
    redact.remember([value])
    out = io.StringIO()
    gitopsd_log.configure(fmt="json", stream=out)
    try:
        logger = structlog.get_logger("test")
        logger.warning(f"event {value}", error=f"server said {value}", nested={"a": [value]})
        try:
            try:
                raise GitopsdError(f"the apiserver said: {value}")
            except GitopsdError:
                raise ValueError("a bug while handling it")
        except ValueError:
            logger.exception("crashed")
        import logging
        logging.getLogger("some.library").error("library says %s", value)
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3 and "a bug while handling it" in lines[1]["exception"]
    assert value not in text and redact.REDACTED in lines[0]["error"]


def test_an_uncaught_traceback_is_scrubbed_in_threads_and_main():
    value = _unique("uncaught-sentinel")
    program = f"""
import threading
from gitopsd import redact
redact.remember([{value!r}])
def boom():
    raise RuntimeError("bug in a worker with " + {value!r})
t = threading.Thread(target=boom, name="worker")
t.start(); t.join()
raise ValueError("bug in main with " + {value!r})
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Exception in thread worker" in proc.stderr
    assert f"RuntimeError: bug in a worker with {redact.REDACTED}" in proc.stderr
    assert f"ValueError: bug in main with {redact.REDACTED}" in proc.stderr
    assert value not in proc.stderr


def test_scrub_exception_cleans_the_whole_chain():
    value = _unique("chained")
    redact.remember([value])
    try:
        try:
            raise GitopsdError(f"PATCH /api: 422 Invalid: got {value}", hint=f"near {value}")
        except GitopsdError as inner:
            raise RenderError([f"x.yaml: {value}"]) from inner
    except RenderError as exc:
        redact.scrub_exception(exc)
        assert value not in str(exc) and value not in exc.problems[0]
        assert value not in str(exc.__cause__) and value not in exc.__cause__.hint


@pytest.mark.cluster
def test_the_daemon_registers_the_git_credentials_it_reads(kubeconfig, namespace, tmp_path):
    """The token and the SSH key's content, from a credentials Secret and from mounted files, are
    known to the redactor as soon as the daemon reads them; the username is not a secret."""
    from gitopsd.daemon import Daemon
    from gitopsd.kube import Kube

    by_secret = {"token": _unique("secret-token"), "key": _unique("secret-key-line"), "user": _unique("bot")}
    by_files = {"token": _unique("file-token"), "key": _unique("file-key-line"), "user": _unique("bot")}

    def pem(line: str) -> str:
        return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{line}\n-----END OPENSSH PRIVATE KEY-----\n"

    (tmp_path / "token").write_text(by_files["token"] + "\n")
    (tmp_path / "id").write_text(pem(by_files["key"]))
    config = tmp_path / "apps.yaml"
    config.write_text(json.dumps({"apps": [
        {"name": "by-secret", "repo": "https://git.example.com/a.git", "credentials": {"secretRef": {"name": "git"}}},
        {"name": "by-files", "repo": "https://git.example.com/b.git",
         "credentials": {"tokenFile": str(tmp_path / "token"), "sshKeyFile": str(tmp_path / "id"),
                         "username": by_files["user"]}},
    ]}))
    kube = Kube.connect(kubeconfig=kubeconfig)
    daemon = Daemon(kube=kube, config_path=config, namespace=namespace, http_host="127.0.0.1", http_port=0,
                    instance="credentials-test", leader_elect=False)
    try:
        kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "git", "namespace": namespace},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in
                             (("token", by_secret["token"]), ("identity", pem(by_secret["key"])),
                              ("username", by_secret["user"]))}})
        for app, values in (("by-secret", by_secret), ("by-files", by_files)):
            creds = daemon.credentials.resolve(daemon.config.app(app))
            assert creds.token == values["token"], app
            for secret in (values["token"], values["key"]):
                assert redact.scrub(f"git: {secret} rejected") == f"git: {redact.REDACTED} rejected", app
            assert redact.scrub(f"user {values['user']}") == f"user {values['user']}", app
    finally:
        daemon.stop()
        kube.close()


def test_a_failure_reason_carries_the_first_problem_and_the_count():
    problems = ["apps/x.yaml: invalid YAML at line 3, column 1: mapping values are not allowed here",
                "apps/y.yaml: missing kind", "apps/z.yaml: missing metadata.name"]
    assert _cause("rendering failed", problems) == (
        "rendering failed: apps/x.yaml: invalid YAML at line 3, column 1: mapping values are not allowed here "
        "(and 2 more problems)")
    assert _cause("apply failed", problems[:1]) == f"apply failed: {problems[0]}"
    assert _cause("rendering failed", ["a.yaml: x", "b.yaml: y"]).endswith("(and 1 more problem)")
    multi = _cause("rendering failed", ["kustomize build .: failed (exit 1):\n  Error: no\n  such file"])
    assert "\n" not in multi and multi.endswith("Error: no such file")
    assert len(_cause("x", ["y" * 5000])) < 500
