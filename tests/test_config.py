"""The config file model: parsing, validation messages, diff, to_spec, the JSON Schema.

Pure logic: no cluster, no Git. Messages are asserted by content because
they are the product here: a user fixes the file from them alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from gitopsd.config import (
    AppConfig,
    Config,
    ConfigChange,
    ConfigError,
    CredentialsRef,
    Decryption,
    HealthCheckExpr,
    Helm,
    IgnoreDifference,
    KeysFrom,
    TrustedKeysFrom,
    TrustedKeysSecretRef,
    Rollback,
    SecretRef,
    Verify,
    WebhookConfig,
    _os_problem,
    check_share,
    diff,
    load,
    parse,
    parse_duration,
)
from gitopsd.engine import decrypt, signature, source
from gitopsd.engine.sync import AppSpec


def problems_of(text: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), **kwargs)
    return info.value.problems


def one_app(text: str, **kwargs) -> AppConfig:
    config = parse(textwrap.dedent(text), **kwargs)
    assert len(config.apps) == 1
    return config.apps[0]


FULL = """\
apps:
  - name: infra
    repo: https://git.example.com/fleet.git
  - name: web-production
    repo: https://git.example.com/fleet.git
    ref: v1.2.3
    path: web/overlays/production
    namespace: production
    createNamespace: true
    interval: 1h30m
    prune: false
    selfHeal: false
    render: helm
    helm:
      valuesFiles: [values.yaml, values-prod.yaml]
      releaseName: web
    allowRemoteBases: true
    credentials:
      secretRef: {name: fleet-git}
    decryption:
      provider: sops
      keysFrom: {file: /etc/gitopsd/sops/age.agekey}
    verify:
      provider: ssh
      keysFrom:
        secretRef: {name: team-keys}
    allowedNamespaces: [production, monitoring]
    pruneGuard: 0.25
    allowPruneAll: true
    recreate: true
    takeOverManagers: [kubectl-client-side-apply, helm]
    suspend: true
    timeout: 90
    fetchTimeout: 45s
    rollback: {onUnhealthy: true}
    ignoreDifferences:
      - {group: apps, kind: Deployment, name: web-*, namespace: production, jsonPointers: [/spec/replicas],
         fields: ["metadata.annotations.example.com/injected"], managedFieldsManagers: [sidecar-injector]}
    ignoreManagers: [kube-controller-manager, my-autoscaler]
    dependsOn: [infra]
    serviceAccountName: web-deployer
    serviceAccountNamespace: web-ops
    healthCheckExprs:
      - apiVersion: cert-manager.io/v1
        kind: Certificate
        current: "status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'True')"
        inProgress: "status.?conditions.orValue([]).exists(e, e.type == 'Issuing' && e.status == 'True')"
        failed: "status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'False')"
    notify: [github]
webhook:
  secretFile: /etc/gitopsd/webhook/secret
ignoreManagers: []
notifiers:
  github:
    provider: github
    tokenFrom: {secretRef: {name: github-token}}
"""


def test_minimal_app_gets_defaults() -> None:
    app = one_app("""
        apps:
          - name: web
            repo: https://git.example.com/fleet.git
    """)
    # An app that names no ignoreManagers gets the file's (default: the HPA's kube-controller-manager).
    assert app == AppConfig(name="web", repo="https://git.example.com/fleet.git",
                            ignore_managers=("kube-controller-manager",))
    assert (app.ref, app.path, app.namespace, app.interval, app.timeout) == ("main", ".", "default", 60.0, 300.0)
    assert (app.prune, app.self_heal, app.render, app.prune_guard) == (True, True, "auto", 0.5)
    assert app.credentials is None and app.allowed_namespaces is None and not app.suspend
    assert app.create_namespace is False
    assert app.take_over_managers == ("kubectl-client-side-apply", "kubectl", "kubectl-create", "kubectl-edit",
                                      "kubectl-replace", "before-first-apply")


def test_take_over_managers_accepts_names_and_prefixes_and_an_empty_list_turns_it_off() -> None:
    app = one_app("apps: [{name: web, repo: r, takeOverManagers: [kubectl-*, helm, helm]}]")
    assert app.take_over_managers == ("kubectl-*", "helm")
    assert one_app("apps: [{name: web, repo: r, takeOverManagers: []}]").take_over_managers == ()


@pytest.mark.parametrize(("value", "problem"), [
    ("['*']", """takeOverManagers[0]: "*" would take over every controller's fields too"""),
    ("[kube*ctl]", """takeOverManagers[0]: "kube*ctl": '*' may only end a name (a prefix: kubectl-*)"""),
    ("['kubectl edit']", """takeOverManagers[0]: "kubectl edit" is not a field manager name"""),
    ("kubectl", "takeOverManagers: must be a list, not a string"),
    ("[5]", "takeOverManagers[0]: YAML reads 5 as a number, not a string; quote it"),
])
def test_a_bad_take_over_manager_names_the_field(value: str, problem: str) -> None:
    [found] = problems_of(f"apps: [{{name: web, repo: r, takeOverManagers: {value}}}]")
    assert found.startswith(f"apps[0] (web).{problem}"), found


def test_create_namespace_is_a_boolean_and_the_namespace_must_be_allowed() -> None:
    [found] = problems_of("apps: [{name: web, repo: r, createNamespace: 'yes'}]")
    assert found == 'apps[0] (web).createNamespace: "yes" is not a boolean (use true or false)'
    [found] = problems_of("apps: [{name: web, repo: r, namespace: web, createNamespace: true, "
                          "allowedNamespaces: [other]}]")
    assert found.startswith('apps[0] (web).namespace: "web" is not in allowedNamespaces [other]'), found


@pytest.mark.parametrize("text", ["apps: []\n", "apps: []\n# - name: web\n#   repo: r\n", "apps: []\nwebhook: {}\n"])
def test_apps_empty_list_is_the_explicit_way_to_run_no_apps(text: str) -> None:
    assert parse(text) == Config(apps=())


@pytest.mark.parametrize(("text", "problem"), [
    ("", "the file is empty"),
    ("   \n\n  \n", "the file is empty"),
    ("# only a comment\n", "the file has no content (only comments, or a null document)"),
    ("---\n# apps moved elsewhere\n", "the file has no content (only comments, or a null document)"),
    ("~\n", "the file has no content (only comments, or a null document)"),
])
def test_empty_config_text_is_an_error_not_no_apps(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, source="/etc/gitopsd/apps.yaml")
    assert info.value.problems == [problem]
    assert str(info.value).startswith("/etc/gitopsd/apps.yaml: invalid config")
    assert "apps: []" in info.value.hint


@pytest.mark.parametrize(("text", "problem"), [
    ("apps:\n", "apps: is empty; list the apps, or write `apps: []` to run none"),
    ("apps:\n#  - name: web\n#    repo: r\n", "apps: is empty; list the apps, or write `apps: []` to run none"),
    ("webhook: {secretFile: /s}\n", "apps: missing; list the apps, or write `apps: []` to run none"),
])
def test_config_without_an_apps_list_is_an_error(text: str, problem: str) -> None:
    assert problems_of(text) == [problem]


def test_missing_config_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == ["cannot read the file: it does not exist"]
    assert str(info.value).startswith(f"{path}: invalid config, 1 problem:")
    assert "apps: []" in info.value.hint


@pytest.mark.parametrize("content", ["", "  \n\n", "# apps: []\n"])
def test_empty_config_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"the file (is empty|has no content)") as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_explicit_empty_apps_file_loads_as_no_apps(tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text("# every app moved to the new cluster\napps: []\n")
    assert load(path) == Config(apps=())


def test_unreadable_config_file_is_an_error(tmp_path: Path) -> None:
    # Tests may run as root, whom file modes do not stop: a directory, a
    # symlink loop and bytes that are not UTF-8 are unreadable for anyone.
    (tmp_path / "dir.yaml").mkdir()
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"apps: []\n\xff\xfe")
    expected = {
        tmp_path / "dir.yaml": "cannot read the file: it is a directory, not a file",
        loop: "cannot read the file: it is a loop of symbolic links",
        binary: "not UTF-8 text (byte 9)",
    }
    for path, problem in expected.items():
        with pytest.raises(ConfigError) as info:
            load(path)
        assert info.value.problems == [problem], path


def test_config_file_without_read_permission_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text("apps: []\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):   # root: modes do not apply; the message path is proven by the OSError below
            error = PermissionError(13, "Permission denied")
            assert _os_problem(error) == "is not readable (permission denied)"
            return
        with pytest.raises(ConfigError) as info:
            load(path)
        assert info.value.problems == ["cannot read the file: it is not readable (permission denied)"]
    finally:
        path.chmod(0o644)


def test_full_app_round_trips_every_field() -> None:
    config = parse(FULL)
    assert config.apps[1:] == (AppConfig(
        name="web-production",
        repo="https://git.example.com/fleet.git",
        ref="v1.2.3",
        path="web/overlays/production",
        namespace="production",
        create_namespace=True,
        interval=5400.0,
        prune=False,
        self_heal=False,
        render="helm",
        helm=Helm(values_files=("values.yaml", "values-prod.yaml"), release_name="web"),
        allow_remote_bases=True,
        credentials=CredentialsRef(secret_ref=SecretRef(name="fleet-git")),
        decryption=Decryption(keys_from=KeysFrom(file=Path("/etc/gitopsd/sops/age.agekey"))),
        verify=Verify(provider="ssh",
                      keys_from=TrustedKeysFrom(secret_ref=TrustedKeysSecretRef(name="team-keys"))),
        allowed_namespaces=("production", "monitoring"),
        prune_guard=0.25,
        allow_prune_all=True,
        recreate=True,
        take_over_managers=("kubectl-client-side-apply", "helm"),
        suspend=True,
        timeout=90.0,
        fetch_timeout=45.0,
        rollback=Rollback(on_unhealthy=True),
        ignore_differences=(IgnoreDifference(group="apps", kind="Deployment", name="web-*", namespace="production",
                                             json_pointers=("/spec/replicas",),
                                             fields=("metadata.annotations.example.com/injected",),
                                             managed_fields_managers=("sidecar-injector",)),),
        ignore_managers=("kube-controller-manager", "my-autoscaler"),
        depends_on=("infra",),
        health_check_exprs=(HealthCheckExpr(
            api_version="cert-manager.io/v1", kind="Certificate",
            current="status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'True')",
            in_progress="status.?conditions.orValue([]).exists(e, e.type == 'Issuing' && e.status == 'True')",
            failed="status.?conditions.orValue([]).exists(e, e.type == 'Ready' && e.status == 'False')"),),
        service_account_name="web-deployer",
        service_account_namespace="web-ops",
        notify=("github",),
    ),)
    assert config.ignore_managers == ()
    assert config.webhook == WebhookConfig(secret_file=Path("/etc/gitopsd/webhook/secret"))
    assert config.app("web-production") is config.apps[1]
    assert config.app("nope") is None
    # Every field of AppConfig is set to a non-default value above, so a new
    # field without a file key shows up here.
    # (cluster, clusters and clusterSelector exclude each other: test_clusters_* cover them.)
    defaults = AppConfig(name="x", repo="y")
    same = [f.name for f in dataclasses.fields(AppConfig)
            if getattr(config.apps[1], f.name) == getattr(defaults, f.name)]
    assert same == ["cluster", "clusters", "cluster_selector"]


def test_file_based_credentials() -> None:
    app = one_app("""
        apps:
          - name: web
            repo: git@git.example.com:fleet.git
            credentials:
              sshKeyFile: /etc/gitopsd/git/identity
              knownHostsFile: /etc/gitopsd/git/known_hosts
              username: deploy
    """)
    assert app.credentials == CredentialsRef(ssh_key_file=Path("/etc/gitopsd/git/identity"),
                                             known_hosts_file=Path("/etc/gitopsd/git/known_hosts"),
                                             username="deploy")


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("1m", 60.0), ("1h30m", 5400.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2m30s", 150.0),
    (90, 90.0), (2.5, 2.5), ("90", 90.0), (" 1m ", 60.0), (0, 0.0), ("7d", 604800.0), ("2w", 1209600.0),
    ("1d12h", 129600.0), ("3650d", 315360000.0),
])
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["abc", "", "1m30", "-1m", "-5", "1y", "m", "1 m", True, None, [1], float("inf"),
                                   -5, "9" * 400, "3651d", "99999999999h"])
def test_invalid_durations_say_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    message = str(info.value)
    assert "negative" in message or "use 30s, 1m, 1h30m" in message or "is too long: at most 3650d" in message


def test_durations_are_parsed_by_one_function_for_file_flags_and_ages() -> None:
    from datetime import datetime, timedelta, timezone

    from gitopsd import audit, cli

    now = datetime(2026, 11, 20, 14, tzinfo=timezone.utc)
    for text in ("90s", "5m", "1h30m", "7d", "2w", "300"):
        seconds = parse_duration(text)
        assert one_app(f"apps: [{{name: web, repo: r, timeout: '{text}'}}]").timeout == seconds
        assert cli.build_parser().parse_args(["sync", "--repo", "r", f"--timeout={text}"]).timeout == seconds
        if text != "300":   # an age needs a unit: a bare 300 is no instant
            assert audit.parse_time(text, now=now) == now - timedelta(seconds=seconds)


@pytest.mark.parametrize(("value", "expected"), [(0.5, 0.5), (1, 1.0), ("0.99", 0.99), (".25", 0.25)])
def test_prune_guard_share_accepts_zero_to_one(value: object, expected: float) -> None:
    assert check_share(value) == expected


@pytest.mark.parametrize("value", [0, 50, "50", 1.01, -0.5, "nan", "inf", "half", True, None])
def test_prune_guard_share_refuses_anything_outside_zero_to_one(value: object) -> None:
    with pytest.raises(ValueError, match=r"is out of range: use a share with 0 < x <= 1|is not a number"):
        check_share(value)


def test_every_problem_is_reported_with_app_and_field() -> None:
    problems = problems_of("""
        apps:
          - name: ok
            repo: https://git.example.com/fleet.git
          - name: web-production
            repo: https://git.example.com/fleet.git
            interval: abc
            prune: "yes"
            render: jsonnet
            pruneGuard: 1.5
            timeout: 0s
            fetchTimeout: 500ms
            ref: 1234567
            path: /etc
            namespace: Production
          - repo: https://git.example.com/fleet.git
          - name: Web_Prod
            repo: https://git.example.com/fleet.git
            interval: 1s
          - just a string
        extra: 1
    """)
    assert problems == [
        'apps[1] (web-production).ref: YAML reads 1234567 as a number, not a string; quote it',
        'apps[1] (web-production).path: "/etc" is absolute; give the path relative to the repository root',
        'apps[1] (web-production).namespace: "Production" is not a valid namespace: use lower-case letters, '
        "digits and '-', starting and ending with a letter or digit, at most 63 characters",
        'apps[1] (web-production).interval: "abc" is not a duration (use 30s, 1m, 1h30m; units ms, s, m, h, d, w)',
        'apps[1] (web-production).prune: "yes" is not a boolean (use true or false)',
        'apps[1] (web-production).render: "jsonnet" is not one of auto, plain, kustomize, helm',
        "apps[1] (web-production).pruneGuard: 1.5 is out of range: use a share with 0 < x <= 1 "
        "(0.5: refuse to prune more than half of the app's objects at once)",
        'apps[1] (web-production).timeout: "0s" is too short: at least 1s '
        "(the health wait needs time to see a rollout)",
        'apps[1] (web-production).fetchTimeout: "500ms" is too short: at least 1s '
        "(a fetch needs time to connect to the remote)",
        "apps[2].name: missing",
        'apps[3] (Web_Prod).name: "Web_Prod" is not a valid app name: use lower-case letters, digits and '
        "'-', starting and ending with a letter or digit, at most 40 characters",
        'apps[3] (Web_Prod).interval: "1s" is too short: at least 5s '
        "(polling faster only loads the Git server; use the webhook for fast pickup)",
        "apps[4]: must be a mapping with at least name and repo, not a string",
        "extra: unknown field; known fields: apps, webhook, ignoreManagers, defaultServiceAccountName, clusters, "
            "notifiers, notify",
    ]


def test_config_error_lists_every_problem_and_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse("apps:\n  - name: a\n  - name: b\n", source="/etc/gitopsd/config.yaml")
    text = str(info.value)
    assert text.startswith("/etc/gitopsd/config.yaml: invalid config, 2 problems:")
    assert "  - apps[0] (a).repo: missing" in text and "  - apps[1] (b).repo: missing" in text


def test_app_name_longer_than_40_characters_is_refused() -> None:
    name = "a" * 41
    [problem] = problems_of(f"apps: [{{name: {name}, repo: r}}]")
    assert problem.endswith("at most 40 characters")
    assert one_app(f"apps: [{{name: {'a' * 40}, repo: r}}]").name == "a" * 40


@pytest.mark.parametrize(("typo", "field"), [
    ("selfheal", "selfHeal"), ("self_heal", "selfHeal"), ("prune_guard", "pruneGuard"),
    ("namesapce", "namespace"), ("intervall", "interval"), ("allowedNamespace", "allowedNamespaces"),
])
def test_unknown_field_suggests_the_right_name(typo: str, field: str) -> None:
    [problem] = problems_of(f"""
        apps:
          - name: web
            repo: https://git.example.com/fleet.git
            {typo}: true
    """)
    assert problem == f"apps[0] (web).{typo}: unknown field; did you mean {field}?"


def test_unknown_nested_fields_are_refused_too() -> None:
    problems = problems_of("""
        apps:
          - name: web
            repo: r
            helm: {valueFiles: [v.yaml]}
            credentials: {secretRef: {nme: fleet}}
        webhook: {secretfile: /x}
    """)
    assert problems == [
        "apps[0] (web).helm.valueFiles: unknown field; did you mean valuesFiles?",
        "apps[0] (web).credentials.secretRef.name: missing",
        "apps[0] (web).credentials.secretRef.nme: unknown field; did you mean name?",
        "webhook.secretfile: unknown field; did you mean secretFile?",
    ]


def test_duplicate_app_names_are_refused() -> None:
    problems = problems_of("""
        apps:
          - {name: web, repo: a}
          - {name: api, repo: a}
          - {name: web, repo: b}
    """)
    assert problems == ["apps[2] (web).name: duplicate of apps[0]; app names must be unique "
                        "(the name is the app's inventory)"]


def test_depends_on_names_apps_of_the_file() -> None:
    config = parse(textwrap.dedent("""
        apps:
          - {name: web, repo: r, dependsOn: [infra, crds, infra]}
          - {name: infra, repo: r, dependsOn: [crds]}
          - {name: crds, repo: r}
    """))
    assert [a.depends_on for a in config.apps] == [("infra", "crds"), ("crds",), ()]   # a repeat changes nothing
    assert problems_of("""
        apps:
          - {name: web, repo: r, dependsOn: [infra]}
          - {name: db, repo: r}
    """) == ['apps[0] (web).dependsOn[0]: "infra" is no app of this file (apps: db)']


def test_a_dependency_cycle_is_rejected_at_load_naming_the_cycle() -> None:
    assert problems_of("""
        apps:
          - {name: web, repo: r, dependsOn: [api]}
          - {name: api, repo: r, dependsOn: [db]}
          - {name: db, repo: r, dependsOn: [web]}
          - {name: lone, repo: r, dependsOn: [lone]}
    """) == ["apps[0] (web).dependsOn: a dependency cycle: web waits for itself: web -> api -> db -> web; the apps of "
             "a cycle would wait for each other for ever, remove one of its dependsOn entries",
             "apps[3] (lone).dependsOn: a dependency cycle: lone depends on itself; the apps of a cycle would wait "
             "for each other for ever, remove one of its dependsOn entries"]


def test_a_dependency_cycle_is_reported_with_every_other_problem() -> None:
    problems = problems_of("""
        apps:
          - {name: web, repo: r, dependsOn: [api], interval: 1s}
          - {name: api, repo: r, dependsOn: [web]}
    """)
    assert problems[0].startswith('apps[0] (web).interval: "1s" is too short')
    assert problems[1].startswith("apps[0] (web).dependsOn: a dependency cycle: web waits for itself: "
                                  "web -> api -> web")


def test_a_dependency_cycle_is_refused_in_code_too() -> None:
    with pytest.raises(ValidationError, match="a dependency cycle: a waits for itself: a -> b -> a"):
        Config(apps=(AppConfig(name="a", repo="r", depends_on=("b",)),
                     AppConfig(name="b", repo="r", depends_on=("a",))))


def test_duplicate_yaml_keys_are_refused_with_lines() -> None:
    problems = problems_of("""\
        apps:
          - name: web
            repo: r
            prune: false
            prune: true
    """)
    assert problems == ["line 5: key 'prune' appears again (first at line 4); "
                        "YAML would silently keep only the last one"]


@pytest.mark.parametrize(("snippet", "field"), [
    ("token: ghp_s3cr3t", "token"),
    ("password: s3cr3t", "password"),
    ("credentials: {token: ghp_s3cr3t}", "credentials.token"),
    ("credentials: {password: s3cr3t, username: bot}", "credentials.password"),
    ("credentials: {sshKey: s3cr3t}", "credentials.sshKey"),
])
def test_inline_secret_in_config_is_refused(snippet: str, field: str) -> None:
    problems = problems_of(f"apps:\n  - name: web\n    repo: r\n    {snippet}\n")
    assert problems[0].startswith(f"apps[0] (web).{field}: inline secrets are refused")
    assert "secretRef" in problems[0]
    assert not any("s3cr3t" in p for p in problems)


def test_password_in_repository_url_is_refused_without_echoing_it() -> None:
    [problem] = problems_of("apps: [{name: web, repo: 'https://bot:s3cr3t@git.example.com/fleet.git'}]")
    assert "carries a password" in problem and "https://git.example.com/fleet.git" in problem
    assert "s3cr3t" not in problem


def test_inline_webhook_secret_is_refused() -> None:
    [problem] = problems_of("apps: []\nwebhook: {secret: s3cr3t}")
    assert problem.startswith("webhook.secret: inline secrets are refused")
    assert "GITOPSD_WEBHOOK_SECRET" in problem and "s3cr3t" not in problem


@pytest.mark.parametrize(("credentials", "expected"), [
    ("{secretRef: {name: fleet}, tokenFile: /t}",
     "credentials.secretRef: use either secretRef or files (tokenFile), not both"),
    ("{}", "credentials.secretRef: missing: name a Secret"),
    ("{knownHostsFile: /k}", "credentials.tokenFile: missing: without tokenFile, sshKeyFile or caFile"),
    ("{tokenFile: /t, username: a, usernameFile: /u}", "credentials.usernameFile: use either username or"),
    ("{secretRef: {name: fleet, namespace: other}}", "credentials.secretRef.namespace: not allowed"),
    ("{tokenFile: token}", 'credentials.tokenFile: "token" is relative; give an absolute path'),
])
def test_credentials_are_one_kind_of_reference(credentials: str, expected: str) -> None:
    [problem] = problems_of(f"apps: [{{name: web, repo: r, credentials: {credentials}}}]")
    assert problem.startswith(f"apps[0] (web).{expected}")


def test_relative_file_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gitopsd.yaml"
    path.write_text("apps: [{name: web, repo: r, credentials: {tokenFile: git/token}}]\n"
                    "webhook: {secretFile: hook}\n")
    config = load(path)
    assert config.apps[0].credentials == CredentialsRef(token_file=tmp_path / "git" / "token")
    assert config.webhook.secret_file == tmp_path / "hook"


def test_helm_settings_need_a_helm_renderer() -> None:
    [problem] = problems_of("apps: [{name: web, repo: r, render: kustomize, helm: {releaseName: web}}]")
    assert problem == "apps[0] (web).helm: only used with render helm or auto, and render is kustomize"
    assert one_app("apps: [{name: web, repo: r, helm: {valuesFiles: [v.yaml]}}]").helm_values == ("v.yaml",)


def test_remote_bases_are_off_unless_the_app_opts_in() -> None:
    default = one_app("apps: [{name: web, repo: r}]")
    assert default.allow_remote_bases is False
    assert default.to_spec(inventory_namespace="gitopsd-system").allow_remote_bases is False
    opted_in = one_app("apps: [{name: web, repo: r, render: kustomize, allowRemoteBases: true}]")
    assert opted_in.to_spec(inventory_namespace="gitopsd-system").allow_remote_bases is True
    [problem] = problems_of("apps: [{name: web, repo: r, allowRemoteBases: 'yes'}]")
    assert problem == 'apps[0] (web).allowRemoteBases: "yes" is not a boolean (use true or false)'


def test_allowed_namespaces_must_include_target_namespace() -> None:
    problems = problems_of("""
        apps:
          - {name: a, repo: r, namespace: staging, allowedNamespaces: [production]}
          - {name: b, repo: r, allowedNamespaces: [production]}
          - {name: c, repo: r, namespace: x, allowedNamespaces: []}
          - {name: d, repo: r, allowedNamespaces: [Bad_NS, default]}
    """)
    assert problems == [
        'apps[0] (a).namespace: "staging" is not in allowedNamespaces [production]',
        'apps[1] (b).namespace: "default" is not in allowedNamespaces [production] (the default); '
        "set namespace to one of them",
        "apps[2] (c).allowedNamespaces: is an empty list: the app could write nowhere; remove the key to allow any",
        'apps[3] (d).allowedNamespaces[0]: "Bad_NS" is not a valid namespace: use lower-case letters, digits '
        "and '-', starting and ending with a letter or digit, at most 63 characters",
    ]
    app = one_app("apps: [{name: a, repo: r, namespace: production, allowedNamespaces: [production, production]}]")
    assert app.allowed_namespaces == ("production",)


@pytest.mark.parametrize(("text", "line"), [
    ("apps:\n  - name: web\n    repo: r\n   prune: true\n", 4),
    ("apps:\n  - name: web\n    repo: 'unclosed\n", 3),
    ("apps: [{name: web, repo: r}\n", 2),
])
def test_yaml_syntax_error_names_the_line(text: str, line: int) -> None:
    [problem] = problems_of(text)
    assert problem.startswith("line ") and "invalid YAML" in problem
    assert f"line {line}" in problem


def test_diff_reports_added_removed_changed_apps() -> None:
    old = parse("""
        apps:
          - {name: web, repo: r}
          - {name: api, repo: r, interval: 1m}
          - {name: old, repo: r}
          - {name: same, repo: r}
    """)
    new = parse("""
        apps:
          - {name: new, repo: r}
          - {name: same, repo: r}
          - {name: api, repo: r, interval: 2m}
          - {name: web, repo: r, suspend: true}
        webhook: {secretFile: /s}
    """)
    assert diff(old, new) == ConfigChange(added=("new",), removed=("old",), changed=("api", "web"),
                                          webhook_changed=True)
    assert diff(new, new).empty
    assert diff(Config(apps=()), Config(apps=())) == ConfigChange()


def test_apps_get_the_files_ignore_managers_unless_they_name_their_own_and_a_change_of_it_changes_them():
    old = parse("""
        apps:
          - {name: web, repo: r}
          - {name: api, repo: r, ignoreManagers: [my-autoscaler]}
    """)
    assert [a.ignore_managers for a in old.apps] == [("kube-controller-manager",), ("my-autoscaler",)]
    new = parse("""
        ignoreManagers: []
        apps:
          - {name: web, repo: r}
          - {name: api, repo: r, ignoreManagers: [my-autoscaler]}
    """)
    assert new.apps[0].ignore_managers == () and new.apps[0].ignore.managers == frozenset()
    assert diff(old, new) == ConfigChange(changed=("web",)), "a reload re-runs the apps that inherit it"


def test_a_bad_ignore_rule_is_a_config_error_naming_the_field() -> None:
    problems = problems_of("""
        apps:
          - name: web
            repo: r
            ignoreDifferences:
              - {kind: Deployment, name: web, jsonPointers: [spec/replicas]}
              - {kind: Deployment, fields: ["spec.containers[x].image"]}
              - {kind: Deployment}
              - {kind: Deployment, jqPathExpressions: [.spec.replicas]}
              - {kind: Deployment, jsonPointers: [/metadata/name]}
    """)
    assert problems == [
        'apps[0] (web).ignoreDifferences[0] (web).jsonPointers[0]: "spec/replicas" is not a JSON pointer: it '
        "must start with '/' (e.g. /spec/replicas)",
        'apps[0] (web).ignoreDifferences[1].fields[0]: "spec.containers[x].image" is not a field path: a list '
        "item is [N] or [*], followed by '.', another item or the end",
        "apps[0] (web).ignoreDifferences[2].jsonPointers: missing: the rule ignores nothing; name fields "
        "(jsonPointers or fields) or managers (managedFieldsManagers)",
        "apps[0] (web).ignoreDifferences[3].jqPathExpressions: not supported (gitopsd has no jq); name the fields "
        "with jsonPointers (/spec/template/spec/containers/*/image) or fields "
        "(spec.template.spec.containers[*].image)",
        'apps[0] (web).ignoreDifferences[4].jsonPointers[0]: "/metadata/name" names the object\'s identity '
        "(apiVersion, kind, metadata.name, metadata.namespace), which cannot be ignored",
    ]


def test_to_spec_carries_every_setting() -> None:
    app = parse(FULL).apps[1]
    creds = source.Credentials(username="bot", token="t")
    keys = decrypt.Keys(age=("AGE-SECRET-KEY-1QQQ",))
    trusted = signature.TrustedKeys(provider="ssh", entries=(("alice.pub", f"ssh-ed25519 {'A' * 68} alice"),),
                                    origin="Secret gitopsd-system/team-keys")
    spec = app.to_spec(inventory_namespace="gitopsd-system", credentials=creds, decryption_keys=keys,
                       trusted_keys=trusted)
    assert spec == AppSpec(
        name="web-production", repo="https://git.example.com/fleet.git", ref="v1.2.3",
        path="web/overlays/production", namespace="production", create_namespace=True, interval=5400.0,
        prune=False, self_heal=False,
        render="helm", helm=Helm(values_files=("values.yaml", "values-prod.yaml"), release_name="web"),
        allow_remote_bases=True, prune_guard=0.25, allow_prune_all=True, recreate=True,
        take_over_managers=("kubectl-client-side-apply", "helm"), suspend=True, timeout=90.0, fetch_timeout=45.0,
        rollback=Rollback(on_unhealthy=True), credentials=creds, decryption=app.decryption, decryption_keys=keys,
        verify=app.verify, trusted_keys=trusted,
        inventory_namespace="gitopsd-system", allowed_namespaces=("production", "monitoring"),
        ignore_differences=app.ignore_differences, ignore_managers=("kube-controller-manager", "my-autoscaler"),
        depends_on=("infra",), health_check_exprs=app.health_check_exprs,
        service_account_name="web-deployer", service_account_namespace="web-ops", notify=("github",),
    )
    # Every AppSpec field is either carried from the config or given by the caller.
    given = {"credentials", "decryption_keys", "trusted_keys", "inventory_namespace"}
    for f in dataclasses.fields(AppSpec):
        assert f.name in given or getattr(spec, f.name) == getattr(app, f.name), f.name


def test_to_spec_refuses_to_drop_named_credentials() -> None:
    app = parse(FULL).apps[1]
    with pytest.raises(ValueError, match="names credentials"):
        app.to_spec(inventory_namespace="gitopsd-system")


def test_to_spec_refuses_to_drop_the_keys_of_an_app_that_verifies_signatures() -> None:
    app = parse(FULL).apps[1]
    with pytest.raises(ValueError, match="verifies commit signatures"):
        app.to_spec(inventory_namespace="gitopsd-system", credentials=source.Credentials(token="t"),
                    decryption_keys=decrypt.Keys(age=("AGE-SECRET-KEY-1QQQ",)))


def test_verify_takes_a_provider_and_keys_from_a_secret_or_a_file(tmp_path: Path) -> None:
    config = parse(textwrap.dedent("""
        apps:
          - name: web
            repo: r
            verify: {provider: openpgp, keysFrom: {secretRef: {name: team-keys, namespace: keys}}}
          - name: api
            repo: r
            verify: {provider: ssh, keysFrom: {file: keys/allowed}}
    """), base_dir=tmp_path)
    assert config.apps[0].verify == Verify(provider="openpgp", keys_from=TrustedKeysFrom(
        secret_ref=TrustedKeysSecretRef(name="team-keys", namespace="keys")))
    assert config.apps[1].verify == Verify(provider="ssh",
                                           keys_from=TrustedKeysFrom(file=tmp_path / "keys/allowed"))


def test_verify_problems_name_the_field_and_what_to_write() -> None:
    assert problems_of("""
        apps:
          - {name: a, repo: r, verify: {provider: gpg, keysFrom: {secretRef: {name: k}}}}
          - {name: b, repo: r, verify: {provider: ssh, keysFrom: {secretRef: {name: k}, file: /keys}}}
          - {name: c, repo: r, verify: {provider: ssh, keysFrom: {}}}
          - {name: d, repo: r, verify: {provider: ssh}}
          - {name: e, repo: r, verify: {provider: ssh, keysFrom: {secretRef: {name: k}}, keys: x}}
    """) == [
        'apps[0] (a).verify.provider: "gpg" is not one of ssh, openpgp',
        "apps[1] (b).verify.keysFrom.secretRef: use either secretRef or file, not both",
        "apps[2] (c).verify.keysFrom.secretRef: missing: name a Secret of public keys (secretRef: {name: ...}) "
        "or a file or directory of them (file: /path)",
        "apps[3] (d).verify.keysFrom: missing",
        "apps[4] (e).verify.keys: unknown field; did you mean keysFrom?",
    ]


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gitopsd.yaml"
    path.write_text(FULL)
    assert load(path) == parse(FULL)
    path.write_text("apps: [{name: web}]\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: invalid config, 1 problem:")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------
# One app model: the file's schema is the engine's spec


def test_engine_spec_is_the_app_model_plus_run_time_parts() -> None:
    spec_fields = [f.name for f in dataclasses.fields(AppSpec)]
    app_fields = [f.name for f in dataclasses.fields(AppConfig)]
    # Every field once: the app's own, then what only exists at run time.
    assert issubclass(AppSpec, AppConfig)
    assert spec_fields == [*app_fields, "decryption_keys", "trusted_keys", "inventory_namespace"]
    assert len(set(spec_fields)) == len(spec_fields)
    # `credentials` is the one field whose meaning the spec narrows: the resolved values, not where they are.
    assert AppConfig.__pydantic_fields__["credentials"].annotation != AppSpec.__pydantic_fields__["credentials"].annotation


def test_engine_spec_is_checked_like_the_file() -> None:
    spec = AppSpec(name="web", repo="r", timeout=90.0)
    assert (spec.ref, spec.prune_guard, spec.inventory_namespace) == ("main", 0.5, "gitopsd-system")
    for bad in ({"name": "Web_Prod"}, {"timeout": 0.5}, {"prune_guard": 50.0}, {"prune": "yes"}, {"ref": "a b"},
                {"inventory_namespace": "Bad_NS"}, {"credentials": "ghp_token"}):
        with pytest.raises(ValidationError):
            AppSpec(**{"name": "web", "repo": "r", **bad})
    # dataclasses.replace keeps working, and checks too.
    assert dataclasses.replace(spec, prune_guard=1.0).prune_guard == 1.0
    with pytest.raises(ValidationError):
        dataclasses.replace(spec, prune_guard=0.0)


def test_python_field_names_are_refused_in_the_file_but_work_in_code() -> None:
    [problem] = problems_of("apps: [{name: web, repo: r, allow_prune_all: true}]")
    assert problem == "apps[0] (web).allow_prune_all: unknown field; did you mean allowPruneAll?"
    assert AppConfig(name="web", repo="r", allow_prune_all=True).allow_prune_all is True


@pytest.mark.parametrize(("snippet", "problem"), [
    ("helm:", "apps[0] (web).helm: is empty; give a value or remove the key"),
    ("credentials:", "apps[0] (web).credentials: is empty; give a value or remove the key"),
    ("ref:", "apps[0] (web).ref: is empty; give a value or remove the key"),
    ("allowedNamespaces:", "apps[0] (web).allowedNamespaces: is empty; give a value or remove the key"),
    ("ref: ''", "apps[0] (web).ref: is empty; give a value or remove the key"),
    ("helm: {releaseName: }", "apps[0] (web).helm.releaseName: is empty; give a value or remove the key"),
])
def test_an_empty_value_is_an_error_not_the_default(snippet: str, problem: str) -> None:
    assert problems_of(f"apps:\n  - name: web\n    repo: r\n    {snippet}\n") == [problem]


def test_an_empty_webhook_section_means_no_webhook_settings() -> None:
    assert parse("apps: []\nwebhook:\n").webhook == WebhookConfig()


@pytest.mark.parametrize(("snippet", "problem"), [
    ("ref: 2024-01-01", "ref: YAML reads 2024-01-01 as a date, not a string; quote it"),
    ("ref: [main]", "ref: must be a string, not a list"),
    ("suspend: 1", "suspend: 1 is not a boolean (use true or false)"),
    ("pruneGuard: '0.5'", 'pruneGuard: "0.5" is not a number'),
    ("pruneGuard: .nan", "pruneGuard: nan is not a number"),
    ("allowedNamespaces: web", "allowedNamespaces: must be a list, not a string"),
    ("allowedNamespaces: [web, 5]", "allowedNamespaces[1]: YAML reads 5 as a number, not a string; quote it"),
    ("helm: {valuesFiles: [../../etc/passwd]}", """helm.valuesFiles[0]: "../../etc/passwd" leaves the repository"""),
    ("helm: [a]", "helm: must be a mapping, not a list"),
    ("credentials: {secretRef: fleet}", "credentials.secretRef: must be a mapping, not a string"),
    ("interval: 1y", 'interval: "1y" is not a duration (use 30s, 1m, 1h30m; units ms, s, m, h, d, w)'),
    ("timeout: -5", "timeout: -5 is negative; a duration is 0 or more"),
    ("interval: 99999999h", 'interval: "99999999h" is too long: at most 3650d'),
    ("1: x", "1: unknown field; known fields: name, repo, ref,"),
])
def test_wrong_types_and_values_name_file_app_and_field(tmp_path: Path, snippet: str, problem: str) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(f"apps:\n  - name: web\n    repo: r\n    {snippet}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    [found] = info.value.problems
    assert found.startswith(f"apps[0] (web).{problem}"), found
    assert str(info.value).startswith(f"{path}: invalid config, 1 problem:")


def test_duplicate_names_are_reported_with_every_other_problem() -> None:
    problems = problems_of("""
        apps:
          - {name: web, repo: a, prune: maybe}
          - {name: web, repo: b}
    """)
    assert problems == [
        'apps[0] (web).prune: "maybe" is not a boolean (use true or false)',
        "apps[1] (web).name: duplicate of apps[0]; app names must be unique (the name is the app's inventory)",
    ]


def test_a_file_that_is_not_a_mapping_says_what_it_must_be() -> None:
    assert problems_of("- name: web\n  repo: r\n") == ["the file must be a mapping with an 'apps:' list, not a list"]


# --------------------------------------------------------------------------
# `gitopsd config schema` / `gitopsd config validate`

ROOT = Path(__file__).resolve().parent.parent


def run_gitopsd(*args: str) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it (no cluster needed for `config`)."""
    return subprocess.run([sys.executable, "-m", "gitopsd", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": "/nonexistent"})


def sample_configs(tmp_path: Path) -> dict[str, str]:
    """Every config file we ship or document: deploy/'s ConfigMaps, the quick start's, the README's example."""
    from quickstart import write_config   # hack/ is on sys.path (conftest)

    configs = {}
    for path in sorted((ROOT / "deploy").rglob("config.yaml")):
        configs[str(path.relative_to(ROOT))] = yaml.safe_load(path.read_text())["data"]["config.yaml"]
    write_config(tmp_path / "quickstart.yaml", tmp_path / "fleet.git")
    configs["hack/quickstart.py"] = (tmp_path / "quickstart.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    examples = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S) if re.search(r"^apps:", block, re.M)]
    configs.update({f"README.md example {i}": block for i, block in enumerate(examples, 1)})
    return configs


@pytest.fixture(scope="module")
def config_schema() -> dict:
    proc = run_gitopsd("config", "schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_schema_command_prints_a_json_schema_that_accepts_the_sample_configs(config_schema, tmp_path) -> None:
    validator = jsonschema.Draft202012Validator(config_schema)
    configs = sample_configs(tmp_path)
    assert len(configs) >= 5, configs.keys()
    for name, text in configs.items():
        data = yaml.safe_load(text)
        assert list(validator.iter_errors(data)) == [], name
        assert parse(text, source=name).apps, name   # and the model agrees


@pytest.mark.parametrize(("edit", "rejected_at"), [
    ({"selfheal": True}, "selfheal"),                     # an unknown key
    ({"prune": "yes"}, "prune"),                          # a wrong type
    ({"interval": "1y"}, "interval"),                     # not a duration
    ({"interval": 2}, "interval"),                        # under the minimum
    ({"name": "Web_Prod"}, "name"),                       # not a DNS label
    ({"path": "/etc"}, "path"),                           # absolute
    ({"pruneGuard": 50}, "pruneGuard"),                   # a share is at most 1
    ({"render": "jsonnet"}, "render"),
    ({"helm": {"valueFiles": ["v.yaml"]}}, "valueFiles"),
    ({"allowedNamespaces": []}, "allowedNamespaces"),
    ({"credentials": {"secretRef": {"name": "fleet", "namespace": "other"}}}, "namespace"),
    ({"decryption": {"provider": "vault", "keysFrom": {"secretRef": {"name": "k"}}}}, "provider"),
    ({"decryption": {"provider": "sops"}}, "keysFrom"),
    ({"ignoreDifferences": [{"kind": "Deployment", "jsonPointers": ["spec/replicas"]}]}, "jsonPointers"),
    ({"ignoreDifferences": [{"kind": "Deployment", "jqPathExpressions": [".spec"]}]}, "jqPathExpressions"),
])
def test_schema_rejects_what_the_model_rejects(config_schema, edit: dict, rejected_at: str) -> None:
    validator = jsonschema.Draft202012Validator(config_schema)
    data = {"apps": [{"name": "web", "repo": "https://git.example.com/fleet.git", **edit}]}
    errors = list(validator.iter_errors(data))
    assert errors, edit
    assert any(rejected_at in str(e.path) or rejected_at in e.message for e in errors), [e.message for e in errors]
    with pytest.raises(ConfigError):
        parse(json.dumps(data))
    assert list(validator.iter_errors({"apps": [], "extra": 1})) != []
    assert list(validator.iter_errors({"webhook": {}})) != [], "apps is required"


def test_schema_documents_every_field_of_the_file(config_schema) -> None:
    app = config_schema["$defs"]["AppConfig"]
    assert set(app["properties"]) == set(FULL_KEYS)
    assert app["required"] == ["name", "repo"]
    undocumented = [key for key, prop in app["properties"].items() if not prop.get("description")]
    assert undocumented == []
    assert app["properties"]["interval"]["default"] == 60.0 and app["properties"]["ref"]["default"] == "main"


FULL_KEYS = ("name", "repo", "ref", "path", "namespace", "createNamespace", "interval", "prune", "selfHeal", "render",
             "helm", "allowRemoteBases", "credentials", "decryption", "verify", "allowedNamespaces", "pruneGuard", "allowPruneAll", "recreate",
             "takeOverManagers", "suspend", "timeout", "fetchTimeout", "rollback", "ignoreDifferences", "ignoreManagers", "dependsOn",
             "healthCheckExprs", "serviceAccountName", "serviceAccountNamespace", "cluster", "clusters",
             "clusterSelector", "notify")


def test_validate_command_exits_0_for_a_valid_file_and_1_naming_every_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(FULL)
    proc = run_gitopsd("config", "validate", str(good))
    assert (proc.returncode, proc.stdout.strip()) == (0, f"{good}: valid, 2 apps: infra, web-production")

    bad = tmp_path / "bad.yaml"
    bad.write_text("apps:\n  - {name: web, repo: r, selfheal: false, interval: 1s}\n")
    proc = run_gitopsd("config", "validate", str(bad))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"{bad}: invalid config, 2 problems:")
    assert "apps[0] (web).interval: \"1s\" is too short" in proc.stdout
    assert "apps[0] (web).selfheal: unknown field; did you mean selfHeal?" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

    as_json = json.loads(run_gitopsd("config", "validate", str(bad), "-o", "json").stdout)
    assert as_json["valid"] is False and len(as_json["problems"]) == 2

    missing = run_gitopsd("config", "validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml: does not exist" in missing.stderr
