"""What the run prints, with rich, on the main process only (the others stay quiet).

In a terminal: live progress bars with count/total, rate and ETA (and the loss and images/s of a training
epoch). Elsewhere (CI, Slurm logs, nohup), where a live display would only print its last frame: plain
lines, paced the same way for every phase (decoding, the feature pass, evaluation, saving, each training
epoch): at the start, after every further tenth, at least every `--log-every` seconds (30; when anything
moved), and at the end. So a log's length follows the time a job runs, not its number of steps.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

METRIC_ROWS = [("loss", "test loss", "{:.4f}"), ("accuracy", "top-1 accuracy", "{:.2%}"),
               ("top5_accuracy", "top-5 accuracy", "{:.2%}"), ("mean_class_accuracy", "mean per-class acc.",
               "{:.2%}"), ("precision_macro", "macro precision", "{:.2%}"), ("recall_macro", "macro recall",
               "{:.2%}"), ("f1_macro", "macro F1", "{:.2%}"), ("num_samples", "test images", "{:d}")]


class PlainPhase:
    """Progress of one phase for a log without a terminal: a line "<description> <count>/<total> <unit>"
    at the start, whenever the count reaches the next tenth of the total or `every_s` seconds have
    passed since the last line, and at the end; so a log never stays silent for 10% of a phase or 30 s
    of work. `clock` is injectable for tests."""

    def __init__(self, print_line: Callable[[str], None], description: str, total: int, unit: str = "images",
                 every_s: float = 30.0, clock: Callable[[], float] = time.monotonic, start: int = 0):
        self.print_line, self.description, self.total, self.unit = print_line, description, total, unit
        self.every_s, self.clock = every_s, clock
        self.count, self.first, self.started, self.info = start, start, clock(), ""  # start: a resumed epoch
        self.printed_count, self.printed_at = None, self.started
        self._line()

    def advance(self, n: int = 1) -> None:
        self.update(self.count + n)

    def update(self, count: int, info: str = "") -> None:
        """`info`: shown after the count (a training step's loss and images/s)."""
        self.count, self.info = min(count, self.total), info
        if self.count >= self._next_tenth() or self.clock() - self.printed_at >= self.every_s:
            self._line()

    def finish(self) -> None:
        self._line()

    def _next_tenth(self) -> int:
        """The first multiple of total/10 (rounded up) above the last count printed."""
        tenth = math.floor(self.printed_count * 10 / self.total) + 1
        return math.ceil(tenth * self.total / 10)

    def _line(self) -> None:
        if self.count == self.printed_count:
            return
        now = self.clock()
        line = f"{self.description} {self.count}/{self.total} {self.unit}"
        if self.count > self.first and now > self.started:
            rate = (self.count - self.first) / (now - self.started)
            eta = (self.total - self.count) / rate
            line += f" ({rate:,.1f} {self.unit}/s, ETA {int(eta // 60)}:{int(eta % 60):02d})"
        self.print_line(line + (f"  {self.info}" if self.info else ""))
        self.printed_count, self.printed_at = self.count, now


class LivePhase:
    """Progress of one phase as a task of a rich progress bar."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, count: int, info: str = "") -> None:
        self.progress.update(self.task, completed=count, info=info)


class QuietPhase:
    """Progress on a process other than the main one: nothing is shown."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, count: int, info: str = "") -> None:
        pass


class RateColumn(ProgressColumn):
    """Items per second of a phase (its `unit` field); blank for the epochs, whose info shows img/s."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit")
        if not unit or not task.speed:
            return Text("")
        return Text(f"{task.speed:,.1f} {unit}/s")


class RunConsole:
    def __init__(self, is_main: bool, every_s: float = 30.0):
        """`every_s`: in a log, the longest a phase stays without a line (--log-every)."""
        self.is_main, self.every_s = is_main, every_s
        # Outside a terminal (logs, CI, Slurm) lines are never folded: a path must stay whole to be found.
        self.console = Console(quiet=not is_main, highlight=False)
        self.console.soft_wrap = not self.console.is_terminal
        self.err = Console(stderr=True, quiet=not is_main, highlight=False)
        self.err.soft_wrap = not self.err.is_terminal
        self.live = self.console.is_terminal
        self.progress: Progress | None = None

    def print(self, *args, **kw) -> None:
        self.console.print(*args, **kw)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]{message}[/]")

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)

    # -- progress
    def _live_progress(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), RateColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=False)
            self.progress.start()
        return self.progress

    @contextlib.contextmanager
    def phase(self, description: str, total: int, unit: str = "images") -> Iterator:
        """Progress of a long phase, on the main process: `with console.phase("decoding", n) as p:
        ... p.advance(k)` (or `p.update(count)`). A bar in a terminal, plain lines in a log (see
        PlainPhase). The end is shown only when the phase completes, not when it is interrupted."""
        if not self.is_main or total <= 0:
            yield QuietPhase()
            return
        if not self.live:
            phase = self._plain_phase(description, total, unit)
            yield phase
            phase.finish()
            return
        shared = self.progress is not None  # inside an epoch's bar (a checkpoint): add a line to it
        progress = self._live_progress()
        task = progress.add_task(description, total=total, info="", unit=unit)
        try:
            yield LivePhase(progress, task)
        finally:
            if shared:
                progress.remove_task(task)
            else:
                self.stop_progress()

    def _plain_phase(self, description: str, total: int, unit: str, start: int = 0) -> PlainPhase:
        # One line each, never wrapped (a log is read by tools too), never parsed as markup.
        return PlainPhase(lambda line: self.print(line, soft_wrap=True, markup=False), description, total, unit,
                          self.every_s, start=start)

    def start_task(self, description: str, total: int, completed: int = 0):
        """A training epoch's progress, `total` steps of which `completed` are done: a bar in a terminal,
        else a PlainPhase; pass it to `advance`."""
        if self.live:
            return self._live_progress().add_task(description, total=total, completed=completed, info="")
        return self._plain_phase(description, total, "steps", start=completed) if self.is_main else QuietPhase()

    def advance(self, task, completed: int, info: str = "") -> None:
        if isinstance(task, (PlainPhase, QuietPhase)):
            task.update(completed, info)
        elif self.progress is not None:
            self.progress.update(task, completed=completed, info=info)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- tables
    def comparison(self, baseline: dict | None, finetuned: dict | None) -> None:
        table = Table(title="Test split: before vs after fine-tuning")
        table.add_column("metric")
        table.add_column("baseline (before fine-tuning)", justify="right")
        table.add_column("fine-tuned", justify="right")
        for key, label, fmt in METRIC_ROWS:
            cells = [fmt.format(m[key]) if m and key in m else "-" for m in (baseline, finetuned)]
            table.add_row(label, *cells)
        self.print(table)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one `error:` line naming the command's help, exit code 2 (as
    every other bad input of the package gets one line, not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[0]
        print(f"error: {message} (see python -m {command} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def end_process(code: int) -> NoReturn:
    """End a command-line process once its main() has returned `code`: everything is written and closed,
    and Python's own shutdown would spend one to two seconds of CPU freeing, one by one, the millions of
    objects that importing torch, torchvision and sympy created. Run the exit handlers (W&B's, logging's),
    flush, and end the process."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
