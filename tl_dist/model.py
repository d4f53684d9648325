"""The network: VGG16 with ImageNet weights, frozen conv features, a new last layer. Plain torch.

`TransferNet` keeps torchvision's attribute names (features, avgpool, classifier), so its state_dict is a
torchvision VGG16 state_dict. Its forward can start from pooled backbone features (`pooled=True`): that is
how the frozen-feature cache trains the classifier through the same (DDP-wrapped) module.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn
from torchvision import models


class WeightsError(RuntimeError):
    """A weights file that cannot be used; the message says what to do."""


class TransferNet(nn.Module):
    def __init__(self, features: nn.Module, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened backbone features (25088 per image for VGG16)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        return self.classifier(x if pooled else self.embed(x))


def _vgg_tiny(dropout: float) -> models.VGG:
    """A small network with VGG16's layout (features / avgpool / classifier[0..6]) for fast tests."""
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    net.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    net.classifier = nn.Sequential(nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(dropout),
                                   nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(64, 1000))
    return net


def _dense_fp32(state: dict) -> dict:
    """Loaded tensors that can become parameters (load_state_dict(assign=True) keeps them as they are):
    float32, dense and contiguous, as the copy into a randomly initialised network would give."""
    return {k: v.float().contiguous() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in state.items()}


def _load_state_dict(net: nn.Module, path: Path, arch: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # a file from outside the run
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"--weights {path}: cannot be read as a PyTorch state_dict ({type(exc).__name__}). "
                           f"Pass a file saved with torch.save(model.state_dict()), or imagenet / none.")
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict. Save it with "
                           "torch.save(model.state_dict(), PATH).")
    try:
        net.load_state_dict(_dense_fp32(state), assign=True)
    except RuntimeError as exc:
        missing = len([line for line in str(exc).splitlines() if "Missing" in line or "size mismatch" in line])
        raise WeightsError(f"--weights {path}: does not match torchvision's {arch} with its 1000-way head "
                           f"({'mismatched or missing keys' if missing else 'unexpected keys'}). Pass the "
                           f"state_dict of torchvision.models.{arch}(), or imagenet / none.") from None


def _network(arch: str, dropout: float = 0.5) -> nn.Module:
    """torchvision's network (or the test stand-in) with its 1000-way ImageNet head."""
    return models.vgg16(dropout=dropout) if arch == "vgg16" else _vgg_tiny(dropout)


@functools.cache
def min_image_size(arch: str) -> int:
    """The smallest --image-size the network accepts: found by running its backbone on the meta device
    (shapes only, no compute) at growing sizes until its output is not empty. VGG16's five 2x2 max-pools
    need 32 px; vgg_tiny's two need 4. Any network `_network` builds is covered."""
    with torch.device("meta"):
        net = _network(arch)
    net.eval()
    for size in range(1, 1025):
        try:
            out = torch.flatten(net.avgpool(net.features(torch.empty(1, 3, size, size, device="meta"))), 1)
        except RuntimeError:  # a pooling layer's output would be smaller than one pixel
            continue
        if out.numel() > 0:
            return size
    raise ValueError(f"{arch}: no input size up to 1024 px gives features")


def build_model(arch: str, num_classes: int, weights: str, freeze: str, dropout: float) -> TransferNet:
    """`weights`: imagenet | none | PATH. With imagenet, call under `main_process_first()` so that one
    process downloads the file and the others find it in torch's cache."""
    if arch != "vgg16" and weights == "imagenet":
        raise WeightsError("--weights imagenet exists only for --model vgg16; use none or a PATH.")
    # Weights about to be loaded need no random initialisation first (seconds of CPU for VGG16's 138M
    # parameters): build the skeleton on the meta device; the loaded tensors become its parameters.
    with torch.device("meta") if weights != "none" else contextlib.nullcontext():
        net = _network(arch, dropout)
    if weights == "imagenet":
        state = models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        net.load_state_dict(_dense_fp32(state), assign=True)
    elif weights != "none":
        _load_state_dict(net, Path(weights), arch)
    net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)
    model = TransferNet(net.features, net.avgpool, net.classifier)
    if freeze == "features":
        model.features.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
