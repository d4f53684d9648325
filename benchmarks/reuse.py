"""What features on disk save: a second run, a small grid, and memory that does not grow with the rows.

    python benchmarks/reuse.py --data-dir ../shared/data/caltech-101-mini --max-samples 200

1. The article's recipe (VGG16, 224 px, 5 epochs, batch 32; --weights none --checkpoint-every-epochs 0
   --wandb-mode disabled), each run a fresh `python -m tl_dist.train` process: a cold run (empty cache), then
   the same with another --lr (features reused). Prints both wall times and their ratio.
2. A 4-configuration grid (2 learning rates x 2 epoch counts, --val-fraction 0.2) on the warm cache, run one
   after another: its total against one cold run.
3. Peak resident memory of one training process that trains a linear head for one epoch on 10k, 50k and
   200k synthetic feature rows read from disk (StoredFeatures), against holding the rows in memory.
4. A sweep's fixed cost per trial (`--only sweep`, `--classes` real classes of --data-dir, all their images):
   a cold run and a second run with another --lr, each a fresh `python -m tl_dist.train`, beside a sweep whose
   trials run one after another in its own process: its second trial against the cold run, and a 4-trial grid
   (lr 0.001/0.003 x 3/5 epochs, --val-fraction 0.2) on a cold cache against one cold run.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(args: list[str]) -> float:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - tic


def runs(a, work: Path) -> None:
    cache = work / "cache"
    base = ["--data-dir", a.data_dir, "--max-samples", str(a.max_samples), "--cache-dir", str(cache),
            "--weights", "none", "--checkpoint-every-epochs", "0", "--wandb-mode", "disabled", "--model", a.model,
            "--image-size", str(a.image_size)]
    cold = run([*base, "--output-dir", str(work / "cold")])
    warm = run([*base, "--output-dir", str(work / "warm"), "--lr", "0.002"])
    print(f"1. cold run {cold:.1f} s, second run (another --lr, features reused) {warm:.1f} s: "
          f"{cold / warm:.2f}x faster")
    tic = time.perf_counter()
    for lr in ("0.001", "0.003"):
        for epochs in ("3", "5"):
            run([*base, "--output-dir", str(work / f"grid-{lr}-{epochs}"), "--lr", lr, "--epochs", epochs,
                 "--val-fraction", "0.2"])
    grid = time.perf_counter() - tic
    print(f"2. 4-configuration grid on the warm cache {grid:.1f} s = {grid / cold:.2f}x one cold run "
          f"(the article's loop would pay 4x its full cost)")


def sweep(work: Path, name: str, grid: str, base: list[str]) -> tuple[float, list[float]]:
    """`python -m tl_dist.sweep` over `grid` (YAML parameters): its wall time and each trial's seconds."""
    sweep_file = work / f"{name}.yaml"
    sweep_file.write_text(f"name: {name}\nmethod: grid\nparameters:\n{grid}")
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tl_dist.sweep", str(sweep_file), "--output-dir", str(work / name),
                           *base], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, [float(s) for s in re.findall(r"^\[\d+/\d+\] \S+: finished \(([\d.]+) s\)", proc.stdout, re.M)]


def sweeps(a, work: Path) -> None:
    from tl_dist.data import find_image_root

    data = work / "data"
    data.mkdir()
    for folder in sorted(p for p in find_image_root(Path(a.data_dir)).iterdir() if p.is_dir())[:a.classes]:
        (data / folder.name).symlink_to(folder.resolve())
    images = sum(1 for p in data.glob("*/*") if p.is_file())

    def base(cache: str) -> list[str]:
        return ["--data-dir", str(data), "--cache-dir", str(work / cache), "--weights", "none", "--model", a.model,
                "--image-size", str(a.image_size), "--checkpoint-every-epochs", "0", "--wandb-mode", "disabled"]

    print(f"4. {a.classes} classes, {images} images, {a.model} at {a.image_size} px, 5 epochs:")
    cold = run([*base("cache-runs"), "--output-dir", str(work / "cold")])
    warm = run([*base("cache-runs"), "--output-dir", str(work / "warm"), "--lr", "0.002"])
    print(f"   fresh processes: cold run {cold:.1f} s, second run (another --lr, features reused) {warm:.1f} s: "
          f"{cold / warm:.2f}x faster")
    wall, (first, second) = sweep(work, "two", "  lr: {values: [0.001, 0.002]}\n", base("cache-two"))
    print(f"   a sweep of 2 trials on a cold cache, {wall:.1f} s: trial 1 {first:.1f} s, trial 2 (features reused) "
          f"{second:.1f} s: {cold / second:.2f}x faster than the cold run ({first / second:.2f}x its own first trial)")
    wall, trials = sweep(work, "grid", "  lr: {values: [0.001, 0.003]}\n  epochs: {values: [3, 5]}\n",
                         [*base("cache-grid"), "--val-fraction", "0.2"])
    print(f"   a 4-trial grid on a cold cache {wall:.1f} s (trials {', '.join(f'{t:.1f}' for t in trials)} s) = "
          f"{wall / cold:.2f}x one cold run")


CHILD = r"""
import sys, torch
from tl_dist.data import GlobalBatchSampler, make_loader
from tl_dist.features import FeatureStore, StoredFeatures
path, rows, dim, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = FeatureStore.__new__(FeatureStore)
store.array_path = store.meta_path = None
from pathlib import Path
store.array_path, store.meta_path = Path(path), Path(path).with_suffix(".json")
labels = [i % 102 for i in range(rows)]
if mode == "disk":
    data = StoredFeatures(store, list(range(rows)), labels)
else:  # every row in memory, as before features went to disk
    import numpy as np
    x = torch.from_numpy(np.load(path)).clone()
    y = torch.tensor(labels)
    class Rows(torch.utils.data.Dataset):
        def __len__(self): return rows
        def __getitems__(self, p): return x[p], y[p], torch.tensor(p)
    data = Rows()
head = torch.nn.Linear(dim, 102)
opt = torch.optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
sampler = GlobalBatchSampler(rows, 32, 1, 0, seed=0)
for xb, yb, _ in make_loader(data, sampler):
    loss = torch.nn.functional.cross_entropy(head(xb.float()), yb)
    loss.backward(); opt.step(); opt.zero_grad()
# VmHWM: this process' own peak (ru_maxrss would start from the parent's resident size at fork)
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def memory(a, work: Path) -> None:
    import numpy as np

    print(f"3. peak RSS of one training process, a linear head over {a.dim}-wide fp32 rows, one epoch:")
    for rows in (10_000, 50_000, 200_000):
        path = work / f"features-{rows}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, a.dim))
        for start in range(0, rows, 10_000):
            array[start:start + 10_000] = np.random.default_rng(start).standard_normal((min(10_000, rows - start),
                                                                                       a.dim), dtype=np.float32)
        array.flush()
        del array
        path.with_suffix(".json").write_text(json.dumps({"dim": a.dim, "dtype": "float32", "rows": rows}))
        cells = []
        for mode in ("disk", "memory"):
            if mode == "memory" and rows * a.dim * 4 > a.max_memory_gb * 2**30:
                cells.append("memory: skipped (over --max-memory-gb)")
                continue
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(rows), str(a.dim), mode], cwd=REPO,
                                 capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            cells.append(f"{mode}: {int(out.stdout.split()[-1]) / 2**20:.2f} GB")
        print(f"   {rows:>7} rows ({rows * a.dim * 4 / 2**30:.1f} GB of features): " + ", ".join(cells))
        path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "caltech-101-mini"))
    p.add_argument("--max-samples", type=int, default=200)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dim", type=int, default=4096, help="feature width of the synthetic rows (part 3)")
    p.add_argument("--max-memory-gb", type=float, default=4.0, help="skip in-memory runs above this")
    p.add_argument("--classes", type=int, default=10, help="real classes of --data-dir for part 4 (all their images)")
    p.add_argument("--only", choices=("runs", "memory", "sweep"), default=None)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tl_dist-reuse-"))
    print(f"work folder {work}; {resource.getpagesize()} B pages")
    if a.only in (None, "runs"):
        runs(a, work)
    if a.only in (None, "memory"):
        memory(a, work)
    if a.only in (None, "sweep"):
        sweeps(a, work)


if __name__ == "__main__":
    main()
