"""What the fine-tuning recipe is worth, honestly: test accuracy and the train/test gap from random
initialisation, on data a small network can learn, beside timm's own train.py with its defaults.

    python benchmarks/recipes.py --timm-train PATH/TO/timm/train.py --timm-python PATH/TO/python

No ImageNet weights can be had on this machine, so the comparison trains from scratch: resnet18 on a
generated set of 8 classes of shapes (disk, square, triangle, plus, ring, cross, bar, star), each drawn at a
random size, position, tilt and bright colour on a noisy dark grey background, 40 images per class at 64 px;
tl_dist's stratified split (seed 0) holds out 8 per class: 256 train / 64 test. Every arm trains 10 epochs
in batches of 32, one process on this machine's cores, and is a fresh process:

  bare          the article's loop over every layer: --freeze none, SGD (lr 0.05, momentum 0.9), constant lr
  +schedule     + --warmup-epochs 1 --lr-schedule cosine
  +smoothing    + --label-smoothing 0.1
  +ema          + --ema-decay 0.9998 (the final model is the average)
  +wd           + --weight-decay 5e-4 (SGD's L2; the no-decay groups as in the recipe)
  +augment      the bare loop + the finetune recipe's augmentation: TrivialAugment crops from a 73 px cache
                (8/7 of 64), random erasing 0.1, mixup 0.2 / cutmix 1.0, the weights' evaluation resize
  +basic        the bare loop + random resized crop and flip only (--augment basic), as timm's default
  finetune      --recipe finetune (AdamW, weight decay 0.05, label smoothing 0.1, warm-up 1 epoch, cosine,
                EMA, and that augmentation) at its preset lr (1e-4, chosen for pretrained weights), and at
                --lr 2e-3 (from scratch); and with --augment basic and no mixing or erasing
  timm          timm's train.py: --model resnet18 --img-size 64 --epochs 10 -b 32 --num-classes 8 --device cpu
                and nothing else (its defaults: SGD at lr 0.1 x 32/256, weight decay 2e-5, 5 warm-up epochs,
                cosine, label smoothing 0.1, random-resized-crop + flip + colour jitter 0.4, 4 loader
                workers), on the same split (train/ and validation/ folders of links to the same files); and
                the same with --lr 0.05, the bare loop's

For each arm: test accuracy, the accuracy of
the same final model on the training images (evaluated as the test images are), their gap, and wall seconds
of the whole process, and its CPU seconds (user + system of the process and its children, loader workers
included): on a machine other programs share, wall times are noisy (the load average is printed beside them)
and CPU seconds are the fairer comparison. The arms run one after another, each once.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, machine_description, write_section  # noqa: E402

SHAPES = ("disk", "square", "triangle", "plus", "ring", "cross", "bar", "star")
COMMON = ["--model", "resnet18", "--weights", "none", "--image-size", "64", "--epochs", "10", "--batch-size", "32",
          "--checkpoint-every-epochs", "0", "--wandb-mode", "disabled", "--num-workers", "0"]
BARE = ["--freeze", "none", "--lr", "0.05"]
ARMS = {  # the tl_dist arms; "timm" runs timm's train.py
    "bare": BARE,
    "+schedule": BARE + ["--warmup-epochs", "1", "--lr-schedule", "cosine"],
    "+smoothing": BARE + ["--warmup-epochs", "1", "--lr-schedule", "cosine", "--label-smoothing", "0.1"],
    "+ema": BARE + ["--warmup-epochs", "1", "--lr-schedule", "cosine", "--label-smoothing", "0.1", "--ema-decay",
                    "0.9998"],
    "+wd": BARE + ["--warmup-epochs", "1", "--lr-schedule", "cosine", "--label-smoothing", "0.1", "--ema-decay",
                   "0.9998", "--weight-decay", "5e-4"],
    "+augment": BARE + ["--augment", "trivial", "--random-erasing", "0.1", "--mixup", "0.2", "--cutmix", "1.0",
                        "--cache-size", "73", "--eval-resize", "weights"],
    "+basic": BARE + ["--augment", "basic", "--cache-size", "73", "--eval-resize", "weights"],
    "finetune (preset lr)": ["--recipe", "finetune"],
    "finetune lr=2e-3": ["--recipe", "finetune", "--lr", "2e-3"],
    "finetune basic lr=2e-3": ["--recipe", "finetune", "--lr", "2e-3", "--augment", "basic", "--mixup", "0",
                               "--cutmix", "0", "--random-erasing", "0"],
}
TIMM_ARMS = {"timm": [], "timm lr=0.05": ["--lr", "0.05"]}  # its defaults; and with the bare loop's lr
ORDER = ("bare", "+augment", "finetune lr=2e-3", "timm", "+basic", "finetune basic lr=2e-3", "timm lr=0.05", "+ema", "finetune (preset lr)", "+schedule",
         "+smoothing", "+wd")


def measured(command: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float, tuple]:
    """Run `command`; returns it, its wall seconds, the CPU seconds of it and its descendants (user + system:
    less sensitive than wall time to other programs on a shared machine) and the load before / after."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{proc.stderr[-3000:]}")
    return proc, wall, cpu, (load, os.getloadavg()[0])


# ---------------------------------------------------------------- the data


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    def polygon(points):
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=fill)

    w = max(2.0, r / 3)
    if shape == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(w))
    elif shape == "square":
        polygon([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif shape == "triangle":
        polygon([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == "star":
        polygon([((r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5 - math.pi / 2),
                  (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5 - math.pi / 2)) for i in range(10)])
    elif shape == "bar":
        polygon([(-r, -w / 2), (r, -w / 2), (r, w / 2), (-r, w / 2)])
    else:  # plus, cross: two bars, the cross at 45 degrees more
        turn = angle + (math.pi / 4 if shape == "cross" else 0.0)
        for a in (turn, turn + math.pi / 2):
            c, s = math.cos(a), math.sin(a)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c)
                          for x, y in [(-r, -w / 2), (r, -w / 2), (r, w / 2), (-r, w / 2)]], fill=fill)


def make_shapes(root: Path, per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """One folder per shape of `per_class` PNGs: a shape of random size (radius 14-26 px), position (wholly
    inside the image), tilt (up to 15 degrees) and bright colour on a dark grey background with noise."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.uniform(0, 70) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            r = rng.uniform(14, 26)
            cx, cy = rng.uniform(r, size - r, 2)
            hue, saturation, value = rng.uniform(), rng.uniform(0.5, 1), rng.uniform(0.7, 1)
            colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
            tilt = rng.uniform(-math.pi / 12, math.pi / 12)  # at most 15 degrees: a plus stays no cross
            draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, tilt, colour)
            img.save(folder / f"{shape}_{i:03d}.png")
    return root


def timm_folders(data: Path, split: dict, root: Path) -> Path:
    """train/ and validation/ folders of links to tl_dist's split of the same files, for timm's ImageFolder."""
    for part, files in (("train", split["train"]), ("validation", split["test"])):
        for f in files:
            link = root / part / f
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(data / f)
    return root


# ---------------------------------------------------------------- the arms


def train_accuracy(run: Path, data: Path) -> float:
    """The final model (model/) on the training images, preprocessed as tl_dist evaluates: resized to the
    run's size, normalised with the weights' mean and std, the network in eval mode."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO))
    from tl_dist.data import load_image, normalize
    from tl_dist.model import build_model

    config, split = (json.loads((run / name).read_text()) for name in ("config.json", "split.json"))
    model = build_model(config["model"], len(split["classes"]), "none", "none", image_size=config["image_size"])
    model.load_state_dict(load_file(str(run / "model" / "model.safetensors")))
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(split["train"]), 64):
            files = split["train"][start:start + 64]
            x = torch.from_numpy(np.stack([load_image(data / f, config["image_size"]) for f in files]))
            x = normalize(x.permute(0, 3, 1, 2), mean=config["mean"], std=config["std"])
            labels = torch.tensor([split["classes"].index(f.split("/")[0]) for f in files])
            correct += (model(x).argmax(1) == labels).sum().item()
    return correct / len(split["train"])


def run_tl_dist(name: str, extra: list[str], data: Path, work: Path) -> dict:
    out = work / "runs" / name.replace(" ", "_").replace(",", "")
    _, wall, cpu, load = measured([sys.executable, "-m", "tl_dist.train", "--data-dir", str(data), "--output-dir",
                                   str(out), "--cache-dir", str(work / "cache"), *COMMON, *extra], REPO)
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"arm": name, "options": " ".join(extra), "test": metrics["test"]["accuracy"],
              "train": train_accuracy(out, data), "wall_s": wall, "cpu_s": cpu, "train_s": metrics["train"]["seconds"],
              "load": load}
    if "test_raw" in metrics:
        result["test_raw"] = metrics["test_raw"]["accuracy"]
    return result


TIMM_TRAIN_ACCURACY = r"""
import sys, torch, timm
from timm.data import create_dataset, create_loader, resolve_data_config
model = timm.create_model("resnet18", num_classes=8, checkpoint_path=sys.argv[2])
model.eval()
config = resolve_data_config({}, model=model)
config["input_size"] = (3, int(sys.argv[3]), int(sys.argv[3]))
loader = create_loader(create_dataset("", root=sys.argv[1]), batch_size=64, device=torch.device("cpu"), **config)
correct = total = 0
with torch.no_grad():
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
print(correct / total)
"""


def run_timm(a, name: str, data: Path, work: Path) -> dict:
    """timm's train.py with its defaults (and TIMM_ARMS[name]) on the same split; the accuracy of its last
    epoch's model."""
    out = work / name.replace(" ", "_")
    args = ["--data-dir", str(data), "--model", "resnet18", "--img-size", "64", "--epochs", "10", "-b", "32",
            "--num-classes", "8", "--device", "cpu", *TIMM_ARMS[name], "--output", str(out), "--experiment", "run"]
    _, wall, cpu, load = measured([a.timm_python, a.timm_train, *args], work)
    with open(out / "run" / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    train = subprocess.run([a.timm_python, "-c", TIMM_TRAIN_ACCURACY, str(data / "train"),
                            str(out / "run" / "last.pth.tar"), "64"], capture_output=True, text=True, check=True)
    return {"arm": f"timm train.py, its defaults{' + ' + ' '.join(TIMM_ARMS[name]) if TIMM_ARMS[name] else ''}",
            "options": " ".join(args[2:-4]),
            "test": float(last["eval_top1"]) / 100, "train": float(train.stdout.strip().splitlines()[-1]),
            "wall_s": wall, "cpu_s": cpu, "train_s": None, "load": load}


# ---------------------------------------------------------------- the report


def report(machine: dict, runs: list[dict], when: str, command: str, timm_version: str | None) -> str:
    lines = ["<!-- bench:recipes-cpu -->", f"## recipes-cpu: {machine['cpu']}, {machine['cores']} cores", "",
             f"Measured {when} with `{command}`: resnet18 from random initialisation on 8 generated classes of "
             "shapes (256 train / 64 test images, 64 px), 10 epochs, batch 32, one process; each arm a fresh "
             f"process, run once. Python {machine['python']}, torch {machine['torch']}, torchvision "
             f"{machine['torchvision']}" + (f", timm {timm_version} (its repository's train.py)" if timm_version else "")
             + ". The machine was shared (load: 1-minute load average before / after each arm, on "
             f"{machine['cores']} cores): times are noisy.", "",
             f"Every tl_dist arm: `python -m tl_dist.train {' '.join(COMMON)}` and its options below.", "",
             "| arm | test acc. | train acc. | gap (train - test) | wall s | CPU s | training s | load | options |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        raw = f" (raw weights {r['test_raw']:.1%})" if "test_raw" in r else ""
        training = "-" if r["train_s"] is None else f"{r['train_s']:.1f}"
        lines.append(f"| {r['arm']} | {r['test']:.1%}{raw} | {r['train']:.1%} | {r['train'] - r['test']:+.1%} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {training} | {r['load'][0]:.1f} / {r['load'][1]:.1f} | "
                     f"`{r['options']}` |")
    lines += ["", "<!-- /bench:recipes-cpu -->"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", help="timm's train.py (from its repository; not in the wheel)")
    p.add_argument("--timm-python", default=sys.executable, help="a Python that has timm installed")
    p.add_argument("--arms", default=",".join(ORDER), help="the arms to run, in order, comma-separated (timm: "
                   "needs --timm-train)")
    p.add_argument("--work-dir", help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--from-log", help="write the section from the result lines (JSON) a run printed, and stop")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/recipes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.from_log:  # {"command", "when", "timm_version"} and one line per arm, as a run printed them
        lines = [json.loads(line) for line in Path(a.from_log).read_text().splitlines() if line.startswith("{")]
        head, runs = lines[0], lines[1:]
        section = report(machine_description(), runs, head["when"], head["command"], head["timm_version"])
        write_section(Path(a.results), "recipes-cpu", section)
        print(section)
        return 0
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="tl_dist-recipes-"))
    data = make_shapes(work / "shapes" / "caltech-101")
    started = datetime.datetime.now(datetime.timezone.utc)
    timm_version = subprocess.run([a.timm_python, "-c", "import timm; print(timm.__version__)"], capture_output=True,
                                  text=True).stdout.strip() if a.timm_train else None
    print(json.dumps({"command": command, "when": f"{started:%Y-%m-%d %H:%M} UTC", "timm_version": timm_version}),
          flush=True)
    runs = []
    for name in a.arms.split(","):
        done = work / "results" / f"{name}.json"  # an arm of an interrupted run, with --work-dir: not run again
        if done.is_file():
            runs.append(json.loads(done.read_text()))
        elif name in TIMM_ARMS:
            if not a.timm_train:
                continue
            split = json.loads(next((work / "runs").glob("*/split.json")).read_text())  # the same for every arm
            runs.append(run_timm(a, name, timm_folders(data, split, work / "timm-data"), work))
        else:
            runs.append(run_tl_dist(name, ARMS[name], data, work))
        done.parent.mkdir(exist_ok=True)
        done.write_text(json.dumps(runs[-1]))
        print(json.dumps(runs[-1]), flush=True)
    when = f"{started:%Y-%m-%d %H:%M}-{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC"
    section = report(machine_description(), runs, when, command, timm_version)
    print(section)
    write_section(Path(a.results), "recipes-cpu", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
