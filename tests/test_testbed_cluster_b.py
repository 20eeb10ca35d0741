"""The second control plane for multi-cluster tests (conftest: cluster_b, kubeconfig_b, kube_b).

A multi-cluster proof is only worth something when the two clusters are
really two: separate apiservers, separate state and separate CAs, so a
credential for one is no credential for the other.
"""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client, config
from testbed import cluster as tb_cluster

pytestmark = pytest.mark.cluster


def test_cluster_b_is_a_second_control_plane(cluster, cluster_b, kubeconfig_b, kube_b, api_client):
    assert cluster_b.name != cluster.name
    assert cluster_b.server != cluster.server
    assert kubeconfig_b == cluster_b.kubeconfig and kubeconfig_b.exists()
    assert (cluster_b.dir / "pki" / "ca.crt").read_bytes() != (cluster.dir / "pki" / "ca.crt").read_bytes()
    assert all(cluster_b.alive().values())

    # An object made in b through gitopsd's client exists in b only.
    name = f"only-in-b-{uuid.uuid4().hex[:6]}"
    namespaces = kube_b.resource("v1", "Namespace")
    kube_b.create(namespaces, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        assert kube_b.get(namespaces, name)["metadata"]["name"] == name
        with pytest.raises(client.ApiException) as absent:
            client.CoreV1Api(api_client).read_namespace(name)
        assert absent.value.status == 404
    finally:
        kube_b.delete(namespaces, name)


def test_a_certificate_minted_by_b_is_refused_by_the_home_cluster(cluster, cluster_b, tmp_path):
    minted = tb_cluster.client_kubeconfig(cluster_b, user="tb-probe", context="b")
    path = tmp_path / "b.kubeconfig"
    path.write_text(json.dumps(minted))
    assert client.CoreV1Api(config.new_client_from_config(config_file=str(path))).list_namespace().items

    # The same client certificate, sent to the home cluster (trusting its CA): not authenticated.
    home = tb_cluster.client_kubeconfig(cluster, user="tb-probe")
    home["users"] = minted["users"]
    home["contexts"][0]["context"]["user"] = minted["users"][0]["name"]
    path.write_text(json.dumps(home))
    with pytest.raises(client.ApiException) as refused:
        client.CoreV1Api(config.new_client_from_config(config_file=str(path))).list_namespace()
    assert refused.value.status == 401
