"""The report's pictures drawn by a helper process that imported matplotlib while the trainer imported torch.

A head-only run ends with its evaluation report, and drawing the two PNGs starts with importing matplotlib
and setting up its first font: about half a second, at the very end of the run, on one core. `finetune-train
train` starts this helper beside itself where a core is spare (cpus.spare_cores): a fresh interpreter (no
fork of a process with threads) that imports matplotlib and draws one small figure on the otherwise idle
core during the trainer's own start-up, then waits.

Each request is one JSON line on the helper's stdin — the output folder, the report, the history, the file
names — and the answer one JSON line: the files drawn, or the plotting error (which the trainer logs, as it
logs its own). Nothing crosses but JSON, and the helper runs the trainer's own plots module. When the helper
is gone, silent past a timeout, or never started, model_report draws in the trainer's process as before.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from finetune_trainer import cpus

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 120.0  # a report of 1000 classes draws in seconds; past this the helper is taken as stuck


class PlotError(RuntimeError):
    """The helper drew and failed (the same error the trainer's own process would have met)."""


class PlotHelper:
    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls) -> PlotHelper | None:
        package_root = str(Path(__file__).resolve().parents[1])  # the child imports this same trainer
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            process = subprocess.Popen([sys.executable, "-m", "finetune_trainer.plot_helper"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)
        except OSError as err:
            log.info("plot helper not started (%s): the report's pictures are drawn in this process", err)
            return None
        return cls(process)

    def draw(self, folder: Path, report: dict, history: list[dict] | None, names: dict[str, str]) -> dict | None:
        """{"trainingCurves": …} as drawn (the confusion matrix under names["confusionMatrix"]); None when the
        helper could not answer (the caller draws itself). Raises PlotError when the drawing itself failed."""
        request = {"folder": str(folder), "report": report, "history": history, "names": names}
        stdin, stdout = self.process.stdin, self.process.stdout
        try:
            stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
            stdin.flush()  # type: ignore[union-attr]
            ready, _, _ = select.select([stdout], [], [], TIMEOUT_SECONDS)
            line = stdout.readline() if ready else ""  # type: ignore[union-attr]
        except (OSError, ValueError):  # a broken pipe: the helper has exited
            line = ""
        if not line:
            log.info("plot helper did not answer: the report's pictures are drawn in this process")
            self.close()
            return None
        reply = json.loads(line)
        if "error" in reply:
            raise PlotError(reply["error"])
        return reply["made"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]  # end of requests: the helper exits
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


_active: PlotHelper | None = None


def start() -> PlotHelper | None:
    """Start the helper for this trainer process where a core is spare and this is the only process."""
    global _active
    if _active is None and cpus.spare_cores() >= 1 and cpus.single_process():
        _active = PlotHelper.start()
    return _active


def active() -> PlotHelper | None:
    return _active


def finish() -> None:
    global _active
    if _active is not None:
        helper, _active = _active, None
        helper.close()


def serve(requests: IO[str], answers: IO[str]) -> None:
    """The helper's side: warm up matplotlib, then draw each request with finetune_trainer.plots."""
    from finetune_trainer import plots

    plots.warm_up()
    for line in requests:
        request = json.loads(line)
        reply: dict[str, Any]
        try:
            reply = {"made": plots.draw_report(Path(request["folder"]), request["report"], request["history"],
                                               request["names"])}
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
