"""FineTuneSweep's spec and search: grid order, seeded repeats, refusals before any trial, median stopping, best."""

from __future__ import annotations

import itertools

import pytest

from finetune_api import search
from finetune_api.errors import JobFileError
from finetune_api.search import TrialView
from finetune_api.sweep import check_path, parse_sweep, parse_sweep_spec, trial_job_spec, trial_name

TEMPLATE = {"spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 4}, "output": {"path": "/out"}}}


def sweep(parameters, algorithm=None, **rest):
    return parse_sweep_spec({"template": TEMPLATE, "parameters": parameters,
                             **({"algorithm": algorithm} if algorithm else {}), **rest})


MIXED = [{"path": "training.learningRate", "logUniform": {"low": 1e-4, "high": 1e-1}},
         {"path": "head.dropout", "uniform": {"low": 0.0, "high": 0.5}},
         {"path": "training.optimizer", "categorical": ["adam", "sgd", "adamw"]},
         {"path": "training.batchSize", "int": {"low": 8, "high": 64, "step": 8}}]


def test_grid_enumerates_exactly_the_grid_in_order():
    s = sweep([{"path": "training.optimizer", "categorical": ["adam", "sgd"]},
               {"path": "training.batchSize", "int": {"low": 16, "high": 48, "step": 16}},
               {"path": "head.dropout", "categorical": [0.0, 0.5]}], {"grid": {}}, trials={"max": 100})
    assert s.total_trials() == 12  # the grid's size, not trials.max
    points = [search.suggest(s, i, []) for i in range(s.total_trials())]
    expected = [dict(zip(["training.optimizer", "training.batchSize", "head.dropout"], p, strict=True))
                for p in itertools.product(["adam", "sgd"], [16, 32, 48], [0.0, 0.5])]
    assert points == expected
    with pytest.raises(IndexError):
        search.grid_point(s.parameters, 12)


def test_grid_refuses_a_continuous_range():
    with pytest.raises(JobFileError, match=r"head\.dropout is a continuous range"):
        sweep([{"path": "head.dropout", "uniform": {"low": 0.0, "high": 0.5}}], {"grid": {}})


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_random_and_tpe_repeat_under_a_seed_and_differ_across_seeds(algorithm):
    def run(seed):
        s = sweep(MIXED, {algorithm: {"seed": seed}}, trials={"max": 12})
        history = []
        for i in range(12):
            values = search.suggest(s, i, history)
            # a made-up objective, so TPE (after its random start-up trials) has something to learn from
            history.append(TrialView(i, values, search.SUCCEEDED, metric=-abs(values["training.learningRate"] - 0.01)))
        return [t.values for t in history]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    for values in first:  # every value inside its range, of its type
        assert 1e-4 <= values["training.learningRate"] <= 1e-1
        assert 0.0 <= values["head.dropout"] <= 0.5
        assert values["training.optimizer"] in ("adam", "sgd", "adamw")
        assert values["training.batchSize"] in range(8, 65, 8) and isinstance(values["training.batchSize"], int)


def test_a_trials_values_do_not_depend_on_later_trials():
    s = sweep(MIXED, {"tpe": {"seed": 3}})
    history = [TrialView(i, search.suggest(s, i, []), search.SUCCEEDED, metric=0.1 * i) for i in range(3)]
    later = TrialView(5, search.suggest(s, 5, history), search.SUCCEEDED, metric=0.9)
    assert search.suggest(s, 3, history) == search.suggest(s, 3, [*history, later])


@pytest.mark.parametrize("parameter, message", [
    ({"path": "training.learningRat", "uniform": {"low": 0.1, "high": 0.2}}, "training has no field 'learningRat'"),
    ({"path": "trainer.epochs", "int": {"low": 1, "high": 3}}, "spec has no field 'trainer'"),
    ({"path": "training", "categorical": [1]}, "training is an object"),
    ({"path": "training.epochs.value", "categorical": [1]}, "training.epochs is not an object"),
    ({"path": "head.dropout", "uniform": {"low": 0.1, "high": 1.5}}, r"parameters\[0\] \(head.dropout\): the value "
                                                                      r"1.5 makes an invalid trial"),
    ({"path": "training.warmupEpochs", "int": {"low": 0, "high": 6}}, "the value 6 makes an invalid trial"),
    ({"path": "training.optimizer", "categorical": ["adam", "lion"]}, "the value 'lion' makes an invalid trial"),
    ({"path": "head.dropout", "uniform": {"low": 0.5, "high": 0.1}}, "low .* must be below high"),
    ({"path": "training.learningRate", "logUniform": {"low": 0, "high": 0.1}}, "logUniform.low must be above 0"),
    ({"path": "head.dropout", "categorical": [0.1], "uniform": {"low": 0, "high": 1}}, "exactly one of"),
])
def test_a_bad_path_or_range_is_refused_by_name_before_any_trial(parameter, message):
    with pytest.raises(JobFileError, match=message) as err:
        sweep([parameter])
    assert "\n" not in str(err.value)


def test_every_field_path_of_the_spec_is_accepted():
    for path in ("training.learningRate", "freeze.policy", "head.dropout", "head.hiddenUnits",
                 "dataset.augment.rotation", "model.architecture", "training.ema.decay"):
        check_path(path)


def test_a_trial_gets_its_own_output_folder_and_the_shared_cache():
    s = sweep([{"path": "head.dropout", "categorical": [0.2]}])
    spec = trial_job_spec(s, trial_name("tune", 7), {"head.dropout": 0.2})
    assert spec.output.path == "/out/tune-007"
    assert spec.training.feature_cache_dir == "/out/feature-cache"
    assert spec.head.dropout == 0.2


def test_a_sweep_file_names_its_kind():
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "s1"},
           "spec": {"template": TEMPLATE, "parameters": MIXED[:1]}}
    assert parse_sweep(doc).name == "s1"
    with pytest.raises(JobFileError, match="kind: expected 'FineTuneSweep'"):
        parse_sweep({**doc, "kind": "FineTuneJob"})


def _running(index, **epochs):
    return TrialView(index, {}, search.RUNNING, intermediate={int(e[1:]): v for e, v in epochs.items()})


def test_median_stopping_prunes_exactly_the_trials_below_the_median_at_the_epoch():
    s = sweep(MIXED[:1], pruning={"medianStop": {"startEpoch": 2, "minTrials": 3}})
    history = [
        TrialView(0, {}, search.SUCCEEDED, 0.9, {1: 0.5, 2: 0.80, 3: 0.9}),
        TrialView(1, {}, search.SUCCEEDED, 0.7, {1: 0.4, 2: 0.60, 3: 0.7}),
        TrialView(2, {}, search.PRUNED, None, {1: 0.3, 2: 0.40}),
        _running(3, e1=0.9, e2=0.55),  # below the median of the others (0.60): pruned
        _running(4, e1=0.1, e2=0.60),  # equal to the median of the others: kept
        _running(5, e1=0.9),  # has not reached epoch 2: not judged yet
        _running(6, e1=0.2, e3=0.99),  # epoch 2 not observed: judged on epoch 3, above the median
    ]
    pruned = search.to_prune(s, history)
    # medians of the others at epoch 2: for 3 → [0.8, 0.6, 0.4, 0.6, 0.99] → 0.6 (0.55 is below: pruned); for 4 →
    # [0.8, 0.6, 0.4, 0.55, 0.99] → 0.6 (equal: kept); for 6 → [0.8, 0.6, 0.4, 0.55, 0.6] → 0.6 (0.99: kept)
    assert set(pruned) == {3}
    assert "epoch 2" in pruned[3] and "median 0.6" in pruned[3]


def test_median_stopping_waits_for_min_trials_and_minimises_a_loss():
    s = sweep(MIXED[:1], objective={"metric": "valLoss"}, pruning={"medianStop": {"startEpoch": 1, "minTrials": 2}})
    assert s.objective.maximize is False
    one = [TrialView(0, {}, search.SUCCEEDED, 0.3, {1: 0.3}), _running(1, e1=0.9)]
    assert search.to_prune(s, one) == {}  # one other trial only
    two = [*one, TrialView(2, {}, search.SUCCEEDED, 0.5, {1: 0.5})]
    assert set(search.to_prune(s, two)) == {1}  # a higher loss than the median (0.4)


def test_best_is_the_succeeded_trial_with_the_best_metric():
    s = sweep(MIXED[:1])
    history = [TrialView(0, {}, search.SUCCEEDED, 0.7), TrialView(1, {}, search.FAILED),
               TrialView(2, {}, search.SUCCEEDED, 0.9), TrialView(3, {}, search.SUCCEEDED, 0.9),
               TrialView(4, {}, search.PRUNED, None, {1: 0.99}), _running(5, e1=0.99)]
    assert search.best(s, history).index == 2  # the earlier of the two 0.9s
    loss = sweep(MIXED[:1], objective={"metric": "valLoss"})
    assert search.best(loss, history).index == 0
    assert search.best(s, history[1:2]) is None
