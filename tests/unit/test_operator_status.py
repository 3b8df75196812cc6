"""derive_status from recorded Job/Pod objects: every phase, every failure reason, suspend, times.

The Job and Pod dicts below are trimmed copies of what a v1.30 API server returns
(`kubectl get -o json`), keeping the fields the operator reads.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from finetune_operator import observe
from finetune_operator.crd import crd
from finetune_operator.naming import LABEL_UID
from finetune_operator.objects import VOL_OUTPUT, build_job
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings
from finetune_operator.status import derive_status, invalid_spec_status, should_stop_job, transition_events

pytestmark = pytest.mark.unit

SETTINGS = Settings(startup_deadline_seconds=600)
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
CREATED = "2025-03-01T12:00:00Z"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def ftj(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, generation: int = 1) -> dict:
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": generation},
        "spec": spec or {"dataset": {"builtin": "digits"}, "training": {"epochs": 10}},
    }
    if status is not None:
        body["status"] = status
    return body


def job(suspend: bool = False, conditions: list[dict] | None = None, spec: dict | None = None, **counts: Any) -> dict:
    obj = build_job(FineTuneJob.from_body(ftj(spec)), SETTINGS)
    obj["metadata"]["creationTimestamp"] = CREATED
    obj["metadata"]["uid"] = "job-uid"
    obj["spec"]["suspend"] = suspend
    obj["status"] = {"conditions": conditions or [], **counts}
    if not suspend:
        obj["status"].setdefault("startTime", CREATED)
    return obj


def job_condition(kind: str, reason: str, message: str = "", when: str = "2025-03-01T13:00:00Z") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": when}


def pod(name: str = "demo-abcde", phase: str = "Pending", created: str = CREATED, **status: Any) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "creationTimestamp": created,
            "labels": {LABEL_UID: "uid-1"},
        },
        "status": {"phase": phase, **status},
    }


def waiting(reason: str, message: str) -> dict:
    return {
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "trainer:1",
                "ready": False,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ]
    }


def terminated(exit_code: int, reason: str = "Error", message: str = "") -> dict:
    return {
        "containerStatuses": [
            {
                "name": "trainer",
                "ready": False,
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "message": message,
                        "startedAt": "2025-03-01T12:00:05Z",
                        "finishedAt": "2025-03-01T12:30:00Z",
                    }
                },
            }
        ]
    }


RUNNING_POD = pod(
    phase="Running",
    containerStatuses=[{"name": "trainer", "ready": True, "state": {"running": {"startedAt": "2025-03-01T12:00:07Z"}}}],
)
UNSCHEDULABLE_POD = pod(
    conditions=[
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
)


def derive(body: dict, j: dict | None, pods: list[dict], seconds: float = 30, settings: Settings = SETTINGS) -> dict:
    return derive_status(FineTuneJob.from_body(body), j, pods, at(seconds), settings)


def cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def true_conditions(status: dict) -> set[str]:
    return {c["type"] for c in status["conditions"] if c["status"] == "True"}


# --- phases -------------------------------------------------------------------------------------


def test_no_job_yet_is_pending_creating() -> None:
    status = derive(ftj(), None, [])
    assert (status["phase"], status["reason"]) == ("Pending", "Creating")
    assert true_conditions(status) == {"Reconciling"}
    assert status["progress"]["epochText"] == "0/10"


def test_job_without_pods_is_pending_starting() -> None:
    status = derive(ftj(), job(active=1), [pod()])
    assert (status["phase"], status["reason"]) == ("Pending", "Starting")
    assert status["jobName"] == "demo"
    assert status["attempts"] == 1


def test_running_pod_makes_it_running() -> None:
    status = derive(ftj(), job(active=1, ready=1), [RUNNING_POD])
    assert (status["phase"], status["reason"]) == ("Running", "Running")
    assert status["startTime"] == "2025-03-01T12:00:07Z"
    assert true_conditions(status) == {"Reconciling", "Running"}
    assert "completionTime" not in status


def test_completed_job_succeeds_with_output_location() -> None:
    done = job(
        conditions=[job_condition("Complete", "CompletionsReached")],
        succeeded=1,
        completionTime="2025-03-01T12:31:00Z",
    )
    pods = [pod(phase="Succeeded", **terminated(0, "Completed"))]
    status = derive(ftj(), done, pods)
    assert (status["phase"], status["reason"]) == ("Succeeded", "Succeeded")
    assert status["completionTime"] == "2025-03-01T12:31:00Z"
    assert status["output"] == {"path": "/output", "volume": VOL_OUTPUT, "ephemeral": True}
    assert "emptyDir" in status["message"]  # the user is told the model is not kept
    assert true_conditions(status) == {"Ready", "Succeeded"}


def test_success_reads_a_json_termination_message_into_output() -> None:
    done = job(conditions=[job_condition("Complete", "CompletionsReached")], succeeded=1)
    summary = '{"weightsFile": "model.safetensors", "sha256": "ab12", "bestEpoch": 7, "valAccuracy": 0.93}'
    status = derive(ftj(), done, [pod(phase="Succeeded", **terminated(0, "Completed", summary))])
    assert status["output"]["sha256"] == "ab12" and status["output"]["bestEpoch"] == 7


def test_final_progress_comes_from_the_termination_message_when_the_last_pushes_were_lost() -> None:
    # The operator was down while the last epochs ended: the status said 1 of 3 when the Job succeeded.
    pushed = {"epoch": 1, "totalEpochs": 3, "epochText": "1/3", "percent": 33.33, "etaSeconds": 20.0, "etaText": "20s"}
    prev = {"phase": "Running", "reason": "Running", "progress": pushed}
    done = job(conditions=[job_condition("Complete", "CompletionsReached")], succeeded=1)
    summary = '{"weightsFile": "model.safetensors", "sha256": "ab12", "bestEpoch": 3, "valAccuracy": 0.9, "epochs": 3}'
    status = derive(ftj(status=prev), done, [pod(phase="Succeeded", **terminated(0, "Completed", summary))])
    assert (status["progress"]["epoch"], status["progress"]["epochText"]) == (3, "3/3")
    assert status["progress"]["percent"] == 100.0  # the lifted epoch carries its fraction; the stale ETA goes
    assert "etaSeconds" not in status["progress"] and "etaText" not in status["progress"]
    assert "epochs" not in status["output"]  # progress, not an output field
    # A pushed progress ahead of the message (or a message without it, from an older trainer) is kept.
    ahead = {**prev, "progress": {"epoch": 3, "totalEpochs": 3, "epochText": "3/3", "step": 40}}
    old = summary.replace(', "epochs": 3', "")
    for before, message in ((ahead, summary), (prev, old), (prev, summary.replace("3}", '"3"}'))):
        kept = derive(ftj(status=before), done, [pod(phase="Succeeded", **terminated(0, "Completed", message))])
        assert kept["progress"]["epoch"] == before["progress"]["epoch"], message
    # Only a succeeded trainer's word counts: a running job's progress is the pushes'.
    running = derive(ftj(status=prev), job(active=1, ready=1), [RUNNING_POD])
    assert running["progress"]["epoch"] == 1


def test_success_carries_the_test_accuracy_when_the_job_had_a_test_split() -> None:
    done = job(conditions=[job_condition("Complete", "CompletionsReached")], succeeded=1)
    summary = ('{"weightsFile": "model.safetensors", "sha256": "ab12", "bestEpoch": 7, "valAccuracy": 0.93, '
               '"testAccuracy": 0.91}')
    status = derive(ftj(), done, [pod(phase="Succeeded", **terminated(0, "Completed", summary))])
    assert (status["output"]["valAccuracy"], status["output"]["testAccuracy"]) == (0.93, 0.91)
    assert "testAccuracy" in crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"]["output"]["properties"]


def test_suspended_job_is_suspended_and_resume_goes_back_to_pending() -> None:
    suspended = derive(ftj(), job(suspend=True), [])
    assert (suspended["phase"], suspended["reason"]) == ("Suspended", "Suspended")
    assert true_conditions(suspended) == set()
    assert cond(suspended, "Reconciling")["reason"] == "Suspended"
    resumed = derive(ftj(status=suspended), job(active=1), [pod()], seconds=60)
    assert resumed["phase"] == "Pending"
    assert ("Normal", "Resumed") in [(t, r) for t, r, _ in transition_events(suspended, resumed)]


def test_kueue_suspended_condition_counts_as_suspended() -> None:
    j = job(conditions=[job_condition("Suspended", "JobSuspended", "Job suspended")])
    assert derive(ftj(), j, [])["phase"] == "Suspended"


# --- failure reasons ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("ImagePullBackOff", 'Back-off pulling image "trainer:1"'),
        ("ErrImagePull", "rpc error: pull access denied"),
        ("CreateContainerConfigError", 'configmap "demo-spec" not found'),
    ],
)
def test_image_and_config_problems_are_pending_then_failed_after_the_startup_deadline(
    reason: str, message: str
) -> None:
    pods = [pod(**waiting(reason, message))]
    early = derive(ftj(), job(active=1), pods, seconds=30)
    assert (early["phase"], early["reason"]) == ("Pending", reason)
    assert message in early["message"]
    late = derive(ftj(status=early), job(active=1), pods, seconds=601)
    assert (late["phase"], late["reason"]) == ("Failed", reason)
    assert "startup deadline of 600s" in late["message"]
    assert true_conditions(late) == {"Stalled", "Failed"}
    assert should_stop_job(late, job(active=1))


def test_invalid_image_name_fails_at_once() -> None:
    status = derive(ftj(), job(active=1), [pod(**waiting("InvalidImageName", 'invalid image "a b"'))], seconds=1)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidImageName")
    assert should_stop_job(status, job(active=1))


def test_unschedulable_uses_the_scheduler_message_and_the_per_job_deadline() -> None:
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"startupDeadlineSeconds": 60}}
    early = derive(ftj(spec), job(active=1), [UNSCHEDULABLE_POD], seconds=59)
    assert (early["phase"], early["reason"]) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in early["message"]
    late = derive(ftj(spec, status=early), job(active=1), [UNSCHEDULABLE_POD], seconds=61)
    assert (late["phase"], late["reason"]) == ("Failed", "Unschedulable")


def test_no_pod_created_within_the_deadline_fails_with_pod_creation_failed() -> None:
    assert derive(ftj(), job(), [], seconds=599)["reason"] == "Starting"
    late = derive(ftj(), job(), [], seconds=601)
    assert (late["phase"], late["reason"]) == ("Failed", "PodCreationFailed")


def test_oom_killed_after_retries_names_oom() -> None:
    failed = job(
        conditions=[job_condition("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")],
        failed=3,
    )
    pods = [
        pod(
            name=f"demo-{i}",
            phase="Failed",
            created=f"2025-03-01T12:0{i}:00Z",
            **terminated(137, "OOMKilled"),
        )
        for i in range(3)
    ]
    status = derive(ftj(), failed, pods)
    assert (status["phase"], status["reason"]) == ("Failed", "OOMKilled")
    assert "spec.resources.memory" in status["message"]
    assert status["attempts"] == 3
    assert status["completionTime"] == "2025-03-01T13:00:00Z"
    assert not should_stop_job(status, failed)  # the Job controller already stopped it


def test_trainer_error_carries_the_termination_message_tail() -> None:
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 200 + "RuntimeError: CUDA error: device-side"
    failed = job(conditions=[job_condition("Failed", "BackoffLimitExceeded")], failed=3)
    status = derive(ftj(), failed, [pod(phase="Failed", **terminated(1, "Error", traceback))])
    assert status["reason"] == "TrainerError"
    assert status["message"].endswith("RuntimeError: CUDA error: device-side")
    assert "exit code 1" in status["message"]
    assert len(status["message"]) < 600


def test_invalid_job_file_via_pod_failure_policy() -> None:
    failed = job(conditions=[job_condition("Failed", "PodFailurePolicy", "Container trainer exited with 2")], failed=1)
    pods = [pod(phase="Failed", **terminated(2, "Error", "spec.dataset.path: /data/x does not exist"))]
    status = derive(ftj(), failed, pods)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidJobFile")
    assert "/data/x does not exist" in status["message"]


def test_invalid_job_file_when_the_pod_is_already_gone() -> None:
    failed = job(conditions=[job_condition("Failed", "PodFailurePolicy", "Container trainer exited with 2")])
    assert derive(ftj(), failed, [])["reason"] == "InvalidJobFile"


def test_deadline_exceeded() -> None:
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"activeDeadlineSeconds": 3600}}
    failed = job(spec=spec, conditions=[job_condition("Failed", "DeadlineExceeded", "Job was active longer")])
    status = derive(ftj(spec), failed, [])
    assert (status["reason"], status["phase"]) == ("DeadlineExceeded", "Failed")
    assert "3600s" in status["message"]


def test_backoff_limit_exceeded_without_pods_keeps_the_job_reason() -> None:
    failed = job(conditions=[job_condition("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")])
    assert derive(ftj(), failed, [])["reason"] == "BackoffLimitExceeded"


def test_failure_target_counts_as_failed_before_the_pods_are_gone() -> None:
    failing = job(conditions=[job_condition("FailureTarget", "BackoffLimitExceeded")], active=1)
    assert derive(ftj(), failing, [])["phase"] == "Failed"


def test_evicted_by_the_kubelet() -> None:
    evicted = pod(phase="Failed", reason="Evicted", message="The node was low on resource: ephemeral-storage.")
    failed = job(conditions=[job_condition("Failed", "BackoffLimitExceeded")], failed=3)
    status = derive(ftj(), failed, [evicted])
    assert status["reason"] == "Evicted" and "ephemeral-storage" in status["message"]


def test_preempted_pod_is_retried_and_shown_as_such() -> None:
    preempted = pod(
        phase="Failed",
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "PreemptionByScheduler",
                "message": "Preempted in order to admit critical pod",
            }
        ],
    )
    between = derive(ftj(), job(failed=1), [preempted])
    assert (between["phase"], between["reason"]) == ("Pending", "Retrying")
    assert "Preempted" in between["message"]
    retried = derive(
        ftj(status=between),
        job(active=1, failed=1),
        [
            preempted,
            {
                **RUNNING_POD,
                "metadata": {
                    **RUNNING_POD["metadata"],
                    "name": "demo-2",
                    "creationTimestamp": "2025-03-01T12:05:00Z",
                },
            },
        ],
    )
    assert retried["phase"] == "Running" and "Preempted" in retried["message"]
    assert retried["attempts"] == 2


def test_eviction_api_disruption_is_evicted() -> None:
    p = pod(
        phase="Failed",
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API",
            }
        ],
    )
    assert observe.pod_failure(p)[0] == "Evicted"


def test_checkpointed_exit_75_is_preempted() -> None:
    assert observe.pod_failure(pod(phase="Failed", **terminated(75)))[0] == "Preempted"


def test_job_deleted_while_running_fails_instead_of_training_again() -> None:
    running = derive(ftj(), job(active=1), [RUNNING_POD])
    gone = derive(ftj(status=running), None, [])
    assert (gone["phase"], gone["reason"]) == ("Failed", "JobDeleted")


# --- stickiness, spec changes, invalid spec -----------------------------------------------------


def test_finished_status_survives_the_job_being_deleted_by_ttl() -> None:
    done = derive(ftj(), job(conditions=[job_condition("Complete", "CompletionsReached")], succeeded=1), [])
    later = derive(ftj(status=done), None, [], seconds=9999)
    assert later == done


def test_failed_by_deadline_stays_failed_even_if_the_pod_then_runs() -> None:
    late = derive(ftj(), job(active=1), [UNSCHEDULABLE_POD], seconds=700)
    again = derive(ftj(status=late), job(active=1), [RUNNING_POD], seconds=710)
    assert (again["phase"], again["reason"]) == ("Failed", "Unschedulable")


def test_condition_transition_times_are_preserved_when_status_is_unchanged() -> None:
    first = derive(ftj(), job(active=1), [RUNNING_POD], seconds=10)
    second = derive(ftj(status=first), job(active=1), [RUNNING_POD], seconds=500)
    assert cond(second, "Running")["lastTransitionTime"] == cond(first, "Running")["lastTransitionTime"]
    assert cond(second, "Ready")["lastTransitionTime"] == cond(first, "Ready")["lastTransitionTime"]
    done = job(conditions=[job_condition("Complete", "CompletionsReached")], succeeded=1)
    third = derive(ftj(status=second), done, [], seconds=900)
    assert cond(third, "Running")["lastTransitionTime"] == observe.format_time(at(900))
    assert cond(third, "Ready")["lastTransitionTime"] == observe.format_time(at(900))
    assert cond(third, "Reconciling")["lastTransitionTime"] == observe.format_time(at(900))


def test_observed_generation_follows_the_object() -> None:
    assert derive(ftj(generation=7), job(active=1), [])["observedGeneration"] == 7
    assert all(c["observedGeneration"] == 7 for c in derive(ftj(generation=7), None, [])["conditions"])


def test_spec_change_after_the_job_exists_is_refused_with_a_condition() -> None:
    changed = ftj({"dataset": {"builtin": "digits"}, "training": {"epochs": 50}}, generation=2)
    status = derive(changed, job(active=1), [RUNNING_POD])
    refused = cond(status, "SpecChangeRefused")
    assert refused["status"] == "True"
    assert "spec.training changed" in refused["message"]
    assert status["phase"] == "Running"  # the Job keeps running the original spec
    events = transition_events({}, status)
    assert any(r == "SpecChangeRefused" for _, r, _ in events)
    reverted = derive(ftj(status=status), job(active=1), [RUNNING_POD])
    assert cond(reverted, "SpecChangeRefused")["status"] == "False"


def test_suspend_change_is_not_a_refused_spec_change() -> None:
    body = ftj({"dataset": {"builtin": "digits"}, "training": {"epochs": 10}, "runPolicy": {"suspend": True}})
    status = derive(body, job(active=1), [])
    assert "SpecChangeRefused" not in {c["type"] for c in status["conditions"]}


def test_invalid_spec_status_and_recovery_once_fixed() -> None:
    bad = invalid_spec_status(FineTuneJob.from_body(ftj()), "spec.training.epochs: Input should be >= 1 (got 0)", T0)
    assert (bad["phase"], bad["reason"]) == ("Failed", "InvalidSpec")
    assert true_conditions(bad) == {"Stalled", "Failed"}
    fixed = derive(ftj(status=bad, generation=2), None, [])
    assert (fixed["phase"], fixed["reason"]) == ("Pending", "Creating")
    assert "completionTime" not in fixed
    # reconcile creates the Job before deriving: the status must follow that Job, not stay Failed
    started = derive(ftj(status=bad, generation=2), job(active=1), [RUNNING_POD])
    assert started["phase"] == "Running" and started["jobName"]


# --- progress -----------------------------------------------------------------------------------


def test_reported_progress_is_kept_and_formatted_for_the_epoch_column() -> None:
    prev = {
        "phase": "Running",
        "progress": {
            "epoch": 3,
            "totalEpochs": 10,
            "valAccuracy": 0.8,
            "lastUpdateTime": "2025-03-01T12:00:20Z",
        },
    }
    status = derive(ftj(status=prev), job(active=1), [RUNNING_POD])
    assert status["progress"]["epochText"] == "3/10"
    assert status["progress"]["valAccuracy"] == 0.8


def test_no_progress_for_longer_than_the_progress_deadline_marks_stalled() -> None:
    spec = {"dataset": {"builtin": "digits"}, "runPolicy": {"progressDeadlineSeconds": 300}}
    prev = {"phase": "Running", "progress": {"epoch": 1, "lastUpdateTime": "2025-03-01T12:00:20Z"}}
    fresh = derive(ftj(spec, status=prev), job(spec=spec, active=1), [RUNNING_POD], seconds=100)
    assert cond(fresh, "Stalled")["status"] == "False"
    stale = derive(ftj(spec, status=fresh), job(spec=spec, active=1), [RUNNING_POD], seconds=400)
    assert cond(stale, "Stalled")["reason"] == "NoProgress"
    assert stale["phase"] == "Running"
    assert ("Warning", "NoProgress") in [(t, r) for t, r, _ in transition_events(fresh, stale)]
    # a new push (newer lastUpdateTime) clears it on the next pass
    pushed = {**stale, "progress": {**stale["progress"], "epoch": 2, "lastUpdateTime": "2025-03-01T12:06:30Z"}}
    cleared = derive(ftj(spec, status=pushed), job(spec=spec, active=1), [RUNNING_POD], seconds=400)
    assert cond(cleared, "Stalled")["status"] == "False"


# --- events -------------------------------------------------------------------------------------


def reasons(old: dict, new: dict) -> list[str]:
    return [r for _, r, _ in transition_events(old, new)]


def test_events_for_the_happy_path() -> None:
    created = derive(ftj(), job(active=1), [pod()])
    assert reasons({}, created) == ["JobCreated"]
    running = derive(ftj(status=created), job(active=1), [RUNNING_POD])
    assert reasons(created, running) == ["Started"]
    assert reasons(running, running) == []
    done = derive(ftj(status=running), job(conditions=[job_condition("Complete", "CompletionsReached")]), [])
    assert transition_events(running, done) == [("Normal", "Succeeded", done["message"])]


def test_failure_and_pending_problem_events_are_warnings() -> None:
    pending = derive(ftj(), job(active=1), [pod(**waiting("ImagePullBackOff", "Back-off"))])
    assert ("Warning", "ImagePullBackOff") in [(t, r) for t, r, _ in transition_events({}, pending)]
    failed = derive(ftj(status=pending), job(active=1), [pod(**waiting("ImagePullBackOff", "Back-off"))], 700)
    assert [(t, r) for t, r, _ in transition_events(pending, failed)] == [("Warning", "ImagePullBackOff")]


def test_suspend_event() -> None:
    suspended = derive(ftj(), job(suspend=True), [])
    assert ("Normal", "Suspended") in [(t, r) for t, r, _ in transition_events({"phase": "Running"}, suspended)]


# --- every written field is declared ------------------------------------------------------------

STATUS_SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def assert_declared(value: Any, schema: dict, path: str = "status") -> None:
    if isinstance(value, dict):
        assert "properties" in schema, f"{path} is not an object in the schema"
        for key, sub in value.items():
            assert key in schema["properties"], f"{path}.{key} is written but not declared"
            assert_declared(sub, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_declared(item, schema["items"], f"{path}[{i}]")
    else:
        kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
        assert isinstance(value, kinds[schema["type"]]), f"{path}={value!r} is not {schema['type']}"
        if "enum" in schema:
            assert value in schema["enum"], path


def test_every_status_field_written_is_declared_with_its_type() -> None:
    prev = {
        "phase": "Running",
        "resumeCount": 1,
        "lastCheckpoint": {"epoch": 3, "step": 5, "time": CREATED, "file": "epoch-0003-step-000005.pt"},
        "progress": {
            "epoch": 3,
            "totalEpochs": 10,
            "step": 5,
            "totalSteps": 9,
            "percent": 33.3,
            "trainLoss": 0.5,
            "valLoss": 0.6,
            "valAccuracy": 0.8,
            "bestValAccuracy": 0.81,
            "samplesPerSecond": 120.5,
            "etaSeconds": 300,
            "lastUpdateTime": CREATED,
        },
    }
    summary = '{"weightsFile": "m.safetensors", "sha256": "ab", "bestEpoch": 2, "valAccuracy": 0.9}'
    samples = [
        derive(ftj(status=prev), job(active=1), [RUNNING_POD]),
        derive(ftj({"dataset": {"builtin": "digits"}, "training": {"epochs": 99}}), job(active=1), []),
        derive(
            ftj(),
            job(conditions=[job_condition("Complete", "x")], succeeded=1),
            [pod(phase="Succeeded", **terminated(0, "Completed", summary))],
        ),
        derive(ftj(), job(active=1), [UNSCHEDULABLE_POD], seconds=700),
        invalid_spec_status(FineTuneJob.from_body(ftj()), "bad", T0),
    ]
    for status in samples:
        assert_declared(copy.deepcopy(status), STATUS_SCHEMA)


# --- multi-worker (Indexed Job) ------------------------------------------------------------------

WORKERS_SPEC = {"dataset": {"builtin": "digits"}, "training": {"epochs": 10}, "workers": 2}


def worker(index: int, phase: str = "Running", name: str | None = None, created: str = CREATED,
           failures: int | None = None, **status: Any) -> dict:
    p = pod(name or f"demo-{index}-abcde", phase=phase, created=created, **status)
    p["metadata"]["annotations"] = {observe.INDEX_KEY: str(index)}
    if failures is not None:
        p["metadata"]["annotations"][observe.INDEX_FAILURES_KEY] = str(failures)
    if phase == "Running":
        p["status"]["containerStatuses"] = RUNNING_POD["status"]["containerStatuses"]
    return p


def test_multi_worker_job_runs_only_when_every_worker_runs_and_shows_each_worker() -> None:
    body, j = ftj(WORKERS_SPEC), job(spec=WORKERS_SPEC, active=2)
    half = derive(body, j, [worker(0), worker(1, "Pending")])
    assert (half["phase"], half["reason"]) == ("Pending", "Starting")
    assert half["message"] == "waiting for all 2 workers to run (1 running)"
    assert half["workers"] == [{"index": 0, "phase": "Running", "restarts": 0, "pod": "demo-0-abcde"},
                               {"index": 1, "phase": "Pending", "restarts": 0, "pod": "demo-1-abcde"}]
    full = derive(body, j, [worker(0), worker(1)])
    assert full["phase"] == "Running" and full["message"] == "training with 2 workers; worker 0 is pod demo-0-abcde"
    assert derive(ftj(WORKERS_SPEC), j, [])["workers"] == [
        {"index": 0, "phase": "Missing", "restarts": 0}, {"index": 1, "phase": "Missing", "restarts": 0}]


def test_a_failed_worker_shows_its_restarts_and_reason_while_the_group_restarts() -> None:
    body, j = ftj(WORKERS_SPEC), job(spec=WORKERS_SPEC, active=2, failed=2)
    crashed = worker(1, "Failed", name="demo-1-old", **terminated(1, "Error", "RuntimeError: boom"))
    peer = worker(0, "Failed", name="demo-0-old", **terminated(1, "Error", "DistBackendError: closed by peer"))
    later = "2025-03-01T12:05:00Z"
    status = derive(body, j, [peer, crashed, worker(0, "Pending", "demo-0-new", later, failures=1),
                              worker(1, "Pending", "demo-1-new", later, failures=1)])
    assert status["phase"] == "Pending"
    assert [(w["index"], w["pod"], w["restarts"], w["lastFailure"]) for w in status["workers"]] == [
        (0, "demo-0-new", 1, "TrainerError"), (1, "demo-1-new", 1, "TrainerError")]
    assert_declared(copy.deepcopy(status), STATUS_SCHEMA)


def test_one_worker_out_of_retries_fails_the_job_with_the_pods_reason() -> None:
    j = job(spec=WORKERS_SPEC, failed=3,
            conditions=[job_condition("Failed", "MaxFailedIndexesExceeded", "Job has exceeded maxFailedIndexes")])
    oom = worker(1, "Failed", **terminated(137, "OOMKilled"))
    status = derive(ftj(WORKERS_SPEC), j, [worker(0, "Failed", **terminated(1)), oom])
    assert (status["phase"], status["reason"]) == ("Failed", "OOMKilled")
    assert "retries exhausted" in status["message"]


def test_success_policy_on_worker_0_succeeds_and_worker_state_survives_ttl() -> None:
    summary = '{"weightsFile": "model.safetensors", "sha256": "ab", "bestEpoch": 3, "valAccuracy": 0.9}'
    j = job(spec=WORKERS_SPEC, succeeded=1, conditions=[job_condition("SuccessCriteriaMet", "SuccessPolicy")])
    done = derive(ftj(WORKERS_SPEC), j, [worker(0, "Succeeded", **terminated(0, "Completed", summary)),
                                         worker(1, "Running")])
    assert done["phase"] == "Succeeded" and done["output"]["valAccuracy"] == 0.9
    after_ttl = derive(ftj(WORKERS_SPEC, status=done), None, [])
    assert after_ttl["phase"] == "Succeeded" and after_ttl["workers"] == done["workers"]
    assert_declared(copy.deepcopy(done), STATUS_SCHEMA)
