"""A real node in the test bed: kubelet v1.37.2, containerd and runc, a CNI bridge.

hack/testbed/node.py starts it next to the session cluster's KWOK nodes for
this module only (the `real_node` fixture, tests/conftest.py). The tests run a real container built here (the probe
image: hack/testbed/images/probe, a static Go program) and check what a pod
on a real cluster would: it becomes Ready through its readiness probe, its
output comes back through `kubectl logs` (apiserver -> kubelet), it reached
the apiserver the in-cluster way (the `kubernetes` Service's ClusterIP from
KUBERNETES_SERVICE_HOST/PORT, the projected ServiceAccount token and
ca.crt), and a deleted pod is replaced by a new Ready one.

Needs root and the Debian packages node.DEBIAN_PACKAGES; fails (never skips)
without them, like every test-bed test.
"""

from __future__ import annotations

import http.server
import ipaddress
import subprocess
import sys
import threading
import time

import pytest
from helpers import wait_for
from kubernetes import client

from testbed import build as tb_build
from testbed import images as tb_images
from testbed import node as tb_node

pytestmark = [pytest.mark.cluster, pytest.mark.node]

APP = "probe"


@pytest.fixture(scope="module")
def probe_image(real_node) -> str:
    names = tb_node.import_image(real_node.cluster, tb_images.archive(tb_images.PROBE))
    assert tb_images.ref(tb_images.PROBE) in names, names
    return tb_images.ref(tb_images.PROBE)


def _kubectl(cluster, *args: str) -> str:
    proc = subprocess.run([str(tb_build.binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def _deployment(image: str, node_name: str, *, env: dict | None = None) -> dict:
    return {
        "metadata": {"name": APP},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node_name},
                    "tolerations": [{"key": tb_node.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": APP, "image": image, "imagePullPolicy": "Never",
                        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                           "periodSeconds": 1, "failureThreshold": 3},
                    }],
                },
            },
        },
    }


def _ready_pods(core, namespace: str, *, exclude: set[str] = frozenset()):
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={APP}").items
    ready = [p for p in pods if p.metadata.name not in exclude and p.metadata.deletion_timestamp is None
             and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))]
    return ready or None


def test_real_node_registers_beside_the_fake_ones(api_client, real_node):
    core = client.CoreV1Api(api_client)
    node = core.read_node(real_node.name)
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready.get("Ready") == "True"
    info = node.status.node_info
    assert info.kubelet_version == tb_build.KUBERNETES
    assert info.container_runtime_version.startswith("containerd://1.6"), info.container_runtime_version
    assert "kwok.x-k8s.io/node" not in (node.metadata.annotations or {}), "KWOK must leave the real node alone"
    assert any(t.key == tb_node.TAINT_KEY and t.effect == "NoSchedule" for t in node.spec.taints or [])
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == real_node.gateway
    # The KWOK nodes are still there and Ready.
    fake = [n for n in core.list_node().items if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"]
    assert len(fake) >= 3
    assert all({c.type: c.status for c in n.status.conditions}.get("Ready") == "True" for n in fake)


def test_pod_runs_reaches_the_apiserver_and_is_replaced(api_client, cluster, real_node, probe_image, namespace):
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    start = time.monotonic()
    apps.create_namespaced_deployment(namespace, _deployment(probe_image, real_node.name))
    (pod,) = wait_for("the probe pod Ready on the real node", lambda: _ready_pods(core, namespace), timeout=120)
    first_ready = time.monotonic() - start
    assert pod.spec.node_name == real_node.name
    assert not pod.spec.host_network
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(real_node.subnet)
    assert pod.status.pod_ip != real_node.gateway, "the pod has its own network namespace and address"

    # Its output comes back through the apiserver and the kubelet's API.
    logs = _kubectl(cluster, "-n", namespace, "logs", pod.metadata.name)
    assert f"answered /version: gitVersion={tb_build.KUBERNETES}" in logs, logs
    assert "https://10.0.0.1:443" in logs, logs   # the `kubernetes` Service's ClusterIP, from the environment
    assert f"authenticated as system:serviceaccount:{namespace}:default" in logs, logs

    # A deleted pod is replaced by a new one that becomes Ready on the node.
    start = time.monotonic()
    core.delete_namespaced_pod(pod.metadata.name, namespace)
    (again,) = wait_for("a replacement probe pod Ready", lambda: _ready_pods(core, namespace,
                                                                             exclude={pod.metadata.name}),
                        timeout=120)
    replaced = time.monotonic() - start
    assert again.spec.node_name == real_node.name
    logs = _kubectl(cluster, "-n", namespace, "logs", again.metadata.name)
    assert f"authenticated as system:serviceaccount:{namespace}:default" in logs, logs
    sys.stderr.write(f"\nprobe pod Ready {first_ready:.1f}s after the Deployment was created; "
                     f"replacement Ready {replaced:.1f}s after the delete\n")


def test_pod_reaches_an_exposed_loopback_service(api_client, real_node, probe_image, namespace):
    """node.expose(): a service listening on 127.0.0.1 only (as the test bed's
    Git servers do) is reachable from the node's pods at the bridge gateway."""
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello {self.client_address[0]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = tb_node.expose(real_node.cluster, server.server_port)
        assert (host, port) == (real_node.gateway, server.server_port)
        url = f"http://{host}:{port}/"
        core = client.CoreV1Api(api_client)
        client.AppsV1Api(api_client).create_namespaced_deployment(
            namespace, _deployment(probe_image, real_node.name, env={"PROBE_URL": url}))
        (pod,) = wait_for("the probe pod Ready after reaching the exposed service",
                          lambda: _ready_pods(core, namespace), timeout=120)
        logs = core.read_namespaced_pod_log(pod.metadata.name, namespace)
        # The server saw the pod's own address: DNAT only, no masquerade.
        assert f"GET {url}: 200 hello {pod.status.pod_ip}" in logs, logs
    finally:
        server.shutdown()
