"""The test split and the evaluation report of a real run: held out, written beside the export, reproducible
by `finetune-train evaluate`, and equal to scikit-learn's metrics on the same predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from trainer_util import make_image_folder, tiny_spec

from finetune_api.spec import parse_spec
from finetune_trainer.data import load_splits
from finetune_trainer.fit import fit
from finetune_trainer.predict import Predictor
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit
TRAINER = Path(sys.executable).with_name("finetune-train")
PNG = b"\x89PNG\r\n\x1a\n"


def test_test_fraction_is_held_out_before_val_stratified_and_seeded() -> None:
    spec = parse_spec({"dataset": {"builtin": "digits", "classes": ["0", "1", "2"], "testFraction": 0.2}})
    a, b = load_splits(spec.dataset, 0), load_splits(spec.dataset, 0)
    ids = {name: {id(s.pixels) for s in getattr(a, name)} for name in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    assert {s.label for s in a.test} == {0, 1, 2}
    assert [s.pixels.tobytes() for s in a.test] == [s.pixels.tobytes() for s in b.test]
    total = len(a.train) + len(a.val) + len(a.test)
    assert abs(len(a.test) / total - 0.2) < 0.02
    without = load_splits(parse_spec({"dataset": {"builtin": "digits", "classes": ["0", "1", "2"]}}).dataset, 0)
    assert without.test == [] and len(without.train) + len(without.val) == total


def test_a_test_folder_is_the_test_split(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        make_image_folder(tmp_path / split, {"a": n, "b": n}, seed=len(split))
    spec = parse_spec({"dataset": {"path": str(tmp_path)}})
    splits = load_splits(spec.dataset, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 8)
    assert all("/test/" in s.path for s in splits.test) and "test/" in splits.source


@pytest.mark.slow
def test_the_report_matches_sklearn_and_evaluate_reproduces_the_test_accuracy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split, n in (("train", 24), ("val", 8), ("test", 10)):
        make_image_folder(data / split, {"a": n, "b": n, "c": n}, size=16, seed=len(split))
    out = tmp_path / "out"
    spec = tiny_spec(out, **{"dataset": {"path": str(data), "imageSize": 16}, "training.epochs": 3,
                             "training.precision": "fp32"})
    result = fit(spec, Reporter(), out)
    meta = json.loads((out / "model.json").read_text())
    report = json.loads((out / "evaluation.json").read_text())
    assert report["split"] == "test" and report["samples"] == 30
    assert result.test_accuracy == meta["metrics"]["testAccuracy"] == report["accuracy"]
    assert meta["dataset"]["test"] == 30 and meta["evaluation"]["files"]["report"] == "evaluation.json"

    # The same predictions, made independently from the export, scored by scikit-learn.
    predictor = Predictor.load(out)
    paths = sorted((data / "test").rglob("*.png"))
    labels = np.array([predictor.classes.index(p.parent.name) for p in paths])
    preds = np.array([predictor.classes.index(top[0][0]) for top in
                      predictor.predict([Image.open(p) for p in paths])])
    assert report["confusionMatrix"]["matrix"] == confusion_matrix(labels, preds, labels=range(3)).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=range(3), zero_division=0)
    for k, row in enumerate(report["perClass"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[k], recall[k], f1[k], support[k]), abs=1e-12)

    for name in ("confusion_matrix.png", "training_curves.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG) and len(png) > 1000
        Image.open(out / name).verify()

    run = subprocess.run([str(TRAINER), "evaluate", "--model", str(out), "--data", str(data / "test"),
                          "--report-dir", str(tmp_path / "again")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert again["accuracy"] == report["accuracy"] and again["confusionMatrix"] == report["confusionMatrix"]
    assert "test accuracy" in run.stdout or "accuracy" in run.stdout
    assert (tmp_path / "again" / "confusion_matrix.png").read_bytes().startswith(PNG)


def test_evaluate_refuses_a_folder_with_classes_the_model_does_not_know(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fit(tiny_spec(out, **{"training.epochs": 1}), Reporter(), out)
    make_image_folder(tmp_path / "other", {"0": 2, "zebra": 2})
    run = subprocess.run([str(TRAINER), "evaluate", "--model", str(out), "--data", str(tmp_path / "other")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: invalid job: --data: class folder(s) ['zebra']")
    report = json.loads((out / "evaluation.json").read_text())
    assert report["split"] == "val"  # no test split: the report says it is on val
