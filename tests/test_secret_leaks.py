"""Hostile input: no Secret value in any output, whatever shape the Secret is in.

Each case plants a value used nowhere else (a sentinel), drives the real CLI
(`gitopsd diff`, `gitopsd sync`) or the real daemon against the real control
plane, checks the user got a clear error naming file, object and field (and
the cluster was left alone where it should be), and then searches every
place a value could leak to: the commands' stdout and stderr, the daemon's
log, every Event in the namespace, the audit trail's ConfigMaps, the app's
parent ConfigMap (its status), `gitopsd history -o json` and text, and
`gitopsd status` — for the value itself and its base64 and URL forms.

The last tests prove that a failure's reason carries its first problem
(issue 9 item 12) in history, Events and status.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import pytest
from helpers import app_entry, deployment, gitopsd, wait_for, write_config

from gitopsd import audit

pytestmark = pytest.mark.cluster


def sentinel(tag: str) -> str:
    """A value no other test, log line or object will ever contain by chance."""
    return f"s3nt1nel-{tag}-{uuid.uuid4().hex[:20]}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str = "db", **body) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", **body}


def forms(value: str) -> list[str]:
    """How a value could show up: as is, base64 (any padding, either alphabet), URL-encoded."""
    raw = value.encode()
    out = {value, base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("="),
           urllib.parse.quote(value, safe="")}
    return sorted(out)


class Bed:
    """One test's app: runs the CLI against it and searches every output for leaks."""

    def __init__(self, *, repo, kube, kubeconfig, cache: Path, namespace: str, cluster) -> None:
        self.repo, self.kube, self.kubeconfig, self.cache = repo, kube, kubeconfig, cache
        self.namespace = namespace
        # The app (= ApplySet) name, short enough for the config file's limit; its
        # audit trail and status live in the test's namespace.
        self.app = f"leaks-{namespace[-5:]}"
        self.kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
        self.outputs: dict[str, str] = {}
        self.daemon = None

    # -------------------------------------------------------------- driving

    def cli(self, command: str, *extra: str) -> subprocess.CompletedProcess:
        args = ("--repo", self.repo.url, "--ref", "main", "--namespace", self.namespace, "--app", self.app,
                "--inventory-namespace", self.namespace)
        proc = gitopsd(command, *args, *extra, kubeconfig=self.kubeconfig, cache=self.cache)
        self._keep(f"`gitopsd {command} {' '.join(extra)}`", proc)
        return proc

    def tool(self, *args: str) -> subprocess.CompletedProcess:
        proc = gitopsd(*args, kubeconfig=self.kubeconfig, cache=self.cache)
        self._keep(f"`gitopsd {' '.join(args)}`", proc)
        return proc

    def _keep(self, name: str, proc: subprocess.CompletedProcess) -> None:
        n = sum(1 for k in self.outputs if k.startswith(name))
        self.outputs[f"{name} #{n}"] = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    def history(self) -> list[dict]:
        proc = self.tool("history", self.app, "-n", self.namespace, "-o", "json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def status(self) -> dict | None:
        proc = self.tool("status", self.app, "--namespace", self.namespace, "-o", "json")
        return json.loads(proc.stdout)[0] if proc.returncode == 0 else None

    def get(self, kind: str, name: str, api_version: str = "v1") -> dict | None:
        return self.kube.get(self.kube.resource(api_version, kind), name, self.namespace)

    def events(self) -> list[dict]:
        return self.kube.list(self.kube.resource("events.k8s.io/v1", "Event"), namespace=self.namespace)

    # -------------------------------------------------------------- the search

    def haystacks(self) -> dict[str, str]:
        """Every place a value could have gone, read fresh from the cluster and the CLI."""
        self.tool("history", self.app, "-n", self.namespace, "-o", "json")
        self.tool("history", self.app, "-n", self.namespace)
        self.tool("status", "--namespace", self.namespace)
        self.tool("status", "--namespace", self.namespace, "-o", "json")
        cms = self.kube.resource("v1", "ConfigMap")
        found = dict(self.outputs)
        found["Events in the namespace"] = json.dumps(self.events())
        found["Events on cluster-scoped objects"] = json.dumps(self.kube.list(
            self.kube.resource("events.k8s.io/v1", "Event"), namespace="default",
            label_selector=f"{audit.AUDIT_APP_LABEL}={self.app}"))
        found["audit ConfigMaps"] = json.dumps(self.kube.list(
            cms, namespace=self.namespace, label_selector=f"{audit.AUDIT_APP_LABEL}={self.app}"))
        found["parent ConfigMap (status)"] = json.dumps(self.kube.get(cms, f"gitopsd-{self.app}", self.namespace))
        if self.daemon is not None:
            found["daemon log"] = self.daemon.log_path.read_text()
        return found

    def assert_nowhere(self, *values: str) -> None:
        haystacks = self.haystacks()
        assert any("audit ConfigMaps" in k for k in haystacks)
        for value in values:
            for form in forms(value):
                for where, text in haystacks.items():
                    assert form not in text, f"secret value {value!r} leaked (as {form!r}) into {where}:\n{text[:3000]}"


@pytest.fixture
def bed(repo, kube, kubeconfig, source_cache, namespace, cluster) -> Bed:
    return Bed(repo=repo, kube=kube, kubeconfig=kubeconfig, cache=source_cache, namespace=namespace,
               cluster=cluster)


def assert_refused(bed: Bed, proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and a message naming what is wrong."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} missing from:\n{text}"


def last_record(bed: Bed) -> dict:
    return bed.history()[0]


# ------------------------------------------------------------------ malformed Secret bodies (CLI)

def test_stringdata_written_as_a_list_is_refused_naming_the_field(bed):
    value = sentinel("strlist")
    bed.repo.write("secret.yaml", secret(stringData=[f"password={value}"]))
    bed.repo.commit("stringData as a list")

    where = ("secret.yaml: Secret/", "db: stringData must be a mapping")
    assert_refused(bed, bed.cli("diff"), *where, "not a list")
    assert_refused(bed, bed.cli("diff", "-o", "json"), "stringData must be a mapping")
    assert_refused(bed, bed.cli("sync"), *where)
    assert bed.get("Secret", "db") is None, "nothing was applied"
    rec = last_record(bed)
    assert rec["result"] == "Failed" and rec["reason"].startswith(f"rendering failed: {where[0]}")
    assert where[1] in rec["reason"]
    bed.assert_nowhere(value)


def test_data_written_as_a_list_is_refused_naming_the_field(bed):
    value = sentinel("datalist")
    bed.repo.write("secret.yaml", secret(data=[b64(value), value]))
    bed.repo.commit("data as a list")

    assert_refused(bed, bed.cli("diff"), "secret.yaml: Secret/", "db: data must be a mapping", "not a list")
    assert_refused(bed, bed.cli("sync", "-o", "json"), "data must be a mapping")
    assert bed.get("Secret", "db") is None
    bed.assert_nowhere(value)


def test_a_secret_body_written_as_text_is_refused_with_every_other_bad_secret(bed):
    text_value, list_value = sentinel("scalar"), sentinel("list")
    bed.repo.write("a.yaml", secret("a", stringData=f"user=admin\npassword={text_value}\n"))
    bed.repo.write("b.yaml", secret("b", data=[b64(list_value)]))
    bed.repo.commit("a text block, and data as a list")

    proc = bed.cli("sync")
    assert_refused(bed, proc, "a.yaml: Secret/", "a: stringData must be a mapping", "b.yaml: Secret/",
                   "b: data must be a mapping")
    assert bed.get("Secret", "a") is None and bed.get("Secret", "b") is None
    assert last_record(bed)["reason"].endswith("(and 1 more problem)")
    bed.assert_nowhere(text_value, list_value)


def test_a_nested_mapping_under_data_is_refused_naming_the_key(bed):
    value = sentinel("nested")
    bed.repo.write("secret.yaml", secret(data={"db": {"password": b64(value)}}))
    bed.repo.commit("a nested mapping")

    assert_refused(bed, bed.cli("diff"), "secret.yaml: Secret/", "db")
    assert_refused(bed, bed.cli("sync"), "db")
    assert bed.get("Secret", "db") is None
    bed.assert_nowhere(value)


def test_a_data_value_that_is_not_base64_is_refused_naming_the_key(bed):
    value = sentinel("notb64")
    bed.repo.write("secret.yaml", secret(data={"password": value}))
    bed.repo.commit("plain text under data")

    hint = "put plain text under stringData"
    assert_refused(bed, bed.cli("diff"), "secret.yaml: Secret/db: data.password is not valid base64", hint)
    assert_refused(bed, bed.cli("sync"), "data.password is not valid base64")
    assert bed.get("Secret", "db") is None
    bed.assert_nowhere(value)


def test_a_stringdata_number_is_refused_naming_the_key_not_the_number(bed):
    number = int("9" + uuid.uuid4().int.__str__()[:17])
    (bed.repo.work / "secret.yaml").write_text(
        f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  pin: {number}\n")
    bed.repo.commit("an unquoted number")

    assert_refused(bed, bed.cli("diff"), "Secret/db", "pin", "quote")
    assert_refused(bed, bed.cli("sync"), "pin")
    assert bed.get("Secret", "db") is None
    bed.assert_nowhere(str(number))


# ------------------------------------------------------------------ the apiserver refuses a Secret

def test_a_value_pasted_into_a_key_leaks_nowhere(bed):
    """An env-file line pasted under stringData makes the value part of a key, and the apiserver's
    validation quotes an invalid key back ("Invalid value: <key>"). Whoever refuses it first, the
    renderer or the apiserver's dry-run, the value must not come back out."""
    value = sentinel("in-a-key")
    (bed.repo.work / "secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  username: admin\n"
        f"  password={value}: \"\"\n")
    bed.repo.commit("a value where a key goes")

    for proc in (bed.cli("diff"), bed.cli("sync")):
        assert_refused(bed, proc, "secret.yaml: Secret/", "db")
    assert bed.get("Secret", "db") is None
    bed.assert_nowhere(value)


def test_a_secret_that_fails_the_dry_run_leaks_nothing(bed):
    cert = sentinel("tlscert")
    bed.repo.write("secret.yaml", secret("tls", type="kubernetes.io/tls", data={"tls.crt": b64(cert)}))
    bed.repo.commit("a TLS Secret without its key")

    assert_refused(bed, bed.cli("diff"), f"secret.yaml: Secret/{bed.namespace}/tls", "tls.key")
    assert_refused(bed, bed.cli("sync"), "tls.key")
    assert bed.get("Secret", "tls") is None
    rec = last_record(bed)
    assert rec["reason"].startswith(f"invalid object: secret.yaml: Secret/{bed.namespace}/tls")
    bed.assert_nowhere(cert)


def test_changing_an_immutable_secret_is_refused_and_leaks_neither_value(bed):
    old, new = sentinel("immutable-old"), sentinel("immutable-new")
    bed.repo.write("secret.yaml", secret(immutable=True, data={"password": b64(old)}))
    bed.repo.commit("immutable Secret")
    assert bed.cli("sync").returncode == 0
    bed.repo.write("secret.yaml", secret(immutable=True, data={"password": b64(new)}))
    bed.repo.commit("rotate an immutable Secret")

    assert_refused(bed, bed.cli("diff"), f"Secret/{bed.namespace}/db", "immutable", "--recreate")
    assert_refused(bed, bed.cli("sync"), "immutable")
    assert bed.get("Secret", "db")["data"]["password"] == b64(old), "the live Secret is untouched"
    bed.assert_nowhere(old, new)


# ------------------------------------------------------------------ valid Secrets, unhappy syncs

def test_a_diff_of_a_changed_secret_names_keys_only(bed):
    old, new = sentinel("diff-old"), sentinel("diff-new")
    token_old, token_new = sentinel("token-old"), sentinel("token-new")
    bed.repo.write("secret.yaml", secret(data={"password": b64(old)}, stringData={"token": token_old}))
    bed.repo.commit("db secret")
    assert bed.cli("sync").returncode == 0
    bed.repo.write("secret.yaml", secret(data={"password": b64(new)}, stringData={"token": token_new}))
    bed.repo.commit("rotate")

    text = bed.cli("diff")
    assert text.returncode == 1 and "data.password" in text.stdout and "<redacted: changed>" in text.stdout
    as_json = bed.cli("diff", "-o", "json")
    assert as_json.returncode == 1
    (change,) = json.loads(as_json.stdout)["changes"]
    assert "data.password" in change["fields"]
    assert bed.cli("sync", "-o", "json").returncode == 0
    bed.assert_nowhere(old, new, token_old, token_new)


def test_a_sync_whose_health_fails_leaks_no_value_of_the_secrets_it_uses(bed):
    value = sentinel("unhealthy")
    stuck = deployment("web")
    container = stuck["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
    stuck["spec"]["template"]["spec"]["nodeSelector"] = {"gitopsd.io/no-such-node": "true"}
    bed.repo.write("app.yaml", [secret(stringData={"password": value}), stuck])
    bed.repo.commit("a rollout that never finishes")

    proc = bed.cli("sync", "--timeout", "3")
    assert proc.returncode == 1 and "Unhealthy" in proc.stdout, proc.stdout + proc.stderr
    assert last_record(bed)["result"] == "Unhealthy"
    bed.assert_nowhere(value)


def test_a_secret_generator_literal_typo_leaks_nothing(bed):
    """`password:VALUE` instead of `password=VALUE`: kustomize's error quotes the literal."""
    value = sentinel("generator")
    (bed.repo.work / "kustomization.yaml").write_text(
        "secretGenerator:\n  - name: db\n    literals:\n      - user=admin\n"
        f"      - password:{value}\n")
    bed.repo.commit("a typo in a secret generator")

    assert_refused(bed, bed.cli("diff"), "kustomize build")
    assert_refused(bed, bed.cli("sync"), "kustomize build")
    assert last_record(bed)["result"] == "Failed"
    bed.assert_nowhere(value)


def test_a_helm_chart_secret_with_a_bad_value_leaks_nothing(bed):
    value = sentinel("helm")
    chart = bed.repo.work / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: leaky\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text(f"password: {value}\n")
    # The classic slip: a plain value under `data` (b64enc forgotten).
    (chart / "templates" / "secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-db\n"
        "data:\n  password: {{ .Values.password | quote }}\n")
    bed.repo.commit("chart")

    proc = bed.cli("sync", "--path", "chart")
    assert_refused(bed, proc, "chart/templates/secret.yaml", "data.password is not valid base64")
    bed.assert_nowhere(value)


# ------------------------------------------------------------------ the daemon

@pytest.fixture
def daemon_bed(bed, tmp_path, start_daemon):
    def start(**entry):
        config = write_config(tmp_path / "apps.yaml", [app_entry(bed.app, bed.repo.url, bed.namespace, **entry)])
        bed.daemon = start_daemon(config, "--no-leader-elect")
        return bed.daemon
    return start


def _audit(daemon, predicate, what: str, timeout: float = 60.0) -> dict:
    return daemon.wait_event(lambda e: e.get("event") == "audit" and predicate(e), what, timeout)


def test_the_daemon_reports_a_malformed_secret_without_its_value(bed, daemon_bed):
    value = sentinel("daemon-strlist")
    bed.repo.write("secret.yaml", secret(stringData=[f"password={value}"]))
    bed.repo.commit("stringData as a list")
    daemon = daemon_bed()

    rec = _audit(daemon, lambda e: e.get("result") == "Failed", "the failed sync's record")
    assert rec["reason"].startswith("rendering failed: secret.yaml: Secret/")
    assert "db: stringData must be a mapping" in rec["reason"]
    assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")], \
        "bad input is no internal error"
    assert "Traceback" not in daemon.log_path.read_text()
    wait_for("the status", lambda: (bed.status() or {}).get("result") == "Failed")
    bed.assert_nowhere(value)


def test_a_drift_report_on_a_secret_edited_by_hand_leaks_neither_value(bed, daemon_bed):
    applied, edited = sentinel("drift-applied"), sentinel("drift-edited")
    bed.repo.write("secret.yaml", secret(data={"password": b64(applied)}))
    bed.repo.commit("db secret")
    daemon = daemon_bed()
    _audit(daemon, lambda e: e.get("result") == "Applied", "the first sync")

    patch = json.dumps({"data": {"password": b64(edited)}, "stringData": {"extra": edited}})
    subprocess.run([bed.kubectl, "--kubeconfig", str(bed.kubeconfig), "-n", bed.namespace, "patch", "secret",
                    "db", "--type", "merge", "-p", patch], check=True, capture_output=True)

    drift = daemon.wait_event(lambda e: e.get("event") == "drift corrected", "the drift report", 30)
    assert drift["object"] == f"Secret/{bed.namespace}/db" and "data.password" in drift["fields"]
    wait_for("the value put back", lambda: bed.get("Secret", "db")["data"]["password"] == b64(applied))
    wait_for("the drift in status", lambda: ((bed.status() or {}).get("lastDrift") or {}).get("object"))
    bed.assert_nowhere(applied, edited)


# ------------------------------------------------------------------ item 12: errors keep their cause

def test_history_status_and_events_carry_the_first_render_problem(bed, daemon_bed):
    bed.repo.write("apps/ok.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ok"}})
    bed.repo.commit("fine")
    daemon = daemon_bed()
    _audit(daemon, lambda e: e.get("result") == "Applied", "the first sync")

    (bed.repo.work / "apps" / "x.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n: no key here\n")
    (bed.repo.work / "apps" / "y.yaml").write_text("kind: ConfigMap\nmetadata: {name: y}\n")
    (bed.repo.work / "apps" / "z.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    bed.repo.commit("three broken files")
    _audit(daemon, lambda e: e.get("result") == "Failed", "the failed sync")

    rec = last_record(bed)
    reason = rec["reason"]
    assert reason.startswith("rendering failed: apps/x.yaml: invalid YAML at line 3"), reason
    assert reason.endswith("(and 2 more problems)"), reason
    text = bed.tool("history", bed.app, "-n", bed.namespace, "--limit", "1").stdout
    assert "rendering failed: apps/x.yaml: invalid YAML" in text, text
    notes = [e["note"] for e in bed.events() if e["reason"] == "Failed"
             and e["regarding"]["name"] == f"gitopsd-{bed.app}"]
    assert notes and notes[0].startswith("Failed: rendering failed: apps/x.yaml: invalid YAML at line 3"), notes
    status = wait_for("the status", lambda: (s := bed.status()) and s.get("result") == "Failed" and s)
    assert status["reason"] == reason
    table = bed.tool("status", bed.app, "--namespace", bed.namespace).stdout
    assert "rendering failed: apps/x.yaml" in table, table


def test_an_invalid_object_and_a_failed_apply_name_the_object_in_history(bed):
    bed.repo.write("bad.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bad"},
                                "data": {"bad key!": "x"}})
    bed.repo.write("also-bad.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "also-bad"},
                                     "data": {"also bad!": "x"}})
    bed.repo.commit("two invalid objects")
    proc = bed.cli("sync")
    assert proc.returncode == 2
    reason = last_record(bed)["reason"]
    assert reason.startswith(f"invalid object: also-bad.yaml: ConfigMap/{bed.namespace}/also-bad: Invalid"), reason
    assert reason.endswith("(and 1 more problem); nothing was applied"), reason
