"""Git credentials, SOPS keys and trusted signing keys of the apps, resolved at every reconcile (rotation works).

An app names its credentials either as a Secret in gitopsd's namespace
(keys token, username, identity, known_hosts, ca.crt) or as files mounted
into the pod. SSH key material, known_hosts and the CA bundle read from a
Secret are written to private files (0600) in a directory of this process,
removed at shutdown. The secret parts are registered with gitopsd.redact as
they are read.

Its SOPS keys (`decryption.keysFrom`) the same way: the entries of a Secret
in gitopsd's namespace whose names end in .agekey (Flux's convention), or a
mounted file or directory. They stay in memory (gitopsd.engine.decrypt.Keys):
sops gets them through its environment, never from a file.

The public keys an app trusts for commit signatures (`verify.keysFrom`) are
read the same way, at every reconcile, from a Secret (every entry) or a
file or directory (every file but dotfiles: a mounted Secret's `..data`):
a key added is used at the next reconcile, a key removed is no longer
trusted there. They are public: nothing is registered or written to disk.

A notifier's token, secret address or signing key (gitopsd.notify) the same
way (`value`): a Secret entry or a mounted file, read at each delivery,
registered with gitopsd.redact, kept in memory only.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path

from gitopsd import config as config_mod
from gitopsd import redact
from gitopsd.engine import decrypt, signature, source
from gitopsd.errors import GitopsdError
from gitopsd.kube import Kube


class CredentialStore:
    def __init__(self, kube: Kube, *, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._secret_dir = Path(tempfile.mkdtemp(prefix="gitopsd-credentials-"))

    def close(self) -> None:
        shutil.rmtree(self._secret_dir, ignore_errors=True)

    def resolve(self, cfg: config_mod.AppConfig) -> source.Credentials | None:
        """Resolve an app's credentials reference (re-read every reconcile: rotation works).

        The secret parts — the token (an https password or access token) and
        the SSH private key's content — are registered with gitopsd.redact as
        they are read, so a git or tool message that echoes one is scrubbed
        from every log line and record. The username and known_hosts are not
        secrets: registered, a username would be blanked from every line that
        happens to contain it.
        """
        ref = cfg.credentials
        if ref is None:
            return None
        if ref.secret_name:
            secret = self.kube.get(self.kube.resource("v1", "Secret"), ref.secret_name, self.namespace)
            if secret is None:
                raise GitopsdError(f"app {cfg.name}: credentials Secret {self.namespace}/{ref.secret_name} not found",
                                   hint="create it with keys token (and username) or identity and known_hosts "
                                        "(and ca.crt for a private CA)")

            wanted = ("token", "username", "identity", "known_hosts", "ca.crt")
            try:
                data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()
                        if k in wanted}
            except (ValueError, UnicodeDecodeError):
                raise GitopsdError(f"app {cfg.name}: credentials Secret {self.namespace}/{ref.secret_name} "
                                   "has a key that is not text", hint=f"keys read: {', '.join(wanted)}") from None
            redact.remember((data.get("token"), data.get("identity")))
            key_file = hosts_file = ca_file = None
            if "identity" in data:
                key_file = self._private_file(f"{cfg.name}-identity", data["identity"])
            if "known_hosts" in data:
                hosts_file = self._private_file(f"{cfg.name}-known_hosts", data["known_hosts"])
            if "ca.crt" in data:
                ca_file = self._private_file(f"{cfg.name}-ca.crt", check_ca_bundle(data["ca.crt"], where=(
                    f"app {cfg.name}: credentials Secret {self.namespace}/{ref.secret_name}, key ca.crt")))
            return source.Credentials(username=data.get("username"), token=data.get("token"),
                                      ssh_key_file=key_file, known_hosts_file=hosts_file, ca_file=ca_file)
        try:
            token = ref.token_file.read_text().strip() if ref.token_file else None
            username = ref.username or (ref.username_file.read_text().strip() if ref.username_file else None)
            key = ref.ssh_key_file.read_text(errors="replace") if ref.ssh_key_file else None
            if ref.ca_file is not None:
                check_ca_bundle(ref.ca_file.read_text(errors="replace"), where=f"app {cfg.name}: caFile {ref.ca_file}")
        except OSError as exc:
            raise GitopsdError(f"app {cfg.name}: cannot read a credentials file: {exc.strerror}: {exc.filename}",
                               hint="is the Secret volume mounted at that path?") from None
        redact.remember((token, key))
        return source.Credentials(username=username, token=token, ssh_key_file=ref.ssh_key_file,
                                  known_hosts_file=ref.known_hosts_file, ca_file=ref.ca_file)

    def decryption_keys(self, cfg: config_mod.AppConfig) -> decrypt.Keys | None:
        """The app's SOPS age identities, read now (a key added to or removed from the Secret
        counts from this reconcile on); None when the app decrypts nothing. Registered with
        gitopsd.redact as they are read. Raises GitopsdError when none can be read."""
        if cfg.decryption is None:
            return None
        ref = cfg.decryption.keys_from
        if ref.secret_ref is None:
            return read_keys(ref.file, what=f"app {cfg.name}: decryption.keysFrom.file")
        name = ref.secret_ref.name
        where = f"app {cfg.name}: decryption keys Secret {self.namespace}/{name}"
        secret = self.kube.get(self.kube.resource("v1", "Secret"), name, self.namespace)
        if secret is None:
            raise GitopsdError(f"{where} not found", hint=_KEYS_HINT)
        texts = []
        for key, value in sorted((secret.get("data") or {}).items()):
            if key.endswith(decrypt.AGE_KEY_SUFFIX):
                try:
                    texts.append(base64.b64decode(value).decode())
                except (ValueError, UnicodeDecodeError):
                    raise GitopsdError(f"{where}: entry {key} is not text", hint=_KEYS_HINT) from None
        return _found(texts, where=where)

    def trusted_keys(self, cfg: config_mod.AppConfig) -> signature.TrustedKeys | None:
        """The public keys `cfg.verify` names, as they are now; None for an app that does not verify.
        Raises GitopsdError naming the Secret or file when they cannot be read or hold no usable key."""
        if cfg.verify is None:
            return None
        where = cfg.verify.keys_from
        if where.secret_ref is not None:
            namespace = where.secret_ref.namespace or self.namespace
            origin = f"Secret {namespace}/{where.secret_ref.name}"
            secret = self.kube.get(self.kube.resource("v1", "Secret"), where.secret_ref.name, namespace)
            if secret is None:
                raise GitopsdError(f"app {cfg.name}: trusted keys {origin} not found; refusing to deploy "
                                   "unverified commits", hint="create it: kubectl create secret generic "
                                   f"{where.secret_ref.name} -n {namespace} --from-file=alice.pub=...")
            try:
                entries = [(k, base64.b64decode(v).decode()) for k, v in (secret.get("data") or {}).items()]
            except (ValueError, UnicodeDecodeError):
                raise GitopsdError(f"app {cfg.name}: trusted keys {origin} has an entry that is not text",
                                   hint="each entry holds public keys as text") from None
        else:
            origin = f"file {where.file}"
            try:
                entries = key_files(where.file)
            except GitopsdError as exc:
                raise GitopsdError(f"app {cfg.name}: {exc.message}", hint=exc.hint) from None
        try:
            return signature.TrustedKeys(provider=cfg.verify.provider, entries=tuple(sorted(entries)), origin=origin)
        except GitopsdError as exc:
            raise GitopsdError(f"app {cfg.name}: {exc.message}", hint=exc.hint) from None

    def value(self, ref: config_mod.ValueFrom, *, key: str, what: str, secret: bool = True) -> str:
        """One value a notifier names (gitopsd.notify): a Secret entry (`key` unless the ref names one)
        or a mounted file's text, stripped; read at each use (rotation works) and, when `secret`,
        registered with gitopsd.redact (a CA bundle is not). Raises GitopsdError naming `what`, the
        Secret or file, and the key."""
        if ref.secret_ref is not None:
            key = ref.secret_ref.key or key
            where = f"{what}: Secret {self.namespace}/{ref.secret_ref.name}"
            secret = self.kube.get(self.kube.resource("v1", "Secret"), ref.secret_ref.name, self.namespace)
            if secret is None:
                raise GitopsdError(f"{where} not found", hint=f"create it with the key {key}")
            encoded = (secret.get("data") or {}).get(key)
            if encoded is None:
                raise GitopsdError(f"{where} has no key {key}", hint=f"keys found: "
                                   f"{', '.join(sorted(secret.get('data') or {})) or 'none'}")
            try:
                text = base64.b64decode(encoded).decode().strip()
            except (ValueError, UnicodeDecodeError):
                raise GitopsdError(f"{where}: key {key} is not text") from None
        else:
            try:
                text = ref.file.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise GitopsdError(f"{what}: cannot read {ref.file}: {getattr(exc, 'strerror', None) or exc}",
                                   hint="is the Secret volume mounted at that path?") from None
        if secret:
            redact.remember((text,))
        if not text:
            raise GitopsdError(f"{what}: the value is empty", hint="put the token or address in it")
        return text

    def _private_file(self, name: str, content: str) -> Path:
        path = self._secret_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content if content.endswith("\n") else content + "\n")
        return path


def check_ca_bundle(text: str, *, where: str) -> str:
    """`text` when it is a PEM CA bundle: at least one certificate and no private key (a key in it would
    be a mistake worth naming, and git would read nothing useful from it). Raises GitopsdError."""
    if "PRIVATE KEY-----" in text:
        raise GitopsdError(f"{where} holds a private key: only the CA's certificate belongs there",
                           hint="the PEM certificate(s) of the CA that signed the server's certificate")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise GitopsdError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                           hint="the PEM certificate(s) of the CA that signed the server's certificate")
    return text


_KEYS_HINT = ("create it from age-keygen's file: kubectl create secret generic sops-age "
              "--from-file=age.agekey=key.txt (entries ending in .agekey are read)")


def read_keys(path: Path, *, what: str) -> decrypt.Keys:
    """Age identities from a file, or from the files ending in .agekey of a directory (a mounted
    Secret). Registered with gitopsd.redact. Raises GitopsdError when none can be read."""
    try:
        if path.is_dir():
            texts = [f.read_text() for f in sorted(path.iterdir())
                     if f.name.endswith(decrypt.AGE_KEY_SUFFIX) and f.is_file()]
        else:
            texts = [path.read_text()]
    except (OSError, UnicodeDecodeError) as exc:
        raise GitopsdError(f"{what}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                           hint="is the Secret volume mounted at that path?") from None
    return _found(texts, where=f"{what} ({path})")


def _found(texts: list[str], *, where: str) -> decrypt.Keys:
    keys = decrypt.Keys.parse(texts)
    redact.remember(keys.age)
    if not keys.age:
        raise GitopsdError(f"{where} holds no age identity (a line AGE-SECRET-KEY-1...)", hint=_KEYS_HINT)
    return keys


def key_files(path: Path) -> list[tuple[str, str]]:
    """(name, text) of the public-key file `path`, or of each file of the directory `path` (a mounted
    Secret: dotfiles such as `..data` skipped). Raises GitopsdError naming the path when unreadable."""
    try:
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()) \
            if path.is_dir() else [path]
        return [(p.name, p.read_text()) for p in files]
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise GitopsdError(f"cannot read trusted keys file {path}: {why}",
                           hint="is the volume with the keys mounted at that path?") from None
