"""derive_status: the FineTuneJob's status as a pure function of what exists.

Inputs are the FineTuneJob as parsed at the top of the pass (with its stored status), its Job
(or None), the Job's pods and the time. Nothing is remembered elsewhere, so a restarted
operator derives the same status. Only two things are sticky, on purpose:

* a finished phase (Succeeded/Failed) never changes again — the Job may be deleted by
  ttlSecondsAfterFinished and the FineTuneJob must keep its result (a failure before any Job
  existed — InvalidSpec, a missing or failed teacher — is the exception: fixing the spec, or the
  teacher, lets it start);
* a Job that existed (status.jobName) and vanished before finishing is a failure
  (JobDeleted), never a reason to silently train again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_api.status import NOT_STARTED_REASONS, STOP_REASONS, TERMINAL_PHASES, ConditionType, Phase, Reason
from finetune_operator import observe
from finetune_operator.drift import changed_fields_message
from finetune_operator.naming import job_name
from finetune_operator.objects import output_location
from finetune_operator.parsed import FineTuneJob, ObjView
from finetune_operator.settings import Settings

INVALID_SPEC = Reason.INVALID_SPEC


@dataclass
class Verdict:
    """What the objects say: phase, reason, message and the times that go with them."""

    phase: str
    reason: str
    message: str
    start_time: str | None = None
    completion_time: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def derive_status(
    ftj: FineTuneJob, job: ObjView | None, pods: Sequence[ObjView], now: dt.datetime, settings: Settings
) -> dict:
    """The complete new status (declared fields only); the caller patches what changed."""
    prev = dict(ftj.status)
    verdict = _keep_finished(prev, job) or _stopped(ftj, job, now) or _judge(ftj, job, pods, now, settings, prev)
    status: dict[str, Any] = {
        "phase": verdict.phase,
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": ftj.generation,
        "jobName": job["metadata"]["name"] if job else prev.get("jobName"),
        "attempts": max(prev.get("attempts", 0), _attempts(job)),
        "startTime": prev.get("startTime") or verdict.start_time,
        "completionTime": (prev.get("completionTime") or verdict.completion_time)
        if verdict.phase in TERMINAL_PHASES
        else None,
        "progress": _progress(ftj, prev, observe.epochs_run(pods) if verdict.phase == Phase.SUCCEEDED else None),
        "workers": _workers(prev, job, pods),
    }
    for key in ("resumeCount", "lastCheckpoint", "distillation"):  # the progress endpoint's; the teacher's
        if key in prev:
            status[key] = prev[key]
    output = {**(prev.get("output") or {}), **verdict.extra.get("output", {})}
    if verdict.phase == Phase.SUCCEEDED:  # the result, when an earlier pass saw the Job end before its pod
        output = {**observe.result_summary(pods), **output}
    if output:
        status["output"] = output
    stalled = _progress_stalled(ftj, status, now)
    drift = changed_fields_message(ftj, job) if job and verdict.phase not in TERMINAL_PHASES else None
    status["conditions"] = conditions(prev, status, stalled, drift, now)
    return {k: v for k, v in status.items() if v is not None}


def _keep_finished(prev: Mapping[str, Any], job: ObjView | None) -> Verdict | None:
    if prev.get("phase") not in TERMINAL_PHASES:
        return None
    if prev.get("reason") in NOT_STARTED_REASONS and not prev.get("jobName"):
        return None  # nothing ran (invalid spec, no teacher); a fixed spec has started (or may start) its Job
    return Verdict(prev["phase"], prev.get("reason", prev["phase"]), prev.get("message", ""))


def _stopped(ftj: FineTuneJob, job: ObjView | None, now: dt.datetime) -> Verdict | None:
    """The stop annotation (finetune.dev/stop: "Pruned: why" from a sweep, or anything from a person) ends the
    job as Pruned or Stopped, never back to Running; a Job that already succeeded keeps its result."""
    if ftj.stop is None or (job is not None and observe.job_succeeded(job)):
        return None
    head, _, why = ftj.stop.partition(":")
    reason = Reason.PRUNED if head.strip() == Reason.PRUNED else Reason.STOPPED
    message = f"stopped ({why.strip() or ftj.stop.strip() or 'finetune.dev/stop is set'}); its Job is deleted"
    return Verdict(Phase.FAILED, reason, message, completion_time=observe.format_time(now))


def _judge(
    ftj: FineTuneJob,
    job: ObjView | None,
    pods: Sequence[ObjView],
    now: dt.datetime,
    settings: Settings,
    prev: Mapping[str, Any],
) -> Verdict:
    if job is None:
        if prev.get("jobName"):
            return Verdict(
                "Failed",
                "JobDeleted",
                f"Job {prev['jobName']} was deleted before it finished; re-create the FineTuneJob to train again",
                completion_time=observe.format_time(now),
            )
        return Verdict(Phase.PENDING, Reason.CREATING, f"creating Job {job_name(ftj.name)}")
    if observe.job_succeeded(job):
        return _succeeded(ftj, job, pods, now, settings)
    if observe.job_finished(job):
        reason, message = observe.job_failure(job, pods)
        return Verdict(Phase.FAILED, reason, message, completion_time=_failed_at(job, now))
    if observe.job_suspended(job):
        return Verdict(
            Phase.SUSPENDED,
            Reason.SUSPENDED,
            f"Job {job['metadata']['name']} is suspended "
            "(spec.runPolicy.suspend, or a queue such as Kueue has not admitted it); no pods run",
        )
    running = observe.running_pod(pods)
    workers = observe.workers(job, pods)
    if running is not None and observe.group_running(workers):
        return _running(running, pods, now, workers)
    return _pending(ftj, job, pods, now, settings, workers)


def _succeeded(ftj: FineTuneJob, job: ObjView, pods: Sequence[ObjView], now: dt.datetime,
               settings: Settings) -> Verdict:
    output = {**output_location(ftj, settings), **observe.result_summary(pods)}
    message = f"training finished; the model is in {output['path']}"
    if output.get("ephemeral"):
        message += (
            " on an emptyDir volume, deleted with the pod — mount a volume at spec.output.path "
            "(or set the operator's output PVC) to keep it"
        )
    done = (job.get("status") or {}).get("completionTime") or observe.format_time(now)
    return Verdict(Phase.SUCCEEDED, Reason.SUCCEEDED, message, completion_time=done, extra={"output": output})


def _running(pod: ObjView, pods: Sequence[ObjView], now: dt.datetime, workers: list[dict] | None = None) -> Verdict:
    message = f"training in pod {pod['metadata']['name']}"
    if workers:
        message = f"training with {len(workers)} workers; worker 0 is pod {workers[0].get('pod')}"
    earlier = observe.last_failure(pods)
    if earlier:
        message += f" (after a failed attempt: {earlier[0]})"
    started = observe.running_since(pod) or observe.format_time(now)
    return Verdict(Phase.RUNNING, Reason.RUNNING, message, start_time=started)


def _pending(ftj: FineTuneJob, job: ObjView, pods: Sequence[ObjView], now: dt.datetime, settings: Settings,
             workers: list[dict] | None = None) -> Verdict:
    deadline = ftj.startup_deadline_seconds(settings)
    since = observe.startup_clock(job) or now
    waited = max(0, int((now - since).total_seconds()))
    problem = observe.first_waiting_problem(pods)
    if problem is None and not any(observe.is_active(p) for p in pods):
        earlier = observe.last_failure(pods)
        if earlier:  # between attempts: the Job controller is about to retry
            return Verdict(Phase.PENDING, Reason.RETRYING,
                           f"attempt failed ({earlier[0]}: {earlier[1]}); the Job retries")
        if waited > deadline:
            problem = (
                Reason.POD_CREATION_FAILED,
                f"no pod was created for Job {job['metadata']['name']}; "
                "`kubectl describe job` shows why (quota, admission policy, service account)",
            )
    if problem is None:
        if workers:
            running = sum(w["phase"] == "Running" for w in workers)
            return Verdict(Phase.PENDING, Reason.STARTING,
                           f"waiting for all {len(workers)} workers to run ({running} running)")
        return Verdict(Phase.PENDING, Reason.STARTING, "waiting for the trainer pod to start")
    reason, message = problem
    if reason in observe.IMMEDIATE_FAILURES:
        return Verdict(Phase.FAILED, reason, message, completion_time=observe.format_time(now))
    if reason in observe.STARTUP_PROBLEMS and waited > deadline:
        return Verdict(
            "Failed",
            reason,
            f"{message} (pending for {waited}s, past the startup deadline of {deadline}s)",
            completion_time=observe.format_time(now),
        )
    return Verdict(Phase.PENDING, reason, f"{message} (pending for {waited}s; fails after {deadline}s)")


def _workers(prev: Mapping[str, Any], job: ObjView | None, pods: Sequence[ObjView]) -> list[dict] | None:
    """Per-worker state of a multi-worker job; the last one seen once the Job or its pods are gone."""
    if job is None or (not pods and observe.job_finished(job)):
        return prev.get("workers")
    return observe.workers(job, pods)


def _failed_at(job: ObjView, now: dt.datetime) -> str:
    cond = observe.condition(job, "Failed") or observe.condition(job, "FailureTarget") or {}
    return cond.get("lastTransitionTime") or observe.format_time(now)


def _attempts(job: ObjView | None) -> int:
    counts = (job or {}).get("status") or {}
    return sum(int(counts.get(k) or 0) for k in ("active", "failed", "succeeded"))


def _progress(ftj: FineTuneJob, prev: Mapping[str, Any], finished: int | None = None) -> dict[str, Any]:
    """Progress as reported (kept as is), plus totalEpochs and the Epoch column's text. `finished`: the epochs a
    succeeded trainer says it ran; level-based, it wins over pushes lost while no operator was listening."""
    progress = dict(prev.get("progress") or {})
    progress.setdefault("totalEpochs", ftj.training.epochs)
    if finished is not None and finished > int(progress.get("epoch") or 0):
        # What the lost pushes would have said: the fraction as progress.fraction_done counts epochs, no ETA.
        progress["epoch"] = finished
        progress["percent"] = round(min(finished / progress["totalEpochs"], 1.0) * 100, 2)
        progress.pop("etaSeconds", None)
        progress.pop("etaText", None)
    progress["epochText"] = f"{progress.get('epoch', 0)}/{progress['totalEpochs']}"
    return progress


def _progress_stalled(ftj: FineTuneJob, status: Mapping[str, Any], now: dt.datetime) -> tuple[str, str] | None:
    limit = ftj.run_policy.progress_deadline_seconds
    if not limit or status["phase"] != "Running":
        return None
    last = observe.parse_time(status["progress"].get("lastUpdateTime")) or observe.parse_time(status.get("startTime"))
    if last is None or (now - last).total_seconds() <= limit:
        return None
    return (
        Reason.NO_PROGRESS,
        f"no progress reported for more than {limit}s (spec.runPolicy.progressDeadlineSeconds)",
    )


def conditions(
    prev: Mapping[str, Any],
    status: Mapping[str, Any],
    stalled: tuple[str, str] | None,
    drift: str | None,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """kstatus Ready/Reconciling/Stalled plus Running/Succeeded/Failed (and SpecChangeRefused)."""
    phase, reason, message = status["phase"], status["reason"], status["message"]
    C = ConditionType
    wanted = [
        (C.READY, phase == Phase.SUCCEEDED, reason, message),
        (C.RECONCILING, phase in (Phase.PENDING, Phase.RUNNING), reason, message),
        (C.STALLED, phase == Phase.FAILED or stalled is not None, *(stalled or (reason, message))),
        (C.RUNNING, phase == Phase.RUNNING, reason, message),
        (C.SUCCEEDED, phase == Phase.SUCCEEDED, reason, message),
        (C.FAILED, phase == Phase.FAILED, reason, message),
    ]
    had_drift = any(c.get("type") == C.SPEC_CHANGE_REFUSED for c in prev.get("conditions") or [])
    if drift or had_drift:
        wanted.append(
            (
                C.SPEC_CHANGE_REFUSED,
                drift is not None,
                Reason.SPEC_CHANGE_REFUSED if drift else "SpecMatchesJob",
                drift or "the spec matches the Job",
            )
        )
    before = {c.get("type"): c for c in prev.get("conditions") or []}
    return [
        _condition(before.get(kind), kind, ok, why, text, now, status["observedGeneration"])
        for kind, ok, why, text in wanted
    ]


def condition(prev: Mapping[str, Any], kind: str, ok: bool, reason: str, message: str, now: dt.datetime,
              generation: int) -> dict[str, Any]:
    """One condition of `kind`, its lastTransitionTime kept from `prev`'s while its status holds."""
    before = next((c for c in prev.get("conditions") or [] if c.get("type") == kind), None)
    return _condition(before, kind, ok, reason, message, now, generation)


def _condition(
    old: Mapping[str, Any] | None,
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    now: dt.datetime,
    generation: int,
) -> dict[str, Any]:
    value = "True" if ok else "False"
    same = old is not None and old.get("status") == value and old.get("lastTransitionTime")
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"] if same else observe.format_time(now),
        "observedGeneration": generation,
    }


def should_stop_job(status: Mapping[str, Any], job: ObjView | None) -> bool:
    """True when the operator failed the job (startup problem, or stopped: finetune.dev/stop) but the Job still
    holds pods.

    Deleting the Job frees the pending pod's resources and quota; the FineTuneJob keeps the
    reason. Suspending instead would not hold: a queue such as Kueue may unsuspend it.
    """
    if job is None or status.get("phase") != "Failed" or observe.job_finished(job):
        return False
    return status.get("reason") in observe.STARTUP_PROBLEMS | observe.IMMEDIATE_FAILURES | set(STOP_REASONS)


Event = tuple[str, str, str]  # (type, reason, message)


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for what changed between two statuses: created, started, suspended, resumed, done."""
    events: list[Event] = []
    if new.get("jobName") and not old.get("jobName"):
        events.append(("Normal", "JobCreated", f"created Job {new['jobName']}"))
    was, now_ = old.get("phase"), new.get("phase")
    if was == "Suspended" and now_ in ("Pending", "Running"):
        events.append(("Normal", "Resumed", new.get("message", "")))
    if now_ != was:
        events.extend(_phase_events(now_, new))
    elif now_ == "Pending" and new.get("reason") != old.get("reason") and new.get("reason") in observe.STARTUP_PROBLEMS:
        events.append(("Warning", new["reason"], new.get("message", "")))
    for kind, reason in (("SpecChangeRefused", "SpecChangeRefused"), ("Stalled", "NoProgress")):
        became = _true(new, kind) and not _true(old, kind)
        if became and (kind != "Stalled" or now_ != "Failed"):
            events.append(("Warning", reason, _condition_message(new, kind)))
    return events


def _phase_events(phase: str | None, new: Mapping[str, Any]) -> list[Event]:
    message = new.get("message", "")
    if phase == "Running":
        return [("Normal", "Started", message)]
    if phase == "Succeeded":
        return [("Normal", "Succeeded", message)]
    if phase == "Failed":  # stopped on purpose (a sweep's pruning) is no warning
        return [("Normal" if new.get("reason") in STOP_REASONS else "Warning", new.get("reason") or "Failed", message)]
    if phase == "Suspended":
        return [("Normal", "Suspended", message)]
    if phase == "Pending" and new.get("reason") in observe.STARTUP_PROBLEMS:
        return [("Warning", new["reason"], message)]
    if phase == "Pending" and new.get("reason") == Reason.WAITING_FOR_TEACHER:
        return [("Normal", Reason.WAITING_FOR_TEACHER.value, message)]
    return []


def _true(status: Mapping[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def _condition_message(status: Mapping[str, Any], kind: str) -> str:
    return next((c.get("message", "") for c in status.get("conditions") or [] if c.get("type") == kind), "")


def invalid_spec_status(ftj: FineTuneJob, message: str, now: dt.datetime) -> dict[str, Any]:
    """Status for a spec the CRD accepted but the model (or this operator) rejects."""
    prev = dict(ftj.status)
    status: dict[str, Any] = {
        "phase": "Failed",
        "reason": INVALID_SPEC,
        "message": message,
        "observedGeneration": ftj.generation,
        "completionTime": observe.format_time(now),
    }
    status["conditions"] = conditions(prev, status, None, None, now)
    return {k: v for k, v in status.items() if v is not None}
