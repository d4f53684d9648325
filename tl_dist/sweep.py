"""Sweeps on one machine: `python -m tl_dist.sweep SWEEP.yaml [train options]`.

SWEEP.yaml is a W&B sweep file (the same file works with `wandb sweep`): `method` grid or random,
`parameters` over the train options by their names (underscores or dashes; dashes are what `wandb agent`
passes on unchanged, so `image-size`, not `image_size`, for a file both use), each with `values`, `value`
or a `distribution`, a `metric` {name, goal} and, for random, `run_cap` (or `--runs N` here). Every
configuration runs in turn as a fresh training process (`python -m tl_dist.train`, or `accelerate launch`
with `--num-processes N`) in its own run folder `<output-dir>/<NN>-<options>`, all sharing --cache-dir, all
grouped in W&B under the sweep's name. A configuration whose folder holds its finished run is skipped; an
unfinished one continues (`--resume auto`), so running the same command again resumes the sweep.

At the end (or with `--summary`, which runs nothing) it writes `<output-dir>/summary.csv` and prints the
runs ranked by the sweep's metric, a validation metric (`val/accuracy` unless the file says otherwise).
The test split is shown beside it and never used to rank. Without a validation split (--val-fraction 0)
it ranks on the final training loss and says why that is weak.

`--count` prints how many configurations the file defines; `--index I` runs configuration I only, and
`--index I --print-args` prints its training options (NUL-separated), which is what a Slurm array task
runs (launch/slurm_sweep.sbatch).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import math
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tl_dist.console import CommandParser, end_process
from tl_dist.config import RUN_DEFINING, Config, as_saved, parse_args
from tl_dist.runtime import EXIT_STOPPED
from tl_dist.run_dir import RunDir, read_json, verify, write_text

SUMMARY_FILE = "summary.csv"  # in the sweep folder (--output-dir), beside the run folders
REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIG = REPO / "accelerate_configs" / "multi_gpu.yaml"  # what launch/slurm_single_node.sbatch uses

# W&B's top-level keys (docs.wandb.ai, "Sweep configuration options").
SWEEP_KEYS = ("program", "entity", "project", "description", "name", "method", "metric", "parameters",
              "early_terminate", "command", "run_cap")
METHODS = ("grid", "random")
# What the sweep decides for each run itself, so not a parameter.
NOT_PARAMETERS = ("output_dir", "resume", "eval_only", "config")
DEFAULT_METRIC = ("val/accuracy", "maximize")
RANKABLE = ("val/loss", "val/accuracy", "val/top5_accuracy", "train/loss")
TRAIN_LOSS = "train/loss"
WEAK_RANKING = ("ranked on the final training loss: these runs have no validation split (pass --val-fraction, "
                "e.g. 0.1); a low training loss rewards fitting the training images, not generalising to new ones")


class SweepError(ValueError):
    """The sweep file or the sweep's options cannot be used; the message says what to do."""


# ---------------------------------------------------------------- the sweep file


@dataclass
class Sweep:
    path: Path
    name: str
    method: str
    parameters: dict[str, dict]  # train option (underscores) -> its W&B search constraint
    metric: str
    goal: str  # minimize | maximize
    run_cap: int | None
    project: str | None = None
    entity: str | None = None
    notes: tuple[str, ...] = ()  # what the file asks that this runner does not do


def train_options() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)
            if not f.metadata.get("internal") and f.name not in NOT_PARAMETERS}


def read_sweep(path: str | Path) -> Sweep:
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"cannot read the sweep file {path} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path} holds no mapping of W&B sweep keys ({', '.join(SWEEP_KEYS)})")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; a W&B sweep file has {', '.join(SWEEP_KEYS)}")
    method = spec.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method {method!r} cannot run here; use grid or random"
                         + (" (bayes needs W&B's server: wandb sweep, then wandb agent)" if method == "bayes" else ""))
    metric, goal, notes = _metric(path, spec.get("metric"))
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise SweepError(f"{path}: run_cap must be a positive integer, got {run_cap!r}")
    if spec.get("early_terminate"):
        notes += ("early_terminate is done by W&B's server; every run here trains to the end",)
    return Sweep(path, str(spec.get("name") or path.stem), method, _parameters(path, spec.get("parameters"), method),
                 metric, goal, run_cap, spec.get("project"), spec.get("entity"), notes)


def _metric(path: Path, metric) -> tuple[str, str, tuple[str, ...]]:
    if metric is None:
        return (*DEFAULT_METRIC, ())
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"{path}: metric must be {{name: ..., goal: minimize|maximize}}, got {metric!r}")
    name, goal = metric["name"], metric.get("goal")
    if name.split("/")[0] in ("test", "finetuned", "baseline"):
        raise SweepError(f"{path}: metric {name}: the test split is never used to choose; rank on one of "
                         f"{', '.join(RANKABLE)} (val/... needs --val-fraction)")
    if name not in RANKABLE:
        raise SweepError(f"{path}: metric {name!r} is not one a run reports; use one of {', '.join(RANKABLE)}")
    if goal not in (None, "minimize", "maximize"):
        raise SweepError(f"{path}: metric goal {goal!r}: use minimize or maximize")
    notes = () if goal else (f"metric {name} has no goal: minimizing it, as W&B does; add `goal: maximize` "
                             "to the file for an accuracy",)
    return name, goal or "minimize", notes


def _parameters(path: Path, parameters, method: str) -> dict[str, dict]:
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: parameters is empty; give at least one train option with values, value "
                         "or a distribution")
    known = train_options()
    found = {}
    for raw, spec in parameters.items():
        name = str(raw).replace("-", "_")
        if name not in known:
            raise SweepError(f"{path}: unknown parameter {raw!r}; the train options are: {', '.join(known)}")
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameter {raw} must be a mapping (values: [...], value: ..., or a "
                             f"distribution), got {spec!r}")
        if "parameters" in spec:
            raise SweepError(f"{path}: parameter {raw}: nested parameters have no train option to go to")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise SweepError(f"{path}: parameter {raw}: values must be a non-empty list, got {spec['values']!r}")
        if method == "grid" and not ("values" in spec or "value" in spec):
            raise SweepError(f"{path}: parameter {raw}: a grid takes values or value (W&B's grid does not draw "
                             "from a distribution); use method: random")
        if method == "random":
            draw(spec, random.Random(0), raw)  # fails now on a distribution it cannot draw from
        found[name] = spec
    return found


# ---------------------------------------------------------------- configurations


def _q(x: float, spec: dict) -> float:
    q = spec.get("q", 1)
    return round(x / q) * q


# W&B's distributions, by name: each draws one value from the spec's min/max (or mu/sigma).
DISTRIBUTIONS = {
    "uniform": lambda s, r: r.uniform(s["min"], s["max"]),
    "int_uniform": lambda s, r: r.randint(int(s["min"]), int(s["max"])),
    "q_uniform": lambda s, r: _q(r.uniform(s["min"], s["max"]), s),
    "log_uniform": lambda s, r: math.exp(r.uniform(s["min"], s["max"])),
    "log_uniform_values": lambda s, r: math.exp(r.uniform(math.log(s["min"]), math.log(s["max"]))),
    "q_log_uniform": lambda s, r: _q(math.exp(r.uniform(s["min"], s["max"])), s),
    "q_log_uniform_values": lambda s, r: _q(math.exp(r.uniform(math.log(s["min"]), math.log(s["max"]))), s),
    "inv_log_uniform": lambda s, r: 1 / math.exp(r.uniform(s["min"], s["max"])),
    "inv_log_uniform_values": lambda s, r: 1 / math.exp(r.uniform(math.log(1 / s["max"]), math.log(1 / s["min"]))),
    "normal": lambda s, r: r.gauss(s.get("mu", 0), s.get("sigma", 1)),
    "q_normal": lambda s, r: _q(r.gauss(s.get("mu", 0), s.get("sigma", 1)), s),
    "log_normal": lambda s, r: math.exp(r.gauss(s.get("mu", 0), s.get("sigma", 1))),
    "q_log_normal": lambda s, r: _q(math.exp(r.gauss(s.get("mu", 0), s.get("sigma", 1))), s),
}


def draw(spec: dict, rng: random.Random, name: str = ""):
    """One value of a parameter, as W&B's random search draws it (its default distribution: categorical
    for values, constant for value, int_uniform or uniform for int or float min/max)."""
    kind = spec.get("distribution")
    if kind is None:
        kind = ("categorical" if "values" in spec else "constant" if "value" in spec else
                "int_uniform" if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int) else "uniform")
    try:
        if kind == "constant":
            return spec["value"]
        if kind == "categorical":
            weights = spec.get("probabilities")
            return rng.choices(spec["values"], weights=weights)[0]
        if kind not in DISTRIBUTIONS:
            raise SweepError(f"parameter {name}: unknown distribution {kind!r}; use one of "
                             f"constant, categorical, {', '.join(DISTRIBUTIONS)}")
        return DISTRIBUTIONS[kind](spec, rng)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SweepError):
            raise
        raise SweepError(f"parameter {name}: distribution {kind} cannot draw from {spec!r} "
                         f"({type(exc).__name__}: {exc})") from None


def configurations(sweep: Sweep, seed: int, runs: int | None) -> list[dict]:
    """Every configuration, in order: the grid's product (the file's order, the last parameter fastest),
    or `runs` (else run_cap) random draws seeded with `seed`, so the same file gives the same runs."""
    names = list(sweep.parameters)
    if sweep.method == "grid":
        choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep.parameters.values()]
        found = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        cap = runs or sweep.run_cap
        return found[:cap] if cap else found
    count = runs or sweep.run_cap
    if not count:
        raise SweepError(f"{sweep.path}: method random draws until stopped in W&B; here give its number of runs: "
                         "run_cap: N in the file, or --runs N")
    rng = random.Random(seed)
    return [{name: draw(spec, rng, name) for name, spec in sweep.parameters.items()} for _ in range(count)]


def varying(sweep: Sweep) -> list[str]:
    """The parameters whose value can differ between configurations, from the file alone (so the run
    folders they name stay the same whatever --runs says)."""
    def fixed(spec: dict) -> bool:
        if "values" in spec:
            return len(spec["values"]) == 1
        return spec.get("distribution", "constant" if "value" in spec else None) == "constant"

    return [name for name, spec in sweep.parameters.items() if not fixed(spec)]


def _short(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def folder_names(sweep: Sweep, configs: list[dict]) -> list[str]:
    """`<NN>-<name>=<value>,...` (hydra's multirun style), the index first so names stay unique and sorted."""
    width = max(2, len(str(len(configs) - 1)))
    names = varying(sweep)

    def name(i: int, config: dict) -> str:
        options = ",".join(f"{n}={_short(config[n])}" for n in names)[:80]
        return f"{i:0{width}d}" + (f"-{options}" if options else "")

    return [name(i, c) for i, c in enumerate(configs)]


# ---------------------------------------------------------------- one run's options


def option_argv(options: dict) -> list[str]:
    """Train flags for {option: value}: a bool is its flag or nothing; an int option takes 3.0 as 3."""
    known = train_options()
    argv = []
    for name, value in options.items():
        kind = known[name].type.split(" |")[0]
        if kind == "bool":
            argv += [f"--{name.replace('_', '-')}"] if value else []
            continue
        if value is None:
            continue
        if kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def check_options(argv: list[str], where: str) -> Config:
    """The options parsed as tl_dist.train parses them; its error becomes a SweepError naming `where`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(argv)
    except SystemExit:
        last = [line for line in err.getvalue().splitlines() if "error:" in line][-1:]
        why = last[0].split("error:", 1)[1].strip() if last else err.getvalue().strip()
        raise SweepError(f"{where}: {why}") from None


@dataclass
class Plan:
    """The sweep resolved: its configurations, their folders and their full training options."""
    sweep: Sweep
    output_dir: Path
    configs: list[dict]
    folders: list[Path]
    argvs: list[list[str]]  # tl_dist.train options of each configuration
    cfgs: list[Config]


def plan_sweep(sweep: Sweep, output_dir: Path, train_argv: list[str], runs: int | None) -> Plan:
    """Every configuration's folder and options (the user's train options, then the configuration's), each
    checked as tl_dist.train would check it, before anything runs."""
    base = check_options(train_argv, "train options")
    configs = configurations(sweep, base.seed, runs)
    if not configs:
        raise SweepError(f"{sweep.path}: the grid is empty")
    extra = []
    if not base.wandb_group:
        extra += ["--wandb-group", sweep.name]
    if sweep.project and not base.wandb_project:
        extra += ["--wandb-project", str(sweep.project)]
    if sweep.entity and not base.wandb_entity:
        extra += ["--wandb-entity", str(sweep.entity)]
    folders = [output_dir / name for name in folder_names(sweep, configs)]
    argvs, cfgs = [], []
    for i, (config, folder) in enumerate(zip(configs, folders)):
        argv = [*train_argv, *extra, *option_argv(config), "--output-dir", str(folder), "--resume", "auto"]
        cfgs.append(check_options(argv, f"{sweep.path}, configuration {i} ({folder.name})"))
        argvs.append(argv)
    return Plan(sweep, output_dir, configs, folders, argvs, cfgs)


def run_finished(folder: Path) -> bool:
    """The folder holds a finished run: its metrics are written and its final model verifies."""
    run_dir = RunDir(folder)
    return run_dir.metrics.is_file() and run_dir.config.is_file() and verify(run_dir.final_model) is None


def is_finished(folder: Path, cfg: Config) -> bool:
    """The folder holds this configuration's finished run: finished, and its config.json agrees on what
    defines the run and on its length (else tl_dist.train's --resume auto extends it or says why not)."""
    if not run_finished(folder):
        return False
    saved = read_json(RunDir(folder).config)
    keys = set(RUN_DEFINING) | {"epochs", "max_steps", "val_fraction"}
    return all(saved[k] == as_saved(getattr(cfg, k)) for k in keys if k in saved and hasattr(cfg, k))


# ---------------------------------------------------------------- running


def launcher(num_processes: int, accelerate_config: Path, cfg: Config) -> list[str]:
    """`python -m tl_dist.train`, or `accelerate launch` with an explicit config (never the user's default
    one, which may pin GPUs) for several processes; bf16 on CUDA, fp32 on the CPU unless asked."""
    if num_processes == 1:
        return [sys.executable, "-m", "tl_dist.train"]
    precision = cfg.mixed_precision
    if precision is None:
        import torch

        precision = "bf16" if torch.cuda.is_available() else "no"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "--num_machines", "1", "--num_processes", str(num_processes), "--main_process_port", "0",
            "--mixed_precision", precision, str(REPO / "tl_dist" / "train.py")]


def run_child(cmd: list[str], run_dir: RunDir) -> tuple[int, bool]:
    """Run one training process. SIGTERM or SIGUSR1 sent to the sweep touch the run's STOP file (which
    reaches every process, also under accelerate launch, whose launcher does not pass SIGUSR1 on) and
    SIGTERM goes to the process too: the run checkpoints and exits 75. Ctrl-C, which the terminal sends to
    both, reaches the run by itself. Any of them stops the sweep after this run. Returns (exit code, stop)."""
    stop = False
    run_dir.stop_file.unlink(missing_ok=True)  # a leftover would stop the run at once
    child = subprocess.Popen(cmd)

    def on_signal(signum, frame):
        nonlocal stop
        stop = True
        if signum != signal.SIGINT:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            run_dir.stop_file.touch()
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        return child.wait(), stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run_dir.stop_file.unlink(missing_ok=True)


def run_sweep(plan: Plan, indices: list[int], num_processes: int, accelerate_config: Path,
              print_line) -> tuple[dict[int, str], bool]:
    """Run the configurations `indices` in turn. Returns {index: status} of those that did not finish, and
    whether the sweep was stopped (a signal, or a run that checkpointed and exited 75)."""
    statuses = {}
    for i in indices:
        folder, cfg = plan.folders[i], plan.cfgs[i]
        if is_finished(folder, cfg):
            print_line(f"[{i + 1}/{len(plan.configs)}] {folder.name}: finished already, skipped")
            continue
        print_line(f"[{i + 1}/{len(plan.configs)}] {folder.name}: "
                   + ("continuing" if RunDir(folder).holds_run() else "starting") + f" in {folder}")
        code, stop = run_child(launcher(num_processes, accelerate_config, cfg) + plan.argvs[i], RunDir(folder))
        if code != 0:  # accelerate launch exits 1 where its run exits 75: a signal tells those apart
            statuses[i] = "stopped" if code == EXIT_STOPPED or stop else f"failed (exit {code})"
            print_line(f"[{i + 1}/{len(plan.configs)}] {folder.name}: {statuses[i]}")
        if stop or code == EXIT_STOPPED:
            return statuses, True
    return statuses, False


# ---------------------------------------------------------------- the summary

SPLIT_METRICS = ("loss", "accuracy", "top5_accuracy")


def run_metrics(folder: Path) -> dict[str, float]:
    """val/..., test/... and train/loss (the last epoch's) from a run's metrics.json; {} without one."""
    path = RunDir(folder).metrics
    if not path.is_file():
        return {}
    saved = read_json(path)
    found = {f"{split}/{k}": saved[split][k] for split in ("val", "test") if isinstance(saved.get(split), dict)
             for k in SPLIT_METRICS if k in saved[split]}
    losses = (saved.get("train") or {}).get("epoch_loss") or []
    if losses:
        found[TRAIN_LOSS] = losses[-1]
    return found


@dataclass
class Row:
    index: int
    folder: Path
    options: dict
    status: str
    metrics: dict
    rank: int | None = None


def collect(plan: Plan, session: dict[int, str] | None = None) -> list[Row]:
    """One row per configuration, from its run folder (and this session's exit codes)."""
    rows = []
    for i, folder in enumerate(plan.folders):
        status = (session or {}).get(i)
        if status is None:
            status = ("finished" if run_finished(folder) else "unfinished" if RunDir(folder).holds_run()
                      else "not run")
        rows.append(Row(i, folder, plan.configs[i], status, run_metrics(folder) if status == "finished" else {}))
    return rows


def rank(sweep: Sweep, rows: list[Row]) -> tuple[str, str, str | None]:
    """Number the finished rows by the sweep's metric (test metrics never rank). Returns (metric, goal, note):
    without validation metrics in every finished run, the final training loss, with a note on why that is
    weak."""
    metric, goal, note = sweep.metric, sweep.goal, None
    finished = [r for r in rows if r.metrics]
    if metric != TRAIN_LOSS and not (finished and all(metric in r.metrics for r in finished)):
        metric, goal = TRAIN_LOSS, "minimize"
    if metric == TRAIN_LOSS and finished:
        note = WEAK_RANKING
    ranked = sorted((r for r in finished if metric in r.metrics),
                    key=lambda r: -r.metrics[metric] if goal == "maximize" else r.metrics[metric])
    for position, row in enumerate(ranked, 1):
        row.rank = position
    return metric, goal, note


def write_summary(plan: Plan, rows: list[Row]) -> Path:
    """summary.csv: one row per configuration, best first (unranked ones last, by index)."""
    names = list(plan.sweep.parameters)
    columns = (["rank", "index", *names, *(m.replace("/", "_") for m in ("val/loss", "val/accuracy",
               "val/top5_accuracy", TRAIN_LOSS, "test/loss", "test/accuracy", "test/top5_accuracy")),
               "run_folder", "status"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in sorted(rows, key=lambda r: (r.rank is None, r.rank or 0, r.index)):
        metrics = [row.metrics.get(c.replace("_", "/", 1), "") for c in columns[2 + len(names):-2]]
        writer.writerow([row.rank or "", row.index, *(row.options[n] for n in names), *metrics, row.folder,
                         row.status])
    path = plan.output_dir / SUMMARY_FILE
    write_text(path, out.getvalue())
    return path


def _cell(metric: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if "accuracy" in metric else f"{value:.4f}"


def print_table(plan: Plan, rows: list[Row], metric: str, goal: str, console) -> None:
    from rich.table import Table

    names = varying(plan.sweep) or list(plan.sweep.parameters)
    table = Table(title=f"sweep {plan.sweep.name}: {len(rows)} configuration(s), ranked by {metric} ({goal})")
    table.add_column("rank", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right", style="bold")
    table.add_column("test/accuracy (never ranks)", justify="right")
    table.add_column("run folder")
    table.add_column("status")
    for row in sorted(rows, key=lambda r: (r.rank is None, r.rank or 0, r.index)):
        table.add_row(str(row.rank or "-"), *(_short(row.options[n]) for n in names),
                      _cell(metric, row.metrics.get(metric)), _cell("accuracy", row.metrics.get("test/accuracy")),
                      row.folder.name, row.status)
    console.print(table)


def summarize(plan: Plan, session: dict[int, str] | None, console) -> list[Row]:
    rows = collect(plan, session)
    metric, goal, note = rank(plan.sweep, rows)
    print_table(plan, rows, metric, goal, console)
    if note:
        console.print(f"note: {note}")
    console.print(f"summary: {write_summary(plan, rows)}")
    return rows


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="tl_dist.sweep", allow_abbrev=False,
                     description="Run a W&B sweep file's configurations on this machine, one after another.",
                     epilog="Every other option goes to each run of tl_dist.train (python -m tl_dist.train "
                            "--help); the configuration's parameters come after them and win.")
    parser.add_argument("sweep_file", help="a W&B sweep file (YAML): method grid or random, parameters, metric")
    parser.add_argument("--output-dir", help="the sweep folder: one run folder per configuration, and "
                        "summary.csv (default: runs/sweep-<the sweep's name>)")
    parser.add_argument("--num-processes", type=int, default=1, help="training processes per run; more than "
                        "one starts each run under accelerate launch")
    parser.add_argument("--accelerate-config", default=str(ACCELERATE_CONFIG),
                        help="the accelerate config of runs with several processes")
    parser.add_argument("--runs", type=int, help="method random: how many configurations to draw (default: the "
                        "file's run_cap); grid: run only the first N")
    parser.add_argument("--count", action="store_true", help="print how many configurations the file defines")
    parser.add_argument("--index", type=int, help="run configuration I only (0-based; a Slurm array task)")
    parser.add_argument("--print-args", action="store_true", help="with --index: print the training options of "
                        "that configuration, NUL-separated, and run nothing (launch/slurm_sweep.sbatch)")
    parser.add_argument("--summary", action="store_true", help="collect summary.csv and the ranked table from "
                        "the run folders; run nothing")
    return parser


def resolve(args: argparse.Namespace, train_argv: list[str]) -> Plan:
    """The sweep file and the options, checked; raises SweepError."""
    given = [a for a in train_argv if a.split("=")[0] in ("--resume", "--eval-only")]
    if given:
        raise SweepError(f"{given[0].split('=')[0]}: the sweep resumes each run itself (--resume auto); "
                         "drop it, and run the same sweep command again to continue")
    if args.num_processes < 1 or (args.runs is not None and args.runs < 1):
        raise SweepError("--num-processes and --runs must be positive integers")
    if args.print_args and args.index is None:
        raise SweepError("--print-args needs --index I")
    if args.num_processes > 1 and not Path(args.accelerate_config).is_file():
        raise SweepError(f"--accelerate-config {args.accelerate_config} does not exist; pass an accelerate "
                         "config file (see accelerate_configs/)")
    sweep = read_sweep(args.sweep_file)
    output_dir = Path(args.output_dir or f"runs/sweep-{_short(sweep.name)}")
    plan = plan_sweep(sweep, output_dir, train_argv, args.runs)
    if args.index is not None and not 0 <= args.index < len(plan.configs):
        raise SweepError(f"--index {args.index}: {sweep.path} defines configurations 0 to {len(plan.configs) - 1} "
                         f"(submit the array as --array=0-{len(plan.configs) - 1})")
    if args.summary and not output_dir.is_dir():
        raise SweepError(f"--summary: {output_dir} does not exist; pass the --output-dir the sweep ran in")
    return plan


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args, train_argv = build_parser().parse_known_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # a log: the table's run folders and the paths stay whole
        console = Console(highlight=False, width=max(console.width, 200), soft_wrap=True)
    try:
        if args.count:  # the file alone: no seed changes how many (and no torch import to check options)
            if args.runs is not None and args.runs < 1:
                raise SweepError("--runs must be a positive integer")
            print(len(configurations(read_sweep(args.sweep_file), 0, args.runs)))
            return 0
        plan = resolve(args, train_argv)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in plan.sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.print_args:
        if is_finished(plan.folders[args.index], plan.cfgs[args.index]):
            print(f"{plan.folders[args.index]} is finished already: nothing to run", file=sys.stderr)
            return 0
        sys.stdout.write("".join(a + "\0" for a in plan.argvs[args.index]))
        return 0
    if args.summary:
        summarize(plan, None, console)
        return 0
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    indices = [args.index] if args.index is not None else list(range(len(plan.configs)))

    def line(text: str) -> None:
        console.print(text)
        sys.stdout.flush()

    statuses, stopped = run_sweep(plan, indices, args.num_processes, Path(args.accelerate_config), line)
    if args.index is None:
        summarize(plan, statuses, console)
    if stopped:
        line("the sweep stopped; run the same command again to continue where it stopped")
        return EXIT_STOPPED
    return 1 if statuses else 0


if __name__ == "__main__":
    end_process(main())  # without Python's slow shutdown
