"""tl_dist against the article's plain PyTorch loop, side by side, on the same data, size, epochs and weights.

    python benchmarks/bench.py --data-dir ../shared/data/caltech-101-mini --max-samples 200 --repeats 3

Both sides are started the plain way, as a user would, and timed end to end (process start to exit):
  A  python benchmarks/article_loop.py --data-dir SUBSET --weights INIT.pt ...
  B  accelerate launch --num_processes 1 tl_dist/train.py --data-dir SUBSET --weights INIT.pt
         --checkpoint-every-epochs 0 --wandb-mode disabled --cache-dir EMPTY ...   (cold decoded-image cache)
  B' the same with the cache left by B                                            (warm cache)
  C  B' with tl_dist's default --checkpoint-every-epochs 1                        (cost of checkpoints)
in the order A B B' C, --repeats times, so that a noisy machine slows both sides alike; ratios are taken
within one repeat. SUBSET is a folder of links to the --max-samples files that `tl_dist --max-samples N`
selects (the same stratified sample), so both sides read exactly the same files. INIT.pt is one
random-init VGG16 state_dict (seeded), loaded by both sides. Peak memory is the child's max RSS
(os.wait4; for accelerate launch, the largest of the launcher and the training process).
The results, with the machine's description, replace this --label's section of --results (Markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tl_dist.data import index_images, stratified_sample  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tl_dist vs the article's loop, alternately, end to end.")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "caltech-101-mini"))
    p.add_argument("--max-samples", type=int, default=200, help="stratified sample, as tl_dist --max-samples")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="vgg16", choices=("vgg16", "vgg_tiny"),
                   help="vgg_tiny: a smoke test of the benchmark itself (tl_dist side only supports it)")
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--tl-args", default="", help="extra tl_dist/train.py flags, e.g. '--channels-last'")
    p.add_argument("--variant", action="append", default=[],
                   help="extra tl_dist flags for one more warm-cache run per repeat (repeatable), e.g. "
                        "'--mixed-precision bf16 --channels-last'")
    p.add_argument("--skip-warm", action="store_true", help="no warm-cache runs")
    p.add_argument("--skip-checkpoints", action="store_true", help="no run with per-epoch checkpoints")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary one, removed)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--json", default=None, help="also write every run's numbers to this JSON file")
    p.add_argument("--label", default="cpu", help="the section of --results these numbers replace")
    p.add_argument("--note", default="", help="a line printed under the section's heading")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--from-json", default=None, help="render the report of an earlier --json file; run nothing")
    return p.parse_args(argv)


# ---------------------------------------------------------------- set-up


def build_subset(data_dir: Path, max_samples: int, dest: Path) -> int:
    """Links to the files `tl_dist --max-samples N --seed 0` trains on, one folder per class."""
    index = index_images(data_dir, warn=lambda m: None)
    keep = stratified_sample(index.labels, max_samples, seed=0)
    for i in keep:
        link = dest / index.files[i]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((index.root / index.files[i]).resolve())
    return len(keep)


def save_init_weights(path: Path, model: str, seed: int) -> None:
    """One random-init network, saved once: both sides start from it."""
    import torch
    from torchvision import models

    from tl_dist.model import _vgg_tiny

    torch.manual_seed(seed)
    net = models.vgg16() if model == "vgg16" else _vgg_tiny(0.5)
    torch.save(net.state_dict(), path)


def machine_description() -> dict:
    import accelerate
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "memory_gib": None, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "gpu": None}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return info


# ---------------------------------------------------------------- one timed run


def timed(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> dict:
    """Run `cmd` to its end; wall seconds, exit code and peak RSS (MiB) of it and its waited-for children."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "rc": proc.returncode, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_article(a, subset: Path, weights: Path, work: Path, tag: str) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "article_loop.py"), "--data-dir", str(subset),
           "--image-size", str(a.image_size), "--epochs", str(a.epochs), "--weights", str(weights)]
    log = work / f"{tag}.log"
    r = timed(cmd, log, a.timeout)
    text = log.read_text()
    found = re.findall(r"^RESULT (.*)$", text, re.M)
    if r["rc"] != 0 or not found:
        raise SystemExit(f"article loop failed (exit {r['rc']}); log {log}:\n{text[-3000:]}")
    res = json.loads(found[-1])
    r.update(side="article", test_loss=res["test_loss"], accuracy=res["accuracy"],
             train_images=res["train_images"], test_images=res["test_images"],
             train_ips=res["train_images_per_second"], detail=res["seconds"])
    return r


def accelerate_launch() -> list[str]:
    exe = shutil.which("accelerate")
    launcher = [exe] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*launcher, "launch"] if exe else launcher


def run_tl_dist(a, subset: Path, weights: Path, work: Path, tag: str, cache: Path, checkpoints: int,
                extra: str = "") -> dict:
    out_dir = work / f"run-{tag}"
    cmd = [*accelerate_launch(), "--num_processes", "1", str(REPO / "tl_dist" / "train.py"),
           "--data-dir", str(subset), "--output-dir", str(out_dir), "--cache-dir", str(cache),
           "--model", a.model, "--weights", str(weights), "--image-size", str(a.image_size),
           "--epochs", str(a.epochs), "--checkpoint-every-epochs", str(checkpoints),
           "--wandb-mode", "disabled", *a.tl_args.split(), *extra.split()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    log = work / f"{tag}.log"
    r = timed(cmd, log, a.timeout, env)
    metrics_file = out_dir / "metrics.json"
    if r["rc"] != 0 or not metrics_file.is_file():
        raise SystemExit(f"tl_dist failed (exit {r['rc']}); log {log}:\n{log.read_text()[-3000:]}")
    m = json.loads(metrics_file.read_text())
    r.update(side="tl_dist", test_loss=m["test"]["loss"], accuracy=m["test"]["accuracy"],
             train_images=m["config"]["train_samples"], test_images=m["config"]["test_samples"],
             train_ips=m["train"]["images_per_second"], test_ips=m["test"]["images_per_second"],
             features_ips=(m.get("features") or {}).get("images_per_second"),
             features_s=(m.get("features") or {}).get("seconds"), train_s=m["train"]["seconds"])
    shutil.rmtree(out_dir, ignore_errors=True)  # the final model and checkpoints: ~0.5-2 GB each
    return r


# ---------------------------------------------------------------- report


def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(a, machine: dict, runs: list[dict], n_images: int, when: str | None = None) -> str:
    when = when or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    lines = [f"<!-- bench:{a.label} -->", f"## {a.label}: {machine['cpu']}, {machine['cores']} cores{gpu}", "",
             f"Measured {when} with `python benchmarks/bench.py --data-dir {Path(a.data_dir).name} "
             f"--max-samples {a.max_samples} --image-size {a.image_size} --epochs {a.epochs} --repeats {a.repeats}"
             + (f" --tl-args '{a.tl_args}'" if a.tl_args else "") + "`. "
             f"{n_images} images" + "".join(
                 f"; {side}: {r['train_images']} train / {r['test_images']} test"
                 for side, r in {r["side"]: r for r in runs}.items())
             + f" (the article's 80/20 `random_split`; tl_dist's stratified split keeps at least one "
             f"test image per class), {a.epochs} epochs, {a.image_size} px, the same random-init {a.model} weights "
             f"on both sides (seed {a.weights_seed}). "
             f"Python {machine['python']}, torch {machine['torch']}, torchvision {machine['torchvision']}, "
             f"accelerate {machine['accelerate']}, {machine['memory_gib']} GiB RAM.", ""]
    if a.note:
        lines += [a.note, ""]
    lines += ["| repeat | run | wall s (end to end) | images/s end to end (images × epochs / wall s) | peak RSS MiB "
              "| test loss | test acc. | detail |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        epochs_images = n_images * a.epochs  # the same on both sides, whatever their split
        if r["side"] == "article":
            d = r["detail"]
            detail = (f"set-up {d['setup']:.1f} s, train {d['train']:.1f} s ({r['train_ips']:.1f} img/s), "
                      f"2 evaluations {d['total'] - d['setup'] - d['train']:.1f} s")
        else:
            detail = (f"features {_f(r['features_s'])} s ({_f(r['features_ips'])} img/s), "
                      f"classifier steps {r['train_s']:.1f} s")
        lines.append(f"| {r['repeat']} | {r['name']} | {r['wall_s']:.1f} | {epochs_images / r['wall_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['test_loss']:.4f} | {r['accuracy']:.2%} | {detail} |")
    lines += [""]

    def ratios(num: str, den: str) -> list[float]:
        out = []
        for rep in range(a.repeats):
            x = [r for r in runs if r["repeat"] == rep + 1 and r["name"] == num]
            y = [r for r in runs if r["repeat"] == rep + 1 and r["name"] == den]
            if x and y:
                out.append(x[0]["wall_s"] / y[0]["wall_s"])
        return out

    summary = []
    for name, label in (("tl_dist cold", "cold cache"), ("tl_dist warm", "warm cache")):
        rs = ratios("article", name)
        if rs:
            summary.append(f"- **tl_dist ({label}): {statistics.median(rs):.2f}x the speed of the article's loop "
                           f"end to end** (article wall time / tl_dist wall time, median of {len(rs)}; each repeat: "
                           + ", ".join(f"{x:.2f}x" for x in rs) + ").")
    for extra in a.variant:
        rs = ratios("article", f"tl_dist warm {extra}")
        if rs:
            summary.append(f"- tl_dist (warm cache, `{extra}`): {statistics.median(rs):.2f}x the speed of the "
                           f"article's loop end to end (median of {len(rs)}).")
    ck = ratios("tl_dist warm + checkpoints", "tl_dist warm")
    if ck:
        extra = [r["wall_s"] for r in runs if r["name"] == "tl_dist warm + checkpoints"]
        base = [r["wall_s"] for r in runs if r["name"] == "tl_dist warm"]
        summary.append(f"- Per-epoch checkpoints (`--checkpoint-every-epochs 1`, tl_dist's default; "
                       f"{a.epochs - 1} checkpoints of model + optimizer state) add "
                       f"{statistics.median(extra) - statistics.median(base):.1f} s (median), "
                       f"x{statistics.median(ck):.2f} of the warm run.")
    lines += summary + ["", f"<!-- /bench:{a.label} -->"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, label: str, section: str) -> None:
    text = path.read_text() if path.is_file() else (
        "# Benchmark results\n\nWritten by `benchmarks/bench.py` (one section per machine; see "
        "docs/performance.md for what the numbers mean).\n\n")
    pattern = re.compile(rf"<!-- bench:{re.escape(label)} -->.*?<!-- /bench:{re.escape(label)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        keep = {k: getattr(a, k) for k in ("results", "label", "note") if getattr(a, k) != parse_args([]).__dict__[k]}
        a = argparse.Namespace(**{**saved["args"], **keep})
        tl = next(r for r in saved["runs"] if r["side"] == "tl_dist")
        n_images = saved.get("n_images") or tl["train_images"] + tl["test_images"]
        section = report(a, saved["machine"], saved["runs"], n_images, saved.get("when"))
        print(section)
        if a.results:
            write_section(Path(a.results), a.label, section)
        return 0
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="tl_dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        subset = work / "data" / "caltech-101"
        shutil.rmtree(subset, ignore_errors=True)
        n_images = build_subset(Path(a.data_dir), a.max_samples, subset)
        weights = work / f"{a.model}-init-seed{a.weights_seed}.pt"
        if not weights.is_file():
            save_init_weights(weights, a.model, a.weights_seed)
        machine = machine_description()
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        print(f"{n_images} images in {subset}; weights {weights}; {machine}", flush=True)
        runs = []

        def save() -> str:
            section = report(a, machine, runs, n_images, when)
            if a.results:
                write_section(Path(a.results), a.label, section)
            if a.json:
                Path(a.json).write_text(json.dumps({"machine": machine, "args": vars(a), "runs": runs,
                                                    "n_images": n_images, "when": when}, indent=1))
            return section

        def record(r: dict, rep: int, name: str) -> None:
            r.update(repeat=rep, name=name)
            runs.append(r)
            print(f"[{rep}] {name:28s} {r['wall_s']:7.1f} s  peak {r['peak_rss_mib']:6.0f} MiB  "
                  f"test loss {r['test_loss']:.4f}  acc {r['accuracy']:.2%}", flush=True)
            save()  # after every run: a run cut short by a time limit keeps what it measured

        for rep in range(1, a.repeats + 1):
            if a.model == "vgg16":
                record(run_article(a, subset, weights, work, f"article-{rep}"), rep, "article")
            cache = work / f"cache-{rep}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()  # empty: a cold decoded-image cache
            record(run_tl_dist(a, subset, weights, work, f"cold-{rep}", cache, 0), rep, "tl_dist cold")
            if not a.skip_warm:
                record(run_tl_dist(a, subset, weights, work, f"warm-{rep}", cache, 0), rep, "tl_dist warm")
                if not a.skip_checkpoints:
                    record(run_tl_dist(a, subset, weights, work, f"ckpt-{rep}", cache, 1), rep,
                           "tl_dist warm + checkpoints")
                for v, extra in enumerate(a.variant):
                    record(run_tl_dist(a, subset, weights, work, f"variant{v}-{rep}", cache, 0, extra), rep,
                           f"tl_dist warm {extra}")
            shutil.rmtree(cache, ignore_errors=True)
        print(save())
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
