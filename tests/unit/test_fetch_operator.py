"""The operator's side of dataset.uri / weights.uri: the fetch init container (credentials mounted there only),
its podFailurePolicy rule, and its failures read back as FineTuneJob reasons, events and status."""

from __future__ import annotations

from typing import Any

import pytest
from test_operator_status import at, ftj, job_condition, pod

from finetune_operator.objects import build_job
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings
from finetune_operator.status import derive_status, transition_events

SETTINGS = Settings(trainer_image="registry.local/trainer:1.0", startup_deadline_seconds=600,
                    progress_url="http://op:8080")
SPEC = {
    "dataset": {"uri": "s3://ml-data/pets.tar.gz", "sha256": "a" * 64, "endpoint": "http://minio:9000",
                "credentials": {"secretName": "s3-reader"}},
    "model": {"weights": {"uri": "hf://acme/backbone/model.safetensors", "credentials": {"secretName": "hf-token"}}},
    "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
}


def _job(spec: dict[str, Any] | None = None, **status: Any) -> dict:
    obj = build_job(FineTuneJob.from_body(ftj(spec or SPEC)), SETTINGS)
    obj["metadata"].update(creationTimestamp="2025-03-01T12:00:00Z", uid="job-uid")
    obj["status"] = {"startTime": "2025-03-01T12:00:00Z", "conditions": [], **status}
    return obj


def test_sources_get_a_fetch_init_container_holding_the_credentials_alone() -> None:
    pod_spec = _job()["spec"]["template"]["spec"]
    (init,), (trainer,) = pod_spec["initContainers"], pod_spec["containers"]
    assert init["name"] == "fetch" and init["image"] == trainer["image"]
    assert init["command"] == ["finetune-train"] and init["args"] == ["fetch", "-f", "/etc/finetune/job.yaml"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["FINETUNE_SECRETS_DIR"] == "/var/run/finetune/secrets" and "FINETUNE_PROGRESS_URL" not in env
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec["volumes"] if "secret" in v
                      and v["secret"]["secretName"] in ("s3-reader", "hf-token")}
    assert sorted(secret_volumes.values()) == ["hf-token", "s3-reader"]
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    for volume, secret in secret_volumes.items():
        assert mounts[volume]["mountPath"] == f"/var/run/finetune/secrets/{secret}" and mounts[volume]["readOnly"]
    assert not {m["name"] for m in trainer["volumeMounts"]} & set(secret_volumes)  # training never sees them
    # The init container writes into the same output (the cache) the trainer reads.
    assert {m["mountPath"] for m in trainer["volumeMounts"]} <= {m["mountPath"] for m in init["volumeMounts"]}
    assert "nvidia.com/gpu" not in init["resources"]["limits"] and init["securityContext"] == trainer["securityContext"]
    assert "sha256" not in str(init["env"]) and "s3-reader" not in str(init["env"])  # nothing of the spec in env


def test_no_sources_no_init_container_and_the_usual_failure_policy() -> None:
    plain = _job({"dataset": {"builtin": "digits"}})
    assert "initContainers" not in plain["spec"]["template"]["spec"]
    assert all(r.get("onExitCodes", {}).get("containerName", "trainer") == "trainer"
               for r in plain["spec"]["podFailurePolicy"]["rules"])


def test_exit_2_of_the_fetch_container_fails_the_job_at_once() -> None:
    rules = _job()["spec"]["podFailurePolicy"]["rules"]
    fetch = [r for r in rules if r.get("onExitCodes", {}).get("containerName") == "fetch"]
    assert fetch == [{"action": "FailJob", "onExitCodes": {"containerName": "fetch", "operator": "In",
                                                           "values": [2]}}]


def _fetch_failed(code: int, message: str) -> dict:
    return pod(phase="Failed", initContainerStatuses=[{"name": "fetch", "ready": False, "state": {"terminated": {
        "exitCode": code, "reason": "Error", "message": message}}}], containerStatuses=[{
            "name": "trainer", "ready": False, "state": {"waiting": {"reason": "PodInitializing"}}}])


@pytest.mark.parametrize("reason", ["ChecksumMismatch", "SourceNotFound", "AccessDenied", "UnsafeArchive"])
def test_permanent_fetch_failures_become_the_reason_with_the_uri_and_a_warning(reason) -> None:
    message = f"{reason}: dataset.uri s3://ml-data/pets.tar.gz: what went wrong"
    failed = _job(failed=1, conditions=[job_condition("Failed", "PodFailurePolicy", "Container fetch exited with 2")])
    body = ftj(SPEC, status={"phase": "Running", "reason": "Running"})
    status = derive_status(FineTuneJob.from_body(body), failed, [_fetch_failed(2, message)], at(30), SETTINGS)
    assert (status["phase"], status["reason"]) == ("Failed", reason)
    assert status["message"] == "dataset.uri s3://ml-data/pets.tar.gz: what went wrong"
    events = transition_events(body["status"], status)
    assert ("Warning", reason, status["message"]) in events, events


def test_network_failure_retried_until_the_backoff_limit_is_fetch_failed() -> None:
    message = "FetchFailed: dataset.uri s3://ml-data/pets.tar.gz: gave up after 4 attempts: ConnectTimeoutError"
    failed = _job(failed=3, conditions=[job_condition("Failed", "BackoffLimitExceeded", "Job has reached the limit")])
    status = derive_status(FineTuneJob.from_body(ftj(SPEC)), failed, [_fetch_failed(1, message)], at(30), SETTINGS)
    assert status["reason"] == "FetchFailed" and "gave up after 4 attempts" in status["message"], status
    assert "retries exhausted" in status["message"]


def test_the_digest_of_each_source_lands_in_status_output() -> None:
    sources = [{"field": "dataset", "uri": "s3://ml-data/pets.tar.gz", "sha256": "a" * 64, "size": 1234}]
    done = pod(phase="Succeeded", containerStatuses=[{"name": "trainer", "ready": False, "state": {"terminated": {
        "exitCode": 0, "reason": "Completed", "message": '{"weightsFile": "model.safetensors", "sha256": "' + "b" * 64
        + '", "bestEpoch": 1, "valAccuracy": 0.9, "valLoss": 0.1, "sources": ' + str(sources).replace("'", '"')
        + "}"}}}])
    complete = _job(succeeded=1, conditions=[job_condition("Complete", "Completed")])
    status = derive_status(FineTuneJob.from_body(ftj(SPEC)), complete, [done], at(30), SETTINGS)
    assert status["phase"] == "Succeeded" and status["output"]["sources"] == sources, status
