"""What a resume may change and where it starts, with real runs: a run with a validation split, stopped
after its first epoch (a copy of a finished run without what came later: test_run_folder.killed_after),
continued with --max-steps or another --data-dir, or from an explicit checkpoints/step_N; --val-fraction
defines the run, so a resume keeps its split and refuses another fraction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_tree, read_metrics, run_module, tiny_args
from test_run_folder import errors, killed_after, same_training, snapshot

# 40 images: 8 test, 8 validation (a quarter of each class' 8 left), 24 training: 3 steps an epoch at batch 8.
OPTIONS = ["--val-fraction", "0.25", "--epochs", "2", "--batch-size", "8", "--checkpoint-every-steps", "2",
           "--keep-checkpoints", "20", "--dropout", "0", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("resume-changes-images") / "caltech-101", per_class=10)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 2, 3 (the first epoch's end), 4 and 6."""
    out = tmp_path_factory.mktemp("resume-changes") / "reference"
    proc = run_module(tiny_args(data, out, out.parent / "cache", *OPTIONS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3", "step_4", "step_6"]
    return out


def resume(out: Path, *options: str):
    proc = run_module(["--output-dir", str(out), "--resume", "auto", *options])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_resume_keeps_the_validation_split_and_its_history(reference, tmp_path):
    out = killed_after(reference, 3, tmp_path / "run")
    split = (out / "split.json").read_bytes()
    before = snapshot(out)
    refused = run_module(["--output-dir", str(out), "--resume", "auto", "--val-fraction", "0.5"])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(errors(refused)) == 1 and "--val-fraction: saved 0.25, given 0.5" in refused.stderr
    assert snapshot(out) == before

    resume(out)
    ours, ref = read_metrics(out), read_metrics(reference)
    assert (out / "split.json").read_bytes() == split and len(json.loads(split)["val"]) == 8
    assert [h["epoch"] for h in ours["val"]["history"]] == [1, 2]  # the first from the first session
    assert ours["val"] == ref["val"]
    same_training(ours, ref)


def test_max_steps_may_change_on_a_resume(reference, tmp_path):
    """Stopped at step 2, resumed with --max-steps 4: it ends at step 4 with the weights the uninterrupted
    run had there."""
    out = killed_after(reference, 2, tmp_path / "run")
    resume(out, "--max-steps", "4")
    assert read_metrics(out)["train"]["global_step"] == 4
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4
    ours, theirs = (load_file(folder / "model.safetensors") for folder in (out / "model",
                                                                          reference / "checkpoints" / "step_4"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_data_dir_may_change_on_a_resume_while_it_holds_the_split(data, reference, tmp_path):
    """The data moved: the run continues from the new --data-dir as if nothing had. A --data-dir without
    one of the split's files is refused with one line naming it."""
    out = killed_after(reference, 3, tmp_path / "run")
    moved = shutil.copytree(data, tmp_path / "moved" / "caltech-101")
    first_test_file = json.loads((out / "split.json").read_text())["test"][0]
    partial = shutil.copytree(data, tmp_path / "partial" / "caltech-101")
    (partial / first_test_file).unlink()
    before = snapshot(out)
    refused = run_module(["--output-dir", str(out), "--resume", "auto", "--data-dir", str(partial)])
    assert refused.returncode == 1 and errors(refused) == [
        f"error: 1 file(s) of this run's split are not in --data-dir {partial} (first: {first_test_file}). Pass "
        "the --data-dir the run was trained on."], refused.stderr[-2000:]
    assert snapshot(out) == before

    resume(out, "--data-dir", str(moved))
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(moved)
    same_training(read_metrics(out), read_metrics(reference))


def test_resume_from_an_explicit_checkpoint(reference, tmp_path):
    """--resume PATH to an older checkpoint than the newest (no --output-dir: the run folder is the
    checkpoint's): the run goes on from that step and ends where the uninterrupted run ends."""
    out = killed_after(reference, 4, tmp_path / "run")
    step_2 = out / "checkpoints" / "step_2"
    proc = run_module(["--resume", str(step_2)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {step_2} at epoch 1, step 2" in " ".join(proc.stdout.split())
    same_training(read_metrics(out), read_metrics(reference))
