"""A rich progress bar behind the core's ``ProgressFn`` callback (fetch.ensure_local / pull).

Usage::

    with download_progress() as progress:
        path = fetch.ensure_local(spec, progress=progress, report=progress.report)

The bar goes to stderr, so stdout keeps only results (a chat reply, a path).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class RichProgress:
    """Callable as ``progress(desc, done, total)``: one bar per description, started on first call."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,  # no bar redraws in logs and pipes
        )
        self._tasks: dict[str, TaskID] = {}
        self._started = False

    def __call__(self, desc: str, done: int, total: int | None) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        task = self._tasks.get(desc)
        if task is None:
            task = self._tasks[desc] = self._progress.add_task(desc, total=total)
        self._progress.update(task, completed=done, total=total)

    def report(self, line: str) -> None:
        """One line of news from the core (a source failed, waiting on a lock), above the bar."""
        self.console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> RichProgress:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:
            self._progress.stop()


def download_progress(console: Any = None) -> RichProgress:
    """A progress adapter that draws nothing until a download actually starts."""
    return RichProgress(console)
