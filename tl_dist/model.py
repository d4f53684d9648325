"""The network: a torchvision classification model with a new N-way last layer. Plain torch.

VGG16 with ImageNet weights and frozen conv features is the default (the article). Every network of the
families in FAMILIES works the same way. `TransferNet` adopts the torchvision network's layers under their own
names, so its state_dict is the torchvision state_dict (VGG16's: features / avgpool / classifier), with an
N-way last layer. It splits the network in two: the feature extractor (`embed`: every layer before the
classifier block, flattened) and the classifier block (the network's last block: VGG's `classifier`,
ResNet's `fc`, ViT's `heads`, ...), trained alone under --freeze features. The feature extractor's blocks
(what the family calls one: a VGG conv stage, a ResNet layerK, a ViT encoder layer, ...) are what --freeze
last:N counts: the last N of them train, with every layer after them. Its forward can start from those
features (`pooled=True`): that is how the frozen-feature cache trains the classifier through the same
(DDP-wrapped) module. It also carries the normalisation its weights were trained with (`mean`, `std`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models

from tl_dist.data import IMAGENET_MEAN, IMAGENET_STD, Resize
from tl_dist.randomness import use_keyed_randomness

TINY = "vgg_tiny"  # a small network with VGG16's layout, for fast tests
TINY_MIN_SIZE = 4  # its two 2x2 max-pools need at least 4 px


class WeightsError(RuntimeError):
    """A weights file that cannot be used; the message says what to do."""


Block = tuple[str, ...]  # the module paths of one block of the feature extractor, in forward order


def _conv_stages(net: nn.Module) -> list[Block]:
    """VGG, AlexNet: the layers of `features` between max-pools, each stage ending with its pool."""
    stages, stage = [], []
    for name, layer in net.features.named_children():
        stage.append(f"features.{name}")
        if isinstance(layer, nn.MaxPool2d):
            stages.append(tuple(stage))
            stage = []
    return stages


def _children_of(path: str, first: int = 0, end: int | None = None) -> Callable[[nn.Module], list[Block]]:
    """Each child of the module at `path` (from the `first`-th, before the `end`-th) is one block."""
    def blocks(net: nn.Module) -> list[Block]:
        return [(f"{path}.{name}",) for name in list(net.get_submodule(path)._modules)[first:end]]
    return blocks


def _resnet_layers(net: nn.Module) -> list[Block]:
    return [(name,) for name in net._modules if name.startswith("layer")]


def _downsampled_stages(net: nn.Module) -> list[Block]:
    """ConvNeXt, Swin: `features` is stem, stage, downsampling, stage, ...: each stage after the first starts
    with the layer that downsamples into it."""
    names = [f"features.{name}" for name in net.features._modules]
    return [(names[1],)] + [tuple(names[i:i + 2]) for i in range(2, len(names), 2)]


def _stride_stages(net: nn.Module) -> list[Block]:
    """MobileNetV3: `features` is stem, inverted-residual blocks, last conv; a stage starts at each block
    that downsamples (a strided conv)."""
    stages = []
    for name, layer in list(net.features.named_children())[1:-1]:
        strided = any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in layer.modules())
        if strided or not stages:
            stages.append(())
        stages[-1] += (f"features.{name}",)
    return stages


@dataclass(frozen=True)
class Family:
    title: str
    head: str  # the classifier block: the network's last child, trained under --freeze features
    blocks: Callable[[nn.Module], list[Block]]  # the feature extractor's blocks, first to last (--freeze last:N)
    block_kind: str  # what the family calls a block
    map_head: bool = False  # the block starts with a 2-D layer: it takes N x C x 1 x 1, not N x C


# The torchvision families whose forward pass runs their layers in the order they are registered (with a
# flatten before the classifier block), so that `TransferNet.embed` can run them the same way; ViT prepends
# its class token (VisionTransformerNet). Left out: networks whose forward does more between its layers
# (DenseNet, GoogLeNet, Inception, MaxViT, MNASNet, MobileNetV2, ShuffleNetV2, SqueezeNet). A block is what
# the family's torchvision code builds as one stage (or, for ViT, one encoder layer); the stem before the
# first block stays frozen under --freeze last:N, whatever N.
FAMILIES = {
    "vgg": Family("VGG", "classifier", _conv_stages, "conv stage"),
    "alexnet": Family("AlexNet", "classifier", _conv_stages, "conv stage"),
    "resnet": Family("ResNet / ResNeXt / Wide ResNet", "fc", _resnet_layers, "layer"),
    "regnet": Family("RegNet", "fc", _children_of("trunk_output"), "stage"),
    "efficientnet": Family("EfficientNet", "classifier", _children_of("features", 1, -1), "stage"),
    "mobilenetv3": Family("MobileNetV3", "classifier", _stride_stages, "stage"),
    "convnext": Family("ConvNeXt", "classifier", _downsampled_stages, "stage", map_head=True),
    "swin_transformer": Family("Swin Transformer", "head", _downsampled_stages, "stage"),
    "vision_transformer": Family("ViT", "heads", _children_of("encoder.layers"), "encoder layer"),
}
VIT = "vision_transformer"


# ---------------------------------------------------------------- names, weights, sizes


def family_name(arch: str) -> str | None:
    """The torchvision module an architecture comes from ("resnet" for resnet50), or None if unknown."""
    if arch == TINY:
        return "vgg"
    try:
        return models.get_model_builder(arch).__module__.rsplit(".", 1)[-1]
    except ValueError:
        return None


def supported_models() -> list[str]:
    return sorted(n for n in models.list_models(module=models) if family_name(n) in FAMILIES)


def check_model(arch: str) -> str | None:
    """Why --model ARCH cannot be used, or None."""
    family = family_name(arch)
    if family in FAMILIES:
        return None
    if family is not None:
        return (f"{arch} is not supported: its forward pass does more than run its layers in order. Pick one "
                f"of the families {', '.join(f.title for f in FAMILIES.values())} (see --list-models)")
    import difflib

    close = difflib.get_close_matches(arch, supported_models() + [TINY], n=3)
    return f"unknown network {arch!r}" + (f" (did you mean {', '.join(close)}?)" if close else "") + \
        "; --list-models lists them"


def weights_entry(arch: str, weights: str):
    """The torchvision weights enum entry that --weights names for ARCH (imagenet = its DEFAULT weights,
    or an entry's name such as IMAGENET1K_V2), or None for none / PATH."""
    if arch == TINY or weights == "none":
        return None
    entries = models.get_model_weights(arch)
    if weights == "imagenet":
        return entries.DEFAULT
    return entries.__members__.get(weights)


def weights_names(arch: str) -> list[str]:
    return [] if arch == TINY else [w.name for w in models.get_model_weights(arch)]


def check_weights(arch: str, weights: str) -> str | None:
    """Why --weights cannot be used with --model ARCH, or None."""
    if weights == "none" or Path(weights).is_file():
        return None
    if Path(weights).suffix or os.sep in weights:  # a path, not a name of weights
        return f"{weights}: no such file; pass the PATH of a state_dict, imagenet or none"
    if arch == TINY:
        return f"{weights!r}: {TINY} has no pretrained weights; pass none or the PATH of a state_dict"
    if weights_entry(arch, weights) is None:
        return (f"{weights!r} is neither imagenet, none, one of {arch}'s weights "
                f"({', '.join(weights_names(arch))}) nor an existing file")
    return None


def normalization(arch: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the weights were trained with, from their metadata; ImageNet's for none and PATH."""
    entry = weights_entry(arch, weights)
    if entry is None:
        return IMAGENET_MEAN, IMAGENET_STD
    transform = entry.transforms()
    return tuple(transform.mean), tuple(transform.std)


def eval_resize(arch: str, weights: str, image_size: int, mode: str = "squash") -> Resize:
    """How evaluation turns an image into image_size x image_size (--eval-resize MODE): `squash`, the
    article's Resize((S, S)); `weights`, what the weights' own transforms() do, Resize(resize_size) of the
    shorter side then CenterCrop(crop_size) with their interpolation, scaled to S (ImageNet's 256 for 224
    without torchvision weights); a number N: Resize(N), then CenterCrop(S), bilinear."""
    if mode == "squash":
        return Resize(image_size)
    if mode != "weights":
        return Resize(image_size, int(mode))
    entry = weights_entry(arch, weights)
    if entry is None:
        return Resize(image_size, image_size * 256 // 224)
    transform = entry.transforms()
    return Resize(image_size, image_size * transform.resize_size[0] // transform.crop_size[0],
                  transform.interpolation.value)


def _vit_patch_size(arch: str) -> int:
    with torch.device("meta"):  # no memory, no initialisation: only its settings are read
        return models.get_model(arch).patch_size


def check_image_size(arch: str, size: int) -> str | None:
    """Why ARCH cannot take SIZE x SIZE images, or None. CNNs and Swin: at least the minimum size of the
    weights' metadata (what their downsampling needs). ViT: any multiple of its patch size; pretrained
    position embeddings are interpolated to it (torchvision's interpolate_embeddings)."""
    if family_name(arch) == VIT:
        patch = _vit_patch_size(arch)
        if size % patch == 0:
            return None
        nearest = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
        return (f"{size} px does not fit {arch}, which takes multiples of its {patch} px patches ({patch}, "
                f"{2 * patch}, ..., 224, ...): pass {' or '.join(map(str, nearest))}")
    smallest = TINY_MIN_SIZE if arch == TINY else models.get_model_weights(arch).DEFAULT.meta["min_size"][0]
    if size >= smallest:
        return None
    return f"{size} px is too small for {arch}, which takes {smallest} px or more: pass {smallest} or more"


def _structure(arch: str) -> nn.Module:
    """The torchvision network's layers without their weights (parameters on the meta device: no memory,
    no initialisation; Accelerate's init_empty_weights, since RegNet computes its widths with tensors while
    it is built): enough to name its blocks."""
    if arch == TINY:
        return _vgg_tiny(0.0)
    from accelerate import init_empty_weights

    with init_empty_weights():
        return models.get_model(arch)


def block_names(blocks: list[Block]) -> list[str]:
    """A name for each block: its module's path, or parent.first-last for a run of a parent's children."""
    names = []
    for block in blocks:
        parent, _, first = block[0].rpartition(".")
        names.append(block[0] if len(block) == 1 else f"{parent}.{first}-{block[-1].rpartition('.')[2]}")
    return names


def describe_blocks(arch: str) -> str:
    """What --freeze last:N counts in ARCH, in a few words: "4 layers: layer1 .. layer4"."""
    family = FAMILIES[family_name(arch)]
    names = block_names(family.blocks(_structure(arch)))
    return f"{len(names)} {family.block_kind}s: {names[0]} .. {names[-1]}"


def check_freeze(arch: str, freeze: str) -> str | None:
    """Why --freeze cannot be used with --model ARCH, or None: features, none, or last:N with N from 1 to
    the number of blocks of its feature extractor."""
    if freeze in ("features", "none"):
        return None
    count = len(FAMILIES[family_name(arch)].blocks(_structure(arch)))  # the network itself is checked before
    number = freeze.removeprefix("last:")
    if freeze.startswith("last:") and number.isdigit() and 1 <= int(number) <= count:
        return None
    return (f"{freeze!r} does not fit {arch}, whose feature extractor has {describe_blocks(arch)}; pass "
            f"features, none, or last:N with N from 1 to {count}")


def describe_models() -> str:
    """The --list-models table: every supported network, its default weights, the other weights, its
    blocks (what --freeze last:N counts) and the block that --freeze features trains."""
    rows = [("network", "--weights imagenet (ImageNet top-1)", "other --weights", "min px",
             "blocks (--freeze last:N)", "trained under --freeze features")]
    for arch in supported_models():
        default = models.get_model_weights(arch).DEFAULT
        top1 = default.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        others = [n for n in weights_names(arch) if n != default.name]
        size = f"x{_vit_patch_size(arch)}" if family_name(arch) == VIT else str(default.meta["min_size"][0])
        rows.append((arch + (" (default)" if arch == "vgg16" else ""),
                     f"{default.name} ({top1:.1f}%)" if top1 else default.name, ", ".join(others) or "-", size,
                     describe_blocks(arch),
                     f"{FAMILIES[family_name(arch)].head} ({FAMILIES[family_name(arch)].title})"))
    rows.append((TINY, "- (tests only)", "-", str(TINY_MIN_SIZE), describe_blocks(TINY),
                 "classifier (a small VGG stand-in)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + ["", "min px: the smallest --image-size (xN: multiples of the N px patches). "
                                  "--weights NAME: one of the listed weights; none, or a PATH, also work.",
                                  "blocks: --freeze last:N trains the last N of them and every layer after "
                                  "them; the layers before the first block (the stem) train only under "
                                  "--freeze none."])


# ---------------------------------------------------------------- the network


class TransferNet(nn.Module):
    """A torchvision network split into its feature extractor (`embed`) and classifier block (`head`)."""

    def __init__(self, net: nn.Module, head: str, map_head: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 blocks: list[Block] = ()):
        super().__init__()
        for name, child in net.named_children():  # the same names: the same state_dict keys
            self.add_module(name, child)
        for name, param in net.named_parameters(recurse=False):  # ViT's class token
            self.register_parameter(name, param)
        if list(self._modules)[-1] != head:
            raise ValueError(f"expected {head} as the last block, found {list(self._modules)}")
        self.head_name, self.map_head = head, map_head
        self.backbone_names = list(self._modules)[:-1]
        self.mean, self.std = tuple(mean), tuple(std)  # the input normalisation of its weights
        self.blocks = list(blocks)  # the feature extractor's blocks (--freeze last:N)
        self.frozen_modules: tuple[str, ...] = ()  # kept in eval mode: the frozen layers before the trained ones

    @property
    def head(self) -> nn.Module:
        return self._modules[self.head_name]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier block's input, flattened (25088 per image for VGG16, 2048 for ResNet-50)."""
        for name in self.backbone_names:
            x = self._modules[name](x)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        features = x if pooled else self.embed(x)
        return self.head(features[:, :, None, None] if self.map_head else features)

    def train(self, mode: bool = True) -> "TransferNet":
        """Frozen layers stay in eval mode: their BatchNorm statistics do not drift and their stochastic
        depth stays off, so a frozen feature extractor computes what the feature cache holds (VGG16's has
        neither)."""
        super().train(mode)
        if mode:
            for name in self.frozen_modules:
                self.get_submodule(name).eval()
        return self


class VisionTransformerNet(TransferNet):
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output (torchvision's VisionTransformer.forward without its heads)."""
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # N x patches x hidden
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.encoder(tokens)[:, 0]


def _vgg_tiny(dropout: float) -> models.VGG:
    """A small network with VGG16's layout (features / avgpool / classifier[0..6]) for fast tests."""
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    net.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    net.classifier = nn.Sequential(nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(dropout),
                                   nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(64, 1000))
    return net


# ---------------------------------------------------------------- weights


def _dense_fp32(state: dict) -> dict:
    """Loaded tensors that can become parameters (load_state_dict(assign=True) keeps them as they are):
    float32, dense and contiguous, as the copy into a randomly initialised network would give."""
    return {k: v.float().contiguous() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in state.items()}


def _read_state_dict(path: Path) -> dict:
    """A state_dict file from outside the run: safetensors, or a torch.save pickle read with
    weights_only=True (a pickle that would run code is refused)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"--weights {path}: cannot be read as a safetensors file ({type(exc).__name__}). "
                               "Save it with safetensors.torch.save_file(model.state_dict(), PATH).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"--weights {path}: cannot be read as a PyTorch state_dict ({type(exc).__name__}). "
                           f"Pass a file saved with torch.save(model.state_dict()), or imagenet / none.") from None
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict. Save it with "
                           "torch.save(model.state_dict(), PATH).")
    return state


def _fit_position_embedding(net: nn.Module, state: dict) -> dict:
    """A ViT's pretrained position embeddings, interpolated to the size this one is built for."""
    key = "encoder.pos_embedding"
    if key not in state or state[key].shape == net.encoder.pos_embedding.shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return interpolate_embeddings(net.image_size, net.patch_size, {**state, key: state[key].float()})


def _download(entry, arch: str, weights: str) -> dict:
    """torchvision's weights from its hub cache, downloaded there first if need be; a failed download (no
    network, a proxy, a damaged file whose hash does not match) is a WeightsError of one line."""
    try:
        return entry.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError; a hash mismatch a RuntimeError
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"--weights {weights}: could not get {arch}'s weights from {entry.url} ({reason}). Check the network "
            f"(or put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}), pass a local state_dict with "
            "--weights PATH, or train from random initialisation with --weights none") from None


def _load_pretrained(net: nn.Module, arch: str, weights: str) -> None:
    if problem := check_weights(arch, weights):
        raise WeightsError(f"--weights {problem}")
    entry = weights_entry(arch, weights)
    if entry is not None:  # downloaded once into torch's hub cache, then read from there
        state = _download(entry, arch, weights)
    else:
        state = _read_state_dict(Path(weights))
    if family_name(arch) == VIT:
        state = _fit_position_embedding(net, state)
    try:
        net.load_state_dict(_dense_fp32(state), assign=True)
    except (RuntimeError, ValueError) as exc:
        missing = len([line for line in str(exc).splitlines() if "Missing" in line or "size mismatch" in line])
        raise WeightsError(f"--weights {weights}: does not match torchvision's {arch} with its 1000-way head "
                           f"({'mismatched or missing keys' if missing else 'unexpected keys'}). Pass the "
                           f"state_dict of torchvision.models.{arch}(), or imagenet / none.") from None


def _new_last_layer(block: nn.Module, num_classes: int) -> nn.Module:
    """The classifier block with its last Linear layer replaced by an N-way one (the block itself when it
    is that layer, as ResNet's fc)."""
    name, last = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(last.in_features, num_classes)
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent), attr, new)
    return block


def _skeleton(arch: str, dropout: float | None, image_size: int, on_meta: bool) -> nn.Module:
    if arch == TINY:
        return _vgg_tiny(0.5 if dropout is None else dropout)
    options = {"image_size": image_size} if family_name(arch) == VIT else {}
    if on_meta:
        try:
            with torch.device("meta"):
                return models.get_model(arch, **options)
        except NotImplementedError:  # RegNet computes its widths with tensors while it is built
            pass
    return models.get_model(arch, **options)


def build_model(arch: str, num_classes: int, weights: str = "none", freeze: str = "features",
                dropout: float | None = None, image_size: int = 224, from_checkpoint: bool = False) -> TransferNet:
    """`weights`: imagenet (the network's DEFAULT weights) | an entry of its weights enum | none | PATH.
    With imagenet, call under `main_process_first()` so that one process downloads the file and the others
    find it in torch's cache. `dropout`: of the dropout layers in the classifier block (None: the network's
    own). `from_checkpoint`: the parameters are about to be replaced by a checkpoint's: `weights` is not
    loaded, only its normalisation kept."""
    load = weights != "none" and not from_checkpoint
    # Weights about to be loaded need no random initialisation first (seconds of CPU for VGG16's 138M
    # parameters): build the skeleton on the meta device; the loaded tensors become its parameters.
    net = _skeleton(arch, dropout, image_size, on_meta=load)
    if load:
        _load_pretrained(net, arch, weights)
    family = FAMILIES[family_name(arch)]
    net.add_module(family.head, _new_last_layer(getattr(net, family.head), num_classes))
    if dropout is not None:
        for layer in getattr(net, family.head).modules():
            if isinstance(layer, nn.Dropout):
                layer.p = dropout
    use_keyed_randomness(net)  # dropout masks drawn per image, the same on any number of processes
    mean, std = normalization(arch, weights)
    model = (VisionTransformerNet if family_name(arch) == VIT else TransferNet)(net, family.head, family.map_head,
                                                                             mean, std, family.blocks(net))
    set_trainable(model, freeze)
    return model.train()  # train mode, with the frozen layers in eval mode


def set_trainable(model: TransferNet, freeze: str) -> None:
    """--freeze: `features` trains the classifier block, `none` everything, `last:N` the feature
    extractor's last N blocks and every layer after them (the classifier block, and a final norm such as
    ViT's encoder.ln). The layers before the first trained one are frozen and kept in eval mode."""
    if freeze == "none":
        model.requires_grad_(True)
        model.frozen_modules = ()
        return
    first = model.head_name if freeze == "features" else model.blocks[-int(freeze.split(":")[1])][0]
    # Registration order is forward order in every family (FAMILIES): parameters from the first trained
    # block's first one on are those of the trained layers.
    names = [name for name, _ in model.named_parameters()]
    start = names.index(next(n for n in names if n.startswith(first + ".")))
    for i, (_, param) in enumerate(model.named_parameters()):
        param.requires_grad_(i >= start)
    # The modules before it, leaving out the ones that contain it, and only the outermost of them.
    frozen = []
    for name, _ in model.named_modules():
        if name == first:
            break
        if name and not first.startswith(name + ".") and not any(name.startswith(f + ".") for f in frozen):
            frozen.append(name)
    model.frozen_modules = tuple(frozen)


def build_network(cfg, num_classes: int, from_checkpoint: bool = False) -> TransferNet:
    """The network the options ask for, with its new head seeded by --seed (the same on every process), in
    channels_last and compiled when asked. With pretrained weights, call under Accelerate's
    `local_main_process_first()`: one process per node downloads them, the others read torch's cache."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.weights, cfg.freeze, cfg.dropout, image_size=cfg.image_size,
                        from_checkpoint=from_checkpoint)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.embed = torch.compile(model.embed)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
