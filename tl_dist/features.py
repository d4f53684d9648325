"""The frozen backbone's pooled features on disk: computed once, then read by every run that needs them.

`<cache_dir>/features-<key>.npy` holds one row per image of a decoded-image cache (N x D, in the dtype the
backbone produced under the run's autocast: float32, float16, or bfloat16 stored as its 16 bits), and the
`.json` sidecar beside it, written last, says what they are: kind, key fields, rows, dim, dtype. The key
covers everything that changes the features: the decoded-image cache (files and image size), the network,
its weights, the autocast dtype and channels_last. A run with the same key, on any number of processes,
reads the file instead of running the backbone, and says `features: reused <path> (<rows> rows)`.

Building: the main process holds an OS lock on `.features-<key>.lock` while the file is missing, so that of
several runs (or Slurm array tasks) that need the same features one computes them and the others wait,
then reuse them. Every process computes its shard; the gathered rows are written, batch by batch, by the
main process of every node that lacks the file (a cache folder shared by the nodes, or one per node) into
a temporary file named after its writer, renamed into place, and the sidecar written last: a crashed
writer leaves no file that looks complete, and the next build removes its temporary file.

Reading: rows are read with `pread` into a small buffer per batch, not through a memory map, so a training
process's resident memory does not grow with the number of rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

VERSION = 1
DTYPES = {torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16),
          torch.bfloat16: ("bfloat16", np.uint16)}  # numpy has no bfloat16: its 16 bits, viewed back by torch
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_fingerprint(model_name: str, weights: str, seed: int) -> str:
    """What identifies the backbone's weights without building it: a file's SHA-256, a named set of
    weights, or the seed of a random initialisation."""
    if weights == "none":
        return f"none (random, seed {seed}, torch {torch.__version__.split('+')[0]})"
    path = Path(weights)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return f"file sha256 {digest.hexdigest()}"
    import torchvision

    return f"{model_name} {weights} (torchvision {torchvision.__version__.split('+')[0]})"


class FeatureStore:
    """One features file and its sidecar, under the cache folder."""

    def __init__(self, cache_dir: str | Path, fields: dict):
        self.fields = {"version": VERSION, **fields}
        key = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = Path(cache_dir)
        self.array_path = self.dir / f"features-{key}.npy"
        self.meta_path = self.array_path.with_suffix(".json")
        self.lock_path = self.dir / f".features-{key}.lock"

    def complete(self) -> bool:
        return self.meta_path.is_file() and self.array_path.is_file()

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    def touch(self) -> None:
        """Mark the entry used now (`python -m tl_dist.cache` prunes the least recently used)."""
        with contextlib.suppress(OSError):
            os.utime(self.meta_path)

    @contextlib.contextmanager
    def locked(self, say=print) -> Iterator[None]:
        """Hold the build lock (blocking; the kernel drops it if this process dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"features: waiting for another run that is computing {self.array_path.name} ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writing (the main process of each node that lacks the file)
    def tmp_path(self) -> Path:
        return self.dir / f".{self.array_path.stem}.tmp-{socket.gethostname()}-{os.getpid()}.npy"

    def remove_stale_tmp(self) -> None:
        """Temporary files of this host's writers that no longer run (a crash, a SIGKILL)."""
        host = socket.gethostname()
        for path in self.dir.glob(f".{self.array_path.stem}.tmp-{host}-*.npy"):
            pid = int(path.stem.rsplit("-", 1)[1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except PermissionError:
                pass

    def create(self, rows: int, dim: int, dtype: torch.dtype) -> np.ndarray:
        self.remove_stale_tmp()
        np_dtype = DTYPES[dtype][1]
        return np.lib.format.open_memmap(self.tmp_path(), mode="w+", dtype=np_dtype, shape=(rows, dim))

    def publish(self, array: np.ndarray, dtype: torch.dtype, seconds: float) -> None:
        array.flush()
        os.replace(self.tmp_path(), self.array_path)
        meta = {"kind": "features", "key": self.fields, "rows": int(array.shape[0]), "dim": int(array.shape[1]),
                "dtype": DTYPES[dtype][0], "seconds": seconds,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}
        tmp = self.meta_path.with_name(f".{self.meta_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.meta_path)

    def discard(self) -> None:
        self.tmp_path().unlink(missing_ok=True)


class StoredFeatures(torch.utils.data.Dataset):
    """Rows of a features file (those of one split) with their labels, read a batch at a time."""

    def __init__(self, store: FeatureStore, rows: list[int], labels: list[int]):
        meta = store.meta()
        self.path, self.rows, self.labels = store.array_path, list(rows), torch.tensor(labels, dtype=torch.long)
        self.dim, self.dtype = meta["dim"], TORCH_DTYPES[meta["dtype"]]
        self.row_bytes = self.dim * torch.empty((), dtype=self.dtype).element_size()
        mapped = np.load(self.path, mmap_mode="r")  # only to read where the rows start, after the header
        self.offset = mapped.offset
        del mapped
        self._fd = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions):
        if self._fd is None:  # opened lazily: each loader worker reads with its own descriptor
            self._fd = os.open(self.path, os.O_RDONLY)
        positions = list(positions)
        out = torch.empty((len(positions), self.dim), dtype=self.dtype)
        buffer = out.view(torch.uint8).numpy().reshape(len(positions), self.row_bytes)
        for i, p in enumerate(positions):
            row = self.rows[p]
            os.preadv(self._fd, [buffer[i]], self.offset + row * self.row_bytes)
        idx = torch.tensor(positions, dtype=torch.long)
        return out, self.labels[idx], idx

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
