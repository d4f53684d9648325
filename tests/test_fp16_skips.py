"""fp16's skipped steps through the real loop: `engine.fit` with a real Accelerator, a real torch GradScaler
and real fp16 autocast, on the CPU.

Accelerate refuses to build a grad scaler on a CPU (and train.py refuses --mixed-precision fp16 there), so
each test builds the Accelerator with mixed_precision="fp16" and gives it what Accelerate gives it on a GPU:
a GradScaler (torch's runs on a CPU) and native autocast (CPU autocast has float16). Rows of backbone
features above fp16's largest value (65504) then overflow for real: the logits and the loss are NaN, the
scaler finds non-finite gradients and skips the step, and Accelerate reports it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from tl_dist.checkpoint import TrainState
from tl_dist.console import RunConsole
from tl_dist.data import GlobalBatchSampler, make_loader
from tl_dist.engine import Batches, LoopHooks, LoopSettings, TrainLog, Training, fit
from tl_dist.runtime import StopRequest
from tl_dist.model import build_model, trainable_parameters
from tl_dist.run_dir import RunDir
from tl_dist.tracking import Tracker

ROWS, FEATURES, CLASSES, SEED = 12, 64, 4, 0  # vgg_tiny's classifier takes 64 pooled features
OVERFLOW = 1e5  # above fp16's largest finite value: such a row becomes inf under autocast


def run_fit(accelerator, model, optimizer, scheduler, batches: Batches, run_dir, *, epochs: int,
            max_skipped_steps: int) -> tuple[str, TrainState]:
    """The one call of `fit` in this file (adapt here when its signature changes). Returns the outcome's
    name in lower case ("finished", "stopped", "diverged") and the train state it left."""
    settings = LoopSettings(epochs=epochs, max_skipped_steps=max_skipped_steps)  # no checkpoints
    state = TrainState()
    log = TrainLog(Tracker(accelerator, RunDir(run_dir), "disabled"), RunConsole(True), settings)
    outcome = fit(Training(accelerator, model, optimizer, scheduler), batches, state, settings, log,
                  LoopHooks(StopRequest(run_dir / "STOP"), save_checkpoint=lambda: None))
    return outcome.value, state


class FeatureRows(torch.utils.data.Dataset):
    """Feature rows in memory with their labels, a batch at a time (as the stored features are served)."""

    def __init__(self, features: torch.Tensor, labels: list[int]):
        self.features, self.labels = features, torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.features)

    def __getitems__(self, positions):
        idx = torch.tensor(list(positions), dtype=torch.long)
        return self.features[idx], self.labels[idx], idx


def fp16_accelerator() -> Accelerator:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", step_scheduler_with_optimizer=False)
    assert accelerator.scaler is None  # what Accelerate does on a CPU; on a GPU it makes these two:
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # 1.0: finite rows never overflow
    accelerator.native_amp = True  # autocast in float16
    return accelerator


def train_on(features: torch.Tensor, run_dir, *, epochs: int, max_skipped_steps: int):
    """fit on `features` (one row per step) from a seeded vgg_tiny classifier, as train.py prepares it.
    Returns (outcome, state, classifier weights before, after)."""
    accelerator = fp16_accelerator()
    torch.manual_seed(SEED)
    model = build_model("vgg_tiny", CLASSES, "none", "features", dropout=0.0)
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sampler = GlobalBatchSampler(ROWS, 1, num_processes=1, rank=0, seed=SEED)
    labels = [i % CLASSES for i in range(ROWS)]
    batches = Batches(make_loader(FeatureRows(features, labels), sampler), pooled=True)
    outcome, state = run_fit(accelerator, model, optimizer, scheduler, batches, run_dir, epochs=epochs,
                             max_skipped_steps=max_skipped_steps)
    after = accelerator.unwrap_model(model).classifier.state_dict()
    return outcome, state, before, after


def first_epoch_order() -> list[int]:
    """The rows in the order fit sees them in epoch 0 (batch size 1, one process)."""
    sampler = GlobalBatchSampler(ROWS, 1, num_processes=1, rank=0, seed=SEED)
    sampler.set_epoch(0)
    return [batch[0] for batch in sampler]


def test_overflowing_steps_are_skipped_counted_and_the_run_goes_on(tmp_path, fresh_accelerate_state):
    """Every second step overflows: 6 of 12 skipped, never 2 in a row, so with --max-skipped-steps 2 the
    run finishes (a NaN loss in fp16 is not a divergence) and counts all six."""
    torch.manual_seed(1)
    features = torch.randn(ROWS, FEATURES)
    overflowing = first_epoch_order()[::2]
    features[overflowing] = OVERFLOW
    outcome, state, before, after = train_on(features, tmp_path, epochs=1, max_skipped_steps=2)
    assert outcome == "finished"
    assert state.skipped_steps == 6
    assert state.global_step == state.epoch * ROWS == ROWS  # skipped steps are steps of the run
    assert len(state.epoch_losses) == 1 and torch.isfinite(torch.tensor(state.epoch_losses[0]))
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the finite steps trained
    assert not (tmp_path / "checkpoints").exists()


def test_too_many_skips_in_a_row_is_a_divergence(tmp_path, fresh_accelerate_state, capsys):
    """Every step overflows: the third skip in a row stops the run, before that step is counted; the
    weights were never touched and nothing is saved."""
    features = torch.full((ROWS, FEATURES), OVERFLOW)
    outcome, state, before, after = train_on(features, tmp_path, epochs=2, max_skipped_steps=3)
    assert outcome == "diverged"
    assert (state.global_step, state.skipped_steps, state.epoch_losses) == (2, 2, [])
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not (tmp_path / "checkpoints").exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the fp16 grad scaler skipped 3 steps in a row (up to step 3)" in err, err

