"""Decrypt: SOPS-encrypted files of a commit, opened with the app's keys, never kept.

A team keeps Secrets in Git encrypted with SOPS (https://getsops.io): the
values are ciphertext (`ENC[AES256_GCM,data:...]`), the keys and structure
stay readable, and a top-level `sops:` map says who may decrypt (age
recipients) and carries a MAC over the whole content. The renderer
(gitopsd.engine.render) decrypts such files with the real `sops` binary and
the app's age identities; this module holds what that needs besides running
the tool: recognising an encrypted file, the keys, the arguments and
environment of the `sops` process, reading its failures, and the private
workspace a kustomize build of decrypted files runs in.

Where plaintext may be, and where never:

- in memory: sops writes it to its stdout, which the renderer reads; the
  manifests (and the render cache's in-memory copy) hold it, as they hold
  any Secret rendered from plain YAML. Every value is registered with
  gitopsd.redact before anything can echo it.
- on disk only for a kustomize build, which reads files: the render's inputs
  are copied into a directory of its own (0700, on /dev/shm when there is
  one, so in memory as well), the encrypted files among them replaced by
  their plaintext (0600), kustomize run there, and the directory removed as
  soon as it returns, whatever happened (`workspace`).
- never in the checkout, the source cache, a log line, an error or a record.

The keys reach sops only through its environment (SOPS_AGE_KEY) with a
private, empty HOME: sops would otherwise also try ~/.config/sops/age/keys.txt
and ~/.ssh keys of the daemon, which are no app's to use.

Recognising an encrypted file: a YAML or JSON document whose top level has a
`sops` mapping with `mac` and `lastmodified` (what sops writes; a manifest
never has a top-level `sops` field). A secret generator's input file is read
by its extension, as sops encrypts it: `.env` as dotenv (`sops_mac=` line),
`.ini` as ini (`[sops]` section), `.yaml`/`.yml`/`.json` as such, anything
else as binary (a JSON document with `data` and `sops`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import yaml

from gitopsd.engine import yamlload

PROVIDERS = ("sops",)
#: What an entry of a keys Secret (or a file in a keys directory) must end with to be read: Flux's convention.
AGE_KEY_SUFFIX = ".agekey"
_AGE_IDENTITY = re.compile(r"^AGE-SECRET-KEY-1[0-9A-Z]+$")

# sops' exit codes (cmd/sops/codes), for a message that says what went wrong.
_EXIT_REASONS = {
    128: ("none of the app's age keys can open it (wrong key?)",
          "add the age identity of one of the file's recipients to the app's keys (an entry ending in "
          ".agekey), or re-encrypt the file for the app's key (sops updatekeys)"),
    51: ("its MAC does not match its content: it was changed after it was encrypted (tampered with, or "
         "edited without sops)", "edit encrypted files with `sops FILE` only; re-encrypt it from the plaintext"),
    52: ("it has no MAC", "re-encrypt it with sops"),
    24: ("its MAC cannot be decrypted", "re-encrypt it with sops"),
    25: ("a value does not decrypt: its ciphertext was changed after it was encrypted (tampered with?)",
         "edit encrypted files with `sops FILE` only; re-encrypt it from the plaintext"),
}
_GENERIC_HINT = "check the file with `sops --decrypt FILE` and the app's age key"

#: Where a workspace goes: memory-backed when the system has it.
_SHM = Path("/dev/shm")


# --------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, repr=False)
class Keys:
    """The age identities an app decrypts with (AGE-SECRET-KEY-1...), as read at this reconcile.

    Its repr and str show only how many there are: a spec is printed in
    tracebacks and debug lines.
    """

    age: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return f"<decryption keys: {len(self.age)} age identit{'y' if len(self.age) == 1 else 'ies'}>"

    __str__ = __repr__

    @property
    def fingerprint(self) -> str:
        """A digest of the key set: the render cache keys builds on it, so a key removed
        from the Secret is missed by its next render instead of served from before."""
        return hashlib.sha256("\n".join(sorted(self.age)).encode()).hexdigest()[:32]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Keys:
        """The age identities in `texts` (age-keygen's file format: comments and one
        identity per line); other lines are ignored."""
        found: list[str] = []
        for text in texts:
            for line in text.splitlines():
                line = line.strip()
                if _AGE_IDENTITY.match(line) and line not in found:
                    found.append(line)
        return cls(age=tuple(found))


def environment(keys: Keys) -> dict[str, str]:
    """What sops gets beside the renderer's minimal environment (gitopsd.engine.render._tool_env)."""
    return {"SOPS_AGE_KEY": "\n".join(keys.age), "SOPS_DISABLE_VERSION_CHECK": "1"}


# --------------------------------------------------------------------------
# Recognising encrypted content


def format_of(path: Path | str) -> str:
    """The sops format a file is encrypted in, by its extension (as sops decides it)."""
    suffix = Path(path).suffix.lower()
    return {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".env": "dotenv", ".ini": "ini"}.get(suffix, "binary")


def is_encrypted_document(doc: object) -> bool:
    """A YAML or JSON document sops encrypted: a top-level `sops` map with `mac` and `lastmodified`."""
    meta = doc.get("sops") if isinstance(doc, dict) else None
    return isinstance(meta, dict) and "mac" in meta and "lastmodified" in meta


def is_encrypted_text(text: str, *, fmt: str) -> bool:
    """Whether a file's text (a secret generator's input) is sops-encrypted in `fmt`."""
    if "sops" not in text:   # cheap: every encrypted format names it
        return False
    if fmt == "dotenv":
        keys = {line.partition("=")[0].strip() for line in text.splitlines()}
        return {"sops_mac", "sops_lastmodified"} <= keys
    if fmt == "ini":
        lines = [line.strip() for line in text.splitlines()]
        return "[sops]" in lines and any(re.match(r"^mac\s*=", line) for line in lines)
    try:
        if fmt == "yaml":
            docs = yamlload.load_all(text, budget=yamlload.Budget())
        else:   # json, and binary, which sops stores as a JSON document
            docs = [orjson.loads(text)]
    except (yaml.YAMLError, orjson.JSONDecodeError):
        return False
    return any(is_encrypted_document(d) for d in docs)


_CIPHERTEXT = re.compile(r"^ENC\[AES256_GCM,data:")


def ciphertext_at(obj: object, path: str = "") -> str | None:
    """The field path of the first SOPS ciphertext value in a rendered object, or None.

    The renderer's last check: whatever the way a file reached the output
    (a helm template, a kustomize base no walk recognised), an object that
    still carries ciphertext is never applied.
    """
    if isinstance(obj, str):
        return path or "." if _CIPHERTEXT.match(obj) else None
    if isinstance(obj, dict):
        items: Iterable = obj.items()
    elif isinstance(obj, list):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        sub = f"{path}{key}" if str(key).startswith("[") else f"{path}.{key}" if path else str(key)
        found = ciphertext_at(value, sub)
        if found:
            return found
    return None


# --------------------------------------------------------------------------
# Running sops


def sops_args(file: Path, *, fmt: str) -> list[str]:
    """`sops --decrypt` of `file` to stdout, in its own format (never in place)."""
    return ["--decrypt", "--input-type", fmt, "--output-type", fmt, str(file)]


def failure(source: str, *, exit_code: int, stderr: str) -> tuple[str, str]:
    """(problem, hint) for a file sops could not decrypt: the file, what went wrong in a
    sentence, and sops' own words (already scrubbed by the caller)."""
    reason, hint = _EXIT_REASONS.get(exit_code, (None, _GENERIC_HINT))
    said = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if len(said) > 300:
        said = said[:299] + "…"
    text = f"{source}: cannot be decrypted with sops: {reason or f'sops failed (exit {exit_code})'}"
    return (f"{text} (sops: {said})" if said else text), hint


# --------------------------------------------------------------------------
# The private workspace of a kustomize build


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A directory only this process may enter, removed (with whatever plaintext it got) on exit."""
    base = _SHM if _SHM.is_dir() and os.access(_SHM, os.W_OK | os.X_OK) else None
    path = Path(tempfile.mkdtemp(prefix="gitopsd-sops-", dir=base))   # mkdtemp: 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_inputs(real_root: Path, inputs: Iterable[str], dest: Path) -> None:
    """Copy the repo-relative `inputs` (files, directories, links) of `real_root` into `dest`, same layout.

    Links are copied as links, never followed: the walk that found the inputs
    (gitopsd.engine.confine) has refused every link out of the checkout, and
    a relative link lands on the copy of its target. `.git` is left out.
    """
    for rel in sorted(inputs):
        src = real_root / rel
        out = dest / rel
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if src.is_symlink():
            if not out.is_symlink() and not out.exists():
                os.symlink(os.readlink(src), out)
        elif src.is_dir():
            shutil.copytree(src, out, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        elif src.is_file():
            shutil.copyfile(src, out, follow_symlinks=False)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` (a copied encrypted file, never a link) with `data`, readable by this process only."""
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)
