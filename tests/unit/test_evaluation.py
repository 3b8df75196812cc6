"""The evaluation report against scikit-learn and hand-computed cases; the plots as real PNG files."""

import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finetune_trainer.evaluation import _calibration, evaluation_report, summary_line
from finetune_trainer.plots import plot_confusion_matrix, plot_training_curves

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOL = 1e-12


def close(value):
    return pytest.approx(value, abs=TOL, rel=0)


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def random_case(seed, c, n=300, degenerate=False):
    """Seeded labels and probabilities; degenerate adds a never-predicted class and a zero-support class.

    For C > 2 class 1 is both (precision, recall and F1 all undefined); the never-predicted class keeps a
    probability well above 1e-12 (its logit sits just under the row minimum), so log loss clipping never differs.
    """
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, c))
    absent = {0, 1} if c > 2 else {0}
    never = {c - 1, 1} if c > 2 else {c - 1}
    if degenerate:
        for k in never:
            logits[:, k] = np.delete(logits, list(never), axis=1).min(axis=1) - 1.0
    allowed = [k for k in range(c) if not (degenerate and k in absent)]
    labels = rng.choice(allowed, size=n)
    # Push some rows toward the truth so accuracy is neither trivial nor zero.
    boost = rng.random(n) < 0.4
    if not degenerate:
        logits[boost, labels[boost]] += 3.0
    return labels, softmax(logits)


def names(c):
    return [f"class_{i}" for i in range(c)]


def sklearn_top_k(labels, probs, k):
    c = probs.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k >= C warns "perfect score"; that is the point of the case
        if c == 2:  # sklearn wants the positive-class column in the binary case
            return top_k_accuracy_score(labels, probs[:, 1], k=k, labels=range(c))
        return top_k_accuracy_score(labels, probs, k=k, labels=range(c))


def reference_ece(labels, probs, bins):
    """The textbook definition, one sample at a time, for comparison with the vectorised code."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    members = [[] for _ in range(bins)]
    for y, row in zip(labels, probs, strict=True):
        conf = float(max(row))
        pred = int(np.argmax(row))
        for b in range(bins):
            if edges[b] < conf <= edges[b + 1] or (b == 0 and conf == 0.0):
                members[b].append((conf, float(pred == y)))
                break
    ece, table = 0.0, []
    for b, group in enumerate(members):
        if group:
            acc = sum(hit for _, hit in group) / len(group)
            conf = sum(c for c, _ in group) / len(group)
            ece += len(group) / len(labels) * abs(acc - conf)
            table.append((edges[b], edges[b + 1], len(group), acc, conf))
    return ece, table


CASES = [(seed, c, degenerate) for seed in (0, 1, 2) for c in (2, 5, 12) for degenerate in (False, True)]


@pytest.mark.parametrize(("seed", "c", "degenerate"), CASES)
def test_every_number_matches_scikit_learn(seed, c, degenerate):
    labels, probs = random_case(seed, c, degenerate=degenerate)
    preds = probs.argmax(axis=1)
    if degenerate:
        assert c - 1 not in preds and 0 not in labels  # the case really has the degenerate classes
    report = evaluation_report(labels, probs, names(c), top_k=3)

    assert report["samples"] == len(labels)
    assert report["accuracy"] == close(accuracy_score(labels, preds))
    assert report["topK"]["k"] == min(3, c)
    assert report["topK"]["accuracy"] == close(sklearn_top_k(labels, probs, min(3, c)))
    assert report["logLoss"] == close(log_loss(labels, probs, labels=range(c)))
    assert report["confusionMatrix"]["labels"] == names(c)
    assert report["confusionMatrix"]["matrix"] == confusion_matrix(labels, preds, labels=range(c)).tolist()

    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=range(c), zero_division=0)
    assert [row["class"] for row in report["perClass"]] == names(c)
    for i, row in enumerate(report["perClass"]):
        assert row["precision"] == close(precision[i])
        assert row["recall"] == close(recall[i])
        assert row["f1"] == close(f1[i])
        assert row["support"] == support[i]

    sk = classification_report(labels, preds, labels=range(c), output_dict=True, zero_division=0)
    for ours, theirs in ((report["macroAvg"], sk["macro avg"]), (report["weightedAvg"], sk["weighted avg"])):
        assert ours["precision"] == close(theirs["precision"])
        assert ours["recall"] == close(theirs["recall"])
        assert ours["f1"] == close(theirs["f1-score"])
        assert ours["support"] == theirs["support"]


@pytest.mark.parametrize("c", [2, 5, 12])
@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_top_k_matches_scikit_learn_for_every_k(c, k):
    labels, probs = random_case(7, c)
    report = evaluation_report(labels, probs, names(c), top_k=k)
    assert report["topK"]["k"] == min(k, c)
    assert report["topK"]["accuracy"] == close(sklearn_top_k(labels, probs, min(k, c)))
    if k == 1:
        assert report["topK"]["accuracy"] == report["accuracy"]


def test_top_k_breaks_ties_toward_the_lower_index_like_argmax():
    # Exact ties never occur in the random cases; here sklearn's reversed argsort would rank class 1 or 2 first.
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.3, 0.3]])
    one = evaluation_report(np.array([1, 0]), probs, list("abc"), top_k=1)
    assert one["accuracy"] == one["topK"]["accuracy"] == 0.5
    two = evaluation_report(np.array([1, 2]), probs, list("abc"), top_k=2)
    assert two["topK"]["accuracy"] == 0.5  # row 2 ranks (a, b): c, tied with b, comes after it


@pytest.mark.parametrize(("seed", "c", "degenerate"), CASES)
@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_and_calibration_table_match_a_per_sample_loop(seed, c, degenerate, bins):
    labels, probs = random_case(seed, c, degenerate=degenerate)
    report = evaluation_report(labels, probs, names(c), bins=bins)
    ece, table = reference_ece(labels, probs, bins)
    assert report["expectedCalibrationError"] == close(ece)
    assert len(report["calibration"]) == len(table)
    for row, (lower, upper, count, acc, conf) in zip(report["calibration"], table, strict=True):
        assert (row["lower"], row["upper"], row["count"]) == (lower, upper, count)
        assert row["accuracy"] == close(acc)
        assert row["confidence"] == close(conf)
    assert sum(row["count"] for row in report["calibration"]) == len(labels)


def test_ece_hand_computed_four_samples():
    # conf .9 right, .8 wrong, .6 right -> bin (.5, 1]: acc 2/3, conf 2.3/3; conf .5 (an upper edge) wrong -> (0, .5]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 1])
    report = evaluation_report(labels, probs, ["a", "b"], bins=2)
    assert report["expectedCalibrationError"] == close(0.25 * 0.5 + 0.75 * abs(2 / 3 - 2.3 / 3))
    assert report["expectedCalibrationError"] == close(0.2)
    low, high = report["calibration"]
    assert (low["lower"], low["upper"], low["count"], low["accuracy"]) == (0.0, 0.5, 1, 0.0)
    assert low["confidence"] == close(0.5)
    assert (high["lower"], high["upper"], high["count"]) == (0.5, 1.0, 3)
    assert high["accuracy"] == close(2 / 3)
    assert high["confidence"] == close(2.3 / 3)


def test_confidence_on_an_edge_belongs_to_the_bin_it_closes():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    report = evaluation_report(np.array([0, 0, 0]), probs, list("abcd"), bins=4)
    assert [(row["upper"], row["count"]) for row in report["calibration"]] == [(0.25, 1), (0.75, 1), (1.0, 1)]
    # Confidence 0 cannot come from a probability row, so the rule is checked on the helper itself.
    _, table = _calibration(np.array([0.0, 0.1]), np.array([False, True]), bins=4)
    assert table == [{"lower": 0.0, "upper": 0.25, "count": 2, "accuracy": 0.5, "confidence": 0.05}]


def test_ece_extremes():
    right = np.eye(3)[[0, 1, 2, 0]]
    assert evaluation_report(np.array([0, 1, 2, 0]), right, list("abc"))["expectedCalibrationError"] == 0.0
    # Calibrated below 1: confidence .75 everywhere and exactly 3 of 4 right.
    probs = np.array([[0.75, 0.25]] * 4)
    assert evaluation_report(np.array([0, 0, 0, 1]), probs, ["a", "b"])["expectedCalibrationError"] == close(0.0)
    # Fully overconfident: certain and always wrong.
    assert evaluation_report(np.array([1, 2, 0, 1]), right, list("abc"))["expectedCalibrationError"] == 1.0
    wrong = np.array([[0.9, 0.1]] * 5)
    assert evaluation_report(np.ones(5, dtype=int), wrong, ["a", "b"])["expectedCalibrationError"] == close(0.9)


def confusion_case():
    pairs = [(0, 1)] * 3 + [(2, 3)] * 3 + [(1, 0)] + [(3, 2)] * 2 + [(0, 2)] + [(0, 0)] * 5 + [(1, 1)] * 4 + [(3, 3)]
    labels = np.array([t for t, _ in pairs])
    probs = np.eye(4)[[p for _, p in pairs]] * 0.94 + 0.015
    return labels, probs


def test_most_confused_orders_by_count_then_true_then_predicted_index():
    labels, probs = confusion_case()
    report = evaluation_report(labels, probs, ["cat", "dog", "fox", "owl"])
    assert [(p["true"], p["predicted"], p["count"]) for p in report["mostConfused"]] == [
        ("cat", "dog", 3), ("fox", "owl", 3), ("owl", "fox", 2), ("cat", "fox", 1), ("dog", "cat", 1)]
    top_two = evaluation_report(labels, probs, list("abcd"), most_confused=2)["mostConfused"]
    assert [(p["true"], p["predicted"]) for p in top_two] == [("a", "b"), ("c", "d")]
    assert evaluation_report(labels, probs, list("abcd"), most_confused=0)["mostConfused"] == []
    assert evaluation_report(np.array([0, 1]), np.eye(2), ["a", "b"])["mostConfused"] == []


def test_summary_line_mentions_accuracy_top_k_and_the_worst_pair():
    labels, probs = confusion_case()
    report = evaluation_report(labels, probs, ["cat", "dog", "fox", "owl"], top_k=2)
    line = summary_line(report)
    assert "\n" not in line
    assert line.startswith("test accuracy 50.0% (top-2 ")
    assert "on 20 images" in line and "macro F1 " in line and "ECE " in line
    assert line.endswith("most confused: cat→dog (3)")
    assert summary_line(report, split="val").startswith("val accuracy 50.0%")
    perfect = summary_line(evaluation_report(np.array([0, 1]), np.eye(2), ["a", "b"], top_k=1))
    assert "top-" not in perfect and perfect.endswith("most confused: none")


def plain(value):
    """True when value holds only the JSON types themselves (np.float64 subclasses float, so check exact types)."""
    if type(value) is dict:
        return all(type(k) is str and plain(v) for k, v in value.items())
    if type(value) is list:
        return all(plain(v) for v in value)
    return type(value) in (str, int, float, bool)


def test_report_is_plain_json_and_accepts_lists_and_float32():
    labels, probs = random_case(3, 5, degenerate=True)
    report = evaluation_report(labels, probs.astype(np.float32), names(5))
    assert plain(report)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert set(report) == {"samples", "accuracy", "topK", "logLoss", "confusionMatrix", "perClass", "macroAvg",
                           "weightedAvg", "expectedCalibrationError", "calibration", "mostConfused"}
    from_lists = evaluation_report(labels.tolist(), probs.tolist(), names(5))
    assert from_lists["confusionMatrix"] == evaluation_report(labels, probs, names(5))["confusionMatrix"]


def test_log_loss_clips_a_zero_probability_true_class():
    report = evaluation_report(np.array([1]), np.array([[1.0, 0.0]]), ["a", "b"])
    assert report["logLoss"] == close(-np.log(1e-12))


GOOD_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
INVALID = {
    "probs 1-D": (np.array([0, 1]), np.array([0.5, 0.5]), list("abc"), {}),
    "labels 2-D": (np.array([[0], [1]]), GOOD_PROBS, list("abc"), {}),
    "sample count mismatch": (np.array([0, 1, 2]), GOOD_PROBS, list("abc"), {}),
    "no samples": (np.zeros(0, dtype=int), np.zeros((0, 3)), list("abc"), {}),
    "too few names": (np.array([0, 1]), GOOD_PROBS, list("ab"), {}),
    "too many names": (np.array([0, 1]), GOOD_PROBS, list("abcd"), {}),
    "duplicate names": (np.array([0, 1]), GOOD_PROBS, list("aab"), {}),
    "negative label": (np.array([0, -1]), GOOD_PROBS, list("abc"), {}),
    "label == C": (np.array([0, 3]), GOOD_PROBS, list("abc"), {}),
    "float labels": (np.array([0.0, 1.0]), GOOD_PROBS, list("abc"), {}),
    "logits, not probs": (np.array([0, 1]), np.array([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0]]), list("abc"), {}),
    "nan probs": (np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.1, 0.8, 0.1]]), list("abc"), {}),
    "top_k 0": (np.array([0, 1]), GOOD_PROBS, list("abc"), {"top_k": 0}),
    "bins 0": (np.array([0, 1]), GOOD_PROBS, list("abc"), {"bins": 0}),
    "most_confused -1": (np.array([0, 1]), GOOD_PROBS, list("abc"), {"most_confused": -1}),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs_raise_one_line_value_error(case):
    labels, probs, classes, kwargs = INVALID[case]
    with pytest.raises(ValueError) as raised:
        evaluation_report(labels, probs, classes, **kwargs)
    assert str(raised.value) and "\n" not in str(raised.value)


def test_modules_import_without_torch_sklearn_or_matplotlib():
    code = ("import sys, finetune_trainer.evaluation, finetune_trainer.plots; "
            "loaded = {'torch', 'sklearn', 'matplotlib'} & set(sys.modules); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def assert_png(path, folder):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1024
    with Image.open(path) as image:
        image.verify()
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temp file left behind
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("c", [3, 40])
def test_confusion_matrix_plot_is_a_valid_png(tmp_path, c):
    labels, probs = random_case(0, c, n=400)
    report = json.loads(json.dumps(evaluation_report(labels, probs, names(c))))  # as read back from disk
    target = tmp_path / "confusion.png"
    assert plot_confusion_matrix(report, target) == target
    width, height = assert_png(target, tmp_path)
    assert min(width, height) > (1000 if c == 40 else 400)  # the figure grows with the class count
    plot_confusion_matrix(report, target)  # overwriting an existing plot goes through os.replace too
    assert_png(target, tmp_path)


HISTORIES = {
    "one epoch": [{"epoch": 1, "trainLoss": 0.9, "valLoss": 0.8, "valAccuracy": 0.7}],
    "with None and missing values": [
        {"epoch": 1, "trainLoss": 1.2, "valLoss": None, "valAccuracy": None},
        {"epoch": 2, "trainLoss": 0.8, "valLoss": 0.7, "valAccuracy": 0.72, "valTop5": 0.95},
        {"epoch": 3, "trainLoss": None, "valAccuracy": 0.81},
        {"epoch": 4, "trainLoss": 0.5, "valLoss": 0.6, "valAccuracy": 0.79},
    ],
    "nothing to draw": [{"epoch": 1}],
    "empty": [],
}


@pytest.mark.parametrize("name", list(HISTORIES))
def test_training_curves_plot_is_a_valid_png(tmp_path, name):
    target = tmp_path / "sub" / "curves.png"
    assert plot_training_curves(HISTORIES[name], target) == target
    assert_png(target, target.parent)


def test_plots_render_concurrently_from_threads(tmp_path):
    labels, probs = random_case(1, 5)
    report = evaluation_report(labels, probs, names(5))
    jobs = [(plot_confusion_matrix, report, tmp_path / f"cm{i}.png") for i in range(3)]
    jobs += [(plot_training_curves, HISTORIES["with None and missing values"], tmp_path / f"tc{i}.png")
             for i in range(3)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        paths = list(pool.map(lambda job: job[0](job[1], job[2]), jobs))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
