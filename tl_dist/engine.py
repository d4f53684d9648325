"""The loop: extract features, evaluate, fit. The only place where training steps happen.

Distribution is Accelerate's: `prepare` wraps the model (DDP) and shards the evaluation loaders,
`backward` scales and syncs gradients, `autocast` applies --mixed-precision, `reduce` and
`gather_for_metrics` combine numbers from every process (dropping the evaluation loader's padding).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tl_dist.checkpoint import TrainState, save_checkpoint
from tl_dist.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from tl_dist.metrics import compute_metrics

STOP_FILE = "STOP"  # touch <run_dir>/STOP to make every process checkpoint and exit (the SLURM scripts do)


@dataclass
class Batches:
    """An iterable of (inputs, labels, positions) and how to turn its inputs into network inputs:
    uint8 images are normalised on the device; pooled features go straight to the classifier."""
    loader: object
    pooled: bool
    channels_last: bool = False
    mean: tuple = IMAGENET_MEAN  # the network's input normalisation (TransferNet.mean, .std)
    std: tuple = IMAGENET_STD

    def inputs(self, x: torch.Tensor, device) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return x if self.pooled else normalize(x, channels_last=self.channels_last, mean=self.mean, std=self.std)


class StopRequest:
    """Set by SIGUSR1/SIGTERM/SIGINT or a STOP file in the run folder; all processes agree on it through
    Accelerate's trigger, so they all stop after the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, run_dir: Path):
        self.stop_file = Path(run_dir) / STOP_FILE
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal_name is not None or self.stop_file.exists()

    def reason(self) -> str:
        return self.signal_name or f"{self.stop_file} exists"

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.stop_file.unlink(missing_ok=True)


class SkippedSteps:
    """fp16: counts optimizer steps the grad scaler skipped (inf/nan gradients), in total and in a row."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, skipped: bool) -> bool:
        """Returns True when `limit` steps in a row were skipped."""
        self.total += int(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return self.in_a_row >= self.limit


@torch.no_grad()
def extract_features(accelerator, model, batches: Batches, num_rows: int) -> torch.Tensor:
    """Pooled backbone features of every row, computed once (sharded over the processes, under the run's
    autocast) and gathered so that every process holds all of them, on its device."""
    net = accelerator.unwrap_model(model)
    net.eval()
    features = None
    for images, _, positions in batches.loader:
        with accelerator.autocast():
            f = net.embed(batches.inputs(images, accelerator.device))
        f, positions = accelerator.gather_for_metrics((f.contiguous(), positions.to(accelerator.device)))
        if features is None:
            features = torch.empty(num_rows, f.shape[1], dtype=f.dtype, device=accelerator.device)
        features[positions] = f
    if features is not None and features.is_cuda:
        torch.cuda.synchronize(features.device)  # done when it returns: the caller times it
    return features


@torch.no_grad()
def evaluate(accelerator, model, batches: Batches, classes: list[str]) -> tuple[dict, dict]:
    """Exact metrics over the whole split, whatever the number of processes. Also returns the gathered
    outputs, in split order: logits, labels, positions."""
    model.eval()
    logits, labels, positions = [], [], []
    start, seen = time.perf_counter(), 0
    for x, y, pos in batches.loader:
        with accelerator.autocast():
            out = model(batches.inputs(x, accelerator.device), pooled=batches.pooled)
        out, y, pos = accelerator.gather_for_metrics((out.float(), y.to(out.device), pos.to(out.device)))
        logits.append(out), labels.append(y), positions.append(pos)  # kept on the device: no sync per batch
        seen += len(y)
    logits, labels, positions = (torch.cat(t).cpu() for t in (logits, labels, positions))
    seconds = time.perf_counter() - start
    order = positions.argsort()
    outputs = {"logits": logits[order], "labels": labels[order], "positions": positions[order]}
    metrics = compute_metrics(outputs["logits"], outputs["labels"], classes)
    metrics["images_per_second"] = seen / max(seconds, 1e-9)
    return metrics, outputs


def fit(accelerator, model, optimizer, scheduler, batches: Batches, state: TrainState, cfg, run_dir: Path,
        classes: list[str], tracker, console, stop: StopRequest) -> str:
    """Train from `state` to the end of --epochs (or --max-steps). Returns "finished", "stopped" (a signal
    or STOP file: checkpoint saved) or "diverged" (a non-finite loss: nothing saved after it)."""
    sampler = batches.loader.batch_sampler
    skipped = SkippedSteps(cfg.max_skipped_steps)

    def checkpoint():
        folder = save_checkpoint(accelerator, run_dir, state, classes, cfg.keep_checkpoints)
        console.print(f"checkpoint: {folder}")

    for epoch in range(state.epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch=state.step_in_epoch)
        steps_per_epoch = state.step_in_epoch + len(sampler)
        model.train()
        task = console.start_task(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, state.step_in_epoch)
        tic = time.perf_counter()
        for x, y, _ in batches.loader:
            with accelerator.autocast():
                loss = F.cross_entropy(model(batches.inputs(x, accelerator.device), pooled=batches.pooled),
                                       y.to(accelerator.device))
            # The mean over all processes; .item() is a sync point, and gives every process the same
            # answer, so all of them stop on a non-finite loss before any weight sees its gradients.
            step_loss = accelerator.reduce(loss.detach().float(), "mean").item()
            finite = math.isfinite(step_loss)
            # In fp16 an overflow is expected now and then: the grad scaler skips that step and lowers its
            # scale (counted below). In fp32/bf16 a non-finite loss means the run has diverged.
            if not finite and accelerator.mixed_precision != "fp16":
                console.error(f"non-finite loss ({step_loss}) at step {state.global_step + 1} (epoch "
                              f"{epoch + 1}); stopped before applying it. The last checkpoint is kept. Try "
                              f"a lower --lr or --mixed-precision no.")
                return "diverged"
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.mixed_precision == "fp16" and skipped.update(accelerator.optimizer_step_was_skipped):
                console.error(f"the fp16 grad scaler skipped {skipped.in_a_row} steps in a row (up to step "
                              f"{state.global_step + 1}): gradients keep overflowing. Try bf16 or a lower --lr.")
                return "diverged"

            state.global_step += 1
            state.step_in_epoch += 1
            if finite:
                state.epoch_loss_sum += step_loss
                state.epoch_loss_steps += 1
            state.train_images += len(y) * accelerator.num_processes
            now = time.perf_counter()
            state.train_seconds += now - tic
            tic = now
            state.skipped_steps = skipped.total
            images_per_second = state.train_images / max(state.train_seconds, 1e-9)
            tracker.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                         "train/images_per_second": images_per_second, "epoch": epoch + 1,
                         "train/skipped_steps": skipped.total}, step=state.global_step)
            console.advance(task, state.step_in_epoch, steps_per_epoch,
                            f"loss {step_loss:.4f}  {images_per_second:,.0f} img/s",
                            log_line=state.global_step % cfg.log_every == 0)

            end_of_epoch = state.step_in_epoch == steps_per_epoch
            last_step = cfg.max_steps and state.global_step >= cfg.max_steps
            if stop.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():  # any process asked: all stop here, after the same step
                console.print(f"stop requested ({stop.reason()}): saving a checkpoint at step "
                              f"{state.global_step}")
                checkpoint()
                return "stopped"
            if (cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0
                    and not end_of_epoch and not last_step):
                checkpoint()
                tic = time.perf_counter()
            if last_step:
                break

        state.epoch_losses.append(state.epoch_loss_sum / max(state.epoch_loss_steps, 1))
        state.epoch, state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps = epoch + 1, 0, 0.0, 0
        tracker.log({"train/epoch_loss": state.epoch_losses[-1], "epoch": epoch + 1}, step=state.global_step)
        console.print(f"epoch {epoch + 1}: mean train loss {state.epoch_losses[-1]:.4f}")
        if cfg.max_steps and state.global_step >= cfg.max_steps:
            break
        if (cfg.checkpoint_every_epochs and (epoch + 1) % cfg.checkpoint_every_epochs == 0
                or cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0) \
                and epoch + 1 < cfg.epochs:
            checkpoint()
    console.stop_progress()
    return "finished"
