"""Commit signature verification (`verify:`): real git, real ssh-keygen, real gpg, real control plane.

Keys are made in the test (`ssh-keygen -t ed25519 -N ''`, `gpg --quick-gen-key` in a throw-away
GNUPGHOME) and commits signed the way a team signs them (`git -c gpg.format=ssh -c
user.signingkey=KEY.pub commit -S`). The first tests judge commits alone (no cluster); the rest
deploy them: through the engine as the CLI and the daemon call it, and through a running daemon
whose key Secret changes under it.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import (
    GIT_ENV,
    GitRepo,
    app_entry,
    assert_serving,
    audit_verify,
    cm_data,
    configmap,
    gitopsd,
    wait_for,
    wait_transition,
    write_config,
)

from gitopsd import audit
from gitopsd.config import TrustedKeysFrom, Verify
from gitopsd.daemon.credentials import CredentialStore
from gitopsd.engine import signature, source
from gitopsd.engine.signature import BAD, GOOD, UNKNOWN_KEY, UNSIGNED, KeysError, TrustedKeys
from gitopsd.engine.sync import Outcome, sync
from gitopsd.errors import GitopsdError

# ---------------------------------------------------------------- signers


class SshSigner:
    """An ed25519 key pair made for the test; signs commits as `git commit -S` with gpg.format ssh."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.name, self.key = name, directory / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@example.com",
                        "-f", str(self.key)], check=True, capture_output=True)
        self.pub = Path(f"{self.key}.pub")
        self.public = self.pub.read_text()
        self.fingerprint = subprocess.run(["ssh-keygen", "-lf", str(self.pub)], check=True, capture_output=True,
                                          text=True).stdout.split()[1]
        self.principal = f"{name}@example.com"
        self.git_config = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.pub}"]
        self.env: dict[str, str] = {}


class GpgSigner:
    """An OpenPGP ed25519 key in a GNUPGHOME of its own (short path: the agent's socket lives there)."""

    def __init__(self, name: str) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="gsig-"))
        self.env = {"GNUPGHOME": str(self.home)}
        self.uid = f"{name.title()} <{name}@example.com>"
        self._gpg("--passphrase", "", "--quick-gen-key", self.uid, "ed25519", "sign", "1d")
        colons = self._gpg("--list-keys", "--with-colons", f"{name}@example.com")
        self.fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
        self.public = self._gpg("--armor", "--export", self.fingerprint)
        self.git_config = ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={self.fingerprint}"]

    def _gpg(self, *args: str) -> str:
        return subprocess.run(["gpg", "--batch", *args], check=True, capture_output=True, text=True,
                              env={**os.environ, **self.env}).stdout

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def ssh_keys(tmp_path):
    made: dict[str, SshSigner] = {}

    def key(name: str) -> SshSigner:
        if name not in made:
            made[name] = SshSigner(tmp_path / "ssh-keys", name)
        return made[name]

    return key


@pytest.fixture
def gpg_keys():
    made: dict[str, GpgSigner] = {}

    def key(name: str) -> GpgSigner:
        if name not in made:
            made[name] = GpgSigner(name)
        return made[name]

    yield key
    for signer in made.values():
        signer.close()


def commit(repo: GitRepo, message: str, signer=None, *, push: bool = True) -> str:
    """Commit the work tree, signed by `signer` (None: unsigned), and push it."""
    env = {**os.environ, **GIT_ENV, **(signer.env if signer else {})}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo.work, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("add", "-A")
    git(*(signer.git_config if signer else []), "commit", "-q", "--allow-empty", *(["-S"] if signer else []),
        "-m", message)
    if push:
        git("push", "-q", "-f", "origin", "main")
    return git("rev-parse", "HEAD")


def tamper(repo: GitRepo, sha: str, old: bytes, new: bytes) -> str:
    """The commit `sha` with `old` replaced by `new` in its message, its signature kept: what an attacker
    who rewrites a signed commit makes. Becomes main (force-pushed); returns its sha."""
    env = {**os.environ, **GIT_ENV}
    raw = subprocess.run(["git", "cat-file", "commit", sha], cwd=repo.work, env=env, check=True,
                         capture_output=True).stdout
    assert old in raw
    forged = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], input=raw.replace(old, new),
                            cwd=repo.work, env=env, check=True, capture_output=True).stdout.decode().strip()
    subprocess.run(["git", "reset", "-q", "--hard", forged], cwd=repo.work, env=env, check=True)
    subprocess.run(["git", "push", "-q", "-f", "origin", "main"], cwd=repo.work, env=env, check=True)
    return forged


def ssh_set(*signers: SshSigner) -> TrustedKeys:
    return TrustedKeys(provider="ssh", entries=tuple((f"{s.name}.pub", s.public) for s in signers),
                       origin="Secret test/team-keys")


def gpg_set(*signers: GpgSigner) -> TrustedKeys:
    return TrustedKeys(provider="openpgp", entries=tuple((f"{s.fingerprint}.asc", s.public) for s in signers),
                       origin="Secret test/team-keys")


def judge(repo: GitRepo, tmp_path: Path, keys: TrustedKeys) -> signature.Signature:
    """The verdict on the remote's main, fetched as the daemon fetches it."""
    checkout = source.fetch(repo.url, "main", cache_dir=tmp_path / "judge-cache")
    try:
        return signature.signed(checkout, keys=keys).signature
    except signature.SignatureError as exc:
        assert exc.revision.sha == checkout.revision.sha
        assert exc.message == exc.revision.signature.refusal()
        return exc.revision.signature


# ---------------------------------------------------------------- verdicts (no cluster)


def test_commit_signed_by_a_trusted_ssh_key_is_good_naming_its_fingerprint_and_principal(repo, tmp_path, ssh_keys):
    alice = ssh_keys("alice")
    sha = commit(repo, "signed by alice", alice)

    verdict = judge(repo, tmp_path, ssh_set(alice, ssh_keys("bob")))
    assert (verdict.verdict, verdict.key, verdict.signer, verdict.commit) == \
        (GOOD, alice.fingerprint, alice.principal, sha)
    assert verdict.key.startswith("SHA256:")
    assert verdict.record() == {"provider": "ssh", "verdict": "good", "key": alice.fingerprint,
                                "signer": "alice@example.com", "commit": sha}


def test_unsigned_commit_is_refused_as_unsigned(repo, tmp_path, ssh_keys):
    sha = commit(repo, "nobody signed this")

    verdict = judge(repo, tmp_path, ssh_set(ssh_keys("alice")))
    assert (verdict.verdict, verdict.key) == (UNSIGNED, None)
    assert verdict.refusal() == f"commit {sha[:12]} refused: the commit is unsigned; nothing was rendered or applied"


def test_commit_signed_by_an_unknown_ssh_key_is_refused_naming_its_fingerprint(repo, tmp_path, ssh_keys):
    mallory = ssh_keys("mallory")
    commit(repo, "signed by someone else", mallory)

    verdict = judge(repo, tmp_path, ssh_set(ssh_keys("alice")))
    assert (verdict.verdict, verdict.key) == (UNKNOWN_KEY, mallory.fingerprint)
    assert f"signed by unknown key {mallory.fingerprint} (not in Secret test/team-keys)" in verdict.refusal()


def test_tampered_commit_is_refused_as_a_bad_signature(repo, tmp_path, ssh_keys):
    alice = ssh_keys("alice")
    signed = commit(repo, "deploy v1", alice, push=False)
    forged = tamper(repo, signed, b"deploy v1", b"deploy v6")

    verdict = judge(repo, tmp_path, ssh_set(alice))
    assert (verdict.verdict, verdict.commit) == (BAD, forged)
    assert "bad signature: the commit does not match its signature" in verdict.refusal()


def test_commit_signed_by_a_trusted_openpgp_key_is_good_with_its_full_fingerprint(repo, tmp_path, gpg_keys):
    olga = gpg_keys("olga")
    sha = commit(repo, "signed with OpenPGP", olga)

    verdict = judge(repo, tmp_path, gpg_set(olga))
    assert (verdict.verdict, verdict.provider, verdict.key, verdict.signer, verdict.commit) == \
        (GOOD, "openpgp", olga.fingerprint, olga.uid, sha)
    assert len(verdict.key) == 40


def test_commit_signed_by_an_unknown_openpgp_key_is_refused_naming_its_fingerprint(repo, tmp_path, gpg_keys):
    olga, oscar = gpg_keys("olga"), gpg_keys("oscar")
    commit(repo, "signed by a key not in the set", oscar)

    verdict = judge(repo, tmp_path, gpg_set(olga))
    assert (verdict.verdict, verdict.key) == (UNKNOWN_KEY, oscar.fingerprint)
    assert f"signed by unknown key {oscar.fingerprint}" in verdict.refusal()


def test_openpgp_signature_is_refused_when_the_app_trusts_ssh_keys(repo, tmp_path, gpg_keys, ssh_keys):
    commit(repo, "signed with OpenPGP", gpg_keys("olga"))

    verdict = judge(repo, tmp_path, ssh_set(ssh_keys("alice")))
    assert verdict.verdict == UNKNOWN_KEY
    assert "signed with an OpenPGP signature, and the app trusts SSH keys only" in verdict.refusal()


def test_allowed_signers_and_authorized_keys_lines_are_both_trusted(repo, tmp_path, ssh_keys):
    alice, bob = ssh_keys("alice"), ssh_keys("bob")
    keys = TrustedKeys(provider="ssh", origin="file /keys", entries=(
        ("alice.pub", alice.public),                                       # ssh-ed25519 AAAA... alice@example.com
        ("allowed_signers", "# the release team\n\n" + "bob-release " + " ".join(bob.public.split()[:2]) + "\n"),
    ))
    assert keys.allowed_signers.splitlines() == [
        f"alice@example.com {' '.join(alice.public.split()[:2])}", f"bob-release {' '.join(bob.public.split()[:2])}"]

    commit(repo, "by bob", bob)
    assert (judge(repo, tmp_path, keys).signer, judge(repo, tmp_path, keys).key) == ("bob-release", bob.fingerprint)
    commit(repo, "by alice", alice)
    assert judge(repo, tmp_path, keys).signer == "alice@example.com"


def test_a_key_set_that_could_verify_nothing_is_an_error_naming_the_entry(ssh_keys, gpg_keys):
    alice = ssh_keys("alice")
    private = alice.key.read_text()
    cases = [
        (("ssh", ()), "Secret test/keys holds no public keys"),
        (("ssh", (("alice", private),)), "Secret test/keys: alice holds a private key; only public keys belong there"),
        (("ssh", (("alice.pub", alice.public), ("notes", "hello\n"))), "Secret test/keys: notes line 1 is no ssh "
                                                                       "public key"),
        (("ssh", (("empty", "# nothing yet\n"),)), "Secret test/keys: empty holds no ssh public key"),
        (("openpgp", (("olga.asc", alice.public),)), "Secret test/keys: olga.asc holds no ASCII-armored OpenPGP "
                                                     "public key"),
    ]
    for (provider, entries), message in cases:
        with pytest.raises(KeysError) as info:
            TrustedKeys(provider=provider, entries=entries, origin="Secret test/keys")
        assert info.value.message == message
        assert "PRIVATE" not in str(info.value) and private.split("\n")[1] not in str(info.value)


def test_verdicts_are_cached_per_commit_and_key_set(repo, tmp_path, ssh_keys, monkeypatch):
    alice, bob = ssh_keys("alice"), ssh_keys("bob")
    commit(repo, "signed by alice", alice)
    assert judge(repo, tmp_path, ssh_set(alice)).verdict == GOOD

    # Without ssh-keygen on PATH the same commit and key set are still judged (from the cache) ...
    empty = tmp_path / "no-tools"
    empty.mkdir()
    (empty / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(empty))
    assert judge(repo, tmp_path, ssh_set(alice)).verdict == GOOD
    # ... and a changed key set (a key added) is judged afresh: here, by the tool that is missing.
    with pytest.raises(GitopsdError, match="ssh-keygen is not installed"):
        judge(repo, tmp_path, ssh_set(alice, bob))


def test_verification_leaves_no_files_behind(repo, tmp_path, ssh_keys, gpg_keys, monkeypatch):
    alice, olga, oscar = ssh_keys("alice"), gpg_keys("olga"), gpg_keys("oscar")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, prefix=None, **kwargs):   # the private dirs the verification makes, made in `scratch`
        if prefix != "gitopsd-verify-":
            return real_mkdtemp(*args, prefix=prefix, **kwargs)
        made.append(real_mkdtemp(*args, prefix=prefix, dir=str(scratch)))
        assert os.stat(made[-1]).st_mode & 0o777 == 0o700
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    for signer, keys in ((alice, ssh_set(alice)), (olga, gpg_set(olga)), (oscar, gpg_set(olga))):
        commit(repo, "next", signer)
        judge(repo, tmp_path, keys)
    assert len(made) == 3
    assert list(scratch.iterdir()) == [], "key files, payloads and the throw-away GNUPGHOME are removed at once"


# ---------------------------------------------------------------- deploying (real control plane)


def keys_file(tmp_path: Path, *signers) -> Path:
    """A directory of public keys as a mounted Secret looks (with its `..data` entries)."""
    directory = tmp_path / "trusted"
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "..data").mkdir(parents=True)
    for s in signers:
        (directory / f"{s.name if hasattr(s, 'name') else s.fingerprint}.key").write_text(s.public)
    return directory


def verifying(app, kube, tmp_path: Path, provider: str, *signers, **overrides):
    """The app's spec with `verify`, its keys read as the daemon reads them."""
    verify = Verify(provider=provider, keys_from=TrustedKeysFrom(file=keys_file(tmp_path, *signers)))
    spec = app.spec(verify=verify, **overrides)
    store = CredentialStore(kube, namespace=spec.inventory_namespace)
    try:
        return dataclasses.replace(spec, trusted_keys=store.trusted_keys(spec))
    finally:
        store.close()


@pytest.mark.cluster
def test_refused_commit_applies_nothing_and_prunes_nothing(repo, app, kube, namespace, tmp_path, ssh_keys):
    alice = ssh_keys("alice")
    repo.write("a.yaml", configmap("kept", {"v": "1"}))
    repo.write("b.yaml", configmap("settings", {"color": "blue"}))
    first = commit(repo, "signed", alice)
    spec = verifying(app, kube, tmp_path, "ssh", alice)
    applied = sync(kube, spec, cache_dir=app.cache_dir)
    assert applied.outcome == Outcome.APPLIED, applied.reason
    assert applied.revision.signature.key == alice.fingerprint
    before = {n: kube.get(kube.resource("v1", "ConfigMap"), n, namespace)["metadata"]["resourceVersion"]
              for n in ("kept", "settings")}

    repo.remove("a.yaml")
    repo.write("b.yaml", configmap("settings", {"color": "red"}))
    unsigned = commit(repo, "unsigned: prune kept, paint it red")
    refused = sync(kube, spec, cache_dir=app.cache_dir)

    assert refused.outcome == Outcome.FAILED
    assert refused.reason == f"commit {unsigned[:12]} refused: the commit is unsigned; nothing was rendered or applied"
    assert refused.plan is None and refused.applied == [] and refused.pruned == []
    after = {n: kube.get(kube.resource("v1", "ConfigMap"), n, namespace)["metadata"]["resourceVersion"]
             for n in ("kept", "settings")}
    assert after == before, "nothing was written, nothing pruned"
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}

    rec = audit.transition_record(refused, trigger="poll", previous=first, instance="test")
    assert (rec["result"], rec["revision"], rec["written"]) == ("Failed", unsigned, 0)
    assert rec["signature"] == {"provider": "ssh", "verdict": "unsigned", "key": None, "signer": None,
                                "commit": unsigned}
    assert "sign commits with a trusted key" in refused.errors[0]


@pytest.mark.cluster
def test_commit_signed_by_a_trusted_openpgp_key_is_applied_and_recorded(repo, app, kube, namespace, tmp_path,
                                                                       gpg_keys):
    olga = gpg_keys("olga")
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    sha = commit(repo, "signed with OpenPGP", olga)

    result = sync(kube, verifying(app, kube, tmp_path, "openpgp", olga), cache_dir=app.cache_dir)

    assert result.outcome == Outcome.APPLIED, result.reason
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}
    rec = audit.transition_record(result, trigger="cli", previous=None, instance="test")
    assert rec["signature"] == {"provider": "openpgp", "verdict": "good", "key": olga.fingerprint,
                                "signer": olga.uid, "commit": sha}


@pytest.mark.cluster
def test_rollback_target_is_verified_and_stays_possible_past_a_refused_head(repo, app, kube, namespace, tmp_path,
                                                                           ssh_keys):
    alice, mallory = ssh_keys("alice"), ssh_keys("mallory")
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    unsigned_old = commit(repo, "unsigned blue")
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    signed_old = commit(repo, "signed green", alice)
    repo.write("cm.yaml", configmap("settings", {"color": "red"}))
    commit(repo, "red, by a stranger", mallory)
    spec = verifying(app, kube, tmp_path, "ssh", alice)

    # A rollback to an unsigned commit is refused like a push of it.
    to_unsigned = sync(kube, spec, cache_dir=app.cache_dir, pick=lambda rev: unsigned_old)
    assert to_unsigned.outcome == Outcome.FAILED
    assert to_unsigned.reason.startswith(f"commit {unsigned_old[:12]} refused: the commit is unsigned")
    assert cm_data(kube, namespace, "settings") is None

    # A rollback to a signed commit goes ahead although the head is refused: the way out of a bad push.
    to_signed = sync(kube, spec, cache_dir=app.cache_dir, pick=lambda rev: signed_old)
    assert to_signed.outcome == Outcome.APPLIED, to_signed.reason
    assert (to_signed.revision.sha, to_signed.revision.signature.key) == (signed_old, alice.fingerprint)
    assert cm_data(kube, namespace, "settings") == {"color": "green"}


# ---------------------------------------------------------------- the daemon


def key_secret(kube, namespace: str, *signers: SshSigner, name: str = "team-keys") -> None:
    """Create or replace the Secret of trusted keys (one entry per signer), as `kubectl create secret generic
    team-keys --from-file=alice.pub=...` makes it."""
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {f"{s.name}.pub": base64.b64encode(s.public.encode()).decode() for s in signers}}
    path = f"/api/v1/namespaces/{namespace}/secrets"
    if kube.get(kube.resource("v1", "Secret"), name, namespace) is None:
        kube.request("POST", path, body=body)
    else:
        kube.request("PUT", f"{path}/{name}", body=body)


def ssh_app(name: str, repo: GitRepo, namespace: str) -> dict:
    return app_entry(name, repo.url, namespace,
                     verify={"provider": "ssh", "keysFrom": {"secretRef": {"name": "team-keys"}}})


@pytest.mark.cluster
def test_key_secret_that_is_missing_or_holds_a_private_key_fails_the_app_naming_it(kube, namespace, ssh_keys):
    from gitopsd.config import AppConfig, TrustedKeysSecretRef

    alice = ssh_keys("alice")
    cfg = AppConfig(name="sig-keys", repo="r", verify=Verify(provider="ssh", keys_from=TrustedKeysFrom(
        secret_ref=TrustedKeysSecretRef(name="team-keys"))))
    store = CredentialStore(kube, namespace=namespace)
    try:
        with pytest.raises(GitopsdError) as missing:
            store.trusted_keys(cfg)
        assert missing.value.message == (f"app sig-keys: trusted keys Secret {namespace}/team-keys not found; "
                                         "refusing to deploy unverified commits")
        kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-keys"},
            "data": {"alice.pub": base64.b64encode(alice.public.encode()).decode(),
                     "alice": base64.b64encode(alice.key.read_bytes()).decode()}})
        with pytest.raises(GitopsdError) as private:
            store.trusted_keys(cfg)
        assert private.value.message == (f"app sig-keys: Secret {namespace}/team-keys: alice holds a private key; "
                                         "only public keys belong there")
    finally:
        store.close()


@pytest.mark.cluster
def test_daemon_applies_a_trusted_ssh_commit_records_its_signer_and_refuses_an_unsigned_one(
        repo, kube, namespace, tmp_path, start_daemon, ssh_keys, kubeconfig, source_cache):
    alice = ssh_keys("alice")
    key_secret(kube, namespace, alice)
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    repo.write("extra.yaml", configmap("extra", {"v": "1"}))
    signed = commit(repo, "blue, signed", alice)
    daemon = start_daemon(write_config(tmp_path / "config.yaml", [ssh_app("sig-ssh", repo, namespace)]),
                          "--no-leader-elect")

    applied = wait_transition(daemon, "the signed commit applied", revision=signed, result="Applied")
    assert applied["signature"] == {"provider": "ssh", "verdict": "good", "key": alice.fingerprint,
                                    "signer": "alice@example.com", "commit": signed}
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}

    repo.remove("extra.yaml")
    repo.write("cm.yaml", configmap("settings", {"color": "red"}))
    unsigned = commit(repo, "red, unsigned")   # the daemon watches the local repository
    refused = wait_transition(daemon, "the unsigned commit refused", revision=unsigned, result="Failed")
    assert refused["reason"] == \
        f"commit {unsigned[:12]} refused: the commit is unsigned; nothing was rendered or applied"
    assert refused["signature"]["verdict"] == "unsigned" and refused["written"] == 0
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}
    assert cm_data(kube, namespace, "extra") == {"v": "1"}, "a refused commit prunes nothing"

    def both_stored() -> str | None:
        out = gitopsd("history", "sig-ssh", "--namespace", namespace, kubeconfig=kubeconfig, cache=source_cache)
        return out.stdout if out.returncode == 0 and f"->{unsigned[:8]}" in out.stdout else None

    history = wait_for("both records in `gitopsd history`", both_stored, 30, interval=0.5)
    line = next(line for line in history.splitlines() if f"->{signed[:8]}" in line)
    assert f"signed by alice@example.com ({alice.fingerprint})" in line
    refused_line = next(line for line in history.splitlines() if f"->{unsigned[:8]}" in line)
    assert f"commit {unsigned[:12]} refused: the commit is unsigned" in refused_line and "signed by" not in refused_line
    audit_verify("sig-ssh", kubeconfig=kubeconfig, namespace=namespace, cache=source_cache)


@pytest.mark.cluster
def test_daemon_uses_a_key_added_to_the_secret_and_refuses_one_removed_without_a_restart(
        repo, kube, namespace, tmp_path, start_daemon, ssh_keys):
    alice, bob, carol = ssh_keys("alice"), ssh_keys("bob"), ssh_keys("carol")
    key_secret(kube, namespace, alice, bob)
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    first = commit(repo, "blue, by alice", alice)
    daemon = start_daemon(write_config(tmp_path / "config.yaml", [ssh_app("sig-rotate", repo, namespace)]),
                          "--no-leader-elect")
    wait_transition(daemon, "alice's commit applied", revision=first, result="Applied")

    # Carol is not trusted yet: refused. Her key added to the Secret: the retry deploys the same commit.
    repo.write("cm.yaml", configmap("settings", {"color": "green"}))
    by_carol = commit(repo, "green, by carol", carol)
    refused = wait_transition(daemon, "carol's commit refused", revision=by_carol, result="Failed")
    assert f"signed by unknown key {carol.fingerprint}" in refused["reason"]
    key_secret(kube, namespace, alice, bob, carol)
    added = wait_transition(daemon, "carol's commit applied once her key is in", revision=by_carol, result="Applied")
    assert added["signature"]["key"] == carol.fingerprint
    assert cm_data(kube, namespace, "settings") == {"color": "green"}

    # Bob's key revoked: his next commit is refused by the running daemon; alice's still deploy.
    key_secret(kube, namespace, alice, carol)
    repo.write("cm.yaml", configmap("settings", {"color": "red"}))
    by_bob = commit(repo, "red, by bob", bob)
    revoked = wait_transition(daemon, "bob's commit refused", revision=by_bob, result="Failed")
    assert revoked["reason"].startswith(f"commit {by_bob[:12]} refused: signed by unknown key {bob.fingerprint}")
    assert revoked["signature"] == {"provider": "ssh", "verdict": "unknown-key", "key": bob.fingerprint,
                                    "signer": None, "commit": by_bob}
    assert cm_data(kube, namespace, "settings") == {"color": "green"}
    assert_serving(daemon)

    repo.write("cm.yaml", configmap("settings", {"color": "amber"}))
    last = commit(repo, "amber, by alice", alice)
    wait_transition(daemon, "alice's next commit applied", revision=last, result="Applied")
    assert cm_data(kube, namespace, "settings") == {"color": "amber"}


@pytest.mark.cluster
def test_cli_sync_with_verify_keys_deploys_a_signed_commit_and_refuses_an_unsigned_one(
        repo, kube, kubeconfig, source_cache, namespace, ssh_keys, tmp_path):
    alice = ssh_keys("alice")
    keys = tmp_path / "team.pub"
    keys.write_text(alice.public)
    repo.write("cm.yaml", configmap("settings", {"color": "blue"}))
    signed = commit(repo, "signed", alice)
    args = ("--repo", repo.url, "--ref", "main", "--namespace", namespace, "--app", "cli-verify",
            "--verify-ssh-keys", str(keys))

    ok = gitopsd("sync", *args, kubeconfig=kubeconfig, cache=source_cache)
    assert ok.returncode == 0, ok.stderr
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}

    repo.write("cm.yaml", configmap("settings", {"color": "red"}))
    unsigned = commit(repo, "unsigned")
    refused = gitopsd("sync", *args, kubeconfig=kubeconfig, cache=source_cache)

    assert refused.returncode != 0
    assert f"commit {unsigned[:12]} refused: the commit is unsigned" in refused.stdout + refused.stderr
    assert cm_data(kube, namespace, "settings") == {"color": "blue"}, "nothing of the unsigned commit applied"
    assert signed != unsigned
