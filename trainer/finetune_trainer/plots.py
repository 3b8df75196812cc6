"""PNG plots of an evaluation report and of the training history.

matplotlib is imported inside the functions, so importing this module costs nothing where it is not installed.
Figures are built as matplotlib.figure.Figure on an explicit FigureCanvasAgg, never through pyplot: no global
backend switch, no display needed, and concurrent calls from different threads do not share pyplot's state.
Files are written atomically (temp file in the same folder, then os.replace), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DPI = 120
CELL_TEXT_MAX_CLASSES = 30  # above this the counts no longer fit in the cells
TICK_LABEL_MAX_CLASSES = 150  # above this class names would overlap into a grey band


def _new_figure(width: float, height: float) -> Any:
    """A Figure attached to its own Agg canvas. No layout engine: the saved image is cropped to what was drawn
    (bbox_inches="tight"), which keeps rotated labels inside it at about 2/3 of constrained layout's cost
    (that matters in a sweep, which writes a report per trial)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure: Any, path: Path) -> Path:
    """Render to a hidden temp file beside the target, then rename it over the target in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(handle.fileno(), 0o644)  # mkstemp makes it owner-only; a plot is meant to be read by others
            figure.savefig(handle, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_confusion_matrix(report: dict, path: Path) -> Path:
    """Heat map of report["confusionMatrix"]: colours are row-normalised (recall per true class), cells show counts.

    Row normalisation keeps rare classes visible next to frequent ones; the raw counts stay readable in the cells.
    """
    names = [str(name) for name in report["confusionMatrix"]["labels"]]
    counts = np.asarray(report["confusionMatrix"]["matrix"], dtype=np.int64).reshape(len(names), len(names))
    c = len(names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)

    side = min(max(4.5, 0.32 * c + 3.0), 40.0)
    figure = _new_figure(side + 1.2, side)
    ax = figure.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    colorbar.set_label("fraction of the true class")

    font = max(3.0, min(9.0, 260.0 / max(c, 1)))
    if c <= TICK_LABEL_MAX_CLASSES:
        ax.set_xticks(range(c), labels=names, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(c), labels=names, fontsize=font)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if c <= CELL_TEXT_MAX_CLASSES:
        cell_font = max(5.0, min(10.0, 180.0 / max(c, 1)))
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=cell_font,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = report.get("accuracy")
    samples = report.get("samples", int(counts.sum()))
    title = "Confusion matrix"
    if accuracy is not None:
        title += f": accuracy {accuracy:.1%} on {samples} images"
    figure.suptitle(title)  # centred on the figure: long class names on the y axis cannot push it out of frame
    return _save_atomically(figure, path)


def _points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epoch, value) pairs for one key, skipping records where it is missing, None or not a finite number."""
    xs, ys = [], []
    for position, record in enumerate(history, start=1):
        value = record.get(key)
        epoch = record.get("epoch")
        epoch = position if epoch is None else epoch
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        xs.append(float(epoch))
        ys.append(float(value))
    return xs, ys


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_training_curves(history: list[dict], path: Path) -> Path:
    """Loss (train and val) and val accuracy per epoch, side by side, with the best epoch marked.

    Markers on every point so a one-epoch run still shows something; missing values are skipped, not zeroed.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(11.0, 4.2)
    loss_ax, acc_ax = figure.subplots(1, 2, sharex=True)
    drawn = False
    for key, label, style in (("trainLoss", "train", "o-"), ("valLoss", "val", "s-")):
        xs, ys = _points(history, key)
        if xs:
            loss_ax.plot(xs, ys, style, label=label, markersize=4)
            drawn = True
    if drawn:
        loss_ax.legend()
    else:
        _no_data(loss_ax)
    loss_ax.set_title("loss")
    loss_ax.set_ylabel("cross-entropy")

    xs, ys = _points(history, "valAccuracy")
    if xs:
        percent = [100.0 * y for y in ys]
        acc_ax.plot(xs, percent, "o-", color="tab:green", markersize=4, label="val accuracy")
        best = int(np.argmax(percent))  # first epoch reaching the best value, as early stopping keeps it
        acc_ax.plot([xs[best]], [percent[best]], "*", color="tab:red", markersize=14,
                    label=f"best {percent[best]:.1f}% (epoch {xs[best]:g})")
        acc_ax.legend(loc="lower right")
    else:
        _no_data(acc_ax)
    acc_ax.set_title("validation accuracy")
    acc_ax.set_ylabel("accuracy (%)")

    epochs = [x for key in ("trainLoss", "valLoss", "valAccuracy") for x in _points(history, key)[0]]
    if epochs and max(epochs) - min(epochs) < 2:  # too few epochs for the locator: keep ticks on whole epochs
        loss_ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
    return _save_atomically(figure, path)


def draw_report(folder: Path, report: dict, history: list[dict] | None, names: dict[str, str]) -> dict[str, str]:
    """The report's pictures into `folder`: the confusion matrix as names["confusionMatrix"], and the training
    curves as names["trainingCurves"] when there is a history. Returns {"trainingCurves": …} when drawn."""
    plot_confusion_matrix(report, folder / names["confusionMatrix"])
    if not history:
        return {}
    plot_training_curves(history, folder / names["trainingCurves"])
    return {"trainingCurves": names["trainingCurves"]}


def warm_up() -> None:
    """Import what drawing needs and render one small figure with text (the font is loaded on first use)."""
    import io

    from matplotlib.ticker import MaxNLocator  # noqa: F401  (imported for what plot_training_curves needs)

    figure = _new_figure(1.0, 1.0)
    figure.text(0.5, 0.5, "0")
    figure.savefig(io.BytesIO(), format="png", dpi=10)
