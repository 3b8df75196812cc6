"""What a FineTuneSweep runs next and what it stops: the search, rebuilt from the trials on every call.

Level-based like the rest of the operator: nothing is remembered between calls. Each call rebuilds an
in-memory Optuna study from the trials recorded so far (their values, states and per-epoch metrics) and
asks it for trial `index`; the sampler is seeded from (algorithm seed, index), so a trial's values
depend only on the seed, its index and the trials before it — a restarted operator asks again and gets
the same answer, and a restart never needs a database. Grid enumerates the product itself, in order,
so trial i is always the i-th combination.

Optuna is imported lazily: `import finetune_api` stays as light as the spec.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

from finetune_api.sweep import FineTuneSweepSpec, Parameter, Scalar

RUNNING, SUCCEEDED, FAILED, PRUNED = "Running", "Succeeded", "Failed", "Pruned"


@dataclass
class TrialView:
    """What the search needs of one trial: its values, its state, its final and per-epoch metric."""

    index: int
    values: dict[str, Scalar]
    state: str = RUNNING  # Running (also pending) | Succeeded | Failed | Pruned
    metric: float | None = None
    intermediate: dict[int, float] = field(default_factory=dict)


def suggest(sweep: FineTuneSweepSpec, index: int, history: list[TrialView]) -> dict[str, Scalar]:
    """The values of trial `index` (0-based), given the trials that exist."""
    if sweep.algorithm.grid is not None:
        return grid_point(sweep.parameters, index)
    import optuna  # lazily: only sweeps need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = trial_seed(sweep.algorithm.seed, index)
    if sweep.algorithm.tpe is not None:
        # constant_liar: running trials count as bad guesses, so parallel trials do not crowd one spot.
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize" if sweep.objective.maximize else "minimize", sampler=sampler)
    dists = distributions(sweep.parameters)
    for t in sorted(history, key=lambda t: t.index):
        if t.index >= index:
            continue  # a later trial never influences an earlier one: answers stay the same on a re-ask
        study.add_trial(_frozen(optuna, t, dists))
    trial = study.ask(fixed_distributions=dists)
    return {p.path: _plain(trial.params[p.path]) for p in sweep.parameters}


def trial_seed(seed: int, index: int) -> int:
    """A seed per trial: mixing (seed, index) through a hash, so trial i of seed s is not trial i+1 of s-1."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def grid_point(parameters: list[Parameter], index: int) -> dict[str, Scalar]:
    """The index-th combination of the grid, the last parameter varying fastest."""
    axes = [p.grid_values() for p in parameters]
    point = next(itertools.islice(itertools.product(*axes), index, None), None)
    if point is None:
        raise IndexError(f"grid has only {len(list(itertools.product(*axes)))} points")
    return {p.path: v for p, v in zip(parameters, point, strict=True)}


def distributions(parameters: list[Parameter]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in parameters:
        if p.categorical is not None:
            out[p.path] = CategoricalDistribution(p.categorical)
        elif p.int_range is not None:
            high = p.int_range.values()[-1]  # Optuna wants high on the step grid
            out[p.path] = IntDistribution(p.int_range.low, high, step=p.int_range.step)
        else:
            bounds = p.uniform or p.log_uniform
            assert bounds is not None
            out[p.path] = FloatDistribution(bounds.low, bounds.high, log=p.log_uniform is not None)
    return out


def _frozen(optuna: Any, t: TrialView, dists: dict[str, Any]) -> Any:
    state = {SUCCEEDED: optuna.trial.TrialState.COMPLETE, FAILED: optuna.trial.TrialState.FAIL,
             PRUNED: optuna.trial.TrialState.PRUNED}.get(t.state, optuna.trial.TrialState.RUNNING)
    if state == optuna.trial.TrialState.COMPLETE and t.metric is None:
        state = optuna.trial.TrialState.FAIL  # succeeded without the objective's metric: nothing to learn from
    params = {k: v for k, v in t.values.items() if k in dists and v in _choices(dists[k], v)}
    return optuna.trial.create_trial(
        params=params, distributions={k: dists[k] for k in params},
        value=t.metric if state == optuna.trial.TrialState.COMPLETE else None,
        intermediate_values=dict(t.intermediate), state=state)


def _choices(dist: Any, value: Any) -> Any:
    """Values a trial recorded under an older spec may be outside today's ranges: such params are left out."""
    if hasattr(dist, "choices"):
        return dist.choices
    try:
        return [value] if dist.low <= value <= dist.high else []
    except TypeError:
        return []


def _plain(value: Any) -> Scalar:
    """numpy scalars from a sampler become plain Python values (they go into YAML and JSON)."""
    return value.item() if hasattr(value, "item") else value


def to_prune(sweep: FineTuneSweepSpec, history: list[TrialView]) -> dict[int, str]:
    """Running trials that median stopping stops now: index → why.

    A trial is judged on its metric at startEpoch (the first epoch seen after it, when that one was not
    observed) against the median of every other trial's metric at that epoch, once at least minTrials
    others have one. Worse than the median (strictly) is pruned; equal to it is kept.
    """
    rule = sweep.pruning.median_stop
    if rule is None:
        return {}
    at = {t.index: v for t in history if (v := value_at(t, rule.start_epoch)) is not None}
    out: dict[int, str] = {}
    for t in history:
        if t.state != RUNNING or t.index not in at:
            continue
        others = [v for i, v in at.items() if i != t.index]
        if len(others) < rule.min_trials:
            continue
        median = statistics.median(others)
        if sweep.objective.better(median, at[t.index]):
            out[t.index] = (f"{sweep.objective.metric} {at[t.index]:.4g} at epoch {rule.start_epoch} is worse than "
                            f"the median {median:.4g} of {len(others)} other trials")
    return out


def value_at(t: TrialView, epoch: int) -> float | None:
    later = sorted(e for e in t.intermediate if e >= epoch)
    return t.intermediate[later[0]] if later else None


def best(sweep: FineTuneSweepSpec, history: list[TrialView]) -> TrialView | None:
    """The succeeded trial with the best metric (the lower index on a tie)."""
    done = [t for t in sorted(history, key=lambda t: t.index) if t.state == SUCCEEDED and t.metric is not None]
    top: TrialView | None = None
    for t in done:
        if top is None or sweep.objective.better(t.metric, top.metric):  # type: ignore[arg-type]
            top = t
    return top
