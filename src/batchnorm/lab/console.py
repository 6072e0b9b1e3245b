"""Terminal output for the lab: rich progress bars while training, the summary table at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["Bars", "claims_table", "progress_bars"]


class Bars:
    """Hands out one progress bar per training run; silent when built without a rich Progress."""

    def __init__(self, progress: Progress | None = None) -> None:
        self._progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A new bar of ``total`` steps; returns ``advance(n)``."""
        if self._progress is None:
            return lambda n: None
        task_id = self._progress.add_task(description, total=total)
        progress = self._progress
        return lambda n: progress.advance(task_id, n)


@contextmanager
def progress_bars(console: Console | None = None, enabled: bool = True) -> Iterator[Bars]:
    """A :class:`Bars` drawing live rich bars (or none when ``enabled`` is False)."""
    if not enabled:
        yield Bars()
        return
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield Bars(progress)


def claims_table(claims: list[dict], title: str = "What batch normalization did in this run") -> Table:
    """The summary: one row per claim with the measured figure and whether it held."""
    table = Table(title=title, show_lines=True)
    table.add_column("experiment", style="bold")
    table.add_column("claim")
    table.add_column("measured")
    table.add_column("held?", justify="center")
    for c in claims:
        held = "[green]yes[/green]" if c["held"] else "[red]no[/red]"
        table.add_row(c["experiment"], c["claim"], c["measured"], held)
    return table
