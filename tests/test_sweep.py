"""Sweeps (`python -m tl_dist.sweep`): a W&B sweep file run as an Optuna study in the sweep folder.

Real runs: a grid trained in the sweep's own process, one run folder each, ranked in summary.csv as the run
folders' metrics.json say (test accuracy beside it, never ranking), W&B runs grouped under the sweep's name,
and each trial the same as a fresh `python -m tl_dist.train`; hyperband pruning of runs whose validation
accuracy lags, marked pruned everywhere; SIGTERM, Ctrl-C and `kill -9` of a sweep and the same command
continuing it (under accelerate launch with 2 processes: no child outlives the sweep); two workers sharing one
study. Without training: bayes (TPE) against random search on a small real objective, every W&B distribution
against its Optuna counterpart, the same configurations through `wandb agent`'s command line, and one `error:`
line for every bad sweep file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

import wandb_reader
from conftest import REPO, make_image_tree, read_metrics, run_env, run_module
from tl_dist.sweep import __main__ as cli
from tl_dist.sweep import spec, summary
from tl_dist.sweep.study import SweepStudy, plan_sweep

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


def study_trials(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study as Optuna itself reads it from the sweep folder's journal."""
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def start_sweep(args: list[str], log: Path) -> subprocess.Popen:
    """The sweep in a process group of its own, as a terminal's foreground job: SIGINT at its default and
    os.killpg reaching what the terminal's Ctrl-C would reach. Its output goes to `log`."""
    def own_group():
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "tl_dist.sweep", *args], cwd=REPO, env=run_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=own_group)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never happened (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run.glob("checkpoints/step_*/train_state.json"))


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (zombies left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes() and \
                    (proc / "stat").read_text().split(") ", 1)[1][0] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def expected_rows(out: Path, names: list[str], metric: str, goal: str) -> list[tuple]:
    """(rank, folder, metric, test accuracy), computed from the run folders' metrics.json alone."""
    value = {"train/loss": lambda m: m["train"]["epoch_loss"][-1], "val/accuracy": lambda m: m["val"]["accuracy"]}
    found = [(value[metric](read_metrics(out / n)), str(out / n), read_metrics(out / n)["test"]["accuracy"])
             for n in names]
    found.sort(key=lambda f: -f[0] if goal == "maximize" else f[0])
    return [(str(i), folder, v, test) for i, (v, folder, test) in enumerate(found, 1)]


# ---------------------------------------------------------------- a grid, trained once


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
    # One decoded-image cache and one feature pass for all four runs: the first computes, the others reuse.
    assert len(list(cache.glob("images-*.npy"))) == 1
    assert proc.stdout.count("decoding 40 images once") == 1 and proc.stdout.count("features: reused") == 3
    assert [f"[{i + 1}/4] {name}: starting" in proc.stdout for i, name in enumerate(FOLDERS)] == [True] * 4
    # The study, read by Optuna itself: one trial per configuration, in the file's order, all complete.
    trials = study_trials(out, "lr-epochs")
    assert [(t.number, t.state.name, t.params, t.user_attrs["run_folder"]) for t in trials] == [
        (i, "COMPLETE", {"lr": lr, "epochs": e}, FOLDERS[i]) for i, (lr, e) in enumerate(
            [(0.05, 1), (0.05, 2), (0.002, 1), (0.002, 2)])]
    # Without a validation split the study optimises the final training loss (and says so in the summary).
    assert [t.value for t in trials] == [read_metrics(out / n)["train"]["epoch_loss"][-1] for n in FOLDERS]


def test_a_trial_trained_in_the_sweeps_process_equals_a_fresh_run(grid_sweep, tmp_path):
    """The last configuration trained in the sweep's process after three others; a fresh `python -m
    tl_dist.train` with the same options gives the same losses and test numbers to the last bit."""
    _, out, data, cache, _ = grid_sweep
    fresh = tmp_path / "fresh"
    args = sweep_args(Path("x"), fresh, data, cache)[1:] + ["--lr", "0.002", "--epochs", "2", "--dropout", "0.1",
                                                          "--wandb-mode", "disabled"]
    proc = run_module(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept, alone = read_metrics(out / FOLDERS[3]), read_metrics(fresh)
    assert swept["train"]["epoch_loss"] == alone["train"]["epoch_loss"]
    assert {k: swept["test"][k] for k in ("loss", "accuracy")} == {k: alone["test"][k] for k in ("loss", "accuracy")}


def test_summary_ranks_on_training_loss_without_a_validation_split(grid_sweep):
    _, out, _, _, proc = grid_sweep
    rows = read_summary(out)
    assert [(r["rank"], r["run_folder"], float(r["train_loss"]), float(r["test_accuracy"])) for r in rows] == \
        expected_rows(out, FOLDERS, "train/loss", "minimize")
    for r in rows:
        metrics = read_metrics(r["run_folder"])
        assert float(r["test_loss"]) == metrics["test"]["loss"]
        assert (float(r["lr"]), int(r["epochs"]), float(r["dropout"])) == (
            metrics["config"]["lr"], metrics["config"]["epochs"], metrics["config"]["dropout"])
        assert r["status"] == "finished" and r["val_accuracy"] == "" and r["index"] == r["trial"]
    assert "ranked by train/loss (minimize)" in proc.stdout
    assert proc.stdout.count("note: ranked on the final training loss: these runs have no validation split") == 1


def test_runs_are_grouped_in_wandb_under_the_sweep_name(grid_sweep):
    out = grid_sweep[1]
    for name in FOLDERS:
        (run,) = wandb_reader.run_dirs(out / name / "wandb")
        record = next(r.run for r in wandb_reader.records(run) if r.WhichOneof("record_type") == "run")
        assert (record.run_group, record.display_name) == ("lr-epochs", name)


def test_the_summary_command_and_the_same_command_again_run_nothing(grid_sweep):
    sweep_file, out, data, cache, _ = grid_sweep
    (out / "summary.csv").unlink()
    proc = run_module([str(sweep_file), "--summary", "--output-dir", str(out)], module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(out)
    assert [(r["rank"], r["run_folder"], float(r["train_loss"]), float(r["test_accuracy"])) for r in rows] == \
        expected_rows(out, FOLDERS, "train/loss", "minimize")
    assert "starting" not in proc.stdout and "sweep lr-epochs: 4 configuration(s)" in proc.stdout
    # The sweep command again: every configuration is finished in the study, nothing trains.
    mtimes = {n: (out / n / "metrics.json").stat().st_mtime_ns for n in FOLDERS}
    again = run_module(sweep_args(sweep_file, out, data, cache), module="tl_dist.sweep")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stdout and "continuing" not in again.stdout
    assert {n: (out / n / "metrics.json").stat().st_mtime_ns for n in FOLDERS} == mtimes
    assert len(study_trials(out, "lr-epochs")) == 4


def test_run_folders_do_not_depend_on_runs(tmp_path):
    """`--runs 1` first, then the whole grid: the first configuration keeps its folder and its finished run,
    and only the others train."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: runs\nmethod: grid\nparameters:\n  lr: {values: [0.05, 0.02, 0.01]}\n")
    out = tmp_path / "sweep"
    args = sweep_args(sweep_file, out, data, tmp_path / "cache", "--max-steps", "2", "--wandb-mode", "disabled")
    first = run_module([*args, "--runs", "1"], module="tl_dist.sweep")
    assert first.returncode == 0 and "[1/1] 00-lr=0.05: starting" in first.stdout, first.stderr[-3000:]
    finished = (out / "00-lr=0.05" / "metrics.json").stat().st_mtime_ns
    rest = run_module(args, module="tl_dist.sweep")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "00-lr=0.05: starting" not in rest.stdout and "[2/3] 01-lr=0.02: starting" in rest.stdout
    assert (out / "00-lr=0.05" / "metrics.json").stat().st_mtime_ns == finished
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-lr=0.05", "01-lr=0.02", "02-lr=0.01"]
    assert [r["status"] for r in read_summary(out)] == ["finished"] * 3


# ---------------------------------------------------------------- stopping, continuing, sharing


def test_sigterm_stops_the_sweep_with_a_checkpoint_and_the_same_command_continues(tmp_path):
    """SIGTERM to the sweep while its first run trains (in the sweep's process): the run checkpoints, the sweep
    starts nothing more and exits 75; the same command then resumes the run from its checkpoint and runs the
    rest."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: stop\nmethod: grid\nparameters:\n  max-steps: {values: [80, 8]}\n")
    out, log = tmp_path / "sweep", tmp_path / "sweep.log"
    args = sweep_args(sweep_file, out, data, tmp_path / "cache", "--epochs", "20", "--freeze", "none",
                      "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "5", "--wandb-mode", "disabled",
                      "--log-every", "1")
    proc = start_sweep(args, log)
    first = out / "00-max_steps=80"
    wait_for(lambda: checkpoints(first), proc, log)
    # Paused while the signal arrives, so that it is still training however late this test sees the checkpoint.
    os.kill(proc.pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    printed = log.read_text()
    assert "[1/2] 00-max_steps=80: stopped" in printed and "stop requested (SIGTERM)" in printed
    assert "the sweep stopped (00-max_steps=80 stopped); run the same command again" in printed
    assert "[2/2]" not in printed.split("stopped (")[0] and not (out / "01-max_steps=8").exists()
    stopped = int(re.search(r"saving\s+a\s+checkpoint\s+at\s+step\s+(\d+)", printed).group(1))
    assert 5 <= stopped < 80 and not (first / "model").exists() and not (first / "STOP").exists()
    assert [t.state.name for t in study_trials(out, "stop")] == ["RUNNING", "WAITING"]

    again = run_module(args, module="tl_dist.sweep")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/2] 00-max_steps=80: continuing" in again.stdout and "[2/2] 01-max_steps=8: starting" in again.stdout
    assert re.search(rf"resumed\s+from\s+\S*00-max_steps=80/checkpoints/step_{stopped}\s", again.stdout)
    assert [read_metrics(out / n)["train"]["global_step"] for n in ("00-max_steps=80", "01-max_steps=8")] == [80, 8]
    assert [r["status"] for r in read_summary(out)] == ["finished", "finished"]
    assert [t.state.name for t in study_trials(out, "stop")] == ["COMPLETE", "COMPLETE"]


def test_ctrl_c_and_kill_9_of_a_two_process_sweep(tmp_path):
    """Each run under accelerate launch (2 processes), a child in its own process group. Ctrl-C (SIGINT to
    the sweep's process group, as a terminal sends it) reaches the run only through the sweep, once: it
    checkpoints and the sweep exits 75. `kill -9` of the sweep: its training processes checkpoint and end
    with it. The same command then finishes with exactly run_cap trials, none run twice."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: kill\nmethod: grid\nrun_cap: 2\nparameters:\n  max-steps: {values: [120, 8, 4]}\n")
    out = tmp_path / "sweep"
    args = sweep_args(sweep_file, out, data, tmp_path / "cache", "--num-processes", "2", "--epochs", "30",
                      "--freeze", "none", "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "4",
                      "--wandb-mode", "disabled", "--log-every", "1")
    proc = start_sweep(args, tmp_path / "1.log")
    run = out / "00-max_steps=120"
    wait_for(lambda: checkpoints(run), proc, tmp_path / "1.log")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 75, (tmp_path / "1.log").read_text()[-3000:]
    printed = (tmp_path / "1.log").read_text()
    assert printed.count("stop requested (SIGINT)") == 1 and "KeyboardInterrupt" not in printed, printed[-3000:]
    after_ctrl_c = checkpoints(run)[-1]
    assert 4 <= after_ctrl_c < 120 and "the sweep stopped (SIGINT)" in printed

    proc = start_sweep(args, tmp_path / "2.log")
    wait_for(lambda: checkpoints(run)[-1] > after_ctrl_c, proc, tmp_path / "2.log")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while processes_naming(str(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    # They stopped because the sweep died (a checkpoint, no final model), not because their training ended.
    assert processes_naming(str(run)) == [] and not (run / "model").exists(), "processes outlived the sweep"
    assert "continuing" in (tmp_path / "2.log").read_text()

    proc = start_sweep(args, tmp_path / "3.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "3.log").read_text()[-3000:]
    trials = study_trials(out, "kill")  # run_cap 2 of the grid's 3
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert sorted(p.name for p in out.glob("0*")) == ["00-max_steps=120", "01-max_steps=8"]
    for folder, steps in ((run, 120), (out / "01-max_steps=8", 8)):  # 32 images, global batch 8: 4 steps an epoch
        metrics = read_metrics(folder)
        assert metrics["train"]["global_step"] == steps and len(metrics["train"]["epoch_loss"]) == steps // 4
        assert metrics["train"]["num_processes"] == 2
    resumed = re.findall(r"resumed\s+from\s+\S*/checkpoints/step_(\d+)", (tmp_path / "3.log").read_text())
    assert len(resumed) == 1 and int(resumed[0]) >= after_ctrl_c


def test_two_workers_share_one_study(tmp_path):
    """Worker A takes configuration 0 and is paused while training it; worker B, on the same folder, takes the
    others and ends, its summary.csv showing configuration 0 running (not failed). A then finishes: every
    configuration trained once, by one of them."""
    data = make_image_tree(tmp_path / "data")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: shared\nmethod: grid\nparameters:\n  lr: {values: [0.05, 0.03, 0.02, 0.01]}\n")
    out = tmp_path / "sweep"
    args = sweep_args(sweep_file, out, data, tmp_path / "cache", "--epochs", "3", "--wandb-mode", "disabled")
    a = start_sweep(args, tmp_path / "a.log")
    wait_for(lambda: checkpoints(out / "00-lr=0.05"), a, tmp_path / "a.log")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = run_module(args, module="tl_dist.sweep")
        held = read_summary(out)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert b.returncode == 0 and a.wait(timeout=300) == 0, b.stdout[-3000:] + (tmp_path / "a.log").read_text()[-3000:]
    started = {name: [w for w, text in (("a", (tmp_path / "a.log").read_text()), ("b", b.stdout))
                      if re.search(rf"\] {re.escape(name)}: starting", text)]
               for name in ("00-lr=0.05", "01-lr=0.03", "02-lr=0.02", "03-lr=0.01")}
    assert started == {"00-lr=0.05": ["a"], "01-lr=0.03": ["b"], "02-lr=0.02": ["b"], "03-lr=0.01": ["b"]}
    assert [(r["index"], r["status"]) for r in held if r["index"] == "0"] == [("0", "running")]
    assert sorted(r["status"] for r in held) == ["finished", "finished", "finished", "running"]
    assert [r["status"] for r in read_summary(out)] == ["finished"] * 4
    assert [t.state.name for t in study_trials(out, "shared")] == ["COMPLETE"] * 4


# ---------------------------------------------------------------- pruning and bayes


HYPERBAND = """\
name: hb
project: sweep-project
entity: sweep-team
method: grid
metric: {name: val/accuracy, goal: maximize}
early_terminate: {type: hyperband, min_iter: 2, eta: 2}
parameters:
  lr: {values: [0.05, 0.000001, 0.000002]}
  epochs: {value: 4}
"""


def test_hyperband_prunes_lagging_runs_and_the_summary_says_so(tmp_path):
    """W&B's hyperband (min_iter 2, eta 2) as Optuna's successive halving, fed val/accuracy after every epoch:
    the first run trains to the end; the two whose accuracy after epoch 2 lags it stop there with a checkpoint,
    pruned in the study, summary.csv, the table and their W&B runs, never counted as failed, never evaluated
    on the test split. The W&B runs go to the file's project and entity."""
    data = make_image_tree(tmp_path / "data", per_class=20)
    sweep_file = tmp_path / "hb.yaml"
    sweep_file.write_text(HYPERBAND)
    out = tmp_path / "sweep"
    proc = run_module(sweep_args(sweep_file, out, data, tmp_path / "cache", "--val-fraction", "0.25", "--freeze",
                                 "none", "--batch-size", "8"), module="tl_dist.sweep")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = ["00-lr=0.05", "01-lr=1e-06", "02-lr=2e-06"]
    best = read_metrics(out / names[0])
    trials = study_trials(out, "hb")
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert trials[0].value == best["val"]["accuracy"]
    assert trials[0].intermediate_values == {h["epoch"]: h["accuracy"] for h in best["val"]["history"]}
    for name, trial in zip(names[1:], trials[1:]):
        run = out / name
        (state_file,) = run.glob("checkpoints/step_12/train_state.json")  # 48 images, batch 8: 2 epochs
        state = json.loads(state_file.read_text())
        assert state["pruned"] and state["epoch"] == 2 and len(state["val_history"]) == 2
        assert trial.intermediate_values == {h["epoch"]: h["accuracy"] for h in state["val_history"]}
        assert state["val_history"][1]["accuracy"] < best["val"]["history"][1]["accuracy"]  # it lagged
        assert not (run / "model").exists() and not (run / "metrics.json").exists()
        assert f"{name}: pruned after epoch 2" in proc.stdout
    rows = {Path(r["run_folder"]).name: r for r in read_summary(out)}
    assert [(rows[n]["rank"], rows[n]["status"]) for n in names] == [
        ("1", "finished"), ("", "pruned after epoch 2"), ("", "pruned after epoch 2")]
    assert float(rows[names[0]]["val_accuracy"]) == best["val"]["accuracy"]
    assert float(rows[names[1]]["val_accuracy"]) == trials[1].intermediate_values[2]
    assert rows[names[1]]["test_accuracy"] == "" and proc.stdout.count("│ pruned after epoch 2") == 2
    for name in names:
        (run,) = wandb_reader.run_dirs(out / name / "wandb")
        records = wandb_reader.records(run)
        first = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (first.project, first.entity, first.run_group) == ("sweep-project", "sweep-team", "hb")
        summaries = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                     for item in r.summary.update}
        tags = {tag for r in records if r.WhichOneof("record_type") == "run" for tag in r.run.tags}
        pruned = name != names[0]
        assert (summaries.get("sweep/pruned_after_epoch"), "pruned" in tags) == ((2, True) if pruned else (None, False))


def narrow_optimum():
    """A small real objective with a narrow best learning rate: 30 steps of gradient descent on a softmax
    regression of generated, badly conditioned data, scored by its validation loss. Too low a rate has not
    converged, too high diverges; within 2% of the best loss lies a band of 0.16 decades (lr 0.31 to 0.45) in
    the 7 decades searched. Returns (objective, best lr, band)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)) * np.geomspace(1, 8, 10)
    y = (x @ rng.normal(size=(10, 4)) + rng.normal(size=(200, 4))).argmax(1)
    (xt, yt), (xv, yv) = (x[:150], y[:150]), (x[150:], y[150:])

    def val_loss(lr: float) -> float:
        w = np.zeros((10, 4))
        for _ in range(30):
            z = xt @ w
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(yt)), yt] -= 1
            w -= lr * xt.T @ p / len(yt)
            if not np.isfinite(w).all() or np.abs(w).max() > 1e6:
                return 10.0
        z = xv @ w
        z -= z.max(1, keepdims=True)
        return float(min(10.0, -(z[np.arange(len(yv)), yv] - np.log(np.exp(z).sum(1))).mean()))

    grid = np.geomspace(1e-5, 100, 700)
    losses = np.array([val_loss(lr) for lr in grid])
    band = grid[losses < losses.min() * 1.02]
    return val_loss, grid[losses.argmin()], (band[0], band[-1])


def test_bayes_finds_a_narrow_optimum_better_than_random(tmp_path):
    """The same 20-trial budget over lr in [1e-5, 100], 7 seeds, through the sweep's own study (TPE for bayes,
    the queued draws for random): bayes ends closer to the best lr. Measured with optuna 5.0: a median distance
    of 0.041 decades (bayes) against 0.097 (random); 5 of 7 bayes searches put a trial in the 2% band, 3 of 7
    random ones."""
    objective, best, band = narrow_optimum()
    assert 0.3 < best < 0.5 and math.log10(band[1] / band[0]) < 0.2

    def search(method: str, seed: int) -> tuple[float, bool]:
        folder = tmp_path / f"{method}-{seed}"
        folder.mkdir()
        sweep_file = folder / "s.yaml"
        sweep_file.write_text(f"name: s\nmethod: {method}\nrun_cap: 20\nmetric: {{name: val/loss, goal: minimize}}\n"
                              "parameters:\n  lr: {distribution: log_uniform_values, min: 0.00001, max: 100}\n")
        options = ["--seed", str(seed), "--val-fraction", "0.1", "--model", "vgg_tiny", "--weights", "none"]
        plan = plan_sweep(spec.read_sweep(sweep_file), folder / "out", options, None)
        study, tried = SweepStudy.open(plan, None), []
        while (claim := study.claim()) is not None:
            tried.append((objective(claim.options["lr"]), claim.options["lr"]))
            study.study.tell(claim.number, tried[-1][0])
            claim.lock.release()
        assert len(tried) == 20
        lr = min(tried)[1]
        return abs(math.log10(lr / best)), any(band[0] <= lr <= band[1] for _, lr in tried)

    results = {method: [search(method, seed) for seed in range(7)] for method in ("random", "bayes")}
    distance = {m: float(np.median([d for d, _ in r])) for m, r in results.items()}
    found = {m: sum(hit for _, hit in r) for m, r in results.items()}
    print(f"median distance to the best lr (decades): {distance}; searches with a trial in the band: {found}")
    assert distance["bayes"] < 0.6 * distance["random"] and found["bayes"] > found["random"]


# ---------------------------------------------------------------- ranking, without training


def _row(i: int, val_accuracy: float | None, test_accuracy: float, train_loss: float) -> summary.Row:
    metrics = {"test/accuracy": test_accuracy, "train/loss": train_loss}
    if val_accuracy is not None:
        metrics.update({"val/accuracy": val_accuracy, "val/loss": 1 - val_accuracy})
    return summary.Row(i, i, Path(f"{i:02d}-x"), {"lr": 0.1 * (i + 1)}, "finished", metrics)


def test_validation_metrics_rank_and_test_accuracy_never_does(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("method: grid\nparameters:\n  lr: {values: [0.1, 0.2, 0.3]}\n")
    sweep = spec.read_sweep(sweep_file)
    assert (sweep.metric, sweep.goal) == ("val/accuracy", "maximize")  # the default
    rows = [_row(0, 0.5, 0.9, 0.1), _row(1, 0.8, 0.2, 0.3), _row(2, 0.6, 0.5, 0.2)]
    assert summary.rank(sweep, rows) == ("val/accuracy", "maximize", None)
    assert [r.rank for r in rows] == [3, 1, 2]
    sweep.metric, sweep.goal = "val/loss", "minimize"
    summary.rank(sweep, rows)
    assert [r.rank for r in rows] == [3, 1, 2]
    # A pruned run is listed but not ranked (it stopped early); a run without a validation split makes the
    # ranking fall back to the training loss, and says why.
    rows.append(summary.Row(3, 3, Path("03-x"), {"lr": 0.4}, "pruned after epoch 1", {"val/accuracy": 0.99}))
    summary.rank(sweep, rows)
    assert [r.rank for r in rows] == [3, 1, 2, None]
    rows.append(_row(4, None, 1.0, 0.05))
    metric, goal, note = summary.rank(sweep, rows)
    assert (metric, goal, note) == ("train/loss", "minimize", summary.WEAK_RANKING)
    assert [r.rank for r in rows] == [1 + 1, 3 + 1, 2 + 1, None, 1]


def test_summary_reads_the_validation_block_of_metrics_json(tmp_path):
    """The metrics.json format of runs with --val-fraction: `val` holds the final epoch's numbers and a
    per-epoch history; summary.csv takes the final numbers."""
    from tl_dist.sweep.outcome import run_metrics

    history = [{"epoch": 1, "loss": 0.9, "accuracy": 0.5}, {"epoch": 2, "loss": 0.7, "accuracy": 0.75}]
    saved = {"val": {"loss": 0.7, "accuracy": 0.75, "top5_accuracy": 1.0, "history": history},
             "test": {"loss": 0.8, "accuracy": 0.7, "top5_accuracy": 0.95}, "train": {"epoch_loss": [1.2, 0.6]}}
    assert run_metrics(saved) == {"val/loss": 0.7, "val/accuracy": 0.75, "val/top5_accuracy": 1.0,
                                  "test/loss": 0.8, "test/accuracy": 0.7, "test/top5_accuracy": 0.95,
                                  "train/loss": 0.6}
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("method: grid\nparameters:\n  lr: {values: [0.1]}\n")
    sweep = spec.read_sweep(sweep_file)
    assert spec.folder_name(sweep, 0, {"lr": 0.1}) == "00"  # nothing varies: the folder is its index
    rows = [summary.Row(0, 0, tmp_path / "00", {"lr": 0.1}, "finished", run_metrics(saved))]
    summary.rank(sweep, rows)
    with open(summary.write_summary(sweep, tmp_path, rows), newline="") as f:
        (row,) = csv.DictReader(f)
    assert {k: row[k] for k in ("rank", "lr", "val_accuracy", "val_loss", "test_accuracy", "train_loss")} == {
        "rank": "1", "lr": "0.1", "val_accuracy": "0.75", "val_loss": "0.7", "test_accuracy": "0.7",
        "train_loss": "0.6"}


# ---------------------------------------------------------------- the sweep file


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
    sweep = spec.read_sweep(sweep_file)
    first, again, other = (sweep.planned(seed, 6) for seed in (0, 0, 1))
    assert first == again != other and len(first) == 6
    assert sweep.planned(0, 3) == first[:3]  # a shorter sweep starts as the longer one
    for c in (sweep.options(p) for p in first + other):
        assert 1e-4 <= c["lr"] <= 0.1 and c["epochs"] in (1, 2, 3, 4) and isinstance(c["epochs"], int)
        assert 0.5 <= c["momentum"] <= 0.99 and c["batch_size"] == 8
        assert math.isclose(c["dropout"] * 10, round(c["dropout"] * 10)) and 0 <= c["dropout"] <= 0.5
        assert c["lr_schedule"] in ("constant", "cosine")
    assert len({c["lr"] for c in first}) == 6
    assert sweep.varying() == ["lr", "epochs", "dropout", "momentum", "lr_schedule"]
    # --runs overrides run_cap; --count prints it; the seed comes from the train option --seed.
    assert run_module([str(sweep_file), "--count", "--runs", "9"], module="tl_dist.sweep").stdout == "9\n"
    plan = plan_sweep(sweep, tmp_path / "out", ["--seed", "1"], None)
    assert plan.planned == other
    name = spec.folder_name(sweep, 0, plan.planned[0])
    assert name.startswith("00-lr=") and "lr_schedule=" in name and "batch_size" not in name


# W&B's definition of each distribution (its sweeps/params.py: the value at quantile u), against which the
# Optuna counterpart's draws are compared.
WANDB_DRAWS = {
    "log_uniform": (dict(min=-9.0, max=-2.0), lambda u: np.exp(-9 + 7 * u)),
    "inv_log_uniform": (dict(min=2.0, max=9.0), lambda u: np.exp(-(2 + 7 * (1 - u)))),
    "inv_log_uniform_values": (dict(min=1e-4, max=0.1), lambda u: 1 / np.exp(np.log(10) + np.log(1e4 / 10) * u)),
    "log_uniform_values": (dict(min=1e-4, max=0.1), lambda u: np.exp(np.log(1e-4) + np.log(1e3) * u)),
    "uniform": (dict(min=0.5, max=0.99), lambda u: 0.5 + 0.49 * u),
}


@pytest.mark.parametrize("name", list(WANDB_DRAWS))
def test_a_continuous_wandb_distribution_draws_as_its_optuna_counterpart(name):
    """4000 draws of Optuna's random sampler from the mapped distribution against W&B's definition: the same
    range and the same deciles (within 3% of the range, on a log scale for the log-uniform ones)."""
    bounds, wandb_value = WANDB_DRAWS[name]
    dist = spec.distribution({"distribution": name, **bounds})
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ours = np.array([draws.ask({"x": dist}).params["x"] for _ in range(4000)])
    theirs = wandb_value(np.random.default_rng(0).uniform(size=4000))
    scale = np.log if dist.log else (lambda v: v)
    lo, hi = scale(np.array([theirs.min(), theirs.max()]))
    assert scale(dist.low) <= lo and hi <= scale(dist.high)
    deciles = np.linspace(0.1, 0.9, 9)
    assert np.allclose(np.quantile(scale(ours), deciles), np.quantile(scale(theirs), deciles), atol=0.03 * (hi - lo))


MAPPED = {  # a W&B search constraint, the train option's kind -> its Optuna counterpart
    "values": ({"values": [1, 2]}, "int", "CategoricalDistribution(choices=(1, 2))"),
    "value": ({"value": 3}, "int", "Constant(value=3)"),
    "integer min/max": ({"min": 1, "max": 4}, "int", "IntDistribution(high=4, log=False, low=1, step=1)"),
    "real min/max": ({"min": 0.5, "max": 0.99}, "float", "FloatDistribution(high=0.99, log=False, low=0.5, step=None)"),
    "int_uniform": ({"distribution": "int_uniform", "min": 1, "max": 9}, "int",
                    "IntDistribution(high=9, log=False, low=1, step=1)"),
    "q_uniform": ({"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.1}, "float",
                  "FloatDistribution(high=0.5, log=False, low=0.0, step=0.1)"),
    "q_uniform, int option": ({"distribution": "q_uniform", "min": 2, "max": 10, "q": 2}, "int",
                              "IntDistribution(high=10, log=False, low=2, step=2)"),
    "q_log_uniform_values": ({"distribution": "q_log_uniform_values", "min": 1, "max": 64, "q": 1}, "int",
                             "IntDistribution(high=64, log=True, low=1, step=1)"),
    "equal probabilities": ({"values": ["a", "b"], "probabilities": [0.5, 0.5]}, "str",
                            "CategoricalDistribution(choices=('a', 'b'))"),
}


@pytest.mark.parametrize("case", list(MAPPED))
def test_a_wandb_distribution_maps_to_its_optuna_counterpart(case):
    constraint, kind, expected = MAPPED[case]
    assert repr(spec.distribution(constraint, kind)) == expected


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
    wandb_spec = load_sweep_config(str(sweep_file))
    sweep = spec.read_sweep(sweep_file)
    plan = plan_sweep(sweep, tmp_path / "out", [], None)
    assert len(plan.planned) == 4 and (sweep.metric, sweep.goal) == ("val/loss", "minimize")
    for params in plan.planned:
        config = sweep.options(params)
        cfg = parse_args(plan.argv(config, tmp_path / "run"))
        as_written = {name: config[name.replace("-", "_")] for name in wandb_spec["parameters"]}
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in as_written.items()}})["args"]
        assert DEFAULT_SWEEP_COMMAND[-2:] == ["${program}", "${args}"] and wandb_spec["program"] == "tl_dist/train.py"
        agent = parse_args(args)  # what `python tl_dist/train.py --lr=0.01 --image-size=32 ...` parses to
        assert (agent.lr, agent.image_size, agent.lr_schedule) == (cfg.lr, cfg.image_size, cfg.lr_schedule)
    # Why multi-word names need dashes in a file for both: the agent passes them as written.
    (underscored,) = create_sweep_command_args({"args": {"image_size": {"value": 32}}})["args"]
    with pytest.raises(SystemExit):
        parse_args([underscored])


# ---------------------------------------------------------------- bad sweep files and options


BAD = {
    "unknown parameter": ("method: grid\nparameters:\n  learning_rate: {values: [0.1]}\n",
                          "unknown parameter 'learning_rate'; the train options are: data_dir, "),
    "unknown method": ("method: hill_climb\nparameters:\n  lr: {values: [0.1]}\n",
                       "method 'hill_climb': use one of grid, random, bayes"),
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
    "a range train refuses": ("method: bayes\nrun_cap: 3\nparameters:\n  momentum: {min: 0.5, max: 1.5}\n",
                              "parameter momentum at 1.5: argument --momentum: must be in [0, 1)",
                              "--val-fraction", "0.1"),
    "an unknown key": ("method: grid\nsearch: x\nparameters:\n  lr: {values: [0.1]}\n", "unknown key(s) search"),
    "an unknown distribution": ("method: random\nrun_cap: 2\nparameters:\n  lr: {distribution: gamma}\n",
                                "unknown distribution 'gamma'"),
    **{f"W&B's {name}": (f"method: random\nrun_cap: 2\nparameters:\n  lr: {{distribution: {name}}}\n",
                         f"parameter lr: distribution {name} has no counterpart in Optuna")
       for name in spec.NO_COUNTERPART},
    "q_log_uniform": ("method: random\nrun_cap: 2\nparameters:\n  lr: {distribution: q_log_uniform, min: -5, "
                      "max: -1}\n", "q_log_uniform has no counterpart in Optuna"),
    "q_log_uniform_values with q 2": ("method: random\nrun_cap: 2\nparameters:\n  epochs: {distribution: "
                                      "q_log_uniform_values, min: 2, max: 64, q: 2}\n",
                                      "has a counterpart only with q 1"),
    "unequal probabilities": ("method: random\nrun_cap: 2\nparameters:\n  lr: {values: [0.1, 0.2], probabilities: "
                              "[0.9, 0.1]}\n", "unequal probabilities have no counterpart in Optuna"),
    "q_uniform off its steps": ("method: random\nrun_cap: 2\nparameters:\n  dropout: {distribution: q_uniform, "
                                "min: 0.05, max: 0.5, q: 0.1}\n", "only when min and max are multiples of q"),
    "reals for an integer option": ("method: random\nrun_cap: 2\nparameters:\n  epochs: {min: 1.5, max: 4.0}\n",
                                    "parameter epochs: the option takes whole numbers"),
    "bayes without a validation split": ("method: bayes\nrun_cap: 4\nparameters:\n  lr: {min: 0.001, max: 0.1}\n",
                                         "method bayes chooses on validation numbers (never the test split), and "
                                         "these runs have none: pass --val-fraction"),
    "early_terminate without a validation split": (
        "method: grid\nearly_terminate: {type: hyperband, min_iter: 1}\nparameters:\n  lr: {values: [0.1]}\n",
        "early_terminate chooses on validation numbers"),
    "early_terminate without min_iter": ("method: grid\nearly_terminate: {type: hyperband, eta: 3}\n"
                                         "parameters:\n  lr: {values: [0.1]}\n", "give min_iter"),
    "a fractional eta": ("method: grid\nearly_terminate: {type: hyperband, min_iter: 1, eta: 2.5}\n"
                         "parameters:\n  lr: {values: [0.1]}\n", "eta 2.5: Optuna's pruner keeps"),
    "bayes on the training loss": ("method: bayes\nrun_cap: 3\nmetric: {name: train/loss}\nparameters:\n"
                                   "  lr: {min: 0.001, max: 0.1}\n", "bayes chooses on validation numbers, not on"),
    "not YAML": ("method: [grid\n", "cannot read the sweep file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_file_gets_one_error_line_and_writes_nothing(case, tmp_path, capsys):
    text, expected, *extra = BAD[case]
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(text)
    out = tmp_path / "out"
    code = cli.main([str(sweep_file), "--output-dir", str(out), "--model", "vgg_tiny", "--weights", "none", *extra])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_resume_is_the_sweeps_own(tmp_path, capsys):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(GRID)
    assert cli.main([str(sweep_file), "--resume", "auto"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: the sweep resumes each run itself")


def test_a_validation_split_with_no_image_is_refused_before_anything_is_written(tmp_path, capsys):
    """Classes of 2 images: one goes to the test split, one is left for training, and no validation image can
    be drawn from one: a sweep that ranks on val/accuracy says so instead of ranking on the training loss."""
    data = make_image_tree(tmp_path / "data", per_class=2)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("method: bayes\nrun_cap: 2\nparameters:\n  lr: {min: 0.001, max: 0.1}\n")
    out = tmp_path / "out"
    code = cli.main([str(sweep_file), "--output-dir", str(out), "--data-dir", str(data), "--model", "vgg_tiny",
                     "--weights", "none", "--val-fraction", "0.5"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --val-fraction 0.5 gives no validation image") and "val/accuracy" in lines[0]
    assert not out.exists()


def test_another_sweep_file_or_other_options_on_the_same_folder_are_refused(tmp_path):
    """A study records the sweep file's search and the options that define its runs: a worker with another
    file, or another --epochs, is refused with one line (the study is not touched)."""
    first, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("name: same\nmethod: grid\nparameters:\n  lr: {values: [0.1, 0.2]}\n")
    other.write_text("name: same\nmethod: grid\nparameters:\n  lr: {values: [0.1, 0.3]}\n")
    out = tmp_path / "out"
    SweepStudy.open(plan_sweep(spec.read_sweep(first), out, ["--epochs", "2"], None), None)
    before = (out / "study.journal").read_bytes()
    with pytest.raises(spec.SweepError, match="holds the study of another sweep file"):
        SweepStudy.open(plan_sweep(spec.read_sweep(other), out, ["--epochs", "2"], None), None)
    with pytest.raises(spec.SweepError, match="whose runs have --epochs 2, not 3"):
        SweepStudy.open(plan_sweep(spec.read_sweep(first), out, ["--epochs", "3"], None), None)
    assert (out / "study.journal").read_bytes() == before
