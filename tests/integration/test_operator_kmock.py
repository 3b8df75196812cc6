"""The real operator (kopf in-process, all handlers) against kmock, a stateful mock Kubernetes API.

The test plays the Job controller and the kubelet: it writes Job status and creates Pods
the way they would, and checks what the operator does in response.

Limits of kmock 0.8 (what these tests cannot show; the e2e tier on a real API server does):
- no resourceVersion semantics (the suite seeds one on create; it never changes), so
  optimistic-concurrency conflicts (409 on a stale write) never happen here;
- label selectors are ignored (the operator filters by label itself too; that is tested);
- no ownerReference garbage collection: deleting a FineTuneJob leaves its Job and ConfigMap,
  so cascading deletion is checked only as "every child carries a controller ownerReference";
- /status is treated like the main object (a status patch could change spec; no subresource
  isolation), and no CRD schema: no defaulting, pruning or CEL validation — invalid-spec tests
  use specs that a real server's schema would also accept;
- namespace listing answers 500, so the operator runs cluster-wide here.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kmock
import pytest
from kmock_cluster import (
    CONFIGMAPS,
    EVENTS,
    FTJ,
    JOBS,
    NS,
    TEST_SETTINGS,
    Cluster,
    eventually,
    now_text,
    running_operator,
)

from finetune_operator import naming
from finetune_operator.kube import ftj_path, job_path, pod_path
from finetune_operator.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def manifest(name: str = "demo", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec or {"dataset": {"builtin": "digits"}, "training": {"epochs": 5}},
    }


def status_of(cluster: Cluster, name: str = "demo") -> dict[str, Any]:
    return (cluster.get(FTJ, name) or {}).get("status") or {}


def phase_is(cluster: Cluster, phase: str, reason: str | None = None, name: str = "demo") -> Any:
    def check() -> Any:
        status = status_of(cluster, name)
        ok = status.get("phase") == phase and (reason is None or status.get("reason") == reason)
        return status if ok else None

    return check


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def event_reasons(cluster: Cluster) -> list[tuple[str, str]]:
    return [(e.get("type"), e.get("reason")) for e in cluster.objects(EVENTS)]


async def start_pod(cluster: Cluster, ftj: dict[str, Any], name: str, **status: Any) -> None:
    """What the Job controller + kubelet do: a pod from the Job's template, then its status."""
    job = cluster.get(JOBS, naming.job_name(ftj["metadata"]["name"]))
    assert job is not None
    template = copy.deepcopy(job["spec"]["template"]["metadata"])
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template, "name": name}, "status": status}
    await cluster.create(pod_path(NS), body)


async def test_create_run_restart_succeed(cluster: Cluster) -> None:
    async with running_operator(cluster):
        ftj = await cluster.create(ftj_path(NS), manifest())
        uid = ftj["metadata"]["uid"]
        job = await eventually(lambda: cluster.get(JOBS, "demo"), what="the Job")
        cm = await eventually(lambda: cluster.get(CONFIGMAPS, "demo-spec"), what="the ConfigMap")
        for child in (job, cm):
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["uid"], ref["kind"], ref["controller"]) == (uid, "FineTuneJob", True)
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "trainer:test"
        pending = await eventually(phase_is(cluster, "Pending"), what="Pending")
        assert pending["jobName"] == "demo" and pending["progress"]["epochText"] == "0/5"

        await start_pod(
            cluster,
            ftj,
            "demo-a1",
            phase="Running",
            containerStatuses=[{"name": "trainer", "state": {"running": {"startedAt": now_text()}}}],
        )
        await cluster.patch(job_path(NS, "demo") + "/status", {"status": {"active": 1, "ready": 1}})
        running = await eventually(phase_is(cluster, "Running"), what="Running")
        assert condition(running, "Running")["status"] == "True"
        assert condition(running, "Reconciling")["status"] == "True"
        started_at = condition(running, "Running")["lastTransitionTime"]

    # Operator restart mid-run: the new process resumes, creates nothing, keeps the status.
    job_creates = cluster.requests(kmock.action.CREATE, kmock.resource(JOBS))
    async with running_operator(cluster):
        await eventually(
            lambda: cluster.requests(kmock.method.GET, kmock.resource(JOBS), kmock.name("demo")) > 2,
            what="the resumed operator to look at the Job",
        )
        assert len(cluster.objects(JOBS)) == 1
        assert cluster.requests(kmock.action.CREATE, kmock.resource(JOBS)) == job_creates == 1
        assert condition(status_of(cluster), "Running")["lastTransitionTime"] == started_at

        await cluster.patch(
            pod_path(NS) + "/demo-a1",
            {
                "status": {
                    "phase": "Succeeded",
                    "containerStatuses": [
                        {"name": "trainer", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
                    ],
                }
            },
        )
        await cluster.patch(
            job_path(NS, "demo") + "/status",
            {
                "status": {
                    "active": 0,
                    "ready": 0,
                    "succeeded": 1,
                    "completionTime": now_text(),
                    "conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}],
                }
            },
        )
        done = await eventually(phase_is(cluster, "Succeeded"), what="Succeeded")
        assert condition(done, "Ready")["status"] == "True"
        assert condition(done, "Reconciling")["status"] == "False"
        assert done["output"]["path"] == "/output" and done["output"]["ephemeral"] is True
        assert done["attempts"] == 1
        await eventually(lambda: ("Normal", "Succeeded") in event_reasons(cluster), what="Succeeded event")
    reasons = event_reasons(cluster)
    assert ("Normal", "JobCreated") in reasons and ("Normal", "Started") in reasons
    assert reasons.count(("Normal", "JobCreated")) == 1  # not re-announced after the restart
    assert "kopf" not in status_of(cluster)  # kopf's bookkeeping stays in annotations


async def test_ttl_deleting_the_job_keeps_the_result(cluster: Cluster) -> None:
    async with running_operator(cluster):
        ftj = await cluster.create(ftj_path(NS), manifest())
        await eventually(lambda: cluster.get(JOBS, "demo"), what="the Job")
        await cluster.patch(
            job_path(NS, "demo") + "/status",
            {
                "status": {
                    "succeeded": 1,
                    "conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}],
                }
            },
        )
        await eventually(phase_is(cluster, "Succeeded"), what="Succeeded")
        await cluster.delete(job_path(NS, "demo"))  # ttlSecondsAfterFinished
        await eventually(lambda: cluster.get(JOBS, "demo") is None, what="the Job gone")
        gets = cluster.requests(kmock.method.GET, kmock.resource(FTJ))
        await eventually(
            lambda: cluster.requests(kmock.method.GET, kmock.resource(FTJ)) > gets,
            what="a reconcile after the deletion",
        )
        assert status_of(cluster)["phase"] == "Succeeded"
        assert cluster.requests(kmock.action.CREATE, kmock.resource(JOBS)) == 1
        assert ftj["metadata"]["uid"]


async def test_invalid_spec_fails_without_a_job_and_without_retrying(cluster: Cluster) -> None:
    # Accepted by the CRD schema, refused by the operator: the volume name is one of the operator's own.
    reserved = {"name": "finetune-tmp", "mountPath": "/data", "emptyDir": {}}
    spec = {"dataset": {"builtin": "digits"}, "volumes": [reserved]}
    async with running_operator(cluster):
        await cluster.create(ftj_path(NS), manifest("bad", spec))
        failed = await eventually(phase_is(cluster, "Failed", "InvalidSpec", name="bad"), what="InvalidSpec")
        assert failed["message"].startswith("spec.volumes[0].name:")
        assert "Traceback" not in failed["message"]
        await eventually(lambda: ("Warning", "InvalidSpec") in event_reasons(cluster), what="Warning event")
        # No hot loop: once settled, nothing reads or writes the object any more. Absence of
        # activity can only be seen by waiting (a few resync intervals). kmock never bumps
        # resourceVersion, so kopf may re-run the create handler once or twice before it
        # settles; that is the mock, and the count must still stop growing.
        await asyncio.sleep(3 * TEST_SETTINGS.resync_seconds)
        settled = _activity(cluster, "bad")
        await asyncio.sleep(5 * TEST_SETTINGS.resync_seconds)
        assert _activity(cluster, "bad") == settled
        assert settled[0] <= 5, f"too many reads before settling: {settled}"
    assert cluster.objects(JOBS) == [] and cluster.objects(CONFIGMAPS) == []


def _activity(cluster: Cluster, name: str) -> tuple[int, int]:
    reads = cluster.requests(kmock.method.GET, kmock.resource(FTJ), kmock.name(name))
    writes = cluster.requests(kmock.method.PATCH, kmock.resource(FTJ), kmock.name(name))
    return reads, writes


async def test_oom_failure_reason_and_warning(cluster: Cluster) -> None:
    async with running_operator(cluster):
        ftj = await cluster.create(ftj_path(NS), manifest())
        await eventually(lambda: cluster.get(JOBS, "demo"), what="the Job")
        await start_pod(
            cluster,
            ftj,
            "demo-x",
            phase="Failed",
            containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
        )
        await cluster.patch(
            job_path(NS, "demo") + "/status",
            {
                "status": {
                    "failed": 3,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "BackoffLimitExceeded",
                            "message": "backoff",
                        }
                    ],
                }
            },
        )
        failed = await eventually(phase_is(cluster, "Failed", "OOMKilled"), what="OOMKilled")
        assert condition(failed, "Stalled")["status"] == "True"
        await eventually(lambda: ("Warning", "OOMKilled") in event_reasons(cluster), what="Warning event")


async def test_suspend_resume_and_refused_spec_change(cluster: Cluster) -> None:
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"suspend": True}}
    async with running_operator(cluster):
        await cluster.create(ftj_path(NS), manifest(spec=spec))
        job = await eventually(lambda: cluster.get(JOBS, "demo"), what="the Job")
        assert job["spec"]["suspend"] is True
        await eventually(phase_is(cluster, "Suspended"), what="Suspended")

        await cluster.patch(
            ftj_path(NS, "demo"), {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": False}}}
        )
        await eventually(lambda: cluster.get(JOBS, "demo")["spec"]["suspend"] is False, what="Job resumed")
        await eventually(phase_is(cluster, "Pending"), what="Pending after resume")
        await eventually(lambda: ("Normal", "Resumed") in event_reasons(cluster), what="Resumed event")

        await cluster.patch(ftj_path(NS, "demo"), {"metadata": {"generation": 3}, "spec": {"training": {"epochs": 99}}})
        refused = await eventually(
            lambda: next(
                (
                    c
                    for c in status_of(cluster).get("conditions", [])
                    if c["type"] == "SpecChangeRefused" and c["status"] == "True"
                ),
                None,
            ),
            what="SpecChangeRefused",
        )
        assert "spec.training" in refused["message"]
        assert status_of(cluster)["observedGeneration"] == 3
        template = cluster.get(JOBS, "demo")["spec"]["template"]
        assert template == job["spec"]["template"]  # the Job was not touched
        assert cluster.requests(kmock.action.CREATE, kmock.resource(JOBS)) == 1


async def test_image_pull_backoff_fails_after_the_startup_deadline_and_stops_the_job(
    cluster: Cluster,
) -> None:
    settings = Settings(trainer_image="trainer:missing", resync_seconds=0.3, startup_deadline_seconds=1)
    async with running_operator(cluster, settings):
        ftj = await cluster.create(ftj_path(NS), manifest())
        await eventually(lambda: cluster.get(JOBS, "demo"), what="the Job")
        await cluster.patch(job_path(NS, "demo") + "/status", {"status": {"active": 1, "startTime": now_text()}})
        await start_pod(
            cluster,
            ftj,
            "demo-p",
            phase="Pending",
            containerStatuses=[
                {
                    "name": "trainer",
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": 'Back-off pulling image "trainer:missing"',
                        }
                    },
                }
            ],
        )
        pending = await eventually(phase_is(cluster, "Pending", "ImagePullBackOff"), what="Pending/ImagePullBackOff")
        assert "trainer:missing" in pending["message"]
        failed = await eventually(phase_is(cluster, "Failed", "ImagePullBackOff"), timeout=10, what="Failed")
        assert "startup deadline of 1s" in failed["message"]
        await eventually(lambda: cluster.get(JOBS, "demo") is None, what="the Job deleted")
        assert cluster.requests(kmock.action.CREATE, kmock.resource(JOBS)) == 1  # and not re-created
