"""spec.resources are real on the kubelet node: the kernel enforces them through the pod's cgroups.

Same installed operator as test_operator.py. Proves, as a user would see it through the API:
  * a trainer over its memory limit is OOMKilled by the kernel (the container's terminated state says so, exit
    code 137) and the FineTuneJob ends Failed with reason OOMKilled;
  * spec.resources.cpu/memory reach the trainer container: its cgroup's CPU quota and memory limit on the node
    are what the spec asked for (read on the node's host: local cluster only).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import tiny_job  # noqa: E402

# `import torch` alone needs several times this: the trainer cannot start under it.
TOO_LITTLE = "96Mi"
# All ten digit classes: the pod runs long enough to be inspected.
LONGER = {"dataset": {"classes": None, "maxImagesPerClass": None}, "training": {"epochs": 3}}


def _terminated(pod):
    cs = next(c for c in pod.status.container_statuses or [] if c.name == "trainer")
    return cs.state.terminated or cs.last_state.terminated


def test_trainer_over_its_memory_limit_is_oomkilled_and_the_job_fails_oomkilled(operator_env, jobs, e2e_report):
    env, name = operator_env, "oom"
    jobs.create(tiny_job(name, {"resources": {"cpu": "1", "memory": TOO_LITTLE}, "runPolicy": {"backoffLimit": 0}}))
    obj = env.wait_phase(jobs, name, ("Failed",), TRAIN_TIMEOUT)
    status = obj["status"]
    assert status.get("reason") == "OOMKilled", status
    pods = jobs.pods(obj)
    assert pods, "no trainer pod"
    term = _terminated(pods[0])
    assert term is not None and (term.reason, term.exit_code) == ("OOMKilled", 137), term
    limits = next(c for c in pods[0].spec.containers if c.name == "trainer").resources.limits
    assert limits.get("memory") == TOO_LITTLE, limits
    e2e_report(f"resources: trainer with memory {TOO_LITTLE} OOMKilled (exit 137); FineTuneJob Failed "
               f"{status['reason']}: {status.get('message')}")


def test_spec_resources_reach_the_trainer_containers_cgroup(operator_env, jobs, e2e_report):
    env, name = operator_env, "limits"
    if env.local_cluster is None:
        pytest.skip("reads the node's cgroup files: only on the local cluster's node, on this host")
    jobs.create(tiny_job(name, {**LONGER, "resources": {"cpu": "1", "memory": "900Mi"}}))

    def running_trainer():
        for pod in jobs.pods(jobs.get(name)):
            for cs in pod.status.container_statuses or []:
                if cs.name == "trainer" and cs.state.running and cs.container_id:
                    return pod, cs.container_id.split("://", 1)[1]
        return None

    pod, cid = wait_until(running_trainer, TRAIN_TIMEOUT, f"{name}'s trainer container to run", give_up=env.forbidden)
    mem = env.local_cluster.container_cgroup("memory", pod.metadata.uid, cid)
    cpu = env.local_cluster.container_cgroup("cpu", pod.metadata.uid, cid)
    assert mem is not None and cpu is not None, f"no cgroup of container {cid} of pod {pod.metadata.uid} on the node"
    if (mem / "memory.max").exists():  # cgroup v2
        memory_limit = int((mem / "memory.max").read_text())
        quota, period = (int(x) for x in (cpu / "cpu.max").read_text().split())
    else:
        memory_limit = int((mem / "memory.limit_in_bytes").read_text())
        quota, period = int((cpu / "cpu.cfs_quota_us").read_text()), int((cpu / "cpu.cfs_period_us").read_text())
    assert memory_limit == 900 * 2**20, memory_limit
    assert quota / period == 1.0, (quota, period)
    assert pod.status.qos_class == "Guaranteed", pod.status.qos_class  # requests = limits: the operator's choice
    env.wait_phase(jobs, name, ("Succeeded",), TRAIN_TIMEOUT)
    e2e_report(f"resources: trainer container's cgroup has memory limit {memory_limit} B and CPU quota "
               f"{quota}/{period} (spec cpu 1, memory 900Mi)")
