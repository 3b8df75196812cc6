"""kopf wiring of the FineTuneSweep controller: read what exists, `sweep.plan` it, do what the plan says.

Triggers: create/resume/update of a FineTuneSweep, every event of a trial FineTuneJob (label
finetune.dev/sweep; its owner reference names the sweep), and a timer-free resync loop over unfinished
sweeps (like handlers.resync_loop: a kopf timer would put a finalizer on every sweep). Passes for one
sweep run one at a time with bursts coalesced, on a work queue of their own (a sweep and a FineTuneJob may
share a name).

Every action is idempotent: trials are created if absent (409: already there, a restarted operator's or a
second replica's), the stop annotation is a merge patch, status is patched with what changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from finetune_api.spec import API_GROUP, API_VERSION
from finetune_api.status import STOP_ANNOTATION, TERMINAL_PHASES
from finetune_api.sweep import SWEEP_KIND
from finetune_operator import sweep
from finetune_operator.crd import PLURAL
from finetune_operator.events import post_event
from finetune_operator.kube import ApiError, Kube, ftj_path, merge_patch_for
from finetune_operator.naming import fit
from finetune_operator.reconcile import RETRY_DELAY, Runtime
from finetune_operator.sweep_crd import SWEEP_PLURAL
from finetune_operator.workqueue import WorkQueue

FTS = (API_GROUP, API_VERSION, SWEEP_PLURAL)
FTJ = (API_GROUP, API_VERSION, PLURAL)


def sweep_path(namespace: str, name: str = "", subresource: str = "") -> str:
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{SWEEP_PLURAL}"
    return "/".join(p for p in (path, name, subresource) if p)


@dataclass
class Sweeps:
    rt: Runtime  # the FineTuneJob runtime: its API client (set at startup), settings, clock and metrics
    queue: WorkQueue = field(default_factory=WorkQueue)
    task: asyncio.Task[None] | None = None


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> Sweeps:
    sw = Sweeps(rt)

    @kopf.on.startup(registry=registry)
    async def sweeps_startup(logger: Any, **_: Any) -> None:
        sw.task = asyncio.create_task(resync_loop(sw, logger), name="finetune sweep resync")

    @kopf.on.cleanup(registry=registry)
    async def sweeps_cleanup(**_: Any) -> None:
        if sw.task is not None:
            sw.task.cancel()

    @kopf.on.create(*FTS, registry=registry)
    @kopf.on.resume(*FTS, registry=registry)
    @kopf.on.update(*FTS, registry=registry)
    def sweep_changed(namespace: str, name: str, logger: Any, **_: Any) -> None:
        invalid = reconcile_sweep(sw, namespace, name, logger)
        if invalid:  # status says Failed/InvalidSpec with a Warning event; this stops kopf's retries
            raise kopf.PermanentError(f"invalid spec: {invalid}")

    @kopf.on.event(*FTS, registry=registry)
    def sweep_event(event: Mapping[str, Any], namespace: str, name: str, **_: Any) -> None:
        if event.get("type") == "DELETED":  # no finalizer: the garbage collector takes the trials
            sw.queue.forget((namespace, name))
            sw.rt.metrics.forget_sweep(namespace, name, sweep.STATES)

    @kopf.on.event(*FTJ, labels={sweep.LABEL_SWEEP: kopf.PRESENT}, registry=registry)
    def trial_event(body: Mapping[str, Any], namespace: str, logger: Any, **_: Any) -> None:
        owner = next((r.get("name") for r in (body.get("metadata") or {}).get("ownerReferences") or []
                      if r.get("kind") == SWEEP_KIND), None)
        if owner:
            try:
                sw.queue.run_unless_busy((namespace, owner), lambda: _pass(sw, namespace, owner, logger))
            except kopf.TemporaryError as err:  # the resync loop (or the next event) tries again
                logger.warning(f"sweep {namespace}/{owner}: {err}")

    return sw


def reconcile_sweep(sw: Sweeps, namespace: str, name: str, logger: logging.Logger | Any) -> str | None:
    """One pass (queued per sweep); the invalid-spec message when the spec cannot run."""
    return sw.queue.run((namespace, name), lambda: _pass(sw, namespace, name, logger))


def _pass(sw: Sweeps, namespace: str, name: str, logger: Any) -> str | None:
    """Runs inside the queue (its per-sweep lock is not re-entrant: never call reconcile_sweep from here)."""
    try:
        return _plan_and_act(sw, namespace, name, logger)
    except ApiError as err:
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=RETRY_DELAY) from None


def _plan_and_act(sw: Sweeps, namespace: str, name: str, logger: Any) -> str | None:
    assert sw.rt.kube is not None, "the startup handler sets the API client"
    kube, now = sw.rt.kube, sw.rt.clock()
    body = kube.get(sweep_path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        sw.queue.forget((namespace, name))
        return None
    trials = kube.list(ftj_path(namespace), {sweep.LABEL_SWEEP: fit(name, 63)})
    out = sweep.plan(body, trials, now)
    for trial in out.create:
        if _create_if_absent(kube, body, trial):
            meta = trial["metadata"]
            values = meta["annotations"][sweep.ANNOTATION_PARAMETERS]
            post_event(kube, body, "Normal", "TrialCreated", f"created trial {meta['name']} with {values}", now)
    for trial_name, why in out.stop.items():
        logger.info(f"stopping trial {trial_name}: {why}")
        kube.merge_patch(ftj_path(namespace, trial_name), {"metadata": {"annotations": {STOP_ANNOTATION: why}}})
        kind, reason, message = sweep.stop_event(why)
        post_event(kube, body, kind, reason, f"{trial_name}: {message}", now)
    patch = merge_patch_for(body.get("status") or {}, out.status)
    if patch:
        kube.merge_patch(sweep_path(namespace, name, "status"), {"status": patch})
        for kind, reason, message in out.events:
            post_event(kube, body, kind, reason, message, now)
    status = out.status
    sw.queue.track((namespace, name), unfinished=status["phase"] not in TERMINAL_PHASES or status["running"] > 0)
    sw.rt.metrics.observe_sweep(namespace, name, status["phase"], status["reason"],
                                {s: status.get(s, 0) for s in sweep.STATES}, _metric(body),
                                (status.get("best") or {}).get("metric"))
    return out.invalid


def _create_if_absent(kube: Kube, owner: Mapping[str, Any], trial: dict[str, Any]) -> bool:
    """True when this call created it; a same-named FineTuneJob that another sweep owns means wait."""
    try:
        kube.create(ftj_path(trial["metadata"]["namespace"]), trial)
        return True
    except ApiError as err:
        if err.status != 409:
            raise
    existing = kube.get(ftj_path(trial["metadata"]["namespace"], trial["metadata"]["name"]))
    if existing is not None and not sweep.owns(owner, existing):
        raise kopf.TemporaryError(f"FineTuneJob {trial['metadata']['name']} exists but is not a trial of this "
                                  "sweep (left from an earlier sweep of that name?); waiting for it to go",
                                  delay=RETRY_DELAY)
    return False


def _metric(body: Mapping[str, Any]) -> str:
    return str(((body.get("spec") or {}).get("objective") or {}).get("metric") or "valAccuracy")


async def resync_loop(sw: Sweeps, logger: Any) -> None:
    """Re-plan unfinished sweeps each resync period: a lost watch event or a failed pass is not the end."""
    while True:
        await asyncio.sleep(sw.rt.settings.resync_seconds)
        for namespace, name in sw.queue.due(sw.rt.settings.resync_seconds):
            try:
                await asyncio.to_thread(reconcile_sweep, sw, namespace, name, logger)
            except kopf.TemporaryError as err:
                logger.warning(f"resync of sweep {namespace}/{name} will be retried: {err}")
            except Exception:  # one bad sweep must not stop the loop for the others
                logger.exception(f"resync of sweep {namespace}/{name} failed")
