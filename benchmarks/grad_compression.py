"""The effect of --grad-compression on DDP's gradient all-reduce, measured with CPU processes over gloo.

    python benchmarks/grad_compression.py --data-dir ../shared/data/caltech-101-mini

1. The all-reduce alone: VGG16's trainable classifier (~120M parameters, ~480 MB of fp32 gradients) as DDP
   sends it, in 25 MB buckets, between --processes processes over gloo, in fp32 and compressed to bf16 /
   fp16 (the cast to and from the compressed type, as Accelerate's comm hooks do, included).
2. End to end: `accelerate launch --multi_gpu --num_processes N tl_dist/train.py --grad-compression X` on
   the article's recipe (frozen features, cached), at a small image size (the classifier, and so the
   all-reduce, is the same size at any image size), timing the training steps (train.images_per_second).
The results replace the `gloo-grad-compression` section of --results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench import build_subset, machine_description, save_init_weights, write_section  # noqa: E402

CLASSIFIER_PARAMS = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 102 + 102  # VGG16's, 102 classes
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, world: int, port: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grads = torch.randn(CLASSIFIER_PARAMS)
    results = {}
    for name, dtype in (("none (fp32)", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        times, casts, comms = [], [], []
        for _ in range(repeats + 1):  # the first is a warm-up
            dist.barrier()
            tic = time.perf_counter()
            flat = grads if dtype == torch.float32 else grads.to(dtype).div_(world)
            t_cast = time.perf_counter()
            per_bucket = BUCKET_BYTES // flat.element_size()
            works = [dist.all_reduce(b, async_op=True) for b in flat.split(per_bucket)]
            for w in works:
                w.wait()
            t_comm = time.perf_counter()
            if dtype != torch.float32:
                grads.copy_(flat)  # decompressed into the fp32 gradients
            times.append(time.perf_counter() - tic)
            casts.append(time.perf_counter() - t_comm + t_cast - tic)
            comms.append(t_comm - t_cast)
        results[name] = {"seconds": statistics.median(times[1:]), "cast_seconds": statistics.median(casts[1:]),
                         "allreduce_seconds": statistics.median(comms[1:]),
                         "bytes": flat.numel() * flat.element_size()}
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def measure_allreduce(world: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_allreduce_worker, args=(world, free_port(), repeats, queue), nprocs=world, join=True,
                       start_method="spawn")
    return queue.get()


def measure_train(a, compression: str, subset: Path, weights: Path, work: Path) -> dict:
    out = work / f"run-{compression}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(a.processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "tl_dist" / "train.py"),
           "--data-dir", str(subset), "--output-dir", str(out), "--cache-dir", str(work / "cache"),
           "--weights", str(weights), "--image-size", str(a.image_size), "--epochs", str(a.epochs),
           "--grad-compression", compression, "--checkpoint-every-epochs", "0", "--wandb-mode", "disabled"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"--grad-compression {compression} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "train_images_per_second": m["train"]["images_per_second"],
            "seconds_per_step": m["train"]["seconds"] / m["train"]["global_step"], "steps": m["train"]["global_step"],
            "epoch_loss": m["train"]["epoch_loss"], "test_loss": m["test"]["loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "caltech-101-mini"))
    p.add_argument("--max-samples", type=int, default=400)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="all-reduce repeats; end-to-end runs alternate this often")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--note", default="")
    p.add_argument("--timeout", type=int, default=1200)
    a = p.parse_args(argv)

    machine = machine_description()
    allreduce = measure_allreduce(a.processes, a.repeats)
    print(json.dumps(allreduce, indent=1), flush=True)
    train = {}
    if not a.skip_train:
        work = Path(tempfile.mkdtemp(prefix="tl_dist-gradcomp-"))
        try:
            subset = work / "data" / "caltech-101"
            n = build_subset(Path(a.data_dir), a.max_samples, subset)
            weights = work / "vgg16-init.pt"
            save_init_weights(weights, "vgg16", 0)
            for rep in range(a.repeats if a.repeats > 1 else 1):
                for compression in ("none", "bf16", "fp16"):
                    r = measure_train(a, compression, subset, weights, work)
                    train.setdefault(compression, []).append(r)
                    print(compression, json.dumps(r), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    fp32 = allreduce["none (fp32)"]["seconds"]
    lines = ["<!-- bench:gloo-grad-compression -->",
             f"## gloo-grad-compression: {machine['cpu']}, {machine['cores']} cores, {a.processes} processes over gloo",
             "", f"`python benchmarks/grad_compression.py --processes {a.processes} --repeats {a.repeats}`, "
             f"torch {machine['torch']}. {a.note}".rstrip(), "",
             f"All-reduce of VGG16's classifier gradients ({CLASSIFIER_PARAMS / 1e6:.1f}M parameters) in 25 MB "
             f"buckets, median of {a.repeats}:", "",
             "| --grad-compression | bytes all-reduced per step | all-reduce s | cast to it and back s | total s | "
             "total vs fp32 |", "|---|---|---|---|---|---|"]
    for name, r in allreduce.items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.0f} MB | {r['allreduce_seconds']:.3f} | {r['cast_seconds']:.3f} | "
                     f"{r['seconds']:.3f} | {fp32 / r['seconds']:.2f}x |")
    if train:
        base = statistics.median(x["seconds_per_step"] for x in train["none"])
        lines += ["", f"End to end: `accelerate launch --multi_gpu --num_processes {a.processes} tl_dist/train.py "
                  f"--grad-compression X` (article recipe, cached features, {a.image_size} px, {a.epochs} epochs, "
                  f"{n} images; medians of {len(train['none'])} alternating runs):", "",
                  "| --grad-compression | s per training step | train images/s | vs none | final test loss |",
                  "|---|---|---|---|---|"]
        for name, runs in train.items():
            sps = statistics.median(x["seconds_per_step"] for x in runs)
            ips = statistics.median(x["train_images_per_second"] for x in runs)
            lines.append(f"| {name} | {sps:.3f} | {ips:.1f} | {base / sps:.2f}x | {runs[-1]['test_loss']:.4f} |")
    lines += ["", "<!-- /bench:gloo-grad-compression -->"]
    section = "\n".join(lines) + "\n"
    print(section)
    if a.results:
        write_section(Path(a.results), "gloo-grad-compression", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
