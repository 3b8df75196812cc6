"""`finetune-train sweep`: trials share one frozen pass, best/ is the best trial's export, pruning, maxFailed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from trainer_util import make_image_folder

from finetune_api.errors import EXIT_OK, EXIT_RUNTIME_ERROR
from finetune_api.sweep import parse_sweep, trial_job_spec
from finetune_trainer import cli, feature_store
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

TEMPLATE = {
    "model": {"architecture": "resnet18", "weights": {"source": "none"}},
    "dataset": {"builtin": "digits", "classes": ["0", "1", "2"], "imageSize": 16, "maxImagesPerClass": 40},
    "freeze": {"policy": "head"},
    "training": {"epochs": 2, "batchSize": 32, "device": "cpu", "seed": 0, "precision": "fp32"},
}


def write_sweep(tmp_path: Path, parameters, template=None, **rest) -> Path:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "tune"},
           "spec": {"template": {"spec": {**(template or TEMPLATE), "output": {"path": str(tmp_path / "out")}}},
                    "parameters": parameters, **rest}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def model_json(out: Path, trial: str) -> dict:
    return json.loads((out / trial / "model.json").read_text())


def test_trials_share_one_frozen_pass_and_best_is_the_best_trials_export(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"path": "training.learningRate", "categorical": [0.0001, 0.05, 0.01]},
                                  {"path": "head.dropout", "categorical": [0.0]}], algorithm={"grid": {}})
    assert cli.main(["sweep", "-f", str(path)]) == EXIT_OK
    out = tmp_path / "out"
    trials = [f"tune-{i:03d}" for i in range(3)]
    stored = [model_json(out, t)["featureCache"]["stored"] for t in trials]
    assert stored == ["written", "reused", "reused"]  # one frozen pass for the three trials
    # kept after the exports, for the others: the train/val pass and the final evaluation's (val here: no test split)
    assert len(list((out / "feature-cache").glob("features-*.pt"))) == 2
    doc = json.loads((out / "sweep.json").read_text())
    metrics = {t["name"]: t["metric"] for t in doc["trials"]}
    best = max(metrics, key=metrics.get)
    assert doc["best"]["trial"] == best and doc["best"]["metric"] == metrics[best]
    assert doc["best"]["sha256"] == model_json(out, best)["sha256"] == model_json(out, "best")["sha256"]
    assert doc["counts"] == {"Succeeded": 3, "Failed": 0, "Pruned": 0}
    # Trials keep their evaluation's numbers; its pictures are drawn for best/ and listed in its model.json.
    for t in trials:
        assert (out / t / "evaluation.json").exists() and not list((out / t).glob("*.png"))
        assert set(model_json(out, t)["evaluation"]["files"]) == {"report"}
    assert set(model_json(out, "best")["evaluation"]["files"]) == {"report", "confusionMatrix", "trainingCurves"}
    assert all((out / "best" / f).stat().st_size > 0 for f in model_json(out, "best")["evaluation"]["files"].values())
    assert f"best trial {best}" in capsys.readouterr().err

    # Run again: every trial's folder holds its finished export, so nothing trains and the answer is the same.
    assert cli.main(["sweep", "-f", str(path)]) == EXIT_OK
    again = json.loads((out / "sweep.json").read_text())
    assert [t["reason"] for t in again["trials"]] == ["reused a finished export"] * 3
    assert again["best"] == doc["best"]


def test_median_stopping_prunes_the_trials_below_the_median(tmp_path):
    # Stripes whose place gives the class: 0.05, 0.03 and 0.04 learn them in an epoch, 1e-7 learns nothing.
    data = make_image_folder(tmp_path / "data", {"a": 30, "b": 30, "c": 30})
    template = {**TEMPLATE, "dataset": {"path": str(data), "imageSize": 16},
                "training": {**TEMPLATE["training"], "epochs": 3}}
    path = write_sweep(tmp_path, [{"path": "training.learningRate", "categorical": [0.05, 0.03, 1e-7, 0.04]}],
                       template=template,
                       algorithm={"grid": {}}, pruning={"medianStop": {"startEpoch": 1, "minTrials": 2}})
    assert cli.main(["sweep", "-f", str(path)]) == EXIT_OK
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    trials = doc["trials"]
    # One after another: when trial i reports epoch 1, the trials before it are the others.
    expected = set()
    for i, t in enumerate(trials):
        others = [u["intermediate"]["1"] for u in trials[:i]]
        if len(others) >= 2 and t["intermediate"]["1"] < statistics.median(others):
            expected.add(t["name"])
    pruned = {t["name"] for t in trials if t["state"] == "Pruned"}
    assert pruned == expected and "tune-002" in pruned
    for t in trials:
        if t["name"] in pruned:
            assert t["reason"].startswith("Pruned: valAccuracy") and t["epoch"] == 1
            assert not (tmp_path / "out" / t["name"] / "model.safetensors").exists()
        else:
            assert t["state"] == "Succeeded" and t["epoch"] == 3


def test_more_failed_trials_than_max_failed_fail_the_sweep(tmp_path, capsys):
    # Valid specs that fail in the trainer: the weights files do not exist.
    template = {**TEMPLATE, "model": {"architecture": "resnet18", "weights": {"source": "file",
                                                                               "path": str(tmp_path / "no.pt")}}}
    path = write_sweep(tmp_path, [{"path": "model.weights.path", "categorical": [str(tmp_path / "a.pt"),
                                                                                 str(tmp_path / "b.pt")]}],
                       template=template, algorithm={"grid": {}}, trials={"max": 2, "maxFailed": 1})
    assert cli.main(["sweep", "-f", str(path)]) == EXIT_RUNTIME_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: failed: sweep tune: no trial succeeded (TooManyFailedTrials: 2 trials failed")
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert doc["counts"]["Failed"] == 2 and doc["best"] is None
    assert all("a.pt" in t["reason"] or "b.pt" in t["reason"] for t in doc["trials"])


def test_parallel_worker_processes_compute_the_shared_features_once(tmp_path):
    path = write_sweep(tmp_path, [{"path": "head.dropout", "categorical": [0.0, 0.3]}], algorithm={"grid": {}},
                       trials={"max": 2, "parallel": 2})
    assert cli.main(["sweep", "-f", str(path), "--parallel", "2"]) == EXIT_OK
    out = tmp_path / "out"
    stored = sorted(model_json(out, f"tune-{i:03d}")["featureCache"]["stored"] for i in range(2))
    assert stored == ["reused", "written"]  # the second waited on the lock, then read the first one's file


def test_a_shared_cache_file_whose_tensors_changed_is_not_trusted(tmp_path):
    x, y = torch.randn(4, 3), torch.arange(4)
    path = feature_store.save(tmp_path, "k" * 64, (x, y), (x, y), shared=tmp_path / "shared")
    assert feature_store.load(tmp_path, "k" * 64, shared=tmp_path / "shared") is not None
    data = torch.load(path, weights_only=True)
    data["trainX"][0, 0] += 1.0  # same key, same digest field, other numbers
    torch.save(data, path)
    assert feature_store.load(tmp_path, "k" * 64, shared=tmp_path / "shared") is None
    # Files of other keys in a shared folder belong to other jobs: saving a new key keeps them.
    feature_store.save(tmp_path, "m" * 64, (x, y), (x, y), shared=tmp_path / "shared")
    assert path.exists()


@pytest.mark.parametrize("argv, message", [
    (["--parallel", "0"], "--parallel must be at least 1"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    path = write_sweep(tmp_path, [{"path": "head.dropout", "categorical": [0.0]}])
    assert cli.main(["sweep", "-f", str(path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_final_evaluation_shares_the_frozen_pass_and_matches_the_whole_model(tmp_path):
    data = make_image_folder(tmp_path / "data", {"a": 24, "b": 24, "c": 24})
    template = {**TEMPLATE, "dataset": {"path": str(data), "imageSize": 16, "testFraction": 0.25},
                "training": {**TEMPLATE["training"], "precision": "auto"}}
    path = write_sweep(tmp_path, [{"path": "head.dropout", "categorical": [0.0, 0.4]}], template=template,
                       algorithm={"grid": {}})
    assert cli.main(["sweep", "-f", str(path)]) == EXIT_OK
    out = tmp_path / "out"
    assert len(list((out / "feature-cache").glob("features-*.pt"))) == 2  # the train/val pass and the test split's
    # The second trial's report came from the shared outputs; the same trial run alone, through the whole model:
    spec = trial_job_spec(parse_sweep(yaml.safe_load(path.read_text())).spec, "tune-001", {"head.dropout": 0.4})
    alone = spec.model_copy(deep=True)
    alone.training.feature_cache_dir = None
    alone.output.path = str(tmp_path / "alone")
    fit(alone, Reporter(), tmp_path / "alone", name="alone")
    shared, whole = (json.loads((p / "evaluation.json").read_text()) for p in (out / "tune-001", tmp_path / "alone"))
    assert shared["split"] == whole["split"] == "test"
    for key in ("accuracy", "perClass", "confusionMatrix", "samples"):
        assert shared[key] == whole[key], key
