"""The real operator (kopf in-process, every handler) against a real API server and real controllers.

The control plane is hack/testenv's (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; see
conftest.py), so these behave as in a cluster: CRD schema/defaulting, the status subresource (spec and
generation untouched by status writes), resourceVersion conflicts, label/field selectors, the Job
controller creating pods and completing Jobs, the scheduler's Unschedulable verdict, ownerReference
garbage collection. The test plays only the kubelet of one node (apiserver_util.FakeNode): it writes pod
status through pods/status when a test says so. No trainer runs here: the chart-installed operator with
real trainer pods is tests/e2e's job.

The scenarios cover owned children and their ownerReferences, the refused spec change, the Job
controller's pods through to Succeeded, an operator restart while the pod runs and one while the operator is
down as the Job completes, OOMKilled, the pod failure policy, suspend/resume, ttl-after-finished, the image
pull back-off and Unschedulable startup deadlines, an invalid spec without a hot loop, and cascading deletion.
The progress push path is test_progress_apiserver.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from apiserver_util import (
    NODE,
    ApiError,
    core_url,
    ftj_url,
    job_url,
    running_operator,
    wait,
)

from finetune_operator import naming
from finetune_operator.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# Short resync: deadlines are noticed within a fraction of a second. A progress URL: the token Secret exists.
SETTINGS = Settings(
    trainer_image="trainer:test",
    resync_seconds=0.3,
    startup_deadline_seconds=600,
    http_listen="",
    progress_url="http://finetune-operator.finetune-system.svc:8081",
)


def manifest(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec or {"dataset": {"builtin": "digits"}, "training": {"epochs": 3}},
    }


def status_of(api, ns: str, name: str) -> dict[str, Any]:
    return ((api.get(ftj_url(ns, name)) or {}).get("status")) or {}


def phase_is(api, ns: str, name: str, phase: str, reason: str | None = None):
    def check() -> Any:
        status = status_of(api, ns, name)
        ok = status.get("phase") == phase and (reason is None or status.get("reason") == reason)
        return status if ok else None

    return check


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def events(api, ns: str, name: str) -> list[tuple[str, str]]:
    items = api.list(core_url(ns, "events"), fields=f"involvedObject.name={name},involvedObject.kind=FineTuneJob")
    return [(e.get("type"), e.get("reason")) for e in items]


def pods_of(api, ns: str, ftj: dict[str, Any]) -> list[dict[str, Any]]:
    return api.list(core_url(ns, "pods"), labels=f"{naming.LABEL_UID}={ftj['metadata']['uid']}")


def bound_pod(api, ns: str, ftj: dict[str, Any]) -> dict[str, Any]:
    """The Job's one pod, created by the Job controller and bound by the scheduler to the test's node."""
    (pod,) = wait(
        lambda: [p for p in pods_of(api, ns, ftj) if p["spec"].get("nodeName") == NODE],
        what="the Job controller's pod, bound to the node by the scheduler",
    )
    return pod


def job_condition(api, ns: str, name: str, kind: str) -> bool:
    job = api.get(job_url(ns, name)) or {}
    return any(c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])


def assert_controller_ref(child: dict[str, Any], ftj: dict[str, Any]) -> None:
    (ref,) = child["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": ftj["metadata"]["name"],
        "uid": ftj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# ---------------------------------------------------------------------------------------------- 1
def test_create_owned_children_and_status_through_the_subresource_only(apiserver, it_namespace) -> None:
    api, ns = apiserver.api, it_namespace
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        ftj = api.create(ftj_url(ns), manifest("demo"))
        assert ftj["metadata"]["generation"] == 1
        name = ftj["metadata"]["name"]
        job = wait(lambda: api.get(job_url(ns, naming.job_name(name))), what="the Job")
        cm = wait(lambda: api.get(core_url(ns, "configmaps", naming.configmap_name(name))), what="the ConfigMap")
        secret = wait(
            lambda: api.get(core_url(ns, "secrets", naming.token_secret_name(name))), what="the token Secret"
        )
        for child in (job, cm, secret):
            assert_controller_ref(child, ftj)
        assert job["spec"]["template"]["metadata"]["labels"][naming.LABEL_UID] == ftj["metadata"]["uid"]
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "trainer:test"  # the settings' default
        assert cm["data"]["job.yaml"]

        pending = wait(phase_is(api, ns, "demo", "Pending"), what="phase Pending")
        assert pending["reason"] in ("Creating", "Starting"), pending
        assert pending["observedGeneration"] == 1 and pending["jobName"] == job["metadata"]["name"]
        assert pending["progress"]["epochText"] == "0/3"
        conds = {c["type"]: c for c in pending["conditions"]}
        assert {k: c["status"] for k, c in conds.items()} == {
            "Ready": "False", "Reconciling": "True", "Stalled": "False",
            "Running": "False", "Succeeded": "False", "Failed": "False",
        }  # fmt: skip
        assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] for c in conds.values())

        # Status went through /status only: spec and generation as created, and the API server's own
        # field-ownership records say that only /status writes own .status.
        fresh = api.get(ftj_url(ns, "demo"))
        assert fresh["spec"] == ftj["spec"] and fresh["metadata"]["generation"] == 1
        owners = [(m["manager"], m.get("subresource", "")) for m in fresh["metadata"]["managedFields"]
                  if "f:status" in (m.get("fieldsV1") or {})]  # fmt: skip
        assert owners and all(sub == "status" for _, sub in owners), owners
        patches = [p for m, p in op.calls if m == "PATCH" and "/finetunejobs/" in p]
        assert patches and all(p.endswith("/status") for p in patches), patches
        assert "kopf" not in fresh["status"]

        # A spec change: the server bumps generation, the operator observes it, refuses it, keeps the Job.
        api.merge_patch(ftj_url(ns, "demo"), {"spec": {"training": {"epochs": 7}}})
        refused = wait(
            lambda: (
                (s := status_of(api, ns, "demo")).get("observedGeneration") == 2
                and condition(s, "SpecChangeRefused")["status"] == "True"
                and s
            ),
            what="observedGeneration 2 with SpecChangeRefused",
        )
        assert "spec.training" in condition(refused, "SpecChangeRefused")["message"]
        assert all(c["observedGeneration"] == 2 for c in refused["conditions"])
        after = api.get(ftj_url(ns, "demo"))
        assert after["metadata"]["generation"] == 2  # status writes did not bump it
        job_now = api.get(job_url(ns, job["metadata"]["name"]))
        assert job_now["metadata"]["uid"] == job["metadata"]["uid"]
        assert job_now["spec"]["template"] == job["spec"]["template"]
        assert op.count("POST", "/jobs") == 1


# ---------------------------------------------------------------------------------------------- 2
def test_job_controller_pod_runs_and_succeeds(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    with running_operator(apiserver.cluster, ns, SETTINGS):
        ftj = api.create(ftj_url(ns), manifest("train"))
        pod = bound_pod(api, ns, ftj)
        (ref,) = pod["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["controller"]) == ("Job", "train", True)
        assert pod["spec"]["automountServiceAccountToken"] is False

        node.set_running(pod)
        running = wait(phase_is(api, ns, "train", "Running"), what="phase Running")
        assert condition(running, "Running")["status"] == "True"
        assert condition(running, "Ready")["status"] == "False"
        assert condition(running, "Reconciling")["status"] == "True"
        assert running["startTime"] and pod["metadata"]["name"] in running["message"]
        wait(lambda: api.get(job_url(ns, "train"))["status"].get("active") == 1, what="Job status.active 1")

        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), exit_code=0)
        wait(lambda: job_condition(api, ns, "train", "Complete"), what="the Job controller to complete the Job")
        done = wait(phase_is(api, ns, "train", "Succeeded", "Succeeded"), what="phase Succeeded")
        assert condition(done, "Ready")["status"] == "True"
        assert condition(done, "Reconciling")["status"] == "False"
        assert condition(done, "Stalled")["status"] == "False"
        assert done["attempts"] == 1 and done["completionTime"]
        assert done["output"]["path"] == "/output" and done["output"]["ephemeral"] is True
        wait(lambda: ("Normal", "Succeeded") in events(api, ns, "train"), what="the Succeeded event")
        reasons = events(api, ns, "train")
        for reason in ("JobCreated", "Started", "Succeeded"):
            assert reasons.count(("Normal", reason)) == 1, reasons


def test_invalid_job_file_exit_code_fails_the_job_at_once_through_the_pod_failure_policy(
    apiserver, it_namespace
) -> None:
    """Exit code 2 (the trainer rejected its job file): the real Job controller applies the Job's
    podFailurePolicy (FailJob, no retry despite backoffLimit 2) and the operator reports why."""
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    with running_operator(apiserver.cluster, ns, SETTINGS):
        ftj = api.create(ftj_url(ns), manifest("badfile"))
        pod = bound_pod(api, ns, ftj)
        node.set_running(pod)
        wait(phase_is(api, ns, "badfile", "Running"), what="phase Running")
        pod = api.get(core_url(ns, "pods", pod["metadata"]["name"]))
        node.set_terminated(pod, exit_code=2, reason="Error", message="spec.dataset.path: /data/x does not exist")
        wait(lambda: job_condition(api, ns, "badfile", "Failed"), what="the Job controller to fail the Job")
        job = api.get(job_url(ns, "badfile"))
        failed_cond = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
        assert failed_cond["reason"] == "PodFailurePolicy", failed_cond
        failed = wait(phase_is(api, ns, "badfile", "Failed", "InvalidJobFile"), what="Failed/InvalidJobFile")
        assert "spec.dataset.path" in failed["message"]
        assert condition(failed, "Stalled")["status"] == "True"
        assert len(pods_of(api, ns, ftj)) == 1  # not retried
        wait(lambda: ("Warning", "InvalidJobFile") in events(api, ns, "badfile"), what="the warning event")


def test_oom_killed_with_no_retries_left_fails_with_the_reason(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"backoffLimit": 0}}
    with running_operator(apiserver.cluster, ns, SETTINGS):
        ftj = api.create(ftj_url(ns), manifest("oom", spec))
        pod = bound_pod(api, ns, ftj)
        node.set_running(pod)
        wait(phase_is(api, ns, "oom", "Running"), what="phase Running")
        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), exit_code=137, reason="OOMKilled")
        wait(lambda: job_condition(api, ns, "oom", "Failed"), what="the Job controller: BackoffLimitExceeded")
        failed = wait(phase_is(api, ns, "oom", "Failed", "OOMKilled"), what="Failed/OOMKilled")
        assert condition(failed, "Stalled")["status"] == "True"
        wait(lambda: ("Warning", "OOMKilled") in events(api, ns, "oom"), what="the OOMKilled warning")


def test_suspend_creates_a_suspended_job_and_resume_starts_it(apiserver, it_namespace) -> None:
    api, ns = apiserver.api, it_namespace
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"suspend": True}}
    with running_operator(apiserver.cluster, ns, SETTINGS):
        ftj = api.create(ftj_url(ns), manifest("later", spec))
        job = wait(lambda: api.get(job_url(ns, "later")), what="the Job")
        assert job["spec"]["suspend"] is True
        wait(lambda: job_condition(api, ns, "later", "Suspended"), what="the Job controller's Suspended condition")
        wait(phase_is(api, ns, "later", "Suspended"), what="phase Suspended")
        assert pods_of(api, ns, ftj) == []

        api.merge_patch(ftj_url(ns, "later"), {"spec": {"runPolicy": {"suspend": False}}})
        wait(lambda: api.get(job_url(ns, "later"))["spec"]["suspend"] is False, what="the Job resumed")
        bound_pod(api, ns, ftj)  # the Job controller starts the pod now
        wait(phase_is(api, ns, "later", "Pending"), what="phase Pending after resume")
        wait(lambda: ("Normal", "Resumed") in events(api, ns, "later"), what="the Resumed event")


def test_ttl_after_finished_deletes_the_job_and_the_result_stays(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"ttlSecondsAfterFinished": 0}}
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        ftj = api.create(ftj_url(ns), manifest("brief", spec))
        pod = bound_pod(api, ns, ftj)
        node.set_running(pod)
        wait(phase_is(api, ns, "brief", "Running"), what="phase Running")
        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])))
        done = wait(phase_is(api, ns, "brief", "Succeeded"), what="phase Succeeded")
        wait(lambda: api.get(job_url(ns, "brief")) is None, what="ttl-after-finished to delete the Job")
        time.sleep(1.0)  # a few resync intervals
        assert status_of(api, ns, "brief") == done  # the result stays; not JobDeleted
        assert op.count("POST", "/jobs") == 1


def test_image_pull_back_off_fails_at_the_startup_deadline_and_stops_the_job(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    spec = {"dataset": {"builtin": "digits"}, "image": "registry.invalid/trainer:nope",
            "runPolicy": {"startupDeadlineSeconds": 3}}  # fmt: skip
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        ftj = api.create(ftj_url(ns), manifest("noimage", spec))
        pod = bound_pod(api, ns, ftj)
        node.set_waiting(pod, "ImagePullBackOff", 'Back-off pulling image "registry.invalid/trainer:nope"')
        pending = wait(phase_is(api, ns, "noimage", "Pending", "ImagePullBackOff"), what="Pending/ImagePullBackOff")
        assert "registry.invalid/trainer:nope" in pending["message"]
        failed = wait(phase_is(api, ns, "noimage", "Failed", "ImagePullBackOff"), what="Failed/ImagePullBackOff")
        assert "startup deadline of 3s" in failed["message"]
        wait(lambda: api.get(job_url(ns, "noimage")) is None, what="the Job deleted")
        wait(lambda: not pods_of(api, ns, ftj), what="its pod gone")
        assert op.count("POST", "/jobs") == 1  # and not re-created


# ---------------------------------------------------------------------------------------------- 3
def test_unschedulable_pending_then_failed_at_the_startup_deadline(apiserver, it_namespace) -> None:
    api, ns = apiserver.api, it_namespace
    spec = {
        "dataset": {"builtin": "digits"},
        "scheduling": {"nodeSelector": {"finetune.dev/no-such-pool": "gpu"}},
        "runPolicy": {"startupDeadlineSeconds": 4},
    }
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        ftj = api.create(ftj_url(ns), manifest("nofit", spec))
        (pod,) = wait(lambda: pods_of(api, ns, ftj), what="the Job controller's pod")
        scheduled = wait(
            lambda: next(
                (c for c in (api.get(core_url(ns, "pods", pod["metadata"]["name"])) or {}).get("status", {})
                 .get("conditions") or [] if c["type"] == "PodScheduled" and c["status"] == "False"),
                None,
            ),
            what="the scheduler's PodScheduled=False",
        )  # fmt: skip
        assert scheduled["reason"] == "Unschedulable"
        pending = wait(phase_is(api, ns, "nofit", "Pending", "Unschedulable"), what="Pending/Unschedulable")
        assert "node" in pending["message"] and "fails after 4s" in pending["message"]
        assert condition(pending, "Reconciling")["status"] == "True"
        wait(lambda: ("Warning", "Unschedulable") in events(api, ns, "nofit"), what="the Unschedulable warning")

        failed = wait(phase_is(api, ns, "nofit", "Failed", "Unschedulable"), timeout=20, what="Failed/Unschedulable")
        assert "startup deadline of 4s" in failed["message"]
        assert condition(failed, "Stalled")["status"] == "True"
        wait(lambda: api.get(job_url(ns, "nofit")) is None, what="the Job deleted")
        wait(lambda: not pods_of(api, ns, ftj), what="its pod garbage-collected")
        time.sleep(1.0)  # a few resync intervals: the Job is not re-created
        assert api.get(job_url(ns, "nofit")) is None
        assert op.count("POST", "/jobs") == 1
        assert status_of(api, ns, "nofit")["phase"] == "Failed"


# ---------------------------------------------------------------------------------------------- 4
def test_restart_while_running_creates_nothing_and_keeps_the_status(apiserver, it_namespace) -> None:
    """The operator restarts while the pod runs: the new process resumes the FineTuneJob, creates no Job,
    keeps the Running condition's transition time and announces nothing twice; the job then succeeds."""
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    with running_operator(apiserver.cluster, ns, SETTINGS) as first:
        ftj = api.create(ftj_url(ns), manifest("steady"))
        pod = bound_pod(api, ns, ftj)
        node.set_running(pod)
        running = wait(phase_is(api, ns, "steady", "Running"), what="phase Running")
        started_at = condition(running, "Running")["lastTransitionTime"]
        job_uid = api.get(job_url(ns, "steady"))["metadata"]["uid"]
        assert first.count("POST", "/jobs") == 1

    with running_operator(apiserver.cluster, ns, SETTINGS) as second:
        wait(lambda: second.count("GET", "/jobs/steady") > 2, what="the resumed operator to look at the Job")
        assert second.count("POST", "/jobs") == 0
        jobs = api.list(job_url(ns), labels=f"{naming.LABEL_UID}={ftj['metadata']['uid']}")
        assert [j["metadata"]["uid"] for j in jobs] == [job_uid]
        now = status_of(api, ns, "steady")
        assert now["phase"] == "Running" and condition(now, "Running")["lastTransitionTime"] == started_at, now

        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), exit_code=0)
        done = wait(phase_is(api, ns, "steady", "Succeeded"), what="phase Succeeded")
        assert condition(done, "Ready")["status"] == "True" and done["attempts"] == 1
        wait(lambda: ("Normal", "Succeeded") in events(api, ns, "steady"), what="the Succeeded event")
    reasons = events(api, ns, "steady")
    for reason in ("JobCreated", "Started", "Succeeded"):
        assert reasons.count(("Normal", reason)) == 1, reasons  # not re-announced after the restart


class StatusWriter(threading.Thread):
    """Another writer of the FineTuneJob's status (as a progress reporter would be): read, modify, PUT with
    the read resourceVersion, retry on 409. Runs while the operator writes status too."""

    def __init__(self, api, ns: str, name: str) -> None:
        super().__init__(name="status-writer", daemon=True)
        self.api, self.url = api, ftj_url(ns, name, "status")
        self.stop = threading.Event()
        self.written = 0
        self.conflicts = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(0.03):
            try:
                obj = self.api.get(self.url)
                status = obj.setdefault("status", {})
                progress = status.setdefault("progress", {})
                progress["epoch"] = self.written + 1  # as the progress endpoint writes it: epoch + text
                progress["epochText"] = f"{self.written + 1}/{progress.get('totalEpochs', 0)}"
                self.api.put(self.url, obj)
                self.written += 1
            except ApiError as err:
                if err.status == 409:
                    self.conflicts += 1
                else:
                    self.errors.append(str(err))
            except Exception as err:
                self.errors.append(repr(err))


def test_restart_mid_run_keeps_one_job_and_survives_concurrent_status_writers(
    apiserver, it_namespace, caplog: pytest.LogCaptureFixture, integration_report
) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    spec = {"dataset": {"builtin": "digits"}, "training": {"epochs": 10000}}
    writer = None
    try:
        with running_operator(apiserver.cluster, ns, SETTINGS) as first:
            ftj = api.create(ftj_url(ns), manifest("resume", spec))
            writer = StatusWriter(api, ns, "resume")
            writer.start()
            pod = bound_pod(api, ns, ftj)
            node.set_running(pod)
            running = wait(phase_is(api, ns, "resume", "Running"), what="phase Running")
            job_uid = api.get(job_url(ns, "resume"))["metadata"]["uid"]
            started_at = condition(running, "Running")["lastTransitionTime"]
            assert first.count("POST", "/jobs") == 1

        # The operator is down: the pod finishes and the Job controller completes the Job meanwhile.
        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), exit_code=0)
        wait(lambda: job_condition(api, ns, "resume", "Complete"), what="the Job to complete")
        assert status_of(api, ns, "resume")["phase"] == "Running"  # nobody derived it yet

        with running_operator(apiserver.cluster, ns, SETTINGS) as second:
            done = wait(phase_is(api, ns, "resume", "Succeeded"), what="the restarted operator to converge")
            assert condition(done, "Running")["status"] == "False"
            jobs = api.list(job_url(ns), labels=f"{naming.LABEL_UID}={ftj['metadata']['uid']}")
            assert [j["metadata"]["uid"] for j in jobs] == [job_uid]
            assert second.count("POST", "/jobs") == 0
            # A stale write is refused by the server (the conflicts above were real); the operator lives on.
            stale = api.get(ftj_url(ns, "resume", "status"))
            api.merge_patch(ftj_url(ns, "resume", "status"), {"status": {"progress": {"trainLoss": 0.5}}})
            with pytest.raises(ApiError) as conflict:
                api.put(ftj_url(ns, "resume", "status"), stale)
            assert conflict.value.status == 409
            writer.stop.set()
            writer.join(5)
            assert second.thread.is_alive()
            # The other writer's field survived every operator write; the operator's did too.
            final = status_of(api, ns, "resume")
            assert final["progress"]["epoch"] == writer.written
            assert final["progress"]["epochText"] == f"{writer.written}/10000"
            assert final["progress"]["trainLoss"] == 0.5
            assert final["phase"] == "Succeeded" and condition(final, "Ready")["status"] == "True"
        integration_report(f"concurrent status writer: {writer.written} PUTs, {writer.conflicts} refused with 409")
        assert writer.written > 10 and not writer.errors, (writer.written, writer.errors[:3])
        reasons = events(api, ns, "resume")
        assert reasons.count(("Normal", "JobCreated")) == 1 and reasons.count(("Normal", "Started")) == 1, reasons
        assert started_at  # recorded before the restart
        # Handler failures (kopf.objects) and the operator's own loggers: no exception at all.
        unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR
                      and r.name.startswith(("kopf.objects", "finetune_operator"))]  # fmt: skip
        assert not unexpected, [r.getMessage() for r in unexpected][:3]
    finally:
        if writer is not None:
            writer.stop.set()
            writer.join(5)


# ---------------------------------------------------------------------------------------------- 6
INVALID = {
    "reserved": (
        {"dataset": {"builtin": "digits"}, "volumes": [{"name": "finetune-tmp", "mountPath": "/data", "emptyDir": {}}]},
        "spec.volumes[0].name:",
    ),
    "hostpath": (
        {
            "dataset": {"builtin": "digits"},
            "volumes": [{"name": "data", "mountPath": "/data", "hostPath": {"path": "/srv/data"}}],
        },
        "spec.volumes[0].hostPath:",
    ),
}


def test_invalid_spec_fails_without_a_job_and_without_a_hot_loop(apiserver, it_namespace) -> None:
    api, ns = apiserver.api, it_namespace
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        for name, (spec, _) in INVALID.items():
            api.create(ftj_url(ns), manifest(name, spec))  # the CRD schema accepts both
        for name, (_, field) in INVALID.items():
            failed = wait(phase_is(api, ns, name, "Failed", "InvalidSpec"), what=f"{name}: Failed/InvalidSpec")
            assert failed["message"].startswith(field), failed["message"]
            assert "Traceback" not in failed["message"]
            assert condition(failed, "Stalled")["status"] == "True"
            wait(lambda n=name: ("Warning", "InvalidSpec") in events(api, ns, n), what=f"{name}: Warning event")

        def activity() -> tuple[Any, ...]:
            calls = sum(1 for _, p in list(op.calls) if any(f"/{n}" in p for n in INVALID))
            versions = tuple(api.get(ftj_url(ns, n))["metadata"]["resourceVersion"] for n in INVALID)
            return calls, versions, len(api.list(core_url(ns, "events")))

        time.sleep(1.0)  # let kopf's own bookkeeping (annotations) settle
        settled = activity()
        time.sleep(3.0)  # ten resync intervals
        assert activity() == settled, "the operator keeps reading or writing invalid FineTuneJobs"
        assert settled[0] <= 12, f"too many API calls for two invalid jobs: {settled[0]}"
        assert api.list(job_url(ns)) == []
        assert [c for c in api.list(core_url(ns, "configmaps")) if c["metadata"]["name"] != "kube-root-ca.crt"] == []
        assert op.thread.is_alive()


def test_fixing_an_invalid_spec_starts_the_job(apiserver, it_namespace) -> None:
    """InvalidSpec without a Job is the one failure that is not final: fixing the spec starts the Job and
    the status follows it (found here: the status used to stay Failed/InvalidSpec while the Job ran)."""
    api, ns = apiserver.api, it_namespace
    spec, _ = INVALID["reserved"]
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        api.create(ftj_url(ns), manifest("fixme", spec))
        invalid = wait(phase_is(api, ns, "fixme", "Failed", "InvalidSpec"), what="Failed/InvalidSpec")
        fixed_volumes = [{"name": "data", "mountPath": "/data", "emptyDir": {}}]
        api.merge_patch(ftj_url(ns, "fixme"), {"spec": {"volumes": fixed_volumes}})  # generation 2
        wait(lambda: api.get(job_url(ns, "fixme")), what="the Job for the fixed spec")
        # jobName lands in the same status patch as the phase derived from that Job: no slack needed.
        fixed = wait(lambda: (s := status_of(api, ns, "fixme")).get("jobName") and s, what="status.jobName")
        assert op.count("POST", "/jobs") == 1
        assert fixed["observedGeneration"] == 2
        assert (fixed["phase"], fixed["reason"]) in {("Pending", "Starting"), ("Pending", "Creating")}, fixed
        assert condition(fixed, "Stalled")["status"] == "False"
        assert "completionTime" not in fixed  # the invalid attempt's time is not carried over

        # ... and finishes as any job does, with its own times.
        pod = bound_pod(api, ns, api.get(ftj_url(ns, "fixme")))
        apiserver.node.set_running(pod)
        wait(phase_is(api, ns, "fixme", "Running"), what="phase Running")
        apiserver.node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])))
        done = wait(phase_is(api, ns, "fixme", "Succeeded"), what="phase Succeeded")
        assert done["completionTime"] >= done["startTime"] >= invalid["completionTime"]


# ---------------------------------------------------------------------------------------------- 5
# Last in the module: it waits for the garbage collector to watch FineTuneJobs (GcProbe), which the
# tests above give time to happen.
def test_deletion_cascades_through_the_garbage_collector(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    apiserver.gc.wait_ready()  # see GcProbe: a fresh CRD is invisible to the collector for up to 30 s
    with running_operator(apiserver.cluster, ns, SETTINGS) as op:
        ftj = api.create(ftj_url(ns), manifest("bye"))
        pod = bound_pod(api, ns, ftj)
        node.set_running(pod)
        wait(phase_is(api, ns, "bye", "Running"), what="phase Running")
        children = [
            job_url(ns, naming.job_name(ftj["metadata"]["name"])),
            core_url(ns, "configmaps", naming.configmap_name(ftj["metadata"]["name"])),
            core_url(ns, "secrets", naming.token_secret_name(ftj["metadata"]["name"])),
        ]
        assert all(api.get(url) for url in children)
        assert not api.get(ftj_url(ns, "bye"))["metadata"].get("finalizers")  # nothing holds the deletion

        api.delete(ftj_url(ns, "bye"))
        wait(lambda: api.get(ftj_url(ns, "bye")) is None, timeout=5, what="the FineTuneJob gone")
        for url in children:
            wait(lambda u=url: api.get(u) is None, what=f"the garbage collector to delete {url}")
        wait(lambda: not pods_of(api, ns, ftj), what="the pod gone (Job deleted, then the pod)")
        time.sleep(1.0)  # a few resync intervals: nothing is re-created for the deleted FineTuneJob
        assert api.list(job_url(ns)) == []
        assert op.count("POST", "/jobs") == 1
        assert (ns, "bye") not in op.rt.queue.unfinished()
