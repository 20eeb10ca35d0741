"""The config's `clusters:` and the apps' targets; reading a cluster's kubeconfig (no cluster needed)."""

from __future__ import annotations

import base64
import textwrap

import pytest
import yaml

from gitopsd import clusters
from gitopsd.config import IN_CLUSTER, ConfigError, diff, parse, split_target, target_key
from gitopsd.errors import ClusterError

CLUSTERS = """
clusters:
  eu-1:
    kubeconfig: {secretRef: {name: eu-1-kubeconfig}}
    labels: {env: prod, region: eu}
  us-1:
    kubeconfig: {file: /etc/gitopsd/us-1.yaml}
    context: us-1-gitopsd
    labels: {env: prod, region: us}
  in-cluster:
    labels: {env: dev}
"""


def config(apps: str, clusters_text: str = CLUSTERS):
    return parse(clusters_text + "apps:\n" + textwrap.indent(textwrap.dedent(apps), "  "))


def problems(apps: str, clusters_text: str = CLUSTERS) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(apps, clusters_text)
    return info.value.problems


def test_an_app_names_one_cluster_many_or_a_selector_and_each_cluster_is_a_target():
    c = config("""
        - {name: dev, repo: r}
        - {name: billing, repo: r, cluster: eu-1}
        - {name: web, repo: r, clusters: [in-cluster, us-1]}
        - {name: edge, repo: r, clusterSelector: {matchLabels: {env: prod}}}
        - {name: all, repo: r, clusterSelector: {matchLabels: {}}}
    """)
    assert [t.key for t in c.targets] == ["dev", "billing@eu-1", "web", "web@us-1", "edge@eu-1", "edge@us-1",
                                          "all", "all@eu-1", "all@us-1"]
    assert {t.target_cluster for t in c.targets if t.name == "web"} == {IN_CLUSTER, "us-1"}
    # A target names exactly its cluster; the app as written keeps its list.
    assert all(t.clusters is None and t.cluster_selector is None for t in c.targets)
    assert c.app("web").clusters == ("in-cluster", "us-1")
    assert c.target("web@us-1").path == c.app("web").path
    assert c.target("nope") is None
    assert (target_key("web", IN_CLUSTER), target_key("web", "eu-1")) == ("web", "web@eu-1")
    assert split_target("web@eu-1") == ("web", "eu-1") and split_target("web") == ("web", IN_CLUSTER)


def test_a_dependency_is_the_same_apps_target_on_the_same_cluster():
    c = config("""
        - {name: db, repo: r, clusters: [in-cluster, eu-1]}
        - {name: web, repo: r, clusters: [in-cluster, eu-1], dependsOn: [db]}
    """)
    assert {t.key: t.dependency_keys() for t in c.targets if t.name == "web"} == {"web": ("db",),
                                                                                  "web@eu-1": ("db@eu-1",)}
    assert problems("""
        - {name: db, repo: r}
        - {name: web, repo: r, clusters: [in-cluster, eu-1], dependsOn: [db]}
    """) == ["apps[1] (web).dependsOn[0]: db is not deployed to eu-1, where web is: an app waits for its dependency "
             "on the same cluster"]


def test_every_cluster_problem_is_named_at_its_place():
    found = problems("""
        - {name: a, repo: r, cluster: mars}
        - {name: b, repo: r, clusters: [eu-1, venus]}
        - {name: c, repo: r, clusterSelector: {matchLabels: {env: qa}}}
    """, CLUSTERS + """  lost:
    labels: {}
""")
    assert found == [
        'apps[0] (a).cluster: "mars" is no cluster of this file (clusters: in-cluster, eu-1, us-1, lost)',
        'apps[1] (b).clusters[1]: "venus" is no cluster of this file (clusters: in-cluster, eu-1, us-1, lost)',
        "apps[2] (c).clusterSelector: selects no cluster (env=qa); label a cluster in `clusters`, or name the clusters",
        "clusters.lost.kubeconfig: missing: how to reach the cluster ({secretRef: {name: ...}} or {file: PATH})",
    ]


def test_cluster_settings_that_cannot_work_are_refused():
    assert problems("- {name: a, repo: r, cluster: eu-1, clusters: [us-1]}") == [
        "apps[0] (a).clusters: use one of cluster, clusters and clusterSelector, not cluster and clusters"]
    assert problems("- {name: a, repo: r}", "clusters:\n  in-cluster: {kubeconfig: {file: /x}}\n") == [
        "clusters.in-cluster: in-cluster is gitopsd's own connection (the pod's account, or --kubeconfig): give it "
        "labels only, or define another name"]
    bad = problems("- {name: a, repo: r}", "clusters:\n  EU_1: {kubeconfig: {secretRef: {name: x, namespace: y}, "
                                          "file: /x}, labels: {'bad key!': v}}\n")
    assert any("EU_1" in p and "cluster name" in p for p in bad), bad
    assert any("namespace" in p and "gitopsd's own namespace" in p for p in bad), bad
    assert any("bad key!" in p and "label key" in p for p in bad), bad


def test_a_reload_names_targets_and_a_new_kubeconfig_changes_the_clusters_targets():
    old = config("- {name: web, repo: r, clusters: [in-cluster, eu-1]}")
    more = config("- {name: web, repo: r, clusters: [in-cluster, eu-1, us-1]}")
    assert diff(old, more).added == ("web@us-1",) and not diff(old, more).changed
    assert diff(more, old).removed == ("web@us-1",)
    rotated = config("- {name: web, repo: r, clusters: [in-cluster, eu-1]}",
                     CLUSTERS.replace("eu-1-kubeconfig", "eu-1-kubeconfig-v2"))
    assert diff(old, rotated).changed == ("web@eu-1",)
    relabelled = config("- {name: web, repo: r, clusters: [in-cluster, eu-1]}",
                        CLUSTERS.replace("region: eu", "region: europe"))
    assert diff(old, relabelled).empty


# ---------------------------------------------------------------- kubeconfigs

def kubeconfig(user: dict | None = None, cluster: dict | None = None, context: str = "c1") -> str:
    return yaml.safe_dump({
        "clusters": [{"name": "k", "cluster": cluster or {
            "server": "https://127.0.0.1:6443", "certificate-authority-data": base64.b64encode(b"CA").decode()}}],
        "users": [{"name": "u", "user": user if user is not None else {"token": "abc"}}],
        "contexts": [{"name": "c1", "context": {"cluster": "k", "user": "u"}},
                     {"name": "c2", "context": {"cluster": "k", "user": "u"}}],
        "current-context": context})


def test_a_self_contained_kubeconfig_gives_its_contexts_endpoint():
    e = clusters.parse_kubeconfig(kubeconfig(), context=None, where="w")
    assert (e.server, e.ca_data, e.token) == ("https://127.0.0.1:6443", b"CA", "abc")
    assert clusters.parse_kubeconfig(kubeconfig(), context="c2", where="w").server == e.server
    rotated = clusters.parse_kubeconfig(kubeconfig({"token": "def"}), context=None, where="w")
    assert rotated.digest != e.digest and "abc" not in rotated.digest


def test_a_missing_context_names_the_ones_there_are():
    with pytest.raises(ClusterError) as info:
        clusters.parse_kubeconfig(kubeconfig(), context="prod", where="cluster eu-1: kubeconfig Secret ns/x")
    assert str(info.value).startswith("cluster eu-1: kubeconfig Secret ns/x: context 'prod' is not in the "
                                      "kubeconfig (contexts: c1, c2)")


@pytest.mark.parametrize("user,cluster,refused", [
    ({"exec": {"command": "aws"}}, None, "exec plugin"),
    ({"auth-provider": {"name": "gcp"}}, None, "auth-provider plugin"),
    ({"client-certificate": "/etc/ssl/cert.pem", "client-key-data": "eA=="}, None, "names a file"),
    ({"tokenFile": "/var/run/token"}, None, "names a file"),
    (None, {"server": "https://x", "certificate-authority": "/etc/ca.crt"}, "names a file"),
    ({"username": "admin", "password": "p"}, None, "not supported"),
    ({"client-certificate-data": "eA=="}, None, "without its key"),
    (None, {"server": "ftp://x"}, "no https:// server"),
    (None, {"server": "http://127.0.0.1:8080"}, "over TLS only"),
])
def test_a_kubeconfig_from_a_secret_that_reaches_outside_itself_is_refused(user, cluster, refused):
    with pytest.raises(ClusterError) as info:
        clusters.parse_kubeconfig(kubeconfig(user, cluster), context=None, where="w")
    assert refused in str(info.value)


def test_a_kubeconfig_file_may_name_files_beside_it_but_never_a_plugin(tmp_path):
    path = tmp_path / "kc.yaml"
    path.write_text(kubeconfig({"client-certificate": "cert.pem", "client-key": "key.pem"}))
    e = clusters.parse_kubeconfig(path.read_text(), context=None, where="w", from_file=path)
    assert (e.cert_file, e.key_file) == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with pytest.raises(ClusterError, match="exec plugin"):
        clusters.parse_kubeconfig(kubeconfig({"exec": {"command": "x"}}), context=None, where="w", from_file=path)


def test_not_a_kubeconfig_says_so():
    for text in ("- a list", "{{", ""):
        with pytest.raises(ClusterError, match="not a kubeconfig"):
            clusters.parse_kubeconfig(text, context=None, where="w")


def test_an_alias_bomb_in_a_kubeconfig_is_refused_before_it_grows():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9))
    with pytest.raises(ClusterError, match="not a kubeconfig"):
        clusters.parse_kubeconfig(bomb, context=None, where="w")
