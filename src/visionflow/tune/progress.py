"""The search's progress: trials done / pruned / running, the best so far and an ETA.

On a terminal a rich progress bar redraws in place; elsewhere (logs, CI, tests) one line is
printed each time a trial ends.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class Status:
    target: int
    parallel: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: list[int] = field(default_factory=list)
    best_value: float | None = None
    best_trial: int | None = None
    durations: list[float] = field(default_factory=list)  # this process's finished trials

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    def eta_s(self) -> float | None:
        if not self.durations:
            return None
        left = max(0, self.target - self.finished)
        mean = sum(self.durations) / len(self.durations)
        return left * mean / max(1, min(self.parallel, left or 1))

    def line(self) -> str:
        eta = self.eta_s()
        best = (f"best {self.best_value:.4f} (trial {self.best_trial})"
                if self.best_value is not None else "best -")
        running = ",".join(map(str, sorted(self.running))) or "-"
        return (f"{self.finished}/{self.target} done ({self.complete} complete, {self.pruned} "
                f"pruned, {self.failed} failed), running [{running}], {best}, ETA "
                + (f"{eta:.0f} s" if eta is not None else "-"))


class Display:
    def __init__(self, status: Status, console: Console | None = None) -> None:
        self.status = status
        self.console = console or Console(file=sys.stdout)
        self.live = self.console.is_terminal
        self.bar: Progress | None = None
        self.task: Any = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> Display:
        if self.live:
            self.bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(),
                                console=self.console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.status.line(), total=self.status.target,
                                          completed=self.status.finished)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.refresh()
            self.bar.stop()

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.status.finished,
                            description=self.status.line())

    def event(self, text: str) -> None:
        """A trial started or ended: a line above the bar (or in the log) and the status."""
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
            self.refresh()
        else:
            print(f"{text} | {self.status.line()}", flush=True)
