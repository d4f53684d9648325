"""--val-fraction: a stratified validation share of the training split, evaluated exactly after each epoch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb_reader
from conftest import launch, make_image_tree, read_metrics, run_module, tiny_args

from tl_dist.checkpoint import load_weights
from tl_dist.data import load_image, normalize
from tl_dist.model import build_model

ARGS = ("--val-fraction", "0.25", "--dropout", "0", "--batch-size", "4", "--epochs", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("validation-images") / "caltech-101", per_class=12)


@pytest.fixture(scope="module")
def one(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val-one") / "run"
    proc = run_module([*tiny_args(data, out, out.parent / "cache", "--wandb-mode", "offline"), *ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_validation_split_is_stratified_and_apart(one):
    split = json.loads((one / "split.json").read_text())
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 48
    per_class = Counter(f.split("/")[0] for f in split["val"])
    assert set(per_class.values()) == {3}  # 12 images a class: round(2.4) = 2 test; of 10 left, round(2.5) = 3 val
    assert split["val_fraction"] == 0.25


def test_validation_metrics_after_each_epoch_are_those_of_the_model_then(one, data):
    """Each epoch's val/* equal an evaluation, in this process, of the checkpoint saved at that epoch's end."""
    val = read_metrics(one)["val"]
    assert [h["epoch"] for h in val["history"]] == [1, 2] and val["loss"] == val["history"][-1]["loss"]
    split = json.loads((one / "split.json").read_text())
    pixels = np.stack([load_image(data / f, 32) for f in split["val"]])
    images = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    labels = torch.tensor([split["classes"].index(f.split("/")[0]) for f in split["val"]])
    for entry in val["history"]:
        model = build_model("vgg_tiny", 4, "none", "features", dropout=0.0)
        load_weights(model, one / "checkpoints" / f"step_{entry['global_step']}")
        with torch.no_grad():
            logits = model.eval()(images)
        assert entry["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert entry["accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    (run,) = wandb_reader.run_dirs(one / "wandb")
    logged = {row["_step"]: row["val/loss"] for row in wandb_reader.history(run) if "val/loss" in row}
    assert logged == {h["global_step"]: pytest.approx(h["loss"]) for h in val["history"]}


def test_validation_is_exact_on_two_processes(one, data, tmp_path):
    out = tmp_path / "run"
    launch([*tiny_args(data, out, one.parent / "cache", "--wandb-mode", "disabled"), *ARGS[:-4],
            "--batch-size", "2", "--epochs", "2"], nproc=2)
    assert json.loads((out / "split.json").read_text())["val"] == json.loads((one / "split.json").read_text())["val"]
    two, single = read_metrics(out)["val"]["history"], read_metrics(one)["val"]["history"]
    for a, b in zip(two, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["accuracy"] == b["accuracy"]
