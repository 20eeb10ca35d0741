"""`gitopsd export APP --at TIME`: what ran at an instant, re-created from the audit trail and Git.

Each cluster test syncs real commits into the real control plane, records
them in the app's real audit trail as a CLI sync does, then runs the real
command line. Instants are taken from the records themselves (a midpoint
between two record times, or a record's own time), never from a clock
and a sleep.
"""

from __future__ import annotations

import base64
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import app_entry, assert_no_traceback, configmap, gitopsd, write_config

from gitopsd import audit, export
from gitopsd.engine import diff
from gitopsd.objects import ObjectRef

pytestmark = pytest.mark.cluster

PASSWORD = "export-pass-7f3c9a1e"       # stringData: must appear nowhere an export writes
TOKEN = "export-token-4b8d2e6f0a"       # data (base64): neither raw nor encoded anywhere


# ---------------------------------------------------------------- helpers

BLUE = {"web.yaml": configmap("web", {"colour": "blue"})}


class _Trail:
    """The test's app: commit, sync and record as `gitopsd sync` does (trigger cli); run `gitopsd export`."""

    def __init__(self, *, app, repo, kube, kubeconfig: Path, namespace: str, tmp_path: Path, cache: Path) -> None:
        self.app, self.repo, self.kube, self.kubeconfig = app, repo, kube, kubeconfig
        self.namespace, self.tmp_path, self.cache = namespace, tmp_path, cache
        self.log = audit.AuditLog(kube, namespace=namespace, instance=audit.cli_instance(), events=False)
        self.config = write_config(tmp_path / "apps.yaml", [app_entry(namespace, repo.url, namespace,
                                                                      selfHeal=False)])

    def deploy(self, message: str, files: dict[str, dict], *, remove: tuple[str, ...] = ()) -> tuple[str, dict]:
        """Commit `files` (path -> object), sync that commit and record it: (sha, record)."""
        for path, obj in files.items():
            self.repo.write(path, obj)
        for path in remove:
            self.repo.remove(path)
        sha = self.repo.commit(message)
        result = self.app.sync()
        assert result.outcome.value == "Applied", result.reason
        previous = audit.last_revision(self.kube, namespace=self.namespace, app=self.namespace)
        return sha, self.log.record(audit.transition_record(result, trigger="cli", previous=previous,
                                                            instance=self.log.instance))

    def export(self, at: str, out: str, *, config: Path | None = None,
               cache: Path | None = None) -> subprocess.CompletedProcess:
        """The real `gitopsd export` into tmp_path/out; never a traceback."""
        proc = gitopsd("export", self.namespace, "--at", at, "--config", str(config or self.config), "-o",
                       str(self.tmp_path / out), "--namespace", self.namespace, kubeconfig=self.kubeconfig,
                       cache=cache or self.cache)
        assert_no_traceback(proc.stderr, "`gitopsd export` stderr")
        return proc

    def data(self, out: str, name: str) -> dict:
        return yaml.safe_load((self.tmp_path / out / self.namespace / f"configmap-{name}.yaml").read_text())["data"]

    def summary(self, out: str) -> str:
        return (self.tmp_path / out / export.SUMMARY_FILE).read_text()

    def files(self, out: str) -> list[str]:
        return sorted(p.name for p in (self.tmp_path / out / self.namespace).iterdir())


@pytest.fixture
def trail(app, repo, kube, kubeconfig, namespace, tmp_path, source_cache) -> _Trail:
    return _Trail(app=app, repo=repo, kube=kube, kubeconfig=kubeconfig, namespace=namespace, tmp_path=tmp_path,
                  cache=source_cache)


def _time(rec: dict) -> datetime:
    return audit.parse_time(rec["time"])


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _between(first: dict, second: dict) -> str:
    return _iso(_time(first) + (_time(second) - _time(first)) / 2)


def _everything_under(directory: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(directory.rglob("*")) if p.is_file())


def _hand_edit(cluster, kubeconfig: Path, namespace: str, name: str, data: dict) -> None:
    kubectl = str(cluster.dir.parent.parent / "bin" / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace, "patch", "configmap", name,
                    "--type", "merge", "-p", yaml.safe_dump({"data": data})], check=True, capture_output=True)


# ---------------------------------------------------------------- the cluster tests


def test_export_between_two_commits_writes_the_first_commits_objects(trail, tmp_path):
    sha1, first = trail.deploy("web: blue\n\nticket OPS-1", {**BLUE, "old.yaml": configmap("old", {"gone": "soon"})})
    sha2, second = trail.deploy("web: green", {"web.yaml": configmap("web", {"colour": "green"}),
                                               "new.yaml": configmap("new", {"fresh": "yes"})}, remove=("old.yaml",))

    # A cache that never saw the first commit: it is fetched by its SHA although main has moved on.
    proc = trail.export(_between(first, second), "then", cache=tmp_path / "fresh-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert trail.files("then") == ["configmap-old.yaml", "configmap-web.yaml"]
    assert trail.data("then", "web") == {"colour": "blue"}
    summary = trail.summary("then")
    assert f"sha `{sha1}` (ref main then)" in summary and "author: Ada Author <ada@example.com>" in summary
    assert "    web: blue" in summary and "    ticket OPS-1" in summary
    assert f"audit seq {first['seq']}: Applied (trigger cli)" in summary and f"`{first['hash']}`" in summary
    assert "audit chain: intact" in summary and "## Drift open at that instant\n\nnone" in summary
    assert f"revision {sha1} (main)" in proc.stdout and "2 objects (0 Secrets without values" in proc.stdout

    proc = trail.export(second["time"], "now", cache=tmp_path / "another-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert trail.files("now") == ["configmap-new.yaml", "configmap-web.yaml"]
    assert trail.data("now", "web") == {"colour": "green"}
    assert f"sha `{sha2}`" in trail.summary("now")


def test_export_after_the_branch_moved_on_renders_the_live_commit_not_the_head(trail, repo, tmp_path):
    sha1, live = trail.deploy("web: blue", BLUE)
    repo.write("web.yaml", configmap("web", {"colour": "red"}))   # pushed, never synced: not what ran
    head = repo.commit("web: red")
    proc = trail.export(live["time"], "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert trail.data("out", "web") == {"colour": "blue"}
    assert sha1 in proc.stdout and head not in _everything_under(tmp_path / "out")


def test_export_before_the_first_transition_is_a_clear_error(trail, namespace, tmp_path):
    _, first = trail.deploy("web: blue", BLUE)
    before = _iso(_time(first) - timedelta(days=1))
    proc = trail.export(before, "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()
    assert f"error: app {namespace}: nothing was live at {before}" in proc.stderr
    assert f"the first is seq 1 at {first['time']}" in proc.stderr and "hint: `gitopsd history" in proc.stderr


def test_export_lists_the_drift_open_at_that_instant(trail, app, namespace, cluster, kubeconfig):
    sha1, _ = trail.deploy("web: blue", BLUE)
    # Self-heal off: a hand edit is reported (a dry-run finds it), not reverted.
    _hand_edit(cluster, kubeconfig, namespace, "web", {"colour": "pink"})
    (change,) = [c for c in app.sync(dry_run=True).plan.changes if c.action.value == "update"]
    drift = trail.log.record(audit.drift_record(
        app=namespace, ref=change.ref, fields=change.diff.fields, action="reported", revision=sha1,
        managers=diff.managers_of(change.live, change.diff.fields), instance=trail.log.instance))
    _, second = trail.deploy("web: green", {"web.yaml": configmap("web", {"colour": "green"})})   # closes it

    proc = trail.export(_between(drift, second), "open")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = trail.summary("open")
    assert f"- ConfigMap/{namespace}/web: data.colour (by kubectl-patch" in summary, summary
    assert f"reported at {drift['time']}, audit seq {drift['seq']}" in summary
    assert trail.data("open", "web") == {"colour": "blue"}, "the commit's objects, not the hand edit"
    assert "1 open drift" in proc.stdout

    proc = trail.export(second["time"], "closed")
    assert proc.returncode == 0 and "0 open drift" in proc.stdout, proc.stdout + proc.stderr
    assert "## Drift open at that instant\n\nnone" in trail.summary("closed")


def test_export_writes_secrets_as_references_never_values(trail, namespace, tmp_path):
    encoded = base64.b64encode(TOKEN.encode()).decode()
    _, live = trail.deploy("db credentials", {
        "db.yaml": {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "db", "labels": {"tier": "data"}},
                    "stringData": {"password": PASSWORD}, "data": {"token": encoded}},
        "dsn.yaml": configmap("dsn", {"url": f"postgres://app:{PASSWORD}@db:5432/shop"})})   # a copied password
    proc = trail.export(live["time"], "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    secret = yaml.safe_load((tmp_path / "out" / namespace / "secret-db.yaml").read_text())
    assert secret["data"] == {"password": "", "token": ""} and "stringData" not in secret
    assert secret["type"] == "Opaque" and secret["metadata"]["labels"] == {"tier": "data"}
    assert secret["metadata"]["annotations"][export.EXPORT_ANNOTATION] == (
        f"values not exported: set keys password, token of Secret {namespace}/db from where you keep its values")
    assert trail.data("out", "dsn") == {"url": "postgres://app:<redacted>@db:5432/shop"}
    summary = trail.summary("out")
    assert f"- Secret/{namespace}/db: keys password, token" in summary
    assert f"a Secret value also stood in ConfigMap/{namespace}/dsn: written as <redacted> there" in summary
    assert "2 objects (1 Secret without values: keys only)" in proc.stdout
    everything = _everything_under(tmp_path / "out") + proc.stdout + proc.stderr
    for value in (PASSWORD, TOKEN, encoded, base64.b64encode(PASSWORD.encode()).decode()):
        assert value not in everything


def test_export_of_a_broken_chain_still_writes_and_says_so(trail, kube, namespace):
    _, live = trail.deploy("web: blue", BLUE)
    # Someone rewrites who made the change in the stored record, leaving its hash alone.
    (segment,) = kube.list(kube.resource("v1", "ConfigMap"), namespace=namespace,
                           label_selector=f"{audit.AUDIT_APP_LABEL}={namespace}")
    forged = {**live, "commit": {**live["commit"], "author": "Mallory <m@example.com>"}}
    kube.request("PATCH", kube.resource("v1", "ConfigMap").path(namespace, segment["metadata"]["name"]),
                 body={"data": {f"{live['seq']:012d}": audit.canonical(forged).decode()}},
                 content_type="application/merge-patch+json")

    proc = trail.export(live["time"], "out")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert trail.data("out", "web") == {"colour": "blue"}, "a broken chain still exports"
    assert f"warning: the audit chain of app {namespace} is broken: seq 1 edited" in proc.stderr
    assert "records this export rests on no longer match their hashes: seq 1" in proc.stderr
    summary = trail.summary("out")
    assert "audit chain: **BROKEN**: seq 1 edited" in summary
    assert "author: Ada Author <ada@example.com>" in summary, "the commit's author comes from Git, not the record"


def test_export_says_when_todays_settings_do_not_render_what_ran(trail, repo, namespace, tmp_path):
    _, live = trail.deploy("web and a tool", {**BLUE, "tools/tool.yaml": configmap("tool", {"on": "yes"})})
    # The apps file now points the app at tools/ only: the render lacks web, which the transition wrote.
    moved = write_config(tmp_path / "moved.yaml", [app_entry(namespace, repo.url, namespace, path="tools")])
    proc = trail.export(live["time"], "out", config=moved)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert trail.files("out") == ["configmap-tool.yaml"]
    warning = (f"the transition that made this revision live (seq 1) wrote objects this render lacks: "
               f"ConfigMap/{namespace}/web; the app's path, render or namespace in the apps file may have changed")
    assert f"warning: {warning}" in proc.stderr and warning in trail.summary("out")


def test_export_of_a_commit_gone_from_the_repository_is_a_clear_error(trail, repo, namespace, tmp_path):
    sha1, live = trail.deploy("web: blue", BLUE)
    # History rewritten and the old commit collected: Git no longer has what ran.
    repo._git("checkout", "-q", "--orphan", "rewritten")
    repo.write("web.yaml", configmap("web", {"colour": "grey"}))
    repo._git("add", "-A")
    repo._git("commit", "-q", "-m", "rewritten")
    repo._git("push", "-q", "--force", "origin", "rewritten:main")
    repo._git("reflog", "expire", "--expire=now", "--all", cwd=repo.bare)
    repo._git("gc", "-q", "--prune=now", cwd=repo.bare)
    proc = trail.export(live["time"], "out", cache=tmp_path / "fresh-cache")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: app {namespace}: cannot re-create revision {sha1} (live at {live['time']}" in proc.stderr
    assert f"push it back from a clone that has it, e.g. as a tag (git push origin {sha1}:refs/tags/" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_directory_that_is_not_empty(trail, tmp_path):
    _, live = trail.deploy("web: blue", BLUE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = trail.export(live["time"], "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {out}: exists and is not an empty directory" in proc.stderr and "hint: name another" in proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == [], "no half-written sibling"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_export_names_an_app_the_config_does_not_have(trail, repo, namespace, tmp_path):
    config = write_config(tmp_path / "other.yaml", [app_entry("other", repo.url, namespace)])
    proc = trail.export("2h", "out", config=config)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{config}: names no app {namespace} (apps: other)" in proc.stderr and "hint:" in proc.stderr


def test_export_flags_are_checked_before_anything_runs(kubeconfig, tmp_path, source_cache):
    config = write_config(tmp_path / "apps.yaml", [app_entry("web", "file:///nowhere.git", "web")])
    bad_time = gitopsd("export", "web", "--at", "yesterday", "--config", str(config), kubeconfig=kubeconfig,
                       cache=source_cache)
    assert bad_time.returncode == 2 and "argument --at: 'yesterday' is not a time" in bad_time.stderr
    no_file = gitopsd("export", "web", "--at", "2h", "--config", str(tmp_path / "missing.yaml"),
                      kubeconfig=kubeconfig, cache=source_cache)
    assert no_file.returncode == 2 and "argument --config: " in no_file.stderr and "does not exist" in no_file.stderr
    no_time = gitopsd("export", "web", "--config", str(config), kubeconfig=kubeconfig, cache=source_cache)
    assert no_time.returncode == 2 and "the following arguments are required: --at" in no_time.stderr


# ---------------------------------------------------------------- pure logic


def test_file_names_put_cluster_scoped_objects_apart_and_tell_groups_apart():
    refs = [ObjectRef("apps", "Deployment", "shop", "web"), ObjectRef("", "Namespace", "", "shop"),
            ObjectRef("networking.k8s.io", "Ingress", "shop", "web"), ObjectRef("extensions", "Ingress", "shop", "web"),
            ObjectRef("rbac.authorization.k8s.io", "ClusterRole", "", "system:edit")]
    assert export.file_names(refs) == [
        "shop/deployment-web.yaml", "_cluster/namespace-shop.yaml", "shop/ingress.networking.k8s.io-web.yaml",
        "shop/ingress.extensions-web.yaml", "_cluster/clusterrole-system:edit.yaml"]


def test_a_secret_reference_drops_the_last_applied_annotation_that_holds_its_values():
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": "shop", "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": '{"stringData":{"pw":"abc"}}', "team": "data"}},
        "stringData": {"pw": "abc"}}
    written, ref = export.exportable(obj)
    assert ref == export.SecretReference(ref=ObjectRef("", "Secret", "shop", "db"), keys=("pw",))
    assert written["data"] == {"pw": ""} and "abc" not in yaml.safe_dump(written)
    assert set(written["metadata"]["annotations"]) == {"team", export.EXPORT_ANNOTATION}
    assert obj["stringData"] == {"pw": "abc"}, "the rendered object itself is left alone"
