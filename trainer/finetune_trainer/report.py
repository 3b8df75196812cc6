"""Reporters: how training progress leaves the loop, with no Kubernetes in sight.

The loop calls `reporter.event(kind, **fields)`; kinds are `start`, `step`, `epoch`, `end`,
`message`. Console output is for people, JSON lines for machines (and the operator's pod logs);
an HTTP reporter that pushes to the operator plugs in through the same interface.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class Reporter:
    """Base: ignores everything. Subclasses override `event`."""

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MultiReporter(Reporter):
    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def event(self, kind: str, **fields: Any) -> None:
        for r in self.reporters:
            r.event(kind, **fields)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class JsonLinesReporter(Reporter):
    """One JSON object per line: {"event": kind, "time": unix seconds, ...fields}."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout

    def event(self, kind: str, **fields: Any) -> None:
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        self.stream.write(json.dumps(record, default=str) + "\n")
        self.stream.flush()


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ConsoleReporter(Reporter):
    """A progress line per step (redrawn in a terminal) and a summary line per epoch."""

    def __init__(self, stream: IO[str] | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def _write(self, text: str, redraw: bool = False) -> None:
        if redraw and self.tty:
            self.stream.write("\r\033[K" + text)
        elif not redraw:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def event(self, kind: str, **f: Any) -> None:
        if kind == "start":
            self._write(
                f"fine-tuning {f['architecture']} on {f['numClasses']} classes "
                f"({f['trainSize']} train / {f['valSize']} val images), {f['freeze']}, "
                f"device {f['device']} {f['precision']}"
                + (f"; {f['skippedImages']} unreadable image(s) skipped" if f.get("skippedImages") else "")
            )
        elif kind == "step":
            done = f["step"] / max(1, f["totalSteps"])
            bar = "#" * int(done * self.width)
            self._write(
                f"epoch {f['epoch']}/{f['totalEpochs']} [{bar:<{self.width}}] {done:4.0%} "
                f"loss {f['trainLoss']:.4f} {f['samplesPerSecond']:.0f} img/s eta {_fmt_eta(f.get('etaSeconds'))}",
                redraw=True,
            )
        elif kind == "epoch":
            top5 = f" top5 {f['valTop5']:.3f}" if f.get("valTop5") is not None else ""
            best = " *" if f.get("isBest") else ""
            self._write(
                f"epoch {f['epoch']}/{f['totalEpochs']}: train loss {f['trainLoss']:.4f} | "
                f"val loss {f['valLoss']:.4f} acc {f['valAccuracy']:.3f}{top5} | "
                f"{f['samplesPerSecond']:.0f} img/s, {f['epochSeconds']:.1f}s{best}"
            )
        elif kind == "end":
            self._write(
                f"done: best val accuracy {f['valAccuracy']:.3f} at epoch {f['bestEpoch']}; "
                f"export {f['weightsFile']}"
            )
            per_class = f.get("perClassAccuracy") or {}
            if per_class:
                worst = sorted(per_class.items(), key=lambda kv: kv[1])[:10]
                self._write("per-class val accuracy (lowest first): "
                            + ", ".join(f"{c} {a:.2f}" for c, a in worst))
        elif kind == "checkpoint":
            note = f.get("lastCheckpoint") or {}
            self._write(f"checkpoint {note.get('file')} saved (epoch {f['epoch']}, step {f.get('step')})")
        elif kind == "message":
            self._write(f"{f.get('level', 'info')}: {f['text']}")
