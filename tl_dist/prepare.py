"""Data across processes: the index (or the run's saved split), the decoded-image cache built once per
cache group, the split, the frozen backbone's features on disk, and the batches the loop reads.

data.py and features.py are the plain parts (one process, no Accelerate); this module decides which process
does what: one download per node, one writer per cache file, every process decoding and computing its share,
everyone waiting for the file to be in place.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from tl_dist.augment import AugmentOptions, TrainingInputs
from tl_dist.config import DEFAULT_DATA_DIR, Config
from tl_dist.console import RunConsole
from tl_dist.data import (CachedImages, DataError, ImageCache, ImageIndex, Resize, download_caltech101,
                          find_image_root, index_images, keep_decodable, make_loader, original_sizes,
                          stratified_sample, stratified_split, warn_untested_classes)
from tl_dist.engine import Batches, extract_features
from tl_dist.features import FeatureStore, StoredFeatures, weights_fingerprint
from tl_dist.model import eval_resize as weights_eval_resize
from tl_dist.run_dir import DamagedFileError, RunDir, RunDirError, read_json
from tl_dist.runtime import stop_on_signals, together


def load_index(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: RunDir) -> tuple:
    """The image index and the split (train, validation and test rows): from the run's split.json when it
    has one (resume, --eval-only), else indexed from --data-dir (downloaded first when it is the default and
    missing) with the split still to be drawn (None)."""
    data_dir = Path(cfg.data_dir)
    if run_dir.split.is_file():
        try:
            split = read_json(run_dir.split)
        except DamagedFileError as exc:
            raise RunDirError(f"{exc}: the run's split is lost. Restore it, or continue the run from one of its "
                              "checkpoints in another --output-dir (--resume PATH: the split is drawn again "
                              "from --data-dir with the run's options).") from None
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


def eval_resize(cfg: Config) -> Resize:
    """How evaluation (and training without augmentation) resizes the images: --eval-resize."""
    return weights_eval_resize(cfg.model, cfg.weights, cfg.image_size, cfg.eval_resize)


def build_image_cache(cfg: Config, accelerator: Accelerator, console: RunConsole, index: ImageIndex,
                      threads: int, resize: Resize | None = None) -> tuple[Path, dict[str, str], CacheGroup]:
    """Decode every image once into the cache (this is also the verify pass), sharded over the processes
    of each cache group, resized as `resize` says (default: as evaluation sees the images). Returns the cache
    file, {file: why} for the files that could not be decoded, and this process's cache group."""
    cache_dir = Path(cfg.cache_dir).resolve()
    group = cache_group(accelerator, cache_dir)
    if group.size < accelerator.num_processes:
        console.print(f"--cache-dir {cfg.cache_dir} is not shared between the nodes: each node builds or reads "
                      f"its own copy of the caches")
    cache = ImageCache(cache_dir, index, resize or eval_resize(cfg))
    # Ctrl-C or SIGTERM: the writer removes the temp file it created, then main() exits 75.
    with stop_on_signals("decoding images"):
        # each group's writer's temp file, or None where its cache is there and undamaged
        tmps = together(lambda: cache.start(group.writer, console.print, console.warn), cache_dir)
        if any(t is not None for t in tmps):
            try:
                _decode(console, cache, group, tmps[group.ranks[0]], threads)
            except BaseException:
                cache.discard()
                raise
    return cache.array_path, cache.bad_files(), group


def _decode(console: RunConsole, cache: ImageCache, group: CacheGroup, tmp: Path | None, threads: int) -> None:
    """Every process of a group that lacks the cache decodes its share into the group writer's temp file
    `tmp`; the writer puts it in place."""
    index, decoded = cache.index, ({}, {})
    if tmp is None:  # only other nodes, each with its own --cache-dir disk, lack the decoded images
        console.print(f"waiting for the nodes whose --cache-dir lacks {cache.array_path.name} to decode it")
    else:
        console.print(f"decoding {len(index)} images once into {cache.array_path} ...")
        rows = range(group.rank, len(index), group.size)
        # The main process shows its own shard's progress scaled to all images (shards differ by <= 1).
        with console.phase("decoding", len(index)) as progress:
            decoded = cache.fill(tmp, rows, threads, lambda done: progress.update(done * len(index) // len(rows)))
    parts = gather_object([decoded])
    bad, sizes = ({row: v for part in parts for row, v in part[k].items()} for k in (0, 1))
    together(lambda: cache.publish(tmp, bad, sizes) if tmp is not None and group.writer else None, cache.dir)


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
    crop_cache: Path | None = None  # the images random crops are cut from (an --augment policy), else None
    crop_sizes: np.ndarray | None = None  # per index row, the (width, height) crop boxes are drawn in

    def images(self, rows: list[int]) -> CachedImages:
        """The images as evaluation sees them."""
        return CachedImages(self.array_path, rows, [self.index.labels[r] for r in rows])

    def crop_sources(self, rows: list[int]) -> CachedImages:
        return CachedImages(self.crop_cache, rows, [self.index.labels[r] for r in rows])

    def files(self, rows: list[int]) -> list[str]:
        return [self.index.files[r] for r in rows]

    def test_files(self) -> list[str]:
        return self.files(self.test_rows)

    def split_record(self, cfg: Config) -> dict:
        """What the run's split.json holds: the classes and each split's files, with what drew them."""
        split = {"classes": self.index.classes, "seed": cfg.seed, "test_fraction": cfg.test_fraction,
                 "train": self.files(self.train_rows), "test": self.files(self.test_rows)}
        if self.val_rows:
            split.update(val_fraction=cfg.val_fraction, val=self.files(self.val_rows))
        return split


def prepare_data(cfg: Config, accelerator: Accelerator, console: RunConsole, run_dir: RunDir,
                 threads: int) -> PreparedData:
    """Index (or read the run's split), decode every image once into the cache (the verify pass), and
    split the files that decoded."""
    index, rows = load_index(cfg, accelerator, console, run_dir)
    array_path, bad, group = build_image_cache(cfg, accelerator, console, index, threads)
    crops = (build_crop_cache(cfg, accelerator, console, index, threads, array_path)
             if AugmentOptions.from_config(cfg).crops else (None, None))
    if rows is None:  # a new split, over the files that decoded
        index, good = keep_decodable(index, bad, console.warn)
        rows = split_rows(cfg, index, good)
        check_split(cfg, index, rows, console.warn)
    elif lost := [f"{index.files[r]} ({bad[index.files[r]]})" for part in rows for r in part if index.files[r] in bad]:
        raise DataError(f"{len(lost)} file(s) of this run's split can no longer be decoded (first: "
                        f"{', '.join(lost[:3])}); restore them in --data-dir {cfg.data_dir}, or start a new run in "
                        "another --output-dir.")
    return PreparedData(index, array_path, bad, group, *rows, *crops)


def build_crop_cache(cfg: Config, accelerator: Accelerator, console: RunConsole, index: ImageIndex, threads: int,
                     eval_cache: Path) -> tuple[Path, np.ndarray]:
    """What random crops are cut from: every image squashed to --cache-size (default: --image-size), so a
    larger cache keeps the crops' detail; and, per image, the (width, height) the boxes are drawn in, as
    RandomResizedCrop draws them on the image evaluation sees: its own shape when --eval-resize keeps it (the
    cached square is stretched back to it), the square when evaluation squashes too."""
    source = Resize(cfg.cache_size or cfg.image_size)
    path = eval_cache if source == eval_resize(cfg) else build_image_cache(cfg, accelerator, console, index,
                                                                          threads, source)[0]
    sizes = original_sizes(path) if eval_resize(cfg).shorter else np.full((len(index), 2), source.size)
    return path, sizes


def split_rows(cfg: Config, index: ImageIndex, rows: list[int]) -> list[list[int]]:
    """Train, validation and test rows: the test split per class from all rows, then the validation split
    per class from what is left (another draw of the same seed's generator family)."""
    train_pos, test_pos = stratified_split([index.labels[r] for r in rows], cfg.test_fraction, cfg.seed)
    train, test = [rows[p] for p in train_pos], [rows[p] for p in test_pos]
    if not cfg.val_fraction:
        return [train, [], test]
    keep_pos, val_pos = stratified_split([index.labels[r] for r in train], cfg.val_fraction, cfg.seed + 2)
    return [[train[p] for p in keep_pos], [train[p] for p in val_pos], test]


def training_batches(cfg: Config, accelerator: Accelerator, data: PreparedData, model, sampler) -> Batches:
    """The training split's images, augmented on the device when the options ask for it (the images random
    crops are cut from, and augment.TrainingInputs), else as evaluation sees them."""
    options = AugmentOptions.from_config(cfg)
    rows = data.train_rows
    if not options.active:
        return image_batches(cfg, accelerator, data.images(rows), model, sampler)
    batches = image_batches(cfg, accelerator, data.crop_sources(rows) if options.crops else data.images(rows),
                            model, sampler)
    crop_sizes = torch.from_numpy(data.crop_sizes[rows]) if options.crops else None
    batches.augment = TrainingInputs(options, cfg.image_size, crop_sizes, len(data.index.classes), batches.mean,
                                     batches.std, cfg.channels_last)
    return batches


def check_split(cfg: Config, index: ImageIndex, rows: list[list[int]], warn) -> None:
    """A split that cannot measure anything is refused, one far from what was asked for is named: per class,
    a split takes at least one image when the class has 2 or more and leaves one behind, so on small classes
    the fractions are rounded a long way."""
    train, val, test = rows
    hint = f" (--max-samples {cfg.max_samples} keeps about that many images)" if cfg.max_samples else ""
    if not test:
        raise DataError(f"no test image can be held out: every class has a single image{hint}, and a class "
                        "needs 2 to give one to the test split. Use more images per class"
                        + (f", e.g. --max-samples {2 * len(index.classes)} or 0 (all)." if hint else "."))
    if cfg.val_fraction and not val:
        raise DataError(f"--val-fraction {cfg.val_fraction}: no validation image can be held out, since no class "
                        f"keeps 2 training images after the test split{hint}; a class needs 3 images for one of "
                        "each split. Pass --val-fraction 0, or use more images per class.")
    for option, fraction, held, of in (("--test-fraction", cfg.test_fraction, len(test), sum(map(len, rows))),
                                       ("--val-fraction", cfg.val_fraction, len(val), len(train) + len(val))):
        if fraction and not 0.5 * fraction <= held / of <= 1.5 * fraction:
            warn(f"warning: {option} {fraction:g} holds out {held} of {of} images ({held / of:.0%}): on classes "
                 "this small each split takes at least one image of a class that has 2 or more")
    warn_untested_classes(index.classes, [index.labels[r] for r in test], warn)


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
    lock = (store.locked(lambda message: console.print(f"features: {message}")) if accelerator.is_main_process
            else contextlib.nullcontext())
    with lock:  # held by the main process: of several runs that need these features, one computes them
        writes = data.cache_group.writer and not store.usable(console.warn)
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

    def create(dim: int) -> None:
        nonlocal array
        if writes:
            array = store.create(len(data.index), dim, dtype)

    def write(positions: torch.Tensor, features: torch.Tensor) -> None:
        """Called on every process with every gathered batch; the first call creates the file (its space
        reserved: a full --cache-dir stops every process here)."""
        nonlocal dtype
        if dtype is None:
            dtype = features.dtype
            together(lambda: create(features.shape[1]), store.dir)
        if not writes:
            return
        bits = features.cpu()
        bits = bits.view(torch.int16).numpy().view(np.uint16) if bits.dtype == torch.bfloat16 else bits.numpy()
        array[rows[positions.cpu().numpy()]] = bits

    tic = time.perf_counter()
    try:
        with stop_on_signals("computing backbone features"):  # nothing to save yet: main() exits 75
            images = image_batches(cfg, accelerator, data.images(rows.tolist()), model)
            extract_features(accelerator, model, images, write, console, "features")
        seconds = time.perf_counter() - tic
        together(lambda: store.publish(array, dtype, seconds) if array is not None else None, store.dir)
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
