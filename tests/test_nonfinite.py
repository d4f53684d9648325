"""A run that diverges stops, says at which step, keeps its last good checkpoint and never saves NaN weights.

The real runs use a learning rate of 1e10: SGD with momentum then blows the classifier's weights up to
~1e28 within two steps, and the next forward pass overflows (inf - inf = nan in the loss), the way a
far too high learning rate diverges. fp16 needs a GPU: its skipped-step counting is tested below with
torch's GradScaler on the CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from conftest import REPO, launch, run_env, tiny_args, train_in_process
from safetensors.torch import load_file

from tl_dist.checkpoint import (NonFiniteWeightsError, TrainState, save_checkpoint,
                                save_final_model)
from tl_dist.engine import SkippedSteps
from tl_dist.run_dir import RunDir

DIVERGING = ["--lr", "1e10", "--checkpoint-every-steps", "1", "--keep-checkpoints", "3"]


def check_diverged_run(proc: subprocess.CompletedProcess, out) -> int:
    """The run stopped with one error line naming the step; returns that step."""
    assert proc.returncode != 0, proc.stdout[-3000:]
    # No traceback from the run (with several processes, torchrun prints its own when a worker exits 1).
    assert f'File "{REPO / "tl_dist"}' not in proc.stderr, proc.stderr[-5000:]
    errors = " ".join(proc.stderr.split()).split("error: ")[1:]  # rich wraps long lines
    assert len(errors) == 1 and errors[0].startswith("non-finite loss"), proc.stderr[-3000:]
    step = int(re.search(r"at step (\d+)", errors[0]).group(1))
    # The last good checkpoint is the step before (one is saved every step); nothing after it is saved.
    kept = RunDir(out).valid_checkpoints()
    assert step >= 2 and kept and kept[-1].name == f"step_{step - 1}", (step, kept)
    assert f"the last good checkpoint is {kept[-1]}" in " ".join(proc.stdout.split())
    for folder in kept:
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), folder
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    return step


def test_fp32_run_stops_at_the_first_nonfinite_loss(image_tree, cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tl_dist.train",
                           *tiny_args(image_tree, out, cache_dir, *DIVERGING, "--wandb-mode", "disabled")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    check_diverged_run(proc, out)


def test_bf16_two_processes_all_stop(image_tree, cache_dir, tmp_path):
    """The loss is averaged over the processes before the check, so all of them see the same non-finite
    value and stop after the same step: none is left waiting in a collective (the run would hang)."""
    out = tmp_path / "run"
    proc = launch(tiny_args(image_tree, out, cache_dir, *DIVERGING, "--mixed-precision", "bf16",
                            "--freeze", "none", "--wandb-mode", "disabled"), nproc=2, check=False, timeout=300)
    check_diverged_run(proc, out)


def test_a_run_that_diverges_before_its_first_checkpoint_says_it_has_none(image_tree, cache_dir, tmp_path,
                                                                          capsys):
    """Checkpoints at the end of each epoch, a divergence within the first: nothing to resume from, and the
    run says so rather than pointing at a checkpoint that does not exist."""
    out = tmp_path / "run"
    code = train_in_process(tiny_args(image_tree, out, cache_dir, "--lr", "1e10", "--wandb-mode", "disabled"))
    captured = capsys.readouterr()
    assert code == 1 and "error: non-finite loss" in " ".join(captured.err.split()), captured.err[-3000:]
    assert "no checkpoint was saved before it: the run has nothing to resume from" in " ".join(captured.out.split())
    assert RunDir(out).checkpoint_folders() == []


def test_nan_weights_are_never_saved(tmp_path, fresh_accelerate_state):
    """Weights can overflow in the very update after a finite loss: checkpoint and final model refuse them,
    and the last good checkpoint stays."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = TrainState(global_step=1)
    good = save_checkpoint(accelerator, tmp_path, state, ["a", "b"], {}, keep=2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    state.global_step = 2
    with pytest.raises(NonFiniteWeightsError, match=r"after step 2 \(weight\).*step_1"):
        save_checkpoint(accelerator, tmp_path, state, ["a", "b"], {}, keep=2)
    assert RunDir(tmp_path).valid_checkpoints() == [good]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    with pytest.raises(NonFiniteWeightsError, match="not saved"):
        save_final_model(accelerator, model, tmp_path, state, ["a", "b"], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_skipped_steps_counts_in_total_and_in_a_row():
    skipped = SkippedSteps(limit=3)
    assert [skipped.update(s) for s in (True, True, False, True, True)] == [False] * 5
    assert (skipped.total, skipped.in_a_row) == (4, 2)
    assert skipped.update(True) is True  # the third in a row
    assert (skipped.total, skipped.in_a_row) == (5, 3)
    assert skipped.update(False) is False and skipped.in_a_row == 0


def test_grad_scaler_skips_are_counted(fresh_accelerate_state):
    """What fit() feeds SkippedSteps in fp16: Accelerate's optimizer_step_was_skipped, set when the grad
    scaler finds inf/nan gradients and skips the step. Torch's GradScaler also runs on a CPU, so the real
    scaler and Accelerate's optimizer wrapper are exercised here without a GPU."""
    accelerator = Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = AcceleratedOptimizer(torch.optim.SGD([param], lr=0.1), device_placement=False,
                                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    accelerator._optimizers.append(optimizer)
    skipped = SkippedSteps(limit=2)
    stops = []
    for grad in (1.0, float("inf"), 1.0, float("nan"), float("inf")):
        param.grad = None
        optimizer.scaler.scale((param * grad).sum()).backward()  # what accelerator.backward does in fp16
        before = param.detach().clone()
        optimizer.step()
        assert accelerator.optimizer_step_was_skipped == (not torch.isfinite(torch.tensor(grad)))
        assert torch.equal(param.detach(), before) == accelerator.optimizer_step_was_skipped
        stops.append(skipped.update(accelerator.optimizer_step_was_skipped))
    assert (skipped.total, stops) == (3, [False, False, False, False, True])
