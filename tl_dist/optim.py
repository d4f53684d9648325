"""The optimizer and its learning-rate schedule. Plain torch.

The article's recipe is SGD (lr 0.001, momentum 0.9) over the trainable parameters at a constant rate;
--lr-schedule cosine decays it to 0 over the run's steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tl_dist.model import trainable_parameters


def fused_sgd_available(device: torch.device) -> bool:
    """One kernel for the whole SGD update instead of several passes per parameter: on CUDA, and on CPUs
    since torch 2.4 (benchmarks/RESULTS.md)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))


def build_optimizer(cfg, model: nn.Module, num_processes: int, device: torch.device, total_steps: int):
    """SGD over the trainable parameters (the classifier, with the article's frozen features) and the
    learning-rate schedule. Returns (optimizer, scheduler, lr)."""
    lr = cfg.lr * (num_processes if cfg.scale_lr else 1)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=lr, momentum=cfg.momentum,
                                fused=True if fused_sgd_available(device) else None)
    schedule = (lambda s: 1.0) if cfg.lr_schedule == "constant" else \
        (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), lr
