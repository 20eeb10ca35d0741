"""The `notifiers:` and `notify:` settings: what the file accepts, and every problem named at its place."""

from __future__ import annotations

import textwrap

import pytest

from gitopsd.config import ConfigError, parse, schema

GOOD = """
notifiers:
  github: {provider: github, tokenFrom: {secretRef: {name: github-token, key: token}}}
  gitlab: {provider: gitlab, address: "https://git.corp.example", repository: "platform/fleet",
           tokenFrom: {file: /etc/gitopsd/gitlab-token}}
  forgejo: {provider: gitea, address: "https://code.example.org", tokenFrom: {secretRef: {name: forgejo}}}
  chat: {provider: slack, addressFrom: {secretRef: {name: team-chat}}, events: [transition, release]}
  sink: {provider: webhook, address: "http://127.0.0.1:9000/hook", signingKeyFrom: {secretRef: {name: sink}}}
notify: [chat]
apps:
  - {name: web, repo: "https://github.com/org/fleet.git", notify: [github, sink, chat]}
  - {name: api, repo: "https://github.com/org/fleet.git"}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(textwrap.dedent(text))
    return caught.value.problems


def test_an_app_hears_the_top_level_notifiers_and_its_own_once_each() -> None:
    config = parse(GOOD)
    assert [name for name, _ in config.notifiers_of(config.app("web"))] == ["chat", "github", "sink"]
    assert [name for name, _ in config.notifiers_of(config.app("api"))] == ["chat"]
    assert config.notifiers["github"].event_kinds == ("transition",)
    assert config.notifiers["sink"].event_kinds == ("transition", "drift", "release")


def test_each_provider_says_what_it_misses_and_what_it_cannot_use() -> None:
    assert problems("""
        notifiers:
          a: {provider: github}
          b: {provider: gitea, tokenFrom: {secretRef: {name: t}}}
          c: {provider: slack}
          d: {provider: webhook, address: "https://h.example.com", addressFrom: {file: /x}, tokenFrom: {file: /t}}
          e: {provider: github, tokenFrom: {secretRef: {name: t}}, events: [drift]}
        apps: []
    """) == [
        "notifiers.a.tokenFrom: missing: github takes commit statuses only with a token "
        "({secretRef: {name: ..., key: token}})",
        "notifiers.b.address: missing: the Gitea/Forgejo instance, https://gitea.example.com",
        "notifiers.c.addressFrom: missing: where to send ({secretRef: {name: ..., key: address}})",
        "notifiers.d.tokenFrom: not used by provider webhook",
        "notifiers.d.addressFrom: use either address or addressFrom, not both",
        "notifiers.e.events: a commit status shows transitions only, not drift; send those to a slack or webhook "
        "notifier",
    ]


def test_secrets_written_in_the_file_and_addresses_in_clear_are_refused() -> None:
    found = problems("""
        notifiers:
          a: {provider: github, token: ghp_0123456789abcdef}
          b: {provider: slack, address: "https://hooks.slack.com/services/T0/B0/XXXX"}
          c: {provider: webhook, address: "http://hooks.example.com/gitopsd"}
          d: {provider: webhook, address: "https://user:pw@hooks.example.com/x"}
          e: {provider: webhook, addressFrom: {secretRef: {name: s, namespace: other}}}
          f: {provider: teams, address: "https://x.example.com"}
        apps: []
    """)
    assert found[0].startswith("notifiers.a.token: inline secrets are refused")
    assert found[1].startswith("notifiers.b.address: a Slack webhook URL is a secret")
    assert found[2].startswith('notifiers.c.address: "http://hooks.example.com/gitopsd": plain http only to this '
                               "machine")
    assert found[3].startswith("notifiers.d.address: the URL for https://hooks.example.com carries a password")
    assert found[4].startswith("notifiers.e.addressFrom.secretRef.namespace: not allowed")
    assert found[5] == 'notifiers.f.provider: "teams" is not one of github, gitlab, gitea, slack, webhook'
    assert not any("ghp_0123456789abcdef" in p or "XXXX" in p or ":pw@" in p for p in found), found


def test_a_notifier_name_that_is_not_defined_is_named_where_it_is_used() -> None:
    assert problems("""
        notifiers:
          chat: {provider: slack, addressFrom: {secretRef: {name: team-chat}}}
        notify: [chat, pager]
        apps:
          - {name: web, repo: "https://github.com/org/fleet.git", notify: [github]}
    """) == [
        'apps[0] (web).notify[0]: "github" is no notifier of this file (notifiers: chat)',
        'notify[1]: "pager" is no notifier of this file (notifiers: chat)',
    ]


def test_the_schema_describes_notifiers_for_editors() -> None:
    defs = schema()["$defs"]
    notifier = defs["NotifierConfig"]["properties"]
    assert notifier["provider"]["enum"] == ["github", "gitlab", "gitea", "slack", "webhook"]
    assert all(prop.get("description") for prop in notifier.values())
    assert "notify" in defs["AppConfig"]["properties"]
