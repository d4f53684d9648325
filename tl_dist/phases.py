"""A run's phases: what trains, with which options, in which of the run's epochs. Most runs have one.

LP-FT (linear probing, then fine-tuning; Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022) has two: --probe-epochs of the classifier block alone on the
frozen backbone's cached features (seconds; the features are reused across runs like any), then --epochs of
what --freeze trains, starting from that head rather than a random one, whose large early gradients would
otherwise distort the pretrained features. `--recipe lp-ft` is the finetune recipe with a probe.

The phases are one run: one run folder, one W&B run, one train state whose steps and epochs count on across
them (the fine-tuning's first epoch is epoch probe_epochs + 1). So the step of a checkpoint says which phase
saved it, and --resume continues in that phase.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tl_dist.config import Config
from tl_dist.engine import Criterion, LoopSettings, Training
from tl_dist.model import TransferNet, set_trainable
from tl_dist.optim import WeightAverage, build_optimizer


@dataclass(frozen=True)
class Phase:
    name: str  # "probe", or "train" for the run's (last) training phase
    cfg: Config  # the options it trains with
    first_epoch: int  # the run's epochs before it
    end_epoch: int  # the run's epochs at its end

    def start_step(self, steps_per_epoch: int) -> int:
        """The run's global step when it starts (--max-steps counts the whole run's steps)."""
        return min(self.first_epoch * steps_per_epoch, self.cfg.max_steps or 10**12)

    def end_step(self, steps_per_epoch: int) -> int:
        return min(self.end_epoch * steps_per_epoch, self.cfg.max_steps or 10**12)

    def describe(self) -> str:
        trains = "the classifier block on cached features" if self.name == "probe" else f"--freeze {self.cfg.freeze}"
        return (f"{self.name}: {trains}, epochs {self.first_epoch + 1}-{self.end_epoch}, {self.cfg.optimizer} at "
                f"lr {self.cfg.lr:g}")


def plan_phases(cfg: Config) -> list[Phase]:
    """The run's phases, in order. The probe trains with the run's optimizer, weight decay, label smoothing
    and schedule at --probe-lr, without warm-up (a linear head on fixed features needs none), without the
    weight average (it starts with the fine-tuning, from the probed head) and without augmentation (the
    features are of the images evaluation sees, computed once and reused across runs)."""
    train = Phase("train", cfg, cfg.probe_epochs, cfg.total_epochs)
    if not cfg.probe_epochs:
        return [train]
    probe = dataclasses.replace(cfg, freeze="features", epochs=cfg.probe_epochs, lr=cfg.probe_lr or cfg.lr,
                                warmup_epochs=0.0, ema_decay=0.0, augment="none", random_erasing=0.0, mixup=0.0,
                                cutmix=0.0)
    return [Phase("probe", probe, 0, cfg.probe_epochs), train]


def phase_at(phases: list[Phase], global_step: int, steps_per_epoch: int) -> int:
    """The index of the phase a run at `global_step` is in: the first that ends at or after it (a checkpoint
    saved at a phase's last step was saved by that phase, with its optimizer)."""
    return next((i for i, p in enumerate(phases) if global_step <= p.end_step(steps_per_epoch)), len(phases) - 1)


def build_training(accelerator, phase: Phase, net: TransferNet, steps_per_epoch: int) -> tuple[Training, LoopSettings]:
    """What `phase` trains (--freeze) and how: its optimizer and schedule over its own steps, under
    Accelerate; its loss, clipping and weight average (--ema-decay, registered for Accelerate's checkpoints);
    the loop's settings, to the phase's last epoch."""
    cfg = phase.cfg
    accelerator.free_memory()  # the previous phase's model, optimizer and schedule leave Accelerate's checkpoints
    set_trainable(net, cfg.freeze)
    steps = phase.end_step(steps_per_epoch) - phase.start_step(steps_per_epoch)
    optimizer, scheduler, _ = build_optimizer(cfg, net, accelerator.num_processes, accelerator.device, steps,
                                              steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    average = WeightAverage(net, cfg.ema_decay) if cfg.ema_decay else None  # after prepare: on the device
    if average is not None:
        average.attach(accelerator)
    training = Training(accelerator, model, optimizer, scheduler, Criterion(cfg.label_smoothing), cfg.clip_grad_norm,
                        average)
    settings = LoopSettings(phase.end_epoch, cfg.max_steps, cfg.checkpoint_every_epochs, cfg.checkpoint_every_steps,
                            cfg.max_skipped_steps, cfg.seed)
    return training, settings
