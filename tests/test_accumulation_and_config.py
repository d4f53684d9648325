"""Gradient accumulation (the same training as one large batch) and --config FILE (a run reproduced from its
own config.json), through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb_reader
from conftest import launch, make_image_tree, read_metrics, run_module, tiny_args


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("accumulation-images") / "caltech-101", per_class=10)


def run(data: Path, out: Path, *extra: str, nproc: int = 1):
    args = [*tiny_args(data, out, out.parent / "cache", "--dropout", "0", "--checkpoint-every-epochs", "0"), *extra]
    if nproc == 1:
        proc = run_module(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return launch(args, nproc=nproc)


@pytest.fixture(scope="module")
def batch32(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch32") / "run"
    run(data, out, "--batch-size", "32", "--wandb-mode", "disabled")
    return out


@pytest.mark.parametrize("nproc, batch", [(1, 16), (2, 8)])
def test_accumulating_two_micro_batches_trains_as_one_batch(nproc, batch, data, batch32, tmp_path):
    """32 training images: one step per epoch either way, as 1 x 32, 1 x 16 x 2 or 2 x 8 x 2."""
    out = tmp_path / "run"
    proc = run(data, out, "--batch-size", str(batch), "--gradient-accumulation-steps", "2",
               "--wandb-mode", "offline", nproc=nproc)
    big, accumulated = read_metrics(batch32), read_metrics(out)
    assert accumulated["train"]["global_step"] == big["train"]["global_step"] == 2
    assert accumulated["test"]["loss"] == pytest.approx(big["test"]["loss"], rel=1e-4)
    assert accumulated["train"]["epoch_loss"] == pytest.approx(big["train"]["epoch_loss"], rel=1e-4)
    assert accumulated["test"]["loss"] != pytest.approx(big["baseline"]["loss"], rel=1e-3), "it trained"
    # the global batch includes the accumulation: printed, saved and logged
    assert f"global batch 32 ({batch} per process x 2 accumulation steps)" in " ".join(proc.stdout.split())
    config = json.loads((out / "config.json").read_text())
    assert config["global_batch_size"] == 32 and config["gradient_accumulation_resolved"] == 2
    (offline,) = wandb_reader.run_dirs(out / "wandb")
    assert wandb_reader.config(offline)["global_batch_size"] == 32


def test_accumulation_from_the_environment(data, batch32, tmp_path):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS (what Accelerate's launcher sets) counts when the flag is not
    given; the flag wins over it."""
    out = tmp_path / "run"
    proc = run_module([*tiny_args(data, out, tmp_path / "cache", "--dropout", "0", "--checkpoint-every-epochs", "0",
                                  "--wandb-mode", "disabled"), "--batch-size", "16"],
                      env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)["test"]["loss"] == pytest.approx(read_metrics(batch32)["test"]["loss"], rel=1e-4)
    assert json.loads((out / "config.json").read_text())["gradient_accumulation_resolved"] == 2

    flag = tmp_path / "flag"  # the same, with the flag saying 1: batches of 16, two steps an epoch
    proc = run_module([*tiny_args(data, flag, tmp_path / "cache", "--dropout", "0", "--checkpoint-every-epochs", "0",
                                  "--wandb-mode", "disabled"), "--batch-size", "16", "--gradient-accumulation-steps", "1"],
                      env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 16 (16 per process)" in " ".join(proc.stdout.split())
    config, metrics = json.loads((flag / "config.json").read_text()), read_metrics(flag)
    assert (config["gradient_accumulation_resolved"], config["global_batch_size"]) == (1, 16)
    assert metrics["train"]["global_step"] == 2 * 2 == 2 * read_metrics(out)["train"]["global_step"]


def test_config_file_reproduces_a_run(data, tmp_path):
    first = tmp_path / "x"
    run(data, first, "--lr", "0.02", "--seed", "3", "--epochs", "1", "--batch-size", "8", "--wandb-mode", "disabled")
    again = tmp_path / "y"
    proc = run_module(["--config", str(first / "config.json"), "--output-dir", str(again)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(first), read_metrics(again)
    assert one["test"] == two["test"] | {"images_per_second": one["test"]["images_per_second"]}
    assert one["train"]["epoch_loss"] == two["train"]["epoch_loss"]
    assert json.loads((again / "config.json").read_text())["lr"] == 0.02


def test_a_yaml_config_gives_defaults_and_flags_win(data, tmp_path):
    options = tmp_path / "options.yaml"
    options.write_text(f"data-dir: {data}\nmodel: vgg_tiny\nweights: none\nimage_size: 32\nepochs: 3\nlr: 0.02\n"
                       f"cache_dir: {tmp_path / 'cache'}\nwandb_mode: disabled\nmax_steps: 1\n")
    out = tmp_path / "run"
    proc = run_module(["--config", str(options), "--output-dir", str(out), "--lr", "0.03"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["epochs"], config["image_size"]) == (0.03, 3, 32)
    # What the run did follows the file too: its data, network, cache, one step, no W&B; and the flag's lr.
    metrics = read_metrics(out)
    assert (metrics["train"]["global_step"], metrics["train"]["lr"], metrics["test"]["num_samples"]) == (1, 0.03, 8)
    assert metrics["config"]["model"] == "vgg_tiny" and config["data_dir"] == str(data)
    assert json.loads((out / "split.json").read_text())["classes"] == [f"class_{c:02d}" for c in range(4)]
    assert len(list((tmp_path / "cache").glob("images-*-32px.npy"))) == 1 and not (out / "wandb").exists()


def test_a_config_file_with_an_unknown_option_is_refused(tmp_path):
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"learning_rate": 0.1}))
    proc = run_module(["--config", str(options), "--output-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: argument --config: {options} has unknown option(s): "
                                                "learning_rate (see python -m tl_dist.train --help)"]
    assert not (tmp_path / "run").exists()
