"""Issue 18, the fine-tuning recipe in real runs of the real entry point:

- LP-FT (`--recipe lp-ft`) is one run: the probe trains the classifier block alone on cached features, the
  fine-tuning continues from it in the same folder, step count and W&B run, with the weight average; killed
  (SIGKILL, every process at once) after a checkpoint of its second phase, `--resume auto` continues in the
  second phase and ends bit-identical to the uninterrupted run.
- --label-smoothing reaches the loss the loop trains on: the first step's logged loss is the smoothed loss of
  the initial network, computed here by hand.
- --sync-bn: 2 processes x 16 images (accelerate launch, gloo) train resnet18 like 1 x 32; without it they do
  not. Under --freeze last:2 the frozen blocks' BatchNorm statistics never move.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb_reader
from conftest import launch, make_image_tree, read_metrics, tiny_args, train_in_process
from safetensors.torch import load_file
from test_resume import last_logged_step, run_and_kill

from tl_dist.checkpoint import TrainState
from tl_dist.config import as_saved, parse_args
from tl_dist.data import index_images
from tl_dist.model import build_network
from tl_dist.run_dir import EMA_FILE, RAW_WEIGHTS_FILE, WEIGHTS_FILE, RunDir

STEPS_PER_EPOCH = 6  # 40 images: 8 test, 8 validation, 24 train in batches of 4
PROBE_STEPS, TOTAL_STEPS = STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH  # 1 probe epoch, then 2 of fine-tuning


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("recipe-images") / "caltech-101", classes=4, per_class=10)


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "per_second" not in k and "seconds" not in k}


# ---------------------------------------------------------------- LP-FT, killed in its second phase


def lp_ft_args(tree: Path, out: Path, cache: Path) -> list[str]:
    return tiny_args(tree, out, cache, "--recipe", "lp-ft", "--probe-epochs", "1", "--lr", "0.001",
                     "--val-fraction", "0.25", "--checkpoint-every-steps", "2", "--keep-checkpoints", "20",
                     "--wandb-mode", "offline")


def past_a_fine_tuning_checkpoint(out: Path) -> bool:
    """A complete checkpoint of the second phase exists, and the run has logged a later step."""
    latest = RunDir(out).latest()
    try:
        return latest is not None and PROBE_STEPS < TrainState.load(latest).global_step < last_logged_step(out)
    except FileNotFoundError:  # pruned while we looked
        return False


@pytest.fixture(scope="module")
def lp_ft(tree, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lp-ft")
    cache = root / "cache"
    reference = root / "reference"
    ref_proc = launch(lp_ft_args(tree, reference, cache))
    resumed = root / "resumed"
    killed = run_and_kill(lp_ft_args(tree, resumed, cache), 1, resumed, ready=past_a_fine_tuning_checkpoint)
    resume_proc = launch(lp_ft_args(tree, resumed, cache) + ["--resume", "auto"])
    return {"reference": reference, "resumed": resumed, "killed": killed, "cache": cache,
            "outputs": [ref_proc.stdout, resume_proc.stdout]}


def test_lp_ft_probes_the_head_on_cached_features_then_fine_tunes_in_the_same_run(lp_ft, tree):
    out = lp_ft["reference"]
    flat = " ".join(lp_ft["outputs"][0].split())
    assert "phase 1/2, probe: the classifier block on cached features, epochs 1-1, adamw at lr 0.001" in flat
    assert "phase 2/2, train: --freeze none, epochs 2-3, adamw at lr 0.001" in flat
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["optimizer"], config["weight_decay"], config["label_smoothing"],
            config["ema_decay"], config["probe_epochs"], config["lr"], config["feature_cache"]) == \
        ("lp-ft", "adamw", 0.05, 0.1, 0.9998, 1, 0.001, True)
    again = parse_args(["--config", str(out / "config.json"), "--output-dir", str(out.with_name("again"))])
    same = [k for k in again.to_dict() if k not in ("output_dir", "config")]
    assert {k: as_saved(getattr(again, k)) for k in same} == {k: config[k] for k in same}  # --config: the same run
    metrics = read_metrics(out)
    assert len(metrics["train"]["epoch_loss"]) == 3 and metrics["train"]["global_step"] == TOTAL_STEPS
    assert {"baseline", "probe", "test", "test_raw"} <= metrics.keys()
    assert [bool({"ema_loss", "ema_accuracy"} & row.keys()) for row in metrics["val"]["history"]] == \
        [False, True, True]  # the average starts with the fine-tuning
    # The probe trained the head alone: at its last step the backbone is the initial one.
    initial = build_network(parse_args(lp_ft_args(tree, out, lp_ft["cache"])), 4).state_dict()
    probed = load_file(str(out / "checkpoints" / f"step_{PROBE_STEPS}" / WEIGHTS_FILE))
    assert all(torch.equal(probed[k], initial[k]) for k in initial if k.startswith("features."))
    assert not torch.equal(probed["classifier.6.weight"], initial["classifier.6.weight"])
    tuned = load_file(str(out / "checkpoints" / f"step_{PROBE_STEPS + 2}" / WEIGHTS_FILE))
    assert not torch.equal(tuned["features.0.weight"], initial["features.0.weight"])
    assert not (out / "checkpoints" / f"step_{PROBE_STEPS}" / EMA_FILE).exists()
    assert (out / "checkpoints" / f"step_{PROBE_STEPS + 2}" / EMA_FILE).is_file()
    # The final model is the average; the trained weights are kept beside it.
    final, raw = (load_file(str(out / "model" / name)) for name in (WEIGHTS_FILE, RAW_WEIGHTS_FILE))
    assert final.keys() == raw.keys() and not torch.equal(final["features.0.weight"], raw["features.0.weight"])
    # One W&B run with both phases' numbers: every step's loss, the probe's test metrics at its last step.
    (wandb_dir,) = wandb_reader.run_dirs(out / "wandb")
    rows = wandb_reader.history(wandb_dir)
    assert sorted(r["_step"] for r in rows if "train/loss" in r) == list(range(1, TOTAL_STEPS + 1))
    probe_rows = [r for r in rows if "probe/accuracy" in r]
    assert [r["_step"] for r in probe_rows] == [PROBE_STEPS]
    assert probe_rows[0]["probe/accuracy"] == metrics["probe"]["accuracy"]
    assert any("val_ema/accuracy" in r for r in rows) and any("finetuned_raw/accuracy" in r for r in rows)


def test_lp_ft_killed_in_its_second_phase_resumes_there_and_ends_bit_identical(lp_ft):
    killed, resumed, reference = lp_ft["killed"], lp_ft["resumed"], lp_ft["reference"]
    step = killed["state"].global_step
    assert PROBE_STEPS < step < TOTAL_STEPS
    assert "features: reused" in killed["output"]  # the probe's features, computed by the reference run
    flat = " ".join(lp_ft["outputs"][1].split())
    assert f"resumed from {killed['checkpoint']} at epoch {step // STEPS_PER_EPOCH + 1}, step {step}" in flat
    assert "phase 2/2" in flat and "phase 1/2" not in flat  # the probe is not run again
    for name in (WEIGHTS_FILE, RAW_WEIGHTS_FILE):
        ref, res = (load_file(str(out / "model" / name)) for out in (reference, resumed))
        assert ref.keys() == res.keys()
        assert all(torch.equal(ref[k], res[k]) for k in ref), name
    ref, res = read_metrics(reference), read_metrics(resumed)
    for split in ("baseline", "probe", "test", "test_raw"):
        assert without_timings(ref[split]) == without_timings(res[split]), split
    assert ref["train"]["epoch_loss"] == res["train"]["epoch_loss"]
    assert ref["val"]["history"] == res["val"]["history"]
    dirs = wandb_reader.run_dirs(resumed / "wandb")
    assert len({wandb_reader.run_id(d) for d in dirs}) == 1 and len(dirs) == 2  # one W&B run, continued


# ---------------------------------------------------------------- --label-smoothing reaches the loss


def test_the_first_step_trains_on_the_smoothed_loss(tree, tmp_path, fresh_accelerate_state):
    """One step over all 32 training images (frozen backbone, no dropout): its logged loss is the smoothed
    cross-entropy of the initial network, by hand."""
    out, cache, eps = tmp_path / "run", tmp_path / "cache", 0.3
    args = tiny_args(tree, out, cache, "--batch-size", "32", "--epochs", "1", "--dropout", "0",
                     "--label-smoothing", str(eps), "--wandb-mode", "disabled")
    assert train_in_process(args) == 0
    logged = read_metrics(out)["train"]["epoch_loss"][0]
    (features_file,) = cache.glob("features-*.npy")  # the cached backbone features, one row per index file
    index = index_images(tree)
    rows = [index.files.index(f) for f in json.loads((out / "split.json").read_text())["train"]]
    model = build_network(parse_args(args), 4).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(features_file)[rows]), pooled=True).double()
    labels = torch.tensor([index.labels[r] for r in rows])
    log_p = torch.log_softmax(logits, 1)
    smoothed = -((1 - eps) * log_p[torch.arange(len(rows)), labels] + eps / 4 * log_p.sum(1)).mean().item()
    plain = -log_p[torch.arange(len(rows)), labels].mean().item()
    assert logged == pytest.approx(smoothed, rel=1e-5)
    assert abs(smoothed - plain) > 1e-3  # the smoothing changes the loss well beyond that tolerance


# ---------------------------------------------------------------- --sync-bn


@pytest.fixture(scope="module")
def bn_runs(tree, tmp_path_factory) -> dict:
    """resnet18 from random initialisation at 64 px, --freeze last:2, one step over the 32 training images:
    1 process x 32, and 2 x 16 with and without --sync-bn (launched together)."""
    root = tmp_path_factory.mktemp("sync-bn")

    def job(name: str, nproc: int, *extra: str) -> dict:
        out = root / name
        args = ["--data-dir", str(tree), "--output-dir", str(out), "--cache-dir", str(root / f"cache-{name}"),
                "--model", "resnet18", "--weights", "none", "--image-size", "64", "--freeze", "last:2",
                "--batch-size", str(32 // nproc), "--epochs", "1", "--lr", "0.05", "--checkpoint-every-epochs", "0",
                "--wandb-mode", "disabled", *extra]
        return dict(args=args, nproc=nproc)

    jobs = {"one": job("one", 1), "synced": job("synced", 2, "--sync-bn"), "unsynced": job("unsynced", 2)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(launch, **kw) for name, kw in jobs.items()}
        for future in futures.values():
            future.result()
    return {name: root / name for name in jobs}


def final_weights(out: Path) -> dict:
    return load_file(str(out / "model" / WEIGHTS_FILE))


def test_sync_bn_makes_two_processes_of_16_train_like_one_of_32(bn_runs):
    one, synced, unsynced = (final_weights(bn_runs[k]) for k in ("one", "synced", "unsynced"))
    assert one.keys() == synced.keys()
    for name in one:
        torch.testing.assert_close(synced[name].double(), one[name].double(), rtol=1e-5, atol=1e-6, msg=name)
    losses = {k: read_metrics(v)["train"]["epoch_loss"][0] for k, v in bn_runs.items()}
    assert losses["synced"] == pytest.approx(losses["one"], rel=1e-6)
    # Without it, each process normalises with its own 16 images: other statistics, another loss and step.
    assert abs(losses["unsynced"] - losses["one"]) > 1e-4
    assert (unsynced["layer3.0.bn1.running_var"] - one["layer3.0.bn1.running_var"]).abs().max() > 1e-3
    assert (unsynced["layer4.0.conv1.weight"] - one["layer4.0.conv1.weight"]).abs().max() > 1e-5


def test_frozen_blocks_keep_their_batchnorm_statistics_in_a_real_run(bn_runs):
    for out in bn_runs.values():
        weights = final_weights(out)
        for name in ("bn1", "layer1.0.bn1", "layer2.1.bn2"):  # before layer3: frozen, in eval mode
            assert torch.equal(weights[f"{name}.running_mean"], torch.zeros_like(weights[f"{name}.running_mean"]))
            assert torch.equal(weights[f"{name}.running_var"], torch.ones_like(weights[f"{name}.running_var"]))
            assert weights[f"{name}.num_batches_tracked"].item() == 0
        for name in ("layer3.0.bn1", "layer4.1.bn2"):  # trained: one step's statistics
            assert weights[f"{name}.num_batches_tracked"].item() == 1
            assert not torch.equal(weights[f"{name}.running_var"], torch.ones_like(weights[f"{name}.running_var"]))
