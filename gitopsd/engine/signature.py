"""Verify stage: does a commit carry a valid signature from a key the app trusts?

Between source and render: an app with `verify:` renders nothing, applies
nothing and prunes nothing of a commit that is unsigned, signed by a key not
in its set, or whose signature does not match its content. The crypto is
the real tools' (`ssh-keygen -Y`, `gpg --verify`); this module only takes
the commit object apart the way git does (the `gpgsig` header is the
signature, the object without it the signed payload) and reads the tools'
verdicts.

Trust is the key set and nothing else: for ssh an allowed-signers file made
of exactly the configured keys, for OpenPGP a throw-away GNUPGHOME into
which exactly the configured keys are imported (`--trust-model always` is
right there, and only there: being in the set *is* the trust decision; no
web of trust, no user keyring, no agent). Both live in a private (0700)
temp dir removed as soon as the verdict is in.

Verdicts are cached per (commit, key set): commits are immutable, so a poll
that finds the same head costs nothing; a key added to or removed from the
set is a new key set, judged afresh at the next reconcile. Tool failures
(a missing binary, a timeout) are errors, never verdicts, and never cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from gitopsd.engine import source
from gitopsd.errors import GitopsdError

PROVIDERS = ("ssh", "openpgp")
GOOD, UNSIGNED, UNKNOWN_KEY, BAD = "good", "unsigned", "unknown-key", "bad"

#: Verdicts kept (by commit and key set); one is ~300 bytes.
KEEP_VERDICTS = 4096
TOOL_TIMEOUT = 30.0
#: The namespace git signs commits in (`ssh-keygen -Y sign -n git`).
SSH_NAMESPACE = "git"

_SSH_KEY_TYPE = re.compile(r"(?:sk-)?(?:ssh|ecdsa)-[a-z0-9-]+(?:@openssh\.com)?")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,3}")
_PRINCIPAL = re.compile(r"[^\s,\"*?!]+")
_SSH_GOOD = re.compile(r'Good "git" signature (?:for (?P<signer>.+) )?with \S+ key (?P<key>SHA256:\S+)')
_ARMOR = {"-----BEGIN SSH SIGNATURE-----": "ssh", "-----BEGIN PGP SIGNATURE-----": "openpgp"}
_PROVIDER_NAME = {"ssh": "SSH", "openpgp": "OpenPGP"}


class SignatureError(GitopsdError):
    """A commit refused for its signature. Carries the revision (with its verdict in
    `revision.signature`), so the refusal's audit record names the commit and why."""

    def __init__(self, message: str, *, revision, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.revision = revision


class KeysError(GitopsdError):
    """The configured key set cannot be used (no key in it, a private key, a line that is no key)."""


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys an app trusts, as read at this reconcile (gitopsd.daemon.credentials reads them).

    `entries` are (name, text): a Secret's keys or a directory's files, each
    holding ssh authorized-keys / allowed-signers lines, or ASCII-armored
    OpenPGP public keys. `origin` names where they came from, for messages.
    Checked when made: a set that could verify nothing is an error, not a
    silent refusal of every commit.
    """

    provider: str
    entries: tuple[tuple[str, str], ...]
    origin: str

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {self.provider!r}")
        if not self.entries:
            raise KeysError(f"{self.origin} holds no public keys",
                            hint=_KEYS_HINT[self.provider])
        for name, text in self.entries:
            if "PRIVATE KEY" in text:
                raise KeysError(f"{self.origin}: {name} holds a private key; only public keys belong there",
                                hint=f"remove it (and treat that private key as exposed); {_KEYS_HINT[self.provider]}")
        if self.provider == "ssh":
            self.allowed_signers   # noqa: B018 - parsed now, so a bad line is reported before any commit
        else:
            for name, text in self.entries:
                if "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text:
                    raise KeysError(f"{self.origin}: {name} holds no ASCII-armored OpenPGP public key",
                                    hint=_KEYS_HINT["openpgp"])

    @cached_property
    def digest(self) -> str:
        """What identifies this key set in the verdict cache."""
        h = hashlib.sha256(self.provider.encode())
        for name, text in sorted(self.entries):
            h.update(b"\0" + name.encode() + b"\0" + text.encode())
        return h.hexdigest()

    @cached_property
    def allowed_signers(self) -> str:
        """The ssh keys as an allowed-signers file (ssh-keygen(1) ALLOWED SIGNERS).

        A `principal[,principal] [options] keytype key` line is taken as it is; an
        authorized-keys line (`keytype key [comment]`) gets its comment as principal
        (or, without a usable one, the entry's name without `.pub`).
        """
        lines = []
        for name, text in self.entries:
            found = 0
            for number, line in enumerate(text.splitlines(), start=1):
                tokens = line.split()
                if not tokens or tokens[0].startswith("#"):
                    continue
                at = next((i for i, t in enumerate(tokens[:-1]) if _SSH_KEY_TYPE.fullmatch(t)
                           and _BASE64.fullmatch(tokens[i + 1])), None)
                if at is None:
                    raise KeysError(f"{self.origin}: {name} line {number} is no ssh public key",
                                    hint=_KEYS_HINT["ssh"])
                if at == 0:
                    comment = tokens[2] if len(tokens) > 2 and _PRINCIPAL.fullmatch(tokens[2]) else None
                    principal = comment or _PRINCIPAL.sub("", name.removesuffix(".pub")) or "key"
                    lines.append(f"{principal} {tokens[0]} {tokens[1]}")
                else:
                    lines.append(" ".join(tokens[:at + 2]))
                found += 1
            if not found:
                raise KeysError(f"{self.origin}: {name} holds no ssh public key", hint=_KEYS_HINT["ssh"])
        return "\n".join(lines) + "\n"


_KEYS_HINT = {
    "ssh": "each entry holds public keys, one a line: `ssh-ed25519 AAAA... alice@example.com` (a .pub file) "
           "or `alice@example.com ssh-ed25519 AAAA...` (allowed signers)",
    "openpgp": "each entry holds ASCII-armored public keys: `gpg --armor --export KEYID`",
}


@dataclass(frozen=True)
class Signature:
    """A commit's signature as judged against an app's key set: what the audit record's `signature` holds."""

    provider: str
    verdict: str            # good | unsigned | unknown-key | bad
    commit: str             # the full sha of the commit judged
    key: str | None = None  # SHA256:... (ssh) or the full fingerprint (OpenPGP) of the signing key
    signer: str | None = None   # the principal (ssh) or the key's user id (OpenPGP)
    detail: str = field(default="", compare=False)   # why, for a refusal

    @property
    def good(self) -> bool:
        return self.verdict == GOOD

    def record(self) -> dict:
        """The audit record's `signature` field."""
        return {"provider": self.provider, "verdict": self.verdict, "key": self.key, "signer": self.signer,
                "commit": self.commit}

    def refusal(self) -> str:
        """One line: which commit, and why it is not deployed."""
        return f"commit {self.commit[:12]} refused: {self.detail}; nothing was rendered or applied"


# ---------------------------------------------------------------- verdicts


def signed(checkout: source.Checkout, *, keys: TrustedKeys) -> source.Revision:
    """The checkout's revision carrying its verdict (`revision.signature`), when the verdict is good.

    Raises SignatureError (its `revision` carrying the verdict) when the
    commit is unsigned, signed by a key not in `keys`, or badly signed; and
    GitopsdError when it cannot be judged (a tool missing, the cache gone).
    """
    revision = checkout.revision
    verdict = verify(source.commit_object(checkout, revision.sha), sha=revision.sha, keys=keys)
    revision = dataclasses.replace(revision, signature=verdict)
    if not verdict.good:
        raise SignatureError(verdict.refusal(), revision=revision, hint=_REFUSAL_HINT[verdict.provider])
    return revision


_REFUSAL_HINT = {
    "ssh": "sign commits with a trusted key (git config gpg.format ssh; git config user.signingkey "
           "~/.ssh/id_ed25519.pub; git commit -S), or add the signer's public key to the app's verify.keysFrom",
    "openpgp": "sign commits with a trusted key (git config user.signingkey KEYID; git commit -S), or add the "
               "signer's public key (gpg --armor --export KEYID) to the app's verify.keysFrom",
}

_verdicts: OrderedDict[tuple[str, str], Signature] = OrderedDict()
_lock = threading.Lock()


def verify(raw_commit: bytes, *, sha: str, keys: TrustedKeys) -> Signature:
    """The verdict on the commit object `raw_commit` (`git cat-file commit`) with full sha `sha`.

    Cached by (sha, key set): a commit's content is its sha. Raises
    GitopsdError when a tool cannot run (missing, timed out) or the key set
    cannot be loaded: no verdict then, and nothing is cached.
    """
    key = (sha, keys.digest)
    with _lock:
        if key in _verdicts:
            _verdicts.move_to_end(key)
            return _verdicts[key]
    verdict = _judge(raw_commit, sha=sha, keys=keys)
    with _lock:
        _verdicts[key] = verdict
        while len(_verdicts) > KEEP_VERDICTS:
            _verdicts.popitem(last=False)
    return verdict


def split_signed(raw_commit: bytes) -> tuple[bytes, str | None]:
    """(the signed payload, the signature) of a commit object, as git takes it apart: the `gpgsig`
    header (its continuation lines without their leading space) is the signature, the object
    without that header the payload. No signature: (the object, None)."""
    head, sep, message = raw_commit.partition(b"\n\n")
    payload, signature, inside = [], [], False
    for line in head.split(b"\n"):
        if line.startswith(b"gpgsig "):
            inside = True
            signature.append(line[len(b"gpgsig "):])
        elif inside and line.startswith(b" "):
            signature.append(line[1:])
        else:
            inside = False
            payload.append(line)
    if not signature:
        return raw_commit, None
    return b"\n".join(payload) + sep + message, b"\n".join(signature).decode("ascii", "replace") + "\n"


def _judge(raw_commit: bytes, *, sha: str, keys: TrustedKeys) -> Signature:
    payload, signature = split_signed(raw_commit)
    provider = keys.provider
    if signature is None:
        return Signature(provider, UNSIGNED, sha, detail="the commit is unsigned")
    kind = next((p for armor, p in _ARMOR.items() if signature.startswith(armor)), None)
    if kind != provider:
        what = f"an {_PROVIDER_NAME[kind]} signature" if kind else "a signature of another kind (x509?)"
        return Signature(provider, UNKNOWN_KEY, sha,
                         detail=f"signed with {what}, and the app trusts {_PROVIDER_NAME[provider]} keys only "
                                f"(verify.provider: {provider})")
    with _private_dir() as tmp:
        (tmp / "payload").write_bytes(payload)
        (tmp / "signature").write_text(signature)
        return (_judge_ssh if provider == "ssh" else _judge_openpgp)(tmp, sha=sha, keys=keys)


def _judge_ssh(tmp: Path, *, sha: str, keys: TrustedKeys) -> Signature:
    allowed = tmp / "allowed_signers"
    allowed.write_text(keys.allowed_signers)
    sig, payload = str(tmp / "signature"), tmp / "payload"
    found = _run(["ssh-keygen", "-Y", "find-principals", "-s", sig, "-f", str(allowed)], home=tmp)
    principals = [p for p in found.stdout.splitlines() if p.strip()] if found.returncode == 0 else []
    for principal in principals:
        checked = _run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", principal, "-n", SSH_NAMESPACE,
                        "-s", sig], home=tmp, stdin=payload)
        good = _SSH_GOOD.search(checked.stdout + checked.stderr)
        if checked.returncode == 0 and good:
            return Signature("ssh", GOOD, sha, key=good["key"], signer=good["signer"] or principal)
    if principals:
        return Signature("ssh", BAD, sha, signer=principals[0],
                         detail=f"bad signature: the commit does not match its signature (by {principals[0]})")
    # Not a trusted key: which key, if the signature is sound at all.
    novalidate = _run(["ssh-keygen", "-Y", "check-novalidate", "-n", SSH_NAMESPACE, "-s", sig], home=tmp,
                      stdin=payload)
    good = _SSH_GOOD.search(novalidate.stdout + novalidate.stderr)
    if novalidate.returncode == 0 and good:
        return Signature("ssh", UNKNOWN_KEY, sha, key=good["key"],
                         detail=f"signed by unknown key {good['key']} (not in {keys.origin})")
    return Signature("ssh", BAD, sha, detail="bad signature: the commit does not match its signature")


def _judge_openpgp(tmp: Path, *, sha: str, keys: TrustedKeys) -> Signature:
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    # GnuPG 2.4 writes `use-keyboxd` into a new home's common.conf, and then keeps keys in a daemon
    # (keyboxd) that --no-autostart never starts; an empty common.conf keeps the keyring a file here.
    (home / "common.conf").write_text("")
    gpg = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--no-autostart", "--status-fd", "1"]
    for name, text in keys.entries:
        entry = tmp / "key.asc"
        entry.write_text(text)
        imported = _run([*gpg, "--import", str(entry)], home=home)
        if "[GNUPG:] IMPORT_OK " not in imported.stdout:
            raise KeysError(f"{keys.origin}: {name} holds no OpenPGP public key gpg can import",
                            hint=_KEYS_HINT["openpgp"])
    # The key set is the trust decision: every key in this home is trusted, and only these are here.
    checked = _run([*gpg, "--trust-model", "always", "--verify", str(tmp / "signature"), str(tmp / "payload")],
                   home=home)
    status = _status(checked.stdout)
    if checked.returncode == 0 and "GOODSIG" in status and "VALIDSIG" in status and \
            not {"BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG"} & status.keys():
        fingerprint = status["VALIDSIG"][-1]   # the primary key's (the signing subkey's is the first)
        signer = status["GOODSIG"].split(" ", 1)[1] if " " in status["GOODSIG"] else None
        return Signature("openpgp", GOOD, sha, key=fingerprint, signer=signer)
    if "BADSIG" in status:
        return Signature("openpgp", BAD, sha, detail="bad signature: the commit does not match its signature")
    for word, why in (("EXPKEYSIG", "signed by an expired key"), ("REVKEYSIG", "signed by a revoked key"),
                      ("EXPSIG", "the signature has expired")):
        if word in status:
            fingerprint = status.get("VALIDSIG", [status[word].split(" ")[0]])[-1]
            return Signature("openpgp", BAD, sha, key=fingerprint, detail=f"{why} {fingerprint}")
    if "ERRSIG" in status or "NO_PUBKEY" in status:
        fields = status.get("ERRSIG", status.get("NO_PUBKEY", "")).split(" ")
        fingerprint = fields[6] if len(fields) > 6 and fields[6] != "-" else fields[0]
        return Signature("openpgp", UNKNOWN_KEY, sha, key=fingerprint,
                         detail=f"signed by unknown key {fingerprint} (not in {keys.origin})")
    return Signature("openpgp", BAD, sha, detail="bad signature: gpg could not verify it")


def _status(text: str) -> dict:
    """gpg's status lines by keyword: {"GOODSIG": "<keyid> <uid>", "VALIDSIG": [fields...], ...} (first of each)."""
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("[GNUPG:] "):
            word, _, rest = line[len("[GNUPG:] "):].partition(" ")
            out.setdefault(word, rest.split(" ") if word == "VALIDSIG" else rest)
    return out


class _private_dir:
    """A fresh 0700 temp dir, removed on exit: key files, payloads and the throw-away GNUPGHOME."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="gitopsd-verify-"))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _run(argv: list[str], *, home: Path, stdin: Path | None = None) -> subprocess.CompletedProcess:
    """A verification tool, with an environment of its own (HOME and GNUPGHOME in the temp dir: no user
    config, keyring or agent takes part). Raises GitopsdError when it cannot run at all."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GNUPGHOME": str(home),
           "LC_ALL": "C", "LANGUAGE": "C"}
    try:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as given:
            return subprocess.run(argv, stdin=given, capture_output=True, env=env, timeout=TOOL_TIMEOUT,
                                  text=True, errors="replace", check=False)
    except FileNotFoundError:
        package = "openssh-client" if argv[0] == "ssh-keygen" else "gnupg"
        raise GitopsdError(f"cannot verify commit signatures: {argv[0]} is not installed",
                           hint=f"install {package} (the gitopsd image has it)") from None
    except subprocess.TimeoutExpired:
        raise GitopsdError(f"cannot verify commit signatures: {argv[0]} took longer than {TOOL_TIMEOUT:g}s") from None
