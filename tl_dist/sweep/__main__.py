"""The command line: `python -m tl_dist.sweep SWEEP.yaml [--output-dir DIR] [train options]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tl_dist.console import CommandParser, end_process
from tl_dist.runtime import EXIT_STOPPED, REPO

ACCELERATE_CONFIG = REPO / "accelerate_configs" / "multi_gpu.yaml"  # what launch/slurm_single_node.sbatch uses


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="tl_dist.sweep", allow_abbrev=False,
                           description="Run a W&B sweep file as an Optuna study: grid, random or bayes (TPE), with "
                                       "early_terminate as successive halving; several workers may share it.",
                           epilog="Every other option goes to each run of tl_dist.train (python -m tl_dist.train "
                                  "--help); the configuration's parameters come after them and win.")
    parser.add_argument("sweep_file", help="a W&B sweep file (YAML): method, parameters, metric, early_terminate, "
                        "run_cap")
    parser.add_argument("--output-dir", help="the sweep folder: the study (study.journal), one run folder per "
                        "configuration, summary.csv (default: runs/sweep-<the sweep's name>)")
    parser.add_argument("--storage", help="an Optuna RDB URL for the study (sqlite:///..., postgresql://...) "
                        "instead of the journal file in the sweep folder")
    parser.add_argument("--num-processes", type=int, default=1, help="training processes per run; more than "
                        "one starts each run under accelerate launch")
    parser.add_argument("--accelerate-config", default=str(ACCELERATE_CONFIG),
                        help="the accelerate config of runs with several processes")
    parser.add_argument("--runs", type=int, help="how many configurations to run (default: the file's run_cap; "
                        "a grid: all of them)")
    parser.add_argument("--count", action="store_true", help="print how many configurations the sweep runs")
    parser.add_argument("--summary", action="store_true", help="collect summary.csv and the ranked table from "
                        "the study and the run folders; run nothing")
    return parser


def check_arguments(args: argparse.Namespace, train_argv: list[str]) -> None:
    from tl_dist.sweep.spec import SweepError

    given = [a for a in train_argv if a.split("=")[0] in ("--resume", "--eval-only")]
    if given:
        raise SweepError(f"{given[0].split('=')[0]}: the sweep resumes each run itself (--resume auto); "
                         "drop it, and run the same sweep command again to continue")
    if args.num_processes < 1 or (args.runs is not None and args.runs < 1):
        raise SweepError("--num-processes and --runs must be positive integers")
    if args.num_processes > 1 and not Path(args.accelerate_config).is_file():
        raise SweepError(f"--accelerate-config {args.accelerate_config} does not exist; pass an accelerate "
                         "config file (see accelerate_configs/)")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from tl_dist.sweep.spec import SweepError, read_sweep, short

    args, train_argv = build_parser().parse_known_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # a log: the table's run folders and the paths stay whole
        console = Console(highlight=False, width=max(console.width, 200), soft_wrap=True)
    try:
        check_arguments(args, train_argv)
        sweep = read_sweep(args.sweep_file)
        if args.count:  # the file alone: no torch import to check the options
            print(sweep.count(args.runs))
            return 0
        output_dir = Path(args.output_dir or f"runs/sweep-{short(sweep.name)}")
        if args.summary:
            return summary_only(sweep, output_dir, args.storage, console)
        return run(sweep, output_dir, args, train_argv, console)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def summary_only(sweep, output_dir: Path, storage: str | None, console) -> int:
    from tl_dist.sweep.study import SweepStudy
    from tl_dist.sweep.summary import summarize

    summarize(SweepStudy.load(sweep, output_dir, storage), console)
    return 0


def run(sweep, output_dir: Path, args: argparse.Namespace, train_argv: list[str], console) -> int:
    """Plan and check everything, open (or make) the study, then work on it until it is done or stopped."""
    from tl_dist.sweep.runner import SweepSignals, TrialRunner, check_validation, run_worker
    from tl_dist.sweep.study import SweepStudy, plan_sweep
    from tl_dist.sweep.summary import summarize

    plan = plan_sweep(sweep, output_dir, train_argv, args.runs)
    check_validation(plan.train_argv, plan.objective)
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    study = SweepStudy.open(plan, args.storage)

    def say(text: str) -> None:
        console.print(text, markup=False)
        sys.stdout.flush()

    try:
        with SweepSignals() as signals:
            statuses = run_worker(study, TrialRunner(args.num_processes, Path(args.accelerate_config), signals), say)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue where it stopped")
        return 130
    summarize(study, console)
    if signals.stopped:
        say(f"the sweep stopped ({signals.stopped}); run the same command again to continue where it stopped")
        return EXIT_STOPPED
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


if __name__ == "__main__":
    end_process(main())  # without Python's slow shutdown
