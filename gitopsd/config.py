"""The daemon's config file and the app model: which apps to reconcile, and how.

One YAML file lists the apps (`gitopsd run --config FILE`); the daemon reloads
it when it changes. This module turns text into a validated, immutable
`Config` and compares two of them (`diff`); watching the file, resolving
credentials and acting on a change belong to the daemon.

One definition of an app: `AppConfig` (pydantic v2) is the config file's
schema, the JSON Schema that `gitopsd config schema` prints for editors, and
the engine's spec (`gitopsd.engine.sync.AppSpec` is this model plus what only
exists at run time: resolved credentials and the inventory namespace). The
rules of the file live in its types: a field's type says what it accepts
and why (`Interval`: a duration of at least 5s), and the same validators
check the command line's flags (gitopsd.cli), so file and flags accept the
same values with the same words.

Rules that shape the code:

- Every problem is reported at once (`ConfigError.problems`), each naming the
  app and the field as the file spells it (`apps[1] (web-production).interval:
  ...`), so one edit fixes the file. pydantic's own messages are translated
  (`_problem`) into the file's words, with the value and a hint. A broken
  file is never half-loaded: the daemon keeps running the last good config.
- Strict: YAML's surprises are refused, not coerced. `ref: 1234567` or
  `ref: 2024-01-01` (a number, a date) must be quoted; `prune: "yes"` is no
  boolean; `pruneGuard: "0.5"` is no number; `key:` with nothing after it
  is an error, not "use the default". A duplicated key (YAML keeps the last
  one silently) is an error too.
- Secrets never live in this file. Credentials are references (a Secret name,
  or paths of files mounted from one); inline `token:`/`password:` keys and
  passwords in repository URLs are refused, and no message echoes them.
- Unknown keys are errors (`extra="forbid"`) with a did-you-mean hint: a typo
  such as `selfheal` silently falling back to a default is how a production
  app ends up pruned. Python's own names (`self_heal`) are refused in the
  file too; code may construct the model with them.
- Each field's own check applies everywhere (a file, the CLI's flags, an
  `AppSpec` built in code). Rules that catch a human's slip in the file —
  rules across fields (one kind of credentials, namespace within
  allowedNamespaces, helm settings with a helm renderer) and an empty
  `key:` — apply while reading a file (`parse` passes a validation
  context); code says what it means.
- Clusters: `clusters:` names the clusters apps may go to (how to reach each:
  a kubeconfig Secret or file, never inline); `in-cluster`, gitopsd's own, is
  always there. An app names its `cluster`, its `clusters` or a
  `clusterSelector`; `Config.targets` is every (app, cluster), each an
  AppConfig naming exactly one cluster, keyed `app` or `app@cluster`
  (`AppConfig.key`). An unknown cluster, a selector that selects none, or a
  dependsOn whose app is not on the same clusters is refused at load.
- Notifications: `notifiers:` names where to tell about transitions, drift
  and rollbacks (a forge's commit status, a chat, a JSON webhook; tokens and
  secret URLs from a Secret or a file, never inline); the top-level `notify`
  lists those every app uses, an app's own `notify` adds some. A name no
  notifier has, a provider's missing token or address, an address that is
  not https (plain http only to loopback) is refused at load.
- "No apps" must be written down: `apps: []`. A missing, unreadable or empty
  file, or one whose `apps:` is absent or empty, is a ConfigError: a file
  deleted, truncated or caught half-written looks exactly like that, and
  reading it as "no apps" would stop every app.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import errno
import functools
import math
import os
import posixpath
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticKnownError

from gitopsd.engine import decrypt as decrypt_mod
from gitopsd.engine import health_exprs
from gitopsd.engine import ignore as ignore_mod
from gitopsd.engine.render import KINDS as RENDER_KINDS
from gitopsd.engine.yamlload import Bounded
from gitopsd.errors import GitopsdError, yaml_error_parts
from gitopsd.kube import ServiceAccount

if TYPE_CHECKING:
    from gitopsd.engine import signature, source, sync

#: An app name is also its ApplySet (inventory) name; kept well under the
#: 63-character label limit so derived names (parent object, labels) fit.
MAX_APP_NAME = 40
#: Polling a Git server faster than this only loads it; use the webhook instead.
MIN_INTERVAL = 5.0
INTERVAL_WHY = "polling faster only loads the Git server; use the webhook for fast pickup"
#: The apiserver's limit for a fieldManager name.
MAX_FIELD_MANAGER = 128
#: Who wrote an object before gitopsd adopted it, by whole-object writes: `kubectl apply` (client-side, and
#: `--server-side`, manager `kubectl`), `kubectl create`, `edit` and `replace`, and `before-first-apply` (the
#: apiserver's name for fields set before the object's first server-side apply). Flux's kustomize-controller
#: takes over the prefix `kubectl` (every kubectl verb); this list leaves out the single-field verbs
#: (`kubectl-rollout`: a `rollout restart` annotation taken over would be removed, restarting the pods again).
DEFAULT_TAKE_OVER_MANAGERS = ("kubectl-client-side-apply", "kubectl", "kubectl-create", "kubectl-edit",
                              "kubectl-replace", "before-first-apply")
#: A health wait shorter than this cannot see a rollout.
MIN_TIMEOUT = 1.0
TIMEOUT_WHY = "the health wait needs time to see a rollout"
#: No duration gitopsd takes needs more than ten years; a typo such as
#: `99999999h` would overflow timers and dates.
MAX_DURATION = 3650 * 86400.0
#: A fetch given less than this fails on a slow remote before git has connected.
MIN_FETCH_TIMEOUT = 1.0
FETCH_TIMEOUT_WHY = "a fetch needs time to connect to the remote"
DEFAULT_FETCH_TIMEOUT = 120.0

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
_LIST_THE_APPS = "list the apps, or write `apps: []` to run none"

# Keys that would hold a secret inline, compared after _normalise(). Refused
# wherever they appear, with a hint at the reference that replaces them.
_INLINE_SECRET_KEYS = frozenset({
    "token", "password", "passwd", "secret", "sshkey", "privatekey", "sshprivatekey", "identity", "apikey",
})
_CREDENTIALS_HINT = ("put it in a Secret in gitopsd's namespace and use credentials.secretRef: {name: ...}, "
                     "or mount it and use credentials.tokenFile / sshKeyFile")
_WEBHOOK_HINT = "use webhook.secretFile, or the environment variable GITOPSD_WEBHOOK_SECRET"


class ConfigError(GitopsdError):
    """The config file cannot be used. Carries every problem found, so one
    edit can fix them all; the daemon keeps its last good config meanwhile."""

    def __init__(self, problems: list[str], *, source: str = "<config>", hint: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: invalid config, {head}:\n{body}", hint=hint)



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


def check_service_account_name(value: str) -> str:
    """A ServiceAccount's name (a DNS subdomain), for serviceAccountName and --service-account."""
    return _check_dns_subdomain(value, max_len=253, what="ServiceAccount name")


def check_field_manager(value: str) -> str:
    """A field manager's name as metadata.managedFields records it (`kubectl-edit`), or a prefix
    ending in `*` (`kubectl-*`: every kubectl verb). A bare `*` is refused: it would take over
    the fields of every controller (the deployment controller's annotations, an HPA's replicas),
    and the next apply would remove those Git does not set."""
    if len(value) > MAX_FIELD_MANAGER or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError(f"{_show(value)} is not a field manager name (no whitespace or control characters, at most "
                         f"{MAX_FIELD_MANAGER} characters)")
    if "*" in value[:-1]:
        raise ValueError(f"{_show(value)}: '*' may only end a name (a prefix: kubectl-*)")
    if value == "*":
        raise ValueError('"*" would take over every controller\'s fields too (the deployment controller\'s, an '
                         "HPA's), and the next apply would remove those Git does not set; name the managers")
    return value


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
# Field types: what a value in the file may be
#
# Each is strict (YAML's numbers, booleans and dates are not strings, a
# quoted "0.5" is not a number) and runs the validators above, so a problem
# reads like the same bad flag. WithJsonSchema tells editors what the
# validator checks, where JSON Schema can say it (a pattern, a bound).


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give a value or remove the key")
    return value


def _text(*checks: Callable[[str], object], **schema: Any) -> Any:
    """A non-empty string, strictly, then each of ``checks`` (validators above)."""
    return Annotated[str, Strict(), AfterValidator(_non_empty), *(AfterValidator(c) for c in checks),
                     WithJsonSchema({"type": "string", "minLength": 1, **schema})]


def _absolute_path(value: object, info: ValidationInfo) -> Path:
    """A file path. A relative one is resolved against the config file's
    directory (``base_dir`` in the validation context, as kubectl does for
    kubeconfig files), and refused without one: the daemon's working
    directory is nothing to rely on."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise PydanticKnownError("string_type")
    path = Path(_non_empty(value))
    if path.is_absolute():
        return path
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None:
        raise ValueError(f"{_show(value)} is relative; give an absolute path")
    return Path(base_dir) / path


def _duration(*, minimum: float, why: str) -> Any:
    """Seconds, from `30s`, `1m`, `1h30m` or a number of seconds (`parse_duration`), at least ``minimum``."""
    text = rf"^\s*(?:{_DURATION_NUMBER.pattern}|{_DURATION_PARTS.pattern})\s*$"
    return Annotated[float, BeforeValidator(partial(check_duration, minimum=minimum, why=why)), WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": text}, {"type": "number", "minimum": minimum}]})]


def _distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeated entry changes nothing; an empty list would let the app write nowhere."""
    if not values:
        raise ValueError("is an empty list: the app could write nowhere; remove the key to allow any")
    return tuple(dict.fromkeys(values))


def _distinct_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeated app name changes nothing."""
    return tuple(dict.fromkeys(values))


def _one_rule_per_kind(rules: tuple[HealthCheckExpr, ...]) -> tuple[HealthCheckExpr, ...]:
    """Two rules for one kind would leave it to their order which one decides."""
    first: dict[tuple[str, str], int] = {}
    for i, rule in enumerate(rules):
        key = (rule.group, rule.kind)
        if key in first:
            group = rule.group or "the core group"
            raise ValueError(f"entries {first[key]} and {i} are both for {rule.kind} of {group}; give one rule per kind")
        first[key] = i
    return rules


_API_VERSION = re.compile(rf"(?:{_DNS_SUBDOMAIN.pattern}/)?{_DNS_LABEL.pattern}")
_KIND = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")


def _check_api_version(value: str) -> str:
    if not _API_VERSION.fullmatch(value):
        raise ValueError(f"{_show(value)} is not an apiVersion: use group/version (example.com/v1), or v1 for "
                         "the core group")
    return value


def _check_kind(value: str) -> str:
    if not _KIND.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a kind: a CamelCase name such as Certificate")
    return value


_LABEL = f"^{_DNS_LABEL.pattern}$"
_SUBDOMAIN = f"^{_DNS_SUBDOMAIN.pattern}$"
_RELATIVE = r"^(?!/)"

Text = _text()
AppName = _text(check_app_name, pattern=_LABEL, maxLength=MAX_APP_NAME)
Namespace = _text(check_namespace, pattern=_LABEL, maxLength=63)
RepoUrl = _text(check_repo_url)
Ref = _text(check_ref, pattern=r"^[^-\s]\S*$")
RepoPath = _text(check_repo_path, pattern=_RELATIVE)
ValuesFile = _text(partial(check_repo_path, what="values file"), pattern=_RELATIVE)
HelmRelease = _text(partial(_check_dns_subdomain, max_len=_MAX_HELM_RELEASE, what="Helm release name"),
                    pattern=_SUBDOMAIN, maxLength=_MAX_HELM_RELEASE)
SecretName = _text(partial(_check_dns_subdomain, max_len=253, what="Secret name"), pattern=_SUBDOMAIN, maxLength=253)
ServiceAccountName = _text(check_service_account_name, pattern=_SUBDOMAIN, maxLength=253)
FilePath = Annotated[Path, BeforeValidator(_absolute_path), WithJsonSchema({"type": "string", "minLength": 1})]
Interval = _duration(minimum=MIN_INTERVAL, why=INTERVAL_WHY)
Timeout = _duration(minimum=MIN_TIMEOUT, why=TIMEOUT_WHY)
FetchTimeout = _duration(minimum=MIN_FETCH_TIMEOUT, why=FETCH_TIMEOUT_WHY)
Share = Annotated[float, Strict(), AfterValidator(check_share),
                  WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": 1})]
Flag = Annotated[bool, Strict()]
Render = Literal[RENDER_KINDS]  # type: ignore[valid-type]  # auto | plain | kustomize | helm
# A list in YAML, a tuple in the model (immutable, hashable): Strict(False)
# lets the list in; the items stay strict.
AllowedNamespaces = Annotated[tuple[Namespace, ...], Strict(False), AfterValidator(_distinct),
                              Field(json_schema_extra={"minItems": 1})]
ValuesFiles = Annotated[tuple[ValuesFile, ...], Strict(False)]
DependsOn = Annotated[tuple[AppName, ...], Strict(False), AfterValidator(_distinct_names)]
ApiVersion = _text(_check_api_version, pattern=f"^{_API_VERSION.pattern}$")
Kind = _text(_check_kind, pattern=f"^{_KIND.pattern}$")
CelExpr = _text(health_exprs.check, maxLength=health_exprs.MAX_CHARS)
FieldManager = _text(check_field_manager, maxLength=MAX_FIELD_MANAGER, pattern=r"^[^\s*]+\*?$")
# A repeated name changes nothing; an empty list turns the takeover off.
FieldManagers = Annotated[tuple[FieldManager, ...], Strict(False), AfterValidator(lambda v: tuple(dict.fromkeys(v)))]


def _check_glob(value: str) -> str:
    """A name or a glob (`*`, `?`, `[abc]`) matched against a group, kind, name or namespace."""
    if any(c.isspace() for c in value):
        raise ValueError(f"{_show(value)} is not a name or glob (it contains whitespace)")
    return value


Glob = _text(_check_glob)
#: An API group: "" is the core group (Pods, ConfigMaps), so an empty text is a value here.
GroupGlob = Annotated[str, Strict(), AfterValidator(_check_glob), WithJsonSchema({"type": "string"})]
JsonPointer = _text(ignore_mod.check_pointer, pattern="^/")
FieldPath = _text(ignore_mod.check_field_path)
#: A field manager as managedFields names it (kube-controller-manager, kubectl-edit, ...).
Manager = _text()
JsonPointers = Annotated[tuple[JsonPointer, ...], Strict(False)]
FieldPaths = Annotated[tuple[FieldPath, ...], Strict(False)]
Managers = Annotated[tuple[Manager, ...], Strict(False), AfterValidator(lambda names: tuple(dict.fromkeys(names)))]

_DEFAULT_NAMESPACE = "default"


# --------------------------------------------------------------------------
# The model
#
# Frozen pydantic dataclasses: hashable and comparable (`diff` compares
# apps), `dataclasses.replace` works, and the same class validates a file
# (by its camelCase keys) and a constructor call (by Python names).

#: The pydantic settings of every class of the model (gitopsd.engine.sync.AppSpec too).
MODEL_CONFIG = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True, validate_by_alias=True,
                          use_attribute_docstrings=True)


def _in_file(info: ValidationInfo) -> bool:
    """True while reading the file (`parse` passes a context); False for a constructor call."""
    return info.context is not None and "file" in info.context


def _refuse(model: str, problems: list[tuple[tuple[str | int, ...], str]], *, kind: str = "rule") -> None:
    """Raise rules broken across fields, all at once, each at its field (as the file spells it)."""
    raise ValidationError.from_exception_data(model, [
        InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=None)
        for loc, message in problems])


@dataclass(frozen=True, config=MODEL_CONFIG)
class _Section:
    """What every mapping of the file shares: how an empty value and an unknown key read."""

    #: What the mapping must be, for "must be ..., not a string".
    _what = "a mapping"
    #: Where a secret written inline belongs instead.
    _secret_hint = _CREDENTIALS_HINT
    #: Keys refused with a reason of their own instead of "unknown field".
    _refused = {}  # (not annotated: class attributes, not fields)
    #: Fields for which `key:` with nothing after it means the default.
    _null_is_default = ()

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_null(cls, value: Any, info: ValidationInfo) -> Any:
        """In the file, `key:` with nothing after it is a mistake (a value
        deleted, a line cut short), not "use the default". A constructor may
        pass None for an optional field."""
        if value is None and _in_file(info):
            if info.field_name in cls._null_is_default:
                return cls.__pydantic_fields__[info.field_name].default
            raise PydanticCustomError("null", "is empty; give a value or remove the key")
        return value


class _CrossChecked(_Section):
    """A section with rules across its fields (`problems`: (field, message) pairs). The file's rules
    catch a human's slip in the file, each named; a section built in code (tests, the CLI) says what
    it means, and is not checked here."""

    @model_validator(mode="after")
    def _cross_checked(self, info: ValidationInfo):
        if _in_file(info):
            if problems := self.problems():
                _refuse(type(self).__name__, problems)
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        return []


class _SecretOrFile(_CrossChecked):
    """Where something is read from: a Secret (`secretRef`) or a mounted file (`file`), exactly one of them
    (git credentials have more kinds: CredentialsRef). `_missing` says what to name when neither is given."""

    _missing = "missing: name a Secret (secretRef: {name: ...}) or a mounted file (file: PATH)"

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        if self.secret_ref is not None and self.file is not None:
            return [(("secretRef",), "use either secretRef or file, not both")]
        if self.secret_ref is None and self.file is None:
            return [(("secretRef",), self._missing)]
        return []


@dataclass(frozen=True, config=MODEL_CONFIG)
class SecretRef(_Section):
    """A Secret in gitopsd's own namespace with keys `token` (and `username`), or `identity` and `known_hosts`."""

    _refused = {"namespace": "not allowed: the Secret is always read from gitopsd's own namespace, "
                             "so an app cannot borrow another namespace's credentials"}

    name: SecretName
    """The Secret's name (in gitopsd's namespace)."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class CredentialsRef(_CrossChecked):
    """Where the app's Git credentials are, never the credentials themselves:
    a Secret (`secretRef`: keys token, username, identity, known_hosts, ca.crt), or
    files mounted from one (`tokenFile` or `sshKeyFile`, with `username` or
    `usernameFile`, `knownHostsFile`, `caFile`), not both. Relative file paths
    are relative to the config file."""

    secret_ref: SecretRef | None = None
    """A Secret in gitopsd's namespace: `{name: fleet-git}`."""
    token_file: FilePath | None = None
    """File holding an https token (or password)."""
    username: Text | None = None
    """The https username paired with the token (default: x-access-token)."""
    username_file: FilePath | None = None
    """File holding the https username."""
    ssh_key_file: FilePath | None = None
    """File holding an SSH private key, for ssh:// and scp-style remotes."""
    known_hosts_file: FilePath | None = None
    """known_hosts file with the remote's host key (host keys are always checked)."""
    ca_file: FilePath | None = None
    """PEM file of the CA(s) an https remote's certificate must chain to, in place of the system's (a server
    with a private CA); in a Secret, key ca.crt. A public repository on such a server needs only this."""

    @property
    def secret_name(self) -> str | None:
        return self.secret_ref.name if self.secret_ref else None

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Exactly one kind of reference: a Secret, or files (plus a plain username)."""
        others = [to_camel(f.name) for f in dataclasses.fields(self)
                  if f.name != "secret_ref" and getattr(self, f.name) is not None]
        found = []
        if self.secret_ref and others:
            found.append((("secretRef",), f"use either secretRef or files ({', '.join(others)}), not both"))
        elif not self.secret_ref and not others:
            found.append((("secretRef",), "missing: name a Secret (secretRef: {name: ...}) or mounted files "
                                          "(tokenFile, sshKeyFile)"))
        if self.username is not None and self.username_file is not None:
            found.append((("usernameFile",), "use either username or usernameFile, not both"))
        if not self.secret_ref and others and not (self.token_file or self.ssh_key_file or self.ca_file):
            found.append((("tokenFile",), "missing: without tokenFile, sshKeyFile or caFile there is nothing to "
                                          "authenticate with"))
        return found


@dataclass(frozen=True, config=MODEL_CONFIG)
class KeysFrom(_SecretOrFile):
    """Where an app's keys are, never the keys themselves: a Secret in gitopsd's namespace
    (`secretRef`), or a file or directory mounted from one (`file`), not both."""

    _what = "a mapping with secretRef or file"

    secret_ref: SecretRef | None = None
    """A Secret in gitopsd's namespace: `{name: sops-age}`; its entries ending in .agekey are read."""
    file: FilePath | None = None
    """A file of age identities, or a directory (a mounted Secret) whose files ending in .agekey are read."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class Decryption(_Section):
    """SOPS-encrypted files in the app's path, decrypted at render time with the age keys of `keysFrom`
    (gitopsd.engine.decrypt)."""

    _what = "a mapping such as {provider: sops, keysFrom: {secretRef: {name: sops-age}}}"

    keys_from: KeysFrom
    """Where the age identities (AGE-SECRET-KEY-1...) are."""
    provider: Literal[decrypt_mod.PROVIDERS] = "sops"  # type: ignore[valid-type]
    """sops, the only one."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class Helm(_Section):
    """Helm settings, for `render: helm` (or `auto` finding a Chart.yaml)."""

    values_files: ValuesFiles = ()
    """Values files relative to the repository root, in order (a later one wins)."""
    release_name: HelmRelease | None = None
    """The release name (default: the app's name)."""
    allow_remote_dependencies: Flag = False
    """Let `helm dependency build` fetch the chart's dependencies that are not vendored under charts/
    from their repositories (https://, oci://) at render time, from outside the reviewed commit. Off:
    such a chart fails naming the dependency. file:// dependencies inside the repository are always
    built, offline (gitopsd.engine.helm_deps)."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class Rollback(_Section):
    """What gitopsd does when a revision ends Unhealthy (gitopsd.daemon.release)."""

    on_unhealthy: Flag = False
    """Re-apply the last revision recorded Applied and Healthy, and quarantine the bad commit until a newer one changes the app."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class TrustedKeysSecretRef(_Section):
    """A Secret whose entries are public keys (public: no secret is read from it)."""

    name: SecretName
    """The Secret's name."""
    namespace: Namespace | None = None
    """Its namespace (default: gitopsd's own; gitopsd must be allowed to read Secrets there)."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class TrustedKeysFrom(_SecretOrFile):
    """Where the trusted public keys are: a Secret (`secretRef`) or a file or directory (`file`), not both.
    Each Secret entry or file holds ssh public keys (one a line) or ASCII-armored OpenPGP public keys."""

    _what = "a mapping such as {secretRef: {name: team-keys}} or {file: /etc/gitopsd/keys}"
    _missing = ("missing: name a Secret of public keys (secretRef: {name: ...}) or a file or directory of them "
                "(file: /path)")

    secret_ref: TrustedKeysSecretRef | None = None
    """A Secret whose entries are public keys: `{name: team-keys}` (read at every reconcile: a key added is used
    at the next one, a key removed no longer trusted)."""
    file: FilePath | None = None
    """A file of public keys, or a directory of such files (a mounted Secret or ConfigMap; dotfiles are
    skipped); relative paths are relative to the config file."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class Verify(_Section):
    """Commit signature verification (gitopsd.engine.signature): the fetched commit must carry a valid
    signature by one of the trusted keys, or nothing of it is rendered, applied or pruned."""

    _what = "a mapping such as {provider: ssh, keysFrom: {secretRef: {name: team-keys}}}"

    provider: Literal["ssh", "openpgp"]
    """ssh (commits signed with gpg.format ssh, checked by ssh-keygen -Y verify against the keys as allowed
    signers) or openpgp (checked by gpg against exactly these keys)."""
    keys_from: TrustedKeysFrom
    """Where the trusted public keys are: {secretRef: {name: ...}} or {file: PATH}."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class IgnoreDifference(_Section):
    """Drift to allow on some objects (Argo CD's ignoreDifferences): their fields named by
    jsonPointers or fields, and those owned by managedFieldsManagers, are left to whoever changes
    them — neither drift nor reverted once another field manager owns them; until then they
    follow Git (gitopsd.engine.ignore says why).

    Objects are matched by group, kind, name and namespace, each a glob (`*`, `?`, `[abc]`);
    an absent key matches any. In paths, `*` matches any key or list item.
    """

    _what = "a mapping such as {kind: Deployment, name: web, jsonPointers: [/spec/replicas]}"
    _refused = {"jqPathExpressions": "not supported (gitopsd has no jq); name the fields with jsonPointers "
                                     "(/spec/template/spec/containers/*/image) or fields "
                                     "(spec.template.spec.containers[*].image)"}

    group: GroupGlob | None = None
    """API group of the objects ("" is the core group: ConfigMaps, Services); absent: any."""
    kind: Glob | None = None
    """Kind of the objects (Deployment, *Webhook*); absent: any."""
    name: Glob | None = None
    """Name of the objects (web, web-*); absent: any."""
    namespace: Glob | None = None
    """Namespace of the objects; absent: any."""
    json_pointers: JsonPointers = ()
    """Fields as JSON pointers (RFC 6901): /spec/replicas, /metadata/annotations/example.com~1injected."""
    fields: FieldPaths = ()
    """Fields as drift reports print them: spec.replicas, spec.template.spec.containers[0].image."""
    managed_fields_managers: Managers = ()
    """Field managers whose fields of these objects are theirs (as managedFields names them: kubectl-edit, my-operator)."""

    @model_validator(mode="after")
    def _names_something(self) -> IgnoreDifference:
        if not (self.json_pointers or self.fields or self.managed_fields_managers):
            _refuse(type(self).__name__, [(("jsonPointers",), "missing: the rule ignores nothing; name fields "
                                           "(jsonPointers or fields) or managers (managedFieldsManagers)")])
        return self

    def compiled(self) -> ignore_mod.Rule:
        return ignore_mod.Rule(group=self.group, kind=self.kind, name=self.name, namespace=self.namespace,
                               pointers=self.json_pointers, fields=self.fields,
                               managers=frozenset(self.managed_fields_managers))


IgnoreDifferences = Annotated[tuple[IgnoreDifference, ...], Strict(False)]


@functools.lru_cache(maxsize=4096)
def _compile_ignore(rules: tuple[IgnoreDifference, ...], managers: tuple[str, ...]) -> ignore_mod.Ignore:
    """An app's ignore settings compiled once (each watch event of its objects reads them)."""
    return ignore_mod.Ignore(rules=tuple(r.compiled() for r in rules), managers=frozenset(managers))


@dataclass(frozen=True, config=MODEL_CONFIG)
class HealthCheckExpr(_Section):
    """How to read the health of one kind, in CEL, as Flux's healthCheckExprs: the first of inProgress, failed,
    current that is true decides (none: in progress). The variables are the object's top-level fields
    (`status.phase == 'Ready'`, `metadata.generation`).

    Semantics and cost: gitopsd.engine.health_exprs. Each expression is
    compiled when the file is read (a syntax error is a config error) and
    never again.
    """

    _what = "a mapping with apiVersion, kind and current"

    api_version: ApiVersion
    """The kind's group and version, `example.com/v1`; the rule holds for the kind in every version of the group."""
    kind: Kind
    """The kind, `Certificate`."""
    current: CelExpr
    """CEL: true once the object has reached its desired state (healthy)."""
    in_progress: CelExpr | None = None
    """CEL: true while it is still on its way (evaluated first)."""
    failed: CelExpr | None = None
    """CEL: true when it has failed: the sync is Unhealthy at once, not at the timeout."""

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


HealthCheckExprs = Annotated[tuple[HealthCheckExpr, ...], Strict(False), AfterValidator(_one_rule_per_kind)]


#: The cluster gitopsd itself runs in (or its --kubeconfig names): every app's target unless it names another.
IN_CLUSTER = "in-cluster"
#: Secret data keys (and label values): letters, digits, '-', '_', '.'.
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def target_key(app: str, cluster: str) -> str:
    """A target's name: `app` on gitopsd's own cluster (as before clusters existed), `app@cluster` elsewhere."""
    return app if cluster == IN_CLUSTER else f"{app}@{cluster}"


def split_target(key: str) -> tuple[str, str]:
    """(app, cluster) of a target's name."""
    app, _, cluster = key.partition("@")
    return app, cluster or IN_CLUSTER


def check_cluster_name(value: str) -> str:
    """A cluster's name in the config: also part of its targets' names (`app@cluster`) and a metric label."""
    return _check_dns_label(value, max_len=MAX_CLUSTER_NAME, what="cluster name")


def _check_data_key(value: str) -> str:
    if len(value) > 253 or not _DATA_KEY.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a Secret data key (letters, digits, '-', '_' and '.')")
    return value


def _check_label_key(value: str) -> str:
    prefix, _, name = value.rpartition("/")
    if (prefix and _check_dns_subdomain(prefix, max_len=253, what="label prefix") is None) or \
            len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"{_show(value)} is not a label key ([prefix/]name, name at most 63 characters of "
                         "letters, digits, '-', '_' and '.')")
    return value


def _check_label_value(value: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a label value (at most 63 letters, digits, '-', '_' and '.')")
    return value


MAX_CLUSTER_NAME = 40
ClusterName = _text(check_cluster_name, pattern=_LABEL, maxLength=MAX_CLUSTER_NAME)
DataKey = _text(_check_data_key, pattern=r"^[-._a-zA-Z0-9]+$")
LabelKey = _text(_check_label_key)
LabelValue = Annotated[str, Strict(), AfterValidator(_check_label_value)]
Labels = Annotated[dict[LabelKey, LabelValue], Strict(False)]


@dataclass(frozen=True, config=MODEL_CONFIG)
class KubeconfigSecretRef(_Section):
    """A Secret in gitopsd's own namespace holding a kubeconfig."""

    _refused = {"namespace": "not allowed: the Secret is always read from gitopsd's own namespace, "
                             "so a config cannot borrow another namespace's credentials"}

    name: SecretName
    """The Secret's name (in gitopsd's namespace)."""
    key: DataKey = "value"
    """The data key holding the kubeconfig (default `value`, as Flux's kubeConfig.secretRef)."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class KubeconfigFrom(_SecretOrFile):
    """Where a cluster's kubeconfig is: a Secret in gitopsd's namespace or a mounted file, never inline."""

    _what = "a mapping such as {secretRef: {name: eu-1-kubeconfig}} or {file: /etc/gitopsd/eu-1.kubeconfig}"

    secret_ref: KubeconfigSecretRef | None = None
    """A Secret in gitopsd's namespace: `{name: eu-1-kubeconfig}` (key `value`, or `key:`). Watched: a new
    kubeconfig (a rotated client certificate or token) is used from the next request, without a restart."""
    file: FilePath | None = None
    """A kubeconfig file (mounted from a Secret); read again when it changes."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class ClusterConfig(_Section):
    """How to reach one cluster apps are deployed to, and labels to select it by."""

    _what = "a mapping such as {kubeconfig: {secretRef: {name: eu-1-kubeconfig}}, labels: {env: prod}}"

    kubeconfig: KubeconfigFrom | None = None
    """Where its kubeconfig is: {secretRef: {name: ...}} or {file: PATH}. Not for in-cluster (gitopsd's own
    connection). The kubeconfig must be self-contained (certificates inline as *-data, a token): file
    references and exec or auth-provider plugins are refused."""
    context: Text | None = None
    """The kubeconfig's context to use (default: its current-context)."""
    labels: Labels = dataclasses.field(default_factory=dict)
    """Labels for apps' clusterSelector: {env: prod, region: eu}."""

    def __hash__(self) -> int:   # labels is a dict: hash what identifies the connection
        return hash((self.kubeconfig, self.context, tuple(sorted(self.labels.items()))))


@dataclass(frozen=True, config=MODEL_CONFIG)
class ClusterSelector(_Section):
    """Clusters by their labels (all must match), like a Kubernetes label selector's matchLabels."""

    _what = "a mapping such as {matchLabels: {env: prod}}"

    match_labels: Labels
    """Labels a cluster must all have: {env: prod}. {} selects every cluster, in-cluster too."""

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.match_labels.items())))

    def selects(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


# --------------------------------------------------------------------------
# Notifications (gitopsd.notify): named notifiers, used by every app (`notify:`
# at the top) or by some (an app's `notify:`), as Flux's Providers and Alerts.

#: Where a notifier sends to: a commit status on a forge, a chat's incoming webhook, or any JSON receiver.
NOTIFY_PROVIDERS = ("github", "gitlab", "gitea", "slack", "webhook")
#: Forges that keep a commit status per (commit, context); Forgejo speaks Gitea's API.
COMMIT_STATUS_PROVIDERS = ("github", "gitlab", "gitea")
#: What a notifier may be told of: transitions (a commit applied, failed, rolled back, held), drift
#: (a hand edit found) and release control (hold, resume, rollback: requests and their transitions).
NOTIFY_EVENTS = ("transition", "drift", "release")
_NOTIFY_SECRET_HINT = ("put it in a Secret in gitopsd's namespace and use tokenFrom / addressFrom / signingKeyFrom: "
                       "{secretRef: {name: ..., key: ...}}, or a mounted file: {file: PATH}")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_notify_url(value: str) -> str:
    """A notifier's address: https, or plain http to this machine only (a receiver in a test or a
    sidecar): a token or a signed body must not cross a network in clear. No user:password in it
    (a secret in the file); a URL that is itself a secret (a Slack webhook's) goes in a Secret."""
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname
        parts.port   # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f"{_show(value)} is not an http(s) URL such as https://hooks.example.com/gitopsd")
    if parts.password is not None:
        raise ValueError(f"the URL for {parts.scheme}://{parts.netloc.rpartition('@')[2]} carries a password; "
                         f"inline secrets are refused: {_NOTIFY_SECRET_HINT}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ValueError(f"{_show(value)}: plain http only to this machine (127.0.0.1, localhost): the token or "
                         "signature would cross the network in clear; use https")
    return value


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _some_events(values: tuple[str, ...]) -> tuple[str, ...]:
    """An empty list would tell nothing: removing the notifier from `notify` says that."""
    if not values:
        raise ValueError("is an empty list: the notifier would tell nothing; remove it from notify instead")
    return tuple(dict.fromkeys(values))


NotifierName = _text(partial(_check_dns_label, max_len=63, what="notifier name"), pattern=_LABEL, maxLength=63)
NotifyUrl = _text(check_notify_url, pattern="^https?://")
NotifierNames = Annotated[tuple[NotifierName, ...], Strict(False), AfterValidator(lambda v: tuple(dict.fromkeys(v)))]


@dataclass(frozen=True, config=MODEL_CONFIG)
class NotifySecretRef(_Section):
    """One entry of a Secret in gitopsd's own namespace."""

    _refused = {"namespace": "not allowed: the Secret is always read from gitopsd's own namespace, "
                             "so a config cannot borrow another namespace's tokens"}

    name: SecretName
    """The Secret's name (in gitopsd's namespace)."""
    key: DataKey | None = None
    """The data key holding the value (default: `token` for tokenFrom, `address` for addressFrom, as Flux's
    Provider Secrets, and `signingKey` for signingKeyFrom)."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class ValueFrom(_SecretOrFile):
    """Where a notifier's secret value is: a Secret entry (`secretRef`) or a mounted file (`file`), not both.
    Read at each delivery (a rotated token is used from the next one) and never logged."""

    _what = "a mapping such as {secretRef: {name: github-token, key: token}} or {file: /etc/gitopsd/token}"
    _secret_hint = _NOTIFY_SECRET_HINT

    secret_ref: NotifySecretRef | None = None
    """A Secret entry in gitopsd's namespace: `{name: github-token, key: token}`."""
    file: FilePath | None = None
    """A file holding the value (mounted from a Secret); surrounding whitespace is dropped."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class NotifierConfig(_CrossChecked):
    """One place gitopsd tells about what happens to the apps (gitopsd.notify), as Flux's Provider.

    github, gitlab, gitea (Forgejo too): a commit status per app on the commit being deployed
    (pending, then success or failure), with the token of `tokenFrom`. slack: a message to an
    incoming webhook (Mattermost and Rocket.Chat accept the same), whose URL is a secret
    (`addressFrom`). webhook: a JSON body per event to `address` (or `addressFrom`), signed with
    HMAC-SHA256 when `signingKeyFrom` is given.
    """

    _what = "a mapping such as {provider: github, tokenFrom: {secretRef: {name: github-token}}}"
    _secret_hint = _NOTIFY_SECRET_HINT
    _refused = {"url": "use address (addressFrom for a URL that is itself a secret, such as a Slack webhook's)",
                "channel": "not used: an incoming webhook posts to the channel it was made for"}

    provider: Literal[NOTIFY_PROVIDERS]  # type: ignore[valid-type]
    """github, gitlab, gitea (also for Forgejo), slack (or Mattermost, Rocket.Chat) or webhook (generic JSON)."""
    address: NotifyUrl | None = None
    """Where to send: the API (github: https://api.github.com, the default, or https://HOST/api/v3 for GitHub
    Enterprise), the instance (gitlab: https://gitlab.com, the default; gitea: required, https://gitea.example.com)
    or the receiver (webhook). https, or http to 127.0.0.1 only."""
    address_from: ValueFrom | None = None
    """The address as a secret (slack: the incoming webhook's URL; webhook: a URL carrying a token), key `address`."""
    token_from: ValueFrom | None = None
    """The forge's access token (github, gitlab, gitea), key `token`: it needs the right to set commit statuses."""
    signing_key_from: ValueFrom | None = None
    """webhook: the key that signs each body, HMAC-SHA256 in X-Gitopsd-Signature-256 (`sha256=<hex>`, as
    GitHub's X-Hub-Signature-256), key `signingKey`."""
    repository: Text | None = None
    """The forge's repository of the apps' commits: owner/name (github, gitea) or the project's path or numeric id
    (gitlab); absent: read from each app's repo URL."""
    ca_from: ValueFrom | None = None
    """The CA(s) the receiver's certificate must chain to, in place of the system's (a forge or chat server
    a company CA signed): PEM, key `ca.crt`. Public: read at each delivery, never redacted."""
    events: Annotated[tuple[Literal[NOTIFY_EVENTS], ...], Strict(False),  # type: ignore[valid-type]
                      AfterValidator(_some_events), Field(json_schema_extra={"minItems": 1})] | None = None
    """What to tell: transition, drift, release (hold, resume, rollback). Default: all for slack and webhook,
    [transition] for a commit status (the only kind a commit status can show)."""

    @property
    def commit_status(self) -> bool:
        return self.provider in COMMIT_STATUS_PROVIDERS

    @property
    def event_kinds(self) -> tuple[str, ...]:
        if self.events is not None:
            return self.events
        return ("transition",) if self.commit_status else NOTIFY_EVENTS

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """What each provider needs and what it cannot use, each at its key."""
        found: list[tuple[tuple[str, ...], str]] = []
        unused = {"signingKeyFrom": self.signing_key_from is not None and self.provider != "webhook",
                  "tokenFrom": self.token_from is not None and not self.commit_status,
                  "repository": self.repository is not None and not self.commit_status,
                  "addressFrom": self.address_from is not None and self.commit_status}
        found += [((key,), f"not used by provider {self.provider}") for key, bad in unused.items() if bad]
        if self.commit_status and self.token_from is None:
            found.append((("tokenFrom",), f"missing: {self.provider} takes commit statuses only with a token "
                                          "({secretRef: {name: ..., key: token}})"))
        if self.provider == "gitea" and self.address is None:
            found.append((("address",), "missing: the Gitea/Forgejo instance, https://gitea.example.com"))
        if self.provider == "slack" and self.address is not None:
            found.append((("address",), "a Slack webhook URL is a secret (whoever has it can post): put it in a "
                                        "Secret and use addressFrom: {secretRef: {name: ..., key: address}}"))
        if self.provider in ("slack", "webhook") and self.address is None and self.address_from is None:
            found.append((("addressFrom",), "missing: where to send ({secretRef: {name: ..., key: address}})"
                          + (" or address: https://..." if self.provider == "webhook" else "")))
        if self.provider == "webhook" and self.address is not None and self.address_from is not None:
            found.append((("addressFrom",), "use either address or addressFrom, not both"))
        if self.commit_status and self.events is not None and (other := [e for e in self.events if e != "transition"]):
            found.append((("events",), f"a commit status shows transitions only, not {', '.join(other)}; send "
                                       "those to a slack or webhook notifier"))
        return found


@dataclass(frozen=True, config=MODEL_CONFIG)
class AppConfig(_CrossChecked):
    """One app: a path in a Git repository, kept applied to the cluster as one ApplySet.

    The same model is the engine's spec (gitopsd.engine.sync.AppSpec adds the
    resolved credentials and the inventory namespace); settings only the
    daemon uses (``interval``, ``self_heal``, ``suspend``) ride along there
    unused. Durations are seconds.
    """

    _what = "a mapping with at least name and repo"

    name: AppName
    """The app's name, also its ApplySet (inventory) name: lower-case letters, digits and '-', at most 40."""
    repo: RepoUrl
    """Git URL (https://, ssh://, file://, git@host:path) or a local path; never with a password in it."""
    ref: Ref = "main"
    """Branch, tag or commit SHA (all 40 hex digits; quote a SHA of digits only)."""
    path: RepoPath = "."
    """Directory inside the repository to render."""
    namespace: Namespace = _DEFAULT_NAMESPACE
    """Namespace for namespaced objects that name none."""
    create_namespace: Flag = False
    """Create `namespace` if it is missing, before the apply (Argo CD's CreateNamespace=true): labelled
    gitopsd.io/created-by=<app>, no ApplySet member, so never pruned unless a Namespace object for it is
    in Git. Only the app's namespace: another namespace an object names must be in Git. Without it a
    missing namespace fails the app, naming this option.

    Needs `create` on namespaces (deploy/cluster-wide.yaml grants it; the namespaced install does not:
    there the installer creates them). A dry run (`gitopsd diff`, `sync --dry-run`) creates nothing: it
    reports the namespace as to be created, and the objects in it as creates the apiserver could not
    validate yet (as for a Namespace that arrives in the same commit)."""
    interval: Interval = 60.0
    """How often to poll the repository: 30s, 1m, 1h30m, or seconds (at least 5s; the webhook picks up pushes at once)."""
    prune: Flag = True
    """Delete objects that left Git (only objects this app applied)."""
    self_heal: Flag = True
    """Revert hand edits of managed objects at once; false: drift is reported, not reverted, until the next commit."""
    render: Render = "auto"
    """How to render path: auto (kustomization.yaml: kustomize; Chart.yaml: helm; else plain YAML), plain, kustomize, helm."""
    helm: Helm | None = None
    """Helm settings (render helm or auto)."""
    allow_remote_bases: Flag = False
    """Let kustomize fetch remote bases (URLs), read at render time from outside the reviewed commit."""
    credentials: CredentialsRef | None = None
    """Where the Git credentials are (a Secret or mounted files); none for a public repository."""
    decryption: Decryption | None = None
    """Decrypt SOPS-encrypted files (plain manifests, kustomize resources and secretGenerator inputs) with age
    keys from a Secret or a mounted file: {provider: sops, keysFrom: {secretRef: {name: sops-age}}}. Without it
    an encrypted file fails the render."""
    verify: Verify | None = None
    """Deploy only signed commits: {provider: ssh|openpgp, keysFrom: {secretRef: {name: ...}} | {file: PATH}}.

    An unsigned commit, one signed by a key not in the set, or one whose
    signature does not match it is refused before it is rendered: nothing
    applied, nothing pruned, a Failed result and an audit record naming the
    commit and why. A good one's audit record says who signed it with which
    key. A held or rolled-back app's target commit is checked the same way.
    """
    allowed_namespaces: AllowedNamespaces | None = None
    """The only namespaces the app may write to (no cluster-scoped objects then); absent: anywhere."""
    prune_guard: Share = 0.5
    """Refuse a commit that would prune more than this share (0 < x <= 1) of what it touches."""
    allow_prune_all: Flag = False
    """Lift the prune guard (a repository emptied on purpose)."""
    recreate: Flag = False
    """Delete and re-create an object whose immutable fields changed."""
    take_over_managers: FieldManagers = DEFAULT_TAKE_OVER_MANAGERS
    """Field managers whose fields gitopsd takes over when it applies an object they wrote (`name*`: a
    prefix), so that a field later removed from Git is removed from the cluster; [] turns it off.

    Default: kubectl-client-side-apply, kubectl, kubectl-create, kubectl-edit, kubectl-replace,
    before-first-apply — who wrote whole objects before gitopsd adopted them. Taking over merges their
    field sets into gitopsd's (as kubectl's own client-side-to-server-side upgrade, csaupgrade, does)
    and drops the kubectl.kubernetes.io/last-applied-configuration annotation: one JSON patch of
    metadata.managedFields, sent only when the live object has such an entry; the apply that follows
    removes what they had set and Git does not (fields the server defaults come back). An object that
    has such an entry is applied even when nothing else differs (the plan names the managers). What the
    app leaves to others wins: a manager in ignoreManagers (or a rule's managedFieldsManagers) is never
    taken over, and the fields ignoreDifferences names stay with whoever owns them."""
    suspend: Flag = False
    """Stop reconciling (and self-healing) until set back to false."""
    timeout: Timeout = 300.0
    """How long to wait for the applied objects to become healthy: 90s, 5m, or seconds (at least 1s)."""
    fetch_timeout: FetchTimeout = DEFAULT_FETCH_TIMEOUT
    """How long one read of the repository may take (Flux's GitRepository timeout): the ls-remote, the fetch
    and the checkout, and the wait for another run's fetch of the same repository. A remote that hangs past it
    fails the run with "timed out after", nothing applied; the next poll tries again. Default 2m.

    Apps of one repository and ref share a fetch (gitopsd.engine.source_share): it runs with the
    fetchTimeout of the app whose run started it."""
    rollback: Rollback | None = None
    """Automatic rollback: {onUnhealthy: true} goes back to the last healthy revision when one ends Unhealthy."""
    ignore_differences: IgnoreDifferences = ()
    """Drift to allow: rules naming objects (group, kind, name, namespace; globs) and fields (jsonPointers, fields) or managers (managedFieldsManagers) that gitopsd leaves to whoever changes them.

    A field is left alone once another field manager owns it: gitopsd stops
    applying it, so a change is neither drift nor reverted. A field gitopsd
    alone owns keeps following Git (dropping it would make the apiserver
    remove it); a created object gets Git's values.
    """
    ignore_managers: Managers | None = None
    """Field managers whose fields of any object of the app are left to them (not drift, not reverted); absent: the file's top-level ignoreManagers."""
    depends_on: DependsOn = ()
    """Apps that must be Applied and Healthy at their current revision before this one reconciles: [infra] (the app
    with the CRDs before the apps that use them). Meanwhile `gitopsd status` says what the app waits for.

    Names are apps of this file; a cycle is refused (Config._dependencies).
    The daemon's side: gitopsd.daemon.dependencies.
    """
    health_check_exprs: HealthCheckExprs = ()
    """Health rules in CEL for kinds the generic rules cannot read, as Flux's healthCheckExprs: a list of
    {apiVersion, kind, current, inProgress, failed}."""
    service_account_name: ServiceAccountName | None = None
    """The ServiceAccount the app's writes are made as (Flux's serviceAccountName): gitopsd impersonates it for
    the app's dry-runs, applies, takeovers, prunes and createNamespace, so the app can do only what RBAC grants
    that account; a write it may not do fails the app at plan time, naming the object. It lives in
    `serviceAccountNamespace`, by default the app's `namespace`. Absent: the file's top-level
    defaultServiceAccountName, else gitopsd's own identity. gitopsd's bookkeeping (inventory, status, audit,
    Events, watches) stays its own. Needs `impersonate` on serviceaccounts for gitopsd (deploy/)."""
    service_account_namespace: Namespace | None = None
    """Where serviceAccountName lives, when not in the app's `namespace` (an account that deploys several namespaces)."""
    cluster: ClusterName | None = None
    """The cluster to deploy to, by its name in the file's `clusters` (default: in-cluster, the one gitopsd runs in)."""
    clusters: Annotated[tuple[ClusterName, ...], Strict(False), AfterValidator(_distinct),
                        Field(json_schema_extra={"minItems": 1})] | None = None
    """Deploy to each of these clusters (fan-out): one target per cluster, each its own ApplySet with its own
    result, status, history and audit trail: [in-cluster, eu-1]."""
    cluster_selector: ClusterSelector | None = None
    """Deploy to every cluster whose labels match (fan-out, like clusters): {matchLabels: {env: prod}}."""
    notify: NotifierNames = ()
    """Notifiers (by their name in the file's `notifiers`) told about this app, besides the file's top-level
    `notify` list, which every app uses: [github, team-chat]."""

    @property
    def target_cluster(self) -> str:
        """The cluster of this target (an app of Config.targets names exactly one)."""
        return self.cluster or IN_CLUSTER

    @property
    def key(self) -> str:
        """The target's name: the app's on gitopsd's own cluster, `app@cluster` on another. What the daemon
        keys a target by (runners, polls, shards, leases, /status rows, release requests)."""
        return target_key(self.name, self.target_cluster)

    def dependency_keys(self) -> tuple[str, ...]:
        """The targets this one waits for: each dependsOn app on this target's cluster."""
        return tuple(target_key(dep, self.target_cluster) for dep in self.depends_on)

    @property
    def service_account(self) -> ServiceAccount | None:
        """The account the app's writes are made as (gitopsd.kube.Kube.impersonating), or None: gitopsd itself."""
        if self.service_account_name is None:
            return None
        return ServiceAccount(namespace=self.service_account_namespace or self.namespace,
                              name=self.service_account_name)

    @property
    def ignore(self) -> ignore_mod.Ignore:
        """What the engine leaves alone (gitopsd.engine.ignore): the rules, and the managers of
        `ignore_managers` (None: gitopsd's default, the HPA's kube-controller-manager; in a file,
        `parse` fills in the top-level list)."""
        managers = self.ignore_managers if self.ignore_managers is not None else ignore_mod.DEFAULT_MANAGERS
        return _compile_ignore(self.ignore_differences, managers)

    @property
    def rollback_on_unhealthy(self) -> bool:
        return self.rollback is not None and self.rollback.on_unhealthy

    @property
    def helm_values(self) -> tuple[str, ...]:
        """The Helm values files (the engine's view of ``helm``)."""
        return self.helm.values_files if self.helm else ()

    @property
    def helm_release(self) -> str | None:
        """The Helm release name, None for the app's name."""
        return self.helm.release_name if self.helm else None

    @property
    def allow_remote_charts(self) -> bool:
        """Whether chart dependencies may come from the network (``helm.allowRemoteDependencies``)."""
        return bool(self.helm and self.helm.allow_remote_dependencies)

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Settings that contradict each other, as (field, message)."""
        found = []
        if self.helm is not None and self.render not in ("helm", "auto"):
            found.append((("helm",), f"only used with render helm or auto, and render is {self.render}"))
        if self.service_account_namespace is not None and self.service_account_name is None:
            found.append((("serviceAccountNamespace",), "only used with serviceAccountName; name the account"))
        named = [k for k, v in (("cluster", self.cluster), ("clusters", self.clusters),
                                ("clusterSelector", self.cluster_selector)) if v is not None]
        if len(named) > 1:
            found.append(((named[1],), f"use one of cluster, clusters and clusterSelector, not {' and '.join(named)}"))
        if self.allowed_namespaces is not None and self.namespace not in self.allowed_namespaces:
            how = " (the default); set namespace to one of them" if self.namespace == _DEFAULT_NAMESPACE else ""
            found.append((("namespace",), f"{_show(self.namespace)} is not in allowedNamespaces "
                                          f"[{', '.join(self.allowed_namespaces)}]{how}"))
        return found

    def to_spec(self, *, inventory_namespace: str, credentials: source.Credentials | None = None,
                decryption_keys: decrypt_mod.Keys | None = None,
                trusted_keys: signature.TrustedKeys | None = None) -> sync.AppSpec:
        """What one reconcile of this app needs, for `sync.sync` / `fetch_and_plan`: this app, with
        ``credentials`` and ``decryption_keys`` (the resolved values of ``self.credentials`` and
        ``self.decryption``: the caller reads the Secret or the files), ``trusted_keys`` (the keys
        ``self.verify`` names, as read now) and the namespace of its inventory.

        Raises ValueError when the app names credentials or decryption keys but none are passed:
        fetching anonymously would fail later with a misleading
        "authentication failed" from the remote, rendering without keys with "no decryption keys".
        Likewise for trusted keys: an app that verifies signatures never runs without its key set.
        """
        from gitopsd.engine.sync import AppSpec

        if self.credentials is not None and credentials is None:
            raise ValueError(f"app {self.name!r} names credentials; resolve them and pass credentials=")
        if self.decryption is not None and decryption_keys is None:
            raise ValueError(f"app {self.name!r} names decryption keys; resolve them and pass decryption_keys=")
        if self.verify is not None and trusted_keys is None:
            raise ValueError(f"app {self.name!r} verifies commit signatures; read its keys and pass trusted_keys=")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AppSpec(**{**fields, "credentials": credentials, "decryption_keys": decryption_keys,
                          "trusted_keys": trusted_keys,
                          "inventory_namespace": inventory_namespace})


@dataclass(frozen=True, config=MODEL_CONFIG)
class WebhookConfig(_Section):
    """The push webhook (POST /hooks/github, /hooks/gitlab, /hooks/generic)."""

    _secret_hint = _WEBHOOK_HINT

    secret_file: FilePath | None = None
    """File holding the webhook secret (mounted from a Secret); absent: $GITOPSD_WEBHOOK_SECRET. With
    neither, every webhook is refused and the interval alone picks up commits."""


@dataclass(frozen=True, config=MODEL_CONFIG)
class Config(_Section):
    """gitopsd's config file: the apps to reconcile (`apps: []` for none), the push webhook, the clusters and
    the notifiers."""

    _null_is_default = ("webhook",)

    apps: Annotated[tuple[AppConfig, ...], Strict(False)]
    """The apps, in order; names are unique. Write `apps: []` to run none."""
    webhook: WebhookConfig = WebhookConfig()
    """The push webhook."""
    ignore_managers: Managers = ignore_mod.DEFAULT_MANAGERS
    """Field managers whose fields gitopsd leaves to them in every app that names none (not drift, not reverted); [] for none.

    The default is the kube-controller-manager: a HorizontalPodAutoscaler
    scales a Deployment through its scale subresource under that name, so
    spec.replicas set in Git stays at the autoscaler's count.
    """
    default_service_account_name: ServiceAccountName | None = None
    """The serviceAccountName of every app that names none (Flux's --default-service-account), in each app's own
    namespace (or its serviceAccountNamespace): with it, no app writes as gitopsd itself. Absent: such apps
    write as gitopsd."""
    clusters: Annotated[dict[ClusterName, ClusterConfig], Strict(False)] = dataclasses.field(default_factory=dict)
    """The clusters apps may be deployed to, by name: {eu-1: {kubeconfig: {secretRef: {name: eu-1-kubeconfig}},
    labels: {env: prod}}}. `in-cluster`, the cluster gitopsd runs in (or its --kubeconfig names), is always there;
    name it here only to give it labels."""
    notifiers: Annotated[dict[NotifierName, NotifierConfig], Strict(False)] = dataclasses.field(default_factory=dict)
    """Where gitopsd tells about transitions, drift and rollbacks, by name (gitopsd.notify): {github: {provider:
    github, tokenFrom: {secretRef: {name: github-token}}}, team-chat: {provider: slack, addressFrom: {secretRef:
    {name: slack-webhook}}}}. Used by the apps that list them in `notify`, and by every app when listed in the
    top-level `notify`."""
    notify: NotifierNames = ()
    """Notifiers every app uses (an app's own `notify` adds to them): [team-chat]."""

    def __hash__(self) -> int:
        return hash((self.apps, self.webhook, self.ignore_managers, self.default_service_account_name,
                     tuple(self.clusters.items()), tuple(self.notifiers.items()), self.notify))

    @model_validator(mode="after")
    def _inherit(self) -> Config:
        # An app that names no ignoreManagers gets the file's: filled in here, once, so that
        # every reader of an app (the daemon's runners, a reload's diff) sees the list it runs
        # with. The apps were built by this validation and nobody holds them yet.
        for app in self.apps:
            if app.ignore_managers is None:
                object.__setattr__(app, "ignore_managers", self.ignore_managers)
            if app.service_account_name is None and self.default_service_account_name is not None:
                object.__setattr__(app, "service_account_name", self.default_service_account_name)
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        if duplicates := list(_duplicate_names([a.name for a in self.apps])):
            _refuse(type(self).__name__, [(("apps", i, "name"), _duplicate(first)) for i, first in duplicates],
                    kind="duplicate_name")
        return self

    @model_validator(mode="after")
    def _dependencies(self) -> Config:
        """Every dependsOn names an app of this file, and no app waits for itself, however
        indirectly: such apps would wait for each other for ever. Checked in code too."""
        if problems := dependency_problems([(a.name, a.depends_on) for a in self.apps]):
            _refuse(type(self).__name__, problems, kind="dependency")
        return self

    @model_validator(mode="after")
    def _clusters(self) -> Config:
        """Every cluster named is defined, every selector selects one, a dependency runs on the
        clusters of the apps that wait for it, and in-cluster is gitopsd's own connection."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name, cluster in self.clusters.items():
            if name == IN_CLUSTER and (cluster.kubeconfig is not None or cluster.context is not None):
                problems.append((("clusters", name), "in-cluster is gitopsd's own connection (the pod's account, "
                                 "or --kubeconfig): give it labels only, or define another name"))
            elif name != IN_CLUSTER and cluster.kubeconfig is None:
                problems.append((("clusters", name, "kubeconfig"), "missing: how to reach the cluster "
                                 "({secretRef: {name: ...}} or {file: PATH})"))
        known = self.cluster_names
        for i, app in enumerate(self.apps):
            named = [(("cluster",), app.cluster)] if app.cluster else \
                [(("clusters", j), c) for j, c in enumerate(app.clusters or ())]
            for where, name in named:
                if name not in known:
                    problems.append((("apps", i, *where), f"{_show(name)} is no cluster of this file "
                                     f"(clusters: {', '.join(known)})"))
            if app.cluster_selector is not None and not self._selected(app.cluster_selector):
                wanted = ", ".join(f"{k}={v}" for k, v in app.cluster_selector.match_labels.items())
                problems.append((("apps", i, "clusterSelector"), f"selects no cluster ({wanted}); label a "
                                 "cluster in `clusters`, or name the clusters"))
        if not problems:
            on = {app.name: set(self._clusters_of(app)) for app in self.apps}
            for i, app in enumerate(self.apps):
                for j, dep in enumerate(app.depends_on):
                    if dep in on and (missing := sorted(on[app.name] - on[dep])):
                        problems.append((("apps", i, "dependsOn", j), f"{dep} is not deployed to "
                                         f"{', '.join(missing)}, where {app.name} is: an app waits for its "
                                         "dependency on the same cluster"))
        if problems:
            _refuse(type(self).__name__, problems, kind="cluster")
        return self

    @model_validator(mode="after")
    def _notifier_names(self) -> Config:
        """Every notifier an app or the top-level `notify` names is defined in `notifiers`."""
        known = ", ".join(self.notifiers) or "none defined: add them under notifiers"
        problems: list[tuple[tuple[str | int, ...], str]] = [
            (where, f"{_show(name)} is no notifier of this file (notifiers: {known})")
            for where, name in [*((("notify", j), n) for j, n in enumerate(self.notify)),
                                *((("apps", i, "notify", j), n) for i, a in enumerate(self.apps)
                                  for j, n in enumerate(a.notify))]
            if name not in self.notifiers]
        if problems:
            _refuse(type(self).__name__, problems, kind="notifier")
        return self

    def notifiers_of(self, app: AppConfig) -> list[tuple[str, NotifierConfig]]:
        """(name, notifier) of everyone told about `app`: the top-level `notify` list, then the app's own."""
        names = dict.fromkeys((*self.notify, *app.notify))
        return [(name, self.notifiers[name]) for name in names if name in self.notifiers]

    @property
    def cluster_names(self) -> list[str]:
        """in-cluster first, then the file's clusters in order."""
        return [IN_CLUSTER, *(n for n in self.clusters if n != IN_CLUSTER)]

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called `name` (in-cluster: labels only)."""
        return self.clusters.get(name) or ClusterConfig()

    def _selected(self, selector: ClusterSelector) -> list[str]:
        return [n for n in self.cluster_names if selector.selects(self.cluster(n).labels)]

    def _clusters_of(self, app: AppConfig) -> list[str]:
        if app.clusters is not None:
            return list(app.clusters)
        if app.cluster_selector is not None:
            return self._selected(app.cluster_selector)
        return [app.target_cluster]

    @functools.cached_property
    def targets(self) -> tuple[AppConfig, ...]:
        """Every (app, cluster) the daemon keeps converged, in file order: an app deployed to
        several clusters (clusters, clusterSelector) is one target per cluster, each naming
        exactly its `cluster` (AppConfig.key: `app`, or `app@cluster` off gitopsd's own cluster)."""
        found = []
        for app in self.apps:
            if app.clusters is None and app.cluster_selector is None:
                found.append(app)
                continue
            for name in self._clusters_of(app):
                target = copy.copy(app)
                object.__setattr__(target, "cluster", name)
                object.__setattr__(target, "clusters", None)
                object.__setattr__(target, "cluster_selector", None)
                found.append(target)
        return tuple(found)

    @functools.cached_property
    def _targets_by_key(self) -> dict[str, AppConfig]:
        return {t.key: t for t in self.targets}

    def target(self, key: str) -> AppConfig | None:
        """The target called ``key`` (`app` or `app@cluster`), or None. A lookup, not a scan: the
        notifier asks at every event (gitopsd.notify.notifier)."""
        return self._targets_by_key.get(key)

    def app(self, name: str) -> AppConfig | None:
        """The app called ``name``, or None when the config has none."""
        return next((a for a in self.apps if a.name == name), None)


def _duplicate_names(names: list[object]) -> Iterator[tuple[int, int]]:
    """(index, index of the first) for each repeated app name; non-names are skipped."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if isinstance(name, str) and name:
            if name in first:
                yield i, first[name]
            else:
                first[name] = i


Graph = list[tuple[str, tuple[str, ...]]]   # (app, its dependsOn), in file order


def dependency_problems(graph: Graph) -> list[tuple[tuple[str | int, ...], str]]:
    """Unknown names in dependsOn, and each cycle once (at its first app in file order,
    named in full: `a -> b -> c -> a`), as (location, message)."""
    index = {name: i for i, (name, _) in reversed(list(enumerate(graph)))}
    found: list[tuple[tuple[str | int, ...], str]] = []
    for i, (app, depends_on) in enumerate(graph):
        for j, name in enumerate(depends_on):
            if name not in index:
                known = ", ".join(n for n, _ in graph if n != app) or "none"
                found.append((("apps", i, "dependsOn", j), f"{_show(name)} is no app of this file (apps: {known})"))
    reported: set[frozenset[str]] = set()
    for i, (app, _) in enumerate(graph):
        cycle = _cycle_from(app, graph=graph, index=index)
        if cycle is not None and frozenset(cycle) not in reported:
            reported.add(frozenset(cycle))
            how = "depends on itself" if len(cycle) == 2 else f"waits for itself: {' -> '.join(cycle)}"
            found.append((("apps", i, "dependsOn"),
                          f"a dependency cycle: {app} {how}; the apps of a cycle would wait for each other "
                          "for ever, remove one of its dependsOn entries"))
    return found


def _raw_graph(data: Any) -> Graph:
    """(name, dependsOn) of the apps as written, for a file with other problems too: the
    apps whose name and dependsOn are a string and a list of strings (the rest say their own problems)."""
    apps = data.get("apps") if isinstance(data, dict) else None
    graph = []
    for app in apps if isinstance(apps, list) else []:
        name = app.get("name") if isinstance(app, dict) else None
        deps = app.get("dependsOn", []) if isinstance(app, dict) else None
        if isinstance(name, str) and isinstance(deps, list) and all(isinstance(d, str) for d in deps):
            graph.append((name, tuple(deps)))
        else:
            graph.append((name if isinstance(name, str) else "", ()))
    return graph


def _cycle_from(start: str, *, graph: Graph, index: dict[str, int]) -> list[str] | None:
    """The shortest path start -> ... -> start through dependsOn (breadth first), or None."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for name in frontier:
            for dep in graph[index[name]][1]:
                if dep == start:
                    return paths[name] + [start]
                if dep in index and dep not in paths:
                    paths[dep] = paths[name] + [dep]
                    following.append(dep)
        frontier = following
    return None


def _duplicate(first: int) -> str:
    return f"duplicate of apps[{first}]; app names must be unique (the name is the app's inventory)"


@dataclasses.dataclass(frozen=True)
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


_ADAPTER = TypeAdapter(Config)


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
    try:
        config = _ADAPTER.validate_python(data, by_alias=True, by_name=False,
                                          context={"file": source, "base_dir": base_dir})
    except ValidationError as exc:
        problems += _problems(exc, data)
    if problems:
        no_apps = any(p.startswith(("apps: missing", "apps: is empty")) for p in problems)
        raise ConfigError(problems, source=source, hint=_NO_APPS_HINT if no_apps else None)
    return config


_RULES_ADAPTER = TypeAdapter(IgnoreDifferences)


def parse_ignore_rules(text: str) -> tuple[IgnoreDifference, ...]:
    """Ignore rules from a command line (`--ignore-differences`): one rule as a YAML mapping
    (`{kind: Deployment, name: web, jsonPointers: [/spec/replicas]}`), a list of them, or a
    drift report's suggestion pasted whole (`ignoreDifferences: [...]`). Checked as the file
    checks them; ValueError names every problem."""
    problems: list[str] = []
    data = _load_yaml(text, problems=problems)
    if data is _BROKEN or problems:
        raise ValueError("; ".join(problems))
    if isinstance(data, dict) and list(data) == ["ignoreDifferences"]:
        data = data["ignoreDifferences"]
    rules = data if isinstance(data, list) else [data]
    try:
        return _RULES_ADAPTER.validate_python(rules, by_alias=True, by_name=False, context={"file": "flag"})
    except ValidationError as exc:
        # Placed where the file has them, so each reads as in the file (`ignoreDifferences[0].kind: ...`).
        wrapped = {"apps": [{"ignoreDifferences": rules}]}
        raise ValueError("; ".join(
            _problem({**e, "loc": ("apps", 0, "ignoreDifferences", *e["loc"])}, wrapped).removeprefix("apps[0].")
            for e in exc.errors(include_url=False))) from None


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
    old_apps = {a.key: a for a in old.targets}
    new_names = {a.key for a in new.targets}

    def changed(a: AppConfig) -> bool:
        cluster = a.target_cluster
        return old_apps[a.key] != a or old.cluster(cluster).kubeconfig != new.cluster(cluster).kubeconfig \
            or old.cluster(cluster).context != new.cluster(cluster).context

    return ConfigChange(
        added=tuple(a.key for a in new.targets if a.key not in old_apps),
        removed=tuple(a.key for a in old.targets if a.key not in new_names),
        changed=tuple(a.key for a in new.targets if a.key in old_apps and changed(a)),
        webhook_changed=old.webhook != new.webhook,
    )


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file, derived from the
    model: what `gitopsd config schema` prints for editors. It says what JSON
    Schema can (types, keys, patterns, bounds, descriptions); rules across
    fields (credentials of one kind, namespace within allowedNamespaces)
    and YAML's own traps are for `gitopsd config validate`."""
    generated = _ADAPTER.json_schema(by_alias=True, schema_generator=_FileSchema)
    generated.pop("title", None)
    return {"$schema": _FileSchema.schema_dialect, "title": "gitopsd config", **generated}


class _FileSchema(GenerateJsonSchema):
    """The schema of the file as a user writes it: no `null` (an empty value
    is an error in the file), no `default: null`, no titles made up from
    Python names (the keys say it), and of each docstring only its first
    paragraph (the rest is for programmers)."""

    def generate(self, schema, mode="validation"):
        generated = super().generate(schema, mode=mode)
        for section in (generated, *generated.get("$defs", {}).values()):
            for node in (section, *section.get("properties", {}).values()):
                if "description" in node:
                    node["description"] = " ".join(node["description"].split("\n\n")[0].split())
        return generated

    def nullable_schema(self, schema):
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema):
        generated = super().default_schema(schema)
        if schema.get("default") is None or is_pydantic_dataclass(type(schema.get("default"))):
            generated.pop("default", None)
        return generated

    def field_title_should_be_set(self, schema) -> bool:
        return False


# --------------------------------------------------------------------------
# Problems: pydantic's errors in the file's words
#
# A problem names where (`apps[1] (web).credentials.tokenFile`: the keys as
# the file spells them, with the app's name), what is wrong with the value
# (quoted, never a secret: unknown keys are named, not their values), and
# what would be right.


def _problems(exc: ValidationError, data: Any) -> list[str]:
    """Every problem, apps first in file order (an app's duplicate name after its own problems)."""
    errors = exc.errors(include_url=False)
    found = [(tuple(e["loc"]), _problem(e, data)) for e in errors]
    # The model reports duplicate names only once every app is valid; a file
    # hears about them with everything else.
    if not any(e["type"] == "duplicate_name" for e in errors):
        for i, first in _duplicate_names(_raw_names(data)):
            loc = ("apps", i, "name")
            found.append((loc, f"{_where(loc, data)}: {_duplicate(first)}"))
    # Dependencies likewise: an unknown name or a cycle is news beside a typo elsewhere.
    if not any(e["type"] == "dependency" for e in errors):
        for loc, message in dependency_problems(_raw_graph(data)):
            found.append((loc, f"{_where(loc, data)}: {message}"))
    found.sort(key=lambda item: (0, _index(item[0])) if item[0][:1] == ("apps",) else (1, 0))
    return [text for _, text in found]


def _raw_names(data: Any) -> list[object]:
    apps = data.get("apps") if isinstance(data, dict) else None
    return [a.get("name") if isinstance(a, dict) else None for a in apps] if isinstance(apps, list) else []


def _index(loc: tuple) -> int:
    return loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1


def _problem(error: Any, data: Any) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "invalid_key":   # a key that is no string (`1: x`): unknown like any other
        loc, kind = (*loc[:-1], str(loc[-1])), "extra_forbidden"
    where = _where(loc, data)
    message = _message(kind, loc=loc, value=value, error=error)
    return f"{where}: {message}" if where else message


def _message(kind: str, *, loc: tuple, value: Any, error: Any) -> str:
    if kind == "missing":
        return f"missing; {_LIST_THE_APPS}" if loc == ("apps",) else "missing"
    if kind == "null":
        return f"is empty; {_LIST_THE_APPS}" if loc == ("apps",) else "is empty; give a value or remove the key"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return _unknown_key(str(loc[-1]), section=_section_at(loc[:-1]))
    if kind in ("dataclass_type", "dataclass_exact_type", "model_type", "dict_type"):
        if not loc:
            return f"the file must be a mapping with an 'apps:' list, not {_type_name(value)}"
        return f"must be {_section_at(loc)._what}, not {_type_name(value)}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", error["ctx"]["expected"])   # "'auto', 'plain' or 'helm'"
        return f"{_show(value)} is not one of {', '.join(allowed)}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in _BY_VALUE:
        return _BY_VALUE[kind](value)
    return error["msg"]   # our own rules (already in the file's words), or a kind not met so far


def _not_a_string(value: Any) -> str:
    if isinstance(value, (bool, int, float, datetime.date)):
        # No reconstructed "quote it: ..." value: YAML may have changed
        # the text already (`0123456` is octal, `1.10` is 1.1).
        return f"YAML reads {_show(value)} as {_type_name(value)}, not a string; quote it"
    return f"must be a string, not {_type_name(value)}"


_BY_VALUE: dict[str, Callable[[Any], str]] = {
    "string_type": _not_a_string,
    "bool_type": lambda v: f"{_show(v)} is not a boolean (use true or false)",
    "float_type": lambda v: f"{_show(v)} is not a number",
    "int_type": lambda v: f"{_show(v)} is not a number",
    "tuple_type": lambda v: f"must be a list, not {_type_name(v)}",
    "list_type": lambda v: f"must be a list, not {_type_name(v)}",
}


def _unknown_key(key: str, *, section: type[_Section]) -> str:
    """An inline secret with the reference to use instead, a key with a
    reason of its own, or a typo with the closest known name."""
    if _normalise(key) in _INLINE_SECRET_KEYS:
        return f"inline secrets are refused (this file is no secret store); {section._secret_hint}"
    if key in section._refused:
        return section._refused[key]
    known = _keys(section)
    guess = {_normalise(k): k for k in known}.get(_normalise(key))
    if guess is None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        guess = close[0] if close else None
    return f"unknown field; did you mean {guess}?" if guess else f"unknown field; known fields: {', '.join(known)}"


def _keys(section: type[_Section]) -> list[str]:
    """The section's keys as the file spells them."""
    return [info.alias or name for name, info in section.__pydantic_fields__.items()]


def _section_at(loc: tuple) -> type[_Section]:
    """The class of the mapping at ``loc`` (`apps[0].helm`: Helm), found
    through the fields' types; `_Section` when the path leads nowhere."""
    section: type | None = Config
    by_name = False   # the part after a mapping of sections (clusters) is a name, not a field
    for part in loc:
        if isinstance(part, int) or by_name:
            by_name = False
            continue
        info = next((f for n, f in section.__pydantic_fields__.items() if (f.alias or n) == part), None)
        section = _section_in(info.annotation) if info else None
        if section is None:
            return _Section
        by_name = _is_mapping(info.annotation)
    return section


def _is_mapping(annotation: Any) -> bool:
    """Whether a field's type is a mapping (`dict[ClusterName, ClusterConfig]`, perhaps Annotated)."""
    return get_origin(annotation) is dict or any(_is_mapping(arg) for arg in get_args(annotation)
                                                 if get_origin(annotation) is not dict)


def _section_in(annotation: Any) -> type | None:
    """The model class inside a field's type (`Helm | None`, `tuple[AppConfig, ...]`)."""
    if isinstance(annotation, type) and is_pydantic_dataclass(annotation):
        return annotation
    return next((s for arg in get_args(annotation) if (s := _section_in(arg)) is not None), None)


def _where(loc: tuple, data: Any) -> str:
    """`apps[1] (web-production).credentials.tokenFile`: keys as in the file,
    list items by index, an app also by its name (as written, shortened)."""
    text, node = "", data
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            text += f"[{part}]"
            name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str) and name.strip():
                text += f" ({name if len(name) <= 60 else name[:57] + '...'})"
        else:
            node = node.get(part) if isinstance(node, dict) else None
            text += f".{part}" if text else part
    return text




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

