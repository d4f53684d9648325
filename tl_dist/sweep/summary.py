"""The sweep's results: one row per configuration from the study and the run folders, ranked by the sweep's
validation metric (the test split is shown beside it and never ranks), written to summary.csv and printed as
a table. A row's status is what its run folder holds (finished, pruned after epoch N), else what the study
says of its latest attempt (running, stopped, failed, not run).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import TrialState

from tl_dist.run_dir import RunDir, read_json, write_text
from tl_dist.sweep.outcome import read_run
from tl_dist.sweep.spec import TRAIN_LOSS, Sweep, short
from tl_dist.sweep.study import Configuration, SweepStudy

SUMMARY_FILE = "summary.csv"  # in the sweep folder, beside the run folders
COLUMNS = ("val/loss", "val/accuracy", "val/top5_accuracy", TRAIN_LOSS, "test/loss", "test/accuracy",
           "test/top5_accuracy")
WEAK_RANKING = ("ranked on the final training loss: these runs have no validation split (pass --val-fraction, "
                "e.g. 0.1); a low training loss rewards fitting the training images, not generalising to new ones")


@dataclass
class Row:
    index: int
    trial: int | None  # Optuna's number of the latest attempt
    folder: Path
    options: dict
    status: str
    metrics: dict
    rank: int | None = None


def row_of(config: Configuration) -> Row:
    run = read_run(config.folder)
    if run.status in ("finished", "pruned"):
        status = run.describe()
    elif config.trial.state == TrialState.RUNNING:
        status = "running" if config.held else "stopped (the same command continues it)"
    elif config.trial.state == TrialState.FAIL:
        attrs = config.trial.user_attrs
        status = f"failed: {attrs['error']}" if "error" in attrs else f"failed (exit {attrs.get('exit_code', '?')})"
    elif config.trial.state == TrialState.WAITING:
        status = "not run"
    else:  # the study has a result the folder no longer shows
        status = f"{run.status} (the study says {config.trial.state.name.lower()})"
    if run.damaged:
        status += f"; cannot read {run.damaged}"
    return Row(config.index, config.trial.number, config.folder, config.options, status, run.metrics)


def rank(sweep: Sweep, rows: list[Row]) -> tuple[str, str, str | None]:
    """Number the finished rows by the sweep's metric (test metrics never rank; pruned runs stopped early and
    are not compared). Returns (metric, goal, note): without validation metrics in every finished run, the final
    training loss, with a note on why that is weak."""
    metric, goal, note = sweep.metric, sweep.goal, None
    finished = [r for r in rows if r.status == "finished"]
    if metric != TRAIN_LOSS and not (finished and all(metric in r.metrics for r in finished)):
        metric, goal = TRAIN_LOSS, "minimize"
    if metric == TRAIN_LOSS and finished:
        note = _why_no_validation(finished) or WEAK_RANKING
    ranked = sorted((r for r in finished if metric in r.metrics),
                    key=lambda r: -r.metrics[metric] if goal == "maximize" else r.metrics[metric])
    for position, row in enumerate(ranked, 1):
        row.rank = position
    return metric, goal, note


def _why_no_validation(finished: list[Row]) -> str | None:
    """Runs that asked for a validation split and got no image in it (classes too small) say so."""
    for row in finished:
        try:
            config = read_json(RunDir(row.folder).config)
        except (OSError, ValueError):
            continue
        if config.get("val_fraction") and not config.get("val_samples"):
            return (f"ranked on the final training loss: {row.folder.name} asked for --val-fraction "
                    f"{config['val_fraction']} and got no validation image (its classes keep at most one training "
                    "image each); raise --val-fraction, or use classes with more images")
    return None


def write_summary(sweep: Sweep, folder: Path, rows: list[Row]) -> Path:
    """summary.csv: one row per configuration, best first (unranked ones last, by index)."""
    names = sweep.order
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "index", "trial", *names, *(m.replace("/", "_") for m in COLUMNS), "run_folder",
                     "status"])
    for row in ordered(rows):
        writer.writerow([row.rank or "", row.index, "" if row.trial is None else row.trial,
                         *(row.options.get(n, "") for n in names), *(row.metrics.get(m, "") for m in COLUMNS),
                         row.folder, row.status])
    path = folder / SUMMARY_FILE
    write_text(path, out.getvalue())
    return path


def ordered(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.rank is None, r.rank or 0, r.index))


def _cell(metric: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if "accuracy" in metric else f"{value:.4f}"


def print_table(sweep: Sweep, rows: list[Row], metric: str, goal: str, console) -> None:
    from rich.table import Table

    names = sweep.varying() or sweep.order
    table = Table(title=f"sweep {sweep.name}: {len(rows)} configuration(s), ranked by {metric} ({goal})")
    table.add_column("rank", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right", style="bold")
    table.add_column("test/accuracy (never ranks)", justify="right")
    table.add_column("run folder")
    table.add_column("status")
    for row in ordered(rows):
        table.add_row(str(row.rank or "-"), *(short(row.options.get(n, "")) for n in names),
                      _cell(metric, row.metrics.get(metric)), _cell("accuracy", row.metrics.get("test/accuracy")),
                      row.folder.name, row.status)
    console.print(table)


def summarize(study: SweepStudy, console) -> list[Row]:
    rows = [row_of(config) for config in study.configurations()]
    metric, goal, note = rank(study.sweep, rows)
    print_table(study.sweep, rows, metric, goal, console)
    if note:
        console.print(f"note: {note}")
    console.print(f"summary: {write_summary(study.sweep, study.folder, rows)}")
    return rows
