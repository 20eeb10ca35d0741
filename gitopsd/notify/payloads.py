"""The HTTP request each provider documents, for one notice. Pure: no I/O, secrets passed in.

Commit statuses (one per app and commit, named by its context `gitopsd/<target>`:
`gitopsd/web`, `gitopsd/web@eu-1` for the same app on another cluster):

- GitHub: ``POST {api}/repos/{owner}/{repo}/statuses/{sha}``, ``Authorization:
  Bearer <token>``, JSON {state: pending|success|failure|error, target_url,
  description (at most 140 characters), context}. {api} is https://api.github.com
  or GitHub Enterprise's https://HOST/api/v3.
- GitLab: ``POST {instance}/api/v4/projects/{id}/statuses/{sha}``,
  ``PRIVATE-TOKEN: <token>``, JSON {state: pending|running|success|failed|canceled,
  name (the context), target_url, description}. {id} is the numeric id or the
  URL-encoded path (`group%2Fsub%2Fproject`). A transition begun is `running`
  there, not `pending`: GitLab has the word for it, and keeps `pending` for
  waiting (a held app). GitLab refuses a status that is already in that
  state with 400 "Cannot transition status"; delivery counts that as done.
- Gitea and Forgejo: ``POST {instance}/api/v1/repos/{owner}/{repo}/statuses/{sha}``,
  ``Authorization: token <token>``, JSON {state: pending|success|error|failure|warning,
  target_url, description, context}.

The mapping: a transition begun and a held commit are pending (running on
GitLab for the first); Failed, Refused and Unhealthy are failure (failed on
GitLab); Applied, NoChange and RolledBack (the commit deployed again) are
success. target_url is the web view's page when the daemon has --ui-url,
else left out (an empty one is refused by some forges).

Chat (Slack's incoming webhooks; Mattermost and Rocket.Chat take the same):
JSON {text, blocks}: `text` is the whole message for clients and
notifications that show no blocks; `blocks` one section and one context line.
Text in mrkdwn has `&`, `<` and `>` escaped, so a commit message cannot
forge a link or a mention.

Webhook: gitopsd's JSON (gitopsd.notify.notice.Notice.as_json), with
``X-Gitopsd-Event: <kind>`` and, with a signing key, ``X-Gitopsd-Signature:
sha256=<hex HMAC-SHA256 of the body>`` — the header gitopsd's own generic push
webhook checks (gitopsd.daemon.webhook.sign), GitHub's X-Hub-Signature-256 format.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import orjson

from gitopsd import __version__, redact
from gitopsd.daemon.webhook import normalize_repo_url, sign
from gitopsd.errors import GitopsdError
from gitopsd.notify.notice import HELD, Notice, describe

DEFAULT_ADDRESS = {"github": "https://api.github.com", "gitlab": "https://gitlab.com"}
#: The forges' limit on a status description (GitHub documents 140; the others take as much).
DESCRIPTION_MAX = 140
_USER_AGENT = f"gitopsd/{__version__}"


class PayloadError(GitopsdError):
    """A notice this notifier cannot send (no repository to post to): retrying would not help."""


@dataclass(frozen=True)
class Request:
    url: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"
    ca: str | None = None   # PEM CA bundle the receiver's certificate must chain to, in place of the system's


def context(notice: Notice) -> str:
    """A commit status's name: `gitopsd/<target>`, so each app (and each of its clusters) has its own."""
    return f"gitopsd/{notice.target}"


def state(provider: str, notice: Notice) -> str:
    """The commit status of `notice` in `provider`'s words."""
    if notice.phase == "started":
        return "running" if provider == "gitlab" else "pending"
    if notice.result == HELD:
        return "pending"
    if notice.failed:
        return "failed" if provider == "gitlab" else "failure"
    return "success"


def commit_status(*, provider: str, notice: Notice, token: str, address: str | None, repository: str | None,
                  ui_url: str | None) -> Request:
    """The commit status request for GitHub, GitLab or Gitea (module docstring)."""
    base = (address or DEFAULT_ADDRESS.get(provider, "")).rstrip("/")
    body = {"state": state(provider, notice), "description": describe(notice, limit=DESCRIPTION_MAX),
            "context": context(notice)}
    if (link := notice.link(ui_url)) is not None:
        body["target_url"] = link
    sha = urllib.parse.quote(notice.revision or "", safe="")
    if provider == "gitlab":
        project = urllib.parse.quote(repository or _repository_of(notice.repo, parts=None), safe="")
        body["name"] = body.pop("context")
        return _json(f"{base}/api/v4/projects/{project}/statuses/{sha}", body, {"PRIVATE-TOKEN": token})
    owner_repo = repository or _repository_of(notice.repo, parts=2)
    if provider == "github":
        return _json(f"{base}/repos/{owner_repo}/statuses/{sha}", body,
                     {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                      "X-GitHub-Api-Version": "2022-11-28"})
    return _json(f"{base}/api/v1/repos/{owner_repo}/statuses/{sha}", body, {"Authorization": f"token {token}"})


def _repository_of(repo_url: str, *, parts: int | None) -> str:
    """`owner/name` (or GitLab's `group/sub/project`) from the app's repository URL."""
    canonical = normalize_repo_url(repo_url)
    path = "" if canonical.startswith("file:") else canonical.partition("/")[2]
    if not path or (parts is not None and len(path.split("/")) != parts):
        raise PayloadError(f"cannot tell the forge's repository from the app's repo {repo_url!r}",
                           hint="set the notifier's repository: owner/name (GitLab: the project's path or id)")
    return path


def slack(*, notice: Notice, address: str, ui_url: str | None) -> Request:
    """A Slack-compatible incoming-webhook message (module docstring)."""
    icon = ":x:" if notice.failed else ":warning:" if notice.kind == "drift" else \
        ":rewind:" if "release" in notice.events else ":white_check_mark:"
    where = f"*{_escape(notice.app)}*" + ("" if notice.cluster == "in-cluster" else f" on {_escape(notice.cluster)}")
    line = f"{icon} {where}: {_escape(describe(notice, limit=300))}"
    commit = ""
    if notice.revision:
        commit = f"`{notice.revision[:12]}`"
        if notice.subject:
            commit += f" {_escape(notice.subject)}"
        if notice.author:
            commit += f" ({_escape(notice.author)})"
    if notice.kind == "drift" and notice.details.get("fields"):
        commit = f"fields {_escape(', '.join(notice.details['fields'][:10]))}, changed by " \
                 f"{_escape(', '.join(notice.details.get('managers') or ['?']))}" + (f"; at {commit}" if commit else "")
    footer = f"{notice.kind} #{notice.seq}" if notice.seq is not None else notice.kind
    if (link := notice.link(ui_url)) is not None:
        footer += f" · <{_escape(link)}|history>"
    text = "\n".join(p for p in (line, commit) if p)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
              {"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]}]
    return _json(address, {"text": text, "blocks": blocks}, {})


def webhook(*, notice: Notice, address: str, signing_key: str | None, ui_url: str | None) -> Request:
    """gitopsd's JSON body, signed when a key is given (module docstring)."""
    body = _body(notice.as_json(ui_url=ui_url))
    headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT, "X-Gitopsd-Event": notice.kind}
    if signing_key:
        headers["X-Gitopsd-Signature"] = sign(body, secret=signing_key.encode())
    return Request(url=address, headers=headers, body=body)


def _json(url: str, body: dict, headers: dict[str, str]) -> Request:
    return Request(url=url, body=_body(body),
                   headers={"Content-Type": "application/json", "User-Agent": _USER_AGENT, **headers})


def _body(data: dict) -> bytes:
    """JSON, every string scrubbed of known secret values (records are already; a reason may quote a tool)."""
    return orjson.dumps(redact.scrub_data(data))


def _escape(text: str) -> str:
    """Slack mrkdwn's three control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
