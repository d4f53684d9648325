"""What the run prints, with rich, on the main process only (the others stay quiet).

In a terminal: live progress bars with loss and images/s. Elsewhere (CI, SLURM logs): one plain line
every `--log-every` steps, since a live display would only print its last frame.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

METRIC_ROWS = [("loss", "test loss", "{:.4f}"), ("accuracy", "top-1 accuracy", "{:.2%}"),
               ("top5_accuracy", "top-5 accuracy", "{:.2%}"), ("mean_class_accuracy", "mean per-class acc.",
               "{:.2%}"), ("precision_macro", "macro precision", "{:.2%}"), ("recall_macro", "macro recall",
               "{:.2%}"), ("f1_macro", "macro F1", "{:.2%}"), ("num_samples", "test images", "{:d}")]


class RunConsole:
    def __init__(self, is_main: bool):
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
    def start_task(self, description: str, total: int, completed: int = 0):
        if self.live:
            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=self.console, transient=False)
                self.progress.start()
            return self.progress.add_task(description, total=total, completed=completed, info="")
        self.print(f"{description}: {total} batches")
        return description

    def advance(self, task, completed: int, total: int, info: str = "", log_line: bool = False) -> None:
        if self.progress is not None:
            self.progress.update(task, completed=completed, info=info)
        elif log_line:
            self.print(f"{task} {completed}/{total} {info}")

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

