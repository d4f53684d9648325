"""The article's workflow end to end with the real VGG16, on 102 generated classes (conftest.caltech_like): in
process and through `accelerate launch` with two processes. Checks metrics.json against the contract and reads back
what W&B wrote offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import wandb_reader
from conftest import launch, make_image_tree, read_metrics, run_module, tiny_args, train_in_process

from tl_dist.run_dir import FINAL_MODEL

FINISHED_RUN_FILES = ("metrics.json", "config.json", "split.json")  # no constants for them in tl_dist yet
METRIC_KEYS = {"loss", "accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
               "mean_class_accuracy", "num_samples", "per_class_accuracy"}


@pytest.fixture(scope="module")
def vgg16_state_dict(tmp_path_factory) -> Path:
    """A torchvision VGG16 state_dict with its 1000-way head, as a user would pass with --weights PATH
    (random, seeded: no download)."""
    from torchvision import models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(models.vgg16().state_dict(), path)
    return path


def vgg16_args(caltech_like, out, cache, weights, *extra):
    return ["--data-dir", str(caltech_like), "--output-dir", str(out), "--cache-dir", str(cache),
            "--weights", str(weights), "--max-samples", "204", "--epochs", "2", "--wandb-mode", "offline",
            "--checkpoint-every-epochs", "0", *extra]


@pytest.fixture(scope="module")
def inprocess_run(caltech_like, vgg16_state_dict, tmp_path_factory):
    """`python -m tl_dist.train` in this process (the real VGG16 at 64 px, 2 epochs)."""
    root = tmp_path_factory.mktemp("e2e")
    out = root / "run"
    code = train_in_process(vgg16_args(caltech_like, out, root / "cache", vgg16_state_dict, "--image-size", "64"),
                            env={"WANDB_MODE": "offline", "WANDB_DIR": None})
    assert code == 0
    return out


def check_run(out: Path, num_processes: int, num_classes: int = 102):
    metrics = read_metrics(out)
    split = json.loads((out / "split.json").read_text())
    n_test = len(split["test"])
    assert n_test == num_classes  # 2 images per class in the 204-image sample -> 1 test image each
    for section in ("baseline", "test"):
        assert METRIC_KEYS <= metrics[section].keys()
        assert metrics[section]["num_samples"] == n_test
        assert 0.0 <= metrics[section]["accuracy"] <= metrics[section]["top5_accuracy"] <= 1.0
        assert len(metrics[section]["per_class_accuracy"]) == num_classes
        assert set(metrics[section]["per_class_accuracy"]) == set(split["classes"])
        assert metrics[section]["loss"] > 0
    train_section = metrics["train"]
    assert len(train_section["epoch_loss"]) == 2
    assert metrics["test"]["loss"] != metrics["baseline"]["loss"]  # the head was trained
    assert train_section["images_per_second"] > 0 and train_section["seconds"] > 0
    assert train_section["num_processes"] == num_processes
    assert train_section["global_batch_size"] == 32 * num_processes
    steps = train_section["global_step"]
    assert steps == 2 * -(-(-(-len(split["train"]) // num_processes)) // 32)

    # the final model: safetensors weights with the new 102-way head, and the class names
    weights = load_file(out / "model" / "model.safetensors")
    assert weights["classifier.6.weight"].shape == (num_classes, 4096)
    assert json.loads((out / "model" / "classes.json").read_text()) == split["classes"]

    # W&B: one offline run holding the loss per step, both evaluations and both prediction grids
    (run_dir,) = wandb_reader.run_dirs(out / "wandb")
    rows = wandb_reader.history(run_dir)
    losses = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == list(range(1, steps + 1))
    baseline = next(r for r in rows if "baseline/accuracy" in r)
    final = next(r for r in rows if "finetuned/accuracy" in r)
    assert baseline["_step"] == 0 and final["_step"] == steps
    assert baseline["baseline/loss"] == pytest.approx(metrics["baseline"]["loss"])
    assert final["finetuned/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    epoch_losses = [r["train/epoch_loss"] for r in rows if "train/epoch_loss" in r]
    assert epoch_losses == pytest.approx(train_section["epoch_loss"])
    for prefix in ("baseline", "finetuned"):
        grid = next(r for r in rows if f"{prefix}/predictions/captions" in r)
        captions = grid[f"{prefix}/predictions/captions"]
        assert len(captions) == 32
        for caption in captions:
            pred, label = caption.removeprefix("pred: ").split(" / label: ")
            assert pred in split["classes"] and label in split["classes"]
        pngs = list((run_dir / "files" / "media" / "images" / prefix).glob("predictions_*.png"))
        assert len(pngs) == 32
    config = wandb_reader.config(run_dir)
    assert config["global_batch_size"] == 32 * num_processes and config["lr"] == 0.001
    assert config["num_classes"] == num_classes
    return metrics


@pytest.mark.slow
def test_inprocess_vgg16_end_to_end(inprocess_run):
    check_run(inprocess_run, num_processes=1)


def file_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of what a finished run keeps: its metrics, options, split and every file of the final model."""
    files = [run_dir / name for name in FINISHED_RUN_FILES]
    files += sorted(p for p in (run_dir / FINAL_MODEL).rglob("*") if p.is_file())
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_finished_run_resumes_as_done_and_evaluates_the_same(inprocess_run, caltech_like):
    before = file_hashes(inprocess_run)
    assert len(before) > 3 + 3  # the model's weights, classes, config and train state among them
    proc = run_module(["--resume", "auto", "--output-dir", str(inprocess_run), "--data-dir", str(caltech_like),
                       "--wandb-mode", "disabled"])
    assert proc.returncode == 0 and "is finished (2 epochs" in proc.stdout
    assert file_hashes(inprocess_run) == before  # byte for byte: nothing was trained, saved or rewritten


@pytest.mark.slow
def test_accelerate_launch_two_processes_vgg16(caltech_like, vgg16_state_dict, tmp_path):
    out = tmp_path / "run"
    launch(vgg16_args(caltech_like, out, tmp_path / "cache", vgg16_state_dict, "--image-size", "32"), nproc=2)
    check_run(out, num_processes=2)


def test_offline_without_credentials_says_how_to_sync(image_tree, tmp_path):
    """No W&B key and no mode set: the run goes offline, says so, and never waits on a login prompt."""
    env = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    out = tmp_path / "run"
    proc = run_module(tiny_args(image_tree, out, tmp_path / "cache", "--epochs", "1"),
                      env={**env, "WANDB_MODE": None, "WANDB_API_KEY": None}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no W&B credentials found" in proc.stdout and "wandb sync" in proc.stdout
    assert len(wandb_reader.run_dirs(out / "wandb")) == 1


def test_wandb_dir_is_respected(image_tree, tmp_path):
    out, wandb_dir = tmp_path / "run", tmp_path / "elsewhere"
    wandb_dir.mkdir()
    proc = run_module(tiny_args(image_tree, out, tmp_path / "cache", "--epochs", "1", "--wandb-mode", "offline"),
                      env={"WANDB_DIR": str(wandb_dir)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "wandb").exists()
    assert len(wandb_reader.run_dirs(wandb_dir / "wandb")) == 1


def test_fine_tuning_beats_the_baseline(tmp_path):
    """On learnable data the fine-tuned model is much better than its new head before training."""
    data = make_image_tree(tmp_path / "data", classes=4, per_class=30)
    out = tmp_path / "run"
    proc = run_module(tiny_args(data, out, tmp_path / "cache", "--epochs", "10", "--batch-size", "8", "--lr",
                                "0.02", "--wandb-mode", "disabled", "--checkpoint-every-epochs", "0"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics["test"]["num_samples"] == 24
    assert metrics["baseline"]["accuracy"] <= 0.35  # chance is 0.25
    assert metrics["test"]["accuracy"] >= 0.6
    assert metrics["test"]["loss"] < 0.8 * metrics["baseline"]["loss"]
    losses = metrics["train"]["epoch_loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_cpu_run_uses_every_core_when_launched_the_plain_way(image_tree, tmp_path):
    """`accelerate launch` sets OMP_NUM_THREADS=1 when it finds no GPU; the run still uses all its cores."""
    import os

    out = tmp_path / "run"
    launch(tiny_args(image_tree, out, tmp_path / "cache", "--epochs", "1", "--wandb-mode", "disabled"),
           env={"OMP_NUM_THREADS": "1"})
    config = json.loads((out / "config.json").read_text())
    assert config["cpu_threads"] == len(os.sched_getaffinity(0))
