"""Sweeps (`python -m tl_dist.sweep`): a W&B sweep file's grid run as real training processes, one run folder
each, summary.csv ranked by the sweep's metric (test accuracy beside it, never ranking), W&B runs grouped
under the sweep's name, finished configurations skipped and unfinished ones continued when the sweep runs
again (there on 2 processes, under accelerate launch) and after a SIGTERM that stopped the sweep, random
draws fixed by --seed, the same configurations through `wandb agent`'s command line, and one `error:` line
for every bad sweep file."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wandb_reader
from conftest import REPO, make_image_tree, read_metrics, run_env, run_module
from tl_dist import sweep as sw

GRID = """\
name: lr-epochs
program: tl_dist/train.py
method: grid
metric: {name: val/accuracy, goal: maximize}
parameters:
  lr: {values: [0.05, 0.002]}
  epochs: {values: [1, 2]}
  dropout: {value: 0.1}
"""
FOLDERS = ["00-lr=0.05,epochs=1", "01-lr=0.05,epochs=2", "02-lr=0.002,epochs=1", "03-lr=0.002,epochs=2"]


def sweep_args(sweep_file: Path, out: Path, data: Path, cache: Path, *extra: str) -> list[str]:
    return [str(sweep_file), "--output-dir", str(out), "--data-dir", str(data), "--cache-dir", str(cache),
            "--model", "vgg_tiny", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--checkpoint-every-epochs", "1", "--wandb-mode", "offline", *extra]


def read_summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """The 4-configuration grid, run once: (sweep file, sweep folder, data, cache, the process)."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_image_tree(root / "data")
    sweep_file = root / "grid.yaml"
    sweep_file.write_text(GRID)
    out, cache = root / "sweep", root / "cache"
    proc = run_module(sweep_args(sweep_file, out, data, cache), module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return sweep_file, out, data, cache, proc


def test_count_prints_the_number_of_configurations(tmp_path):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(GRID)
    proc = run_module([str(sweep_file), "--count"], module="tl_dist.sweep")
    assert proc.returncode == 0 and proc.stdout == "4\n", proc.stderr
    capped = tmp_path / "capped.yaml"
    capped.write_text(GRID + "run_cap: 3\n")
    assert run_module([str(capped), "--count"], module="tl_dist.sweep").stdout == "3\n"


def test_grid_runs_every_configuration_in_its_own_folder(grid_sweep):
    _, out, _, cache, proc = grid_sweep
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == FOLDERS
    for folder, (lr, epochs) in zip(FOLDERS, [(0.05, 1), (0.05, 2), (0.002, 1), (0.002, 2)]):
        metrics = read_metrics(out / folder)
        assert (metrics["config"]["lr"], metrics["config"]["epochs"], metrics["config"]["dropout"]) == (lr, epochs, 0.1)
        assert len(metrics["train"]["epoch_loss"]) == epochs
        assert metrics["config"]["cache_dir"] == str(cache)
    # One decoded-image cache shared by all four runs: decoded by the first, reused by the others.
    assert len(list(cache.glob("images-*.npy"))) == 1
    assert proc.stdout.count("decoding 40 images once") == 1
    assert [f"[{i + 1}/4] {name}: starting" in proc.stdout for i, name in enumerate(FOLDERS)] == [True] * 4


def test_summary_ranks_on_training_loss_without_a_validation_split(grid_sweep):
    _, out, _, _, proc = grid_sweep
    rows = read_summary(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    losses = {Path(r["run_folder"]).name: float(r["train_loss"]) for r in rows}
    expected = {name: read_metrics(out / name)["train"]["epoch_loss"][-1] for name in FOLDERS}
    assert losses == expected
    assert [Path(r["run_folder"]).name for r in rows] == sorted(FOLDERS, key=expected.get)
    for r in rows:
        metrics = read_metrics(r["run_folder"])
        assert float(r["test_accuracy"]) == metrics["test"]["accuracy"]
        assert float(r["test_loss"]) == metrics["test"]["loss"]
        assert (float(r["lr"]), int(r["epochs"]), float(r["dropout"])) == (
            metrics["config"]["lr"], metrics["config"]["epochs"], metrics["config"]["dropout"])
        assert r["status"] == "finished" and r["val_accuracy"] == ""
    assert "ranked by train/loss (minimize)" in proc.stdout
    assert proc.stdout.count("note: ranked on the final training loss: these runs have no validation split") == 1


def test_runs_are_grouped_in_wandb_under_the_sweep_name(grid_sweep):
    out = grid_sweep[1]
    for name in FOLDERS:
        (run,) = wandb_reader.run_dirs(out / name / "wandb")
        record = next(r.run for r in wandb_reader.records(run) if r.WhichOneof("record_type") == "run")
        assert (record.run_group, record.display_name) == ("lr-epochs", name)


def test_summary_command_collects_without_running(grid_sweep):
    sweep_file, out, *_ = grid_sweep
    before = (out / "summary.csv").read_text()
    (out / "summary.csv").unlink()
    proc = run_module([str(sweep_file), "--summary", "--output-dir", str(out)], module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.csv").read_text() == before
    assert "starting" not in proc.stdout and "sweep lr-epochs: 4 configuration(s)" in proc.stdout
    for name in FOLDERS:
        assert name in proc.stdout


def test_print_args_gives_a_configurations_training_options(grid_sweep, tmp_path):
    sweep_file, out, data, cache, _ = grid_sweep
    proc = run_module(sweep_args(sweep_file, tmp_path / "other", data, cache, "--index", "2", "--print-args"),
                      module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split("\0")
    assert argv[-1] == "" and argv[:2] == ["--data-dir", str(data)]
    assert argv[-13:-1] == ["--wandb-group", "lr-epochs", "--lr", "0.002", "--epochs", "1", "--dropout", "0.1",
                            "--output-dir", str(tmp_path / "other" / FOLDERS[2]), "--resume", "auto"]
    # A finished configuration: nothing to run.
    done = run_module(sweep_args(sweep_file, out, data, cache, "--index", "2", "--print-args"), module="tl_dist.sweep")
    assert done.returncode == 0 and done.stdout == "" and "is finished already" in done.stderr


def test_a_second_sweep_skips_finished_runs_and_continues_the_others(grid_sweep, tmp_path):
    """Run again over a copy: 0 and 2 finished (skipped, untouched), 1 interrupted before its final model
    (continued from its checkpoint), 3 never started (started alone with --index 3 first, then skipped);
    the new runs on 2 processes."""
    sweep_file, out, data, cache, _ = grid_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / FOLDERS[1] / "model")
    (copy / FOLDERS[1] / "metrics.json").unlink()
    shutil.rmtree(copy / FOLDERS[3])
    untouched = {n: (copy / n / "metrics.json").stat().st_mtime_ns for n in (FOLDERS[0], FOLDERS[2])}
    summary = (copy / "summary.csv").read_text()

    # --index 3: that configuration only (what an array task runs), and no summary.
    one = run_module(sweep_args(sweep_file, copy, data, cache, "--num-processes", "2", "--index", "3"),
                     module="tl_dist.sweep")
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    assert f"[4/4] {FOLDERS[3]}: starting" in one.stdout and "[1/4]" not in one.stdout and "[2/4]" not in one.stdout
    assert (copy / FOLDERS[3] / "model").is_dir() and not (copy / FOLDERS[1] / "model").exists()
    assert (copy / "summary.csv").read_text() == summary

    proc = run_module(sweep_args(sweep_file, copy, data, cache, "--num-processes", "2"), module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for i, (name, what) in enumerate(zip(FOLDERS, ["finished already, skipped", "continuing",
                                                   "finished already, skipped", "finished already, skipped"])):
        assert f"[{i + 1}/4] {name}: {what}" in proc.stdout
    assert {n: (copy / n / "metrics.json").stat().st_mtime_ns for n in untouched} == untouched
    assert "resumed from" in proc.stdout and "checkpoints/step_" in proc.stdout
    continued, started = read_metrics(copy / FOLDERS[1]), read_metrics(copy / FOLDERS[3])
    assert continued["train"]["num_processes"] == 2 and started["train"]["num_processes"] == 2
    # The continued run trained nothing again: its losses are those the first sweep recorded.
    assert continued["train"]["epoch_loss"] == read_metrics(out / FOLDERS[1])["train"]["epoch_loss"]
    assert len(started["train"]["epoch_loss"]) == 2
    rows = read_summary(copy)
    assert sorted(r["status"] for r in rows) == ["finished"] * 4 and sorted(r["rank"] for r in rows) == list("1234")


def test_sigterm_stops_the_sweep_with_a_checkpoint_and_the_same_command_continues(tmp_path):
    """SIGTERM to the sweep while its first run trains: that run checkpoints and exits 75, the sweep starts
    nothing more and exits 75; the same command then resumes the run from its checkpoint and runs the rest."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: stop\nmethod: grid\nparameters:\n  lr: {values: [0.05, 0.02]}\n")
    out = tmp_path / "sweep"
    args = sweep_args(sweep_file, out, data, tmp_path / "cache", "--epochs", "20", "--freeze", "none",
                      "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "5", "--wandb-mode", "disabled",
                      "--log-every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "tl_dist.sweep", *args], cwd=REPO, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "00-lr=0.05"
    deadline = time.monotonic() + 300
    while not list((first / "checkpoints").glob("step_*/train_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    # The run is paused while the signal arrives, so that it is still training however late this test
    # sees the checkpoint on a busy machine: 160 steps of a tiny network take a few seconds.
    (run,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(run), signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the sweep touches STOP and passes SIGTERM on
    os.kill(int(run), signal.SIGCONT)
    printed = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, printed[-3000:]
    assert "[1/2] 00-lr=0.05: stopped" in printed and "the sweep stopped; run the same command again" in printed
    assert "[2/2]" not in printed and not (out / "01-lr=0.02").exists()
    stopped = re.search(r"saving\s+a\s+checkpoint\s+at\s+step\s+(\d+)", printed)
    assert stopped, printed[-3000:]
    stopped = int(stopped.group(1))
    assert 5 <= stopped < 160 and not (first / "model").exists() and not (first / "STOP").exists()

    again = run_module(args, module="tl_dist.sweep")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/2] 00-lr=0.05: continuing" in again.stdout and "[2/2] 01-lr=0.02: starting" in again.stdout
    assert re.search(rf"resumed\s+from\s+\S*00-lr=0.05/checkpoints/step_{stopped}\s", again.stdout)
    assert [read_metrics(out / name)["train"]["global_step"] for name in ("00-lr=0.05", "01-lr=0.02")] == [160, 160]
    assert [r["status"] for r in read_summary(out)] == ["finished", "finished"]


# ---------------------------------------------------------------- ranking, without training


def _row(i: int, val_accuracy: float | None, test_accuracy: float, train_loss: float) -> sw.Row:
    metrics = {"test/accuracy": test_accuracy, "train/loss": train_loss}
    if val_accuracy is not None:
        metrics.update({"val/accuracy": val_accuracy, "val/loss": 1 - val_accuracy})
    return sw.Row(i, Path(f"{i:02d}-x"), {"lr": 0.1 * (i + 1)}, "finished", metrics)


def test_validation_metrics_rank_and_test_accuracy_never_does(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("method: grid\nparameters:\n  lr: {values: [0.1, 0.2, 0.3]}\n")
    sweep = sw.read_sweep(sweep_file)
    assert (sweep.metric, sweep.goal) == ("val/accuracy", "maximize")  # the default
    rows = [_row(0, 0.5, 0.9, 0.1), _row(1, 0.8, 0.2, 0.3), _row(2, 0.6, 0.5, 0.2)]
    assert sw.rank(sweep, rows) == ("val/accuracy", "maximize", None)
    assert [r.rank for r in rows] == [3, 1, 2]
    sweep.metric, sweep.goal = "val/loss", "minimize"
    sw.rank(sweep, rows)
    assert [r.rank for r in rows] == [3, 1, 2]
    # One run without a validation split: the ranking falls back to the training loss, and says why.
    rows.append(_row(3, None, 1.0, 0.05))
    metric, goal, note = sw.rank(sweep, rows)
    assert (metric, goal, note) == ("train/loss", "minimize", sw.WEAK_RANKING)
    assert [r.rank for r in rows] == [1 + 1, 3 + 1, 2 + 1, 1]


def test_summary_reads_the_validation_block_of_metrics_json(tmp_path):
    """The metrics.json format of runs with --val-fraction: `val` holds the final epoch's numbers and a
    per-epoch history; summary.csv takes the final numbers."""
    folder = tmp_path / "00"  # one configuration: nothing varies, the folder is its index
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "val": {"loss": 0.7, "accuracy": 0.75, "top5_accuracy": 1.0,
                "history": [{"epoch": 1, "loss": 0.9, "accuracy": 0.5}, {"epoch": 2, "loss": 0.7, "accuracy": 0.75}]},
        "test": {"loss": 0.8, "accuracy": 0.7, "top5_accuracy": 0.95}, "train": {"epoch_loss": [1.2, 0.6]}}))
    assert sw.run_metrics(folder) == {"val/loss": 0.7, "val/accuracy": 0.75, "val/top5_accuracy": 1.0,
                                      "test/loss": 0.8, "test/accuracy": 0.7, "test/top5_accuracy": 0.95,
                                      "train/loss": 0.6}
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("method: grid\nparameters:\n  lr: {values: [0.1]}\n")
    plan = sw.plan_sweep(sw.read_sweep(sweep_file), tmp_path, [], None)
    assert plan.folders == [folder]
    rows = [sw.Row(0, folder, {"lr": 0.1}, "finished", sw.run_metrics(folder))]
    sw.rank(plan.sweep, rows)
    with open(sw.write_summary(plan, rows), newline="") as f:
        (row,) = csv.DictReader(f)
    assert {k: row[k] for k in ("rank", "lr", "val_accuracy", "val_loss", "test_accuracy", "train_loss")} == {
        "rank": "1", "lr": "0.1", "val_accuracy": "0.75", "val_loss": "0.7", "test_accuracy": "0.7", "train_loss": "0.6"}


# ---------------------------------------------------------------- random search


RANDOM = """\
method: random
run_cap: 6
parameters:
  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
  epochs: {distribution: int_uniform, min: 1, max: 4}
  dropout: {distribution: q_uniform, min: 0.0, max: 0.5, q: 0.1}
  momentum: {min: 0.5, max: 0.99}
  lr-schedule: {values: [constant, cosine], probabilities: [0.5, 0.5]}
  batch_size: {value: 8}
"""


def test_random_draws_are_fixed_by_the_seed_and_stay_in_their_bounds(tmp_path):
    sweep_file = tmp_path / "random.yaml"
    sweep_file.write_text(RANDOM)
    sweep = sw.read_sweep(sweep_file)
    first, again, other = (sw.configurations(sweep, seed, None) for seed in (0, 0, 1))
    assert first == again != other and len(first) == 6
    assert len(sw.configurations(sweep, 0, 3)) == 3 and sw.configurations(sweep, 0, 3) == first[:3]
    for c in first + other:
        assert 1e-4 <= c["lr"] <= 0.1 and c["epochs"] in (1, 2, 3, 4) and isinstance(c["epochs"], int)
        assert 0.5 <= c["momentum"] <= 0.99 and c["batch_size"] == 8
        assert math.isclose(c["dropout"] * 10, round(c["dropout"] * 10)) and 0 <= c["dropout"] <= 0.5
        assert c["lr_schedule"] in ("constant", "cosine")
    assert len({c["lr"] for c in first}) == 6
    assert sw.varying(sweep) == ["lr", "epochs", "dropout", "momentum", "lr_schedule"]
    # --runs overrides run_cap; --count prints it; the seed comes from the train option --seed.
    assert run_module([str(sweep_file), "--count", "--runs", "9"], module="tl_dist.sweep").stdout == "9\n"
    plan = sw.plan_sweep(sweep, tmp_path / "out", ["--seed", "1"], None)
    assert plan.configs == other
    assert plan.folders[0].name.startswith("00-lr=") and "lr_schedule=" in plan.folders[0].name


# ---------------------------------------------------------------- the same file under `wandb agent`

BOTH = """\
name: both
program: tl_dist/train.py
method: grid
metric: {name: val/loss, goal: minimize}
parameters:
  lr: {values: [0.01, 0.001]}
  image-size: {values: [32, 64]}
  lr-schedule: {value: cosine}
"""


def test_a_configuration_reaches_tl_dist_train_the_same_through_wandb_agent(tmp_path):
    """W&B's agent turns a configuration into `${env} ${interpreter} ${program} ${args}` (its own code,
    wandb.sdk.launch.sweeps.utils, run here without a server): tl_dist.train parses that command line into
    the same options as the sweep's runs get."""
    from wandb.sdk.launch.sweeps.utils import DEFAULT_SWEEP_COMMAND, create_sweep_command_args, load_sweep_config

    from tl_dist.config import parse_args

    sweep_file = tmp_path / "both.yaml"
    sweep_file.write_text(BOTH)
    spec = load_sweep_config(str(sweep_file))
    plan = sw.plan_sweep(sw.read_sweep(sweep_file), tmp_path / "out", [], None)
    assert len(plan.configs) == 4 and (plan.sweep.metric, plan.sweep.goal) == ("val/loss", "minimize")
    for config, cfg in zip(plan.configs, plan.cfgs):
        as_written = {name: config[name.replace("-", "_")] for name in spec["parameters"]}
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in as_written.items()}})["args"]
        assert DEFAULT_SWEEP_COMMAND[-2:] == ["${program}", "${args}"] and spec["program"] == "tl_dist/train.py"
        agent = parse_args(args)  # what `python tl_dist/train.py --lr=0.01 --image-size=32 ...` parses to
        assert (agent.lr, agent.image_size, agent.lr_schedule) == (cfg.lr, cfg.image_size, cfg.lr_schedule)
    # Why multi-word names need dashes in a file for both: the agent passes them as written.
    (underscored,) = create_sweep_command_args({"args": {"image_size": {"value": 32}}})["args"]
    with pytest.raises(SystemExit):
        parse_args([underscored])


# ---------------------------------------------------------------- bad sweep files


BAD = {
    "unknown parameter": ("method: grid\nparameters:\n  learning_rate: {values: [0.1]}\n",
                          "unknown parameter 'learning_rate'; the train options are: data_dir, "),
    "bad method": ("method: bayes\nparameters:\n  lr: {values: [0.1]}\n",
                   "method 'bayes' cannot run here; use grid or random (bayes needs W&B's server"),
    "empty grid": ("method: grid\nparameters:\n  lr: {values: []}\n", "parameter lr: values must be a non-empty list"),
    "no parameters": ("method: grid\nparameters: {}\n", "parameters is empty"),
    "random without a count": ("method: random\nparameters:\n  lr: {min: 0.001, max: 0.1}\n",
                               "give its number of runs: run_cap: N in the file, or --runs N"),
    "grid over a distribution": ("method: grid\nparameters:\n  lr: {min: 0.001, max: 0.1}\n",
                                 "a grid takes values or value"),
    "ranking on the test split": ("method: grid\nmetric: {name: test/accuracy, goal: maximize}\n"
                                  "parameters:\n  lr: {values: [0.1]}\n", "the test split is never used to choose"),
    "a value train refuses": ("method: grid\nparameters:\n  lr: {values: [0.1, -1]}\n",
                              "configuration 1 (01-lr=-1): argument --lr: must be positive"),
    "an unknown key": ("method: grid\nsearch: x\nparameters:\n  lr: {values: [0.1]}\n", "unknown key(s) search"),
    "an unknown distribution": ("method: random\nrun_cap: 2\nparameters:\n  lr: {distribution: beta}\n",
                                "unknown distribution 'beta'"),
    "not YAML": ("method: [grid\n", "cannot read the sweep file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_file_gets_one_error_line_and_writes_nothing(case, tmp_path, capsys):
    text, expected = BAD[case]
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(text)
    out = tmp_path / "out"
    code = sw.main([str(sweep_file), "--output-dir", str(out), "--model", "vgg_tiny", "--weights", "none"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_resume_is_the_sweeps_own(tmp_path, capsys):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(GRID)
    assert sw.main([str(sweep_file), "--resume", "auto"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: the sweep resumes each run itself")


def test_a_sweep_with_a_validation_split_ranks_on_it_and_shares_the_features(tmp_path):
    """Real runs with --val-fraction: summary.csv holds each run's own val/accuracy from its metrics.json,
    the ranking follows it, and every configuration after the first reuses the first one's features."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text("name: lr\nmethod: grid\nparameters:\n  lr: {values: [0.05, 0.001]}\n  epochs: {value: 1}\n")
    out = tmp_path / "sweep"
    proc = run_module(sweep_args(sweep_file, out, data, tmp_path / "cache", "--val-fraction", "0.25",
                                 "--wandb-mode", "disabled"), module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ranked on the final training loss" not in proc.stdout
    rows = read_summary(out)
    assert len(rows) == 2
    for row in rows:
        folder = Path(row["run_folder"])
        metrics = read_metrics(folder if folder.is_absolute() else out / folder)
        assert float(row["val_accuracy"]) == pytest.approx(metrics["val"]["accuracy"])
        assert float(row["val_loss"]) == pytest.approx(metrics["val"]["loss"])
    ranked = sorted(rows, key=lambda r: int(r["rank"]))
    assert (float(ranked[0]["val_accuracy"]), -float(ranked[0]["val_loss"])) >= \
        (float(ranked[1]["val_accuracy"]), -float(ranked[1]["val_loss"]))
    assert proc.stdout.count("features: reused") == 1
