"""Training learns. Every other test starts from random weights on data no network can learn much from in a few
steps, so their accuracies stay near chance; here the generated shapes (tl_dist/shapes.py, 10 classes: chance
is 10%) are learnt from random weights, and the test accuracy must end at 3x chance or more, on 1 and on 2
processes. It is the check that fails when a label is shuffled against its image, the normalisation is
wrong or the loop does not step (each was broken on purpose to see these tests fail).

The 1-process run is the README's quick start without network, run as written: its two commands in a fresh
folder with no W&B credentials, giving the whole workflow (decode, features, baseline, fine-tuning, report,
W&B offline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wandb_reader
from conftest import REPO, launch, read_metrics, run_env
from tl_dist import run_dir as run_files
from tl_dist.shapes import TRAIN_OPTIONS

CHANCE = 1 / 10


def quick_start_commands() -> list[str]:
    """The README's quick start without network: the lines of its code block that runs tl_dist.shapes."""
    quick_start = REPO.joinpath("README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S) if "tl_dist.shapes" in b]
    return block.strip().splitlines()


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The commands in a fresh folder (tl_dist/ there is this checkout's, as in a clone), with a HOME of its own
    (the default --cache-dir is under it) and neither a W&B mode nor a key: W&B goes offline by itself."""
    folder = tmp_path_factory.mktemp("quick-start")
    (folder / "tl_dist").symlink_to(REPO / "tl_dist")
    env = run_env({"HOME": str(folder), "WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": str(folder / "none"),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    procs = [subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600) for command in quick_start_commands()]
    for proc in procs:
        assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return folder, procs


def test_the_readme_names_what_the_data_command_prints():
    """The data command says how to train on its data: the README's second command, word for word."""
    data_command, train_command = quick_start_commands()
    assert data_command == "python -m tl_dist.shapes data/shapes"
    assert train_command == "accelerate launch -q tl_dist/train.py --data-dir data/shapes " + " ".join(TRAIN_OPTIONS)


def test_the_offline_quick_start_learns_and_writes_the_whole_workflow(quick_start):
    folder, (made, trained) = quick_start
    assert train_command_printed(made.stdout) == quick_start_commands()[1]
    (run,) = (folder / "runs").iterdir()
    metrics = read_metrics(run)
    assert metrics["test"]["num_samples"] == 120 and metrics["config"]["num_classes"] == 10
    assert metrics["baseline"]["accuracy"] < 2 * CHANCE
    assert metrics["test"]["accuracy"] >= 3 * CHANCE, metrics["test"]
    assert metrics["test"]["loss"] < 0.8 * metrics["baseline"]["loss"]
    # decoded once and the frozen backbone's features computed once, under the default --cache-dir
    cache = folder / ".cache" / "tl_dist"
    assert metrics["features"]["reused"] is False and Path(metrics["features"]["path"]).parent == cache
    assert len(list(cache.glob("images-*.npy"))) == 1
    for name in ("metrics.json", "split.json", run_files.PER_CLASS_CSV, run_files.CONFUSION_CSV,
                 run_files.CONFUSION_PNG, run_files.MISTAKES_PNG, run_files.MISTAKES_CSV, "model/model.safetensors"):
        assert (run / name).is_file(), name
    # W&B offline, without being told: the losses, both evaluations, and how to sync
    assert "wandb sync" in trained.stdout + trained.stderr
    (wandb_run,) = wandb_reader.run_dirs(run / "wandb")
    rows = wandb_reader.history(wandb_run)
    assert len([r for r in rows if "train/loss" in r]) == metrics["train"]["global_step"] == 10 * 30
    final = next(r for r in rows if "finetuned/accuracy" in r)
    assert final["finetuned/accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def train_command_printed(output: str) -> str:
    """The training command the data command printed (its last line)."""
    return output.strip().splitlines()[-1].strip()


def test_two_processes_learn_the_whole_network(quick_start, tmp_path):
    """The other training path: the whole small network on images (no feature cache), 2 processes over
    gloo, a global batch of 8."""
    folder, _ = quick_start
    out = tmp_path / "run"
    launch(["--data-dir", str(folder / "data" / "shapes"), "--output-dir", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--model", "vgg_tiny", "--weights", "none", "--freeze", "none", "--dropout",
            "0", "--image-size", "32", "--batch-size", "4", "--lr", "0.02", "--epochs", "5", "--wandb-mode",
            "disabled", "--checkpoint-every-epochs", "0"], nproc=2)
    metrics = read_metrics(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_processes"] == 2 and config["feature_cache"] is False
    assert metrics["test"]["num_samples"] == 120 and metrics["baseline"]["accuracy"] < 2 * CHANCE
    assert metrics["test"]["accuracy"] >= 3 * CHANCE, metrics["test"]
    losses = metrics["train"]["epoch_loss"]
    assert losses[-1] < 0.8 * losses[0]
