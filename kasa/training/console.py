"""What a person sees while a run goes: rich progress bars and a final metrics table (main process only)."""

from __future__ import annotations

from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


# Off a terminal (a file, nohup, SLURM) there is no width to fit: lines and tables are written whole at a width none
# reaches, not wrapped or squeezed to rich's default of 80 columns
UNWRAPPED_WIDTH = 10_000


class _Bar:
    """The training progress: a rich bar on a terminal; off a terminal, where a bar's redraws show nothing, one plain
    line per logging step."""

    def __init__(self, console: Console, total: int, completed: int, epochs: int) -> None:
        self.total, self.epochs = total, epochs
        shown = console.enabled and console.progress_bars
        self.print = console.print if shown and not console.interactive else None
        self.progress = None
        if shown and console.interactive:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.progress = Progress(*columns, console=console.rich, transient=True)
            self.task = self.progress.add_task("training", total=total, completed=completed)
            self.progress.start()

    def logged(self, record: dict[str, Any]) -> str:
        """The bar's label after a logging step's `record` (its step, 0-based epoch, loss and lr, already read from
        the device), printed off a terminal as a line of its own with the step and the learning rate."""
        description = f"epoch {record['epoch'] + 1}/{self.epochs} loss {record['loss']:.4f}"
        if self.print:
            self.print(f"step {record['step']}/{self.total} {description} lr {record['lr']:.3g}")
        return description

    def advance(self, description: str) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, description=description)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


class Console:
    def __init__(self, enabled: bool = True, progress_bars: bool = True) -> None:
        self.enabled = enabled  # main process only
        self.progress_bars = progress_bars
        # one line stays one line (paths, logs), and is printed as it is: with rich's markup on, a message's
        # `[validation]` or `[x=1]` vanished as a style and a `[/...]` in an error's text raised MarkupError
        self.rich = RichConsole(stderr=True, soft_wrap=True, markup=False)
        self.interactive = self.rich.is_terminal or self.rich.is_jupyter
        if not self.interactive:
            self.rich.width = UNWRAPPED_WIDTH

    def print(self, message: str) -> None:
        if self.enabled:
            self.rich.print(message, highlight=False)

    def progress(self, total: int, epochs: int, completed: int = 0) -> _Bar:
        """The progress of `total` optimiser steps (`completed` of them done) over `epochs` epochs: what the run
        trains, fewer than trainer.epochs when trainer.max_steps ends it first."""
        return _Bar(self, total, completed, epochs)

    def summary_table(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title=f"{summary['task']} / {summary['method']}")
        table.add_column("epoch", justify="right")
        metric_names = [k for k in summary["eval_history"][0] if k not in ("type", "epoch", "step", "split")]
        for name in metric_names:
            table.add_column(name, justify="right")
        for record in summary["eval_history"]:
            marker = " *" if record["epoch"] == summary["best_epoch"] else ""
            table.add_row(f"{record['epoch']}{marker}", *(f"{record[n]:.4f}" for n in metric_names))
        self.rich.print(table)
        self.rich.print(
            (f"best {summary['metric']} {summary['best']:.4f} (epoch {summary['best_epoch']}), "
             if summary["best_epoch"] else f"no epoch gave a defined {summary['metric']}, ") +
            f"{summary['trainable_params_without_head']:,} trained parameters without the head, "
            f"{summary['train_seconds']:.0f} s"
        )
