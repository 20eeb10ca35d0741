"""The test bed mints self-contained kubeconfigs (testbed.cluster.client_kubeconfig).

A remote cluster's kubeconfig read from a Secret (multi-cluster, issue 15)
must carry everything inline: no file paths, no exec plugin. These tests prove
that what the test bed mints is such a kubeconfig, that a real client
authenticates with it, and that the identity the apiserver sees is the new
certificate's (user and groups), not the admin's.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid

import pytest
from kubernetes import client, config
from testbed import cluster as tb_cluster

pytestmark = pytest.mark.cluster

FILE_FIELDS = ("certificate-authority", "client-certificate", "client-key", "token-file", "exec", "auth-provider")


def _write(tmp_path, cfg: dict, name: str):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def _cert_fields(cfg: dict) -> str:
    pem = base64.b64decode(cfg["users"][0]["user"]["client-certificate-data"])
    proc = subprocess.run(["openssl", "x509", "-noout", "-subject", "-serial", "-issuer", "-nameopt", "RFC2253"],
                          input=pem, capture_output=True, check=True)
    return proc.stdout.decode()


def test_the_kubeconfig_is_self_contained(cluster):
    cfg = tb_cluster.client_kubeconfig(cluster, user="tb-probe", context="b")

    assert cfg["current-context"] == "b"
    assert [c["name"] for c in cfg["contexts"]] == ["b"]
    assert cfg["clusters"][0]["cluster"]["server"] == cluster.server
    ca = base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"])
    assert ca == (cluster.dir / "pki" / "ca.crt").read_bytes()
    user = cfg["users"][0]["user"]
    assert set(user) == {"client-certificate-data", "client-key-data"}
    assert b"PRIVATE KEY" in base64.b64decode(user["client-key-data"])
    text = json.dumps(cfg)
    for field in FILE_FIELDS:
        assert f'"{field}"' not in text, f"{field} is a file path or a plugin, not inline data"
    assert str(cluster.dir) not in text
    # The default context is the cluster's name; the YAML form is the same kubeconfig.
    assert tb_cluster.client_kubeconfig(cluster.name, user="tb-probe")["current-context"] == cluster.name
    assert json.loads(tb_cluster.inline_kubeconfig_yaml(cluster, user="tb-probe"))["kind"] == "Config"


def test_every_call_mints_a_new_certificate(cluster):
    first = tb_cluster.client_kubeconfig(cluster, user="tb-probe", groups=("system:masters", "team-a"))
    second = tb_cluster.client_kubeconfig(cluster, user="tb-probe", groups=("system:masters", "team-a"))

    a, b = first["users"][0]["user"], second["users"][0]["user"]
    assert a["client-key-data"] != b["client-key-data"], "a new key per call"
    fa, fb = _cert_fields(first), _cert_fields(second)
    serial = [line for line in fa.splitlines() if line.startswith("serial=")]
    assert serial and serial[0] not in fb, "a new serial per call"
    assert "subject=CN=tb-probe,O=team-a,O=system:masters" in fa
    assert "issuer=CN=gitopsd-testbed-ca" in fa


def test_a_real_request_with_the_minted_kubeconfig_succeeds_as_its_user(cluster, tmp_path):
    path = _write(tmp_path, tb_cluster.client_kubeconfig(cluster, user="tb-probe", groups=("system:masters",)),
                  "probe.kubeconfig")
    api = config.new_client_from_config(config_file=str(path))

    names = [ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items]
    assert "kube-system" in names
    # Who the apiserver says we are: the new certificate's CN and O, not the admin's.
    review = client.AuthenticationV1Api(api).create_self_subject_review({"apiVersion": "authentication.k8s.io/v1",
                                                                         "kind": "SelfSubjectReview"})
    assert review.status.user_info.username == "tb-probe"
    assert "system:masters" in review.status.user_info.groups


def test_a_user_without_groups_is_denied_listing_namespaces(cluster, tmp_path):
    user = f"tb-nobody-{uuid.uuid4().hex[:6]}"
    path = _write(tmp_path, tb_cluster.client_kubeconfig(cluster, user=user, groups=()), "nobody.kubeconfig")
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(path)))

    with pytest.raises(client.ApiException) as denied:
        core.list_namespace()
    # 403 (authenticated, not authorised), not 401: the apiserver accepted the certificate
    # and named its user, so the identity is the freshly minted one.
    assert denied.value.status == 403
    assert f'User "{user}" cannot list resource "namespaces"' in json.loads(denied.value.body)["message"]
