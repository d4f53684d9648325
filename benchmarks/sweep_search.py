"""What a sweep that learns and stops early buys, on generated data a small network learns from scratch.

    python benchmarks/sweep_search.py [--trials 16] [--epochs 9] [--seeds 3]

1. Early termination: a random search of --trials trials over lr and momentum with `early_terminate:
   {type: hyperband, min_iter: 1, eta: 3}`, against the same trials (the same --seed queues the same
   configurations) each trained to the end: the wall time of each sweep, and the best validation accuracy it
   found.
2. Bayes against random: the same budget (--trials) over lr alone, for --seeds seeds: the best validation
   accuracy each search finds, and the median over the seeds.

Each sweep is one `python -m tl_dist.sweep` (its trials train one after another in its own process):
vgg_tiny trained from scratch (--freeze none) at 32 px on --classes classes x 40 generated images (colour and
stripe direction by class, tests/conftest.py:make_image_tree), --val-fraction 0.2.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def run_sweep(work: Path, name: str, text: str, a, seed: int) -> tuple[float, float, dict]:
    """One sweep: (wall seconds, best validation accuracy, trials by state and the epochs they trained)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    sweep_file, out = work / f"{name}.yaml", work / name
    sweep_file.write_text(f"name: {name}\n{text}")
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tl_dist.sweep", str(sweep_file), "--output-dir", str(out),
                           "--data-dir", str(work / "data"), "--cache-dir", str(work / "cache"), "--model", "vgg_tiny",
                           "--weights", "none", "--freeze", "none", "--image-size", "32", "--batch-size", "16",
                           "--epochs", str(a.epochs), "--val-fraction", "0.2", "--checkpoint-every-epochs", "0",
                           "--wandb-mode", "disabled", "--seed", str(seed)], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode not in (0, 1):  # 1: a trial failed (a learning rate that diverged), the others count
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(out / "study.journal"))))
    states, best = {"epochs": 0}, study.best_value
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1  # FAIL: a run that diverged
        states["epochs"] += len(trial.intermediate_values) or a.epochs  # a run without pruning reports nothing
    shutil.rmtree(out)  # the run folders' models: keep the disk small
    return wall, best, states


def early_termination(work: Path, a) -> None:
    space = ("method: random\nrun_cap: {n}\nmetric: {{name: val/accuracy, goal: maximize}}\nparameters:\n"
             "  lr: {{distribution: log_uniform_values, min: 0.001, max: 0.3}}\n"
             "  momentum: {{min: 0.5, max: 0.95}}\n").format(n=a.trials)
    pruned = run_sweep(work, "pruned", space + "early_terminate: {type: hyperband, min_iter: 1, eta: 3}\n", a, 0)
    full = run_sweep(work, "full", space, a, 0)
    print(f"1. {a.trials} random trials, {a.epochs} epochs each at most:")
    for label, (wall, best, states) in (("with early_terminate", pruned), ("each to the end", full)):
        print(f"   {label:22s} {wall:7.1f} s, best val/accuracy {best:.2%}, trials {states}")
    print(f"   wall time {pruned[0] / full[0]:.2f}x, epochs trained {pruned[2]['epochs'] / full[2]['epochs']:.2f}x; "
          f"best val/accuracy {pruned[1]:.2%} against {full[1]:.2%}")


def bayes_against_random(work: Path, a) -> None:
    import numpy as np

    found = {"random": [], "bayes": []}
    for seed in range(a.seeds):
        for method in found:
            text = (f"method: {method}\nrun_cap: {a.trials}\nmetric: {{name: val/accuracy, goal: maximize}}\n"
                    "parameters:\n  lr: {distribution: log_uniform_values, min: 0.00001, max: 0.3}\n")
            found[method].append(run_sweep(work, f"{method}-{seed}", text, a, seed)[1])
    print(f"2. bayes against random, {a.trials} trials over lr in [1e-5, 0.3] each, {a.seeds} seeds:")
    for method, best in found.items():
        print(f"   {method:6s} best val/accuracy per seed {', '.join(f'{b:.2%}' for b in best)}; "
              f"median {np.median(best):.2%}")


def main() -> None:
    from conftest import make_image_tree

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--only", choices=("early", "bayes"), default=None)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tl_dist-sweep-search-"))
    make_image_tree(work / "data", classes=a.classes, per_class=40, size=32)
    print(f"work folder {work}")
    if a.only in (None, "early"):
        early_termination(work, a)
    if a.only in (None, "bayes"):
        bayes_against_random(work, a)


if __name__ == "__main__":
    main()
