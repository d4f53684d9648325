"""Fine-tune VGG16 on Caltech-101: `accelerate launch tl_dist/train.py [options]` or `python -m tl_dist.train`.

The article's workflow, in order: data (download, index, decode once, split 80/20), model (ImageNet VGG16,
frozen features, new last layer), evaluation before fine-tuning, training (SGD), evaluation after it,
W&B logging throughout. Everything a run writes goes to --output-dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, sys.path[0] is tl_dist/ itself, where our module names (config, data, ...) would
    # shadow other packages' modules. Import the package from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import ctypes  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs,  # noqa: E402
                              broadcast_object_list, gather_object, set_seed)

from tl_dist.checkpoint import (FINAL_MODEL, CheckpointError, TrainState, check_checkpoint,  # noqa: E402
                                find_latest_checkpoint, load_weights, save_final_model, write_json)
from tl_dist.config import DEFAULT_DATA_DIR, Config, build_parser, parse_args  # noqa: E402
from tl_dist.console import RunConsole  # noqa: E402
from tl_dist.data import (CachedImages, DataError, FeatureRows, ImageCache, ImageIndex,  # noqa: E402
                          ShardedBatchSampler, download_caltech101, find_image_root, index_images,
                          keep_decodable, make_loader, stratified_sample, stratified_split)
from tl_dist.engine import Batches, StopRequest, evaluate, extract_features, fit  # noqa: E402
from tl_dist.model import WeightsError, build_model, trainable_parameters  # noqa: E402
from tl_dist.report import build_report, log_report, print_summary, write_report  # noqa: E402
from tl_dist.tracking import Tracker, resolve_mode  # noqa: E402

EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed on a signal or STOP file; run again with --resume auto
USER_ERRORS = (DataError, WeightsError, CheckpointError)


def build_accelerator(cfg: Config, log_with: str | None) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and on_cpu:
        # Accelerate would silently train in fp32; say so instead.
        build_parser().error("argument --mixed-precision: fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    handlers = []
    if cfg.grad_compression != "none":  # halves the ~480 MB all-reduce of VGG16's classifier gradients
        hook = DDPCommunicationHookType[cfg.grad_compression.upper()]
        handlers.append(DistributedDataParallelKwargs(comm_hook=hook))
    # cpu=True on a machine without CUDA: several processes then talk over gloo.
    # non_blocking: the prepared (evaluation, feature) loaders copy their pinned batches to the GPU
    # asynchronously, as the training loader does; a blocking copy would idle the GPU at every batch.
    return Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision, log_with=log_with,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
                       dataloader_config=DataLoaderConfiguration(non_blocking=True))


def configure_threads(cfg: Config, accelerator: Accelerator) -> int:
    """On a CPU use every core this process may run on, shared among the node's processes: `accelerate
    launch` sets OMP_NUM_THREADS=1 when it finds no GPU, which would leave all but one core idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = cfg.num_threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if accelerator.device.type == "cpu":
        torch.set_num_threads(threads)
        keep_freed_memory()
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return threads


def keep_freed_memory() -> None:
    """glibc hands every freed block over 32 MB back to the kernel, which page-faults it in again, zeroed,
    at the next allocation: on a CPU that is VGG16's ~1.7 GB of activations per batch of 32 and the ~480
    MB of classifier gradients of every step: measured here, 10-20% of the CPU time. Keep freed memory in the
    process for reuse instead (M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD -1, read
    as the largest size: it is never trimmed). Peak memory stays about the same. glibc only."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)


def fused_sgd_available(device: torch.device) -> bool:
    """One kernel for the whole SGD update instead of several passes per parameter: on CUDA, and on CPUs
    since torch 2.4 (measured there: ~0.1 s instead of 0.15-0.4 s per step for VGG16's 120M classifier
    parameters on 2 cores)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """--output-dir, else the folder holding a --resume PATH, else runs/<date-time> chosen by the main
    process and shared with the others."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume not in (None, "auto"):
        ckpt = Path(cfg.resume).resolve()
        return ckpt.parent if ckpt.name == FINAL_MODEL else ckpt.parent.parent
    name = [datetime.datetime.now().strftime("runs/%Y-%m-%d_%H-%M-%S")]
    return Path(broadcast_object_list(name)[0])


def resolve_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    ckpt = find_latest_checkpoint(run_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if ckpt is not None:
        check_checkpoint(ckpt)
    if ckpt is None and cfg.eval_only:
        raise CheckpointError(f"--eval-only: no checkpoint or final model in {run_dir}. Pass the output "
                              "folder of a run that saved one, or --resume PATH.")
    return ckpt


def load_index(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: Path) -> tuple:
    """The image index and the split: from the run's split.json when it has one (resume, --eval-only),
    else indexed from --data-dir (downloaded first when it is the default and missing)."""
    data_dir = Path(cfg.data_dir)
    split_file = run_dir / "split.json"
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        root = find_image_root(data_dir) if data_dir.is_dir() else data_dir
        files = split["train"] + split["test"]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise DataError(f"{len(missing)} file(s) of this run's split.json are not in --data-dir "
                            f"{data_dir} (first: {missing[0]}). Pass the --data-dir the run was trained on.")
        classes = split["classes"]
        labels = [classes.index(f.split("/", 1)[0]) for f in files]
        index = ImageIndex(root, files, labels, classes)
        n_train = len(split["train"])
        return index, list(range(n_train)), list(range(n_train, len(files)))
    if cfg.data_dir == DEFAULT_DATA_DIR and not data_dir.exists():
        with accelerator.local_main_process_first():  # one download per node; the others wait, then see it
            if not data_dir.exists():
                console.print(f"downloading Caltech-101 into {data_dir} ...")
                source = download_caltech101(data_dir)
                console.print(f"downloaded Caltech-101 from {source}")
    index = index_images(data_dir, warn=console.warn)
    if cfg.max_samples:
        index = index.subset(stratified_sample(index.labels, cfg.max_samples, cfg.seed))
    return index, None, None


def build_image_cache(cfg: Config, accelerator: Accelerator, console: RunConsole, index: ImageIndex,
                      threads: int) -> tuple[Path, dict[str, str]]:
    """Decode every image once into the cache (this is also the verify pass), sharded over the processes.
    Returns the cache file and {file: why} for the files that could not be decoded."""
    cache_dir, data_dir = Path(cfg.cache_dir).resolve(), index.root.resolve()
    if cache_dir == data_dir or data_dir in cache_dir.parents:
        raise DataError(f"--cache-dir {cfg.cache_dir} is inside --data-dir; choose a folder outside it.")
    cache = ImageCache(cache_dir, index, cfg.image_size)
    tmp = None
    if accelerator.is_main_process and not cache.complete():
        tmp = cache.create_tmp(f"{os.getpid()}-{time.time_ns()}")
    tmp = broadcast_object_list([tmp])[0]
    if tmp is not None:
        console.print(f"decoding {len(index)} images once into {cache.array_path} ...")
        rows = range(accelerator.process_index, len(index), accelerator.num_processes)
        bad = cache.fill(tmp, rows, threads)
        merged = {row: why for part in gather_object([bad]) for row, why in part.items()}
        if accelerator.is_main_process:
            cache.publish(tmp, merged)
        accelerator.wait_for_everyone()
    return cache.array_path, cache.bad_files()


@dataclass
class Split:
    index: ImageIndex
    array_path: Path  # the decoded-image cache, one row per index file
    bad: dict[str, str]  # files that could not be decoded, and why
    train_rows: list[int]
    test_rows: list[int]


def prepare_split(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: Path,
                  threads: int) -> Split:
    """Index (or read the run's split.json), decode every image once into the cache (the verify pass),
    and split the files that decoded."""
    index, train_rows, test_rows = load_index(cfg, accelerator, console, run_dir)
    array_path, bad = build_image_cache(cfg, accelerator, console, index, threads)
    if bad:
        console.warn(f"warning: skipped {len(bad)} file(s) that cannot be decoded (all listed in "
                     f"{run_dir / 'skipped_files.txt'}): "
                     + ", ".join(f"{f} ({why})" for f, why in list(bad.items())[:10])
                     + (" ..." if len(bad) > 10 else ""))
    if train_rows is None:  # a new split, over the files that decoded
        index, good = keep_decodable(index, bad, console.warn)
        train_pos, test_pos = stratified_split([index.labels[i] for i in good], cfg.test_fraction, cfg.seed)
        train_rows, test_rows = [good[p] for p in train_pos], [good[p] for p in test_pos]
    elif any(index.files[r] in bad for r in train_rows + test_rows):
        raise DataError(f"files of this run's split.json can no longer be decoded (listed above); "
                        f"restore them in --data-dir {cfg.data_dir}, or start a new run in another --output-dir.")
    return Split(index, array_path, bad, train_rows, test_rows)


def build_batches(cfg: Config, accelerator: Accelerator, console: RunConsole, model, train_images: CachedImages,
                  test_images: CachedImages, use_feature_cache: bool, threads: int):
    """The training batches (sharded by ShardedBatchSampler) and the test batches (sharded by Accelerate),
    either as images or, with the feature cache, as the frozen backbone's pooled features."""
    on_gpu = accelerator.device.type == "cuda"
    net = accelerator.unwrap_model(model)
    images = {"channels_last": cfg.channels_last, "mean": net.mean, "std": net.std}  # how images become inputs
    workers = cfg.num_workers if cfg.num_workers >= 0 else (min(8, threads) if on_gpu else 0)
    sampler = ShardedBatchSampler(len(train_images), cfg.batch_size, accelerator.num_processes,
                                  accelerator.process_index, cfg.seed)
    test_loader = accelerator.prepare(make_loader(test_images, batch_size=cfg.batch_size, num_workers=workers,
                                                  pin_memory=on_gpu))
    if not use_feature_cache:
        train_loader = make_loader(train_images, sampler, num_workers=workers, pin_memory=on_gpu)
        return Batches(train_loader, pooled=False, **images), Batches(test_loader, pooled=False, **images), None
    # The backbone is frozen, so its output for an image never changes: compute it once per image instead
    # of once per image and epoch (>99% of VGG16's work), then train the classifier on it.
    train_eval_loader = accelerator.prepare(make_loader(train_images, batch_size=cfg.batch_size,
                                                        num_workers=workers, pin_memory=on_gpu))
    tic = time.perf_counter()
    train_features = extract_features(accelerator, model, Batches(train_eval_loader, False, **images),
                                      len(train_images))
    test_features = extract_features(accelerator, model, Batches(test_loader, False, **images), len(test_images))
    seconds = time.perf_counter() - tic
    count = len(train_images) + len(test_images)
    stats = {"seconds": seconds, "images_per_second": count / seconds}
    console.print(f"backbone features of {count} images in {seconds:.1f} s ({stats['images_per_second']:,.0f} "
                  "images/s)")
    train_loader = make_loader(FeatureRows(train_features, train_images.labels.tolist()), sampler)
    test_loader = accelerator.prepare(make_loader(FeatureRows(test_features, test_images.labels.tolist()),
                                                  batch_size=cfg.batch_size))
    return Batches(train_loader, pooled=True), Batches(test_loader, pooled=True), stats


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    wandb_mode, wandb_note = resolve_mode(cfg.wandb_mode)
    tracking = wandb_mode != "disabled" and not cfg.eval_only
    if tracking and importlib.util.find_spec("wandb") is None:
        build_parser().error(f"argument --wandb-mode: W&B logging ({wandb_mode}) needs wandb: pip install "
                             "wandb, or pass --wandb-mode disabled")
    accelerator = build_accelerator(cfg, "wandb" if tracking else None)
    console = RunConsole(accelerator.is_main_process)
    try:
        return run(cfg, accelerator, console, wandb_mode if tracking else "disabled", wandb_note)
    except USER_ERRORS as exc:
        console.error(str(exc))
        return 1
    finally:
        console.stop_progress()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo can abort the process at exit


def run(cfg: Config, accelerator: Accelerator, console: RunConsole, wandb_mode: str, wandb_note) -> int:
    threads = configure_threads(cfg, accelerator)
    run_dir = resolve_run_dir(cfg, accelerator)
    ckpt = resolve_checkpoint(cfg, run_dir)
    resumed = TrainState.load(ckpt) if ckpt is not None else None
    if resumed and resumed.finished and not cfg.eval_only:
        console.print(f"{run_dir} already finished (its final model is {ckpt}); nothing to do.")
        return 0

    # ---- data: index, decode once (verify), split
    split = prepare_split(cfg, accelerator, console, run_dir, threads)
    index, classes, bad = split.index, split.index.classes, split.bad
    train_rows, test_rows = split.train_rows, split.test_rows

    # ---- model
    set_seed(cfg.seed)  # the same new head on every process
    with accelerator.local_main_process_first():  # one download of the ImageNet weights per node
        model = build_model(cfg.model, len(classes), cfg.weights, cfg.freeze, cfg.dropout, image_size=cfg.image_size,
                            from_checkpoint=ckpt is not None)
    mean, std = model.mean, model.std  # its weights' input normalisation, recorded in config.json for predict
    if cfg.eval_only:
        load_weights(model, ckpt)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.embed = torch.compile(model.embed)

    # ---- the run folder: written only now that the data and the weights are known to be good
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "split.json").is_file():
            write_json(run_dir / "split.json", {
                "classes": classes, "seed": cfg.seed, "test_fraction": cfg.test_fraction,
                "train": [index.files[r] for r in train_rows], "test": [index.files[r] for r in test_rows]})
        if bad:
            (run_dir / "skipped_files.txt").write_text("".join(f"{f}\t{why}\n" for f, why in bad.items()))
    accelerator.wait_for_everyone()

    # ---- optimizer: SGD over the trainable parameters (the classifier, with the article's frozen features)
    lr = cfg.lr * (accelerator.num_processes if cfg.scale_lr else 1)
    global_batch = cfg.batch_size * accelerator.num_processes
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=lr, momentum=cfg.momentum,
                                fused=True if fused_sgd_available(accelerator.device) else None)
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / accelerator.num_processes) / cfg.batch_size)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or 10**12)
    schedule = (lambda s: 1.0) if cfg.lr_schedule == "constant" else \
        (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ---- batches: uint8 images from the cache normalised on the device, or backbone features
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_images = CachedImages(split.array_path, train_rows, [index.labels[r] for r in train_rows])
    test_images = CachedImages(split.array_path, test_rows, [index.labels[r] for r in test_rows])
    use_feature_cache = not cfg.eval_only and (
        cfg.cache_features == "on" or (cfg.cache_features == "auto" and cfg.freeze == "features"))
    train_batches, test_batches, feature_stats = build_batches(cfg, accelerator, console, model, train_images,
                                                               test_images, use_feature_cache, threads)

    if cfg.eval_only:
        return run_eval_only(cfg, accelerator, console, model, test_batches, test_images, classes, run_dir, ckpt)

    # ---- tracking
    state = resumed or TrainState()
    if ckpt is not None:
        accelerator.load_state(str(ckpt))  # model, optimizer, scheduler, scaler, every process' RNG
        console.print(f"resumed from {ckpt} at epoch {state.epoch + 1}, step {state.global_step}")
    tracker = Tracker(accelerator, run_dir, wandb_mode)
    if accelerator.is_main_process and wandb_note:
        console.print(f"W&B: {wandb_note}; sync later with `wandb sync {os.environ.get('WANDB_DIR') or run_dir}/wandb/offline-run-*`")
    run_config = {**cfg.to_dict(), "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                  "effective_lr": lr, "num_classes": len(classes), "train_samples": len(train_rows),
                  "test_samples": len(test_rows), "device": str(accelerator.device),
                  "mixed_precision_resolved": accelerator.mixed_precision, "feature_cache": use_feature_cache,
                  "steps_per_epoch": steps_per_epoch, "output_dir": str(run_dir),
                  "cpu_threads": torch.get_num_threads(), "mean": list(mean), "std": list(std)}
    tracker.start(cfg.wandb_project, cfg.wandb_run_name or run_dir.name, run_config)
    state.wandb_run_id = tracker.run_id or state.wandb_run_id
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", run_config)
    console.print(f"{len(classes)} classes, {len(train_rows)} train / {len(test_rows)} test images; "
                  f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                  f"precision {accelerator.mixed_precision}; global batch {global_batch} "
                  f"({cfg.batch_size} per process), lr {lr:g}; run folder {run_dir}")

    # ---- evaluate before fine-tuning (the pretrained backbone with its new head)
    if state.baseline is None:
        state.baseline, outputs = evaluate(accelerator, model, test_batches, classes)
        log_evaluation(tracker, "baseline", state.baseline, outputs, test_images, classes, step=0)
        console.print(f"baseline: test loss {state.baseline['loss']:.4f}, accuracy {state.baseline['accuracy']:.2%}")

    # ---- fine-tune
    stop = StopRequest(run_dir)
    stop.install()
    try:
        outcome = fit(accelerator, model, optimizer, scheduler, train_batches, state, cfg, run_dir, classes,
                      tracker, console, stop)
    finally:
        stop.uninstall()
    if outcome != "finished":
        tracker.finish()
        if outcome == "stopped":
            console.print(f"stopped; continue with --resume auto --output-dir {run_dir}")
            return EXIT_STOPPED
        return 1

    # ---- evaluate after fine-tuning, save, report
    test_metrics, outputs = evaluate(accelerator, model, test_batches, classes)
    log_evaluation(tracker, "finetuned", test_metrics, outputs, test_images, classes, step=state.global_step)
    report = build_report(outputs, classes)  # from the gathered outputs: the same on every process
    test_metrics["per_class"] = report.per_class()
    state.finished = True
    state.best_accuracy = test_metrics["accuracy"]
    metrics = {
        "baseline": state.baseline, "test": test_metrics,
        "train": {"epoch_loss": state.epoch_losses, "images_per_second": state.train_images / max(state.train_seconds, 1e-9),
                  "seconds": state.train_seconds, "global_step": state.global_step, "global_batch_size": global_batch,
                  "lr": lr, "num_processes": accelerator.num_processes, "skipped_steps": state.skipped_steps},
        "features": feature_stats, "skipped_files": sorted(bad), "config": run_config}
    if accelerator.is_main_process:
        # metrics.json first: model/ is what marks the run finished, so a crash between the two
        # leaves a run that --resume auto completes rather than one without metrics.
        write_json(run_dir / "metrics.json", metrics)
        save_final_model(accelerator, model, run_dir, state, classes, run_config)
        write_report(report, run_dir, test_images, console.warn)
    accelerator.wait_for_everyone()
    log_report(tracker, report, run_dir, "finetuned", step=state.global_step)
    tracker.finish()
    print_summary(console, report, state.baseline, test_metrics, run_dir)
    return 0


def log_evaluation(tracker: Tracker, prefix: str, metrics: dict, outputs: dict, test_images: CachedImages,
                   classes: list[str], step: int) -> None:
    """Scalars under <prefix>/..., and one batch of test images with their predictions (the first 32 of
    the split, the same for every number of processes)."""
    scalars = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    tracker.log(scalars, step=step)
    n = min(32, len(outputs["labels"]))
    preds = outputs["logits"][:n].argmax(1).tolist()
    labels = outputs["labels"][:n].tolist()
    captions = [f"pred: {classes[p]} / label: {classes[y]}" for p, y in zip(preds, labels)]
    tracker.images(f"{prefix}/predictions", test_images.images(range(n)), captions, step=step)


def run_eval_only(cfg, accelerator, console, model, test_batches, test_images, classes, run_dir, ckpt) -> int:
    test_metrics, outputs = evaluate(accelerator, model, test_batches, classes)
    report = build_report(outputs, classes)
    test_metrics["per_class"] = report.per_class()
    baseline = None
    if accelerator.is_main_process:
        path = run_dir / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics["test"] = test_metrics
        metrics["eval_only"] = {"checkpoint": str(ckpt), "num_processes": accelerator.num_processes}
        write_json(path, metrics)
        write_report(report, run_dir, test_images, console.warn)
        baseline = metrics.get("baseline")  # the training run's, on the same split
    accelerator.wait_for_everyone()
    print_summary(console, report, baseline, test_metrics, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
