"""What a person sees while a run goes: rich progress bars and a final metrics table (main process only)."""

from __future__ import annotations

from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class _Bar:
    def __init__(self, progress: Progress | None, total: int, completed: int) -> None:
        self.progress = progress
        self.task = progress.add_task("training", total=total, completed=completed) if progress else None
        if progress:
            progress.start()

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
        self.rich = RichConsole(stderr=True)

    def print(self, message: str) -> None:
        if self.enabled:
            self.rich.print(message, highlight=False, soft_wrap=True)  # one line stays one line (paths, logs)

    def progress(self, total: int, completed: int = 0) -> _Bar:
        if not (self.enabled and self.progress_bars):
            return _Bar(None, total, completed)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        return _Bar(Progress(*columns, console=self.rich, transient=True), total, completed)

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
            f"best {summary['metric']} {summary['best']:.4f} (epoch {summary['best_epoch'] or 'none'}), "
            f"{summary['trainable_params_without_head']:,} trained parameters without the head, "
            f"{summary['train_seconds']:.0f} s"
        )
