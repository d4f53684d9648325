"""Step time of full fine-tuning (--freeze none) with and without augmentation, side by side in one run.

    python benchmarks/augment_overhead.py --data-dir ../shared/data/caltech-101-mini --repeats 3

One network, optimizer and set of images, trained through `engine.fit` with the batches train.py builds
(`prepare.training_batches`), alternately:
  plain      --augment none: the cached 224 px images, normalised on the device (the article's input)
  augmented  --augment trivial --random-erasing 0.25 --mixup 0.2 --cutmix 1.0 --cache-size 256: random resized
             crops of 256 px cached images, flips, TrivialAugmentWide, erasing, and mixup or cutmix each step
             (the loader also delivers every image's mixing partner)
--steps timed steps of each per repeat, after one warm-up step of each; the ratio of the median step times is
what augmentation costs. The augmentation alone (`augment.TrainingInputs` on one loaded batch, median of 5
calls) is timed too, so that its share can be read without the noise of a shared machine. The results replace
the --label section of --results (Markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from bench import machine_description, write_section  # noqa: E402
from tl_dist.checkpoint import TrainState  # noqa: E402
from tl_dist.config import parse_args as parse_train_args  # noqa: E402
from tl_dist.console import RunConsole  # noqa: E402
from tl_dist.data import GlobalBatchSampler, index_images  # noqa: E402
from tl_dist.engine import LoopHooks, LoopSettings, TrainLog, Training, fit  # noqa: E402
from tl_dist.model import build_network  # noqa: E402
from tl_dist.optim import build_optimizer  # noqa: E402
from tl_dist.prepare import PreparedData, build_crop_cache, build_image_cache, training_batches  # noqa: E402
from tl_dist.randomness import StepDraws  # noqa: E402
from tl_dist.runtime import StopRequest, build_accelerator, configure_threads  # noqa: E402

AUGMENTED = ["--augment", "trivial", "--random-erasing", "0.25", "--mixup", "0.2", "--cutmix", "1.0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "caltech-101-mini"))
    p.add_argument("--model", default="vgg16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache-size", type=int, default=256, help="side of the cached images crops are cut from")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=None, help="for the decoded-image caches (default: a temporary folder)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--label", default="augment-cpu")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--from-json", default=None, help="write the section from a saved --json instead of measuring")
    p.add_argument("--note", default="", help="a sentence under the measurement (the machine's load, ...)")
    return p.parse_args(argv)


class NoTracker:
    def log(self, values, step):
        pass


def run_options(a, cache_dir: Path, *extra: str):
    """The training options of a variant, as `tl_dist/train.py` would parse them."""
    return parse_train_args(["--data-dir", a.data_dir, "--cache-dir", str(cache_dir), "--model", a.model,
                             "--weights", "none", "--freeze", "none", "--image-size", str(a.image_size),
                             "--batch-size", str(a.batch_size), "--lr", "1e-4", "--wandb-mode", "disabled",
                             "--checkpoint-every-epochs", "0", "--log-every", "100000", *extra])


def prepared_data(cfg, accelerator, console, threads: int) -> PreparedData:
    """Every image of --data-dir as the training split, decoded into the caches the options need."""
    index = index_images(Path(cfg.data_dir))
    array_path, bad, group = build_image_cache(cfg, accelerator, console, index, threads)
    rows = [r for r, f in enumerate(index.files) if f not in bad]
    crops = build_crop_cache(cfg, accelerator, console, index, threads, array_path) if cfg.augment != "none" \
        else (None, None)
    return PreparedData(index, array_path, bad, group, rows, [], [], *crops)


def train_batches(cfg, accelerator, data: PreparedData, model):
    sampler = GlobalBatchSampler(len(data.train_rows), cfg.batch_size, 1, 0, cfg.seed,
                                 partners=cfg.mixup > 0 or cfg.cutmix > 0)
    return training_batches(cfg, accelerator, data, model, sampler)


def seconds_per_step(training: Training, batches, steps: int, console, work: Path) -> float:
    """`steps` optimizer steps through engine.fit from the start of an epoch: the training time per step
    (TrainLog's clock: data, augmentation, forward, backward, update)."""
    settings = LoopSettings(epochs=1, max_steps=steps, checkpoint_every_epochs=0)
    state = TrainState()
    outcome = fit(training, batches, state, settings, TrainLog(NoTracker(), console, settings),
                  LoopHooks(StopRequest(work / "STOP"), lambda: None))
    assert outcome.value == "finished", outcome
    if training.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return state.train_seconds / steps


def augmentation_seconds(batches, device, calls: int = 5) -> float:
    """TrainingInputs alone on one loaded batch (median of `calls`), or the plain normalisation."""
    batch = next(iter(batches.loader))
    times = []
    for _ in range(calls):
        tic = time.perf_counter()
        x, _, _ = batches.training_inputs(batch, StepDraws(0, 0, 0), device)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main(argv=None) -> dict:
    a = parse_args(argv)
    result = json.loads(Path(a.from_json).read_text()) if a.from_json else measure(a)
    section = report(a, result)
    print(section)
    if a.results:
        write_section(Path(a.results), a.label, section)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def measure(a) -> dict:
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="tl_dist-augment-"))
    variants = {"plain": run_options(a, work / "cache"),
                "augmented": run_options(a, work / "cache", *AUGMENTED, "--cache-size", str(a.cache_size))}
    accelerator = build_accelerator(variants["plain"], None)
    threads = configure_threads(variants["plain"], accelerator.device)
    console = RunConsole(True)
    data = {name: prepared_data(cfg, accelerator, console, threads) for name, cfg in variants.items()}
    classes = len(data["plain"].index.classes)
    cfg = variants["plain"]
    model = build_network(cfg, classes)
    optimizer, scheduler, _ = build_optimizer(cfg, model, 1, accelerator.device, total_steps=10**6)
    training = Training(accelerator, *accelerator.prepare(model, optimizer, scheduler))
    batches = {name: train_batches(variants[name], accelerator, data[name], training.model) for name in variants}
    for name in variants:  # warm-up: allocations, the loader's first map of the cache
        seconds_per_step(training, batches[name], 1, console, work)
    steps = {name: [] for name in variants}
    for repeat in range(a.repeats):
        for name in variants:
            steps[name].append(seconds_per_step(training, batches[name], a.steps, console, work))
            print(f"repeat {repeat + 1}: {name} {steps[name][-1]:.3f} s/step", flush=True)
    result = {"model": a.model, "image_size": a.image_size, "cache_size": a.cache_size, "batch_size": a.batch_size,
              "steps": a.steps, "repeats": a.repeats, "augmented_flags": AUGMENTED,
              "device": str(accelerator.device), "threads": threads, "seconds_per_step": steps,
              "inputs_seconds": {name: augmentation_seconds(batches[name], accelerator.device) for name in variants},
              "machine": machine_description(), "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    result["ratio"] = statistics.median(steps["augmented"]) / statistics.median(steps["plain"])
    return result


def report(a, r: dict) -> str:
    medians = {name: statistics.median(values) for name, values in r["seconds_per_step"].items()}
    inputs = r["inputs_seconds"]
    extra = inputs["augmented"] - inputs["plain"]
    lines = [f"<!-- bench:{a.label} -->", f"## {a.label}: {r['machine'].get('cpu', r['device'])}", "",
             f"Measured {r['when']} with `python benchmarks/augment_overhead.py --model {r['model']} --image-size "
             f"{r['image_size']} --cache-size {r['cache_size']} --batch-size {r['batch_size']} --steps {r['steps']} "
             f"--repeats {r['repeats']}` on {r['device']} ({r['threads']} threads): full fine-tuning (--freeze none, "
             f"random init, fp32) through `engine.fit`, the variants alternating; augmented = "
             f"`{' '.join(AUGMENTED)} --cache-size {r['cache_size']}`." + (f" {a.note}" if a.note else ""), "",
             "| variant | s/step, each repeat | median s/step | images/s |", "|---|---|---|---|"]
    for name, values in r["seconds_per_step"].items():
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {medians[name]:.3f} | "
                     f"{r['batch_size'] / medians[name]:.1f} |")
    each = [aug / plain for aug, plain in zip(r["seconds_per_step"]["augmented"], r["seconds_per_step"]["plain"])]
    lines += ["", f"- **Augmented / plain step time: x{r['ratio']:.3f}** ({(r['ratio'] - 1) * 100:+.1f}%; goal: at "
              f"most +10%), the ratio of the medians; each repeat: {', '.join(f'x{x:.2f}' for x in each)}.",
              f"- The inputs alone (one batch of {r['batch_size']}, median of 5): plain {inputs['plain'] * 1e3:.1f} ms, "
              f"augmented {inputs['augmented'] * 1e3:.1f} ms (crop, flip, TrivialAugment, erasing and mixing of the "
              f"images and their partners): {extra * 1e3:.1f} ms more, {extra / medians['plain'] * 100:.1f}% of a "
              f"plain step.", "", f"<!-- /bench:{a.label} -->", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
