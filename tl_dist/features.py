"""The frozen backbone's pooled features on disk: computed once, then read by every run that needs them.

`<cache_dir>/features-<key>.npy` holds one row per image of a decoded-image cache (N x D, in the dtype the
backbone produced under the run's autocast: float32, float16, or bfloat16 stored as its 16 bits), and the
`.json` sidecar beside it, written last, says what they are: kind, key fields, rows, dim, dtype. The key
covers everything that changes the features: the decoded-image cache (files and image size), the network,
its weights, the autocast dtype and channels_last. A run with the same key, on any number of processes,
reads the file instead of running the backbone, and says `features: reused <path> (<rows> rows)`.

Building: the main process holds the entry's build lock (`.features-<key>.lock`) while the file is missing,
so that of several runs (or Slurm array tasks) that need the same features one computes them and the others
wait, then reuse them. Every process computes its shard; the gathered rows are written, batch by batch, by
the writer of each cache group that lacks the file (prepare.cache_group: one process for a folder every node
sees, one per node where each node has its own disk at that path) into a temporary file named after its
writer, renamed into place, and the sidecar written last: a crashed writer leaves no file that looks
complete, and the next build removes its temporary file. A damaged file is noticed, removed and computed
again (cache_entry.py).

Reading: rows are read with `pread` into a small buffer per batch, not through a memory map, so a training
process's resident memory does not grow with the number of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from tl_dist.cache_entry import CacheEntry, remove_stale_temps

VERSION = 2  # 2: the sidecar holds the array's checksum
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


class FeatureStore(CacheEntry):
    """One features file and its sidecar under the cache folder: a cache entry (cache_entry.py)."""

    def __init__(self, cache_dir: str | Path, fields: dict):
        self.fields = {"version": VERSION, **fields}
        key = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:20]
        super().__init__(cache_dir, f"features-{key}")

    def create(self, rows: int, dim: int, dtype: torch.dtype) -> np.ndarray:
        """This writer's temporary file, its space reserved, mapped for writing."""
        remove_stale_temps(self.dir)
        return np.load(self.create_array((rows, dim), DTYPES[dtype][1]), mmap_mode="r+")

    def publish(self, array: np.ndarray, dtype: torch.dtype, seconds: float) -> None:
        array.flush()
        self.finish(Path(array.filename), {
            "kind": "features", "key": self.fields, "rows": int(array.shape[0]), "dim": int(array.shape[1]),
            "dtype": DTYPES[dtype][0], "seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": socket.gethostname()})


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
