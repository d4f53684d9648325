"""VGG16 and other torchvision backbones side by side: the article's recipe, end to end, one run each.

    python benchmarks/backbones.py --data-dir ../shared/data/caltech-101-mini --max-samples 200

Each network runs the article's recipe (frozen feature extractor, its features computed once into the
feature cache, the classifier block trained 5 epochs with SGD, evaluation before and after, per-epoch
checkpoints) the plain way, as a user would:
    accelerate launch --num_processes 1 tl_dist/train.py --model NAME --weights none --image-size 224 ...
timed from process start to exit. --weights none: random weights, because this machine cannot download
ImageNet's; the time of a forward pass does not depend on the values of the weights. A warm-up run
(vgg_tiny, one step, not timed) first decodes the images into the decoded-image cache, so that every timed
run finds it warm. Reported: the end-to-end wall time, the feature pass (images/s of the frozen extractor
over every image, from the run's metrics.json), the classifier steps, the size of a cached feature, the
trained parameters, and the peak RSS. The section --label of --results (Markdown) is replaced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, accelerate_launch, build_subset, machine_description, timed, write_section  # noqa: E402

DEFAULT_MODELS = "vgg16,resnet50,efficientnet_b0,convnext_tiny,vit_b_16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The article's recipe with several backbones, end to end.")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "caltech-101-mini"))
    p.add_argument("--max-samples", type=int, default=200, help="stratified sample, as tl_dist --max-samples")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated --model names")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--label", default="backbones-cpu", help="the section of --results these numbers replace")
    p.add_argument("--note", default="", help="a line printed under the section's heading")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    return p.parse_args(argv)


def run_network(a, arch: str, subset: Path, cache: Path, work: Path, timed_run: bool = True) -> dict:
    out_dir = work / f"run-{arch}"
    cmd = [*accelerate_launch(), "--num_processes", "1", str(REPO / "tl_dist" / "train.py"),
           "--data-dir", str(subset), "--output-dir", str(out_dir), "--cache-dir", str(cache),
           "--model", arch, "--weights", "none", "--image-size", str(a.image_size), "--wandb-mode", "disabled"]
    cmd += ["--epochs", str(a.epochs)] if timed_run else ["--epochs", "1", "--max-steps", "1"]
    log = work / f"{arch}.log"
    r = timed(cmd, log, a.timeout)
    metrics_file = out_dir / "metrics.json"
    if r["rc"] != 0 or not metrics_file.is_file():
        raise SystemExit(f"{arch} failed (exit {r['rc']}); log {log}:\n{log.read_text()[-3000:]}")
    m = json.loads(metrics_file.read_text())
    features = m.get("features") or {}
    r.update(arch=arch, images=m["config"]["train_samples"] + m["config"]["test_samples"],
             features_ips=features.get("images_per_second"), features_s=features.get("seconds"),
             train_s=m["train"]["seconds"], steps=m["train"]["global_step"], **network_sizes(arch, m))
    shutil.rmtree(out_dir, ignore_errors=True)  # the final model and checkpoints
    return r


def network_sizes(arch: str, metrics: dict) -> dict:
    """The length of a cached feature and the parameters --freeze features trains, from the network."""
    sys.path.insert(0, str(REPO))
    import torch

    from tl_dist.model import build_model, trainable_parameters

    with torch.device("meta"):  # shapes only
        try:
            model = build_model(arch, metrics["config"]["num_classes"], "none", "features",
                                image_size=metrics["config"]["image_size"])
        except NotImplementedError:  # a network that cannot be built on the meta device
            return {"feature_len": None, "trained_params": None}
        feature = model.eval().embed(torch.empty(1, 3, metrics["config"]["image_size"], metrics["config"]["image_size"]))
    return {"feature_len": feature.shape[1], "trained_params": sum(p.numel() for p in trainable_parameters(model))}


def report(a, machine: dict, runs: list[dict], when: str, command: str) -> str:
    lines = [f"<!-- bench:{a.label} -->", f"## {a.label}: {machine['cpu']}, {machine['cores']} cores", "",
             f"Measured {when} with `{command}`. {runs[0]['images']} images of the sample, {a.image_size} px, "
             f"{a.epochs} epochs of the article's recipe (frozen feature extractor, cached features, SGD on the "
             "classifier block, per-epoch checkpoints), `--weights none` (this machine cannot download the "
             "ImageNet weights; a forward pass takes as long with any values), one run per network, the "
             f"decoded-image cache warm. Python {machine['python']}, torch {machine['torch']}, torchvision "
             f"{machine['torchvision']}, accelerate {machine['accelerate']}. Other programs shared the "
             "cores (the load column: 1-minute load average before and after each run, on "
             f"{machine['cores']} cores), so the numbers are noisy and slower than on an idle machine."]
    if a.note:
        lines += ["", a.note]
    lines += ["", "| --model | wall s (end to end) | feature pass images/s | feature pass s | classifier steps s "
              "| cached feature per image | trained parameters | peak RSS MiB | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['arch']} | {r['wall_s']:.1f} | {r['features_ips']:.1f} | {r['features_s']:.1f} | "
                     f"{r['train_s']:.1f} | {r['feature_len'] or '?'} floats | "
                     f"{(r['trained_params'] or 0) / 1e6:.2f}M | {r['peak_rss_mib']:.0f} | "
                     f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    base = next((r for r in runs if r["arch"] == "vgg16"), runs[0])
    lines += ["", "Feature pass vs " + base["arch"] + ": " + ", ".join(
        f"{r['arch']} {r['features_ips'] / base['features_ips']:.2f}x" for r in runs if r is not base) + ".",
        "", f"<!-- /bench:{a.label} -->"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/backbones.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="tl_dist-backbones-"))
    try:
        subset, cache = work / "data", work / "cache"
        build_subset(Path(a.data_dir), a.max_samples, subset)
        run_network(a, "vgg_tiny", subset, cache, work, timed_run=False)  # decodes the images once
        started = datetime.datetime.now(datetime.timezone.utc)
        runs = []
        for arch in a.models.split(","):
            load_before = os.getloadavg()[0]
            runs.append(run_network(a, arch, subset, cache, work))
            runs[-1]["load"] = (load_before, os.getloadavg()[0])
            print(json.dumps(runs[-1]), flush=True)
        when = f"{started:%Y-%m-%d %H:%M}-{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = report(a, machine, runs, when, command)
    print(section)
    write_section(Path(a.results), a.label, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
