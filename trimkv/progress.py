"""One progress display for long work (the training loop, the evaluation harness).

On a terminal it is a rich bar with elapsed time, ETA and a free-text field; when output goes to a file (a batch
job, ``nohup``) it prints a plain line at most every ``every`` seconds instead, so logs show progress too. Disabled
(non-main ranks, ``--quiet``, tests) it does nothing.

    with Progress("train", total=steps, done=start) as bar:
        bar.update(step, info=f"loss {loss:.3f}")
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, *, done: int = 0, enabled: bool = True, every: float = 30.0):
        self.label, self.total, self.done, self.every = label, total, done, every
        self.enabled = enabled and total > 0
        self._bar = self._task = None
        self._t0 = self._last = time.perf_counter()
        self._start = done
        self.info = ""
        if self.enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task(label, total=total, completed=done, info="")
            self._bar.start()

    def update(self, done: int | None = None, *, advance: int = 0, info: str | None = None,
               label: str | None = None) -> None:
        """Set (``done``) or advance the count; ``info`` replaces the free text, ``label`` the description."""
        if not self.enabled:
            return
        self.done = (self.done if done is None else done) + advance
        self.info = self.info if info is None else info
        self.label = self.label if label is None else label
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self.info, description=self.label)
            return
        now = time.perf_counter()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            rate = (self.done - self._start) / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.label}: {self.done}/{self.total}, {now - self._t0:.0f} s, ETA {eta:.0f} s {self.info}",
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
