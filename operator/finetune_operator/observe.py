"""Reading Kubernetes Job and Pod objects: what is wrong with them, in our reason vocabulary.

Pure functions over the dicts the API returns (camelCase). Each answers with a
(reason, message) pair or None; the reasons are the ones status.reason documents.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_PREEMPTED
from finetune_api.source import FETCH_REASONS, PERMANENT_FETCH_REASONS
from finetune_api.status import TERMINAL_PHASES, Reason
from finetune_operator.fetch import FETCH_CONTAINER
from finetune_operator.objects import CONTAINER
from finetune_operator.parsed import ObjView

Problem = tuple[str, str]

# Pod waiting reasons that may clear up by themselves (registry hiccup, autoscaler adding a
# node): Pending until the startup deadline, then Failed. InvalidImageName never clears up.
IMAGE_WAITING = {
    "ImagePullBackOff": "ImagePullBackOff",
    "ErrImagePull": "ErrImagePull",
    "ErrImageNeverPull": "ErrImageNeverPull",
}
CONFIG_WAITING = {
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
}
HOPELESS_WAITING = {"InvalidImageName": "InvalidImageName"}
STARTUP_PROBLEMS = frozenset({*IMAGE_WAITING.values(), *CONFIG_WAITING.values(), "Unschedulable",
                              Reason.POD_CREATION_FAILED})
IMMEDIATE_FAILURES = frozenset(HOPELESS_WAITING.values())

PREEMPTION_REASONS = {"PreemptionByScheduler", "PreemptionByKubeScheduler"}
MESSAGE_TAIL = 400
DISK_FULL_PREFIX = "DiskFull: "  # `<error class>: <line>`, what the trainer's _guarded writes to the termination log
# Job reasons for "out of retries": Job-wide, or per index (multi-worker jobs use backoffLimitPerIndex).
RETRIES_EXHAUSTED = ("BackoffLimitExceeded", "MaxFailedIndexesExceeded", "FailedIndexes")
# What the Job controller puts on the pods of an Indexed Job.
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
INDEX_FAILURES_KEY = "batch.kubernetes.io/job-index-failure-count"


def parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(obj: ObjView, kind: str) -> ObjView | None:
    """The status condition of this type, if its status is "True"."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def tail(text: str | None, limit: int = MESSAGE_TAIL) -> str:
    """The end of a (multi-line) message: tracebacks end with the useful line."""
    text = (text or "").strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _statuses(pod: ObjView) -> list[ObjView]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _trainer_terminated(pod: ObjView) -> ObjView | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            state = cs.get("state") or {}
            return state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def is_active(pod: ObjView) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in (None, "Pending", "Running", "Unknown") and not pod["metadata"].get("deletionTimestamp")


def waiting_problem(pod: ObjView) -> Problem | None:
    """Why a not-yet-running pod is stuck: image, container config, or scheduling."""
    known = {**IMAGE_WAITING, **CONFIG_WAITING, **HOPELESS_WAITING}
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in known:
            image = cs.get("image") or "the trainer image"
            detail = waiting.get("message") or f"cannot start container {cs.get('name')} ({image})"
            return known[waiting["reason"]], tail(detail)
    for cond in (pod.get("status") or {}).get("conditions") or []:
        unschedulable = cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable"
        if unschedulable and cond.get("status") == "False":
            return "Unschedulable", tail(cond.get("message") or "no node fits the pod")
    return None


def pod_failure(pod: ObjView) -> Problem | None:
    """Why a pod that ended did not succeed, most specific cause first."""
    status = pod.get("status") or {}
    disruption = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        ),
        None,
    )
    if disruption is not None:
        kind = Reason.PREEMPTED if disruption.get("reason") in PREEMPTION_REASONS else Reason.EVICTED
        return kind, tail(f"{disruption.get('reason')}: {disruption.get('message') or 'pod disrupted'}")
    if status.get("reason") == "Evicted":
        return Reason.EVICTED, tail(status.get("message") or "the kubelet evicted the pod")
    fetch = _fetch_failure(pod)
    if fetch is not None:
        return fetch
    term = _trainer_terminated(pod)
    if term is None:
        failed = status.get("phase") == "Failed"
        return (Reason.POD_FAILED, tail(status.get("message") or "pod failed")) if failed else None
    code = term.get("exitCode", 0)
    if term.get("reason") == "OOMKilled":
        return (
            Reason.OOM_KILLED,
            "the trainer ran out of memory: raise spec.resources.memory or lower training.batchSize",
        )
    if code == 0:
        return None
    if (fetched := _fetch_reason(term)) is not None:  # the trainer's own fetch step (no init container's cache)
        return fetched
    if code == EXIT_INVALID_JOB:
        return Reason.INVALID_JOB_FILE, tail(term.get("message") or "the trainer rejected its job file (exit code 2)")
    if code == EXIT_PREEMPTED:
        return Reason.PREEMPTED, "the trainer saved a checkpoint and stopped after SIGTERM (exit code 75)"
    detail = tail(term.get("message")) or term.get("reason") or "no output"
    if (term.get("message") or "").startswith(DISK_FULL_PREFIX):  # the trainer's termination message names it
        return Reason.DISK_FULL, tail(term["message"].removeprefix(DISK_FULL_PREFIX))
    return Reason.TRAINER_ERROR, f"exit code {code}: {detail}"


def _fetch_failure(pod: ObjView) -> Problem | None:
    """The fetch init container's failure: its reason (ChecksumMismatch, SourceNotFound …) leads its message."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if cs.get("name") != FETCH_CONTAINER:
            continue
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term or term.get("exitCode", 0) == 0:
            return None
        if term.get("reason") == "OOMKilled":
            return Reason.OOM_KILLED, "the fetch init container ran out of memory: raise spec.resources.memory"
        detail = tail(term.get("message")) or term.get("reason") or "no output"
        return _fetch_reason(term) or (Reason.INVALID_JOB_FILE if term.get("exitCode") == EXIT_INVALID_JOB else
                                       Reason.TRAINER_ERROR, f"fetch exit code {term.get('exitCode')}: {detail}")
    return None


def _fetch_reason(term: ObjView) -> Problem | None:
    """(reason, message) when the termination message is "<FetchReason>: <message>" (cli._failed's format)."""
    head, sep, rest = (term.get("message") or "").strip().partition(": ")
    return (head, tail(rest)) if sep and head in FETCH_REASONS else None


def _by_age(pods: Sequence[ObjView]) -> list[ObjView]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")


def last_failure(pods: Sequence[ObjView]) -> Problem | None:
    """The failure of the most recently created pod that failed."""
    for pod in reversed(_by_age(pods)):
        if not is_active(pod):
            found = pod_failure(pod)
            if found:
                return found
    return None


def first_waiting_problem(pods: Sequence[ObjView]) -> Problem | None:
    for pod in reversed(_by_age(pods)):
        if is_active(pod):
            found = waiting_problem(pod)
            if found:
                return found
    return None


def running_pod(pods: Sequence[ObjView]) -> ObjView | None:
    for pod in reversed(_by_age(pods)):
        if is_active(pod) and (pod.get("status") or {}).get("phase") == "Running":
            return pod
    return None


def running_since(pod: ObjView) -> str | None:
    for cs in _statuses(pod):
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if started:
            return started
    return (pod.get("status") or {}).get("startTime")


def job_failure(job: ObjView, pods: Sequence[ObjView]) -> Problem:
    """Why a Job failed, refined by its pods when they say more than the Job does."""
    cond = condition(job, "Failed") or condition(job, "FailureTarget") or {}
    reason, message = cond.get("reason") or Reason.JOB_FAILED, cond.get("message") or "the Job failed"
    if reason == "DeadlineExceeded":
        limit = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Reason.DEADLINE_EXCEEDED, f"ran longer than spec.runPolicy.activeDeadlineSeconds ({limit}s)"
    pod_says = last_failure(pods)
    if reason == "PodFailurePolicy":
        permanent = (Reason.INVALID_JOB_FILE, *PERMANENT_FETCH_REASONS)
        return pod_says if pod_says and pod_says[0] in permanent else (Reason.INVALID_JOB_FILE, tail(message))
    if reason in RETRIES_EXHAUSTED:
        if pod_says is None:
            return reason, tail(message)
        failed = (job.get("status") or {}).get("failed", 0)
        return pod_says[0], f"failed {failed} time(s), retries exhausted; last attempt: {pod_says[1]}"
    return reason, tail(message)


def job_finished(job: ObjView) -> bool:
    return any(condition(job, c) for c in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"))


def job_succeeded(job: ObjView) -> bool:
    return bool(condition(job, "Complete") or condition(job, "SuccessCriteriaMet"))


def job_suspended(job: ObjView) -> bool:
    return bool((job.get("spec") or {}).get("suspend")) or bool(condition(job, "Suspended"))


def startup_clock(job: ObjView) -> dt.datetime | None:
    """When the Job last started (or resumed) trying to run pods."""
    return parse_time((job.get("status") or {}).get("startTime")) or parse_time(
        job["metadata"].get("creationTimestamp")
    )


def _success_message(pods: Sequence[ObjView]) -> dict[str, Any]:
    """The JSON summary a succeeded trainer left as its termination message (the newest pod's), or {}."""
    for pod in reversed(_by_age(pods)):
        term = _trainer_terminated(pod)
        if term and term.get("exitCode") == 0 and term.get("message"):
            try:
                doc = json.loads(term["message"])
            except ValueError:
                return {}
            return doc if isinstance(doc, dict) else {}
    return {}


def result_summary(pods: Sequence[ObjView]) -> dict[str, Any]:
    """Output fields from a succeeded trainer's termination message, if it wrote JSON there."""
    keys = ("weightsFile", "sha256", "bestEpoch", "valAccuracy", "valLoss", "testAccuracy", "sources")
    doc = _success_message(pods)
    return {k: doc[k] for k in keys if k in doc}


def epochs_run(pods: Sequence[ObjView]) -> int | None:
    """How many epochs a succeeded trainer ran, from its termination message: the final progress even when
    its last pushes found no operator to take them."""
    value = _success_message(pods).get("epochs")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _annotation_int(pod: ObjView, key: str) -> int | None:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(key) or (meta.get("labels") or {}).get(key)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def workers(job: ObjView, pods: Sequence[ObjView]) -> list[dict[str, Any]] | None:
    """One entry per worker of a multi-worker (Indexed) Job: its newest pod, phase and restarts.

    None for a single-worker Job. Pods are matched to workers by their completion index.
    """
    spec = job.get("spec") or {}
    if spec.get("completionMode") != "Indexed":
        return None
    history: dict[int, list[ObjView]] = {}
    for pod in _by_age(pods):
        index = _annotation_int(pod, INDEX_KEY)
        if index is not None:
            history.setdefault(index, []).append(pod)
    return [_worker(i, history.get(i, [])) for i in range(int(spec.get("completions") or 1))]


def _worker(index: int, pods: Sequence[ObjView]) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "phase": "Missing", "restarts": 0}
    if not pods:
        return entry
    latest = pods[-1]
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    # Failed pods may already be garbage-collected; the Job controller counts them on the newest pod.
    counted = (_annotation_int(latest, INDEX_FAILURES_KEY) or 0) + (1 if failed and failed[-1] is latest else 0)
    entry.update(pod=latest["metadata"]["name"], phase=_pod_phase(latest), restarts=max(len(failed), counted))
    problem = next((found for p in reversed(failed) if (found := pod_failure(p))), None)
    if problem:
        entry["lastFailure"] = problem[0]
    return entry


def _pod_phase(pod: ObjView) -> str:
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    if pod["metadata"].get("deletionTimestamp") and phase not in TERMINAL_PHASES:
        return "Terminating"
    return phase


def group_running(states: Sequence[Mapping[str, Any]] | None) -> bool:
    """Every worker is running (or already done): a multi-worker job trains only as a whole."""
    return states is None or all(w["phase"] in ("Running", "Succeeded") for w in states)
