"""derive_status driven by a hypothesis state machine: Job and Pod events in random orders, never backwards.

The world moves forward the way the Job controller and a kubelet move it (a Job is created, pods start, run,
fail or succeed, the Job completes or fails, finished pods and Jobs are garbage-collected, progress is
pushed). The operator's passes see that world late and out of order: each pass reads a Job and a pod list
taken from any two moments of its history (the two reads of one pass, or two informer caches, need not
agree). Whatever it sees, the FineTuneJob's status must never go backwards:
  * a finished phase stays, with its reason and completion time (Succeeded never becomes Running);
  * attempts, resumeCount and progress never decrease; startTime, jobName and output fields, once set, stay;
  * Succeeded only after a Job that succeeded was seen, and Ready is True exactly when Succeeded.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from finetune_api.status import TERMINAL_PHASES
from finetune_operator import observe
from finetune_operator.naming import LABEL_UID
from finetune_operator.objects import build_job
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings
from finetune_operator.status import derive_status

pytestmark = pytest.mark.unit

SETTINGS = Settings(startup_deadline_seconds=600)
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
EPOCHS = 5
BODY = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 1},
    "spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": EPOCHS}, "runPolicy": {"backoffLimit": 2}},
}
RESULT = {"weightsFile": "model.safetensors", "sha256": "ab" * 32, "bestEpoch": 3, "valAccuracy": 0.9}


def stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusNeverGoesBackwards(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.job: dict | None = None  # the world now
        self.pods: list[dict] = []
        self.history: list[tuple[dict | None, list[dict]]] = []  # every state since the Job was created
        self.status: dict[str, Any] = {}  # the FineTuneJob's stored status
        self.succeeded_job_seen = False
        self.epoch, self.resumes = 0, 0

    # ------------------------------------------------------------ the world
    def _record(self) -> None:
        self.now += dt.timedelta(seconds=7)
        self.history.append((copy.deepcopy(self.job), copy.deepcopy(self.pods)))

    def _counts(self) -> None:
        phases = [p["status"]["phase"] for p in self.pods]
        st_ = self.job["status"]
        st_["active"] = sum(ph in ("Pending", "Running") for ph in phases)
        st_["failed"] = max(st_.get("failed", 0), sum(ph == "Failed" for ph in phases))
        st_["succeeded"] = max(st_.get("succeeded", 0), sum(ph == "Succeeded" for ph in phases))

    def _finished(self) -> bool:
        return self.job is not None and observe.job_finished(self.job)

    @precondition(lambda self: self.job is None and not self.history)
    @rule()
    def create_job(self) -> None:
        self.job = build_job(FineTuneJob.from_body(BODY), SETTINGS)
        self.job["metadata"].update(uid="job-uid", creationTimestamp=stamp(self.now))
        self.job["status"] = {"startTime": stamp(self.now), "conditions": []}
        self._record()

    @precondition(lambda self: self.job is not None and not self._finished()
                  and not any(p["status"]["phase"] in ("Pending", "Running") for p in self.pods))
    @rule()
    def start_pod(self) -> None:
        n = len(self.pods)
        self.pods.append({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": f"demo-{n}", "namespace": "ml", "uid": f"pod-{n}",
                                       "creationTimestamp": stamp(self.now), "labels": {LABEL_UID: "uid-1"}},
                          "status": {"phase": "Pending"}})
        self._counts()
        self._record()

    def _live(self, phase: str) -> dict | None:
        return next((p for p in self.pods if p["status"]["phase"] == phase), None)

    @precondition(lambda self: self._live("Pending") is not None and not self._finished())
    @rule()
    def pod_runs(self) -> None:
        pod = self._live("Pending")
        pod["status"] = {"phase": "Running", "startTime": stamp(self.now), "containerStatuses": [
            {"name": "trainer", "ready": True, "state": {"running": {"startedAt": stamp(self.now)}}}]}
        self._counts()
        self._record()

    @precondition(lambda self: self._live("Running") is not None and not self._finished())
    @rule(code=st.sampled_from([1, 75, 137]))
    def pod_fails(self, code: int) -> None:
        self._terminate(self._live("Running"), "Failed", code, "boom")
        if self.job["status"]["failed"] > 2 and code != 75:
            self._condition("Failed", "BackoffLimitExceeded")
        self._record()

    @precondition(lambda self: self._live("Running") is not None and not self._finished())
    @rule()
    def pod_succeeds(self) -> None:
        self._terminate(self._live("Running"), "Succeeded", 0, json.dumps(RESULT))
        self._condition("SuccessCriteriaMet", "CompletionsReached")
        self._record()

    @precondition(lambda self: self.job is not None and any(c["type"] == "SuccessCriteriaMet"
                                                            for c in self.job["status"]["conditions"]))
    @rule()
    def job_completes(self) -> None:
        if not any(c["type"] == "Complete" for c in self.job["status"]["conditions"]):
            self._condition("Complete", "CompletionsReached")
            self.job["status"]["completionTime"] = stamp(self.now)
            self._record()

    @precondition(lambda self: self._finished() and self.pods)
    @rule()
    def pods_garbage_collected(self) -> None:
        self.pods = []
        self._record()

    @precondition(lambda self: self._finished())
    @rule()
    def job_deleted_by_ttl(self) -> None:
        self.job, self.pods = None, []
        self._record()

    @precondition(lambda self: self._live("Running") is not None)
    @rule(resumed=st.booleans())
    def progress_pushed(self, resumed: bool) -> None:
        """What the progress endpoint writes between passes (status.progress, resumeCount)."""
        self.epoch = min(EPOCHS, self.epoch + 1)
        self.resumes += resumed
        self.status["progress"] = {**self.status.get("progress", {}), "epoch": self.epoch, "totalEpochs": EPOCHS}
        if self.resumes:
            self.status["resumeCount"] = self.resumes

    def _terminate(self, pod: dict, phase: str, code: int, message: str) -> None:
        pod["status"] = {"phase": phase, "containerStatuses": [{"name": "trainer", "ready": False, "state": {
            "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                           "startedAt": pod["status"].get("startTime", stamp(self.now)),
                           "finishedAt": stamp(self.now)}}}]}
        self._counts()

    def _condition(self, kind: str, reason: str) -> None:
        self.job["status"]["conditions"].append({"type": kind, "status": "True", "reason": reason, "message": "",
                                                 "lastTransitionTime": stamp(self.now)})

    # ------------------------------------------------------------ the operator's passes
    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def reconcile(self, data: st.DataObject) -> None:
        """One pass over a Job and a pod list read at any two moments since the Job was created."""
        n = len(self.history)
        job = self.history[data.draw(st.integers(0, n - 1), label="job version")][0]
        pods = self.history[data.draw(st.integers(0, n - 1), label="pods version")][1]
        if job is None and self.job is not None:  # a deleted Job reads as gone only after it was deleted
            job = self.job
        self.succeeded_job_seen |= job is not None and observe.job_succeeded(job)
        body = {**BODY, "status": copy.deepcopy(self.status)}
        self.now += dt.timedelta(seconds=1)
        new = derive_status(FineTuneJob.from_body(body), job, pods, self.now, SETTINGS)
        self._check(self.status, new)
        if new["phase"] == "Succeeded" and observe.result_summary(pods):
            # The trainer's result, once a pass sees it, is in status — even when an earlier pass saw the
            # Job succeed with a pod list from before the pod finished.
            assert (new.get("output") or {}).get("sha256") == RESULT["sha256"], new.get("output")
        self.status = new

    def _check(self, old: dict, new: dict) -> None:
        was, now = old.get("phase"), new["phase"]
        if was in TERMINAL_PHASES:
            assert (now, new.get("reason")) == (was, old.get("reason")), f"{was}/{old.get('reason')} -> {now}"
            assert new.get("completionTime") == old.get("completionTime")
        for key in ("attempts", "resumeCount"):
            assert new.get(key, 0) >= old.get(key, 0), f"{key} went down: {old.get(key)} -> {new.get(key)}"
        assert (new.get("progress") or {}).get("epoch", 0) >= (old.get("progress") or {}).get("epoch", 0)
        for key in ("startTime", "jobName"):
            if old.get(key):
                assert new.get(key) == old[key], f"{key} changed: {old[key]} -> {new.get(key)}"
        lost = set(old.get("output") or {}) - set(new.get("output") or {})
        assert not lost, f"output fields lost: {lost}"

    @invariant()
    def succeeded_only_after_a_succeeded_job_and_ready_exactly_then(self) -> None:
        if "phase" not in self.status:  # no pass yet (progress may be pushed before the first)
            return
        phase = self.status["phase"]
        assert phase != "Succeeded" or self.succeeded_job_seen, "Succeeded before any Job succeeded"
        ready = {c["type"]: c["status"] for c in self.status["conditions"]}.get("Ready")
        assert (ready == "True") == (phase == "Succeeded"), (phase, ready)


StatusNeverGoesBackwards.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_status_never_goes_backwards = StatusNeverGoesBackwards.TestCase


def test_the_trainers_result_read_after_an_early_succeeded_pass_is_filled_in() -> None:
    """The case the machine found: a pass saw the Job succeed with a pod list from before the pod finished."""
    machine = StatusNeverGoesBackwards()
    machine.create_job()
    machine.start_pod()
    machine.pod_runs()
    before_success = len(machine.history) - 1
    machine.pod_succeeds()
    machine.job_completes()
    job_done, pods_running = machine.history[-1][0], machine.history[before_success][1]
    first = derive_status(FineTuneJob.from_body(BODY), job_done, pods_running, T0, SETTINGS)
    assert first["phase"] == "Succeeded" and "sha256" not in first["output"]
    later = derive_status(FineTuneJob.from_body({**BODY, "status": first}), job_done, machine.history[-1][1],
                          T0 + dt.timedelta(seconds=5), SETTINGS)
    assert later["output"]["sha256"] == RESULT["sha256"] and later["output"]["valAccuracy"] == RESULT["valAccuracy"]
    assert later["completionTime"] == first["completionTime"]
