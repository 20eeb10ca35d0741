"""A Git server whose certificate a private CA signed (a self-hosted GitLab or Gitea, say).

git trusts the system's CAs, which do not include such a CA: the app gives
it as `ca.crt` in its credentials Secret (Flux's key) or as
`credentials.caFile`, and gitopsd hands it to git as http.sslCAInfo, in
place of the system's bundle. Without it the fetch fails naming the TLS
failure and what to do; with another CA the same, naming the bundle given.

Against a real https smart-HTTP server (tests/gitserver.py) with a CA and a
server certificate made by openssl (tests/receivers.py TLSFiles).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gitserver import GitHTTPServer
from helpers import GitRepo, app_entry, configmap, gitopsd_json, put_secret, wait_transition, write_config
from receivers import TLSFiles
from test_source import TOKEN, Upstream, git_identity, tree_of  # noqa: F401 - git_identity is autouse

from gitopsd.engine.source import Credentials, fetch
from gitopsd.engine.source_share import key_of
from gitopsd.errors import SourceError


@pytest.fixture
def private_ca(tmp_path) -> TLSFiles:
    return TLSFiles.make(tmp_path / "pki")


@pytest.fixture
def other_ca(tmp_path) -> TLSFiles:
    return TLSFiles.make(tmp_path / "other-pki")


def https_server(root: Path, ca: TLSFiles) -> GitHTTPServer:
    return GitHTTPServer(root=root, username="deploy", token=TOKEN, tls=ca).start()


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path / "upstream")


# ---------------------------------------------------------------- the fetch


def test_an_https_remote_of_a_private_ca_is_fetched_with_that_ca_and_refused_without_it(
        upstream, private_ca, other_ca, tmp_path):
    sha = upstream.commit({"f": "1"})
    server = https_server(tmp_path / "upstream", private_ca)
    url = server.url("remote.git")
    cache = tmp_path / "cache"
    try:
        with pytest.raises(SourceError) as untrusted:
            fetch(url, "main", cache_dir=cache, credentials=Credentials(username="deploy", token=TOKEN))
        with pytest.raises(SourceError) as wrong_ca:
            fetch(url, "main", cache_dir=cache,
                  credentials=Credentials(username="deploy", token=TOKEN, ca_file=other_ca.ca))
        ok = fetch(url, "main", cache_dir=cache,
                   credentials=Credentials(username="deploy", token=TOKEN, ca_file=private_ca.ca))
    finally:
        server.stop()

    assert ok.revision.sha == sha and tree_of(ok) == {"f": "1"}
    host = url.split("/")[2]
    for error in (untrusted.value, wrong_ca.value):
        assert error.message.startswith(f"the TLS certificate of {host} could not be verified while fetching "
                                        f"ref 'main' from {url}: "), error.message
        assert TOKEN not in str(error)
    assert "ca.crt" in untrusted.value.hint and "caFile" in untrusted.value.hint
    assert "ca.pem" in wrong_ca.value.hint and "does not chain" in wrong_ca.value.hint


def test_apps_of_one_remote_with_different_cas_do_not_share_a_fetch(private_ca, other_ca):
    url = "https://git.example.com/fleet.git"
    one = key_of(url, "main", credentials=Credentials(token=TOKEN, ca_file=private_ca.ca))
    same = key_of(url, "main", credentials=Credentials(token=TOKEN, ca_file=private_ca.ca))
    other = key_of(url, "main", credentials=Credentials(token=TOKEN, ca_file=other_ca.ca))
    none = key_of(url, "main", credentials=Credentials(token=TOKEN))
    assert one == same and len({one, other, none}) == 3


# ---------------------------------------------------------------- the daemon


def test_the_daemon_fetches_with_the_ca_of_the_credentials_secret_and_names_a_bad_one(
        private_ca, kube, namespace, tmp_path, start_daemon):
    repo = GitRepo(tmp_path / "git")
    repo.write("cm.yaml", configmap("from-private-forge", {"v": "1"}))
    sha = repo.commit("a ConfigMap")
    server = https_server(repo.bare.parent, private_ca)
    try:
        put_secret(kube, namespace, "forge", {"username": "deploy", "token": TOKEN,
                                              "ca.crt": private_ca.ca.read_text()})
        put_secret(kube, namespace, "forge-bad", {"username": "deploy", "token": TOKEN,
                                                  "ca.crt": private_ca.key.read_text()})
        url = server.url("remote.git")
        config = write_config(tmp_path / "apps.yaml", [
            app_entry("trusted", url, namespace, credentials={"secretRef": {"name": "forge"}}),
            app_entry("key-as-ca", url, namespace, credentials={"secretRef": {"name": "forge-bad"}}),
        ])
        daemon = start_daemon(config)
        applied = wait_transition(daemon, "trusted Applied", app="trusted", result="Applied")
        refused = wait_transition(daemon, "key-as-ca Failed", app="key-as-ca", result="Failed")
    finally:
        server.stop()

    assert applied["revision"] == sha
    assert kube.get(kube.resource("v1", "ConfigMap"), "from-private-forge", namespace)["data"] == {"v": "1"}
    reason = " ".join(str(e) for e in refused["errors"])
    assert f"credentials Secret {namespace}/forge-bad, key ca.crt holds a private key" in reason, reason
    assert "PRIVATE KEY" not in daemon.log_path.read_text()


def test_the_cli_takes_the_ca_as_git_ca_file_and_refuses_a_key_in_its_place(
        private_ca, kube, kubeconfig, namespace, source_cache, tmp_path):
    repo = GitRepo(tmp_path / "git")
    repo.write("cm.yaml", configmap("cli-private-forge", {"v": "1"}))
    repo.commit("a ConfigMap")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    server = https_server(repo.bare.parent, private_ca)
    args = ("--repo", server.url("remote.git"), "--ref", "main", "--namespace", namespace, "--app", namespace,
            "--inventory-namespace", namespace, "--git-username", "deploy", "--git-token-file", str(token))
    try:
        _, untrusted = gitopsd_json("diff", *args, kubeconfig=kubeconfig, cache=source_cache, expect=2)
        _, key = gitopsd_json("diff", *args, "--git-ca-file", str(private_ca.key), kubeconfig=kubeconfig,
                              cache=source_cache, expect=2)
        _, synced = gitopsd_json("sync", *args, "--git-ca-file", str(private_ca.ca), kubeconfig=kubeconfig,
                                 cache=source_cache, expect=0)
    finally:
        server.stop()
    assert "TLS certificate of 127.0.0.1" in untrusted["error"], untrusted
    assert f"--git-ca-file {private_ca.key} holds a private key" in key["error"], key
    assert "PRIVATE KEY" not in str(key)
    assert kube.get(kube.resource("v1", "ConfigMap"), "cli-private-forge", namespace)["data"] == {"v": "1"}


def test_a_ca_file_alone_is_enough_credentials_for_a_public_repository(tmp_path):
    from gitopsd import config as config_mod

    config = config_mod.parse('apps:\n  - {name: web, repo: "https://git.corp.example/fleet.git",'
                              ' credentials: {caFile: certs/ca.crt}}\n', base_dir=tmp_path)
    assert config.app("web").credentials.ca_file == tmp_path / "certs" / "ca.crt"
    assert "caFile" in config_mod.schema()["$defs"]["CredentialsRef"]["properties"]
