"""Fine-tune VGG16 on Caltech-101: `accelerate launch tl_dist/train.py [options]` or `python -m tl_dist.train`.

The article's workflow is the recipe `FineTune.run`, read top to bottom: set up (the run folder, the data
decoded once and split 80/20, the ImageNet network with a new last layer, SGD, the batches, W&B), evaluate
before fine-tuning, fine-tune, evaluate after it, save and report. `FineTune.evaluate_only` is --eval-only.
Everything a run writes goes to its run folder (run_dir.py), which it owns while it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, sys.path[0] is tl_dist/ itself, where our module names (config, data, ...) would
    # shadow other packages' modules. Import the package from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs,  # noqa: E402
                              GradientAccumulationPlugin, broadcast_object_list, gather_object, set_seed)

from tl_dist.checkpoint import (SAVE_STEPS, CheckpointError, TrainState, load_weights,  # noqa: E402
                                save_checkpoint, save_final_model)
from tl_dist.config import DEFAULT_DATA_DIR, Config, build_parser, parse_args  # noqa: E402
from tl_dist.console import RunConsole, end_process  # noqa: E402
from tl_dist.data import (CachedImages, DataError, GlobalBatchSampler, ImageCache,  # noqa: E402
                          ImageIndex, download_caltech101, find_image_root, index_images, keep_decodable,
                          Interrupted, make_loader, stop_on_signals, stratified_sample, stratified_split,
                          warn_untested_classes)
from tl_dist.engine import (Batches, LoopSettings, Outcome, StopRequest, TrainLog, evaluate,  # noqa: E402
                            extract_features, fit, stop_with_launcher)
from tl_dist.features import FeatureStore, StoredFeatures, weights_fingerprint  # noqa: E402
from tl_dist.launch_check import exit_if_unsupported_setup  # noqa: E402
from tl_dist.model import WeightsError, build_model, trainable_parameters  # noqa: E402
from tl_dist.report import build_report, log_report, print_summary, write_report  # noqa: E402
from tl_dist.resume import ResumePlan, plan_resume, run_dir_of, with_saved_options  # noqa: E402
from tl_dist.run_dir import RunDir, RunDirError, is_disk_full, read_json, write_json, write_text  # noqa: E402
from tl_dist.tracking import Tracker, resolve_mode, wandb_run  # noqa: E402

EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed on a signal or STOP file; run again with --resume auto
USER_ERRORS = (DataError, WeightsError, CheckpointError, RunDirError)


# ---------------------------------------------------------------- the process


def gradient_accumulation(cfg: Config) -> int:
    return cfg.gradient_accumulation_steps or int(os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1))


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
    # Gradient accumulation as a plugin, so that --gradient-accumulation-steps wins over Accelerate's
    # environment; the steps are counted by the loop's micro-batches, not by the (unprepared) train loader.
    accumulation = GradientAccumulationPlugin(num_steps=gradient_accumulation(cfg), sync_with_dataloader=False)
    return Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision, log_with=log_with,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
                       gradient_accumulation_plugin=accumulation,
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




# ---------------------------------------------------------------- data


def load_index(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: RunDir) -> tuple:
    """The image index and the split (train, validation and test rows): from the run's split.json when it
    has one (resume, --eval-only), else indexed from --data-dir (downloaded first when it is the default and
    missing) with the split still to be drawn (None)."""
    data_dir = Path(cfg.data_dir)
    if run_dir.split.is_file():
        split = read_json(run_dir.split)
        root = find_image_root(data_dir) if data_dir.is_dir() else data_dir
        parts = [split["train"], split.get("val", []), split["test"]]
        # In the order index_images gives (class folder, then path), so that the decoded-image cache of the
        # run's first session, and the features computed from it, are found again instead of rebuilt.
        files = sorted((f for part in parts for f in part), key=lambda f: (f.split("/", 1)[0], f))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise DataError(f"{len(missing)} file(s) of this run's split are not in --data-dir "
                            f"{data_dir} (first: {missing[0]}). Pass the --data-dir the run was trained on.")
        classes = split["classes"]
        labels = [classes.index(f.split("/", 1)[0]) for f in files]
        row = {f: i for i, f in enumerate(files)}
        return ImageIndex(root, files, labels, classes), [[row[f] for f in part] for part in parts]
    if cfg.data_dir == DEFAULT_DATA_DIR and not data_dir.exists():
        with accelerator.local_main_process_first():  # one download per node; the others wait, then see it
            if not data_dir.exists():
                console.print(f"downloading Caltech-101 into {data_dir} ...")
                source = download_caltech101(data_dir)
                console.print(f"downloaded Caltech-101 from {source}")
    index = index_images(data_dir, warn=console.warn)
    if cfg.max_samples:
        index = index.subset(stratified_sample(index.labels, cfg.max_samples, cfg.seed))
    return index, None


@dataclass(frozen=True)
class CacheGroup:
    """The processes that see the same --cache-dir folder: all of them when the nodes share it, each
    node's own when every node has its own disk at that path. In each group one process writes a cache
    file (the first, `writer`) and the group's processes decode their share of it (`rank` of `size`)."""
    ranks: tuple[int, ...]  # global process indices, ascending
    process: int

    @property
    def writer(self) -> bool:
        return self.process == self.ranks[0]

    @property
    def rank(self) -> int:
        return self.ranks.index(self.process)

    @property
    def size(self) -> int:
        return len(self.ranks)


def cache_group(accelerator: Accelerator, cache_dir: Path) -> CacheGroup:
    """Found by looking: every process creates a file named after its index in the cache folder, then
    lists which processes' files it sees. Two processes share a cache file only when each sees the
    other's; if a network file system's late view makes those answers disagree, each node uses its own
    group (correct, only slower: a shared folder then gets identical copies, renamed into place)."""
    if accelerator.num_processes == 1:
        return CacheGroup((0,), 0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    token = broadcast_object_list([os.urandom(8).hex()])[0]
    probe = cache_dir / f".probe-{token}-{accelerator.process_index}"
    everyone = range(accelerator.num_processes)
    try:
        probe.touch()
        accelerator.wait_for_everyone()
        sees = gather_object([[i for i in everyone if (cache_dir / f".probe-{token}-{i}").exists()]])
        node = gather_object([accelerator.process_index - accelerator.local_process_index])
        accelerator.wait_for_everyone()
    finally:
        probe.unlink(missing_ok=True)
    return CacheGroup(sharing_groups(sees, node)[accelerator.process_index], accelerator.process_index)


def sharing_groups(sees: list[list[int]], node: list[int]) -> list[tuple[int, ...]]:
    """Each process's group, from which probes each process saw (`sees`) and its node: those it sees
    and that see it; if that is not one partition of the processes, the processes of its node."""
    everyone = range(len(sees))
    groups = [tuple(j for j in sees[i] if i in sees[j]) for i in everyone]
    if any(groups[j] != groups[i] for i in everyone for j in groups[i]):
        groups = [tuple(j for j in everyone if node[j] == node[i]) for i in everyone]
    return groups


def build_image_cache(cfg: Config, accelerator: Accelerator, console: RunConsole, index: ImageIndex,
                      threads: int) -> tuple[Path, dict[str, str], CacheGroup]:
    """Decode every image once into the cache (this is also the verify pass), sharded over the processes
    of each cache group. Returns the cache file, {file: why} for the files that could not be decoded, and
    this process's cache group."""
    cache_dir, data_dir = Path(cfg.cache_dir).resolve(), index.root.resolve()
    if cache_dir == data_dir or data_dir in cache_dir.parents:
        raise DataError(f"--cache-dir {cfg.cache_dir} is inside --data-dir; choose a folder outside it.")
    group = cache_group(accelerator, cache_dir)
    if group.size < accelerator.num_processes:
        console.print(f"--cache-dir {cfg.cache_dir} is not shared between the nodes: each node builds or reads "
                      f"its own copy of the caches")
    cache = ImageCache(cache_dir, index, cfg.image_size)
    # Ctrl-C or SIGTERM: the writer removes the temp file it created, then main() exits 75.
    with stop_on_signals("decoding images"), cache.building(group.writer, console.print) as tmp:
        tmps = gather_object([tmp])  # each group's writer's temp file, or None where its cache is complete
        tmp = tmps[group.ranks[0]]
        if any(t is not None for t in tmps):
            bad = {}
            if tmp is None:  # only other nodes, each with its own --cache-dir disk, lack the decoded images
                console.print(f"waiting for the nodes whose --cache-dir lacks {cache.array_path.name} to decode it")
            else:
                console.print(f"decoding {len(index)} images once into {cache.array_path} ...")
                rows = range(group.rank, len(index), group.size)
                # The main process shows its own shard's progress scaled to all images (shards differ by <= 1).
                with console.phase("decoding", len(index)) as progress:
                    bad = cache.fill(tmp, rows, threads,
                                     lambda done: progress.update(done * len(index) // len(rows)))
            merged = {row: why for part in gather_object([bad]) for row, why in part.items()}
            if tmp is not None and group.writer:
                cache.publish(tmp, merged)
            accelerator.wait_for_everyone()
    return cache.array_path, cache.bad_files(), group


@dataclass
class PreparedData:
    """The indexed images, decoded once into the cache, and the split of the ones that decoded."""
    index: ImageIndex
    array_path: Path  # the decoded-image cache, one row per index file
    bad: dict[str, str]  # files that could not be decoded, and why
    cache_group: CacheGroup  # the processes that see the same --cache-dir
    train_rows: list[int]
    val_rows: list[int]  # empty without --val-fraction
    test_rows: list[int]

    def images(self, rows: list[int]) -> CachedImages:
        return CachedImages(self.array_path, rows, [self.index.labels[r] for r in rows])


def prepare_data(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: RunDir,
                 threads: int) -> PreparedData:
    """Index (or read the run's split), decode every image once into the cache (the verify pass), and
    split the files that decoded."""
    index, rows = load_index(cfg, accelerator, console, run_dir)
    array_path, bad, group = build_image_cache(cfg, accelerator, console, index, threads)
    if bad:
        console.warn(f"warning: skipped {len(bad)} file(s) that cannot be decoded (all listed in "
                     f"{run_dir.skipped}): " + ", ".join(f"{f} ({why})" for f, why in list(bad.items())[:10])
                     + (" ..." if len(bad) > 10 else ""))
    if rows is None:  # a new split, over the files that decoded
        index, good = keep_decodable(index, bad, console.warn)
        rows = split_rows(cfg, index, good)
        warn_untested_classes(index.classes, [index.labels[r] for r in rows[2]], console.warn)
    elif any(index.files[r] in bad for part in rows for r in part):
        raise DataError(f"files of this run's split can no longer be decoded (listed above); restore them in "
                        f"--data-dir {cfg.data_dir}, or start a new run in another --output-dir.")
    return PreparedData(index, array_path, bad, group, *rows)


def split_rows(cfg: Config, index: ImageIndex, rows: list[int]) -> list[list[int]]:
    """Train, validation and test rows: the test split per class from all rows, then the validation split
    per class from what is left (another draw of the same seed's generator family)."""
    train_pos, test_pos = stratified_split([index.labels[r] for r in rows], cfg.test_fraction, cfg.seed)
    train, test = [rows[p] for p in train_pos], [rows[p] for p in test_pos]
    if not cfg.val_fraction:
        return [train, [], test]
    keep_pos, val_pos = stratified_split([index.labels[r] for r in train], cfg.val_fraction, cfg.seed + 2)
    return [[train[p] for p in keep_pos], [train[p] for p in val_pos], test]


def image_batches(cfg: Config, accelerator: Accelerator, images: CachedImages, model, sampler=None) -> Batches:
    """uint8 images from the cache, normalised on the device as `model`'s weights expect: the training
    batches (our sampler) or evaluation batches (sequential, sharded by Accelerate's `prepare`)."""
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers >= 0 else (min(8, torch.get_num_threads()) if on_gpu else 0)
    loader = make_loader(images, sampler, batch_size=cfg.batch_size, num_workers=workers, pin_memory=on_gpu)
    net = accelerator.unwrap_model(model)
    return Batches(loader if sampler is not None else accelerator.prepare(loader), False, cfg.channels_last,
                   mean=net.mean, std=net.std)


def build_feature_store(cfg: Config, accelerator: Accelerator, console: RunConsole, model,
                        data: PreparedData) -> tuple[FeatureStore, float | None]:
    """The frozen backbone's pooled features of every image of the split, on disk under --cache-dir. The
    backbone's output never changes, so it runs once per image (not once per image and epoch: >99% of
    VGG16's work), and not at all when a run with the same images, network, weights and precision ran it
    before. Returns the store and the seconds the backbone took (None: reused)."""
    store = FeatureStore(cfg.cache_dir, {
        "images": data.array_path.name, "model": cfg.model, "weights": weights_fingerprint(cfg.model, cfg.weights,
                                                                                             cfg.seed),
        "image_size": cfg.image_size, "precision": accelerator.mixed_precision, "channels_last": cfg.channels_last})
    lock = store.locked(console.print) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:  # held by the main process: of several runs that need these features, one computes them
        writes = data.cache_group.writer and not store.complete()
        missing = any(gather_object([writes]))
        seconds = compute_features(cfg, accelerator, console, model, data, store, writes) if missing else None
        accelerator.wait_for_everyone()
    if seconds is None:
        store.touch()
        console.print(f"features: reused {store.array_path} ({store.meta()['rows']} rows)")
    return store, seconds


def compute_features(cfg: Config, accelerator: Accelerator, console: RunConsole, model, data: PreparedData,
                     store: FeatureStore, writes: bool) -> float:
    """Every process computes its shard; the writer of each cache group that lacks the file (`writes`)
    puts the gathered rows into its temporary file, then puts it in place. Returns the seconds it took."""
    rows = np.array(sorted(data.train_rows + data.val_rows + data.test_rows))
    array, dtype = None, None

    def write(positions: torch.Tensor, features: torch.Tensor) -> None:
        nonlocal array, dtype
        if not writes:
            return
        if array is None:
            array, dtype = store.create(len(data.index), features.shape[1], features.dtype), features.dtype
        bits = features.cpu()
        bits = bits.view(torch.int16).numpy().view(np.uint16) if bits.dtype == torch.bfloat16 else bits.numpy()
        array[rows[positions.cpu().numpy()]] = bits

    tic = time.perf_counter()
    try:
        with stop_on_signals("computing backbone features"):  # nothing to save yet: main() exits 75
            images = image_batches(cfg, accelerator, data.images(rows.tolist()), model)
            extract_features(accelerator, model, images, write, console, "features")
        seconds = time.perf_counter() - tic
        if array is not None:
            store.publish(array, dtype, seconds)
    except BaseException:
        store.discard()
        raise
    console.print(f"backbone features of {len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:,.0f} "
                  f"images/s), saved in {store.array_path}")
    return seconds


def feature_batches(cfg: Config, accelerator: Accelerator, store: FeatureStore, images: CachedImages,
                    sampler=None) -> Batches:
    """Batches of stored features for the classifier: the training batches (our sampler) or evaluation
    batches (sharded by Accelerate's `prepare`)."""
    loader = make_loader(StoredFeatures(store, images.rows, images.labels.tolist()), sampler,
                         batch_size=cfg.batch_size)
    return Batches(loader if sampler is not None else accelerator.prepare(loader), pooled=True)


# ---------------------------------------------------------------- the network and the optimizer


def build_network(cfg: Config, num_classes: int, from_checkpoint: bool = False) -> torch.nn.Module:
    """The network with its new head, in channels_last and compiled when asked. --weights imagenet or NAME
    is downloaded (call under `local_main_process_first()`), unless a checkpoint brings the weights."""
    set_seed(cfg.seed)  # the same new head on every process
    model = build_model(cfg.model, num_classes, cfg.weights, cfg.freeze, cfg.dropout, image_size=cfg.image_size,
                        from_checkpoint=from_checkpoint)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.embed = torch.compile(model.embed)
    return model


def build_optimizer(cfg: Config, accelerator: Accelerator, model, total_steps: int):
    """SGD over the trainable parameters (the classifier, with the article's frozen features) and the
    learning-rate schedule. Returns (optimizer, scheduler, lr)."""
    lr = cfg.lr * (accelerator.num_processes if cfg.scale_lr else 1)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=lr, momentum=cfg.momentum,
                                fused=True if fused_sgd_available(accelerator.device) else None)
    schedule = (lambda s: 1.0) if cfg.lr_schedule == "constant" else \
        (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), lr


# ---------------------------------------------------------------- the recipe


class FineTune:
    """The article's recipe on any number of processes: setup, evaluate the baseline, fine-tune, evaluate,
    save and report, clean up. Every process runs every method; Accelerate and the run folder's rules
    decide who writes what."""

    def __init__(self, cfg: Config, saved: dict | None, accelerator: Accelerator, console: RunConsole,
                 wandb_mode: str):
        self.cfg, self.saved, self.accelerator, self.console = cfg, saved, accelerator, console
        self.wandb_mode = wandb_mode
        self.run_dir = RunDir(self._run_dir_name())
        self.tracker = Tracker(accelerator, self.run_dir, "disabled")

    def run(self) -> int:
        plan = self._setup()
        if plan.finished:
            self.console.print(plan.finished)
            return 0
        if self.state.baseline is None:
            self.state.baseline = self._evaluate("baseline", step=0)
        outcome = self._train()
        if outcome is not Outcome.FINISHED:
            self.tracker.finish()
        if outcome is Outcome.STOPPED:
            self.console.print(f"stopped; continue with --resume auto --output-dir {self.run_dir}")
            return EXIT_STOPPED
        if outcome is Outcome.DIVERGED:
            return 1
        self._evaluate_save_report()
        return 0

    def evaluate_only(self) -> int:
        """--eval-only: evaluate a saved model on the run's split. It only reads the run; its results go to
        eval/<model>/ in the run folder, so a finished run's metrics and report stay as they are."""
        plan = self._plan_resume()
        self.data = prepare_data(self.cfg, self.accelerator, self.console, self.run_dir, self._threads())
        self.model = self._build_model(plan)
        load_weights(self.model, plan.checkpoint)
        self.model = self.accelerator.prepare(self.model)
        self.test_images = self.data.images(self.data.test_rows)
        self.test_batches = image_batches(self.cfg, self.accelerator, self.test_images, self.model)
        metrics, outputs = evaluate(self.accelerator, self.model, self.test_batches, self.data.index.classes,
                                   self.console)
        report = build_report(outputs, self.data.index.classes)
        metrics["per_class"] = report.per_class()
        folder = self.run_dir.eval_dir(plan.checkpoint)
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / self.run_dir.metrics.name, {"test": metrics, "eval_only": {
                "checkpoint": str(plan.checkpoint), "num_processes": self.accelerator.num_processes}})
            write_report(report, folder, self.test_images, self._test_files(), self.console.warn)
        self.accelerator.wait_for_everyone()
        baseline = read_json(self.run_dir.metrics).get("baseline") if self.run_dir.metrics.is_file() else None
        print_summary(self.console, report, baseline, metrics, folder)
        return 0

    def cleanup(self) -> None:
        self.console.stop_progress()
        self.run_dir.abandon()  # unlocks; removes only what a run that never started created

    # ---- setup
    def _setup(self) -> ResumePlan:
        self._claim_run_dir()
        plan = self._plan_resume()
        if plan.finished:
            return plan
        if plan.note:
            self.console.print(plan.note)
        self.data = prepare_data(self.cfg, self.accelerator, self.console, self.run_dir, self._threads())
        self.model = self._build_model(plan)
        self._write_run_start()  # the data and the weights are known to be good: the run starts here
        self._setup_optimizer()
        self._setup_batches()
        self.state = plan.state or TrainState()
        if plan.checkpoint is not None:
            self.accelerator.load_state(str(plan.checkpoint))  # model, optimizer, scheduler, every RNG
            self.console.print(f"resumed from {plan.checkpoint} at epoch {self.state.epoch + 1}, step "
                               f"{self.state.global_step}")
        self._setup_tracking()
        return plan

    def _plan_resume(self) -> ResumePlan:
        """What a --resume continues or evaluates; the options adjusted to it (the per-process batch)."""
        plan, self.cfg = plan_resume(self.cfg, self.saved, self.run_dir, self.accelerator.num_processes,
                                     gradient_accumulation(self.cfg), self.accelerator.mixed_precision,
                                     self.console.warn)
        return plan

    def _run_dir_name(self) -> str:
        """--output-dir (or the folder of --resume PATH), else runs/<date-time> chosen by the main process."""
        folder = run_dir_of(self.cfg)
        if folder is not None:
            return str(folder)
        return broadcast_object_list([datetime.datetime.now().strftime("runs/%Y-%m-%d_%H-%M-%S")])[0]

    def _claim_run_dir(self) -> None:
        """The main process locks the run folder and checks that a new run does not reuse one; every
        process hears the outcome."""
        error = None
        if self.accelerator.is_main_process:
            try:
                self.run_dir.claim(resume=self.cfg.resume is not None)
            except RunDirError as exc:
                error = str(exc)
        error = broadcast_object_list([error])[0]
        if error:
            raise RunDirError(error)

    def _threads(self) -> int:
        return configure_threads(self.cfg, self.accelerator)

    def _build_model(self, plan: ResumePlan):
        with self.accelerator.local_main_process_first():  # one download of the ImageNet weights per node
            return build_network(self.cfg, len(self.data.index.classes), from_checkpoint=plan.checkpoint is not None)

    def _write_run_start(self) -> None:
        data, run_dir = self.data, self.run_dir
        if self.accelerator.is_main_process:
            run_dir.record_owner()
            if not run_dir.split.is_file():
                files = lambda rows: [data.index.files[r] for r in rows]  # noqa: E731
                split = {"classes": data.index.classes, "seed": self.cfg.seed, "test_fraction": self.cfg.test_fraction,
                         "train": files(data.train_rows), "test": files(data.test_rows)}
                if data.val_rows:
                    split.update(val_fraction=self.cfg.val_fraction, val=files(data.val_rows))
                write_json(run_dir.split, split)
            if data.bad:
                write_text(run_dir.skipped, "".join(f"{f}\t{why}\n" for f, why in data.bad.items()))
        self.accelerator.wait_for_everyone()

    def _setup_optimizer(self) -> None:
        """The global batches (the same for any number of processes), SGD and its schedule."""
        cfg, accelerator = self.cfg, self.accelerator
        self.sampler = GlobalBatchSampler(len(self.data.train_rows), cfg.batch_size, accelerator.num_processes,
                                          accelerator.process_index, cfg.seed, gradient_accumulation(cfg))
        self.settings = LoopSettings(cfg.epochs, cfg.max_steps, cfg.checkpoint_every_epochs,
                                     cfg.checkpoint_every_steps, cfg.max_skipped_steps, cfg.log_every)
        optimizer, scheduler, self.lr = build_optimizer(cfg, accelerator, self.model,
                                                        self.settings.total_steps(self.sampler.steps_per_epoch))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(self.model, optimizer, scheduler)

    def _setup_batches(self) -> None:
        """Training and test batches: cached images, or (frozen backbone) its features, computed once."""
        cfg, accelerator, data = self.cfg, self.accelerator, self.data
        self.train_images, self.test_images = data.images(data.train_rows), data.images(data.test_rows)
        val_images = data.images(data.val_rows) if data.val_rows else None
        self.feature_cache = cfg.cache_features == "on" or (cfg.cache_features == "auto" and cfg.freeze == "features")
        self.feature_seconds, self.feature_store, self.val_batches = None, None, None
        if not self.feature_cache:
            self.train_batches = image_batches(cfg, accelerator, self.train_images, self.model, self.sampler)
            self.test_batches = image_batches(cfg, accelerator, self.test_images, self.model)
            self.val_batches = val_images and image_batches(cfg, accelerator, val_images, self.model)
            return
        store, self.feature_seconds = build_feature_store(cfg, accelerator, self.console, self.model, data)
        self.feature_store = store.array_path
        self.train_batches = feature_batches(cfg, accelerator, store, self.train_images, self.sampler)
        self.test_batches = feature_batches(cfg, accelerator, store, self.test_images)
        self.val_batches = val_images and feature_batches(cfg, accelerator, store, val_images)

    def _setup_tracking(self) -> None:
        cfg, accelerator, data = self.cfg, self.accelerator, self.data
        self.tracker = Tracker(accelerator, self.run_dir, self.wandb_mode)
        self.run_config = {
            **cfg.to_dict(), "num_processes": accelerator.num_processes,
            "gradient_accumulation_resolved": gradient_accumulation(cfg),
            "global_batch_size": self.sampler.global_batch, "effective_lr": self.lr,
            "num_classes": len(data.index.classes), "train_samples": len(data.train_rows),
            "val_samples": len(data.val_rows),
            "test_samples": len(data.test_rows), "device": str(accelerator.device),
            "mixed_precision_resolved": accelerator.mixed_precision, "feature_cache": self.feature_cache,
            "steps_per_epoch": self.sampler.steps_per_epoch, "output_dir_resolved": str(self.run_dir),
            "cpu_threads": torch.get_num_threads(), "mean": list(accelerator.unwrap_model(self.model).mean),
            "std": list(accelerator.unwrap_model(self.model).std)}
        self.tracker.start(wandb_run(cfg, default_name=self.run_dir.path.name), self.run_config)
        if accelerator.is_main_process:
            write_json(self.run_dir.config, self.run_config)
        self.console.print(
            f"{len(data.index.classes)} classes, {len(data.train_rows)} train / "
            + (f"{len(data.val_rows)} validation / " if data.val_rows else "") + f"{len(data.test_rows)} test images; "
            f"{accelerator.num_processes} process(es) on {accelerator.device}, "
            f"precision {accelerator.mixed_precision}; "
            f"global batch {self.sampler.global_batch} ({cfg.batch_size} per process"
            + (f" x {gradient_accumulation(cfg)} accumulation steps" if gradient_accumulation(cfg) > 1 else "")
            + f"), lr {self.lr:g}; run folder {self.run_dir}")

    # ---- the steps
    def _evaluate(self, prefix: str, step: int) -> dict:
        """Exact test metrics, logged under prefix/ with a grid of predictions (the first 32 test images,
        the same for every number of processes)."""
        classes = self.data.index.classes
        metrics, self.outputs = evaluate(self.accelerator, self.model, self.test_batches, classes, self.console)
        self.tracker.log({f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        n = min(32, len(self.outputs["labels"]))
        preds, labels = self.outputs["logits"][:n].argmax(1).tolist(), self.outputs["labels"][:n].tolist()
        captions = [f"pred: {classes[p]} / label: {classes[y]}" for p, y in zip(preds, labels)]
        self.tracker.images(f"{prefix}/predictions", self.test_images.images(range(n)), captions, step=step)
        self.console.print(f"{prefix}: test loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.2%}")
        return metrics

    def _train(self) -> Outcome:
        stop = StopRequest(self.run_dir.stop_file)
        stop.install()
        try:
            return fit(self.accelerator, self.model, self.optimizer, self.scheduler, self.train_batches, self.state,
                       self.settings, self._save_checkpoint, stop, TrainLog(self.tracker, self.console, self.settings),
                       validate=self._validate if self.val_batches else None)
        finally:
            stop.uninstall()

    def _validate(self, state: TrainState) -> None:
        """After each epoch: exact loss, accuracy and top-5 on the validation split, logged as val/* and kept
        in the train state (so a resumed run has the whole history). The test split chooses nothing."""
        metrics, _ = evaluate(self.accelerator, self.model, self.val_batches, self.data.index.classes, self.console)
        scores = {k: metrics[k] for k in ("loss", "accuracy", "top5_accuracy")}
        state.val_history.append({"epoch": state.epoch, "global_step": state.global_step, **scores})
        self.tracker.log({f"val/{k}": v for k, v in scores.items()}, step=state.global_step)
        self.console.print(f"epoch {state.epoch}: validation loss {scores['loss']:.4f}, accuracy "
                           f"{scores['accuracy']:.2%}")

    def _save_checkpoint(self) -> None:
        with self.console.phase("saving checkpoint", SAVE_STEPS, unit="steps") as progress:
            folder = save_checkpoint(self.accelerator, self.run_dir, self.state, self.data.index.classes,
                                     self.cfg.keep_checkpoints, on_step=progress.advance)
        self.console.print(f"checkpoint: {folder}")

    def _evaluate_save_report(self) -> None:
        """Evaluate the fine-tuned model; then metrics.json, model/ (what marks the run finished) and the
        report, on the main process; then W&B and the summary."""
        test_metrics = self._evaluate("finetuned", step=self.state.global_step)
        report = build_report(self.outputs, self.data.index.classes)  # the same on every process
        test_metrics["per_class"] = report.per_class()
        self.state.finished = True
        metrics = {"baseline": self.state.baseline, "test": test_metrics, "train": self._train_numbers(),
                   "features": self._feature_numbers(),
                   "skipped_files": sorted(self.data.bad), "config": self.run_config}
        if self.state.val_history:  # the last epoch's numbers, and every epoch's
            metrics["val"] = {**self.state.val_history[-1], "history": self.state.val_history}
        if self.accelerator.is_main_process:
            # metrics.json first: model/ is what marks the run finished, so a crash between the two
            # leaves a run that --resume auto completes rather than one without metrics.
            write_json(self.run_dir.metrics, metrics)
            # The model is written in a thread (safetensors and hashing release the GIL) while this one
            # draws the report's pictures: about 1.5 s less per VGG16 run on 2 cores.
            with ThreadPoolExecutor(1) as pool:
                saving = pool.submit(save_final_model, self.accelerator, self.model, self.run_dir, self.state,
                                     self.data.index.classes, self.run_config)
                write_report(report, self.run_dir.path, self.test_images, self._test_files(), self.console.warn)
                saving.result()
        self.accelerator.wait_for_everyone()
        log_report(self.tracker, report, self.run_dir.path, "finetuned", step=self.state.global_step)
        if self.cfg.wandb_log_model:
            self.tracker.log_model(self.run_dir.final_model, test_metrics)
        self.tracker.finish()
        print_summary(self.console, report, self.state.baseline, test_metrics, self.run_dir.path)

    def _train_numbers(self) -> dict:
        state = self.state
        return {"epoch_loss": state.epoch_losses,
                "images_per_second": state.train_images / max(state.train_seconds, 1e-9),
                "seconds": state.train_seconds, "global_step": state.global_step,
                "global_batch_size": self.sampler.global_batch, "lr": self.lr,
                "num_processes": self.accelerator.num_processes, "skipped_steps": state.skipped_steps}

    def _feature_numbers(self) -> dict | None:
        if self.feature_store is None:
            return None
        images = len(self.data.train_rows) + len(self.data.val_rows) + len(self.data.test_rows)
        seconds = self.feature_seconds
        return {"path": str(self.feature_store), "reused": seconds is None, "seconds": seconds,
                "images_per_second": images / seconds if seconds else None}

    def _test_files(self) -> list[str]:
        return [self.data.index.files[r] for r in self.data.test_rows]


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    exit_if_unsupported_setup()  # DeepSpeed, FSDP, Megatron-LM, XLA: refused before anything is written
    try:
        cfg, saved = with_saved_options(parse_args(argv))  # a resume: the run's own options
    except RunDirError as exc:
        _error(None, str(exc))
        return 1
    wandb_mode, wandb_note = resolve_mode(cfg.wandb_mode)
    tracking = wandb_mode != "disabled" and not cfg.eval_only
    if tracking and importlib.util.find_spec("wandb") is None:
        build_parser().error(f"argument --wandb-mode: W&B logging ({wandb_mode}) needs wandb: pip install "
                             "wandb, or pass --wandb-mode disabled")
    console = recipe = None
    try:
        stop_with_launcher()
        accelerator = build_accelerator(cfg, "wandb" if tracking else None)
        console = RunConsole(accelerator.is_main_process)
        if wandb_note and tracking and accelerator.is_main_process:
            console.print(f"W&B: {wandb_note}; sync later with `wandb sync "
                          f"{os.environ.get('WANDB_DIR') or run_dir_of(cfg) or 'runs/<run>'}/wandb/offline-run-*`")
        recipe = FineTune(cfg, saved, accelerator, console, wandb_mode if tracking else "disabled")
        return recipe.evaluate_only() if cfg.eval_only else recipe.run()
    except USER_ERRORS as exc:
        _error(console, str(exc))
        return 1
    except Interrupted as exc:  # in a phase with nothing to checkpoint: what it wrote is removed
        resume = " with --resume auto" if cfg.output_dir and cfg.resume is None else ""
        (console or RunConsole(True)).print(f"stopped by {exc}; no partial file is left. To continue, run the same "
                                            f"command{resume} again.")
        return EXIT_STOPPED
    except Exception as exc:
        folder = recipe.run_dir if recipe is not None else None
        if folder is None or not is_disk_full(exc, folder.path):
            raise
        _error(console, f"the disk is full: a write in {folder} failed for lack of space; nothing partial was "
                        f"kept. The last complete checkpoint is {folder.latest() or 'none'}. Free some space, "
                        "then run again with --resume auto.")
        return 1
    finally:
        if recipe is not None:
            recipe.cleanup()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo can abort the process at exit


def _error(console: RunConsole | None, message: str) -> None:
    (console or RunConsole(True)).error(message)


def cli() -> None:
    """The command line: `python -m tl_dist.train`, `accelerate launch tl_dist/train.py`, `tl-dist-train`."""
    end_process(main())


if __name__ == "__main__":
    cli()
