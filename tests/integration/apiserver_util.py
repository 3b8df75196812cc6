"""Helpers for the integration tier against a real API server (hack/testenv's local control plane).

What is real: etcd, kube-apiserver (CRD schema + CEL, status subresource, resourceVersion, label and
field selectors, admission), kube-controller-manager (Job controller, garbage collector, namespace
controller ...), kube-scheduler. What the test plays: the kubelet of one node (`FakeNode`): it keeps the
node Ready (status + Lease heartbeats, so the node-lifecycle controller leaves it alone), and writes the
status of the pods the scheduler binds to it through the pods/status subresource — only when a test says
so (Running, Succeeded, Failed), and it finishes deletions (grace 0) as a kubelet does once containers stop.

The operator runs in-process (`running_operator`): kopf in its own thread and event loop, logged in with
the cluster's admin certificate (`kopf.ConnectionInfo`), and the operator's `Kube` built from the admin
kubeconfig through the `kubernetes` client, counting its API calls (for "no hot loop" checks).

The test side talks to the API with the standard library (`Api`), not with the operator's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.util
import json
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "finetune-operator" / "crds"
NODE = "it-node-0"
NODE_LABEL = "finetune.dev/integration-node"
Obj = dict[str, Any]


def e2e_fixtures():
    """tests/e2e/conftest.py as a plain module (its helpers: testenv loading, `_truthy`), not as a plugin."""
    name = "finetune_e2e_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "e2e" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def load_testenv():
    """hack/testenv/cluster.py (LocalCluster, build_binaries), loaded as the e2e fixture loads it."""
    return e2e_fixtures()._load_testenv()


def now_text() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------- API client
class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{what}: HTTP {status}: {message}")
        self.status = status
        self.body = body


class Api:
    """The test's own admin client (stdlib HTTPS + client certificate); one connection per request."""

    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
        ok: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=15)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            parsed: Any = json.loads(raw) if raw else {}
        except ValueError:
            parsed = raw
        if not (200 <= resp.status < 300 or resp.status in ok):
            raise ApiError(resp.status, parsed, f"{method} {path}")
        return resp.status, parsed

    def get(self, path: str) -> Obj | None:
        status, body = self.request("GET", path, ok=(404,))
        return None if status == 404 else body

    def list(self, path: str, labels: str | None = None, fields: str | None = None) -> list[Obj]:
        query = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.request("GET", path, query=query)[1].get("items") or []

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)[1]

    def put(self, path: str, body: Obj) -> Obj:
        return self.request("PUT", path, body)[1]

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return self.request("PATCH", path, patch, "application/merge-patch+json")[1]

    def strategic_patch(self, path: str, patch: Obj) -> Obj:
        return self.request("PATCH", path, patch, "application/strategic-merge-patch+json")[1]

    def delete(self, path: str, grace: int | None = None) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        self.request("DELETE", path, body, ok=(404,))


def ftj_url(ns: str, name: str = "", sub: str = "") -> str:
    return "/".join(p for p in (f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs", name, sub) if p)


def job_url(ns: str, name: str = "") -> str:
    return "/".join(p for p in (f"/apis/batch/v1/namespaces/{ns}/jobs", name) if p)


def core_url(ns: str, plural: str, name: str = "", sub: str = "") -> str:
    return "/".join(p for p in (f"/api/v1/namespaces/{ns}/{plural}", name, sub) if p)


def apply_crds(api: Api, timeout: float = 30.0) -> list[str]:
    """Create (or replace) every CRD of the chart and wait until the API server serves them."""
    import yaml

    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = doc["metadata"]["name"]
            url = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            existing = api.get(f"{url}/{name}")
            if existing is None:
                api.create(url, doc)
            else:
                doc["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                api.put(f"{url}/{name}", doc)
            names.append(name)
    for name in names:
        wait(
            lambda n=name: _established(api, n),
            timeout=timeout,
            what=f"CRD {name} Established",
        )
    return names


def _established(api: Api, name: str) -> bool:
    crd = api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") or {}
    conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
    return conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"


# ------------------------------------------------------------------------------------------- waiting
def wait(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail the test with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, IndexError, StopIteration) as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or check}: last={last!r}", pytrace=False)


# ------------------------------------------------------------------------------------------- GC readiness
class GcProbe(threading.Thread):
    """Finds out when the garbage collector watches FineTuneJobs (in the background, while tests run).

    kube-controller-manager's garbage collector picks up new resource types by re-reading discovery every
    30 s (hard-coded). A FineTuneJob deleted before that is never seen deleted by the collector, and its
    Job/ConfigMap/Secret stay (seen here: still there 16 s after the next discovery sync). Clusters have
    their CRDs installed long before; a test cluster gets them seconds before the first test. So: create
    an owner and a dependent ConfigMap, let the collector see them, delete the owner; repeat until the
    dependent goes within a few seconds. Tests that depend on cascading deletion call `wait_ready`.
    """

    def __init__(self, api: Api, namespace: str = "it-gc-probe", timeout: float = 120.0) -> None:
        super().__init__(name="gc-probe", daemon=True)
        self.api, self.ns, self.timeout = api, namespace, timeout
        self.ready, self._halt = threading.Event(), threading.Event()
        self.seconds: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.api.create(
                "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}}
            )
            for i in range(10**6):
                if self._halt.is_set() or time.monotonic() - t0 > self.timeout:
                    self.error = (
                        self.error
                        or f"the garbage collector did not collect a FineTuneJob's dependent in {self.timeout:.0f} s"
                    )
                    return
                if self._attempt(i):
                    self.seconds = time.monotonic() - t0
                    self.ready.set()
                    return
        except Exception as err:
            self.error = repr(err)
        finally:
            with contextlib.suppress(Exception):
                self.api.delete(f"/api/v1/namespaces/{self.ns}")

    def _attempt(self, i: int) -> bool:
        owner = self.api.create(ftj_url(self.ns), {
            "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"probe-{i}"},
            "spec": {"dataset": {"builtin": "digits"}},
        })  # fmt: skip
        ref = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": f"probe-{i}",
               "uid": owner["metadata"]["uid"], "controller": True}  # fmt: skip
        dependent = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"probe-{i}", "ownerReferences": [ref]},
        }
        self.api.create(core_url(self.ns, "configmaps"), dependent)
        self._halt.wait(0.5)  # the collector has seen both (owner verified to exist) before the deletion
        self.api.delete(ftj_url(self.ns, f"probe-{i}"))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not self._halt.is_set():
            if self.api.get(core_url(self.ns, "configmaps", f"probe-{i}")) is None:
                return True
            time.sleep(0.1)
        return False

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until the collector collects FineTuneJob dependents; fail the test if it never does."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.error or not self.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"garbage collector not watching FineTuneJobs: {self.error or 'timed out'}", pytrace=False)
        return self.seconds or 0.0

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:  # started
            self.join(10)
            assert not self.is_alive(), "the GC probe thread did not stop"


# ------------------------------------------------------------------------------------------- the node
class FakeNode:
    """A node whose kubelet is the test: Ready with heartbeats; pod status only when a test writes it.

    Not a kwok node on purpose: kwok's stages move every bound pod to Running and Job pods to Succeeded
    on their own, and these tests need to hold a pod Running (operator restart) or fail it on demand.
    """

    def __init__(self, api: Api, name: str = NODE) -> None:
        self.api, self.name = api, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def start(self, timeout: float = 30.0) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    NODE_LABEL: "true",
                },
            },
        }
        if self.api.get(f"/api/v1/nodes/{self.name}") is None:
            self.api.create("/api/v1/nodes", node)
        self._heartbeat(first=True)
        self._thread = threading.Thread(target=self._loop, name=f"fake-kubelet {self.name}", daemon=True)
        self._thread.start()
        # TaintNodesByCondition put node.kubernetes.io/not-ready on it; node-lifecycle lifts it once Ready.
        wait(self._schedulable, timeout=timeout, interval=0.2, what=f"node {self.name} Ready without taints")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the fake kubelet thread did not stop"
        with contextlib.suppress(Exception):
            self.api.delete(f"/api/v1/nodes/{self.name}")

    def _schedulable(self) -> bool:
        node = self.api.get(f"/api/v1/nodes/{self.name}") or {}
        taints = (node.get("spec") or {}).get("taints") or []
        conds = {c["type"]: c["status"] for c in (node.get("status") or {}).get("conditions") or []}
        return conds.get("Ready") == "True" and not taints

    def _heartbeat(self, first: bool = False) -> None:
        stamp = now_text()
        if first:
            resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
            conditions = [
                {"type": kind, "status": "False", "reason": f"Kubelet Has No {kind}", "message": "fake kubelet"}
                for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
            ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake kubelet is ready"}]
            for c in conditions:
                c["lastHeartbeatTime"] = c["lastTransitionTime"] = stamp
            status = {
                "capacity": resources,
                "allocatable": resources,
                "conditions": conditions,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": self.name}],
                "nodeInfo": {"kubeletVersion": "v1.37.2-fake", "containerRuntimeVersion": "fake://0",
                             "operatingSystem": "linux", "architecture": "amd64"},
            }  # fmt: skip
            self.api.strategic_patch(f"/api/v1/nodes/{self.name}/status", {"status": status})
        lease_url = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        micro = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if self.api.get(lease_url) is None:
            node = self.api.get(f"/api/v1/nodes/{self.name}")
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}
                    ],
                },
                "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro},
            }
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        else:
            self.api.merge_patch(lease_url, {"spec": {"renewTime": micro}})

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(0.2):
            try:
                if time.monotonic() - last_beat > 5:
                    self._heartbeat()
                    last_beat = time.monotonic()
                self._finish_deletions()
            except Exception as err:  # reported by the fixture; the loop keeps the node alive
                self.errors.append(repr(err))

    def _finish_deletions(self) -> None:
        """A kubelet deletes a terminating pod for good (grace 0) once its containers stopped."""
        for pod in self.api.list("/api/v1/pods", fields=f"spec.nodeName={self.name}"):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                self.api.delete(core_url(meta["namespace"], "pods", meta["name"]), grace=0)

    # -- what a kubelet writes, through pods/status (strategic merge: conditions merge by type)
    def pods(self, ns: str, labels: str) -> list[Obj]:
        return self.api.list(core_url(ns, "pods"), labels=labels)

    def set_running(self, pod: Obj) -> Obj:
        assert pod["spec"].get("nodeName") == self.name, f"pod {pod['metadata']['name']} is not bound to {self.name}"
        stamp = now_text()
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "10.244.0.10",
            "startTime": stamp,
            "conditions": [
                {"type": kind, "status": "True", "lastTransitionTime": stamp}
                for kind in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "containerID": f"fake://{pod['metadata']['uid']}-{c['name']}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": stamp}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        return self._write(pod, status)

    def set_waiting(self, pod: Obj, reason: str, message: str = "") -> Obj:
        """Pending with the container waiting (ImagePullBackOff, CreateContainerConfigError, ...)."""
        stamp = now_text()
        status = {
            "phase": "Pending",
            "hostIP": "127.0.0.1",
            "startTime": stamp,
            "conditions": [
                {
                    "type": "ContainersReady",
                    "status": "False",
                    "reason": "ContainersNotReady",
                    "lastTransitionTime": stamp,
                },
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": stamp},
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        return self._write(pod, status)

    def set_terminated(self, pod: Obj, exit_code: int = 0, reason: str = "Completed", message: str = "") -> Obj:
        stamp = now_text()
        started = (pod.get("status") or {}).get("startTime") or stamp
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": stamp}
        if message:
            terminated["message"] = message
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [
                {"type": kind, "status": "False", "reason": "PodCompleted", "lastTransitionTime": stamp}
                for kind in ("ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "containerID": f"fake://{pod['metadata']['uid']}-{c['name']}",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        return self._write(pod, status)

    def _write(self, pod: Obj, status: Obj) -> Obj:
        meta = pod["metadata"]
        return self.api.strategic_patch(core_url(meta["namespace"], "pods", meta["name"], "status"), {"status": status})


# ------------------------------------------------------------------------------------------- the operator
@dataclass
class OperatorHandle:
    rt: Any  # finetune_operator.reconcile.Runtime
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of the operator's own client
    thread: threading.Thread | None = None

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for m, p in list(self.calls) if m == method and contains in p)


@contextlib.contextmanager
def running_operator(cluster: Any, namespace: str, settings: Any) -> Iterator[OperatorHandle]:
    """The real operator (every handler of `register`) in its own thread and event loop, as in production.

    Namespace-scoped to the test's namespace (kopf `namespaces=[...]`), so earlier tests' objects, still
    being garbage-collected, are not part of this run. Stopped (and asserted stopped) on exit.
    """
    import kubernetes

    from finetune_operator.handlers import register
    from finetune_operator.kube import Kube

    pki = Path(cluster.workdir) / "pki"
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=cluster.server,
            ca_path=str(pki / "ca.crt"),
            certificate_path=str(pki / "admin.crt"),
            private_key_path=str(pki / "admin.key"),
            default_namespace=namespace,
        )

    handle = OperatorHandle(rt=None)
    clients: list[Any] = []

    class CountingKube(Kube):
        def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            handle.calls.append((method, path))
            return super()._call(method, path, *args, **kwargs)

    def kube_factory() -> Kube:
        client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
        clients.append(client)
        return CountingKube(client)

    handle.rt = register(registry, settings, kube_factory=kube_factory)
    stop, ready = threading.Event(), threading.Event()
    operator = kopf.operator(
        registry=registry,
        settings=kopf.OperatorSettings(),
        clusterwide=False,
        namespaces=[namespace],
        standalone=True,
        stop_flag=stop,
        ready_flag=ready,
    )
    handle.thread = threading.Thread(target=asyncio.run, args=(operator,), name="kopf-operator", daemon=True)
    handle.thread.start()
    try:
        assert ready.wait(20), "the operator did not start within 20s"
        yield handle
    finally:
        stop.set()
        handle.thread.join(20)
        for client in clients:
            client.close()
        assert not handle.thread.is_alive(), "the operator did not stop within 20s"
