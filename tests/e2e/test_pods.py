"""Pod behaviour the operator's e2e tests rely on, proven on small pods on the cluster's real node.

Volumes and env, exit codes and termination messages, the Job controller's retries, SIGTERM on deletion with
data kept on a PVC, the pod's own ServiceAccount token under real RBAC, a Service reached by its DNS names
(kube-proxy + cluster DNS). On the local cluster the node runs them in the project's operator image (it has
Python; nothing is pulled); on kind, in python:3.12-slim.
"""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

IMAGE = "python:3.12-slim"  # on clusters that can pull; the local node has the project's images only


@pytest.fixture(autouse=True)
def node(local_cluster, monkeypatch):
    """The local cluster (or None); pods use an image with Python that the node has."""
    image = (getattr(local_cluster, "images", None) or {}).get("operator")
    if image:
        monkeypatch.setattr(sys.modules[__name__], "IMAGE", image)
    return local_cluster


def _log(core, name: str, ns: str) -> str:
    """`kubectl logs` of the pod's container main ("" while there is none)."""
    try:
        return core.read_namespaced_pod_log(name, ns, container="main") or ""  # the client gives None for empty
    except client.ApiException:
        return ""


def _python_pod(name: str, code: str, **spec) -> dict:
    container = {
        "name": "main",
        "image": IMAGE,
        "command": ["python", "-c", textwrap.dedent(code)],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("metadata", {})},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container], **spec},
    }


def _phase(core, name, ns, phases=("Succeeded", "Failed")):
    pod = core.read_namespaced_pod(name, ns)
    return pod if pod.status.phase in phases else None


def _gone(core, name, ns) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except client.ApiException as e:
        return e.status == 404
    return False


def test_configmap_volume_secret_env_exit_code_and_termination_message(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"job.yaml": "epochs: 2\n"})
    )
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"token": "s3cret"})
    )
    code = """
        import os, sys
        job = open("/etc/finetune/job.yaml").read().strip()
        print("job", job, "token", os.environ["TOKEN"], "pod", os.environ["POD_NAME"], "uid", os.getuid())
        try:
            open("/etc/finetune/x", "w")
        except OSError as e:
            print("read-only volume:", e.errno)
        try:
            open("/not-writable", "w")
        except OSError as e:
            print("read-only root:", e.errno)
        open("/dev/termination-log", "w").write(f"bad data: {job} / {os.environ['TOKEN']}")
        sys.exit(3)
    """
    pod = _python_pod(
        "fails",
        code,
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
        container={
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/finetune", "readOnly": True}],
            "securityContext": {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        },
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}],
    )
    core.create_namespaced_pod(namespace, pod)
    done = wait_for(lambda: _phase(core, "fails", namespace), timeout=60, what="the pod to finish")
    assert done.status.phase == "Failed"
    term = done.status.container_statuses[0].state.terminated
    assert term.exit_code == 3
    assert term.reason == "Error"
    assert term.message == "bad data: epochs: 2 / s3cret"
    assert term.started_at is not None and term.finished_at >= term.started_at
    assert done.status.start_time is not None
    ready = {c.type: c.status for c in done.status.conditions}
    assert ready["Ready"] == "False" and ready["Initialized"] == "True"
    log = _log(core, "fails", namespace)
    assert "job epochs: 2 token s3cret pod fails uid 1000" in log
    assert "read-only volume: 30" in log and "read-only root: 30" in log  # EROFS


def test_job_backoff_limit_counts_real_failures(k8s, namespace, wait_for):
    batch, core = client.BatchV1Api(k8s), client.CoreV1Api(k8s)
    pod = _python_pod("x", "import sys; print('failing'); sys.exit(1)")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "flaky"},
        "spec": {"backoffLimit": 1, "template": {"spec": pod["spec"]}},
    }
    batch.create_namespaced_job(namespace, job)

    def failed():
        j = batch.read_namespaced_job_status("flaky", namespace)
        conds = {c.type: c for c in j.status.conditions or []}
        return j if "Failed" in conds and conds["Failed"].status == "True" else None

    job = wait_for(failed, timeout=90, what="the Job to fail")
    assert {c.type: c.reason for c in job.status.conditions}["Failed"] == "BackoffLimitExceeded"
    assert job.status.failed == 2
    pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=flaky").items
    assert len(pods) == 2
    assert [p.status.container_statuses[0].state.terminated.exit_code for p in pods] == [1, 1]


def test_delete_sends_sigterm_and_pvc_data_outlives_the_pod(node, k8s, namespace, wait_for, e2e_report):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name="data"),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
            ),
        ),
    )
    code = """
        import signal, sys, time
        def term(*_):
            open("/data/marker", "w").write("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        print("ready", flush=True)
        time.sleep(600)
    """
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    mounts = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    t0 = time.monotonic()
    core.create_namespaced_pod(namespace, _python_pod("sleeper", code, container=mounts, volumes=volumes))
    wait_for(lambda: _phase(core, "sleeper", namespace, ("Running",)), timeout=60, what="the pod to run")
    e2e_report(f"pod created -> Running (PVC bound first): {time.monotonic() - t0:.2f} s")
    wait_for(lambda: "ready" in _log(core, "sleeper", namespace), timeout=30, what="the SIGTERM handler")

    t1 = time.monotonic()
    core.delete_namespaced_pod("sleeper", namespace)
    wait_for(lambda: _gone(core, "sleeper", namespace), timeout=30, what="the pod to be removed")
    assert time.monotonic() - t1 < 5, "the process handled SIGTERM: no wait for the grace period"
    folder = node.pvc_dir(namespace, "data") if node is not None else None
    if folder is not None:  # on the local node, the claim's directory on this host
        assert (folder / "marker").read_text() == "SIGTERM"

    # The same claim in the next pod: the data is there (a checkpoint survives its pod).
    reader = _python_pod("reader", "import sys; sys.exit(0 if open('/data/marker').read() == 'SIGTERM' else 1)",
                         container=mounts, volumes=volumes)  # fmt: skip
    core.create_namespaced_pod(namespace, reader)
    assert wait_for(lambda: _phase(core, "reader", namespace), timeout=60).status.phase == "Succeeded"


def test_a_pod_that_ignores_sigterm_is_killed_after_its_grace_period(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring", flush=True)
        time.sleep(600)
    """
    core.create_namespaced_pod(namespace, _python_pod("stubborn", code, terminationGracePeriodSeconds=1))
    wait_for(lambda: "ignoring" in _log(core, "stubborn", namespace), timeout=60, what="the pod to run")
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: _gone(core, "stubborn", namespace), timeout=20, what="SIGKILL after the grace period")


def test_pod_service_account_token_under_real_rbac(k8s, namespace, wait_for):
    core, rbac = client.CoreV1Api(k8s), client.RbacAuthorizationV1Api(k8s)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot")))
    code = f"""
        import json, os, ssl, sys, urllib.error, urllib.request
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        token = open(sa + "/token").read()
        assert open(sa + "/namespace").read() == "{namespace}"
        ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
        url = "https://%s:%s/api/v1/namespaces/{namespace}/pods" % (
            os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
        req = urllib.request.Request(url, headers={{"Authorization": "Bearer " + token}})
        try:
            pods = json.load(urllib.request.urlopen(req, context=ctx))
        except urllib.error.HTTPError as e:
            print("HTTP", e.code)
            sys.exit(42 if e.code == 403 else 1)
        print("pods", [p["metadata"]["name"] for p in pods["items"]])
    """
    core.create_namespaced_pod(namespace, _python_pod("denied", code, serviceAccountName="bot"))
    denied = wait_for(lambda: _phase(core, "denied", namespace), timeout=60, what="the pod to finish")
    assert denied.status.container_statuses[0].state.terminated.exit_code == 42, "403 without a Role"

    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })  # fmt: skip
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "bot-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": namespace}],
    })  # fmt: skip
    core.create_namespaced_pod(namespace, _python_pod("allowed", code, serviceAccountName="bot"))
    allowed = wait_for(lambda: _phase(core, "allowed", namespace), timeout=60, what="the pod to finish")
    assert allowed.status.phase == "Succeeded"
    assert "'allowed'" in _log(core, "allowed", namespace)

    # automountServiceAccountToken: false -> nothing is mounted.
    no_token = "import os, sys; sys.exit(1 if os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount') else 0)"
    core.create_namespaced_pod(
        namespace, _python_pod("no-token", no_token, serviceAccountName="bot", automountServiceAccountToken=False)
    )
    assert wait_for(lambda: _phase(core, "no-token", namespace), timeout=60).status.phase == "Succeeded"


def test_a_service_is_reached_by_its_dns_names(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    server = _python_pod(
        "web",
        "import http.server as h\nh.ThreadingHTTPServer(('', 8080), h.SimpleHTTPRequestHandler).serve_forever()",
        metadata={"labels": {"app": "web"}},
        container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        },
    )
    core.create_namespaced_pod(namespace, server)
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    })  # fmt: skip

    def ready():
        pod = core.read_namespaced_pod("web", namespace)
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    wait_for(ready, timeout=60, what="the server's readiness probe")
    code = """
        import os, urllib.request
        for name in ("FULL", "SHORT", "BARE"):
            print(name, os.environ[name], urllib.request.urlopen(os.environ[name], timeout=5).status)
    """
    urls = {"FULL": f"http://web.{namespace}.svc.cluster.local/", "SHORT": f"http://web.{namespace}.svc/",
            "BARE": "http://web/"}  # fmt: skip
    env = [{"name": k, "value": v} for k, v in urls.items()]
    core.create_namespaced_pod(namespace, _python_pod("client", code, container={"env": env}))
    done = wait_for(lambda: _phase(core, "client", namespace), timeout=60, what="the client to finish")
    log = _log(core, "client", namespace)
    assert done.status.phase == "Succeeded", log
    for name, url in urls.items():  # through the Service's ClusterIP (kube-proxy), names from cluster DNS
        assert f"{name} {url} 200" in log, log
    core.delete_namespaced_pod("web", namespace)
    wait_for(lambda: _gone(core, "web", namespace), timeout=30, what="the server to stop")


def test_init_containers_multiple_containers_restarts_and_deadline(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    shared = {"volumeMounts": [{"name": "work", "mountPath": "/scratch"}]}
    # init writes a file, both main containers read it; the pod succeeds when both exit 0.
    multi = _python_pod("multi", "open('/scratch/a').read() == 'init' or exit(1)", container=shared,
                        volumes=[{"name": "work", "emptyDir": {}}])  # fmt: skip
    multi["spec"]["initContainers"] = [
        {"name": "init", "image": IMAGE, "command": ["python", "-c", "open('/scratch/a', 'w').write('init')"], **shared}
    ]
    multi["spec"]["containers"].append(
        {"name": "second", "image": IMAGE, "command": ["sh", "-c", 'test "$(cat /scratch/a)" = init'], **shared}
    )
    # OnFailure: fails once, succeeds on the restart (the emptyDir outlives the container).
    flaky = _python_pod(
        "flaky",
        "import os, sys\nif not os.path.exists('/scratch/seen'):\n    open('/scratch/seen', 'w').close(); sys.exit(1)",
        restartPolicy="OnFailure", container=shared, volumes=[{"name": "work", "emptyDir": {}}],
    )  # fmt: skip
    slow = _python_pod("slow", "import time; time.sleep(600)", activeDeadlineSeconds=2)
    for pod in (multi, flaky, slow):
        core.create_namespaced_pod(namespace, pod)

    multi = wait_for(lambda: _phase(core, "multi", namespace), timeout=60, what="multi to finish")
    assert multi.status.phase == "Succeeded"
    assert multi.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert sorted(c.name for c in multi.status.container_statuses) == ["main", "second"]
    flaky = wait_for(lambda: _phase(core, "flaky", namespace), timeout=60, what="flaky to finish")
    assert flaky.status.phase == "Succeeded"
    status = flaky.status.container_statuses[0]
    assert status.restart_count == 1 and status.last_state.terminated.exit_code == 1
    slow = wait_for(lambda: _phase(core, "slow", namespace), timeout=60, what="the deadline")
    assert slow.status.phase == "Failed" and slow.status.reason == "DeadlineExceeded"
