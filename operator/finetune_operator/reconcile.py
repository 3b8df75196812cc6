"""One reconcile pass for one FineTuneJob: read what exists, create what is missing, write status.

Every handler (create, resume, update, resync, Job and Pod watches) ends here, so the
outcome depends only on the objects, never on which event arrived or in what order. The
pass parses the FineTuneJob once, then builds, adopts, creates what is missing and patches
status; the work queue (workqueue.py) keeps two threads from running it for one job at once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from finetune_api.status import NOT_STARTED_REASONS, TERMINAL_PHASES, ConditionType, ServingReason
from finetune_operator import admission, naming, objects, progress, serving, status, teacher
from finetune_operator.events import post_event
from finetune_operator.kube import (
    ApiError,
    Kube,
    configmap_path,
    ftj_path,
    job_path,
    merge_patch_for,
    pod_path,
    secret_path,
    service_path,
)
from finetune_operator.metrics import Metrics
from finetune_operator.parsed import FineTuneJob, Obj
from finetune_operator.settings import Settings
from finetune_operator.workqueue import WorkQueue

RETRY_DELAY = 10.0
GC_WAIT = 15.0


@dataclass
class Runtime:
    """What handlers share: settings, the API client (set at startup), the work queue, token digests."""

    settings: Settings
    kube: Kube | None = None
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    queue: WorkQueue = field(default_factory=WorkQueue)
    dependents: teacher.Dependents = field(default_factory=teacher.Dependents)  # students waiting on teachers
    resync_task: asyncio.Task[None] | None = None
    http_task: asyncio.Task[None] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    # sha256 digests of the per-job progress tokens (never the tokens themselves).
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    on_forget: list[Callable[[str, str], None]] = field(default_factory=list)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop its queue entry, token digest, metrics series and progress state."""
        self.queue.forget((namespace, name))
        self.dependents.done(namespace, name)
        with self._guard:
            self.tokens.pop((namespace, name), None)
        self.metrics.forget(namespace, name)
        for callback in self.on_forget:
            callback(namespace, name)

    def remember_token(self, namespace: str, name: str, digest: str) -> None:
        with self._guard:
            self.tokens[(namespace, name)] = digest

    def known_token(self, namespace: str, name: str) -> str | None:
        with self._guard:
            return self.tokens.get((namespace, name))


@dataclass
class Outcome:
    invalid: str | None = None  # the user-facing reason when the spec cannot run
    status: Obj | None = None


def reconcile(rt: Runtime, namespace: str, name: str, logger: logging.Logger | Any) -> Outcome:
    """Converge one FineTuneJob. API trouble becomes kopf.TemporaryError (kopf retries later).

    Events that arrive while the pass runs (see `reconcile_on_event`) make it run once more, so
    the last pass always starts after the last event.
    """
    assert rt.kube is not None, "the startup handler sets the API client"
    kube = rt.kube
    return rt.queue.run((namespace, name), lambda: _timed_pass(rt, kube, namespace, name, logger))


def reconcile_on_event(rt: Runtime, namespace: str, name: str, logger: logging.Logger | Any) -> None:
    """For watch events of a job's Job and pods, which come in bursts (pod created, scheduled, running,
    Job status ...): while a pass runs, an event only asks for one more pass, so the API server sees
    a burst of N events as at most two passes."""
    assert rt.kube is not None, "the startup handler sets the API client"
    kube = rt.kube
    rt.queue.run_unless_busy((namespace, name), lambda: _timed_pass(rt, kube, namespace, name, logger))


def _timed_pass(rt: Runtime, kube: Kube, namespace: str, name: str, logger: Any) -> Outcome:
    started = time.perf_counter()
    try:
        outcome = _reconcile(rt, kube, namespace, name, logger)
    except ApiError as err:
        rt.metrics.reconcile_errors.inc()
        rt.metrics.reconciles.labels("error").inc()
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=RETRY_DELAY) from None
    except Exception:
        rt.metrics.reconcile_errors.inc()
        rt.metrics.reconciles.labels("error").inc()
        raise
    finally:
        rt.metrics.reconcile_latency.observe(time.perf_counter() - started)
    rt.metrics.reconciles.labels("invalid" if outcome.invalid else "ok").inc()
    return outcome


def _reconcile(rt: Runtime, kube: Kube, namespace: str, name: str, logger: Any) -> Outcome:
    body = kube.get(ftj_path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        rt.forget(namespace, name)
        return Outcome()  # deleted: ownerReferences take the Job, ConfigMap and pods along
    ftj = FineTuneJob.from_body(body)  # the one parse of this pass
    job = kube.get(job_path(namespace, naming.job_name(ftj.name)))
    _check_owner(job, ftj, "Job")
    export = None  # the teacher's export, when this pass resolved one
    if job is None and _may_create(ftj.status) and ftj.stop is None:  # a stopped job never starts
        problem = admission.spec_problem(ftj, rt.settings)
        if problem:
            rt.queue.track((namespace, name), unfinished=False)
            return _fail_invalid(kube, ftj, problem, rt.clock())
        resolution = _resolve_teacher(rt, kube, ftj)
        if resolution is not None and resolution.export is None:
            return _not_started(rt, kube, ftj, resolution)
        export = resolution.export if resolution else None
        job = _create_children(rt, kube, ftj, logger, export)
        _warn_if_ephemeral(kube, ftj, rt.settings, rt.clock())
        pods: list[Obj] = []  # just created: its pods' events bring the next pass
    else:
        pods = kube.list(pod_path(namespace), naming.selector_labels(ftj.uid)) if job else []
        if job is not None and _teacher_unrecorded(ftj):  # a pass created the Job but did not write status
            resolution = _resolve_teacher(rt, kube, ftj)
            export = resolution.export if resolution else None
    new = status.derive_status(ftj, job, pods, rt.clock(), rt.settings)
    if export is not None:
        new["distillation"] = {"teacher": export.status()}
    if status.should_stop_job(new, job):
        logger.warning(f"Deleting Job {job['metadata']['name']}: {new['reason']}")
        kube.delete(job_path(namespace, job["metadata"]["name"]))
    unsettled = _serve(kube, ftj, new, rt.settings, rt.clock())
    _write_status(kube, ftj, new, rt.clock())
    rt.queue.track((namespace, name), unfinished=new["phase"] not in TERMINAL_PHASES or unsettled)
    _observe(rt, ftj, new)
    return Outcome(status=new)


def _serve(kube: Kube, ftj: FineTuneJob, new: Obj, settings: Settings, now: dt.datetime) -> bool:
    """spec.serving after success (serving.py): read what exists, do what `plan` says, put its status and the
    Served condition into `new`. True while undecided (the resync loop re-checks: KServe's readiness has no
    watch here, so a cluster without KServe's CRD needs none)."""
    kind = ConditionType.SERVED
    wanted = serving.wants_serving(ftj, new["phase"])
    if wanted is None:  # not asked for (or not yet Succeeded): what an earlier pass decided stays on record
        kept = next((c for c in ftj.status.get("conditions") or [] if c.get("type") == kind), None)
        if "serving" in ftj.status:
            new["serving"] = ftj.status["serving"]
        new["conditions"] += [kept] if kept else []
        return False
    live = not serving.decided(ftj)  # a decided hand-off reads nothing: its status is final
    installed = live and serving.kserve_installed(kube.get(serving.KSERVE_API))
    isvc = kube.get(serving.isvc_path(ftj.namespace, serving.isvc_name(ftj))) if installed else None
    smoke = kube.get(job_path(ftj.namespace, serving.smoke_job_name(ftj))) if installed else None
    _check_owner(smoke, ftj, "Job")
    pods = kube.list(pod_path(ftj.namespace), {serving.LABEL_SMOKE: ftj.uid}) if smoke else []
    plan = serving.plan(ftj, settings, installed, isvc, smoke, pods)
    for obj, path, what in ((plan.create_isvc, serving.isvc_path(ftj.namespace), "InferenceService"),
                            (plan.create_smoke, job_path(ftj.namespace), "Job")):
        if obj is not None:
            kopf.append_owner_reference(obj, owner=ftj.owner())
            _create_or_reuse(kube, path, obj, ftj, what)
    if plan.patch_isvc is not None:
        kube.merge_patch(serving.isvc_path(ftj.namespace, serving.isvc_name(ftj)), plan.patch_isvc)
    ok, reason, message = plan.condition
    new["serving"] = plan.serving
    new["conditions"].append(status.condition(ftj.status, kind, ok, reason, message, now, ftj.generation))
    before = next((c.get("reason") for c in ftj.status.get("conditions") or [] if c.get("type") == kind), None)
    if reason != before and reason != ServingReason.WAITING_FOR_READY:
        post_event(kube, ftj.owner(), "Normal" if ok or reason == ServingReason.SMOKE_TESTING else "Warning",
                   reason, message, now)
    return not plan.settled


def _resolve_teacher(rt: Runtime, kube: Kube, ftj: FineTuneJob) -> teacher.Resolution | None:
    """The teacher FineTuneJob of spec.distillation.teacher.fromJob, read now (None: no such teacher)."""
    name = teacher.teacher_name(ftj)
    if name is None:
        return None
    return teacher.resolve(ftj, kube.get(ftj_path(ftj.namespace, name)), rt.settings)


def _teacher_unrecorded(ftj: FineTuneJob) -> bool:
    recorded = ((ftj.status.get("distillation") or {}).get("teacher") or {}).get("path")
    return teacher.teacher_name(ftj) is not None and not recorded


def _not_started(rt: Runtime, kube: Kube, ftj: FineTuneJob, resolution: teacher.Resolution) -> Outcome:
    """Waiting for the teacher (tracked: resync re-checks it too) or failed on it; its events re-check both."""
    rt.dependents.wait(ftj.namespace, resolution.teacher, ftj.name)
    new = teacher.not_started_status(ftj, resolution, rt.clock())
    _write_status(kube, ftj, new, rt.clock())
    rt.queue.track((ftj.namespace, ftj.name), unfinished=new["phase"] not in TERMINAL_PHASES)
    _observe(rt, ftj, new)
    return Outcome(status=new)


def _observe(rt: Runtime, ftj: FineTuneJob, new: Mapping[str, Any]) -> None:
    """Phase and stall gauges; the duration histogram gets each job once, when it finishes."""
    duration = None
    created = _parse_time(ftj.created)
    finished = _parse_time(new.get("completionTime"))
    if created and finished:
        duration = (finished - created).total_seconds()
    rt.metrics.observe_phase(ftj.namespace, ftj.name, new["phase"], new.get("reason") or "", duration)
    stalled = next((c for c in new.get("conditions") or [] if c["type"] == "Stalled" and c["status"] == "True"
                    and new["phase"] not in TERMINAL_PHASES), None)
    rt.metrics.observe_stalled(ftj.namespace, ftj.name, stalled["reason"] if stalled else None)


def _parse_time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _may_create(prev: Mapping[str, Any]) -> bool:
    """Create the Job only if none ever existed and the job is not finished (or only invalid)."""
    if prev.get("jobName"):
        return False  # it existed: derive_status reports it gone rather than training again
    return prev.get("phase") not in TERMINAL_PHASES or prev.get("reason") in NOT_STARTED_REASONS


def _check_owner(child: Mapping[str, Any] | None, ftj: FineTuneJob, kind: str) -> None:
    """A same-named child of an earlier FineTuneJob is still being garbage-collected: wait."""
    if child is None:
        return
    owners = [r.get("uid") for r in child["metadata"].get("ownerReferences") or []]
    if ftj.uid not in owners:
        raise kopf.TemporaryError(
            f"{kind} {child['metadata']['name']} exists but is not owned by this FineTuneJob "
            "(left from an earlier one with the same name?); waiting for it to be deleted",
            delay=GC_WAIT,
        )


def _create_children(rt: Runtime, kube: Kube, ftj: FineTuneJob, logger: Any,
                     export: teacher.TeacherExport | None = None) -> Obj:
    """ConfigMap, token Secret and (multi-worker) headless Service first — the pods mount the first two
    and find worker 0 through the third — then the Job; ours are reused."""
    settings = rt.settings
    rt.dependents.done(ftj.namespace, ftj.name)
    configmap = objects.build_configmap(ftj, export)
    job = objects.build_job(ftj, settings, export)
    service = objects.build_service(ftj) if ftj.valid_spec().workers > 1 else None
    # Owner references only: kopf.adopt would also copy the FineTuneJob's labels onto the
    # children, and labels such as Argo CD's app.kubernetes.io/instance must stay off them.
    kopf.append_owner_reference([c for c in (configmap, service, job) if c is not None], owner=ftj.owner())
    _create_or_reuse(kube, configmap_path(ftj.namespace), configmap, ftj, "ConfigMap")
    if service is not None:
        _create_or_reuse(kube, service_path(ftj.namespace), service, ftj, "Service")
    if settings.progress_url:
        _ensure_token(rt, kube, ftj)
    created = _create_or_reuse(kube, job_path(ftj.namespace), job, ftj, "Job")
    logger.info(f"Job {created['metadata']['name']} is there")
    return created


def _ensure_token(rt: Runtime, kube: Kube, ftj: FineTuneJob) -> None:
    """Create the job's progress token Secret (or reuse ours after a restart); remember its digest."""
    secret = objects.build_token_secret(ftj, progress.new_token())
    kopf.append_owner_reference(secret, owner=ftj.owner())
    existing = _create_or_reuse(kube, secret_path(ftj.namespace), secret, ftj, "Secret")
    token = secret["stringData"]["token"] if "data" not in existing else decode_token(existing)
    if token:
        rt.remember_token(ftj.namespace, ftj.name, progress.token_digest(token))


def decode_token(secret: Mapping[str, Any]) -> str | None:
    raw = (secret.get("data") or {}).get(progress.TOKEN_KEY)
    if not raw:
        return None
    try:
        return base64.b64decode(raw).decode().strip() or None
    except (ValueError, UnicodeDecodeError):
        return None


def token_digest_for(rt: Runtime, namespace: str, name: str) -> str | None:
    """The digest of a job's token: remembered, else read from its Secret (after an operator restart)."""
    known = rt.known_token(namespace, name)
    if known or rt.kube is None:
        return known
    body = rt.kube.get(ftj_path(namespace, name))
    if body is None:
        return None
    secret = rt.kube.get(secret_path(namespace, naming.token_secret_name(name)))
    if secret is None or body["metadata"]["uid"] not in [
            r.get("uid") for r in secret["metadata"].get("ownerReferences") or []]:
        return None
    token = decode_token(secret)
    if not token:
        return None
    digest = progress.token_digest(token)
    rt.remember_token(namespace, name, digest)
    return digest


def _warn_if_ephemeral(kube: Kube, ftj: FineTuneJob, settings: Settings, now: dt.datetime) -> None:
    location = objects.output_location(ftj, settings)
    if location.get("ephemeral"):
        message = (
            f"nothing durable is mounted at spec.output.path ({location['path']}): the model goes to "
            "an emptyDir and is deleted with the pod; mount a volume there to keep it"
        )
        post_event(kube, ftj.owner(), "Warning", "EphemeralOutput", message, now)


def _create_or_reuse(kube: Kube, path: str, obj: Obj, ftj: FineTuneJob, kind: str) -> Obj:
    try:
        return kube.create(path, obj)
    except ApiError as err:
        if err.status != 409:
            raise
    existing = kube.get(f"{path}/{obj['metadata']['name']}")
    if existing is None:  # deleted between our create and get: try again shortly
        raise kopf.TemporaryError(f"{kind} {obj['metadata']['name']} vanished during creation", delay=1)
    _check_owner(existing, ftj, kind)
    return existing


def _fail_invalid(kube: Kube, ftj: FineTuneJob, problem: str, now: dt.datetime) -> Outcome:
    new = status.invalid_spec_status(ftj, problem, now)
    _write_status(kube, ftj, new, now)
    return Outcome(invalid=problem, status=new)


def _write_status(kube: Kube, ftj: FineTuneJob, new: Obj, now: dt.datetime) -> None:
    """Patch only what changed, then post the events for the transition."""
    old = ftj.status
    patch = merge_patch_for(old, new)
    if not patch:
        return
    kube.merge_patch(ftj_path(ftj.namespace, ftj.name, "status"), {"status": patch})
    for kind, reason, message in status.transition_events(old, new):
        post_event(kube, ftj.owner(), kind, reason, message, now)


def set_job_suspend(rt: Runtime, ftj: FineTuneJob, suspend: bool, logger: Any) -> None:
    """Propagate spec.runPolicy.suspend to an existing Job (the one mutable spec field)."""
    assert rt.kube is not None
    path = job_path(ftj.namespace, naming.job_name(ftj.name))
    try:
        job = rt.kube.get(path)
        if job is None or bool((job.get("spec") or {}).get("suspend")) == suspend:
            return
        _check_owner(job, ftj, "Job")
        rt.kube.merge_patch(path, {"spec": {"suspend": suspend}})
    except ApiError as err:
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=RETRY_DELAY) from None
    logger.info(f"Job {job['metadata']['name']}: suspend={suspend}")
