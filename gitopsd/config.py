"""The daemon's config file: which apps to reconcile, and how.

One YAML file lists the apps (`gitopsd run --config FILE`); the daemon reloads
it when it changes. This module only turns text into a validated, immutable
`Config` and compares two of them (`diff`); watching the file, resolving
credentials and acting on a change belong to the daemon.

Rules that shape the code:

- Every problem is reported at once (`ConfigError.problems`), each naming the
  app and the field (`apps[1] (web-production).interval: ...`), so one edit
  fixes the file. A broken file is never half-loaded: the daemon keeps running
  the last good config.
- Secrets never live in this file. Credentials are references (a Secret name,
  or paths of files mounted from one); inline `token:`/`password:` keys and
  passwords in repository URLs are refused, and no message echoes them.
- Unknown keys are errors with a did-you-mean hint: a typo such as `selfheal`
  silently falling back to a default is how a production app ends up pruned.
- "No apps" must be written down: `apps: []`. A missing, unreadable or empty
  file, or one whose `apps:` is absent or empty, is a ConfigError: a file
  deleted, truncated or caught half-written looks exactly like that, and
  reading it as "no apps" would stop every app.
- YAML's surprises are caught, not guessed around: a duplicated key (YAML keeps
  the last one silently) is an error; `ref: 1234567` or `ref: 2024-01-01`
  (read as a number or a date) must be quoted; `prune: "yes"` is no boolean.
"""

from __future__ import annotations

import datetime
import difflib
import errno
import math
import os
import posixpath
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gitopsd.engine.render import KINDS as RENDER_KINDS
from gitopsd.engine.yamlload import Bounded
from gitopsd.errors import GitopsdError, yaml_error_parts

if TYPE_CHECKING:
    from gitopsd.engine import source, sync

#: An app name is also its ApplySet (inventory) name; kept well under the
#: 63-character label limit so derived names (parent object, labels) fit.
MAX_APP_NAME = 40
#: Polling a Git server faster than this only loads it; use the webhook instead.
MIN_INTERVAL = 5.0
INTERVAL_WHY = "polling faster only loads the Git server; use the webhook for fast pickup"
#: A health wait shorter than this cannot see a rollout.
MIN_TIMEOUT = 1.0
TIMEOUT_WHY = "the health wait needs time to see a rollout"
#: No duration gitopsd takes needs more than ten years; a typo such as
#: `99999999h` would overflow timers and dates.
MAX_DURATION = 3650 * 86400.0

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: Helm's limit for release names (which follow the DNS subdomain rule).
_MAX_HELM_RELEASE = 53

_DURATION_HINT = "use 30s, 1m, 1h30m; units ms, s, m, h, d, w"
_DURATION_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PARTS = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s|d|w))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")

_NO_APPS_HINT = ("a deleted, emptied or cut-short file looks like this, so gitopsd refuses it instead of stopping "
                 "every app; to run no apps, write `apps: []`")

# Keys that would hold a secret inline, compared after _normalise(). Refused
# wherever they appear, with a hint at the reference that replaces them.
_INLINE_SECRET_KEYS = frozenset({
    "token", "password", "passwd", "secret", "sshkey", "privatekey", "sshprivatekey", "identity", "apikey",
})


# --------------------------------------------------------------------------
# The model


class ConfigError(GitopsdError):
    """The config file cannot be used. Carries every problem found, so one
    edit can fix them all; the daemon keeps its last good config meanwhile."""

    def __init__(self, problems: list[str], *, source: str = "<config>", hint: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: invalid config, {head}:\n{body}", hint=hint)


@dataclass(frozen=True)
class CredentialsRef:
    """Where an app's Git credentials are, never the credentials themselves.

    Either ``secret_name`` (a Secret in gitopsd's own namespace with keys
    ``token``, ``username``, ``identity``, ``known_hosts``) or file paths
    (mounted from such a Secret), never both; `parse` enforces that. File
    paths are absolute (relative ones in the file are resolved against the
    config file's directory at load time).
    """

    secret_name: str | None = None
    token_file: Path | None = None
    username: str | None = None
    username_file: Path | None = None
    ssh_key_file: Path | None = None
    known_hosts_file: Path | None = None


@dataclass(frozen=True)
class AppConfig:
    """One app as the config file declares it, validated and with defaults.

    Durations are seconds. Settings only the daemon uses (``interval``,
    ``self_heal``, ``suspend``) live here and not in `sync.AppSpec`, which
    describes a single reconcile.
    """

    name: str
    repo: str
    ref: str = "main"
    path: str = "."
    namespace: str = "default"
    interval: float = 60.0
    prune: bool = True
    self_heal: bool = True
    render: str = "auto"
    helm_values: tuple[str, ...] = ()
    helm_release: str | None = None
    allow_remote_bases: bool = False
    credentials: CredentialsRef | None = None
    allowed_namespaces: tuple[str, ...] | None = None
    prune_guard: float = 0.5
    allow_prune_all: bool = False
    recreate: bool = False
    suspend: bool = False
    timeout: float = 300.0

    def to_spec(self, *, inventory_namespace: str, credentials: source.Credentials | None = None) -> sync.AppSpec:
        """What one reconcile of this app needs, for `sync.sync` / `fetch_and_plan`.

        ``credentials`` are the resolved values of ``self.credentials`` (the
        caller reads the Secret or the files). Raises ValueError when the app
        names credentials but none are passed: fetching anonymously would
        fail later with a misleading "authentication failed" from the remote.
        """
        from gitopsd.engine.sync import AppSpec

        if self.credentials is not None and credentials is None:
            raise ValueError(f"app {self.name!r} names credentials; resolve them and pass credentials=")
        return AppSpec(
            name=self.name,
            repo=self.repo,
            ref=self.ref,
            path=self.path,
            namespace=self.namespace,
            render=self.render,
            helm_values=self.helm_values,
            helm_release=self.helm_release,
            allow_remote_bases=self.allow_remote_bases,
            prune=self.prune,
            prune_guard=self.prune_guard,
            allow_prune_all=self.allow_prune_all,
            recreate=self.recreate,
            timeout=self.timeout,
            credentials=credentials,
            inventory_namespace=inventory_namespace,
            allowed_namespaces=self.allowed_namespaces,
        )


@dataclass(frozen=True)
class WebhookConfig:
    """The push webhook. The secret comes from ``secret_file`` or, when that
    is None, from the environment (GITOPSD_WEBHOOK_SECRET); the daemon
    resolves it."""

    secret_file: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole file: apps in file order (names unique), and the webhook."""

    apps: tuple[AppConfig, ...] = ()
    webhook: WebhookConfig = field(default_factory=WebhookConfig)

    def app(self, name: str) -> AppConfig | None:
        """The app called ``name``, or None when the config has none."""
        return next((a for a in self.apps if a.name == name), None)


@dataclass(frozen=True)
class ConfigChange:
    """What a reload changed, by app name (in file order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    webhook_changed: bool = False

    @property
    def empty(self) -> bool:
        """True when the reload changed nothing (e.g. only comments were edited)."""
        return not (self.added or self.removed or self.changed or self.webhook_changed)


# --------------------------------------------------------------------------
# Public functions


def parse(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate config text into a `Config`, or raise ConfigError with EVERY
    problem found.

    Running no apps must be said explicitly: ``apps: []``. Text with no
    content (empty, only whitespace or comments), a file without an ``apps``
    key and ``apps:`` left empty are errors, because a deleted, truncated or
    half-written file looks exactly like that, and reading it as "no apps"
    would stop every app (a daemon that gets a ConfigError keeps its running
    apps). ``source`` names the file in the error. ``base_dir`` is what
    relative credential and webhook file paths are resolved against (`load`
    passes the config file's directory, as kubectl does for kubeconfig
    files); without it they are refused, because the daemon's working
    directory is nothing to rely on.
    """
    problems: list[str] = []
    data = _load_yaml(text, problems=problems)
    if data is _BROKEN:
        raise ConfigError(problems, source=source)
    if data is None:
        what = "is empty" if not text.strip() else "has no content (only comments, or a null document)"
        raise ConfigError([f"the file {what}"], source=source, hint=_NO_APPS_HINT)
    config = _read_config(data, problems=problems, base_dir=base_dir)
    if problems:
        raise ConfigError(problems, source=source,
                          hint=_NO_APPS_HINT if any(p.startswith(("apps: missing", "apps: is empty"))
                                                    for p in problems) else None)
    return config


def read_text(path: Path) -> str:
    """The config file's text, or ConfigError naming the file and why it
    cannot be read (it does not exist, is a directory, is not readable, is
    not UTF-8). For a caller that wants the text itself, e.g. to hash what
    it parses; `load` is read_text + parse."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: it {_os_problem(exc)}"], source=str(path),
                          hint=_NO_APPS_HINT) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start})"], source=str(path)) from None


def load(path: Path) -> Config:
    """Read and `parse` the file at ``path``; relative file paths inside it
    are resolved against its directory.

    Raises ConfigError (never OSError) when the file is missing, unreadable,
    a directory, not UTF-8, empty or only whitespace/comments, has no
    ``apps:`` key or an empty one, or holds any invalid setting; the
    message starts with the path. ``apps: []`` is valid and means no apps.
    """
    path = Path(path)
    return parse(read_text(path), source=str(path), base_dir=path.absolute().parent)


def diff(old: Config, new: Config) -> ConfigChange:
    """Which apps a reload added, removed or changed (any field), by name.

    Pure: what to do about it (start, stop, reschedule, resync) is the
    daemon's decision. Renaming an app is a removal plus an addition, since
    the name is its ApplySet identity. Added and changed follow the new
    file's order, removed the old one's.
    """
    old_apps = {a.name: a for a in old.apps}
    new_names = {a.name for a in new.apps}
    return ConfigChange(
        added=tuple(a.name for a in new.apps if a.name not in old_apps),
        removed=tuple(a.name for a in old.apps if a.name not in new_names),
        changed=tuple(a.name for a in new.apps if a.name in old_apps and old_apps[a.name] != a),
        webhook_changed=old.webhook != new.webhook,
    )


# --------------------------------------------------------------------------
# Validators: one set for the file and the command line
#
# Each takes what the user wrote (a YAML value, or a flag's text) and returns
# the checked value, or raises ValueError whose message quotes the value and
# says why and what is accepted. `parse` puts the field in front
# (`apps[0] (web).pruneGuard: ...`), gitopsd.cli the flag
# (`argument --prune-guard: ...`), so the file and the flags accept the same
# values with the same words.


def parse_duration(value: object) -> float:
    """Seconds from ``"30s"``, ``"1m"``, ``"1h30m"``, ``"500ms"``, ``"1.5h"``,
    ``"7d"``, ``"2w"`` or a bare number of seconds (``90``, ``"90"``).

    The one duration parser of gitopsd: intervals and timeouts in the file,
    ``--timeout``/``--lease-*`` flags, ages such as ``history --since 90m``.
    Units are ms, s, m, h, d, w, in any combination (Go's
    `time.ParseDuration` without ns/us, plus days and weeks). Raises
    ValueError with a message that quotes the value and shows the accepted
    forms; negative, infinite and NaN values, and anything over ten years
    (no setting needs more; a typo such as 99999999h would overflow timers),
    are refused. Booleans are refused although Python counts them as ints:
    `interval: yes` is a mistake, not one second.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a duration ({_DURATION_HINT})")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{_show(value)} is not a duration ({_DURATION_HINT})")
        if seconds < 0:
            raise ValueError(f"{_show(value)} is negative; a duration is 0 or more")
    elif not isinstance(value, str):
        raise ValueError(f"{_type_name(value)} is not a duration ({_DURATION_HINT})")
    else:
        text = value.strip()
        if text.startswith("-") and (_DURATION_NUMBER.fullmatch(text[1:]) or _DURATION_PARTS.fullmatch(text[1:])):
            raise ValueError(f"{_show(value)} is negative; a duration is 0 or more")
        if _DURATION_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_PARTS.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"{_show(value)} is not a duration ({_DURATION_HINT})")
    if not seconds <= MAX_DURATION:   # also catches a 400-digit number that became inf
        raise ValueError(f"{_show(value)} is too long: at most {MAX_DURATION / 86400:g}d")
    return seconds


def check_duration(value: object, *, minimum: float = 0.0, why: str = "") -> float:
    """`parse_duration`, and at least ``minimum`` seconds (``why`` says why)."""
    seconds = parse_duration(value)
    if seconds < minimum:
        raise ValueError(f"{_show(value)} is too short: at least {_seconds(minimum)}" + (f" ({why})" if why else ""))
    return seconds


def check_share(value: object) -> float:
    """A prune guard: a share of the app's objects with 0 < x <= 1 (a number,
    or its text from a flag). 50 is not "50 percent": it is refused, because
    any value above 1 would switch the guard off."""
    share = _number(value)
    if not 0 < share <= 1:
        raise ValueError(f"{share:g} is out of range: use a share with 0 < x <= 1 "
                         "(0.5: refuse to prune more than half of the app's objects at once)")
    return share


def check_count(value: object, *, minimum: int, maximum: int, why: str = "") -> int:
    """A whole number within [minimum, maximum] (an int, or its text from a flag)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            (isinstance(value, str) and not re.fullmatch(r"\s*[-+]?\d{1,18}\s*", value)):
        raise ValueError(f"{_show(value)} is not a whole number")
    number = int(value)
    if not minimum <= number <= maximum:
        raise ValueError(f"{number} is out of range: use {minimum} to {maximum}" + (f" ({why})" if why else ""))
    return number


def check_app_name(value: str) -> str:
    """An app name: also its ApplySet parent's name and a label value."""
    return _check_dns_label(value, max_len=MAX_APP_NAME, what="app name")


def check_namespace(value: str) -> str:
    return _check_dns_label(value, max_len=63, what="namespace")


def check_repo_url(value: str, *, instead: str = "credentials.secretRef or credentials.tokenFile") -> str:
    """A repository URL or path that carries no password and is no option.

    A password or token in the URL would be a secret in the config file (or
    on a command line, in every `ps` listing) and in the audit trail;
    ``instead`` names what to use instead. The message never echoes it.
    """
    if not value.strip():
        raise ValueError("is empty; give a Git URL or a local path")
    if "://" in value:
        try:
            netloc = urllib.parse.urlsplit(value).netloc
        except ValueError as exc:   # e.g. an unclosed IPv6 bracket
            raise ValueError(f"is not a valid URL: {exc}") from None
        userinfo, at, _ = netloc.rpartition("@")
        if at and ":" in userinfo:
            scheme, _, rest = value.partition("://")
            shown = f"{scheme}://{rest.partition('@')[2]}"
            raise ValueError(f"the URL for {shown} carries a password; inline secrets are refused: "
                             f"remove it and use {instead}")
    if value.startswith("-"):
        raise ValueError(f"{_show(value)} is not a repository URL")
    return value


def check_ref(value: str) -> str:
    """A branch, tag or commit SHA. The source stage checks the full git ref
    syntax; this catches what is plainly not one name (`main dev`, a pasted
    sentence, an option)."""
    if not value.strip():
        raise ValueError("is empty; give a branch, tag or commit SHA")
    if any(c.isspace() for c in value):
        raise ValueError(f"{_show(value)} is not a branch, tag or commit SHA (it contains whitespace)")
    if value.startswith("-"):
        raise ValueError(f"{_show(value)} is not a branch, tag or commit SHA (it starts with '-')")
    return value


def check_repo_path(value: str, *, what: str = "path") -> str:
    """A path inside the repository: relative and not escaping through '..'.

    The render stage checks again against the checkout (symlinks included);
    this only catches up front what can never work.
    """
    if value.startswith("/"):
        raise ValueError(f"{_show(value)} is absolute; give the {what} relative to the repository root")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{_show(value)} leaves the repository through '..'")
    return value


def check_readable_file(value: str | Path) -> Path:
    """A file that exists and can be read (``~`` expanded). A directory is
    refused; pipes and devices are accepted (``/dev/stdin``). Nothing is
    read, so checking a pipe does not consume it."""
    text = str(value)
    if not text.strip():
        raise ValueError("is empty; give a file path")
    path = Path(text).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{text}: {_os_problem(exc)}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{text}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{text}: is not readable (permission denied)")
    return path


def _os_problem(exc: OSError) -> str:
    """Why a path cannot be read, in words (`does not exist`, ...)."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "is not readable (permission denied)"
    if isinstance(exc, NotADirectoryError):
        return "does not exist (a parent in the path is not a directory)"
    if exc.errno == errno.ELOOP:
        return "is a loop of symbolic links"
    return f"cannot be read ({exc.strerror or exc})"


def _number(value: object) -> float:
    """A finite number, or the text of one (`0.5`, `.5`, `50`); never a boolean."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{_show(value)} is not a number")


def _check_dns_label(value: str, *, max_len: int, what: str) -> str:
    if len(value) > max_len or not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a valid {what}: use lower-case letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {max_len} characters")
    return value


def _check_dns_subdomain(value: str, *, max_len: int, what: str) -> str:
    if len(value) > max_len or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a valid {what}: use lower-case letters, digits, '-' and '.', "
                         f"at most {max_len} characters")
    return value


def _seconds(value: float) -> str:
    return f"{value:g}s"


# --------------------------------------------------------------------------
# YAML


_BROKEN = object()  # the text is not YAML at all: nothing further to check


class _ConfigLoader(Bounded, yaml.SafeLoader):
    """`yaml.safe_load`'s loader, bounded (no alias bomb, no 1,000-deep
    nesting: see gitopsd.engine.yamlload), plus a record of duplicated keys.

    YAML keeps the last of two equal keys without a word; in a config that
    means `prune: false` early in an app and `prune: true` further down
    silently wins. Merge keys (`<<: *defaults`) are meant to be overridden
    and are not counted.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)
            if key in seen:  # also on one line, as in {a: 1, a: 2}
                self.duplicates.append(
                    f"line {line}: key {key_node.value!r} appears again (first at line {seen[key]}); "
                    "YAML would silently keep only the last one"
                )
            else:
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, *, problems: list[str]) -> Any:
    """The single YAML document in ``text`` (None when empty), or _BROKEN.

    Syntax errors name the line and column where parsing broke and, when the
    parser knows it, the line where the unclosed construct began (an
    unclosed quote or bracket is usually fixed there).
    """
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        where, what = yaml_error_parts(exc)
        problems.append(f"{where}: invalid YAML: {what}" if where else f"invalid YAML: {what}")
        return _BROKEN
    finally:
        loader.dispose()
    problems.extend(loader.duplicates)
    return data


# --------------------------------------------------------------------------
# Reading and checking


_MISSING = object()


def _normalise(key: object) -> str:
    """`selfHeal`, `self_heal`, `self-heal`, `selfheal` all compare equal."""
    return re.sub(r"[-_]", "", str(key)).lower()


def _type_name(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "a date"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _show(value: object) -> str:
    """A scalar as the user would recognise it in the file, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, (int, float, datetime.date)):
        text = str(value)
    else:
        return _type_name(value)
    return text if len(text) <= 80 else text[:77] + '..."'


class _Fields:
    """Reads one mapping of the file, recording problems instead of raising.

    Each getter returns the value or ``default`` (also after a problem), so
    checking goes on and every problem is reported. ``at`` is the mapping's
    location (`apps[1] (web)`, `apps[1] (web).helm`); `finish` reports the
    keys nobody asked for.
    """

    def __init__(self, data: Mapping, *, at: str, problems: list[str], known: tuple[str, ...],
                 secret_hint: str) -> None:
        self.data = data
        self.at = at
        self.problems = problems
        self.known = known
        self.secret_hint = secret_hint

    def where(self, key: str) -> str:
        return f"{self.at}.{key}" if self.at else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, *, required: bool = False) -> Any:
        """The value, or _MISSING (reported when required, or when null)."""
        if key not in self.data:
            if required:
                self.problem(key, "missing")
            return _MISSING
        value = self.data[key]
        if value is None:
            self.problem(key, "is empty; give a value or remove the key")
            return _MISSING
        return value

    def string(self, key: str, *, default: Any = None, required: bool = False,
               check: Callable[[str], object] | None = None) -> Any:
        """A non-empty string. Numbers, booleans and dates are refused with a
        hint to quote them: YAML reads `ref: 1234567` as a number and
        `ref: 2024-01-01` as a date, which is never what was meant."""
        value = self.raw(key, required=required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            if isinstance(value, (bool, int, float, datetime.date)):
                # No reconstructed "quote it: ..." value: YAML may have changed
                # the text already (`0123456` is octal, `1.10` is 1.1).
                self.problem(key, f"YAML reads {_show(value)} as {_type_name(value)}, not a string; quote it")
            else:
                self.problem(key, f"must be a string, not {_type_name(value)}")
            return default
        if not value.strip():
            self.problem(key, "is empty; give a value or remove the key")
            return default
        message = _problem_of(check, value)
        if message:
            self.problem(key, message)
            return default
        return value

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"{_show(value)} is not a boolean (use true or false)")
            return default
        return value

    def duration(self, key: str, *, default: float, minimum: float, minimum_why: str) -> float:
        value = self.raw(key)
        if value is _MISSING:
            return default
        try:
            return check_duration(value, minimum=minimum, why=minimum_why)
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def number(self, key: str, *, default: float, check: Callable[[float], float]) -> float:
        """A YAML number (a quoted "0.5" is a string, refused like elsewhere), then ``check``."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problem(key, f"{_show(value)} is not a number")
            return default
        try:
            return check(float(value))
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def strings(self, key: str, *, check: Callable[[str], object] | None = None) -> tuple[str, ...] | None:
        """A list of non-empty strings (None when absent or unusable)."""
        value = self.raw(key)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self.problem(key, f"must be a list, not {_type_name(value)}")
            return None
        out: list[str] = []
        ok = True
        for i, item in enumerate(value):
            item_at = f"{key}[{i}]"
            if not isinstance(item, str) or not item.strip():
                hint = "; quote it" if isinstance(item, (bool, int, float, datetime.date)) else ""
                self.problem(item_at, f"{_show(item)} is not a non-empty string{hint}")
                ok = False
                continue
            message = _problem_of(check, item)
            if message:
                self.problem(item_at, message)
                ok = False
            out.append(item)
        return tuple(out) if ok else None

    def mapping(self, key: str, *, null_is_empty: bool = False) -> Mapping | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if value is None and null_is_empty:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, not {_type_name(value)}")
            return None
        return value

    def finish(self) -> None:
        """Report keys that are not fields: inline secrets with the reference
        to use instead, anything else with the closest known name."""
        by_normal = {_normalise(k): k for k in self.known}
        for key in self.data:
            if key in self.known:
                continue
            name = str(key)
            if _normalise(key) in _INLINE_SECRET_KEYS:
                self.problem(name, f"inline secrets are refused (this file is no secret store); {self.secret_hint}")
                continue
            guess = by_normal.get(_normalise(key))
            if guess is None:
                close = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
                guess = close[0] if close else None
            hint = f"; did you mean {guess}?" if guess else f"; known fields: {', '.join(self.known)}"
            self.problem(name, f"unknown field{hint}")


def _problem_of(check: Callable[[str], object] | None, value: str) -> str | None:
    """The message of the ValueError ``check`` raises for ``value``, or None."""
    if check is None:
        return None
    try:
        check(value)
    except ValueError as exc:
        return str(exc)
    return None


def _file_path(f: _Fields, key: str, *, base_dir: Path | None) -> Path | None:
    value = f.string(key)
    if value is None:
        return None
    path = Path(value)
    if path.is_absolute():
        return path
    if base_dir is None:
        f.problem(key, f"{_show(value)} is relative; give an absolute path")
        return None
    return base_dir / path


# -- sections

_TOP_FIELDS = ("apps", "webhook")
_APP_FIELDS = (
    "name", "repo", "ref", "path", "namespace", "interval", "prune", "selfHeal", "render", "helm",
    "allowRemoteBases", "credentials", "allowedNamespaces", "pruneGuard", "allowPruneAll", "recreate", "suspend", "timeout",
)
_HELM_FIELDS = ("valuesFiles", "releaseName")
_CREDENTIAL_FIELDS = ("secretRef", "tokenFile", "username", "usernameFile", "sshKeyFile", "knownHostsFile")
_FILE_CREDENTIAL_FIELDS = _CREDENTIAL_FIELDS[1:]
_SECRET_REF_FIELDS = ("name",)
_WEBHOOK_FIELDS = ("secretFile",)

_CREDENTIALS_HINT = ("put it in a Secret in gitopsd's namespace and use credentials.secretRef: {name: ...}, "
                     "or mount it and use credentials.tokenFile / sshKeyFile")
_WEBHOOK_HINT = "use webhook.secretFile, or the environment variable GITOPSD_WEBHOOK_SECRET"


def _read_config(data: Any, *, problems: list[str], base_dir: Path | None) -> Config:
    if not isinstance(data, dict):
        problems.append(f"the file must be a mapping with an 'apps:' list, not {_type_name(data)}")
        return Config()
    top = _Fields(data, at="", problems=problems, known=_TOP_FIELDS, secret_hint=_CREDENTIALS_HINT)
    apps: list[AppConfig] = []
    raw_apps = data.get("apps")
    if "apps" not in data:
        top.problem("apps", "missing; list the apps, or write `apps: []` to run none")
    elif raw_apps is None:
        top.problem("apps", "is empty; list the apps, or write `apps: []` to run none")
    elif not isinstance(raw_apps, list):
        top.problem("apps", f"must be a list of apps, not {_type_name(raw_apps)}")
    elif raw_apps:
        first_index: dict[str, int] = {}
        for i, item in enumerate(raw_apps):
            app = _read_app(item, index=i, problems=problems, base_dir=base_dir)
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name:
                if name in first_index:
                    problems.append(f"apps[{i}] ({name}).name: duplicate of apps[{first_index[name]}]; "
                                    "app names must be unique (the name is the app's inventory)")
                    continue
                first_index[name] = i
            if app is not None:
                apps.append(app)
    webhook = _read_webhook(top.mapping("webhook", null_is_empty=True), problems=problems, base_dir=base_dir)
    top.finish()
    return Config(apps=tuple(apps), webhook=webhook)


def _read_app(item: Any, *, index: int, problems: list[str], base_dir: Path | None) -> AppConfig | None:
    """One entry of `apps`, or None when it has any problem (all recorded)."""
    if not isinstance(item, dict):
        problems.append(f"apps[{index}]: must be a mapping with at least name and repo, not {_type_name(item)}")
        return None
    before = len(problems)
    raw_name = item.get("name")
    label = f"apps[{index}]"
    if isinstance(raw_name, str) and raw_name.strip():
        label += f" ({raw_name if len(raw_name) <= 60 else raw_name[:57] + '...'})"
    f = _Fields(item, at=label, problems=problems, known=_APP_FIELDS, secret_hint=_CREDENTIALS_HINT)

    name = f.string("name", required=True, check=check_app_name)
    repo = f.string("repo", required=True, check=check_repo_url)
    ref = f.string("ref", default="main", check=check_ref)
    path = f.string("path", default=".", check=check_repo_path)
    namespace = f.string("namespace", default="default", check=check_namespace)
    interval = f.duration("interval", default=60.0, minimum=MIN_INTERVAL, minimum_why=INTERVAL_WHY)
    prune = f.boolean("prune", default=True)
    self_heal = f.boolean("selfHeal", default=True)
    render = f.string("render", default="auto")
    if render not in RENDER_KINDS:
        f.problem("render", f"{_show(render)} is not one of {', '.join(RENDER_KINDS)}")
        render = "auto"

    helm_values: tuple[str, ...] = ()
    helm_release = None
    helm = f.mapping("helm")
    if helm is not None:
        if f.has("render") and render not in ("helm", "auto"):
            f.problem("helm", f"only used with render helm or auto, and render is {render}")
        h = _Fields(helm, at=f.where("helm"), problems=problems, known=_HELM_FIELDS, secret_hint=_CREDENTIALS_HINT)
        helm_values = h.strings("valuesFiles", check=lambda v: check_repo_path(v, what="values file")) or ()
        helm_release = h.string("releaseName", check=lambda v: _check_dns_subdomain(
            v, max_len=_MAX_HELM_RELEASE, what="Helm release name"))
        h.finish()

    # kustomize only (other renderers have no remote bases): off, a URL in a
    # kustomization is refused, since it is read at render time, from outside the reviewed commit.
    allow_remote_bases = f.boolean("allowRemoteBases", default=False)
    credentials = _read_credentials(f, base_dir=base_dir)

    allowed = f.strings("allowedNamespaces", check=check_namespace)
    if f.has("allowedNamespaces") and allowed is not None:
        allowed = tuple(dict.fromkeys(allowed))  # a repeated entry changes nothing
        if not allowed:
            f.problem("allowedNamespaces", "is an empty list: the app could write nowhere; remove the key to allow any")
        elif namespace not in allowed:
            how = "" if f.has("namespace") else " (the default); set namespace to one of them"
            f.problem("namespace", f"{_show(namespace)} is not in allowedNamespaces [{', '.join(allowed)}]{how}")

    prune_guard = f.number("pruneGuard", default=0.5, check=check_share)
    allow_prune_all = f.boolean("allowPruneAll", default=False)
    recreate = f.boolean("recreate", default=False)
    suspend = f.boolean("suspend", default=False)
    timeout = f.duration("timeout", default=300.0, minimum=MIN_TIMEOUT, minimum_why=TIMEOUT_WHY)
    f.finish()

    if len(problems) > before:
        return None
    return AppConfig(
        name=name, repo=repo, ref=ref, path=path, namespace=namespace, interval=interval, prune=prune,
        self_heal=self_heal, render=render, helm_values=helm_values, helm_release=helm_release,
        allow_remote_bases=allow_remote_bases, credentials=credentials, allowed_namespaces=allowed, prune_guard=prune_guard,
        allow_prune_all=allow_prune_all, recreate=recreate, suspend=suspend, timeout=timeout,
    )


def _read_credentials(app: _Fields, *, base_dir: Path | None) -> CredentialsRef | None:
    """Exactly one of: a Secret reference, or files (plus a plain username)."""
    data = app.mapping("credentials")
    if data is None:
        return None
    c = _Fields(data, at=app.where("credentials"), problems=app.problems, known=_CREDENTIAL_FIELDS,
                secret_hint=_CREDENTIALS_HINT)
    file_keys = [k for k in _FILE_CREDENTIAL_FIELDS if k in data]
    # An inline secret is reported by finish(); "nothing to authenticate
    # with" on top of it would only be noise.
    inline = any(_normalise(k) in _INLINE_SECRET_KEYS for k in data)
    secret_name = None
    ref = c.mapping("secretRef")
    if ref is not None:
        r = _Fields(ref, at=c.where("secretRef"), problems=app.problems, known=_SECRET_REF_FIELDS,
                    secret_hint=_CREDENTIALS_HINT)
        if "namespace" in ref:
            r.problem("namespace", "not allowed: the Secret is always read from gitopsd's own namespace, "
                                   "so an app cannot borrow another namespace's credentials")
            ref = {k: v for k, v in ref.items() if k != "namespace"}
            r = _Fields(ref, at=r.at, problems=app.problems, known=_SECRET_REF_FIELDS, secret_hint=_CREDENTIALS_HINT)
        secret_name = r.string("name", required=True,
                               check=lambda v: _check_dns_subdomain(v, max_len=253, what="Secret name"))
        r.finish()
        if file_keys:
            c.problem("secretRef", f"use either secretRef or files ({', '.join(file_keys)}), not both")
    elif not file_keys and not inline:
        c.problem("secretRef", "missing: name a Secret (secretRef: {name: ...}) or mounted files "
                               "(tokenFile, sshKeyFile)")

    token_file = _file_path(c, "tokenFile", base_dir=base_dir)
    username = c.string("username")
    username_file = _file_path(c, "usernameFile", base_dir=base_dir)
    ssh_key_file = _file_path(c, "sshKeyFile", base_dir=base_dir)
    known_hosts_file = _file_path(c, "knownHostsFile", base_dir=base_dir)
    if "username" in data and "usernameFile" in data:
        c.problem("usernameFile", "use either username or usernameFile, not both")
    if ref is None and file_keys and not inline and not ({"tokenFile", "sshKeyFile"} & set(file_keys)):
        c.problem("tokenFile", "missing: without tokenFile or sshKeyFile there is nothing to authenticate with")
    c.finish()
    return CredentialsRef(secret_name=secret_name, token_file=token_file, username=username,
                          username_file=username_file, ssh_key_file=ssh_key_file, known_hosts_file=known_hosts_file)


def _read_webhook(data: Mapping | None, *, problems: list[str], base_dir: Path | None) -> WebhookConfig:
    if data is None:
        return WebhookConfig()
    w = _Fields(data, at="webhook", problems=problems, known=_WEBHOOK_FIELDS, secret_hint=_WEBHOOK_HINT)
    secret_file = _file_path(w, "secretFile", base_dir=base_dir)
    w.finish()
    return WebhookConfig(secret_file=secret_file)
