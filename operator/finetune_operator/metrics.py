"""Prometheus metrics of the operator, on their own registry (tests make fresh ones).

Names follow Prometheus conventions: base units (`_seconds`, `_ratio`), `_total` for counters.
Per-job series carry namespace/name labels and are removed when the FineTuneJob is deleted, so a
dashboard never shows jobs that no longer exist.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from finetune_api.status import PHASES, TERMINAL_PHASES

# status.progress key → per-job gauge (name, help).
JOB_GAUGES = {
    "epoch": ("finetune_job_epoch", "Epochs completed by the FineTuneJob's trainer."),
    "progress_ratio": ("finetune_job_progress_ratio", "Fraction of the run done, 0 to 1."),
    "trainLoss": ("finetune_job_train_loss", "Latest training loss reported by the trainer."),
    "valLoss": ("finetune_job_val_loss", "Latest validation loss reported by the trainer."),
    "valAccuracy": ("finetune_job_val_accuracy", "Latest validation accuracy (0 to 1)."),
    "bestValAccuracy": ("finetune_job_best_val_accuracy", "Best validation accuracy so far (0 to 1)."),
    "samplesPerSecond": ("finetune_job_samples_per_second", "Training throughput in images per second."),
    "etaSeconds": ("finetune_job_eta_seconds", "Estimated seconds until training finishes."),
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("finetune_jobs", "FineTuneJobs known to the operator, by phase.", ["phase"], registry=r)
        self.transitions = Counter(
            "finetune_job_phase_transitions_total", "FineTuneJob phase changes, by new phase and reason.",
            ["phase", "reason"], registry=r)
        self.duration = Histogram(
            "finetune_job_duration_seconds", "Wall time from creation to a terminal phase, by outcome.",
            ["phase"], buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800), registry=r)
        self.reconciles = Counter("finetune_reconcile_total", "Reconcile passes, by result.", ["result"],
                                  registry=r)
        self.reconcile_errors = Counter("finetune_reconcile_errors_total", "Reconcile passes that raised.",
                                        registry=r)
        self.reconcile_latency = Histogram(
            "finetune_reconcile_duration_seconds", "Time spent in one reconcile pass.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.pushes = Counter("finetune_progress_pushes_total", "Progress pushes from trainers, by result and reason.",
                              ["result", "reason"], registry=r)
        self.http_dropped = Counter(
            "finetune_http_connections_dropped_total", "Connections the HTTP server dropped (server_limits.py): slow "
            "(no request head in time), evicted (idle at the connection limit), refused (all busy).", ["reason"],
            registry=r)
        self.job_gauges = {key: Gauge(name, help_, ["namespace", "name"], registry=r)
                           for key, (name, help_) in JOB_GAUGES.items()}
        self.stalled = Gauge("finetune_job_stalled", "1 while the job's Stalled condition is True (e.g. NoProgress).",
                             ["namespace", "name", "reason"], registry=r)
        # FineTuneSweeps (sweep_handlers.py): trials by state and the best metric per sweep, and phase changes.
        self.sweep_trials = Gauge("finetune_sweep_trials", "Trials of a FineTuneSweep, by state (running, "
                                  "succeeded, failed, pruned).", ["namespace", "name", "state"], registry=r)
        self.sweep_best = Gauge("finetune_sweep_best_metric", "The objective metric of the sweep's best trial.",
                                ["namespace", "name", "metric"], registry=r)
        self.sweep_transitions = Counter(
            "finetune_sweep_phase_transitions_total", "FineTuneSweep phase changes, by new phase and reason.",
            ["phase", "reason"], registry=r)
        self._sweeps: dict[tuple[str, str], tuple[str, str | None]] = {}  # phase, the best series' metric label
        self._stalled: dict[tuple[str, str], str] = {}
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase).set(0)

    def observe_progress(self, namespace: str, name: str, progress: dict[str, Any]) -> None:
        values = dict(progress)
        if "percent" in values:
            values["progress_ratio"] = values["percent"] / 100.0
        for key, gauge in self.job_gauges.items():
            if values.get(key) is not None:
                gauge.labels(namespace, name).set(float(values[key]))

    def observe_phase(self, namespace: str, name: str, phase: str, reason: str = "",
                      duration_seconds: float | None = None) -> None:
        """Record the job's current phase; counts a transition only when it changed."""
        key = (namespace, name)
        old = self._phases.get(key)
        if old == phase:
            return
        self._phases[key] = phase
        self.transitions.labels(phase, reason or "").inc()
        if phase in TERMINAL_PHASES and duration_seconds is not None:
            self.duration.labels(phase).observe(duration_seconds)
        self._recount()

    def observe_stalled(self, namespace: str, name: str, reason: str | None) -> None:
        """reason None clears the series; a reason sets it to 1 (one series per job at a time)."""
        key = (namespace, name)
        old = self._stalled.pop(key, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self.stalled.remove(namespace, name, old)
        if reason:
            self._stalled[key] = reason
            self.stalled.labels(namespace, name, reason).set(1)

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop its series and its phase count."""
        for gauge in self.job_gauges.values():
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        self.observe_stalled(namespace, name, None)
        self._phases.pop((namespace, name), None)
        self._recount()

    def observe_sweep(self, namespace: str, name: str, phase: str, reason: str, counts: dict[str, int],
                      metric: str, best: float | None) -> None:
        """One sweep's trial counts and best metric; a phase change is counted once."""
        key = (namespace, name)
        old_phase, old_metric = self._sweeps.get(key, ("", None))
        if phase != old_phase:
            self.sweep_transitions.labels(phase, reason).inc()
        for state, n in counts.items():
            self.sweep_trials.labels(namespace, name, state).set(n)
        if old_metric is not None and (best is None or old_metric != metric):
            with contextlib.suppress(KeyError):
                self.sweep_best.remove(namespace, name, old_metric)
        if best is not None:
            self.sweep_best.labels(namespace, name, metric).set(best)
        self._sweeps[key] = (phase, metric if best is not None else None)

    def forget_sweep(self, namespace: str, name: str, states: tuple[str, ...]) -> None:
        _, metric = self._sweeps.pop((namespace, name), ("", None))
        for state in states:
            with contextlib.suppress(KeyError):
                self.sweep_trials.remove(namespace, name, state)
        if metric is not None:
            with contextlib.suppress(KeyError):
                self.sweep_best.remove(namespace, name, metric)

    def _recount(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            self.jobs.labels(phase).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def metric_names(self) -> set[str]:
        """Every sample name this registry can expose (for the dashboard/rules reference test)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names = set()
        for family in self.registry.collect():
            names.update(family.name + sfx for sfx in suffixes.get(family.type, ("",)))
        return names
