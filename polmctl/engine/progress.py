"""Rich output: a live progress bar while training, a summary table at the end."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from polmctl.console import console


class StepProgress:
    """A progress bar with the live loss; on a non-terminal it prints about ten plain lines."""

    def __init__(self, total: int, start: int, enabled: bool, description: str = "training"):
        self.total, self.enabled = total, enabled
        self.interactive = enabled and console.is_terminal
        self.every = max(1, total // 10)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.interactive,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, status="")

    def __enter__(self) -> "StepProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        status = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}"
        self._progress.update(self._task, completed=step, status=status)
        if self.enabled and not self.interactive and (step % self.every == 0 or step == self.total):
            console.print(f"step {step}/{self.total}  {status}  {metrics.get('tokens_per_s', 0):.0f} tok/s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows.items():
        table.add_row(key, _fmt(value))
    return table
