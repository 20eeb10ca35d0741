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
    problem found, not just the first, so one fix-up commit can address all."""

    def __init__(self, problems: list[str], *, hint: str | None = None) -> None:
        self.problems = list(problems)
        head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"rendering failed with {head}:\n" + "\n".join(f"  - {p}" for p in problems), hint=hint)


class ClusterError(GitopsdError):
    """The apiserver refused or failed a request in a way the user must see."""
