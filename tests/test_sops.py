"""SOPS-encrypted manifests: decrypted at render time with the app's age keys, and nowhere else.

Real tools throughout: keys made by `age-keygen`, files encrypted by `sops`
as a team encrypts them (the plaintext piped in, never written), decrypted
by gitopsd running the real `sops`, built by the real `kustomize`, applied
to the real control plane by the real CLI and the real daemon.

After each applied case, the plaintext (and its base64 and URL forms) is
searched for everywhere it must not be: the commands' output (`gitopsd diff`
included), the daemon's log, Events, the audit ConfigMaps, the app's status,
and on disk the source cache, the temporary directory and /dev/shm (where
a kustomize build's private workspace lives while it runs).

The binaries come from `hack/cluster build` (sops, age, age-keygen are
built with the control plane): when one is missing these tests fail, never
skip.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import app_entry, wait_for, write_config
from test_secret_leaks import Bed, sentinel
from test_source import Upstream, cache, git_identity, upstream  # noqa: F401 (fixtures)
from testbed import build as tb_build

from gitopsd import config as cfg
from gitopsd.engine import decrypt, render
from gitopsd.errors import RenderError

KEYS_SECRET = "sops-age"


def tool(name: str) -> str:
    """A test-bed binary; fails the test (never skips) when it was not built."""
    try:
        return str(tb_build.binary(name))
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


class AgeKey:
    """An age identity made by age-keygen, in its file (the plaintext of a key, as a team has it)."""

    def __init__(self, directory: Path, name: str = "key") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.file = directory / f"{name}.txt"
        subprocess.run([tool("age-keygen"), "-o", str(self.file)], check=True, capture_output=True)
        self.recipient = subprocess.run([tool("age-keygen"), "-y", str(self.file)], check=True,
                                        capture_output=True, text=True).stdout.strip()


def encrypt(plaintext: str, *, key: AgeKey, fmt: str = "yaml") -> str:
    """`sops --encrypt` of `plaintext` (piped in: it never touches the disk) for `key`'s recipient.

    Manifests as the README says: only data and stringData encrypted."""
    regex = ["--encrypted-regex", "^(data|stringData)$"] if fmt == "yaml" else []
    with tempfile.TemporaryDirectory() as home:
        proc = subprocess.run([tool("sops"), "--encrypt", "--age", key.recipient, *regex, "--input-type", fmt,
                               "--output-type", fmt, "/dev/stdin"], input=plaintext, capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "HOME": home})
    assert proc.returncode == 0, proc.stderr
    assert "ENC[AES256_GCM" in proc.stdout
    return proc.stdout


def secret_yaml(name: str, **string_data: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                           "type": "Opaque", "stringData": string_data}, sort_keys=False)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def files_holding(value: str, *roots: Path) -> list[str]:
    """Files under `roots` that contain `value` (grep -r; Go's build scratch dirs left out)."""
    existing = [str(r) for r in roots if r.exists()]
    proc = subprocess.run(["grep", "-rlsF", "--exclude-dir=go-build*", "-e", value, *existing],
                          capture_output=True, text=True)
    return proc.stdout.split()


def assert_not_on_disk(bed: Bed, *values: str) -> None:
    roots = (bed.cache, Path(tempfile.gettempdir()), Path("/dev/shm"))
    # The test bed's clusters keep their etcd data there: where the apiserver stores the applied Secret, by
    # design (a CI run with GITOPSD_CACHE under /tmp puts it inside the roots searched).
    etcd_data = str(tb_build.cache_dir() / "clusters") + "/"
    for value in values:
        for form in {value, b64(value), b64(value).rstrip("=")}:
            found = [f for f in files_holding(form, *roots) if not f.startswith(etcd_data)]
            assert not found, f"plaintext {value!r} (as {form!r}) found on disk in: {found}"


def assert_nowhere(bed: Bed, *values: str) -> None:
    bed.assert_nowhere(*values)
    assert_not_on_disk(bed, *values)


@pytest.fixture
def bed(repo, kube, kubeconfig, source_cache, namespace, cluster) -> Bed:
    b = Bed(repo=repo, kube=kube, kubeconfig=kubeconfig, cache=source_cache, namespace=namespace, cluster=cluster)
    b.app = f"sops-{namespace[-5:]}"
    return b


@pytest.fixture
def key(tmp_path) -> AgeKey:
    return AgeKey(tmp_path / "keys")


def secret_data(bed: Bed, name: str) -> dict | None:
    obj = bed.get("Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} if obj else None


# ------------------------------------------------------------------ pure logic (no cluster)


def test_the_test_bed_builds_sops_and_age_at_their_pins():
    env = {"PATH": os.environ["PATH"], "SOPS_DISABLE_VERSION_CHECK": "1"}   # no look at the network
    sops = subprocess.run([tool("sops"), "--version"], capture_output=True, text=True, env=env, timeout=30)
    assert sops.stdout.split()[:2] == ["sops", tb_build.SOPS.lstrip("v")], sops.stdout + sops.stderr
    for name in ("age", "age-keygen"):
        out = subprocess.run([tool(name), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        assert out == tb_build.AGE, (name, out)
    assert render.find_tool("sops").name == "sops"



def test_decryption_config_names_a_secret_or_a_file_not_both(tmp_path):
    ok = cfg.parse("apps:\n- name: a\n  repo: https://example.com/r.git\n"
                   "  decryption: {provider: sops, keysFrom: {secretRef: {name: sops-age}}}\n")
    assert ok.apps[0].decryption.keys_from.secret_ref.name == "sops-age"
    for keys_from, problem in (("{}", "missing: name a Secret"),
                               (f"{{secretRef: {{name: x}}, file: {tmp_path}/k}}", "either secretRef or file"),
                               ("{secretRef: {name: x, namespace: other}}", "gitopsd's own namespace")):
        with pytest.raises(cfg.ConfigError) as info:
            cfg.parse(f"apps:\n- name: a\n  repo: https://example.com/r.git\n"
                      f"  decryption: {{provider: sops, keysFrom: {keys_from}}}\n")
        assert problem in str(info.value), str(info.value)
    with pytest.raises(cfg.ConfigError, match="decryption.provider"):
        cfg.parse("apps:\n- name: a\n  repo: https://example.com/r.git\n"
                  "  decryption: {provider: vault, keysFrom: {secretRef: {name: x}}}\n")


def test_keys_never_show_in_their_repr(key):
    keys = decrypt.Keys.parse([key.file.read_text()])
    (identity,) = keys.age
    assert identity.startswith("AGE-SECRET-KEY-1")
    assert identity not in repr(keys) and identity not in str(keys) and "1 age identity" in repr(keys)


def test_an_app_with_decryption_needs_its_keys_resolved():
    app = cfg.parse("apps:\n- name: a\n  repo: https://example.com/r.git\n"
                    "  decryption: {keysFrom: {secretRef: {name: sops-age}}}\n").apps[0]
    with pytest.raises(ValueError, match="resolve them and pass decryption_keys"):
        app.to_spec(inventory_namespace="gitopsd-system")


def test_ciphertext_in_a_rendered_object_is_found_wherever_it_is():
    assert decrypt.ciphertext_at({"kind": "Secret", "data": {"a": "ENC[AES256_GCM,data:abc,iv:x,tag:y,type:str]"}}) \
        == "data.a"
    assert decrypt.ciphertext_at({"spec": {"env": [{"value": "x"}, {"value": "ENC[AES256_GCM,data:q]"}]}}) \
        == "spec.env[1].value"
    assert decrypt.ciphertext_at({"data": {"a": "not ENC[AES256_GCM,data: at the start"}}) is None


def test_an_encrypted_plain_file_is_decrypted_in_memory(tmp_path, key):
    value = sentinel("plain-render")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "db.enc.yaml").write_text(encrypt(secret_yaml("db", password=value), key=key))
    keys = decrypt.Keys.parse([key.file.read_text()])

    (m,) = render.render(tmp_path / "repo", decryption=keys)
    assert m.obj["stringData"] == {"password": value} and "sops" not in m.obj
    assert m.source == "db.enc.yaml"


def test_an_encrypted_file_without_keys_fails_the_render_naming_it(tmp_path, key):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "db.enc.yaml").write_text(encrypt(secret_yaml("db", password=sentinel("x")), key=key))
    with pytest.raises(RenderError) as info:
        render.render(tmp_path / "repo")
    assert info.value.problems == ["db.enc.yaml: is encrypted with SOPS, and the app has no decryption keys"]
    assert "decryption: {provider: sops" in info.value.hint


def workspaces() -> set[Path]:
    return {p for d in (Path("/dev/shm"), Path(tempfile.gettempdir())) if d.is_dir()
            for p in d.glob("gitopsd-sops-*")}


def test_a_kustomize_build_that_fails_leaves_no_workspace_and_names_files_as_in_the_repo(tmp_path, key):
    value = sentinel("sops-ws")
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "db.enc.yaml").write_text(encrypt(secret_yaml("db", password=value), key=key))
    (repo / "app" / "kustomization.yaml").write_text("resources: [db.enc.yaml, missing.yaml]\n")
    keys = decrypt.Keys.parse([key.file.read_text()])
    before = workspaces()

    with pytest.raises(RenderError) as info:
        render.render(repo, "app", decryption=keys)
    (problem,) = info.value.problems
    assert problem.startswith("kustomize build app: failed") and "missing.yaml" in problem, problem
    assert "gitopsd-sops-" not in problem and value not in problem
    assert workspaces() == before, "the private copy with the plaintext is gone"
    (good,) = render.render(repo, "app/db.enc.yaml", decryption=keys)   # a plain file of it still decrypts
    assert good.obj["stringData"] == {"password": value}


def test_sops_gets_the_app_keys_and_nothing_of_the_daemons(tmp_path, key, monkeypatch):
    """The keys reach sops through its environment only; the daemon's own sops settings
    (a key file, a key command), cloud credentials and HOME (~/.config/sops, ~/.ssh) do not."""
    record = tmp_path / "env"
    fake = tmp_path / "sops"
    fake.write_text(f'#!/bin/sh\nenv > "{record}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("GITOPSD_SOPS", str(fake))
    for name in ("SOPS_AGE_KEY_FILE", "SOPS_AGE_KEY_CMD", "SOPS_AGE_SSH_PRIVATE_KEY_FILE", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, str(tmp_path / "daemon-owned"))
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "db.enc.yaml").write_text(encrypt(secret_yaml("db", password=sentinel("env")), key=key))
    keys = decrypt.Keys.parse([key.file.read_text()])

    assert render.render(tmp_path / "repo", decryption=keys) == []

    env = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert env["SOPS_AGE_KEY"] == keys.age[0]
    assert "daemon-owned" not in record.read_text()
    assert env["HOME"] != os.environ["HOME"] and not Path(env["HOME"]).exists(), "a private home, removed after"


def test_ciphertext_that_reaches_the_output_is_never_passed_on(tmp_path, key):
    """A document the renderer cannot recognise as encrypted (an ENC[...] value pasted from an
    encrypted file, its sops metadata left behind) still cannot bring ciphertext to the cluster."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
        "data:\n  a: ENC[AES256_GCM,data:abc,iv:x,tag:y,type:str]\n")
    with pytest.raises(RenderError) as info:
        render.render(tmp_path / "repo")
    assert info.value.problems[0].startswith("cm.yaml: ConfigMap/c holds SOPS ciphertext (ENC[...]) at data.a")


# ------------------------------------------------------------------ plain manifests (CLI)


@pytest.mark.cluster
def test_an_age_encrypted_secret_in_a_plain_directory_is_applied_with_its_plaintext(bed, key):
    value = sentinel("sops-plain")
    bed.repo.write("db.enc.yaml", encrypt(secret_yaml("db", password=value), key=key))
    bed.repo.write("app.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"},
                                "data": {"mode": "plain"}})
    bed.repo.commit("an encrypted Secret")
    keys = ("--sops-age-keys", str(key.file))

    diff = bed.cli("diff", *keys)
    assert diff.returncode == 1 and f"Secret/{bed.namespace}/db" in diff.stdout, diff.stdout + diff.stderr
    sync = bed.cli("sync", *keys)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert secret_data(bed, "db") == {"password": value}

    rotated = sentinel("sops-plain-rotated")
    bed.repo.write("db.enc.yaml", encrypt(secret_yaml("db", password=rotated), key=key))
    bed.repo.commit("rotate the password")
    diff = bed.cli("diff", *keys)
    assert diff.returncode == 1 and "data.password" in diff.stdout, diff.stdout + diff.stderr
    assert bed.cli("diff", *keys, "-o", "json").returncode == 1
    assert bed.cli("sync", *keys).returncode == 0
    assert secret_data(bed, "db") == {"password": rotated}
    assert_nowhere(bed, value, rotated)


# ------------------------------------------------------------------ failures (CLI)


def assert_failed_naming(bed: Bed, proc: subprocess.CompletedProcess, *needles: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} missing from:\n{text}"


def commit_encrypted_with_a_neighbour(bed: Bed, key: AgeKey, value: str, *, tamper: bool = False) -> None:
    text = encrypt(secret_yaml("db", password=value), key=key)
    if tamper:   # a readable field changed without sops: the MAC no longer matches
        text = text.replace("name: db", "name: db-renamed")
    bed.repo.write("secrets/db.enc.yaml", text)
    bed.repo.write("secrets/app.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"},
                                        "data": {"mode": "x"}})
    bed.repo.commit("an encrypted Secret and a ConfigMap")


@pytest.mark.cluster
def test_a_file_encrypted_for_another_key_fails_naming_the_file_and_nothing_is_applied(bed, key, tmp_path):
    value = sentinel("sops-wrong-key")
    commit_encrypted_with_a_neighbour(bed, key, value)
    wrong = AgeKey(tmp_path / "other", "wrong")

    for command in ("diff", "sync"):
        proc = bed.cli(command, "--sops-age-keys", str(wrong.file))
        assert_failed_naming(bed, proc, "secrets/db.enc.yaml: cannot be decrypted with sops: none of the app's "
                                        "age keys can open it (wrong key?)", "sops updatekeys")
    assert bed.get("Secret", "db") is None and bed.get("ConfigMap", "app") is None, "nothing was applied"
    assert bed.history()[0]["reason"].startswith("rendering failed: secrets/db.enc.yaml: cannot be decrypted")
    assert_nowhere(bed, value)
    bed.assert_nowhere(*decrypt.Keys.parse([wrong.file.read_text()]).age)   # nor the key (its file is on disk)


@pytest.mark.cluster
def test_a_tampered_encrypted_file_fails_on_its_mac_and_nothing_is_applied_or_pruned(bed, key):
    before = sentinel("sops-before")
    bed.repo.write("keep.enc.yaml", encrypt(secret_yaml("keep", password=before), key=key))
    bed.repo.commit("a Secret that syncs")
    assert bed.cli("sync", "--sops-age-keys", str(key.file)).returncode == 0
    value = sentinel("sops-tampered")
    bed.repo.remove("keep.enc.yaml")   # were this commit applied, `keep` would be pruned
    commit_encrypted_with_a_neighbour(bed, key, value, tamper=True)

    proc = bed.cli("sync", "--sops-age-keys", str(key.file))
    assert_failed_naming(bed, proc, "secrets/db.enc.yaml: cannot be decrypted with sops: its MAC does not match "
                                    "its content", "MAC mismatch")
    assert bed.get("Secret", "db") is None and bed.get("Secret", "db-renamed") is None
    assert bed.get("ConfigMap", "app") is None, "nothing applied"
    assert secret_data(bed, "keep") == {"password": before}, "nothing pruned"
    assert_nowhere(bed, before, value)


@pytest.mark.cluster
def test_an_encrypted_file_without_decryption_configured_fails_and_its_ciphertext_is_never_applied(bed, key):
    value = sentinel("sops-no-keys")
    commit_encrypted_with_a_neighbour(bed, key, value)

    proc = bed.cli("sync")
    assert_failed_naming(bed, proc, "secrets/db.enc.yaml: is encrypted with SOPS, and the app has no decryption keys",
                         "decryption: {provider: sops")
    assert bed.get("Secret", "db") is None and bed.get("ConfigMap", "app") is None


# ------------------------------------------------------------------ kustomize, through the daemon


def write_overlay(bed: Bed, key: AgeKey, *, password: str, env_value: str, token: str) -> None:
    """A base with a ConfigMap; an overlay adding an encrypted Secret resource and two secret
    generators with encrypted inputs (a dotenv env file, a binary file)."""
    bed.repo.write("base/kustomization.yaml", {"resources": ["settings.yaml"]})
    bed.repo.write("base/settings.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                                          "data": {"colour": "blue"}})
    bed.repo.write("overlay/kustomization.yaml", {
        "resources": ["../base", "db.enc.yaml"],
        "generatorOptions": {"disableNameSuffixHash": True},
        "secretGenerator": [{"name": "app-env", "envs": ["app.enc.env"]},
                            {"name": "app-token", "files": ["token=token.enc.bin"]}],
    })
    bed.repo.write("overlay/db.enc.yaml", encrypt(secret_yaml("db", password=password), key=key))
    bed.repo.write("overlay/app.enc.env", encrypt(f"USER=app\nAPI_KEY={env_value}\n", key=key, fmt="dotenv"))
    bed.repo.write("overlay/token.enc.bin", encrypt(token, key=key, fmt="binary"))


def keys_secret(bed: Bed, key: AgeKey, *, name: str = KEYS_SECRET) -> None:
    """The Secret holding the age key, made as the README says (kubectl create secret generic --from-file)."""
    kubectl = [tool("kubectl"), "--kubeconfig", str(bed.kubeconfig), "-n", bed.namespace]
    subprocess.run([*kubectl, "delete", "secret", name, "--ignore-not-found"], check=True, capture_output=True)
    subprocess.run([*kubectl, "create", "secret", "generic", name, f"--from-file=age.agekey={key.file}"],
                   check=True, capture_output=True)


@pytest.mark.cluster
def test_a_kustomize_overlay_with_encrypted_resources_and_generator_inputs_is_applied_decrypted(
        bed, key, tmp_path, start_daemon):
    password, env_value, token = sentinel("sops-k-db"), sentinel("sops-k-env"), sentinel("sops-k-token")
    write_overlay(bed, key, password=password, env_value=env_value, token=token)
    bed.repo.commit("an overlay with encrypted Secrets")
    keys_secret(bed, key)
    decryption = {"provider": "sops", "keysFrom": {"secretRef": {"name": KEYS_SECRET}}}
    config = write_config(tmp_path / "apps.yaml", [app_entry(bed.app, bed.repo.url, bed.namespace, path="overlay",
                                                             decryption=decryption)])
    bed.daemon = start_daemon(config, "--no-leader-elect")

    bed.daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied", "the sync", 90)
    assert secret_data(bed, "db") == {"password": password}
    assert secret_data(bed, "app-env") == {"USER": "app", "API_KEY": env_value}
    assert secret_data(bed, "app-token") == {"token": token}
    assert bed.get("ConfigMap", "settings")["data"] == {"colour": "blue"}

    diff = bed.cli("diff", "--path", "overlay", "--sops-age-keys", str(key.file))
    assert diff.returncode == 0, diff.stdout + diff.stderr   # the CLI decrypts to the same objects: in sync
    assert_nowhere(bed, password, env_value, token)


@pytest.mark.cluster
def test_the_daemon_reads_the_keys_secret_at_every_reconcile(bed, key, tmp_path, start_daemon):
    """Rotation: the Secret first holds a key that cannot open the file (the app fails, naming
    it); once the right key is put in the Secret, the next reconcile applies — no restart."""
    password = sentinel("sops-rotation")
    bed.repo.write("db.enc.yaml", encrypt(secret_yaml("db", password=password), key=key))
    bed.repo.commit("an encrypted Secret")
    keys_secret(bed, AgeKey(tmp_path / "old", "old"))
    decryption = {"provider": "sops", "keysFrom": {"secretRef": {"name": KEYS_SECRET}}}
    config = write_config(tmp_path / "apps.yaml", [app_entry(bed.app, bed.repo.url, bed.namespace,
                                                             decryption=decryption)])
    bed.daemon = start_daemon(config, "--no-leader-elect")

    failed = bed.daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Failed",
                                   "the failed sync", 60)
    assert failed["reason"].startswith("rendering failed: db.enc.yaml: cannot be decrypted with sops"), failed
    assert bed.get("Secret", "db") is None

    keys_secret(bed, key)
    bed.daemon.wait_event(lambda e: e.get("event") == "audit" and e.get("result") == "Applied",
                          "the sync with the new key", 120)
    wait_for("the decrypted Secret", lambda: secret_data(bed, "db") == {"password": password})
    assert_nowhere(bed, password)


def test_a_cached_build_that_decrypted_registers_its_values_again(upstream, cache, key):
    """A ConfigMap generated from an encrypted input holds plaintext; the redactor's registry is
    bounded, so a cache hit registers every value of a build that decrypted, whatever the kind."""
    from test_fetch_sharing import commit, fetch

    from gitopsd import redact
    from gitopsd.engine.render_cache import RenderCache

    value = sentinel("cached-generator")
    commit(upstream, {"app/kustomization.yaml": "configMapGenerator:\n  - name: settings\n    envs: [app.enc.env]\n",
                      "app/app.enc.env": encrypt(f"TOKEN={value}\n", key=key, fmt="dotenv")})
    checkout = fetch(upstream, cache)
    keys = decrypt.Keys.parse([key.file.read_text()])
    renders = RenderCache()
    first = renders.render(checkout, "app", kind="kustomize", decryption=keys)
    assert first.manifests[0].obj["data"] == {"TOKEN": value} and first.manifests[0].obj["kind"] == "ConfigMap"
    redact.forget_all()                  # as if the bounded registry had let it go
    assert redact.scrub(value) == value

    again = renders.render(checkout, "app", kind="kustomize", decryption=keys)

    assert again.manifests[0].obj["data"] == {"TOKEN": value}
    assert value not in redact.scrub(f"an error quoting {value}")
