"""Test-set evaluation report from labels and softmax probabilities.

Pure numpy on purpose: the report is computed where torch and scikit-learn may be absent (the operator side, a
notebook reading predictions back), and every number in it is checked against scikit-learn in the unit tests.
The result holds plain Python types only, so it can go straight into json.dumps and the export's metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROB_FLOOR = 1e-12  # log loss clips here so one confident miss gives a large but finite loss
ROW_SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; logits miss this by far


def _validate(labels: Any, probs: Any, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fail early with one line: a silent broadcast or a wrapped index would give a plausible but wrong report."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (samples, classes), got shape {probs.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (samples,), got shape {labels.shape}")
    n, c = probs.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} samples but probs has {n}")
    if n == 0:
        raise ValueError("cannot evaluate zero samples")
    if c != len(classes):
        raise ValueError(f"probs has {c} columns but {len(classes)} class names were given")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c - 1}], got values in [{labels.min()}, {labels.max()}]")
    if not np.issubdtype(probs.dtype, np.floating) and not np.issubdtype(probs.dtype, np.integer):
        raise ValueError(f"probs must be numeric, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    worst = float(np.abs(probs.sum(axis=1) - 1.0).max())
    if worst > ROW_SUM_TOLERANCE:
        raise ValueError(f"probs rows must sum to 1 (softmax output, not logits); worst row is off by {worst:.3g}")
    return labels.astype(np.int64), probs


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with 0.0 where den is 0: scikit-learn's zero_division=0."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _averages(precision: np.ndarray, recall: np.ndarray, f1: np.ndarray, support: np.ndarray) -> tuple[dict, dict]:
    """Macro (every class counts once, even with no support) and support-weighted averages, as sklearn reports."""
    total = int(support.sum())
    macro = {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
             "support": total}
    weighted = {name: float(np.average(values, weights=support)) if total else 0.0
                for name, values in (("precision", precision), ("recall", recall), ("f1", f1))}
    weighted["support"] = total
    return macro, weighted


def _calibration(confidence: np.ndarray, correct: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Guo et al. (2017) ECE over equal-width bins (lower, upper]; confidence 0 joins the first bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted against the same edges array keeps edge cases exact: c == edges[j] lands in bin j-1.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    n = confidence.shape[0]
    ece, table = 0.0, []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if not count:
            continue
        accuracy, mean_conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += count / n * abs(accuracy - mean_conf)
        table.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                      "accuracy": accuracy, "confidence": mean_conf})
    return float(ece), table


def _most_confused(matrix: np.ndarray, classes: list[str], limit: int) -> list[dict]:
    """Largest off-diagonal cells first, ties by (true, predicted) index so the list is reproducible."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    true_idx, pred_idx = np.nonzero(off)
    counts = off[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -counts))[:limit]
    return [{"true": classes[int(true_idx[i])], "predicted": classes[int(pred_idx[i])], "count": int(counts[i])}
            for i in order]


def evaluation_report(labels: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5, bins: int = 15,
                      most_confused: int = 10) -> dict:
    """Accuracy, top-k, log loss, confusion matrix, per-class and averaged P/R/F1, calibration, worst confusions.

    labels: int (N,) true class indices; probs: float (N, C) softmax rows; classes: the C names in index order.
    Top-1 predictions are argmax (lowest index on ties); top-k ranks by a stable argsort of -probs, so on ties
    the lower index ranks first and top-1 of the ranking is always the argmax.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if most_confused < 0:
        raise ValueError(f"most_confused must be non-negative, got {most_confused}")
    classes = [str(name) for name in classes]
    labels, probs = _validate(labels, probs, classes)
    n, c = probs.shape
    preds = probs.argmax(axis=1)
    correct = preds == labels

    k = min(top_k, c)
    ranking = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_k_accuracy = float((ranking == labels[:, None]).any(axis=1).mean())
    true_prob = probs[np.arange(n), labels]
    log_loss = float(-np.log(np.clip(true_prob, PROB_FLOOR, None)).mean())

    matrix = np.bincount(labels * c + preds, minlength=c * c).reshape(c, c)
    tp = np.diag(matrix).astype(np.float64)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision, recall = _divide(tp, predicted.astype(np.float64)), _divide(tp, support.astype(np.float64))
    f1 = _divide(2.0 * tp, (support + predicted).astype(np.float64))  # sklearn's 2tp / (2tp + fp + fn)
    macro, weighted = _averages(precision, recall, f1, support)
    ece, calibration = _calibration(probs.max(axis=1), correct, bins)

    return {
        "samples": int(n),
        "accuracy": float(correct.mean()),
        "topK": {"k": int(k), "accuracy": top_k_accuracy},
        "logLoss": log_loss,
        "confusionMatrix": {"labels": list(classes), "matrix": matrix.tolist()},
        "perClass": [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]),
                      "f1": float(f1[i]), "support": int(support[i])} for i, name in enumerate(classes)],
        "macroAvg": macro,
        "weightedAvg": weighted,
        "expectedCalibrationError": ece,
        "calibration": calibration,
        "mostConfused": _most_confused(matrix, classes, most_confused),
    }


def summary_line(report: dict, split: str = "test") -> str:
    """One line for logs and job status: the numbers a person checks first, and the confusion to look at."""
    top = report["topK"]
    top_part = f" (top-{top['k']} {top['accuracy']:.1%})" if top["k"] > 1 else ""
    confused = report["mostConfused"]
    worst = f"{confused[0]['true']}→{confused[0]['predicted']} ({confused[0]['count']})" if confused else "none"
    return (f"{split} accuracy {report['accuracy']:.1%}{top_part} on {report['samples']} images; "
            f"macro F1 {report['macroAvg']['f1']:.3f}; ECE {report['expectedCalibrationError']:.3f}; "
            f"most confused: {worst}")
