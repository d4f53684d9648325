"""Training-image augmentation on the device, per image, reproducible.

What torchvision's reference classification recipe does per image on the CPU (RandomResizedCrop,
RandomHorizontalFlip, TrivialAugmentWide, Normalize, RandomErasing, then MixUp or CutMix over the batch),
done here on a whole batch at once where the batch already is, the device: each image's parameters (crop box,
flip, operation and magnitude, erased box) form a small tensor drawn on the CPU from the image's key
(randomness.py), and each step of the pipeline is one batched op over the images that need it
(`torchvision.ops.roi_align` crops and resizes every box at once, `torch.where` flips, one `grid_sample` does
every geometric operation, colour factors broadcast). No Python loop runs per image, and nothing waits for the
device: the parameters never leave the CPU, so grouping images by operation needs no sync.

The semantics are torchvision's (`transforms.v2`): the same parameter draws (ten tries, then the fallback), the
same magnitude tables and formulas (tests/test_augment.py checks each against torchvision's own ops). Where
torchvision draws from a global generator, the draws here come from keys:
- per image (seed, epoch, index in the training split): crop, flip, TrivialAugment op, random erasing;
- per global batch (seed, epoch, step): MixUp's weight, or CutMix's weight and box, one for the whole batch
  as `v2.MixUp` / `v2.CutMix` draw them; with both, each step picks one of them (torchvision's RandomChoice).
Mixing pairs image k of the global batch with image k - 1 (the first with the last): `v2.MixUp`'s
`roll(1, 0)` over the global batch, which the sampler deals out with each image's partner
(data.GlobalBatchSampler, partners=True). The partner is augmented as it is in its own place in the epoch.

Evaluation images are never augmented; without augmentation the training images are the evaluation images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from tl_dist.data import normalize
from tl_dist.randomness import StepDraws, uniforms

POLICIES = ("none", "basic", "trivial")
CROP, FLIP, TRIVIAL, ERASE = 1, 2, 3, 4  # the per-image streams (randomness.uniforms)
TRIES = 10  # RandomResizedCrop and RandomErasing try 10 boxes before their fallback

# TrivialAugmentWide's operations and magnitude bins (torchvision.transforms.v2.TrivialAugmentWide, 31 bins):
# (name, magnitudes or None, signed). A test checks them against torchvision's own table.
BINS = 31


def _bins(start: float, end: float) -> np.ndarray:
    return torch.linspace(start, end, BINS).double().numpy()  # torchvision's float32 values, exactly


TRIVIAL_OPS = (
    ("Identity", None, False),
    ("ShearX", _bins(0.0, 0.99), True),
    ("ShearY", _bins(0.0, 0.99), True),
    ("TranslateX", _bins(0.0, 32.0), True),
    ("TranslateY", _bins(0.0, 32.0), True),
    ("Rotate", _bins(0.0, 135.0), True),
    ("Brightness", _bins(0.0, 0.99), True),
    ("Color", _bins(0.0, 0.99), True),
    ("Contrast", _bins(0.0, 0.99), True),
    ("Sharpness", _bins(0.0, 0.99), True),
    ("Posterize", np.round(8 - np.arange(BINS) / ((BINS - 1) / 6)), False),
    ("Solarize", _bins(1.0, 0.0), False),
    ("AutoContrast", None, False),
    ("Equalize", None, False),
)
OP = {name: k for k, (name, _, _) in enumerate(TRIVIAL_OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR = tuple(name for name, _, _ in TRIVIAL_OPS if name not in GEOMETRIC and name != "Identity")


@dataclass(frozen=True)
class AugmentOptions:
    """The augmentation options of a run (config.Config's Augmentation group)."""
    policy: str = "none"  # none | basic (random resized crop + flip) | trivial (basic + TrivialAugmentWide)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    random_erasing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "AugmentOptions":
        return cls(cfg.augment, tuple(map(float, cfg.crop_scale)), tuple(map(float, cfg.crop_ratio)), cfg.hflip,
                   cfg.random_erasing, cfg.mixup, cfg.cutmix)

    @property
    def crops(self) -> bool:
        return self.policy != "none"

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def active(self) -> bool:
        """Whether training images differ from evaluation images (the frozen-feature cache cannot be used)."""
        return self.crops or self.mixes or self.random_erasing > 0


# ---------------------------------------------------------------- random resized crop and flip


def crop_boxes(u: torch.Tensor, sizes: torch.Tensor, scale, ratio) -> torch.Tensor:
    """RandomResizedCrop's boxes (left, top, width, height), N x 4 float64 integers, for images of `sizes`
    (N x 2: width, height), from N x 40 uniforms: for each of ten tries the area and the log aspect ratio,
    then the top and left offsets. The first try whose box fits wins; none: torchvision's central fallback."""
    u = u.double().view(-1, TRIES, 4)
    width, height = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    aspect = torch.exp(log_ratio[0] + u[..., 1] * (log_ratio[1] - log_ratio[0]))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(u[..., 2].gather(1, first)[:, 0] * (height[:, 0] - h + 1))
    left = torch.floor(u[..., 3].gather(1, first)[:, 0] * (width[:, 0] - w + 1))
    # torchvision's fallback: the largest central box within the ratio range
    in_ratio = width[:, 0] / height[:, 0]
    fw = torch.where(in_ratio > max(ratio), torch.round(height[:, 0] * max(ratio)), width[:, 0])
    fh = torch.where(in_ratio < min(ratio), torch.round(width[:, 0] / min(ratio)), height[:, 0])
    fallback = ~fits.any(1)
    w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
    top = torch.where(fallback, torch.div(height[:, 0] - h, 2, rounding_mode="floor"), top)
    left = torch.where(fallback, torch.div(width[:, 0] - w, 2, rounding_mode="floor"), left)
    return torch.stack([left, top, w, h], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (x1, y1, x2, y2 in its pixel coordinates, N x 4 float) resized to size x size in one
    op: `roi_align` with aligned=True samples at the output pixels' centres, as bilinear resizing with
    align_corners=False does, and averages ceil(box / size) samples per output pixel and direction when the
    box is larger than the output (a box filter against aliasing)."""
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def flip(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """The images whose flag is set, mirrored left-right."""
    return torch.where(flags.view(-1, 1, 1, 1), images.flip(-1), images)


# ---------------------------------------------------------------- TrivialAugmentWide


def trivial_params(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(operation index, signed magnitude) per image from N x 3 uniforms (operation, bin, sign), as
    TrivialAugmentWide draws them: one operation, one of 31 magnitude bins, a negative sign with p = 0.5."""
    op = torch.floor(u[:, 0].double() * len(TRIVIAL_OPS)).long()
    bins = torch.floor(u[:, 1].double() * BINS).long()
    table = torch.tensor(np.stack([m if m is not None else np.zeros(BINS) for _, m, _ in TRIVIAL_OPS]))
    signed = torch.tensor([s for _, _, s in TRIVIAL_OPS])
    magnitude = table[op, bins]
    return op, torch.where(signed[op] & (u[:, 2] <= 0.5), -magnitude, magnitude)


def inverse_affine(op: torch.Tensor, magnitude: torch.Tensor, size: int) -> torch.Tensor:
    """N x 2 x 3 inverse matrices (output pixel -> input pixel, centred coordinates) of TrivialAugmentWide's
    geometric operations, as torchvision's `_get_inverse_affine_matrix` computes them for F.affine / F.rotate
    (shears about the top-left corner, rotations and translations about the centre); identity elsewhere."""
    m = magnitude.double()
    zero = torch.zeros_like(m)
    angle = torch.where(op == OP["Rotate"], -m, zero)  # F.rotate turns the other way than F.affine
    shear_x = torch.where(op == OP["ShearX"], torch.rad2deg(torch.atan(m)), zero)
    shear_y = torch.where(op == OP["ShearY"], torch.rad2deg(torch.atan(m)), zero)
    tx = torch.where(op == OP["TranslateX"], torch.trunc(m), zero)
    ty = torch.where(op == OP["TranslateY"], torch.trunc(m), zero)
    sheared = (op == OP["ShearX"]) | (op == OP["ShearY"])
    cx = torch.where(sheared, torch.full_like(m, -size * 0.5), zero)
    cy = cx
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a  # scale 1: the inverse rotation-shear
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Every image through its own inverse matrix in one grid_sample, as torchvision's `_affine_grid` and
    `_apply_grid_transform` do for one (bilinear, zeros outside)."""
    n, _, h, w = images.shape
    base = torch.empty(1, h, w, 3, dtype=theta.dtype, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=images.device)[:, None])
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=images.device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` for float images, with one ratio per image."""
    return (images * ratio + other * (1.0 - ratio)).clamp_(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: the interior blended with a 3x3 smoothing, the border kept."""
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=images.dtype, device=images.device) / 13
    blurred = F.conv2d(images, kernel.expand(3, 1, 3, 3), groups=3)
    out = images.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - factor))
    return out.clamp_(0, 1)


def _colour(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """One of TrivialAugmentWide's colour operations on float images in [0, 1], magnitude `m` per image."""
    if name == "Brightness":
        return (x * (1 + m)).clamp_(0, 1)
    if name == "Color":
        return _blend(x, _grayscale(x), 1 + m)
    if name == "Contrast":
        return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), 1 + m)
    if name == "Sharpness":
        return _sharpness(x, 1 + m)
    if name == "Posterize":
        levels = torch.pow(2.0, m)
        return torch.minimum(x.mul(levels).floor_(), levels - 1).clamp_(min=0).div_(levels)
    if name == "Solarize":
        return torch.where(x >= m, 1.0 - x, x)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    raise ValueError(name)


def trivial_augment(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor,
                    inplace: bool = False) -> torch.Tensor:
    """TrivialAugmentWide on float images in [0, 1]: image k gets operation op[k] with magnitude[k] (CPU
    tensors). One grid_sample for every geometric operation, one batched op per colour operation, each over
    the images that drew it (written back into `images` itself with `inplace`)."""
    out = images if inplace else images.clone()
    ops = op.numpy()
    geometric = torch.from_numpy(np.flatnonzero(np.isin(ops, [OP[name] for name in GEOMETRIC])))
    if len(geometric):
        theta = inverse_affine(op[geometric], magnitude[geometric], images.shape[-1]).to(images.device, images.dtype)
        rows = geometric.to(images.device)
        out[rows] = affine(out[rows], theta)
    for name in COLOUR:
        chosen = torch.from_numpy(np.flatnonzero(ops == OP[name]))
        if len(chosen):
            m = _per_image(magnitude[chosen], images)
            rows = chosen.to(images.device)
            out[rows] = _colour(name, out[rows], m)
    return out


# ---------------------------------------------------------------- random erasing


def erase_boxes(u: torch.Tensor, p: float, size: int, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """RandomErasing's boxes (top, left, height, width; all 0 where nothing is erased), N x 4, from N x 41
    uniforms: whether to erase (p), then for each of ten tries the area, the log aspect ratio and the
    offsets. The first try that fits inside the image wins; none: nothing is erased, as in torchvision."""
    apply = u[:, 0].double() < p
    u = u[:, 1:].double().view(-1, TRIES, 4)
    area = float(size * size)
    erase_area = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    aspect = torch.exp(math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0])))
    h = torch.round(torch.sqrt(erase_area * aspect))
    w = torch.round(torch.sqrt(erase_area / aspect))
    fits = (h < size) & (w < size)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(u[..., 2].gather(1, first)[:, 0] * (size - h + 1))
    left = torch.floor(u[..., 3].gather(1, first)[:, 0] * (size - w + 1))
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where((apply & fits.any(1))[:, None], boxes, torch.zeros_like(boxes))


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, height, width) set to 0, torchvision's default value (after Normalize:
    the mean colour)."""
    top, left, h, w = (v.to(images.device).view(-1, 1, 1) for v in boxes.long().unbind(1))
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill(inside[:, None], 0.0)


# ---------------------------------------------------------------- mixup and cutmix


@dataclass(frozen=True)
class MixDraw:
    """One global batch's mixing: MixUp with weight `lam`, or CutMix with the box around `center` (x, y)."""
    cutmix: bool
    lam: float
    center: tuple[int, int] = (0, 0)


def draw_mix(options: AugmentOptions, generator: np.random.Generator, size: int) -> MixDraw:
    """The step's mixing, drawn as v2.MixUp / v2.CutMix draw theirs (one of them at random when both are on)."""
    cutmix = options.cutmix > 0 and (options.mixup == 0 or generator.random() < 0.5)
    alpha = options.cutmix if cutmix else options.mixup
    lam = float(generator.beta(alpha, alpha))
    center = (int(generator.integers(size)), int(generator.integers(size))) if cutmix else (0, 0)
    return MixDraw(cutmix, lam, center)


def cutmix_box(draw: MixDraw, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
    """v2.CutMix's box (x1, y1, x2, y2): area (1 - lam) of the image around the centre, clipped to the image;
    and lam adjusted to the box's real area."""
    r = 0.5 * math.sqrt(1.0 - draw.lam)
    r_w_half, r_h_half = int(r * width), int(r * height)
    x, y = draw.center
    x1, y1 = max(x - r_w_half, 0), max(y - r_h_half, 0)
    x2, y2 = min(x + r_w_half, width), min(y + r_h_half, height)
    return (x1, y1, x2, y2), float(1.0 - (x2 - x1) * (y2 - y1) / (width * height))


def mix(images: torch.Tensor, partners: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor,
        draw: MixDraw, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images mixed with their partners and the soft targets (N x classes), as v2.MixUp / v2.CutMix mix a
    batch with itself rolled by one."""
    if draw.cutmix:
        (x1, y1, x2, y2), lam = cutmix_box(draw, images.shape[-2], images.shape[-1])
        images = images.clone()
        images[..., y1:y2, x1:x2] = partners[..., y1:y2, x1:x2]
    else:
        lam = draw.lam
        images = partners.mul(1.0 - lam).add_(images.mul(lam))
    one_hot = F.one_hot(labels, num_classes).float()
    partner_one_hot = F.one_hot(partner_labels, num_classes).float()
    return images, partner_one_hot.mul_(1.0 - lam).add_(one_hot.mul(lam))


# ---------------------------------------------------------------- the training batch


class TrainingInputs:
    """Turns a training micro-batch from the loader (uint8 images, labels, indices in the split; with mixing,
    the images then their partners) into the network's inputs, the targets and the images' keys, on the
    device: crop and flip, TrivialAugment, normalise, erase, mix."""

    def __init__(self, options: AugmentOptions, size: int, crop_sizes: torch.Tensor | None, num_classes: int,
                 mean, std, channels_last: bool = False):
        """`size`: the network's input. `crop_sizes`: per index in the split, the (width, height) the crop
        boxes are drawn in (the image as evaluation sees it: its own shape, or the square it is squashed to);
        the cached images are resized to it. Needed when the policy crops."""
        self.options, self.size, self.crop_sizes, self.num_classes = options, size, crop_sizes, num_classes
        self.mean, self.std, self.channels_last = mean, std, channels_last

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, draws: StepDraws,
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        options = self.options
        keys = draws.image_keys(indices)
        x = images.to(device, non_blocking=True).float().div_(255)
        if options.crops:
            x = self.crop_and_flip(x, keys, indices)
        if options.policy == "trivial":
            x = trivial_augment(x, *trivial_params(uniforms(keys, TRIVIAL, 3)), inplace=True)
        x = normalize(x, mean=self.mean, std=self.std)
        if options.random_erasing > 0:
            x = erase(x, erase_boxes(uniforms(keys, ERASE, 1 + 4 * TRIES), options.random_erasing, x.shape[-1]))
        targets = labels
        if options.mixes:
            n = len(indices) // 2  # the images, then their partners
            draw = draw_mix(options, draws.generator(), x.shape[-1])
            x, targets = mix(x[:n], x[n:], labels[:n], labels[n:], draw, self.num_classes)
            keys = keys[:n]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets.to(device, non_blocking=True), keys.to(device, non_blocking=True)

    def crop_and_flip(self, x: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        sizes = self.crop_sizes[indices].double()
        left, top, w, h = crop_boxes(uniforms(keys, CROP, 4 * TRIES), sizes, self.options.crop_scale,
                                     self.options.crop_ratio).unbind(1)
        # from the crop's geometry to the cached image's pixels (the cache squashes every image to a square)
        sx, sy = x.shape[-1] / sizes[:, 0], x.shape[-2] / sizes[:, 1]
        boxes = torch.stack([left * sx, top * sy, (left + w) * sx, (top + h) * sy], dim=1)
        x = resized_crop(x, boxes.to(device=x.device, dtype=x.dtype), self.size)
        return flip(x, (uniforms(keys, FLIP, 1)[:, 0] < self.options.hflip).to(x.device))
