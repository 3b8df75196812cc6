"""MODEL_CARD.md beside a portable export: data, classes, metrics, intended use and how it was made.

Built from model.json's content alone (Mitchell et al., "Model Cards for Model Reporting", trimmed to
what a fine-tuning run knows), so the card and the metadata cannot disagree. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_trainer.checkpoint import atomic_write

CARD_FILE = "MODEL_CARD.md"
MAX_LISTED_CLASSES = 50


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _formats(meta: dict[str, Any]) -> list[str]:
    rows = ["| format | file | parity vs PyTorch (val) |", "|---|---|---|",
            f"| safetensors | `{meta['weightsFile']}` | (the PyTorch weights themselves) |"]
    for fmt, f in meta.get("formats", {}).items():
        if "parity" not in f:
            continue
        p = f["parity"]
        rows.append(f"| {fmt} ({f['exporter']}{', opset ' + str(f['opset']) if 'opset' in f else ''}) | "
                    f"`{f['file']}` | top-1 agreement {p['top1Agreement']:.4f} on {p['images']} images, "
                    f"max abs diff {p['maxAbsDiff']:.2g} |")
    return rows


def render(meta: dict[str, Any]) -> str:
    m, data, classes = meta["metrics"], meta.get("dataset", {}), meta["classes"]
    spec, prep = meta.get("spec", {}), meta["preprocessing"]
    listed = ", ".join(f"`{c}`" for c in classes[:MAX_LISTED_CLASSES])
    more = f" and {len(classes) - MAX_LISTED_CLASSES} more" if len(classes) > MAX_LISTED_CLASSES else ""
    folded = any(f.get("input", {}).get("normalizationInGraph") for f in meta.get("formats", {}).values())
    training = spec.get("training", {})
    lines = [
        f"# {meta['name']}", "",
        f"An image classifier over {len(classes)} classes, fine-tuned from `{meta['architecture']}` "
        f"({meta.get('library', 'torchvision')}, backbone weights: {meta.get('weightsSource', 'unknown')}).", "",
        "## Intended use", "",
        "Classifying images like those of its training data into exactly these classes. It has no "
        "'none of these' answer: an image of anything else still gets one of them, so check the probability "
        "before acting on it, and evaluate it on your own data (`finetune-train evaluate`) before relying on it. "
        "Not evaluated for fairness, robustness to distribution shift, or adversarial inputs.", "",
        "## Data", "",
        f"- source: {data.get('source', 'unknown')}",
        f"- images: {data.get('train', '?')} train, {data.get('val', '?')} val, {data.get('test', 0)} test "
        f"({data.get('skippedImages', 0)} unreadable skipped)",
        f"- classes: {listed}{more}", "",
        "## Metrics", "",
        "| metric | value |", "|---|---|",
        f"| val accuracy (epoch {meta['bestEpoch']}) | {_pct(m.get('valAccuracy'))} |",
        f"| val top-5 | {_pct(m.get('valTop5'))} |",
        f"| test accuracy | {_pct(m.get('testAccuracy'))} |",
        f"| val loss | {m.get('valLoss', 0):.4f} |", "",
        "## Input", "",
        f"RGB, shorter side resized to {prep['resize']} ({prep.get('interpolation', 'bilinear')}), center crop "
        f"{prep['crop']}, scaled to [0,1]" + ("" if folded else f", normalised with mean {prep['mean']} and std "
                                                             f"{prep['std']}") + " (model.json `preprocessing`).",
        "", "## Formats", "", *_formats(meta), "",
        "## How it was made", "",
        f"finetune-operator trainer {meta.get('trainerVersion', '?')}: freeze policy "
        f"`{meta.get('freeze', {}).get('policy', '?')}`, {meta.get('epochs', '?')} epochs, optimizer "
        f"`{training.get('optimizer', '?')}` at learning rate {training.get('learningRate', '?')}, seed "
        f"{training.get('seed', '?')}. The full spec and per-epoch history are in model.json (resume fingerprint "
        f"`{meta.get('fingerprint', '?')}`).", "",
        "## Serving", "",
        "`finetune-serve --model <this folder>` (KServe v1 and Open Inference Protocol v2), or Triton / KServe's "
        "Triton runtime on `serving/`.", "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, meta: dict[str, Any]) -> str:
    text = render(meta)
    atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(text))
    return CARD_FILE
