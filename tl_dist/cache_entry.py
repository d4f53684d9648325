"""One entry of --cache-dir: what the decoded-image cache (data.ImageCache), the feature store
(features.FeatureStore) and `python -m tl_dist.cache` all mean by a cache entry.

An entry named STEM is

    STEM.npy                        the array (numpy's .npy format: a header, then the rows)
    STEM.json                       its sidecar, written last: what the array holds, its size and checksum
    .STEM.tmp-<host>-<pid>.npy      the array while one writer fills it (its .json likewise)
    .STEM.lock                      the build lock (features: one run computes them, the others wait)

An entry is complete when its sidecar exists, and undamaged when the array's size is what its header's shape
needs and its sampled checksum is what the writer recorded: SHA-256 of SAMPLE_BLOCKS blocks of SAMPLE_BYTES
spread over the file (the whole file when it is smaller), so a check reads at most 16 MiB whatever the
entry's size. A truncated array is always noticed, other damage where it touches a sampled block. A damaged
entry is removed, with one warning, and built again.

A temporary file is stale when its writer is gone: a pid that no longer runs on this host, or, whatever the
host (a cache folder shared between nodes), untouched for STALE_TMP_SECONDS; a live writer modifies its
file all along. The array is written through a memory map whose whole size is reserved on disk first
(posix_fallocate): a full disk is an OSError at that point, never a SIGBUS in the middle of a write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

STALE_TMP_SECONDS = 24 * 3600
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 1 << 20
KINDS = ("images", "features")  # data.ImageCache's entries, features.FeatureStore's
TMP_NAME = re.compile(r"^\.(?P<stem>(images|features)-.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)\.(npy|json)$")


def writer_of(name: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary file, from its name; None for another name."""
    match = TMP_NAME.match(name)
    return (match["host"], int(match["pid"])) if match else None


def writer_state(path: Path) -> str:
    """Whether the writer of a temporary file runs: 'running', 'gone', or 'unknown' (another host, not yet
    a day old)."""
    host, pid = writer_of(path.name)
    if time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
        return "gone"
    if host != socket.gethostname():
        return "unknown"
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # it runs, as another user's process
        pass
    return "running"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` whose writer is gone (a crash, a SIGKILL, a power cut)."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp-*")) if Path(folder).is_dir() else []:
        if writer_of(path.name) is None:
            continue
        with contextlib.suppress(FileNotFoundError):  # its writer just renamed or removed it
            if writer_state(path) == "gone":
                path.unlink()
                removed.append(path)
    return removed


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the file's size and SAMPLE_BLOCKS blocks spread from its start to its end."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def npy_size(path: Path) -> int:
    """The bytes a .npy file needs: its header, then what its shape and dtype take."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        shape, _, dtype = readers[np.lib.format.read_magic(f)](f)  # another version: KeyError
        return f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class CacheEntry:
    """The files of one entry, and how an entry is verified, written and put in place."""

    def __init__(self, folder: str | Path, stem: str):
        self.dir, self.stem = Path(folder), stem
        self.array_path = self.dir / f"{stem}.npy"
        self.meta_path = self.dir / f"{stem}.json"
        self.lock_path = self.dir / f".{stem}.lock"

    def tmp_path(self, suffix: str = ".npy") -> Path:
        return self.dir / f".{self.stem}.tmp-{socket.gethostname()}-{os.getpid()}{suffix}"

    def files(self) -> list[Path]:
        """Its files that exist, the sidecar first (what a removal takes away first)."""
        return [p for p in (self.meta_path, self.array_path, self.lock_path) if p.exists()]

    # -- reading
    def complete(self) -> bool:
        return self.meta_path.is_file() and self.array_path.is_file()

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    def damage(self) -> str | None:
        """Why a complete entry cannot be used, or None."""
        try:
            meta = self.meta()
            size, needed = self.array_path.stat().st_size, npy_size(self.array_path)
            if size != needed:
                return f"{size} bytes, its shape needs {needed}"
            if sampled_sha256(self.array_path) != meta.get("sampled_sha256"):
                return "its checksum does not match"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"cannot be read ({type(exc).__name__})"
        return None

    def usable(self, warn: Callable[[str], None]) -> bool:
        """Complete and undamaged. A damaged entry is removed, named in one warning, and built again."""
        if not self.complete():
            return False
        why = self.damage()
        if why is None:
            return True
        self.remove()
        warn(f"warning: the cache entry {self.array_path} is damaged ({why}); removed it, building it again")
        return False

    def touch(self) -> None:
        """Mark the entry used now (`python -m tl_dist.cache prune` removes the least recently used)."""
        with contextlib.suppress(OSError):
            os.utime(self.meta_path)

    # -- writing (one writer per entry and folder)
    def create_array(self, shape: tuple[int, ...], dtype) -> Path:
        """This writer's temporary array, its whole size reserved on disk. Raises OSError(ENOSPC) when it does
        not fit, having removed what it created."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path()
        try:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def finish(self, tmp: Path, meta: dict) -> None:
        """Put this writer's array (`tmp`, from create_array) in place, then its sidecar, with the array's
        checksum: the entry is complete."""
        tmp_meta = self.tmp_path(".json")
        try:
            tmp_meta.write_text(json.dumps({**meta, "sampled_sha256": sampled_sha256(tmp)}, indent=1))
        except BaseException:  # a full disk: nothing was put in place
            tmp_meta.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.array_path)  # renames take no space
        os.replace(tmp_meta, self.meta_path)

    def discard(self) -> None:
        """Remove this writer's temporary files (a build that failed or was interrupted)."""
        for suffix in (".npy", ".json"):
            self.tmp_path(suffix).unlink(missing_ok=True)

    def remove(self) -> None:
        for path in (self.meta_path, self.array_path):  # the sidecar first: no run takes it as complete
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, say: Callable[[str], None]) -> Iterator[None]:
        """Hold the entry's build lock (an OS lock, dropped by the kernel when its holder dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another run that is building {self.array_path.name} ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
