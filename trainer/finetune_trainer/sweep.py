"""`finetune-train sweep -f sweep.yaml`: a FineTuneSweep run locally, with no cluster.

The same file the operator runs: the same parameters, search (finetune_api.search), trial specs
(finetune_api.sweep.trial_job_spec) and median stopping. Trials run in this process one after another
(`--parallel 1`, the default) or in N worker processes; either way they share the feature cache folder
`<output>/feature-cache` (training.featureCacheDir), so trials with the same frozen part, data and
preprocessing pay for one frozen pass between them and then only train their heads.

Re-running a sweep resumes it: a trial whose folder holds a finished export of its spec is not trained
again (fit() returns that export), and the search sees the same history, so it asks the same questions.
At the end `<output>/sweep.json` records every trial and the best, and `<output>/best/` holds a copy of the
best trial's export. Trials write their evaluation's numbers (evaluation.json); its pictures are drawn for
best/ alone, since drawing is about half of what a trial costs once the frozen pass is shared.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import queue
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_api import search
from finetune_api.errors import Preempted, TrainingError
from finetune_api.sweep import SweepFile, trial_job_spec, trial_name
from finetune_trainer.report import Reporter
from finetune_trainer.sweep_table import SweepTable

BEST_DIR = "best"
SWEEP_JSON = "sweep.json"


@dataclass
class Trial:
    index: int
    name: str
    values: dict[str, Any]
    state: str = search.RUNNING
    reason: str = ""
    metric: float | None = None
    epoch: int = 0
    intermediate: dict[int, float] = field(default_factory=dict)
    output: str = ""
    sha256: str | None = None
    weights_file: str | None = None
    stop: str | None = None  # why it is to stop (pruned, target reached elsewhere), read by should_stop

    def view(self) -> search.TrialView:
        return search.TrialView(self.index, self.values, self.state, self.metric, dict(self.intermediate))


class LocalSweep:
    def __init__(self, sweep: SweepFile, output: Path | None = None, parallel: int | None = None,
                 table: SweepTable | None = None) -> None:
        self.name, self.spec = sweep.name, sweep.spec.model_copy(deep=True)
        if output is not None:  # trials, the shared cache, best/ and sweep.json all go under it
            self.spec.template.spec.output.path = str(output)
        self.root = Path(self.spec.template.spec.output.path)
        self.parallel = parallel or 1
        self.trials: list[Trial] = []
        self.table = table or SweepTable(sweep.spec, stream=sys.stderr)
        self.ended: str | None = None  # why no further trial starts (target reached, too many failed)

    # --- the search, as the operator runs it ---------------------------------------------------------------
    def next_trial(self) -> Trial | None:
        if self.ended or len(self.trials) >= self.spec.total_trials():
            return None
        index = len(self.trials)
        values = search.suggest(self.spec, index, [t.view() for t in self.trials])
        trial = Trial(index, trial_name(self.name, index), values)
        trial.output = str(self.root / trial.name)
        self.trials.append(trial)
        return trial

    def on_epoch(self, trial: Trial, record: dict[str, Any]) -> None:
        metric = self.spec.objective.metric
        value = record.get("valLoss" if metric == "valLoss" else "valAccuracy")
        trial.epoch = int(record.get("epoch") or trial.epoch)
        if isinstance(value, int | float):
            trial.intermediate[trial.epoch] = float(value)
        for index, why in search.to_prune(self.spec, [t.view() for t in self.trials]).items():
            if self.trials[index].stop is None:
                self.trials[index].stop = f"Pruned: {why}"
        self.table.update(self.trials)

    def on_end(self, trial: Trial, outcome: dict[str, Any]) -> None:
        trial.state, trial.reason = outcome["state"], outcome.get("reason", "")
        trial.metric, trial.sha256 = outcome.get("metric"), outcome.get("sha256")
        trial.weights_file = outcome.get("weightsFile")
        failed = sum(t.state == search.FAILED for t in self.trials)
        if trial.metric is not None and self.spec.objective.reached(trial.metric) and not self.ended:
            self.ended = f"TargetReached: {trial.name} reached {self.spec.objective.metric} {trial.metric:.4g}"
        elif failed > self.spec.trials.max_failed and not self.ended:
            self.ended = f"TooManyFailedTrials: {failed} trials failed (trials.maxFailed {self.spec.trials.max_failed})"
        if self.ended:
            for t in self.trials:
                if t.state == search.RUNNING and t.stop is None:
                    t.stop = f"Stopped: {self.ended.split(':')[0]}"
        self.table.update(self.trials, self._best())

    def _best(self) -> Trial | None:
        top = search.best(self.spec, [t.view() for t in self.trials])
        return self.trials[top.index] if top is not None else None

    # --- running trials --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with self.table:
            if self.parallel == 1:
                while (trial := self.next_trial()) is not None:
                    self.on_end(trial, run_trial(self._job(trial), trial.name, _InProcess(self, trial),
                                                 lambda t=trial: t.stop, self.spec.objective.metric))
            else:
                self._run_in_workers()
        return self.finish()

    def _job(self, trial: Trial) -> dict[str, Any]:
        return trial_job_spec(self.spec, trial.name, trial.values).to_wire()

    def _run_in_workers(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
        with ctx.Manager() as manager, cf.ProcessPoolExecutor(self.parallel, mp_context=ctx) as pool:
            events, stops = manager.Queue(), manager.dict()
            running: dict[cf.Future, Trial] = {}
            while True:
                while len(running) < self.parallel and (trial := self.next_trial()) is not None:
                    running[pool.submit(_worker, self._job(trial), trial.name, events, stops,
                                        self.spec.objective.metric)] = trial
                if not running:
                    return
                self._drain(events, stops, timeout=0.2)
                for future in [f for f in running if f.done()]:
                    self._drain(events, stops, timeout=0)
                    trial = running.pop(future)
                    self.on_end(trial, future.result())

    def _drain(self, events: Any, stops: Any, timeout: float) -> None:
        by_name = {t.name: t for t in self.trials}
        try:
            while True:
                name, record = events.get(timeout=timeout)
                self.on_epoch(by_name[name], record)
                timeout = 0
        except queue.Empty:
            pass
        for t in self.trials:
            if t.stop and t.state == search.RUNNING:
                stops[t.name] = t.stop

    # --- the result --------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        best = self._best()
        counts = {s: sum(t.state == s for t in self.trials) for s in (search.SUCCEEDED, search.FAILED, search.PRUNED)}
        doc = {"name": self.name, "objective": self.spec.objective.model_dump(mode="json"),
               "algorithm": self.spec.algorithm.name, "total": self.spec.total_trials(), "counts": counts,
               "ended": self.ended, "trials": [_public(t) for t in self.trials], "best": None}
        if best is not None:
            dest = self.root / BEST_DIR
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(best.output, dest, ignore=shutil.ignore_patterns("checkpoints", "cache"))
            _draw_best(dest)
            doc["best"] = {"trial": best.name, "parameters": best.values, "metric": best.metric,
                           "export": str(dest), "sha256": best.sha256, "weightsFile": best.weights_file}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SWEEP_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        if best is None:
            raise TrainingError(f"sweep {self.name}: no trial succeeded"
                                f"{f' ({self.ended})' if self.ended else ''}; see {self.root / SWEEP_JSON}")
        if self.ended and self.ended.startswith("TooManyFailedTrials"):
            raise TrainingError(f"sweep {self.name}: {self.ended}; the best so far is in {self.root / BEST_DIR}")
        return doc


def _draw_best(export: Path) -> None:
    """The pictures of the best export's report, drawn now (trials write the numbers only) and listed in
    its model.json, as a single job's export lists them."""
    from finetune_trainer.checkpoint import atomic_write
    from finetune_trainer.model_report import REPORT_FILE, draw_plots

    meta = json.loads((export / "model.json").read_text())
    evaluation = meta.get("evaluation")
    if not evaluation:
        return
    report = json.loads((export / evaluation["files"].get("report", REPORT_FILE)).read_text())
    evaluation["files"] = {**evaluation["files"], **draw_plots(export, report, meta.get("history"))}
    atomic_write(export / "model.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def _public(t: Trial) -> dict[str, Any]:
    d = asdict(t)
    d.pop("stop")
    d["intermediate"] = {str(k): v for k, v in t.intermediate.items()}
    return d


class _InProcess(Reporter):
    """A trial's events, in this process: epochs feed the sweep (pruning, the table)."""

    def __init__(self, sweep: LocalSweep, trial: Trial) -> None:
        self.sweep, self.trial = sweep, trial

    def event(self, kind: str, **fields: Any) -> None:
        if kind == "epoch":
            self.sweep.on_epoch(self.trial, fields)


class _Queued(Reporter):
    def __init__(self, name: str, events: Any) -> None:
        self.name, self.events = name, events

    def event(self, kind: str, **fields: Any) -> None:
        if kind == "epoch":
            self.events.put((self.name, {k: fields.get(k) for k in ("epoch", "valAccuracy", "valLoss")}))


def _worker(job: dict[str, Any], name: str, events: Any, stops: Any, metric: str) -> dict[str, Any]:
    return run_trial(job, name, _Queued(name, events), lambda: stops.get(name), metric)


def run_trial(job: dict[str, Any], name: str, reporter: Reporter, stop_reason, metric: str) -> dict[str, Any]:
    """Train one trial; its outcome as the sweep records it. Errors end the trial, never the sweep."""
    from finetune_api.spec import parse_spec
    from finetune_trainer.fit import fit
    from finetune_trainer.model_report import without_plots

    spec = parse_spec(job, "template.spec")
    try:
        with without_plots():  # drawn for the best export only, at the end: half of a warm trial's cost
            result = fit(spec, reporter, Path(spec.output.path), name=name,
                         should_stop=lambda: bool(stop_reason()))
    except Preempted:
        why = stop_reason() or "Stopped"
        return {"state": search.PRUNED, "reason": why}
    except Exception as err:  # FinetuneError or a crash: that trial's failure, never the sweep's
        return {"state": search.FAILED, "reason": f"{type(err).__name__}: {err}"}
    value = {"valAccuracy": result.val_accuracy, "valLoss": result.val_loss,
             "testAccuracy": result.test_accuracy}[metric]
    return {"state": search.SUCCEEDED, "metric": value, "sha256": result.sha256, "weightsFile": result.weights_file,
            "reason": "reused a finished export" if result.reused_export else ""}
