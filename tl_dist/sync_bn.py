"""--sync-bn: BatchNorm statistics over the global batch, so that 2 processes x 16 images train as 1 x 32.

A BatchNorm layer in train mode normalises with the mean and variance of the images it sees: under DDP, only
its own process's share of the batch. Those statistics, the running statistics and so the gradients then
depend on the number of processes. torch's `SyncBatchNorm` computes them over every process's images, on
GPUs: its forward refuses CPU tensors, `torch.batch_norm_stats` has no CPU kernel, and DDP refuses a CPU
module that holds one. On CPU processes (gloo), `CpuSyncBatchNorm` computes the same statistics with two
all-reduces of per-channel sums that gradients flow back through.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes. Every process's sum depends on every process's tensor, so
    the gradient each process gets is the sum of all their gradients: an all-reduce again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(_BatchNorm):
    """A BatchNorm layer whose batch statistics are those of every process's images, for CPU processes."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N x C x ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # one process, or evaluation: BatchNorm itself
        self._check_input_dim(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, broadcast over N and the spatial dimensions
        dims = [0] + list(range(2, x.dim()))
        values = x.float()
        local = torch.cat([values.sum(dims), values.new_tensor([values.numel() / values.shape[1]])])
        totals = _SumOverProcesses.apply(local)
        count, mean = totals[-1], totals[:-1] / totals[-1]
        centred = values - mean.view(shape)
        var = _SumOverProcesses.apply((centred * centred).sum(dims)) / count  # biased, as BatchNorm normalises
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As BatchNorm does: an exponential average (`momentum`), or a cumulative one when it is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)

    @classmethod
    def replacing(cls, layer: _BatchNorm) -> "CpuSyncBatchNorm":
        """A layer with `layer`'s settings, parameters, statistics and mode (the same tensors)."""
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        if layer.affine:
            new.weight, new.bias = layer.weight, layer.bias
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        new.num_batches_tracked = layer.num_batches_tracked
        new.train(layer.training)
        return new


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of `model` synchronised across processes: torch's SyncBatchNorm on GPUs,
    CpuSyncBatchNorm on CPUs. The state_dict keys and the modules' names stay the same."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, _BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, CpuSyncBatchNorm.replacing(layer))
    return model
