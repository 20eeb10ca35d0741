"""Custom health checks in CEL: Flux's `healthCheckExprs`, for kinds kstatus cannot read.

A custom resource whose controller does not speak kstatus (no Ready
condition, a `status.phase` instead, a Ready condition written late) is
read wrongly by the generic rules of gitopsd.engine.health: Current on sight,
or InProgress until the timeout. An app's `healthCheckExprs` names, per
kind, CEL expressions that decide instead (gitopsd.config.HealthCheckExpr).
The semantics are Flux's (kustomize-controller >= 2.5, RFC-0009, the
`StatusEvaluator` of fluxcd/pkg runtime/cel), so an expression from Flux's
CEL cheat sheet means the same here:

- The variables are the object's top-level fields: `status.phase`,
  `metadata.generation`, `spec.replicas` (there is no `self`).
- The expressions are parsed, not type-checked: objects carry no schema
  here, and not every CRD has the usual five top-level fields. So a typo in
  a field name is found when the expression runs, not when the config loads;
  a syntax error is a config error.
- An object whose `status.observedGeneration` differs from
  `metadata.generation` is InProgress without evaluating anything (the
  controller has not seen the change yet; gitopsd.engine.health.compute
  checks that, and deletion, before a rule runs).
- Then `inProgress`, `failed`, `current`, in that order, each if given:
  the first that is true decides. None true: InProgress.
- An expression that cannot be evaluated (a field that is absent, a result
  that is no boolean) makes the object Unknown with the error, and the wait
  goes on until the timeout, as in Flux. A rule for a resource whose status
  fills in late should guard its fields: `has(status.phase) && ...`, or
  `status.?conditions.orValue([])`.
- The rule replaces the generic reading for its kind (apiVersion's group
  and the kind; the version is not matched, as Flux matches group and kind),
  Stalled and Reconciling conditions included: the rule is the kind's whole
  story.

The library is cel-expr-python, the CEL project's own C++ runtime (the
runtime cel-go is conformance-tested beside): it has the optional-field
syntax (`.?`) that Flux enables and Flux users write, compares int with
double as cel-go does, evaluates in ~10 us and depends on nothing. The
pure-Python cel-python has neither `.?` nor mixed numeric comparison and
takes ~1 ms an evaluation; common-expression-language (cel-rust) lacks `.?`
and brings a CLI's dependencies (typer, rich) into the daemon.

Cost: each distinct expression is compiled once per process (`compile` is
cached by its text: the config's validation compiles it, the engine finds
it compiled), an expression is at most MAX_CHARS characters, and CEL has no
loops beyond comprehensions over the object's own lists, so an evaluation
is bounded by the object (an etcd object is at most ~1.5 MiB).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gitopsd.engine.health import Status
from gitopsd.objects import split_api_version

#: Flux's cheat-sheet expressions are under 300 characters; anything near this
#: is a program written in the wrong place.
MAX_CHARS = 2048
#: Distinct expressions kept compiled (a fleet's config has a handful).
CACHE_SIZE = 4096

_GUARD_HINT = "guard fields that may be absent with has(status.x) or status.?x.orValue(...)"

_env: Any = None
_env_lock = threading.Lock()


def _environment() -> Any:
    """The one CEL environment: Flux's extensions that the runtime offers (optional values,
    strings, encoders, math). Imported and built on first use: a config without
    healthCheckExprs never loads the runtime."""
    global _env
    with _env_lock:
        if _env is None:
            from cel_expr_python import cel
            from cel_expr_python.ext import ext_encoders, ext_math, ext_optional, ext_strings

            _env = cel.NewEnv(extensions=[ext_optional.ExtOptional(), ext_strings.ExtStrings(),
                                          ext_encoders.ExtEncoders(), ext_math.ExtMath()])
        return _env


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile(text: str) -> Any:   # noqa: A001 - the verb of the module, as re.compile
    """The compiled program of a CEL expression, or ValueError saying what is wrong and where
    (`line 1, column 17: Syntax error: ...`). Cached by text: compiled once per process."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"is {len(text)} characters long, more than the {MAX_CHARS} a health expression may have")
    try:
        return _environment().compile(text, disable_check=True)
    except RuntimeError as exc:
        raise ValueError(f"is not a valid CEL expression: {_compile_error(str(exc))}") from None


def _compile_error(message: str) -> str:
    """The runtime's first line without its status code and `<input>`: `line 1, column 17: Syntax error: ...`."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    first = re.sub(r"^[A-Z_]+: ", "", first)           # INVALID_ARGUMENT:
    first = re.sub(r"^ERROR: ", "", first)
    first = re.sub(r"^<input>:(\d+):(\d+): ", r"line \1, column \2: ", first)
    return first if len(first) <= 300 else first[:297] + "..."


def check(text: str) -> str:
    """A config validator: ``text`` if it compiles, else ValueError (see `compile`)."""
    compile(text)
    return text


class Exprs(Protocol):
    """One rule as the config holds it (gitopsd.config.HealthCheckExpr)."""

    api_version: str
    kind: str
    current: str
    in_progress: str | None
    failed: str | None


@dataclass(frozen=True)
class _Check:
    status: Status
    field: str       # as the file spells it: inProgress, failed, current
    text: str
    program: Any


@dataclass(frozen=True)
class Rule:
    """The compiled rule of one kind: called with an object, gives (status, message)."""

    group: str
    kind: str
    checks: tuple[_Check, ...]   # in Flux's order: inProgress, failed, current

    def __call__(self, obj: dict) -> tuple[Status, str]:
        what = _what(obj)
        for check_ in self.checks:
            try:
                value = check_.program.eval(data=obj)
                result = _boolean(value)
            except _NotBoolean as exc:
                return Status.UNKNOWN, (f"{what}: healthCheckExprs {check_.field} cannot be evaluated: {exc} "
                                        f"({check_.field}: {_short(check_.text)})")
            except Exception as exc:  # noqa: BLE001 - the runtime's own error, reported as the object's health
                return Status.UNKNOWN, (f"{what}: healthCheckExprs {check_.field} cannot be evaluated: "
                                        f"{_eval_error(str(exc))}; {_GUARD_HINT} "
                                        f"({check_.field}: {_short(check_.text)})")
            if result:
                return check_.status, f"{what} is {check_.status.value} by its healthCheckExprs ({check_.field}: " \
                                      f"{_short(check_.text)})"
        current = next(c for c in self.checks if c.field == "current")
        return Status.IN_PROGRESS, (f"{what} is in progress: no healthCheckExprs expression is true yet "
                                    f"(current: {_short(current.text)})")


class _NotBoolean(Exception):
    pass


def _boolean(value: Any) -> bool:
    """The result as a bool; _NotBoolean for an error value or another type."""
    kind = value.type().name()
    if kind == "ERROR":
        raise _NotBoolean(f"{_eval_error(str(value.value()))}; {_GUARD_HINT}")
    if kind != "BOOL":
        raise _NotBoolean(f"the result is {kind.lower()}, not a boolean")
    return bool(value.value())


def _eval_error(message: str) -> str:
    """`NOT_FOUND: Key not found in map : "phase"` -> `Key not found in map: "phase"`; one line."""
    text = re.sub(r"^[A-Z_]+: ", "", " ".join(message.split()))
    return text.replace(" : ", ": ")


def _what(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', 'object')} {meta.get('name', '')}".strip()


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 160 else flat[:157] + "..."


def rule_of(exprs: Exprs) -> Rule:
    """The compiled rule of one config entry (its expressions compiled once: see `compile`)."""
    group, _ = split_api_version(exprs.api_version)
    checks = tuple(_Check(status, field, text, compile(text)) for status, field, text in (
        (Status.IN_PROGRESS, "inProgress", exprs.in_progress),
        (Status.FAILED, "failed", exprs.failed),
        (Status.CURRENT, "current", exprs.current)) if text)
    return Rule(group=group, kind=exprs.kind, checks=checks)


def rules_of(entries: Iterable[Exprs]) -> Mapping[tuple[str, str], Callable[[dict], tuple[Status, str]]]:
    """(group, kind) -> its rule, what gitopsd.engine.health.compute takes as ``rules``;
    empty when there are none. A later entry for the same kind wins (the config refuses two)."""
    return {(rule.group, rule.kind): rule for rule in map(rule_of, entries)}
