"""The optimizer, its learning-rate schedule, and the average of the weights. Plain torch.

The article's recipe is SGD (lr 0.001, momentum 0.9) over the trainable parameters at a constant rate. A
modern fine-tuning recipe (--recipe finetune) adds what torchvision's reference scripts and timm do: AdamW,
weight decay on the weights of convolutions and linear layers only, a linear warm-up, a cosine decay, a
lower lr for the pretrained layers than for the new head, and an exponential moving average of the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tl_dist.model import TransferNet
from tl_dist.run_dir import EMA_FILE

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)
# Transformer parameters that are embeddings, not weights of a layer: no weight decay (torchvision's
# reference scripts, --transformer-embedding-decay; timm's no_weight_decay()).
EMBEDDINGS = ("class_token", "pos_embedding", "relative_position_bias_table")


def fused_available(device: torch.device) -> bool:
    """One kernel for the whole update instead of several passes per parameter: on CUDA, and on CPUs
    since torch 2.4 (benchmarks/RESULTS.md)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))


def no_decay_names(model: nn.Module) -> set[str]:
    """The parameters weight decay leaves alone: biases, the weights of normalisation layers (decaying
    them only changes the scale that the next layer undoes) and transformer embeddings."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name == "bias" or isinstance(module, NORM_LAYERS) or name in EMBEDDINGS:
                names.add(full)
    return names


def parameter_groups(cfg, model: TransferNet, lr: float) -> list[dict]:
    """The trainable parameters in groups by their lr and weight decay: with --backbone-lr-scale, the head
    (classifier block) at `lr` and the rest of the network (the pretrained layers) at `lr` x the scale; with
    --weight-decay, the weights decayed and the biases and normalisation weights not (no_decay_names). One
    group ("all") without either, as the article's optimizer has. Each group has a `name`."""
    skip = no_decay_names(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith(model.head_name + ".") else "backbone"
        decays = cfg.weight_decay > 0 and name not in skip
        key = ", ".join([part if cfg.backbone_lr_scale != 1 else "all"]
                        + (["no decay"] if cfg.weight_decay > 0 and not decays else []))
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": cfg.weight_decay if decays else 0.0,
                                        "lr": lr * (cfg.backbone_lr_scale if part == "backbone" else 1.0)})
        group["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The lr of optimizer step `step` (counted from 0) as a fraction of the base lr: a linear warm-up over
    `warmup_steps` (step s gets (s + 1) / warmup_steps, reaching 1 at the last warm-up step), then constant,
    or a cosine decay from 1 to 0 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps) / decay_steps))


def effective_lr(cfg, num_processes: int) -> float:
    """--lr, times the number of processes with --scale-lr (the linear scaling rule)."""
    return cfg.lr * (num_processes if cfg.scale_lr else 1)


def build_optimizer(cfg, model: TransferNet, num_processes: int, device: torch.device, total_steps: int,
                    steps_per_epoch: int | None = None):
    """--optimizer over the trainable parameters (parameter_groups) and the learning-rate schedule over
    `total_steps` (lr_factor; --warmup-epochs counted in `steps_per_epoch`). Returns (optimizer, scheduler,
    lr)."""
    lr = effective_lr(cfg, num_processes)
    groups = parameter_groups(cfg, model, lr)
    fused = True if fused_available(device) else None
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused)
    warmup_steps = round(cfg.warmup_epochs * (steps_per_epoch or total_steps / cfg.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, min(warmup_steps, total_steps), total_steps, cfg.lr_schedule))
    return optimizer, scheduler, lr


# ---------------------------------------------------------------- the average of the weights


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the average's update after `updates` earlier ones: --ema-decay, held lower while the
    average is young, min(decay, (1 + updates) / (10 + updates)) as TensorFlow's ExponentialMovingAverage
    does with num_updates, so that the random initial weights fade within a short run too."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """--ema-decay: an exponential moving average of the weights and buffers (torch's AveragedModel with
    its EMA update; decays by ema_decay), updated after every optimizer step. Its first update copies the
    weights. It is kept in every checkpoint as ema.safetensors (through Accelerate's save/load hooks, so that
    --resume restores it), and is the run's final model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)  # a deep copy
        self.averaged.requires_grad_(False)
        # --compile replaces the network's `embed` with a compiled function of the network itself
        # (model.build_network), which the copy would call: the copy computes with its own weights.
        vars(self.averaged.module).pop("embed", None)

    def _average(self, averaged: list, current: list, updates: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay(self.decay, int(updates)))(averaged, current, updates)

    @property
    def model(self) -> nn.Module:
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def attach(self, accelerator) -> None:
        """Saved with, and loaded from, every checkpoint Accelerate writes or reads."""
        def save(models, weights, folder):
            if accelerator.is_main_process:
                save_file({k: v.detach().contiguous() for k, v in self.averaged.state_dict().items()},
                          str(Path(folder) / EMA_FILE))

        def load(models, folder):
            state = load_file(str(Path(folder) / EMA_FILE), device=str(accelerator.device))
            self.averaged.load_state_dict(state)

        self.hooks = (accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load))
