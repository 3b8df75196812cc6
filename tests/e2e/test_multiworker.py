"""Two data-parallel workers (issue 9) through the real Job controller: Indexed Job + headless Service.

The operator builds an Indexed Job (completions = parallelism = 2, backoffLimitPerIndex, successPolicy on
index 0) and a headless Service as the pods' subdomain; each pod runs `finetune-train torchrun` with static
rendezvous on worker 0's DNS name, which cluster DNS resolves (CoreDNS on the local kubelet node, as on kind).

Proves: the real API server accepts the Job (its newer fields included); both workers train (gloo) and the
job Succeeds with the export and per-worker status; the Service and Job are owned by the FineTuneJob; one
worker killed with grace 0 mid-run restarts the group, which resumes from rank 0's checkpoint (no hang).
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import TERMINAL, tiny_job  # noqa: E402

INDEX = "batch.kubernetes.io/job-completion-index"


def two_workers(name: str, epochs: int) -> dict:
    return tiny_job(name, {"workers": 2, "training": {"epochs": epochs, "batchSize": 16},
                           # torchrun + a worker, each with torch loaded, under a real memory limit
                           "resources": {"cpu": "1", "memory": "2Gi"}})


def worker_pods(jobs, ftj: dict, index: str) -> list:
    return [p for p in jobs.pods(ftj) if (p.metadata.annotations or {}).get(INDEX) == index
            and p.metadata.deletion_timestamp is None]


def test_two_workers_train_together_and_succeed(operator_env, jobs, e2e_report):
    env, name = operator_env, "ddp-pair"
    t0 = time.monotonic()
    created = jobs.create(two_workers(name, 2))
    obj = env.wait_phase(jobs, name, ("Succeeded",), TRAIN_TIMEOUT * 2)
    status = obj["status"]
    k8s_job = jobs.batch.read_namespaced_job(status["jobName"], jobs.ns)
    assert k8s_job.spec.completion_mode == "Indexed" and k8s_job.spec.completions == 2, k8s_job.spec
    assert k8s_job.spec.parallelism == 2 and k8s_job.spec.backoff_limit_per_index is not None, k8s_job.spec
    svc_name = k8s_job.spec.template.spec.subdomain
    svc = jobs.core.read_namespaced_service(svc_name, jobs.ns)
    assert svc.spec.cluster_ip == "None", svc.spec
    assert created["metadata"]["uid"] in [r.uid for r in svc.metadata.owner_references or []]
    workers = status.get("workers") or []
    assert sorted(w.get("index") for w in workers) == [0, 1], f"status.workers: {workers}"
    assert (status.get("output") or {}).get("sha256"), status
    progress = status.get("progress") or {}
    assert progress.get("epoch") == 2, progress
    e2e_report(f"2 workers (gloo, Indexed Job + headless Service {svc_name}) Succeeded in "
               f"{time.monotonic() - t0:.0f} s, val acc {status['output'].get('valAccuracy')}, "
               f"workers {[(w.get('index'), w.get('phase')) for w in workers]}")


def test_one_worker_killed_restarts_the_group_which_resumes(operator_env, jobs, e2e_report):
    env, name = operator_env, "ddp-kill"
    jobs.create(two_workers(name, 5))

    def after_first_epoch():
        st = jobs.status(name)
        return st if (st.get("lastCheckpoint") or {}).get("epoch", 0) >= 1 and st.get("phase") == "Running" else None

    at = wait_until(after_first_epoch, TRAIN_TIMEOUT, f"{name} to checkpoint its first epoch",
                    give_up=env.forbidden)
    ftj = jobs.get(name)
    (victim,) = worker_pods(jobs, ftj, "1")
    before = {p.metadata.name for p in jobs.pods(ftj)}
    jobs.core.delete_namespaced_pod(victim.metadata.name, jobs.ns, grace_period_seconds=0)

    def both_replaced():
        now = {i: worker_pods(jobs, ftj, i) for i in ("0", "1")}
        fresh = {i: [p for p in pods if p.metadata.name not in before] for i, pods in now.items()}
        return fresh if all(fresh.values()) else None

    wait_until(both_replaced, 180, "both workers replaced (the group restarted)", give_up=env.forbidden)
    status = wait_until(lambda: (s := jobs.status(name)).get("phase") in TERMINAL and s, TRAIN_TIMEOUT * 2,
                        f"{name} to finish after the kill", give_up=env.forbidden)
    assert status["phase"] == "Succeeded", status
    assert status.get("resumeCount", 0) >= 1, f"the restarted group did not resume: {status}"
    assert (status.get("progress") or {}).get("epoch") == 5, status.get("progress")
    e2e_report(f"worker 1 of {name} killed (grace 0) with {at['lastCheckpoint'].get('file')} saved, at "
               f"progress epoch {(at.get('progress') or {}).get('epoch')}: both workers replaced, resumeCount "
               f"{status.get('resumeCount')}, Succeeded 5/5")


def test_services_were_never_refused(operator_env):
    problem = operator_env.forbidden()
    assert problem is None, problem

