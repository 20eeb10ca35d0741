"""Errors a user can hit. Each names what failed (file, object, remote), why,
and, where we know one, a hint at the fix. The CLI prints them as they are and
exits 2; the daemon records them in the audit trail.
"""

from __future__ import annotations


class GitopsdError(Exception):
    """Base of every error meant for a user, not a traceback."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class SourceError(GitopsdError):
    """The Git source could not be read: unreachable remote, bad credentials,
    unknown ref. Never leads to a prune: nothing downstream runs."""


class RenderError(GitopsdError):
    """The commit's manifests could not be turned into objects. Carries every
    problem found, not just the first, so one fix-up commit can address all.
    The renderer has scrubbed the problems of every secret value it met, and
    registered those values with gitopsd.redact for whoever logs or records
    anything else about this render.
    """

    def __init__(self, problems: list[str], *, hint: str | None = None) -> None:
        self.problems = list(problems)
        head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"rendering failed with {head}:\n" + "\n".join(f"  - {p}" for p in problems), hint=hint)


class ClusterError(GitopsdError):
    """The apiserver refused or failed a request in a way the user must see."""


def yaml_error_parts(exc: Exception) -> tuple[str, str]:
    """A YAML syntax error as (where, what): ('line L, column C', 'what broke').

    The problem mark is where parsing broke; the context mark, when there is
    one, is where the construct that never closed began — often the line to
    fix (an unclosed bracket or quote), so it is named too. `where` is "" when
    the parser gave no position.
    """
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    if not (problem or context):
        return "", str(exc)
    what = problem or context
    context_mark = getattr(exc, "context_mark", None)
    if context and problem and context_mark:
        what += f" ({context} that began at line {context_mark.line + 1})"
    return (f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""), what


class LeadershipLost(Exception):
    """A write refused by the fence: this replica cannot prove it still holds the lease.

    Raised before the request is sent, so nothing of it reached the
    apiserver. Deliberately not a GitopsdError: it is not a failure to
    report but the end of this replica's work, and must pass through every
    handler that would record, retry or log a GitopsdError until the daemon's
    runner ends the reconcile quietly (the new leader records and converges).
    `unsent` counts the planned writes of the apply that were not sent.
    """

    def __init__(self, unsent: int = 0) -> None:
        super().__init__()
        self.unsent = unsent

    def __str__(self) -> str:
        return f"leadership lost mid-reconcile; {self.unsent} write{'' if self.unsent == 1 else 's'} not sent"
