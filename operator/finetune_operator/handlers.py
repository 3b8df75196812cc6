"""kopf handlers: thin triggers that all call `reconcile`.

Registered on an explicit registry (`register`), so tests run a fresh operator with their
own settings and API endpoint, and `__main__` / `kopf run -m finetune_operator.entry` use
kopf's default registry.

Triggers: create/resume/update of a FineTuneJob, any event of an owned Job or Pod (selected
by the finetune.dev/finetunejob-uid label) or smoke-test Job (finetune.dev/smoke-test-of), any
event of a FineTuneJob other students wait on as their distillation teacher, and an operator-level
resync loop for deadlines (and for spec.serving while KServe has not decided).

Handlers return None: kopf would store a return value in status.<handler-id>, which the
CRD's strict status schema does not declare. Kopf's own bookkeeping goes to annotations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from finetune_api.spec import API_GROUP, API_VERSION, RunPolicy
from finetune_api.status import STOP_ANNOTATION, TERMINAL_PHASES
from finetune_operator import sweep_handlers
from finetune_operator.crd import PLURAL
from finetune_operator.kube import Kube, ftj_path
from finetune_operator.naming import ANNOTATION_NAME, LABEL_UID
from finetune_operator.parsed import FineTuneJob, spec_section
from finetune_operator.reconcile import Runtime, reconcile, reconcile_on_event, set_job_suspend, token_digest_for
from finetune_operator.server import ProgressService, serve
from finetune_operator.serving import LABEL_SMOKE
from finetune_operator.settings import Settings

FTJ = (API_GROUP, API_VERSION, PLURAL)
OWNED = {LABEL_UID: kopf.PRESENT}


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Kopf settings: nothing undeclared in status, sane timeouts and backoff."""
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{API_GROUP}/kopf-finalizer"  # unused: no deletion handlers
    kopf_settings.posting.level = logging.getLevelName(settings.posting_level)
    # Restart watches every few minutes: a silently dead connection is noticed in bounded time.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout
    kopf_settings.watching.client_timeout = settings.watch_server_timeout + 30
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = 60
    kopf_settings.networking.connect_timeout = 30
    kopf_settings.queueing.error_delays = (1, 2, 5, 10, 20, 30, 60)
    kopf_settings.execution.max_workers = 16
    # Deterministic Job names + create-if-absent make a second replica harmless, so no
    # peering (which needs its own CRDs) is required.
    kopf_settings.peering.standalone = True


def register(
    registry: kopf.OperatorRegistry,
    settings: Settings,
    kube_factory: Callable[[], Kube] = Kube.from_environment,
) -> Runtime:
    """Register every handler on `registry`; returns the shared runtime (for tests)."""
    rt = Runtime(settings=settings)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
        configure_kopf(settings, rt.settings)
        rt.kube = kube_factory()
        rt.resync_task = asyncio.create_task(resync_loop(rt, logger), name="finetune resync")
        if rt.settings.listen is not None:
            host, port = rt.settings.listen
            service = progress_service(rt)
            rt.on_forget.append(service.forget)
            rt.http_task = asyncio.create_task(serve(service, host, port), name="finetune http")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in (rt.resync_task, rt.http_task):
            if task is not None:
                task.cancel()

    @kopf.on.event(*FTJ, registry=registry)
    def ftj_event(event: Mapping[str, Any], namespace: str, name: str, logger: Any, **_: Any) -> None:
        """No finalizer: a deleted FineTuneJob is noticed here, and its series and state dropped. A teacher's
        change (it succeeded, failed, appeared, went) re-checks the students waiting on it at once. The stop
        annotation (a sweep pruning a trial) changes no spec field, so it is noticed here too."""
        if event.get("type") == "DELETED":
            rt.forget(namespace, name)
        for student in rt.dependents.students(namespace, name):
            try:
                reconcile_on_event(rt, namespace, student, logger)
            except kopf.TemporaryError as err:  # the resync loop (or the teacher's next event) tries again
                logger.warning(f"re-checking student {namespace}/{student} of teacher {name}: {err}")
        if event.get("type") != "DELETED" and _stop_requested(event.get("object") or {}):
            reconcile_on_event(rt, namespace, name, logger)  # on failure: the resync loop (it is unfinished)

    @kopf.on.create(*FTJ, registry=registry)
    @kopf.on.resume(*FTJ, registry=registry)
    def created_or_resumed(namespace: str, name: str, logger: Any, **_: Any) -> None:
        _run(rt, namespace, name, logger, permanent=True)

    @kopf.on.update(*FTJ, field="spec", registry=registry)
    def spec_changed(
        namespace: str, name: str, body: Mapping[str, Any], old: Any, new: Any, logger: Any, **_: Any
    ) -> None:
        # Only a change of the FineTuneJob's own field is propagated: a queue such as Kueue suspends and
        # resumes the Job itself, and an unrelated spec edit must not undo that.
        before, after = _suspend(old), _suspend(new)
        if before != after:
            set_job_suspend(rt, FineTuneJob.from_body(body), after, logger)
        _run(rt, namespace, name, logger, permanent=True)

    @kopf.on.event("batch", "v1", "jobs", labels=OWNED, registry=registry)
    def job_event(body: Mapping[str, Any], namespace: str, logger: Any, **_: Any) -> None:
        owner = _owner_name(body)
        if owner:
            _run(rt, namespace, owner, logger, permanent=False)

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_SMOKE: kopf.PRESENT}, registry=registry)
    def smoke_job_event(body: Mapping[str, Any], namespace: str, logger: Any, **_: Any) -> None:
        """spec.serving's smoke-test Job finishing decides promotion at once (not at the next resync)."""
        owner = _owner_name(body)
        if owner:
            _run(rt, namespace, owner, logger, permanent=False)

    @kopf.on.event("v1", "pods", labels=OWNED, registry=registry)
    def pod_event(body: Mapping[str, Any], namespace: str, logger: Any, **_: Any) -> None:
        owner = _owner_name(body)
        if owner:
            _run(rt, namespace, owner, logger, permanent=False)

    sweep_handlers.register(registry, rt)
    return rt


def _stop_requested(body: Mapping[str, Any]) -> bool:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return STOP_ANNOTATION in annotations and (body.get("status") or {}).get("phase") not in TERMINAL_PHASES


def _run(rt: Runtime, namespace: str, name: str, logger: Any, *, permanent: bool) -> None:
    if not permanent:  # a watch event: coalesced with a pass already running
        reconcile_on_event(rt, namespace, name, logger)
        return
    outcome = reconcile(rt, namespace, name, logger)
    if outcome.invalid:
        # Status already says Failed/InvalidSpec with a Warning event; this stops kopf's retries.
        raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")


async def resync_loop(rt: Runtime, logger: Any) -> None:
    """Re-derive every unfinished FineTuneJob each `resync_seconds`: deadlines pass without events.

    An operator-level loop rather than a kopf timer: kopf puts a finalizer on every object
    with a timer, and a finalizer blocks deletion whenever the operator is not running.
    """
    while True:
        await asyncio.sleep(rt.settings.resync_seconds)
        # Jobs whose events re-derived them within the period are fresh: only quiet ones need the clock.
        for namespace, name in rt.queue.due(rt.settings.resync_seconds):
            try:
                await asyncio.to_thread(reconcile, rt, namespace, name, logger)
            except kopf.TemporaryError as err:
                logger.warning(f"resync of {namespace}/{name} will be retried: {err}")
            except Exception:  # one bad object must not stop the loop for the others
                logger.exception(f"resync of {namespace}/{name} failed")


def _suspend(spec: Any) -> bool:
    return spec_section(RunPolicy, spec if isinstance(spec, Mapping) else None, "runPolicy").suspend


def _owner_name(body: Mapping[str, Any]) -> str | None:
    """The FineTuneJob behind a Job (owner reference) or a pod (annotation from the template)."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "FineTuneJob" and ref.get("apiVersion", "").startswith(f"{API_GROUP}/"):
            return ref.get("name")
    return (meta.get("annotations") or {}).get(ANNOTATION_NAME)


def progress_service(rt: Runtime) -> ProgressService:
    """Pushes are verified against the job's token digest and written to its status subresource.

    The API client is synchronous, so lookups and writes run in the default thread pool.
    """

    async def lookup(namespace: str, name: str) -> str | None:
        return await asyncio.get_running_loop().run_in_executor(None, token_digest_for, rt, namespace, name)

    async def write(namespace: str, name: str, fields: dict[str, Any]) -> None:
        assert rt.kube is not None
        path = ftj_path(namespace, name, "status")
        await asyncio.get_running_loop().run_in_executor(None, rt.kube.merge_patch, path, {"status": fields})

    return ProgressService(rt.metrics, lookup, write)
