"""Sweeps: `python -m tl_dist.sweep SWEEP.yaml [--output-dir DIR] [train options]`.

SWEEP.yaml is a W&B sweep file (the same file works with `wandb sweep`), run here as an Optuna study that
lives in the sweep folder: `method` grid, random or bayes (Optuna's TPE), `parameters` over the train options
by their names (underscores or dashes; dashes are what `wandb agent` passes on unchanged, so `image-size`,
not `image_size`, for a file both use), a `metric` {name, goal}, `early_terminate` (hyperband: Optuna's
successive halving, fed the validation metric after every epoch) and `run_cap` (or `--runs N` here).

Each configuration trains in its own run folder `<output-dir>/<NN>-<options>`, all sharing --cache-dir, all
grouped in W&B under the sweep's name. Any number of workers (this command run again, Slurm array tasks)
share the study and take different configurations; the same command continues a stopped sweep, resuming the
interrupted run from its checkpoint. At the end (or with `--summary`, which runs nothing) it writes
`<output-dir>/summary.csv` and prints the configurations ranked by the sweep's validation metric; the test
split is shown beside it and never used to choose.

The parts: spec.py (the file, its Optuna search space), study.py (the study, its storage and sampler, which
worker runs what), runner.py (the worker loop, a trial's training, signals), pruning.py (the training run's
side of pruning), outcome.py (what a run folder holds), summary.py (ranking, summary.csv, the table) and
__main__.py (the command line).
"""
