"""Issue 18 §2 and §5, issue 19 §7: the finetune recipe, with augmentation, mixing and dropout, trains the
same on 1, 2 or 3 processes, with or without loader workers, and after a resume in the middle of an epoch on
another number of processes.

Real `accelerate launch` runs of tl_dist/train.py (gloo on CPU) of `--recipe finetune` (AdamW with weight
decay, label smoothing, a warm-up then cosine, the average of the weights as the final model) training the
whole small network (no BatchNorm) with dropout 0.5, TrivialAugment crops from a 48 px cache for 32 px
inputs, random erasing, and mixup or cutmix each step; evaluation through the weights' resize and centre
crop. 32 training images in
global batches of 12 (1 x 12, 2 x 6, 3 x 4): 3 steps an epoch, 2 epochs, a checkpoint every 2 steps.
Every random choice is drawn from (seed, epoch, image) or (seed, epoch, step), so the runs must agree to
the distributed tests' tolerance; before, each process drew its own dropout masks and the runs differed by
about 1e-2 in loss.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import launch, make_image_tree, read_metrics
from safetensors.torch import load_file

from tl_dist.run_dir import RunDir

pytestmark = pytest.mark.slow  # several processes (see pyproject.toml's markers)

GLOBAL_BATCH = 12
AUGMENTED = ["--recipe", "finetune", "--model", "vgg_tiny", "--weights", "none", "--freeze", "none", "--dropout", "0.5", "--image-size", "32",
             "--cache-size", "48", "--eval-resize", "weights", "--augment", "trivial", "--random-erasing", "0.5",
             "--mixup", "0.4", "--cutmix", "1.0", "--test-fraction", "0.55", "--lr", "0.002", "--seed", "0",
             "--epochs", "2", "--checkpoint-every-steps", "2", "--keep-checkpoints", "10", "--wandb-mode",
             "disabled"]


def args(data: Path, out: Path, cache: Path, nproc: int | None, *extra: str) -> list[str]:
    """The options; the batch per process for `nproc` processes (None: a resume, which keeps the global batch)."""
    batch = ["--batch-size", str(GLOBAL_BATCH // nproc)] if nproc else []
    return ["--data-dir", str(data), "--output-dir", str(out), "--cache-dir", str(cache), *AUGMENTED, *batch, *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder for the runs, with the images (4 classes x 18, 40 px) in images/."""
    root = tmp_path_factory.mktemp("augment-distributed")
    make_image_tree(root / "images" / "caltech-101", classes=4, per_class=18)
    return root


@pytest.fixture(scope="module")
def data(root) -> Path:
    return root / "images"


@pytest.fixture(scope="module")
def runs(root, data) -> dict[int, Path]:
    """The same run on 1 process (2 loader workers), 2 processes (none) and 3 processes (1 each), launched
    together."""
    cache = root / "cache"
    workers = {1: "2", 2: "0", 3: "1"}
    with ThreadPoolExecutor(3) as pool:
        done = {n: pool.submit(launch, args(data, root / f"run{n}", cache, n, "--num-workers", workers[n]), nproc=n)
                for n in workers}
        for future in done.values():
            future.result()
    return {n: root / f"run{n}" for n in workers}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_training(run: Path, reference: Path, rtol: float) -> None:
    ours, theirs = read_metrics(run), read_metrics(reference)
    assert ours["train"]["global_step"] == theirs["train"]["global_step"] == 6
    assert ours["train"]["epoch_loss"] == pytest.approx(theirs["train"]["epoch_loss"], rel=rtol, abs=0)
    assert ours["test"]["loss"] == pytest.approx(theirs["test"]["loss"], rel=rtol, abs=0)
    a, b = weights(run), weights(reference)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol / 10, msg=f"final weights: {name}")


def test_augmented_training_is_the_same_on_1_2_and_3_processes(runs, root):
    config = read_metrics(runs[1])["config"]
    assert (config["augment"], config["mixup"], config["cutmix"], config["feature_cache"]) == ("trivial", 0.4, 1.0,
                                                                                                False)
    assert (config["recipe"], config["optimizer"], config["weight_decay"], config["label_smoothing"],
            config["warmup_epochs"], config["lr_schedule"], config["ema_decay"]) == \
        ("finetune", "adamw", 0.05, 0.1, 1.0, "cosine", 0.9998)
    assert [read_metrics(runs[n])["train"]["num_processes"] for n in (1, 2, 3)] == [1, 2, 3]
    for n in (2, 3):  # the trained weights too, beside their average (the final model)
        assert read_metrics(runs[n])["test_raw"]["loss"] == pytest.approx(read_metrics(runs[1])["test_raw"]["loss"],
                                                                          rel=1e-5, abs=0)
    # the crops come from the 48 px cache, evaluation from the weights' resize (36 px) and centre crop (32 px)
    assert sorted(p.name.split("-", 2)[2] for p in (root / "cache").glob("images-*.npy")) == ["36-32px.npy",
                                                                                             "48px.npy"]
    for n in (2, 3):
        assert_same_training(runs[n], runs[1], rtol=1e-5)
    before, after = (read_metrics(runs[1])[k]["loss"] for k in ("baseline", "test"))
    assert abs(after - before) > 1e-3  # the steps moved the weights well beyond the tolerance


def test_a_resume_mid_epoch_on_another_number_of_processes_trains_as_the_uninterrupted_run(runs, root, data):
    """3 processes stopped after step 4 (the first step of epoch 2), resumed on 1."""
    for nproc in (1,):
        out = root / f"resumed{nproc}"
        shutil.copytree(runs[3], out)
        run = RunDir(out)
        for folder in run.checkpoint_folders():
            if int(folder.name[5:]) > 4:
                shutil.rmtree(folder)
        shutil.rmtree(run.final_model)
        (out / "metrics.json").unlink()
        proc = launch(args(data, out, root / "cache", None, "--resume", "auto"), nproc=nproc)
        assert f"resuming on {nproc} process(es) instead of 3" in " ".join(proc.stdout.split())
        assert "resumed from" in proc.stdout and "at epoch 2, step 4" in " ".join(proc.stdout.split())
        assert_same_training(out, runs[3], rtol=1e-4)
