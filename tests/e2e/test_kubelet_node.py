"""The real kubelet node: upstream kubelet + containerd running pods from locally built images.

The fixture in conftest.py starts `hack/testenv/kubelet_node.py` next to the local control plane — node
`finetune-kubelet`, the cluster's only node, untainted: every pod of the suite runs there. On a given cluster
(KUBECONFIG) these tests are skipped with the reason: they are about the local node.

What is proven, each through the API server as a user would see it:
  * the node registers and turns Ready, reporting the containerd runtime and the kubelet's version, with no
    taint (pods need no toleration);
  * a pod in a namespace enforcing the `restricted` Pod Security Standard, from the locally built pause
    image (`/pause -v`), runs to Succeeded and its log is read with pods/log (API server -> kubelet);
  * (operator image imported) a pod reaches the API server through the `kubernetes` Service with its
    projected ServiceAccount token, and a memory limit is enforced by the kernel (OOMKilled).
The chart's operator Deployment on the node, from the operator image, is every operator test's fixture
(operator_env.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NODE = "finetune-kubelet"
NODE_LABEL = "finetune.dev/kubelet-node"
RESTRICTED_CONTAINER = client.V1SecurityContext(
    allow_privilege_escalation=False,
    capabilities=client.V1Capabilities(drop=["ALL"]),
    read_only_root_filesystem=True,
)


def _k8s_version() -> str:
    for line in (REPO / "hack" / "testenv" / "versions.env").read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("K8S_VERSION missing from versions.env")


@pytest.fixture(scope="module")
def node(local_cluster, k8s) -> client.V1Node:
    """The kubelet node as the API reports it; skips when a given cluster (not the local one) is used."""
    if local_cluster is None:
        pytest.skip("about the local cluster's node; a given cluster (KUBECONFIG) is used")
    core = client.CoreV1Api(k8s)
    return core.read_node(NODE)


@pytest.fixture
def restricted_ns(k8s, namespace) -> str:
    client.CoreV1Api(k8s).patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    return namespace


def _image(node: client.V1Node, repo: str) -> str | None:
    """The name of an image of `repo` (e.g. finetune-operator) the node reports, or None."""
    for img in node.status.images or []:
        for name in img.names or []:
            base = name.rsplit("@", 1)[0]
            if base.rsplit(":", 1)[0].rsplit("/", 1)[-1] == repo and ":" in base.rsplit("/", 1)[-1]:
                return base
    return None


def _pod(name: str, image: str, command: list[str], args: list[str], **container) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            restart_policy="Never",
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True, seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")
            ),
            containers=[
                client.V1Container(
                    name="main",
                    image=image,
                    image_pull_policy="Never",  # nothing can be pulled here: the image must be on the node
                    command=command or None,
                    args=args,
                    security_context=RESTRICTED_CONTAINER,
                    **container,
                )
            ],
            node_selector={NODE_LABEL: "true"},
        ),
    )


def _run_to_end(core, ns: str, pod: client.V1Pod, wait_for, timeout: float = 120) -> tuple[client.V1Pod, float]:
    t0 = time.monotonic()
    core.create_namespaced_pod(ns, pod)

    def done():
        p = core.read_namespaced_pod(pod.metadata.name, ns)
        return p if p.status.phase in ("Succeeded", "Failed") else None

    p = wait_for(done, timeout=timeout, what=f"pod {pod.metadata.name} to finish")
    return p, time.monotonic() - t0


def test_node_is_ready_with_the_containerd_runtime(node, local_cluster, e2e_report):
    info = node.status.node_info
    conds = {c.type: c.status for c in node.status.conditions}
    assert conds.get("Ready") == "True", conds
    assert info.container_runtime_version.startswith("containerd://"), info.container_runtime_version
    assert info.kubelet_version == _k8s_version()
    assert not [t for t in node.spec.taints or [] if t.effect in ("NoSchedule", "NoExecute")], node.spec.taints
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses.get("InternalIP"), addresses
    assert node.status.allocatable["pods"] == "110"
    t = local_cluster.timings
    rss = local_cluster.rss_bytes()
    e2e_report(
        f"kubelet node: {info.kubelet_version} on {info.container_runtime_version}, Ready "
        f"{t.get('kubelet start -> node Ready', 0):.1f} s after the kubelet started (image import "
        f"{t.get('image import', 0):.1f} s); RSS kubelet {rss.get('kubelet', 0) / 2**20:.0f} MiB, "
        f"containerd {rss.get('containerd', 0) / 2**20:.0f} MiB"
    )


def test_restricted_pod_from_a_local_image_succeeds_and_its_log_comes_through_the_api(
    node, k8s, restricted_ns, wait_for, e2e_report
):
    core = client.CoreV1Api(k8s)
    pause = _image(node, "finetune-pause")
    assert pause, f"the pause image is not on the node: {[i.names for i in node.status.images]}"
    pod, secs = _run_to_end(core, restricted_ns, _pod("pause-version", pause, [], ["-v"]), wait_for)
    state = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Succeeded", (pod.status.phase, state)
    assert pod.spec.node_name == NODE
    assert state.exit_code == 0 and state.reason == "Completed"
    assert pod.status.container_statuses[0].container_id.startswith("containerd://")
    # pods/log: kubectl logs' path (API server -> the kubelet's authenticated HTTPS endpoint -> CRI log file)
    log = core.read_namespaced_pod_log("pause-version", restricted_ns)
    assert log.startswith("pause.c "), log
    e2e_report(f"kubelet node: restricted pod created -> Succeeded in {secs:.1f} s")


@pytest.fixture(scope="module")
def operator_image(node) -> str:
    image = _image(node, "finetune-operator")
    if not image:
        pytest.skip(
            "no finetune-operator image on the kubelet node: hack/testenv/kubelet-images.sh builds it and the node "
            "imports it at start-up"
        )
    return image


def test_pod_reaches_the_api_server_through_the_kubernetes_service(
    operator_image, k8s, restricted_ns, wait_for
):  # fmt: skip
    core = client.CoreV1Api(k8s)
    script = (
        "import json, os, ssl, urllib.request\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']\n"
        "req = urllib.request.Request(f'https://{host}:{port}/api/v1/namespaces/' + open(sa + 'namespace').read()"
        " + '/pods', headers={'Authorization': 'Bearer ' + open(sa + 'token').read()})\n"
        "ctx = ssl.create_default_context(cafile=sa + 'ca.crt')\n"
        "try:\n"
        "    urllib.request.urlopen(req, context=ctx)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(host, port, 'uid', os.getuid(), 'HTTP', e.code)\n"
    )
    pod, _ = _run_to_end(core, restricted_ns, _pod("api-client", operator_image, ["python3", "-c"], [script]), wait_for)
    log = core.read_namespaced_pod_log("api-client", restricted_ns)
    assert pod.status.phase == "Succeeded", log
    # Through 10.96.0.1:443 with a verified TLS chain and a real token: the default ServiceAccount may not list
    # pods, so RBAC answers 403 (an unauthenticated request would get 401).
    assert log.split() == ["10.96.0.1", "443", "uid", "65532", "HTTP", "403"], log


def test_memory_limit_is_enforced_by_the_kernel(operator_image, k8s, restricted_ns, wait_for):
    core = client.CoreV1Api(k8s)
    hog = _pod(
        "memory-hog",
        operator_image,
        ["python3", "-c"],
        ["b = []\nwhile True:\n    b.append(bytearray(16 << 20))"],
        resources=client.V1ResourceRequirements(limits={"memory": "64Mi"}, requests={"memory": "64Mi"}),
    )
    pod, _ = _run_to_end(core, restricted_ns, hog, wait_for)
    state = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed"
    assert (state.reason, state.exit_code) == ("OOMKilled", 137), state
