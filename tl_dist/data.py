"""Data: download, index, decode once into a cache, split, and batch. Plain torch/torchvision/PIL.

The article decodes and resizes every JPEG again in every epoch. Here each image is decoded, converted to
RGB and resized to SIZE x SIZE exactly once, into a memory-mapped uint8 array (the decoded-image cache): as
the article resizes (squashed), or as torchvision's weights.transforms() do (shorter side, centre crop), see
`Resize`.
That decode is also the verify pass: a file that cannot be decoded is left out and reported. Batches are
uint8 tensors; `normalize` turns them into the article's `ToTensor() + Normalize(mean, std)` on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from tl_dist.cache_entry import CacheEntry, remove_stale_temps
from tl_dist.capacity import cache_disk_problem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IGNORED_FILES = {"thumbs.db", "desktop.ini"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KAGGLE_DATASET = "imbikramsaha/caltech-101"
OFFLINE_QUICK_START = "python -m tl_dist.shapes data/shapes"  # writes a data set and says how to train on it
CACHE_VERSION = 3  # 2: the metadata holds each file's original size; 3: and the array's checksum


class DataError(RuntimeError):
    """A problem with the data that the user must fix; its message says how."""


# ---------------------------------------------------------------- download


def download_caltech101(dest: Path, sources=None) -> str:
    """Download Caltech-101 into `dest` (class folders directly inside). Returns the source's name.

    Tries, in order: Kaggle's public dataset (the article's source) through `kagglehub`, which needs no
    account; the `kaggle` client, only where Kaggle credentials are set up; torchvision's downloader
    (data.caltech.edu). Each source writes into a temporary folder beside `dest` that is renamed into
    place at the end, so an interrupted download never looks like a complete dataset; when every source
    fails, the folders this call created (such as ./data) are removed again.
    """
    dest = Path(dest)
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for name, fetch in sources or default_sources():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-download-", dir=dest.parent))
        try:
            class_root = find_image_root(fetch(tmp))
            if dest.exists():  # another node finished first
                return name
            os.replace(class_root, dest)
            return name
        except Exception as exc:  # noqa: BLE001 - every failure moves on to the next source
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for folder in created:
        with contextlib.suppress(OSError):  # not empty: someone else is using it
            folder.rmdir()
    raise DataError(
        "could not download Caltech-101 (" + "; ".join(errors) + "). Check the network connection, "
        "or download the data yourself and pass --data-dir DIR (one folder per class). Without network, try "
        f"the workflow on generated data: {OFFLINE_QUICK_START} (README, Quick start).")


def kaggle_credentials() -> bool:
    """Whether the `kaggle` client has credentials: KAGGLE_USERNAME and KAGGLE_KEY, KAGGLE_API_TOKEN,
    or a kaggle.json / access_token file where the client looks for one."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY") or os.environ.get("KAGGLE_API_TOKEN"):
        return True
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    folders += [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any((f / name).is_file() for f in folders for name in ("kaggle.json", "access_token"))


def default_sources() -> list[tuple[str, Callable[[Path], Path]]]:
    sources = [("kagglehub", _fetch_kagglehub)]
    if kaggle_credentials():
        sources.append(("kaggle", _fetch_kaggle))
    return sources + [("torchvision", _fetch_torchvision)]


def _fetch_kagglehub(tmp: Path) -> Path:
    import kagglehub  # imported here, as the other clients: most runs never download

    return Path(kagglehub.dataset_download(KAGGLE_DATASET, output_dir=str(tmp)))


def _fetch_kaggle(tmp: Path) -> Path:
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    api.dataset_download_files(KAGGLE_DATASET, path=str(tmp), unzip=True, quiet=False)
    return tmp


def _fetch_torchvision(tmp: Path) -> Path:
    from torchvision.datasets import Caltech101

    Caltech101(root=str(tmp), target_type="category", download=True)
    return tmp / "caltech101" / "101_ObjectCategories"


# ---------------------------------------------------------------- index


@dataclass
class ImageIndex:
    root: Path
    files: list[str]  # relative to root, sorted
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: list[int]) -> "ImageIndex":
        return ImageIndex(self.root, [self.files[i] for i in keep], [self.labels[i] for i in keep],
                          self.classes)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


def find_image_root(data_dir: Path) -> Path:
    """The folder whose sub-folders are the classes; descends through wrappers such as Kaggle's
    nested `caltech-101/` or torchvision's `101_ObjectCategories/`."""
    root = Path(data_dir)
    while True:
        entries = [p for p in root.iterdir() if not _hidden(p.name)]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1 and any(
                c.is_dir() for c in dirs[0].iterdir() if not _hidden(c.name)):
            root = dirs[0]
            continue
        return root


def index_images(data_dir: Path, warn=print) -> ImageIndex:
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder. Pass the folder that holds one "
                        "sub-folder per class (unpack an archive first).")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist. Pass the folder that holds one "
                        "sub-folder per class, or leave --data-dir at its default to download Caltech-101.")
    root = find_image_root(data_dir)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    files, labels, classes, empty = [], [], [], []
    for class_dir in class_dirs:
        images = sorted(
            str(p.relative_to(root)) for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(_hidden(part) for part in p.relative_to(class_dir).parts))
        if not images:
            empty.append(class_dir.name)
            continue
        files += images
        labels += [len(classes)] * len(images)
        classes.append(class_dir.name)
    if empty:
        warn(f"warning: left out {len(empty)} class folder(s) with no images: {', '.join(empty)}")
    if not classes:
        raise DataError(f"no class folders with images in {root}. --data-dir must hold one sub-folder "
                        f"per class with images ({', '.join(sorted(IMAGE_EXTENSIONS))}) inside.")
    _require_two_classes(classes, root, "with images")
    return ImageIndex(root, files, labels, classes)


def _require_two_classes(classes: list[str], root: Path, kind: str) -> None:
    # One class would train a network that always answers it and report 100% accuracy.
    if len(classes) < 2:
        raise DataError(f"only one class folder {kind} in {root} ({classes[0]}); a classifier needs at "
                        "least 2. --data-dir must hold one sub-folder per class, each with its images.")


# ---------------------------------------------------------------- decode


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass(frozen=True)
class Resize:
    """How a decoded image becomes a `size` x `size` cache row: squashed, as the article resizes
    (torchvision's `Resize((S, S))`), or, with `shorter`, its shorter side resized to that and the centre
    cut out (`Resize(R)` then `CenterCrop(S)`: what a torchvision weights' `transforms()` do before
    ToTensor), with the same PIL calls and interpolation, so the pixels are exactly torchvision's."""
    size: int
    shorter: int | None = None
    interpolation: str = "bilinear"

    @property
    def name(self) -> str:
        """Its part of the cache file's name: `224px` (squashed), `256-224px` (resize, then centre crop)."""
        if self.shorter is None:
            return f"{self.size}px"
        return f"{self.shorter}-{self.size}px" + ("" if self.interpolation == "bilinear" else f"-{self.interpolation}")

    def __call__(self, img: Image.Image) -> np.ndarray:
        mode = TF.InterpolationMode(self.interpolation)
        if self.shorter is None:
            img = TF.resize(img, [self.size, self.size], interpolation=mode)
        else:
            img = TF.center_crop(TF.resize(img, [self.shorter], interpolation=mode), [self.size, self.size])
        return np.array(img, dtype=np.uint8)


def decode_image(path: str | Path) -> Image.Image:
    """Decode strictly (a truncated file raises) and convert to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)


def load_image(path: str | Path, resize: int | Resize) -> np.ndarray:
    """Decode strictly, convert to RGB, resize (an int S: as the article does, `Resize((S, S))` on the PIL
    image). Returns a uint8 array S x S x 3."""
    return (Resize(resize) if isinstance(resize, int) else resize)(decode_image(path))


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def decode_rows(index: ImageIndex, rows, out: np.ndarray, resize: Resize, threads: int,
                on_progress: Callable[[int], None] | None = None) -> tuple[dict[int, str], dict[int, tuple]]:
    """Decode index rows into `out`; returns {row: reason} for files that cannot be decoded, and {row:
    (width, height)} of the others, their original sizes. PIL releases the GIL while decoding and resizing, so
    threads use the cores. `on_progress(done)` is called in this thread as rows complete. An exception here
    (Ctrl-C, runtime.Interrupted) cancels the rows not started yet instead of decoding them all first."""
    def one(row):
        try:
            img = decode_image(index.root / index.files[row])
            out[row] = resize(img)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            return row, _describe(exc)
        return row, img.size

    bad, sizes = {}, {}
    # The warning filters are one process-wide list, and catch_warnings() in several threads at once
    # restores them in any order: set the filter here, before the threads start, so that all of them
    # see it (else a large image could be skipped under `python -W error`).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pool = ThreadPoolExecutor(max(1, threads))
        try:
            for done, (row, outcome) in enumerate(pool.map(one, rows), 1):
                if isinstance(outcome, str):
                    bad[row] = outcome
                else:
                    sizes[row] = outcome
                if on_progress is not None:
                    on_progress(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an interrupt: only the rows in flight finish
    return bad, sizes


class ImageCache(CacheEntry):
    """The decoded-image cache: `<cache_dir>/images-<key>-<resize>.npy` (N x S x S x 3 uint8), a cache entry
    (cache_entry.py) whose sidecar lists the files that could not be decoded and the original size of the
    others. The key covers the data folder, every file's path, size and modification time, and how images are
    resized (`Resize`). One process of each cache group writes it (`start`); a damaged one is removed and
    built again."""

    def __init__(self, cache_dir: str | Path, index: ImageIndex, resize: int | Resize):
        resize = Resize(resize) if isinstance(resize, int) else resize
        digest = hashlib.sha256(f"v{CACHE_VERSION} {index.root.resolve()} {resize.name}\n".encode())
        for rel in index.files:
            st = (index.root / rel).stat()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.key = digest.hexdigest()[:20]
        super().__init__(cache_dir, f"images-{self.key}-{resize.name}")
        self.index, self.resize, self.image_size = index, resize, resize.size

    def start(self, owner: bool, say=print, warn=print) -> Path | None:
        """On the process that writes the cache (`owner`), when it is missing or damaged: remove the temp
        files of writers that are gone, create this build's temp file and return it. Elsewhere, or when
        the cache is there and undamaged, None."""
        if not owner or self.usable(warn):
            return None
        removed = remove_stale_temps(self.dir)
        if removed:
            say(f"removed {len(removed)} partial cache file(s) left by an interrupted run: "
                + ", ".join(p.name for p in removed))
        self.dir.mkdir(parents=True, exist_ok=True)
        if problem := cache_disk_problem(len(self.index), self.image_size, self.dir):
            raise DataError(problem)
        return self.create_tmp()

    def create_tmp(self) -> Path:
        return self.create_array((len(self.index), self.image_size, self.image_size, 3), np.uint8)

    def fill(self, tmp: Path, rows, threads: int, on_progress=None) -> tuple[dict[int, str], dict[int, tuple]]:
        """Decodes `rows` into the temp file: ({row: why} of the files that cannot be decoded, {row: (width,
        height)} of the others)."""
        out = np.load(tmp, mmap_mode="r+")
        decoded = decode_rows(self.index, rows, out, self.resize, threads, on_progress)
        out.flush()
        return decoded

    def publish(self, tmp: Path, bad: dict[int, str], sizes: dict[int, tuple]) -> None:
        """Put this writer's temp file (`tmp`, from `start`) in place, with the files that could not be decoded
        and the original sizes of the others."""
        self.finish(tmp, {"files": len(self.index), "image_size": self.image_size, "resize": self.resize.name,
                          "bad": {self.index.files[r]: why for r, why in sorted(bad.items())},
                          "sizes": [list(sizes.get(r, (0, 0))) for r in range(len(self.index))]})

    def bad_files(self) -> dict[str, str]:
        self.touch()  # each run that uses the cache marks its last use (tl_dist.cache)
        return self.meta()["bad"]


def original_sizes(array_path: Path) -> np.ndarray:
    """(width, height) of each file of a complete decoded-image cache before it was resized, N x 2 int64
    (0 for the files that cannot be decoded)."""
    sizes = json.loads(Path(array_path).with_suffix(".json").read_text())["sizes"]
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def keep_decodable(index: ImageIndex, bad: dict[str, str], warn=print) -> tuple[ImageIndex, list[int]]:
    """After the verify pass: the rows of the files that decoded, and the index with the classes that
    kept none of their files left out (labels renumbered; rows still match the decoded-image cache)."""
    rows = [i for i, f in enumerate(index.files) if f not in bad]
    if not rows:
        first = ", ".join(f"{f} ({why})" for f, why in list(bad.items())[:3])
        raise DataError(f"none of the {len(index)} images in {index.root} can be decoded (first: {first}). Check "
                        "that --data-dir holds the images themselves, not links or archives.")
    kept = sorted({index.labels[i] for i in rows})
    if len(kept) < len(index.classes):
        lost = [c for y, c in enumerate(index.classes) if y not in set(kept)]
        warn(f"warning: left out {len(lost)} class folder(s) with no image that can be decoded: "
             + ", ".join(lost))
    _require_two_classes([index.classes[y] for y in kept], index.root, "with an image that can be decoded")
    new_label = {old: new for new, old in enumerate(kept)}
    labels = [new_label.get(y, -1) for y in index.labels]  # -1: a file of a left-out class, never used
    return ImageIndex(index.root, index.files, labels, [index.classes[y] for y in kept]), rows


# ---------------------------------------------------------------- split


def shuffled_by_class(labels: list[int], seed: int) -> list[list[int]]:
    """The positions of each class, class by class in label order, each list shuffled by one generator
    seeded with `seed`: taking a prefix of each list draws a stratified random subset."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    g = torch.Generator().manual_seed(seed)
    return [[by_class[y][i] for i in torch.randperm(len(by_class[y]), generator=g).tolist()]
            for y in sorted(by_class)]


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, floor(n * f + 0.5) test images (at least 1 when the class has 2 or more), chosen by
    `seed`. The same on every process. Returns sorted (train, test) positions."""
    train, test = [], []
    for members in shuffled_by_class(labels, seed):
        n_test = min(max(int(len(members) * test_fraction + 0.5), 1), len(members) - 1)  # 0 for 1 image
        test += members[:n_test]
        train += members[n_test:]
    return sorted(train), sorted(test)


def stratified_sample(labels: list[int], max_samples: int, seed: int) -> list[int]:
    """About `max_samples` positions (rounded per class), each class keeping its share and at least 1 image."""
    if max_samples <= 0 or max_samples >= len(labels):
        return list(range(len(labels)))
    keep_fraction = max_samples / len(labels)
    keep = []
    for members in shuffled_by_class(labels, seed + 1):  # seed + 1: not the split's draw
        keep += members[:max(1, int(len(members) * keep_fraction + 0.5))]
    return sorted(keep)


def warn_untested_classes(classes: list[str], test_labels: list[int], warn=print) -> list[str]:
    """One warning naming the classes without a test image (a class of a single image keeps it for
    training): their test accuracy is not measured. Returns them."""
    tested = set(test_labels)
    untested = [c for y, c in enumerate(classes) if y not in tested]
    if untested:
        warn(f"warning: {len(untested)} class(es) have no test image (too few images for --test-fraction), "
             f"so their accuracy is not measured: {', '.join(untested)}")
    return untested


# ---------------------------------------------------------------- datasets and batches


class CachedImages(torch.utils.data.Dataset):
    """Rows of the decoded-image cache as uint8 CHW tensors, fetched a whole batch at a time."""

    def __init__(self, array_path: Path, rows: list[int], labels: list[int]):
        self.array_path, self.rows, self.labels = Path(array_path), list(rows), torch.tensor(labels)
        self._array = None  # opened lazily, so each loader worker maps the file itself

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, positions) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        rows = [self.rows[p] for p in positions]
        return torch.from_numpy(self._array[rows]).permute(0, 3, 1, 2)  # N x 3 x S x S uint8

    def __getitems__(self, positions):
        positions = list(positions)
        return self.images(positions), self.labels[positions], torch.tensor(positions, dtype=torch.long)

    def __getitem__(self, position):
        images, labels, positions = self.__getitems__([position])
        return images[0], labels[0], positions[0]


def _as_batch(batch):
    return batch  # __getitems__ already returns a whole batch


def make_loader(dataset, batch_sampler=None, batch_size: int | None = None, num_workers: int = 0,
                pin_memory: bool = False):
    """A DataLoader over whole batches: either `batch_sampler` (training) or sequential batches of
    `batch_size` (evaluation; Accelerate's `prepare` shards those). It gets its own generator: creating
    its iterator must not draw from the global RNG, whose state (dropout) a resumed run restores."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(
        dataset, **batching, collate_fn=_as_batch, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=torch.Generator())


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The training batches of one process. Each epoch is one permutation of the split, drawn from
    seed + epoch (as torch's DistributedSampler draws it); global batch k is its k-th run of `global_batch`
    samples (the last one may be shorter); process r takes samples r, r + P, r + 2P, ... of it, cut into
    `accumulation` micro-batches of `batch_size`. So the global batches, and the training, are the same for
    any number of processes (a run may resume on another number), nothing is padded or seen twice, and
    every process yields the same number of micro-batches (at the very end some may be empty).

    With `partners` (mixup, cutmix), each micro-batch lists its samples, then each one's partner: the sample
    before it in the global batch (the last for the first), as torchvision's MixUp pairs a batch with itself
    rolled by one, over the global batch; so the pairs too are the same for any number of processes."""

    def __init__(self, size: int, batch_size: int, num_processes: int, rank: int, seed: int,
                 accumulation: int = 1, partners: bool = False):
        self.size, self.batch_size, self.num_processes, self.rank = size, batch_size, num_processes, rank
        self.seed, self.accumulation, self.partners = seed, accumulation, partners
        self.global_batch = batch_size * num_processes * accumulation
        self.steps_per_epoch = -(-size // self.global_batch)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_images(self, step: int) -> int:
        """Images in global batch `step` of the epoch."""
        return min(self.global_batch, self.size - step * self.global_batch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            mine = batch[self.rank::self.num_processes]
            partners = [batch[k - 1] for k in range(self.rank, len(batch), self.num_processes)]
            for m in range(self.accumulation):
                micro = slice(m * self.batch_size, (m + 1) * self.batch_size)
                yield mine[micro] + (partners[micro] if self.partners else [])

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accumulation


def normalize(images: torch.Tensor, channels_last: bool = False, mean=IMAGENET_MEAN,
              std=IMAGENET_STD) -> torch.Tensor:
    """uint8 N x 3 x S x S (or float in [0, 1]) -> the article's ToTensor() + Normalize(mean, std), on their
    device. The mean and std are those the network's weights were trained with (TransferNet.mean/.std;
    ImageNet's for VGG16)."""
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = ((images.float() / 255 if images.dtype == torch.uint8 else images) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
