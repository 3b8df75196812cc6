"""The installed operator for the e2e modules: the chart in a restricted namespace, once per session.

Session fixtures (imported by conftest.py): `restricted_namespace` (the CRDs applied and a namespace
enforcing Pod Security "restricted"), `operator_env` (the chart installed there, the Deployment Available,
its HTTP server checked) and `jobs` (FineTuneJobs of one test, deleted after it). See test_operator.py for
what FINETUNE_E2E_CHART / FINETUNE_E2E_OPERATOR change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from operator_util import CHART, OWNER_UID_LABEL, Jobs, apply_crds, helm, raw, wait_phase

OPERATOR_SELECTOR = "app.kubernetes.io/name=finetune-operator,app.kubernetes.io/component=operator"
OUTPUT_PVC = "finetune-outputs"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
}
# An API server that has just started answers 403 until its RBAC cache is filled (before /readyz says ready):
# operator log lines from that long after a restart (test_infra_faults.py makes one) are no missing rule.
RBAC_WARMUP = dt.timedelta(seconds=30)
TRAIN_TIMEOUT = 240  # one tiny job start to finish; ~40-70 s on 2 busy cores (mostly `import torch`)


@dataclass
class OperatorEnv:
    """The installed operator and the namespace the tests' FineTuneJobs go to."""

    api: client.ApiClient
    namespace: str  # FineTuneJobs
    operator_namespace: str
    installed_here: bool  # False: installed by someone else (hack/kind-e2e.sh)
    local_cluster: Any
    output_pvc: str | None = None
    http_port: int | None = None  # the operator's server port (Service targetPort) — what trainers push to
    http_problem: str | None = None  # why the operator's HTTP server is not where the chart says, if it is not
    values: dict[str, str] = field(default_factory=dict)
    api_restarts: list[tuple[dt.datetime, dt.datetime]] = field(default_factory=list)  # (started, ready) times

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def pvc_dir(self, claim: str, namespace: str | None = None) -> Path | None:
        """The host directory of a PVC on the local cluster (its PV's hostPath); None on other clusters."""
        if self.local_cluster is None:
            return None
        return self.local_cluster.pvc_dir(namespace or self.namespace, claim)

    def operator_pods(self) -> list:
        return self.core.list_namespaced_pod(self.operator_namespace, label_selector=OPERATOR_SELECTOR).items

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's whole log, as `kubectl logs` reads it (pods/log through the API server)."""
        try:
            return self.core.read_namespaced_pod_log(pod, namespace, container=container) or ""
        except client.ApiException:
            return ""

    def push_diagnosis(self, jobs: Jobs, ftj: dict) -> str:
        """Why progress did not arrive: the operator's push counters and the trainers' non-JSON log lines."""
        try:
            counters = [line for line in self.metrics().splitlines() if line.startswith("finetune_progress_pushes")]
        except AssertionError as e:
            counters = [f"(no /metrics: {e})"]
        lines = []
        for pod in jobs.pods(ftj):
            text = self.container_log(jobs.ns, pod.metadata.name, "trainer")
            lines += [f"{pod.metadata.name}: {line}" for line in text.splitlines() if not line.startswith("{")][-15:]
        return "operator push counters: " + " ".join(counters) + "\ntrainer log (not JSON):\n" + "\n".join(lines)

    def operator_log(self, max_bytes: int = 4000) -> str:
        """The operator's log tail, as `kubectl logs` reads it."""
        out = []
        for pod in self.operator_pods():
            name = pod.metadata.name
            try:
                text = self.core.read_namespaced_pod_log(name, self.operator_namespace, tail_lines=40,
                                                         limit_bytes=max_bytes)
            except client.ApiException as e:
                text = f"(log unavailable: {e.status})"
            out.append(f"--- {name}\n{text}")
        return "\n".join(out) or "(no operator pod)"

    def forbidden(self) -> str | None:
        """The operator's log lines about 403 Forbidden answers (a permission the chart's RBAC lacks), if any."""
        texts = []
        for pod in self.operator_pods():
            with contextlib.suppress(client.ApiException):
                texts.append(self.core.read_namespaced_pod_log(pod.metadata.name, self.operator_namespace,
                                                               tail_lines=2000) or "")
        hits = [line.strip()[:400] for text in texts for line in text.splitlines()
                if re.search(r"\b403\b", line) and "forbidden" in line.lower() and not self._rbac_warming(line)]
        if not hits:
            return None
        return (f"the operator was refused by the API server ({len(hits)} log lines with 403 Forbidden) — the "
                "chart's RBAC (charts/finetune-operator/templates/rbac.yaml) lacks a permission it uses:\n"
                + "\n".join(hits[:5]))

    def _rbac_warming(self, line: str) -> bool:
        """The log line (it starts with its local time) was written while a restarted API server warmed up."""
        try:
            when = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            return False
        return any(started <= when <= ready + RBAC_WARMUP for started, ready in self.api_restarts)

    def wait_phase(self, jobs: Jobs, name: str, phases: tuple[str, ...], timeout: float) -> dict:
        return wait_phase(jobs, name, phases, timeout, lambda: self.diagnose(jobs, name), give_up=self.forbidden)

    def metrics(self) -> str:
        """GET /metrics of the operator, through the API server's service proxy."""
        svc = self.core.list_namespaced_service(self.operator_namespace,
                                                label_selector=OPERATOR_SELECTOR.split(",")[0]).items
        assert svc, f"no operator Service in {self.operator_namespace}"
        resp = raw(self.api, "GET", f"/api/v1/namespaces/{self.operator_namespace}/services/"
                                    f"{svc[0].metadata.name}:http/proxy/metrics", headers={"Accept": "*/*"})
        status, text = resp.status, resp.read().decode(errors="replace")
        assert status == 200, f"/metrics answered {status}: {text[:300]}"
        return text

    def diagnose(self, jobs: Jobs, name: str) -> str:
        """Operator log tail plus the Job's events (pod creation refused by Pod Security, quota …)."""
        lines = []
        try:
            for ev in client.CoreV1Api(self.api).list_namespaced_event(
                    jobs.ns, field_selector=f"involvedObject.name={name}").items:
                lines.append(f"event {ev.involved_object.kind} {ev.type} {ev.reason}: {ev.message}")
        except client.ApiException:
            pass
        return "\n".join(lines) + "\noperator log tail:\n" + self.operator_log()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.3, give_up=None):
    """Poll until `predicate()` is truthy; `give_up()` (checked every 3 s) names a reason to stop early."""
    deadline = time.monotonic() + timeout
    last, next_check = None, time.monotonic() + 2
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        if give_up is not None and time.monotonic() >= next_check:
            reason = give_up()
            if reason:
                raise AssertionError(f"stopped waiting for {what}: {reason}")
            next_check = time.monotonic() + 3
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _create_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"e2e": "true", **RESTRICTED})))
    return name


def _deployment_available(apps: client.AppsV1Api, ns: str) -> bool:
    for dep in apps.list_namespaced_deployment(ns, label_selector=OPERATOR_SELECTOR).items:
        conds = dep.status.conditions or []
        if any(c.type == "Available" and c.status == "True" for c in conds) and (dep.status.ready_replicas or 0) >= 1:
            return True
    return False


def _check_http(env: OperatorEnv) -> str | None:
    """None when the operator serves /metrics through its Service (the port trainers push to); else why not."""
    try:
        env.metrics()
    except AssertionError as e:
        return (f"the operator's /metrics is not reachable through its Service (targetPort http, the port of "
                f"FINETUNE_PROGRESS_URL, where trainers push progress): {e}")
    return None


@pytest.fixture(scope="session")
def restricted_namespace(k8s) -> str:
    """The CRDs applied and a namespace enforcing Pod Security "restricted" (deleted, not awaited, at the end)."""
    core = client.CoreV1Api(k8s)
    apply_crds(k8s)
    namespace = _create_namespace(core, "ftop")
    yield namespace
    try:
        core.delete_namespace(namespace)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture(scope="session")
def operator_env(k8s, kubeconfig, local_cluster, e2e_report, restricted_namespace) -> OperatorEnv:
    """The CRD applied, the chart installed into a restricted namespace, the Deployment Available."""
    core, apps = client.CoreV1Api(k8s), client.AppsV1Api(k8s)
    t0 = time.monotonic()
    installed = os.environ.get("FINETUNE_E2E_OPERATOR", "").strip().lower() == "installed"
    namespace = restricted_namespace
    release = f"fte-{uuid.uuid4().hex[:6]}"  # cluster-scoped RBAC names include it: unique per run
    env = OperatorEnv(api=k8s, namespace=namespace, operator_namespace=namespace, installed_here=not installed,
                      local_cluster=local_cluster)
    try:
        if installed:
            env.operator_namespace = os.environ.get("FINETUNE_E2E_OPERATOR_NAMESPACE", "finetune-system")
        else:
            binaries = getattr(local_cluster, "binaries", None) or {}
            helm_bin = str(binaries.get("helm") or _helm_from_tools())
            core.create_namespaced_persistent_volume_claim(namespace, client.V1PersistentVolumeClaim(
                metadata=client.V1ObjectMeta(name=OUTPUT_PVC),
                spec=client.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"],
                    resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}))))
            env.output_pvc = OUTPUT_PVC
            env.values = {
                "trainer.outputPVC": OUTPUT_PVC,  # outputs persist (and the test reads model.json there)
                "operator.resyncSeconds": "5",
            }
            for key, image in _local_images(local_cluster).items():  # the kubelet node's own images
                env.values[f"{key}.repository"], env.values[f"{key}.tag"] = image.rsplit(":", 1)
            # FINETUNE_E2E_CHART: install another copy of the chart (e.g. one with an RBAC rule removed).
            chart = os.environ.get("FINETUNE_E2E_CHART") or str(CHART)
            args = ["install", release, chart, "--namespace", namespace, "--skip-crds"]
            for k, v in env.values.items():
                args += ["--set", f"{k}={v}"]
            helm(helm_bin, kubeconfig, *args)
        try:
            wait_until(lambda: _deployment_available(apps, env.operator_namespace), 120,
                  f"the operator Deployment in {env.operator_namespace} to become Available")
        except AssertionError as e:
            events = [f"{ev.involved_object.kind}/{ev.involved_object.name} {ev.reason}: {ev.message}"
                      for ev in core.list_namespaced_event(env.operator_namespace).items if ev.type == "Warning"]
            raise AssertionError(f"{e}\nwarnings: {events}\n{env.operator_log()}") from None
        dep = apps.list_namespaced_deployment(env.operator_namespace, label_selector=OPERATOR_SELECTOR).items[0]
        container = next(c for c in dep.spec.template.spec.containers if c.name == "operator")
        env.http_port = next((p.container_port for p in container.ports or [] if p.name == "http"), None)
        env.http_problem = (_check_http(env) if env.http_port
                            else "the chart's operator container has no `http` port (server.enabled off?)")
        e2e_report(f"operator: chart {'installed' if not installed else 'found'} in "
                   f"{env.operator_namespace}, Available after {time.monotonic() - t0:.1f} s"
                   + (f"; HTTP PROBLEM: {env.http_problem}" if env.http_problem else ""))
        yield env
    finally:
        if not installed:
            try:
                helm(str((getattr(local_cluster, "binaries", None) or {}).get("helm") or _helm_from_tools()),
                     kubeconfig, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
            except AssertionError as e:
                print(f"helm uninstall failed: {e}")


def _local_images(local_cluster) -> dict[str, str]:
    """Chart image values -> image, for the project's images the local node imported (none on other clusters)."""
    images = getattr(local_cluster, "images", None) or {}
    keys = {"operator": "image", "trainer": "trainer.image", "serve": "serving.image"}
    return {keys[k]: v for k, v in images.items() if k in keys}


def _helm_from_tools() -> str:
    import subprocess

    out = subprocess.run([str(CHART.parents[1] / "hack" / "tools.sh"), "helm"], capture_output=True, text=True,
                         check=True, timeout=1800)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def jobs(operator_env) -> Jobs:
    """FineTuneJobs in the test namespace; each test's jobs are deleted (and their pods gone) afterwards."""
    j = Jobs(operator_env.api, operator_env.namespace)
    yield j
    items = j.co.list_namespaced_custom_object("finetune.dev", "v1alpha1", j.ns, "finetunejobs")["items"]
    for item in items:
        j.delete(item["metadata"]["name"])
    core = client.CoreV1Api(operator_env.api)

    def trainers_stopped():  # finished pods use no CPU: the garbage collector may take its time with them
        return not [p.metadata.name for p in core.list_namespaced_pod(j.ns, label_selector=OWNER_UID_LABEL).items
                    if p.status.phase not in ("Succeeded", "Failed")]

    wait_until(trainers_stopped, 90, "the trainer pods of this test to stop (the next test gets the CPUs)")


def kill_operator(env, replaced: set[str]) -> str:
    """Delete the current operator pod with grace 0 (SIGKILL): no cleanup handler, no last write."""
    def current():
        pods = [p for p in env.operator_pods() if p.metadata.name not in replaced
                and p.metadata.deletion_timestamp is None and p.status.phase == "Running"]
        return pods[0].metadata.name if pods else None

    name = wait_until(current, 90, "a running operator pod to kill", interval=0.1, give_up=env.forbidden)
    env.core.delete_namespaced_pod(name, env.operator_namespace, grace_period_seconds=0)
    replaced.add(name)
    return name
