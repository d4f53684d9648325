"""Randomness that does not depend on who draws it.

Every random choice of a training step is a function of (--seed, epoch, the image's index in the training
split), or, for what is drawn once per step (the mixup weight, the cutmix box), of (--seed, epoch, step):
never of the process, the data-loader worker or the order in which batches arrive. So the augmentation, the
mixing partner and weight and the dropout masks of image i in epoch e are the same on 1 or 8 processes, with
any --num-workers, and after a resume in the middle of an epoch on another number of processes. JAX's
`fold_in`, TensorFlow's stateless ops and numpy's Philox work this way: (key, counter) decides the output,
nothing is carried over from the previous draw.

- Per image: a 32-bit key folded from (seed, epoch, index) with `hash32`, a bijective integer hash computed
  with int64 tensor ops that cannot overflow, so it is exact and the same on any device; `uniforms` then
  gives a whole batch's numbers of one stream (crop, flip, ...) in one op.
- Per step: numpy's Philox generator keyed by (seed, epoch, step) (`step_generator`).
- Dropout and stochastic depth draw their masks from the batch's keys: `use_keyed_randomness` puts
  `KeyedDropout` / `KeyedStochasticDepth` in place of torch's, and the loop hands them the keys of the images
  in the batch with `keyed(model, keys)` around the forward pass.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.ops import StochasticDepth

MASK32 = 0xFFFFFFFF
SEED_SALT = 0x243F6A88  # digits of pi: any fixed constant would do
GOLDEN = 0x9E3779B9
LAYER_STREAMS = 1 << 16  # dropout layer k draws from stream LAYER_STREAMS + k; augmentation streams are below


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32: c above 2**31 is taken as c - 2**32 (the same residue), so the
    product stays within int64 and never overflows (wrapping on overflow is not something every device
    promises); `& MASK32` takes the low 32 bits of the two's complement."""
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & MASK32


def hash32(x):
    """A bijection of 32-bit integers with full avalanche (Chris Wellons' `lowbias32`, from hash-prospector).
    Takes Python ints or int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def fold(key, data):
    """The key of item `data` under `key`, as JAX's `fold_in`: a new 32-bit key. Ints or int64 tensors
    (broadcast); `data` may be any integer, its low 32 bits count."""
    return hash32(key ^ hash32((data & MASK32) ^ GOLDEN))


def seed_key(seed: int) -> int:
    """The root key of --seed (all 64 bits of it)."""
    return fold(fold(SEED_SALT, seed & MASK32), (seed >> 32) & MASK32)


def image_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """The key of each image (its index in the training split) in `epoch`: int64, on the indices' device."""
    return fold(fold(seed_key(seed), epoch), indices.long())


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits -> a float32 in [0, 1) on a grid of 2**-24 (every value exact in float32)."""
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniforms(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """count uniforms in [0, 1) per key (N x count, float32) from `stream`: counter j of stream s of key k is
    fold(fold(k, s), j), so adding a stream or a counter never changes the others."""
    counters = torch.arange(count, device=keys.device)
    return bits_to_uniform(fold(fold(keys, stream)[:, None], counters))


def step_generator(seed: int, epoch: int, step: int) -> np.random.Generator:
    """numpy's counter-based Philox generator keyed by (seed, epoch, step in the epoch): what a training step
    draws once for the whole global batch (the mixup weight, the cutmix box)."""
    key = np.array([seed & (2**64 - 1), ((epoch & MASK32) << 32) | (step & MASK32)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


@dataclass(frozen=True)
class StepDraws:
    """What a training step's random choices are a function of."""
    seed: int
    epoch: int
    step: int  # in the epoch

    def image_keys(self, indices: torch.Tensor) -> torch.Tensor:
        return image_keys(self.seed, self.epoch, indices)

    def generator(self) -> np.random.Generator:
        return step_generator(self.seed, self.epoch, self.step)


# ---------------------------------------------------------------- dropout and stochastic depth


class KeyedRandomness:
    """A layer whose random draws come from the keys of the images in the batch (set by `keyed`)."""
    keys: torch.Tensor | None = None
    stream: int = LAYER_STREAMS

    def batch_keys(self, x: torch.Tensor) -> torch.Tensor:
        if self.keys is None or len(self.keys) != len(x):
            raise RuntimeError(f"{type(self).__name__} in training mode needs the keys of the {len(x)} images in "
                               "the batch: call the model inside randomness.keyed(model, keys)")
        return fold(self.keys.to(x.device), self.stream)


class KeyedDropout(KeyedRandomness, nn.Dropout):
    """nn.Dropout whose mask for each image is drawn from the image's key: element j of image k is kept when
    uniform(k, layer, j) >= p, and scaled by 1 / (1 - p), as F.dropout does. Identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        elements = torch.arange(math.prod(x.shape[1:]), device=x.device).view(x.shape[1:])  # x may be empty
        keys = self.batch_keys(x).view(-1, *[1] * (x.dim() - 1))
        keep = bits_to_uniform(fold(keys, elements)) >= self.p
        return x * (keep.to(x.dtype) / (1 - self.p))


class KeyedStochasticDepth(KeyedRandomness, StochasticDepth):
    """torchvision's row-mode StochasticDepth (each image's residual branch dropped with probability p,
    survivors scaled by 1 / (1 - p)) with the choice drawn from the image's key. Identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        survival = 1.0 - self.p
        keep = bits_to_uniform(fold(self.batch_keys(x), 0)) < survival
        scale = keep.to(x.dtype) / survival if survival > 0 else keep.to(x.dtype)
        return x * scale.view(-1, *[1] * (x.dim() - 1))


def use_keyed_randomness(model: nn.Module) -> nn.Module:
    """Puts a keyed twin in place of every nn.Dropout and row-mode StochasticDepth of `model` (in place; they
    hold no parameters, so the state_dict is unchanged). Each layer draws from its own stream, numbered in the
    order of `named_modules`, the same in every process."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                twin = KeyedDropout(child.p)
            elif type(child) is StochasticDepth and child.mode == "row":
                twin = KeyedStochasticDepth(child.p, "row")
            else:
                continue
            twin.stream = LAYER_STREAMS + count
            count += 1
            setattr(parent, name, twin)
    return model


@contextlib.contextmanager
def keyed(model: nn.Module, keys: torch.Tensor):
    """The forward passes inside draw their dropout masks from `keys` (one per image of the batch). `model`
    may be wrapped (DDP): its keyed layers are the wrapped network's."""
    layers = [m for m in model.modules() if isinstance(m, KeyedRandomness)]
    for layer in layers:
        layer.keys = keys
    try:
        yield
    finally:
        for layer in layers:
            layer.keys = None
