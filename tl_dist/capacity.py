"""What a run needs of the machine, estimated from the options before anything is allocated.

An image size or a batch that cannot fit is refused with one line that says what would, instead of being
found out by the kernel's out-of-memory killer (which may kill another user's process first) or a disk
filled to the last byte. The estimates are lower bounds, so what they refuse cannot fit:

- the memory of one batch: its uint8 images, their float32 copy, and the network's largest activation with
  the input of the layer that makes it (from a forward pass on the meta device: shapes only, no memory), in
  float32, on the device that runs the network;
- the disk of the decoded-image cache: N x S x S x 3 bytes.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def available_memory(device: torch.device) -> int:
    """Free memory of a GPU; on the CPU, what the kernel (and the cgroup of a Slurm job) still gives, shared
    by the node's training processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo").read_text().split() if Path("/proc/meminfo").is_file() else []
    free = (int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024 if "MemAvailable:" in meminfo
            else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def largest_activation(arch: str, image_size: int) -> int | None:
    """Bytes (float32) of the largest output of any layer of ARCH, with that layer's input, for one image;
    None when the network cannot be built without memory (RegNet computes its widths with real tensors)."""
    from tl_dist.model import build_model

    largest = 0

    def record(module, inputs, output):
        nonlocal largest
        tensors = [t for t in (*inputs, *(output if isinstance(output, tuple) else (output,))) if torch.is_tensor(t)]
        largest = max(largest, sum(t.numel() for t in tensors) * 4)

    try:
        with torch.device("meta"):
            model = build_model(arch, 2, "none", "none", image_size=image_size)
            images = torch.empty(1, 3, image_size, image_size)
    except NotImplementedError:
        return None
    for layer in model.modules():
        if not list(layer.children()):
            layer.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(images)
    return largest


def memory_problem(arch: str, image_size: int, batch_size: int, device: torch.device) -> str | None:
    """Why one batch of `batch_size` images of `image_size` px cannot go through ARCH on `device`, with what
    would fit; None when it may."""
    activation = largest_activation(arch, image_size)
    if activation is None:
        return None
    per_image = image_size ** 2 * 3 * (1 + 4) + activation
    need, have = batch_size * per_image, available_memory(device)
    if need <= have:
        return None
    size = int(image_size * math.sqrt(have / need))  # every term grows with the pixels
    batch = have // per_image
    instead = f"pass --image-size {size} or less" + (f", or --batch-size {batch} or less" if batch else "")
    return (f"one batch of {batch_size} images at {image_size} px through {arch} needs at least {_gb(need)} of "
            f"memory ({_gb(per_image)} an image: the images and the largest layer's activations), and "
            f"{device.type} has {_gb(have)} available: {instead}")


def cache_disk_problem(images: int, image_size: int, folder: Path) -> str | None:
    """Why the decoded-image cache of `images` images at `image_size` px cannot fit in `folder`, with what
    would; None when it fits."""
    need, free = images * image_size ** 2 * 3, shutil.disk_usage(folder).free
    if need <= free:
        return None
    size = int(math.sqrt(free / (images * 3)))
    return (f"the decoded-image cache of {images} images at {image_size} px needs {_gb(need)} in --cache-dir "
            f"{folder}, which has {_gb(free)} free: pass --image-size {size} or less, free some space, or pass "
            "another --cache-dir")
