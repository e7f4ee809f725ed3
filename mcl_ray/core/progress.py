"""One live progress bar per long stage (epochs, texts encoded, prompts generated, trials).

On a terminal it is a rich bar that redraws in place; in a log (CI, `ray job submit`) it prints one
summary line when done, so logs stay short. `print` puts a permanent line above the bar."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)  # the project's own lines; results go to stdout


class ProgressBar:
    def __init__(self, description: str, total: int | None, unit: str, disabled: bool = False):
        self.console, self.description, self.total, self.unit = console, description, total, unit
        self.disabled, self.done, self.fields = disabled, 0, ""
        self.live = console.is_terminal and not disabled
        self._progress: Progress | None = None

    def __enter__(self) -> "ProgressBar":
        self.t0 = time.perf_counter()
        if self.live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(self.unit), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, info="")
        return self

    def update(self, done: int | None = None, advance: int = 0, info: str | None = None,
               total: int | None = None) -> None:
        self.done = done if done is not None else self.done + advance
        self.total = total if total is not None else self.total
        if info is not None:
            self.fields = info
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, total=self.total, info=self.fields)

    def print(self, line: str) -> None:
        if not self.disabled:
            self.console.print(line)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif not self.disabled and exc[0] is None:
            secs = time.perf_counter() - self.t0
            of = f"/{self.total:,}" if self.total is not None else ""
            extra = f"; {self.fields}" if self.fields else ""
            self.console.print(f"{self.description}: {self.done:,}{of} {self.unit} in {secs:.1f} s{extra}",
                               highlight=False)
