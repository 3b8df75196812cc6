"""One FineTuneSweep pass as a pure function: what exists in, what to create, stop and write out.

`plan(sweep, trials, now)` reads the sweep (spec and stored status) and its trial FineTuneJobs and answers
with the new status, the trials to create (in index order), the trials to stop (name → finetune.dev/stop
value) and the events that go with them. Level-based like the FineTuneJob's status: a restarted operator
plans the same from the same objects. The one thing only status remembers is the per-epoch metric history
(trials report progress, not history); merging keeps every epoch already recorded.

Trials are named <sweep>-<index:03d> and created only for indexes not yet seen, so a restart — or a
second replica — never creates more than total_trials(); the values of a trial are fixed at creation
(annotation finetune.dev/trial-parameters) and never asked for again.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_api import search
from finetune_api.errors import JobFileError
from finetune_api.spec import API_GROUP, API_VERSION, KIND
from finetune_api.status import STOP_ANNOTATION, STOP_REASONS, TERMINAL_PHASES, Reason
from finetune_api.sweep import SWEEP_KIND, FineTuneSweepSpec, Scalar, parse_sweep_spec, trial_job_spec, trial_name
from finetune_api.sweep_status import SweepPhase, SweepReason
from finetune_operator.naming import fit
from finetune_operator.observe import format_time
from finetune_operator.parsed import Obj, ObjView
from finetune_operator.status import condition

LABEL_SWEEP = f"{API_GROUP}/sweep"  # on every trial: the sweep's name (hashed when longer than a label value)
ANNOTATION_PARAMETERS = f"{API_GROUP}/trial-parameters"  # the trial's values, JSON (path → value)
ANNOTATION_INDEX = f"{API_GROUP}/trial-index"
TRIAL_DELETED = "TrialDeleted"
STATES = ("running", "succeeded", "failed", "pruned")  # the count fields of status and the metric's labels
Event = tuple[str, str, str]  # (type, reason, message)


@dataclass
class Trial:
    """One trial as the sweep sees it: from its FineTuneJob (or, once that is gone, from status)."""

    name: str
    index: int
    values: dict[str, Scalar]
    phase: str  # the FineTuneJob's phase (Pending when it has none yet)
    reason: str | None = None
    stop: str | None = None  # the stop annotation, when set
    metric: float | None = None
    epoch: int | None = None
    history: dict[int, float] = field(default_factory=dict)
    output: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Pending or running — a stopped trial too, until its FineTuneJob says it ended (parallel counts it)."""
        return self.phase not in TERMINAL_PHASES

    @property
    def state(self) -> str:
        if self.phase == "Succeeded":
            return search.SUCCEEDED
        if self.reason in STOP_REASONS or (self.active and self.stop is not None):
            return search.PRUNED
        return search.FAILED if self.phase == "Failed" else search.RUNNING

    def view(self) -> search.TrialView:
        return search.TrialView(self.index, dict(self.values), self.state, self.metric, dict(self.history))

    def record(self) -> dict[str, Any]:
        shown = "Pruned" if self.state == search.PRUNED and not self.active else self.phase
        out = {"name": self.name, "index": self.index, "parameters": dict(self.values), "phase": shown,
               "reason": self.reason, "metric": self.metric, "epoch": self.epoch,
               "history": [{"epoch": e, "value": v} for e, v in sorted(self.history.items())] or None}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[Obj] = field(default_factory=list)  # trial FineTuneJobs, in index order
    stop: dict[str, str] = field(default_factory=dict)  # trial name → finetune.dev/stop value
    events: list[Event] = field(default_factory=list)  # the sweep's phase transitions (the caller posts per action)
    invalid: str | None = None


def plan(sweep: ObjView, trial_bodies: Sequence[ObjView], now: dt.datetime) -> Plan:
    meta, prev = sweep["metadata"], dict(sweep.get("status") or {})
    try:
        spec = parse_sweep_spec(sweep.get("spec"))
    except JobFileError as err:
        return _invalid(sweep, prev, str(err), now)
    trials = read_trials(sweep, trial_bodies, prev, spec.objective.metric)
    total = spec.total_trials()
    out = Plan(status={})
    finished = _keep_finished(prev)
    views = [t.view() for t in trials]
    failed = sum(t.state == search.FAILED for t in trials)
    top = search.best(spec, views)
    if finished is None and failed > spec.trials.max_failed:
        finished = (SweepPhase.FAILED, SweepReason.TOO_MANY_FAILED,
                    f"{failed} trials failed, more than trials.maxFailed ({spec.trials.max_failed}); the running "
                    "trials are stopped")
    if finished is None and top is not None and spec.objective.reached(top.metric):  # type: ignore[arg-type]
        finished = (SweepPhase.SUCCEEDED, SweepReason.TARGET_REACHED,
                    f"trial {_name_of(trials, top.index)} reached the target {spec.objective.metric} "
                    f"{spec.objective.target} ({top.metric:.4g}); the running trials are stopped")
    if finished is not None:  # a finished sweep runs nothing more
        why = f"Stopped: sweep {meta['name']} {finished[1]}"
        out.stop = {t.name: why for t in trials if t.active and t.stop is None}
    else:
        pruned = search.to_prune(spec, views)  # finished trials count in the median; only running ones are pruned
        out.stop = {t.name: f"Pruned: {pruned[t.index]}" for t in trials if t.index in pruned}
        out.create = _create(spec, sweep, trials, total)
        trials = sorted(trials + [_planned(t) for t in out.create], key=lambda t: t.index)
        if len(trials) >= total and not any(t.active for t in trials):
            finished = _outcome(spec, trials)
    for t in trials:  # what the status shows: the stop just decided, already
        t.stop = t.stop or out.stop.get(t.name)
    out.status = _status(sweep, prev, spec, trials, total, finished, now)
    out.events = phase_events(prev, out.status)
    return out


def _keep_finished(prev: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """Succeeded and Failed stay, except InvalidSpec (nothing ran: a fixed spec starts the sweep)."""
    if prev.get("phase") not in TERMINAL_PHASES or prev.get("reason") == SweepReason.INVALID_SPEC:
        return None
    return prev["phase"], prev.get("reason") or prev["phase"], prev.get("message") or ""


def _outcome(spec: FineTuneSweepSpec, trials: list[Trial]) -> tuple[str, str, str]:
    top = search.best(spec, [t.view() for t in trials])
    if top is None:
        return (SweepPhase.FAILED, SweepReason.NO_SUCCESSFUL_TRIAL,
                f"all {len(trials)} trials finished; none succeeded with a {spec.objective.metric}")
    return (SweepPhase.SUCCEEDED, SweepReason.COMPLETED,
            f"all {len(trials)} trials finished; the best is {_name_of(trials, top.index)} "
            f"({spec.objective.metric} {top.metric:.4g})")


def _create(spec: FineTuneSweepSpec, sweep: ObjView, trials: list[Trial], total: int) -> list[Obj]:
    """The next trials: lowest unused indexes, while fewer than trials.parallel are active."""
    seen = {t.index for t in trials}
    history = [t.view() for t in trials]
    active = sum(t.active for t in trials)
    out: list[Obj] = []
    index = 0
    while active < spec.trials.parallel and len(seen) < total:
        while index in seen:
            index += 1
        values = search.suggest(spec, index, history)
        out.append(build_trial(sweep, spec, index, values))
        history.append(search.TrialView(index, values))  # a running trial: later asks of this pass see it
        seen.add(index)
        active += 1
    return out


def build_trial(sweep: ObjView, spec: FineTuneSweepSpec, index: int, values: dict[str, Scalar]) -> Obj:
    """Trial `index` as a FineTuneJob: owned by the sweep (the garbage collector deletes it with the sweep),
    labelled with the sweep's name, its values in an annotation, the template's metadata copied."""
    meta = sweep["metadata"]
    name = trial_name(meta["name"], index)
    template = spec.template.metadata or {}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": meta.get("namespace"),
            "labels": {**template.get("labels", {}), LABEL_SWEEP: fit(meta["name"], 63)},
            "annotations": {**template.get("annotations", {}), ANNOTATION_INDEX: str(index),
                            ANNOTATION_PARAMETERS: json.dumps(values, sort_keys=True)},
            "ownerReferences": [owner_reference(sweep)],
        },
        "spec": trial_job_spec(spec, name, values).to_wire(),
    }


def owner_reference(sweep: ObjView) -> dict[str, Any]:
    meta = sweep["metadata"]
    return {"apiVersion": sweep.get("apiVersion") or f"{API_GROUP}/{API_VERSION}", "kind": SWEEP_KIND,
            "name": meta["name"], "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}


def _planned(body: Obj) -> Trial:
    meta = body["metadata"]
    return Trial(meta["name"], int(meta["annotations"][ANNOTATION_INDEX]),
                 json.loads(meta["annotations"][ANNOTATION_PARAMETERS]), "Pending")


def owns(sweep: ObjView, body: ObjView) -> bool:
    uid = sweep["metadata"].get("uid")
    return any(r.get("uid") == uid and r.get("kind") == SWEEP_KIND
               for r in (body.get("metadata") or {}).get("ownerReferences") or [])


def read_trials(sweep: ObjView, bodies: Sequence[ObjView], prev: Mapping[str, Any], metric: str) -> list[Trial]:
    """The sweep's trials: its FineTuneJobs (owned by it), plus those status recorded that are gone."""
    recorded = {r["name"]: r for r in prev.get("trials") or [] if r.get("name")}
    trials = {}
    for body in bodies:
        if owns(sweep, body):
            t = read_trial(body, recorded.get(body["metadata"]["name"]), metric)
            if t is not None:
                trials[t.name] = t
    for name, r in recorded.items():
        if name not in trials and r.get("index") is not None:
            phase, reason = r.get("phase"), r.get("reason")
            if phase not in TERMINAL_PHASES and phase != "Pruned":  # deleted before it finished: never re-created
                phase, reason = "Failed", TRIAL_DELETED
            trials[name] = Trial(name, int(r["index"]), dict(r.get("parameters") or {}),
                                 "Failed" if phase == "Pruned" else phase, reason, metric=r.get("metric"),
                                 epoch=r.get("epoch"), history=_history(r))
    return sorted(trials.values(), key=lambda t: t.index)


def read_trial(body: ObjView, recorded: Mapping[str, Any] | None, metric: str) -> Trial | None:
    meta = body.get("metadata") or {}
    notes = meta.get("annotations") or {}
    try:
        index = int(notes[ANNOTATION_INDEX])
        values = json.loads(notes[ANNOTATION_PARAMETERS])
    except (KeyError, ValueError):
        return None  # not made by this operator: no index, no values to learn from
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    history = _history(recorded or {})
    per_epoch = progress.get("valLoss" if metric == "valLoss" else "valAccuracy")
    epoch = progress.get("epoch")
    if isinstance(epoch, int) and epoch >= 1 and isinstance(per_epoch, int | float):
        history[epoch] = float(per_epoch)  # (epoch, its value) is one push: the metric of the epoch completed
    phase = status.get("phase") or "Pending"
    output = status.get("output") or {}
    final = output.get(metric) if phase == "Succeeded" else None
    latest = history[max(history)] if history else None
    return Trial(meta["name"], index, values if isinstance(values, dict) else {}, phase, status.get("reason"),
                 notes.get(STOP_ANNOTATION), final if phase == "Succeeded" else latest, epoch, history, output)


def _history(record: Mapping[str, Any]) -> dict[int, float]:
    return {int(h["epoch"]): float(h["value"]) for h in record.get("history") or []
            if isinstance(h, Mapping) and "epoch" in h and "value" in h}


def _name_of(trials: list[Trial], index: int) -> str:
    return next(t.name for t in trials if t.index == index)


def _status(sweep: ObjView, prev: Mapping[str, Any], spec: FineTuneSweepSpec, trials: list[Trial], total: int,
            finished: tuple[str, str, str] | None, now: dt.datetime) -> dict[str, Any]:
    counts = dict.fromkeys(STATES, 0)
    for t in trials:  # a stopping trial still runs until its FineTuneJob says it ended
        counts["running" if t.active else t.state.lower()] += 1
    active = counts["running"]
    done = len(trials) - active
    if finished is not None:
        phase, reason, message = finished
    elif any(t.phase == "Running" or not t.active for t in trials):
        phase, reason = SweepPhase.RUNNING, SweepReason.RUNNING
        message = f"{done} of {total} trials finished, {active} running"
    else:
        phase, reason = SweepPhase.PENDING, SweepReason.CREATED
        message = f"{len(trials)} of {total} trials created, waiting for them to start"
    status: dict[str, Any] = {
        "phase": phase, "reason": reason, "message": message,
        "observedGeneration": sweep["metadata"].get("generation", 0),
        "startTime": prev.get("startTime") or format_time(now),
        "completionTime": (prev.get("completionTime") or format_time(now)) if phase in TERMINAL_PHASES else None,
        "total": total, "created": len(trials), **counts, "trialsText": f"{done}/{total}",
        "best": best_of(spec, trials), "trials": [t.record() for t in trials],
    }
    status["conditions"] = sweep_conditions(prev, status, now)
    return {k: v for k, v in status.items() if v is not None}


def best_of(spec: FineTuneSweepSpec, trials: list[Trial]) -> dict[str, Any] | None:
    """The succeeded trial with the best metric and where its export is (path, volume, weights, digest)."""
    top = search.best(spec, [t.view() for t in trials])
    if top is None:
        return None
    trial = next(t for t in trials if t.index == top.index)
    model = {k: trial.output[k] for k in ("path", "volume", "weightsFile", "sha256") if trial.output.get(k)}
    return {"job": trial.name, "parameters": dict(trial.values), "metric": top.metric, **({"model": model} if model
                                                                                         else {})}


def sweep_conditions(prev: Mapping[str, Any], status: Mapping[str, Any], now: dt.datetime) -> list[dict[str, Any]]:
    """kstatus Ready/Reconciling/Stalled, plus Succeeded/Failed, like a FineTuneJob's."""
    phase, reason, message, gen = status["phase"], status["reason"], status["message"], status["observedGeneration"]
    wanted = [("Ready", phase == SweepPhase.SUCCEEDED), ("Reconciling", phase not in TERMINAL_PHASES),
              ("Stalled", phase == SweepPhase.FAILED), ("Succeeded", phase == SweepPhase.SUCCEEDED),
              ("Failed", phase == SweepPhase.FAILED)]
    return [condition(prev, kind, ok, reason, message, now, gen) for kind, ok in wanted]


def phase_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    if new.get("phase") == old.get("phase") and new.get("reason") == old.get("reason"):
        return []
    if new["phase"] == SweepPhase.SUCCEEDED:
        return [("Normal", "Succeeded", new["message"])]
    if new["phase"] == SweepPhase.FAILED:
        return [("Warning", new["reason"], new["message"])]
    return []


def _invalid(sweep: ObjView, prev: Mapping[str, Any], problem: str, now: dt.datetime) -> Plan:
    """Failed/InvalidSpec with a Warning event; nothing is created (a sweep that already ran keeps its trials)."""
    status: dict[str, Any] = {
        "phase": SweepPhase.FAILED, "reason": SweepReason.INVALID_SPEC, "message": problem,
        "observedGeneration": sweep["metadata"].get("generation", 0),
        "completionTime": prev.get("completionTime") or format_time(now),
        **{k: prev[k] for k in ("startTime", "total", "created", *STATES, "trialsText", "best", "trials")
           if k in prev},
    }
    status["conditions"] = sweep_conditions(prev, status, now)
    return Plan(status=status, events=phase_events(prev, status), invalid=problem)


def stop_event(value: str) -> Event:
    """The sweep's event for stopping one trial: TrialPruned (median stopping) or TrialStopped (sweep ended)."""
    pruned = value.startswith(Reason.PRUNED)
    return ("Normal", "TrialPruned" if pruned else "TrialStopped", value.partition(":")[2].strip())
