"""The live table of a local sweep: every trial's values, state, epoch and metric, and the best so far.

rich redraws it in place on a terminal; elsewhere (CI logs, a pipe) one line per finished trial is
printed instead, so logs stay readable.
"""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from finetune_api.sweep import FineTuneSweepSpec


class SweepTable:
    def __init__(self, spec: FineTuneSweepSpec, stream: IO[str] | None = None) -> None:
        self.spec = spec
        self.console = Console(file=stream, highlight=False)
        self.live: Live | None = None
        self.trials: list[Any] = []
        self.best: Any = None
        self.printed: set[str] = set()

    def __enter__(self) -> SweepTable:
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)
        else:
            self.console.print(self.render())

    def update(self, trials: list[Any], best: Any = None) -> None:
        self.trials, self.best = trials, best if best is not None else self.best
        if self.live is not None:
            self.live.update(self.render())
            return
        for t in trials:  # not a terminal: a line per trial as it finishes
            if t.state != "Running" and t.name not in self.printed:
                self.printed.add(t.name)
                metric = f"{t.metric:.4f}" if t.metric is not None else "-"
                values = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in t.values.items())
                self.console.print(f"trial {t.name}: {t.state} {self.spec.objective.metric}={metric} ({values})"
                                   f"{f' - {t.reason}' if t.reason else ''}", soft_wrap=True)

    def render(self) -> Table:
        metric = self.spec.objective.metric
        title = f"sweep: {sum(t.state != 'Running' for t in self.trials)}/{self.spec.total_trials()} trials done"
        if self.best is not None:
            title += f"; best {self.best.name} {metric}={self.best.metric:.4f}"
        table = Table(title=title)
        table.add_column("trial")
        for p in self.spec.parameters:
            table.add_column(p.path.rsplit(".", 1)[-1])
        for col in ("state", "epoch", metric):
            table.add_column(col, justify="right" if col != "state" else "left")
        for t in self.trials:
            shown = f"{t.metric:.4f}" if t.metric is not None else (
                f"{t.intermediate[max(t.intermediate)]:.4f}" if t.intermediate else "-")
            mark = " *" if self.best is not None and t.name == self.best.name else ""
            table.add_row(t.name + mark, *(_fmt(t.values.get(p.path)) for p in self.spec.parameters), t.state,
                          str(t.epoch), shown)
        return table


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
