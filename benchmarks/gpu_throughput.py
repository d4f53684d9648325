"""Steady-state images/s of tl_dist's own code paths on one device, synthetic vs real input.

    python benchmarks/gpu_throughput.py --data-dir .device/caltech-101-mini --json out.json

1. frozen-feature extraction (`engine.extract_features`, what --cache-features runs): on synthetic inputs
   already on the device (normalised float, the network's input) and on the real pipeline (decoded-image
   cache -> loader workers -> pinned memory -> non-blocking copy -> `normalize` on the device). Real at
   least 90% of synthetic means the input pipeline is not the bottleneck.
2. full fine-tune (--freeze none) through `engine.fit`, the training loop itself: an epoch to warm up
   (cuDNN autotuning), then a timed one; synthetic (a tensor on the device served as every batch) vs real vs
   real with augmentation on the device (benchmarks/augment_overhead.py's AUGMENTED: TrivialAugment crops of a
   cache 256/224 times the image size, random erasing, mixup or cutmix; each image's mixing partner loaded too).
Defaults: bf16 autocast, channels_last, batch 256, 224 px (the issue's GPU targets). The real data are
the --data-dir images repeated to at least --images images per pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from augment_overhead import AUGMENTED, train_batches  # noqa: E402
from tl_dist.checkpoint import TrainState  # noqa: E402
from tl_dist.config import parse_args as parse_train_args  # noqa: E402
from tl_dist.console import RunConsole  # noqa: E402
from tl_dist.data import CachedImages, GlobalBatchSampler, index_images, make_loader  # noqa: E402
from tl_dist.engine import Batches, LoopHooks, LoopSettings, TrainLog, Training, extract_features, fit  # noqa: E402
from tl_dist.model import build_network  # noqa: E402
from tl_dist.optim import build_optimizer  # noqa: E402
from tl_dist.prepare import PreparedData, build_crop_cache, build_image_cache, image_batches  # noqa: E402
from tl_dist.runtime import StopRequest, build_accelerator, configure_threads  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="vgg16", choices=("vgg16", "vgg_tiny"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="also torch.compile the backbone (slow to start)")
    p.add_argument("--images", type=int, default=10240, help="images per timed feature pass")
    p.add_argument("--train-steps", type=int, default=12, help="steps per fine-tune epoch (warm-up, timed)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


class NoTracker:
    def log(self, values, step):
        pass


class SameBatch(torch.utils.data.Dataset):
    """The same uint8 batch, already on the device, for every step: no input pipeline at all."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, positions):
        return self.images[:len(positions)], self.labels[:len(positions)], torch.tensor(positions)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """What both measurements share: the options (and their flags), the process, the indexed images and
    their decoded-image cache."""
    a: argparse.Namespace
    flags: list
    cfg: object
    accelerator: object
    console: RunConsole
    threads: int
    index: object
    array_path: Path
    work: Path


def main(argv=None) -> dict:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tl_dist-throughput-"))
    flags = ["--data-dir", a.data_dir, "--cache-dir", str(work / "cache"), "--model", a.model, "--weights", "none",
             "--image-size", str(a.image_size), "--batch-size", str(a.batch_size), "--mixed-precision", a.precision,
             "--wandb-mode", "disabled", "--epochs", "2", "--checkpoint-every-epochs", "0", "--log-every", "1000"]
    flags += [] if a.no_channels_last else ["--channels-last"]
    flags += ["--compile"] if a.compile else []
    cfg = parse_train_args(flags)
    accelerator = build_accelerator(cfg, None)
    threads = configure_threads(cfg, accelerator.device)
    device = accelerator.device
    console = RunConsole(True)
    on_gpu = device.type == "cuda"
    workers = min(8, threads) if on_gpu else 0
    result = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "precision": a.precision,
              "channels_last": cfg.channels_last, "compile": cfg.compile, "batch_size": a.batch_size,
              "image_size": a.image_size, "model": a.model, "loader_workers": workers}

    # ---- the decoded-image cache of the real images (as train.py builds it)
    index = index_images(Path(a.data_dir))
    tic = time.perf_counter()
    array_path, _, _ = build_image_cache(cfg, accelerator, console, index, threads)
    result["decode_images_per_second"] = len(index) / (time.perf_counter() - tic)
    repeat = -(-a.images // len(index))
    rows = (list(range(len(index))) * repeat)[:max(a.batch_size, a.images // a.batch_size * a.batch_size)]
    bench = Bench(a, flags, cfg, accelerator, console, threads, index, array_path, work)
    result.update(feature_throughput(bench, rows))
    result.update(finetune_throughput(bench, rows))
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def feature_throughput(bench: Bench, rows: list[int]) -> dict:
    """1. frozen-feature extraction: synthetic inputs already on the device, then the real pipeline."""
    a, cfg, accelerator = bench.a, bench.cfg, bench.accelerator
    device, result = accelerator.device, {}
    model = accelerator.prepare(build_network(cfg, len(bench.index.classes)))
    net = accelerator.unwrap_model(model).eval()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=device).contiguous(memory_format=fmt)
    n_batches = len(rows) // a.batch_size
    with torch.no_grad():
        for _ in range(3):  # warm-up: cuDNN autotuning, compilation
            with accelerator.autocast():
                net.embed(x)
        sync(device)
        tic = time.perf_counter()
        for _ in range(n_batches):
            with accelerator.autocast():
                f = net.embed(x)
        sync(device)
    result["features_synthetic_images_per_second"] = n_batches * a.batch_size / (time.perf_counter() - tic)
    result["feature_dim"] = f.shape[1]

    labels = [bench.index.labels[r] for r in rows]
    batches = image_batches(cfg, accelerator, CachedImages(bench.array_path, rows, labels), model)
    real = []
    for _ in range(2):  # the first pass starts the loader workers; the second is the steady state
        tic = time.perf_counter()
        extract_features(accelerator, model, batches, lambda positions, features: None)
        sync(device)
        real.append(len(rows) / (time.perf_counter() - tic))
    result["features_real_images_per_second_first_pass"] = real[0]
    result["features_real_images_per_second"] = real[1]
    result["features_real_over_synthetic"] = real[1] / result["features_synthetic_images_per_second"]
    del model, net, batches, f
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def finetune_throughput(bench: Bench, rows: list[int]) -> dict:
    """2. full fine-tune through engine.fit, built as train.py builds it: synthetic, real, real augmented."""
    a, accelerator, index = bench.a, bench.accelerator, bench.index
    device, result = accelerator.device, {}
    cfg, augmented = (parse_train_args(bench.flags + extra) for extra in
                      ([], AUGMENTED + ["--cache-size", str(a.image_size * 256 // 224)]))
    for options in (cfg, augmented):
        options.freeze, options.lr = "none", 1e-4
    n_train = a.train_steps * a.batch_size
    rows_ft = (rows * (-(-n_train // len(rows))))[:n_train]
    data = PreparedData(index, bench.array_path, {}, None, rows_ft, [], [],
                        *build_crop_cache(augmented, accelerator, bench.console, index, bench.threads,
                                          bench.array_path))
    images = torch.randint(0, 256, (a.batch_size, 3, a.image_size, a.image_size), dtype=torch.uint8, device=device)
    ys = torch.randint(0, len(index.classes), (a.batch_size,), device=device)
    for source in ("synthetic", "real", "augmented"):
        model = build_network(cfg, len(index.classes))
        optimizer, scheduler, _ = build_optimizer(cfg, model, 1, accelerator.device, total_steps=2 * a.train_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if source == "synthetic":
            sampler = GlobalBatchSampler(len(rows_ft), a.batch_size, 1, 0, seed=0)
            batches = Batches(make_loader(SameBatch(images, ys, len(rows_ft)), sampler), pooled=False,
                              channels_last=cfg.channels_last, mean=accelerator.unwrap_model(model).mean,
                              std=accelerator.unwrap_model(model).std)
        else:
            batches = train_batches(augmented if source == "augmented" else cfg, accelerator, data, model)
        state = TrainState()
        speeds = []
        for epoch in range(2):  # epoch 1 warms up; epoch 2 is timed
            settings = LoopSettings(epochs=epoch + 1)
            state.train_images, state.train_seconds = 0, 0.0
            outcome = fit(Training(accelerator, model, optimizer, scheduler), batches, state, settings,
                          TrainLog(NoTracker(), bench.console, settings),
                          LoopHooks(StopRequest(bench.work / "STOP"), lambda: None))
            assert outcome.value == "finished", outcome
            sync(device)
            speeds.append(state.train_images / state.train_seconds)
        result[f"finetune_{source}_images_per_second"] = speeds[1]
        result[f"finetune_{source}_images_per_second_first_epoch"] = speeds[0]
        if device.type == "cuda":
            result[f"finetune_{source}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, optimizer, scheduler, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    result["finetune_real_over_synthetic"] = (result["finetune_real_images_per_second"]
                                              / result["finetune_synthetic_images_per_second"])
    result["augmentation_overhead"] = (result["finetune_real_images_per_second"]
                                       / result["finetune_augmented_images_per_second"] - 1)
    return result


if __name__ == "__main__":
    main()
