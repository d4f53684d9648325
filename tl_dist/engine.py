"""The loop: extract features, evaluate, fit. The only place where training steps happen.

Distribution is Accelerate's: `prepare` wraps the model (DDP) and shards the evaluation loaders,
`accumulate` and `backward` scale, accumulate and sync gradients, `autocast` applies --mixed-precision,
`reduce` and `gather_for_metrics` combine numbers from every process (dropping the evaluation loader's
padding). The training batches come from `data.GlobalBatchSampler`: the same global batches, in the same
order, for any number of processes; and every random choice of a step (augmentation, mixing, dropout
masks) is drawn from (seed, epoch, each image's index), never from the process (randomness.py).
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tl_dist.checkpoint import TrainState
from tl_dist.console import QuietPhase
from tl_dist.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from tl_dist.metrics import compute_metrics
from tl_dist.optim import WeightAverage
from tl_dist.randomness import StepDraws, keyed
from tl_dist.runtime import StopRequest


class Outcome(enum.Enum):
    FINISHED = "finished"  # trained to the end of --epochs (or --max-steps)
    STOPPED = "stopped"  # a signal or the STOP file: a checkpoint was saved, --resume auto continues
    DIVERGED = "diverged"  # a non-finite loss, or the fp16 grad scaler gave up: nothing saved after it
    PRUNED = "pruned"  # a sweep's pruner ended the run after an epoch: a checkpoint was saved


@dataclass
class Batches:
    """An iterable of (inputs, labels, positions) and how to turn its inputs into network inputs:
    uint8 images are normalised on the device; pooled features go straight to the classifier. Training
    images may be augmented on the device first (`augment`: augment.TrainingInputs)."""
    loader: object
    pooled: bool
    channels_last: bool = False
    mean: tuple = IMAGENET_MEAN  # the network's input normalisation (TransferNet.mean, .std)
    std: tuple = IMAGENET_STD
    augment: Callable | None = None

    def inputs(self, x: torch.Tensor, device) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return x if self.pooled else normalize(x, channels_last=self.channels_last, mean=self.mean, std=self.std)

    def training_inputs(self, batch, draws: StepDraws, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training micro-batch (inputs, labels, positions in the split) -> the network's inputs, the targets
        (labels, or soft targets when images are mixed) and the images' keys (their dropout masks), on the
        device."""
        x, labels, positions = batch
        if self.augment is not None:
            return self.augment(x, labels, positions, draws, device)
        keys = draws.image_keys(positions).to(device, non_blocking=True)
        return self.inputs(x, device), labels.to(device, non_blocking=True), keys


class SkippedSteps:
    """fp16: counts optimizer steps the grad scaler skipped (inf/nan gradients), in total and in a row."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, skipped: bool) -> bool:
        """Returns True when `limit` steps in a row were skipped."""
        self.total += int(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return self.in_a_row >= self.limit


def _phase(console, description: str, total: int):
    """The console's progress display for a phase (counts over all processes), or none without a console."""
    return console.phase(description, total) if console is not None else contextlib.nullcontext(QuietPhase())


@torch.no_grad()
def extract_features(accelerator, model, batches: Batches, write: Callable[[torch.Tensor, torch.Tensor], None],
                     console=None, description: str = "features") -> None:
    """Pooled backbone features of every image of `batches`, computed once (sharded over the processes,
    under the run's autocast) and gathered: `write(positions, features)` gets every gathered batch, on
    every process (the caller decides who keeps them)."""
    net = accelerator.unwrap_model(model)
    net.eval()
    with _phase(console, description, len(batches.loader.dataset)) as progress:
        for images, _, positions in batches.loader:
            with accelerator.autocast():
                f = net.embed(batches.inputs(images, accelerator.device))
            f, positions = accelerator.gather_for_metrics((f.contiguous(), positions.to(accelerator.device)))
            write(positions, f)
            progress.advance(len(positions))
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)  # done when it returns: the caller times it


@torch.no_grad()
def evaluate(accelerator, model, batches: Batches, classes: list[str], console=None) -> tuple[dict, dict]:
    """Exact metrics over the whole split, whatever the number of processes. Also returns the gathered
    outputs, in split order: logits, labels, positions."""
    model.eval()
    logits, labels, positions = [], [], []
    start, seen = time.perf_counter(), 0
    with _phase(console, "evaluating", len(batches.loader.dataset)) as progress:
        for x, y, pos in batches.loader:
            with accelerator.autocast():
                out = model(batches.inputs(x, accelerator.device), pooled=batches.pooled)
            out, y, pos = accelerator.gather_for_metrics((out.float(), y.to(out.device), pos.to(out.device)))
            logits.append(out), labels.append(y), positions.append(pos)  # on the device: no sync per batch
            seen += len(y)
            progress.advance(len(y))
    logits, labels, positions = (torch.cat(t).cpu() for t in (logits, labels, positions))
    seconds = time.perf_counter() - start
    order = positions.argsort()
    outputs = {"logits": logits[order], "labels": labels[order], "positions": positions[order]}
    metrics = compute_metrics(outputs["logits"], outputs["labels"], classes)
    metrics["images_per_second"] = seen / max(seconds, 1e-9)
    return metrics, outputs


# ---------------------------------------------------------------- training


@dataclass
class LoopSettings:
    """What the loop needs of the options."""
    epochs: int
    max_steps: int = 0  # 0 = no limit
    checkpoint_every_epochs: int = 0  # 0 = never
    checkpoint_every_steps: int = 0
    max_skipped_steps: int = 50
    seed: int = 0  # what, with the epoch and the image, every random choice of a step is drawn from

    def total_steps(self, steps_per_epoch: int) -> int:
        return min(steps_per_epoch * self.epochs, self.max_steps or 10**12)

    def checkpoint_due(self, state: TrainState, end_of_epoch: bool, last: bool) -> bool:
        """Every N steps, at the end of every N-th epoch, and after the last step (the state that
        `--resume auto --epochs M` extends), whenever checkpoints are on."""
        if not (self.checkpoint_every_epochs or self.checkpoint_every_steps):
            return False
        return (last or (self.checkpoint_every_steps and state.global_step % self.checkpoint_every_steps == 0)
                or (end_of_epoch and self.checkpoint_every_epochs and state.epoch % self.checkpoint_every_epochs == 0))


@dataclass(frozen=True)
class Criterion:
    """Cross-entropy over hard labels (N,) or soft targets (N x C, rows summing to 1: mixup/cutmix), with
    label smoothing: the target becomes (1 - eps) * target + eps / C (Szegedy et al., 2016), as
    `F.cross_entropy(label_smoothing=eps)` defines it for hard labels. Returns the batch mean."""
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        eps = self.label_smoothing
        targets = targets.to(logits.dtype) * (1 - eps) + eps / logits.shape[1]
        return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


@dataclass
class Training:
    """What an optimizer step needs: the model, optimizer and schedule as `accelerator.prepare` returned them,
    the loss, the gradient clipping and the average of the weights."""
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: Criterion = Criterion()
    clip_grad_norm: float = 0.0  # --clip-grad-norm: the largest norm of the global batch's gradient (0: no limit)
    ema: WeightAverage | None = None  # --ema-decay: updated after every step that was applied


@dataclass
class LoopHooks:
    """What the loop calls out to: the stop request it watches, the checkpoint it saves when one is due or a
    stop is asked, and validation after each epoch, which returns whether a sweep's pruner ends the run there."""
    stop: StopRequest
    save_checkpoint: Callable[[], None]
    validate: Callable[[TrainState], bool] | None = None


def train_step(training: Training, batches: Batches, micro_batches, global_images: int,
               draws: StepDraws) -> float:
    """One optimizer step over one global batch, given as this process' micro-batches (one per gradient
    accumulation step), with its random choices drawn from `draws`. Returns the mean loss over the global
    batch. The update is applied only when that loss is finite (in fp16 the grad scaler skips a non-finite
    step itself); it is the same on every process, so all of them apply it or none does."""
    accelerator, model = training.accelerator, training.model
    # Each micro-batch's loss is weighted by its share of the global batch (times the processes, which DDP
    # averages over, and the accumulation steps, which Accelerate divides by): a shorter last batch then
    # gives the exact mean, whatever the number of processes. The weight is exactly 1 for a full batch.
    weight = accelerator.num_processes * len(micro_batches)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        with accelerator.accumulate(model):  # no gradient all-reduce before the last micro-batch
            x, targets, keys = batches.training_inputs(batch, draws, accelerator.device)
            with accelerator.autocast(), keyed(model, keys):
                out = model(x, pooled=batches.pooled)
                loss = (training.criterion(out, targets) * (len(x) * weight / global_images)
                        if len(x) else out.sum() * 0.0)  # an empty share still joins the all-reduce
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
    if training.clip_grad_norm:  # the gradients are all-reduced by now: every process clips the same ones
        accelerator.clip_grad_norm_(model.parameters(), training.clip_grad_norm)
    step_loss = accelerator.reduce(loss_sum / len(micro_batches), "mean").item()  # note: a sync point
    if math.isfinite(step_loss) or accelerator.mixed_precision == "fp16":
        training.optimizer.step()
        training.scheduler.step()
        if training.ema is not None and not accelerator.optimizer_step_was_skipped:
            training.ema.update(accelerator.unwrap_model(model))
    training.optimizer.zero_grad(set_to_none=True)
    return step_loss


def fit(training: Training, batches: Batches, state: TrainState, settings: LoopSettings, log: "TrainLog",
        hooks: LoopHooks) -> Outcome:
    """Train from `state` to the end of the run (--epochs, or --max-steps), saving checkpoints when they are
    due or a stop is requested, and validating after each epoch."""
    accelerator, sampler = training.accelerator, batches.loader.batch_sampler
    total_steps = settings.total_steps(sampler.steps_per_epoch)
    skipped = SkippedSteps(settings.max_skipped_steps)
    while state.global_step < total_steps:
        sampler.set_epoch(state.epoch, start_step=state.step_in_epoch)
        training.model.train()
        log.start_epoch(state, sampler.steps_per_epoch)
        for micro_batches, global_images in global_steps(batches.loader, sampler):
            draws = StepDraws(settings.seed, state.epoch, state.step_in_epoch)
            loss = train_step(training, batches, micro_batches, global_images, draws)
            if not math.isfinite(loss) and accelerator.mixed_precision != "fp16":
                log.error(f"non-finite loss ({loss}) at step {state.global_step + 1} (epoch {state.epoch + 1}); "
                          "stopped before applying it. Try a lower --lr or --mixed-precision no.")
                return Outcome.DIVERGED
            if accelerator.mixed_precision == "fp16" and skipped.update(accelerator.optimizer_step_was_skipped):
                log.error(f"the fp16 grad scaler skipped {skipped.in_a_row} steps in a row (up to step "
                          f"{state.global_step + 1}): gradients keep overflowing. Try bf16 or a lower --lr.")
                return Outcome.DIVERGED
            state.count_step(loss, global_images, skipped.total)
            log.after_step(state, loss, training.scheduler.get_last_lr()[0])
            end_of_epoch, last = state.step_in_epoch == sampler.steps_per_epoch, state.global_step >= total_steps
            if end_of_epoch or last:
                state.end_epoch()
                log.end_epoch(state)
                if hooks.validate is not None:
                    pruned = hooks.validate(state) and not last  # a run that is done is not pruned
                    training.model.train()
                    if pruned:
                        state.pruned = True
                        log.print(f"pruned by the sweep after epoch {state.epoch}: saving a checkpoint at step "
                                  f"{state.global_step}")
                        hooks.save_checkpoint()
                        return Outcome.PRUNED
            if hooks.stop.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():  # any process asked: all stop here, after the same step
                log.print(f"stop requested ({hooks.stop.reason()}): saving a checkpoint at step {state.global_step}")
                hooks.save_checkpoint()
                return Outcome.STOPPED
            if settings.checkpoint_due(state, end_of_epoch, last):
                hooks.save_checkpoint()
                log.restart_clock()
            if last:
                break
    log.done()
    return Outcome.FINISHED


def global_steps(loader, sampler):
    """(this process' micro-batches as (inputs, labels, positions in the split), images in the global batch),
    one per step."""
    batches = iter(loader)
    for step in range(sampler.start_step, sampler.steps_per_epoch):
        micro = [next(batches) for _ in range(sampler.accumulation)]
        yield micro, sampler.global_images(step)


class TrainLog:
    """What the loop shows: the time spent training, throughput, W&B (every step) and the console (a
    progress bar, or in a log lines paced by time: console.PlainPhase)."""

    def __init__(self, tracker, console, settings: LoopSettings):
        self.tracker, self.console, self.settings = tracker, console, settings
        self.task, self.steps_per_epoch, self.tic = None, 0, time.perf_counter()

    def print(self, message: str) -> None:
        self.console.print(message)

    def error(self, message: str) -> None:
        self.console.error(message)

    def restart_clock(self) -> None:
        self.tic = time.perf_counter()  # the time a checkpoint took is not training time

    def start_epoch(self, state: TrainState, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.task = self.console.start_task(f"epoch {state.epoch + 1}/{self.settings.epochs}", steps_per_epoch,
                                            state.step_in_epoch)
        self.restart_clock()

    def after_step(self, state: TrainState, loss: float, lr: float) -> None:
        """Show a step that was taken (and add the time it took to the state's training time)."""
        now = time.perf_counter()
        state.train_seconds += now - self.tic
        self.tic = now
        images_per_second = state.train_images / max(state.train_seconds, 1e-9)
        self.tracker.log({"train/loss": loss, "train/lr": lr, "train/images_per_second": images_per_second,
                          "epoch": state.epoch + 1, "train/skipped_steps": state.skipped_steps},
                         step=state.global_step)
        self.console.advance(self.task, state.step_in_epoch, f"loss {loss:.4f}  {images_per_second:,.0f} img/s")

    def end_epoch(self, state: TrainState) -> None:
        """Show the epoch that `state.end_epoch()` closed."""
        self.tracker.log({"train/epoch_loss": state.epoch_losses[-1], "epoch": state.epoch}, step=state.global_step)
        self.console.print(f"epoch {state.epoch}: mean train loss {state.epoch_losses[-1]:.4f}")

    def done(self) -> None:
        self.console.stop_progress()
