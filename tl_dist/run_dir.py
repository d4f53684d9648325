"""The run folder's one owner: every name and format in it, the lock, atomic writes, verified checkpoints.

A run folder (`--output-dir`) holds one training run:

    .lock                 the owner while a run is active: an OS lock (flock) plus {host, pid, started}
    split.json            the classes and the train/test files, fixed at the start
    config.json           the resolved options (what `--resume` checks a run's identity against)
    skipped_files.txt     files that could not be decoded, and why
    STOP                  touch it to make a running job checkpoint and exit (the Slurm scripts do)
    wandb_run_id          the W&B run a resumed or requeued run continues
    wandb_last_step       the last step handed to W&B (steps redone after a crash are not logged twice)
    checkpoints/step_N/   complete checkpoints: Accelerate's state, train_state.json, classes.json, manifest.json
    model/                the final model: weights, classes.json, config.json, train_state.json, manifest.json;
                          with --ema-decay its weights are the average, and raw.safetensors the trained ones
    metrics.json          test metrics before and after fine-tuning, training numbers, the config
    per_class.csv, confusion_matrix.{csv,png}, mistakes.{csv,png}: the report
    eval/<model>/         what `--eval-only` wrote: metrics.json and the report of that model

Rules (each has a test): a new run never reuses a folder that holds a run; one process tree owns a folder at
a time (the kernel drops the lock when the owner dies, so a crash leaves no stale lock); every file is
written to a temporary name and renamed, so readers see the old file or the new one; a checkpoint is
complete when its folder has its final name, and valid when every file matches its manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path

# ---- names (no other module spells them)
LOCK_FILE = ".lock"
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped_files.txt"
STOP_FILE = "STOP"
WANDB_ID_FILE = "wandb_run_id"
WANDB_STEP_FILE = "wandb_last_step"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step_"  # checkpoints/step_<global step>/
TMP_PREFIX = ".tmp-"  # a folder being written: .tmp-step_N/, .tmp-model/
FINAL_MODEL = "model"
EVAL_DIR = "eval"
# inside a checkpoint or model/
STATE_FILE = "train_state.json"
CLASSES_FILE = "classes.json"
WEIGHTS_FILE = "model.safetensors"  # the name Accelerate's save_state gives the first model
RAW_WEIGHTS_FILE = "raw.safetensors"  # model/ with --ema-decay: the trained weights beside their average
EMA_FILE = "ema.safetensors"  # a checkpoint with --ema-decay: the average of the weights (optim.WeightAverage)
MANIFEST_FILE = "manifest.json"
# the report
PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISTAKES_PNG = "mistakes.png"
MISTAKES_CSV = "mistakes.csv"


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked; the message says what to do."""


class DamagedFileError(RunDirError):
    """A file of the run folder that is there but cannot be read (truncated, not JSON): one line, which the
    caller completes with what to do."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is damaged ({why})")
        self.path, self.why = Path(path), why


class DiskFullError(OSError):
    """A write failed for lack of space (raised where the error from below says less)."""

    def __init__(self, folder: Path):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

    def __reduce__(self):  # it travels between processes (runtime.together)
        return DiskFullError, (self.filename,)


# ---------------------------------------------------------------- atomic writes


def report_files(folder: Path) -> dict[str, Path]:
    """The report's files in a run folder (or an eval/<model>/ folder), by what they show."""
    folder = Path(folder)
    return {"per-class table": folder / PER_CLASS_CSV, "confusion matrix": folder / CONFUSION_PNG,
            "confusion matrix, all classes": folder / CONFUSION_CSV, "worst mistakes": folder / MISTAKES_PNG,
            "worst mistakes, with files": folder / MISTAKES_CSV}


def write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: readers (a resumed run too, after a kill) see the old file
    or the new one, never an empty or half-written one. A failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def read_json(path: Path):
    """A JSON file of the run folder. Raises DamagedFileError when it is there but not JSON (truncated by a
    full disk or a copy, edited by hand); a missing file stays a FileNotFoundError."""
    text = Path(path).read_bytes()
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFileError(path, f"{type(exc).__name__}: {exc}") from None


def exchange(new: Path, old: Path) -> None:
    """Put folder `new` in the place of `old` (which may not exist) in one step where the kernel allows
    it (Linux renameat2 RENAME_EXCHANGE), so that a crash leaves the old folder or the new one, never
    neither. `new` is removed afterwards (it then holds the old content)."""
    if not old.exists():
        os.replace(new, old)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(old),
                                           RENAME_EXCHANGE) == 0:
        shutil.rmtree(new)
        return
    aside = old.with_name(f".old-{old.name}")  # no atomic exchange here (another OS, some network file systems)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC, however it reaches us: an OSError, or a message from inside torch or safetensors. torch's
    writer says only "file write failed" or "iostream error", so a failed write also counts when the
    folder's file system has less than 1 MiB left."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and ("No space left" in str(e) or "StorageFull" in str(e)):
            return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < 1 << 20
    return False


# ---------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file of a checkpoint or model folder; the last file written."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    write_json(Path(folder) / MANIFEST_FILE,
               {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files})


def verify(folder: Path) -> str | None:
    """None when the folder is a complete checkpoint or model whose files match its manifest, else why not.
    A folder without a manifest (written before manifests existed) is checked file by file instead
    (`_unreadable`): nothing is trusted because it is there."""
    try:
        return _verify(Path(folder))
    except OSError as exc:  # removed or unreadable while we looked
        return f"cannot be read ({type(exc).__name__}: {exc.strerror})"


def _verify(folder: Path) -> str | None:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        missing = [name for name in (STATE_FILE, WEIGHTS_FILE, CLASSES_FILE) if not (folder / name).is_file()]
        if missing:
            return f"missing {', '.join(missing)}"
        return next(filter(None, (_unreadable(p) for p in sorted(folder.iterdir()) if p.is_file())), None)
    try:
        manifest = read_json(manifest_path)
    except DamagedFileError as exc:
        return f"{MANIFEST_FILE} cannot be read ({exc.why.split(':')[0]})"
    missing = [name for name in manifest if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for name, entry in manifest.items():
        size = (folder / name).stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if _sha256(folder / name) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _unreadable(path: Path) -> str | None:
    """Why a file of a checkpoint without a manifest is not whole, judged from its format, or None."""
    data = path.read_bytes()
    if data.startswith(b"PK"):  # torch.save's zip archives (Accelerate's .bin and .pkl files)
        whole = _whole_zip(data)
    else:
        whole = {".safetensors": _whole_safetensors, ".json": _whole_json}.get(path.suffix, lambda _: True)(data)
    return None if whole else f"{path.name} is not a whole {path.suffix[1:]} file"


def _whole_safetensors(data: bytes) -> bool:
    """Its header (8 bytes of length, then JSON) says where the last tensor ends: the end of the file."""
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + length])
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    return len(data) == 8 + length + end


def _whole_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def _whole_zip(data: bytes) -> bool:
    try:
        return zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every member's CRC
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


# ---------------------------------------------------------------- the folder


class RunDir:
    """Paths of one run folder, its lock and the checks that protect what it holds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # what claim() created, removed again if the run fails to start

    @classmethod
    def of(cls, folder: "RunDir | str | Path") -> "RunDir":
        return folder if isinstance(folder, RunDir) else cls(folder)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # -- paths
    split = property(lambda self: self.path / SPLIT_FILE)
    config = property(lambda self: self.path / CONFIG_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    skipped = property(lambda self: self.path / SKIPPED_FILE)
    stop_file = property(lambda self: self.path / STOP_FILE)
    wandb_id = property(lambda self: self.path / WANDB_ID_FILE)
    wandb_step = property(lambda self: self.path / WANDB_STEP_FILE)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    final_model = property(lambda self: self.path / FINAL_MODEL)

    def eval_dir(self, model_folder: Path) -> Path:
        return self.path / EVAL_DIR / Path(model_folder).name

    # -- what it holds
    def holds_run(self) -> bool:
        return self.split.is_file() or self.final_model.is_dir() or bool(self.checkpoint_folders())

    def holds_only_a_start(self) -> bool:
        """It holds the start of a run (split.json) and nothing the run made: no checkpoint, final model or
        metrics. What a run leaves that failed or was killed before its first checkpoint."""
        return self.split.is_file() and not (self.final_model.exists() or self.checkpoint_folders()
                                             or self.metrics.exists())

    def missing_report(self) -> list[str]:
        """What the results of a finished run lack: metrics.json (or one that cannot be read) and the report's
        files."""
        missing = [p.name for p in (self.metrics, *report_files(self.path).values()) if not p.is_file()]
        if self.metrics.is_file():
            try:
                read_json(self.metrics)
            except DamagedFileError:
                missing.insert(0, f"{METRICS_FILE} (damaged)")
        return missing

    def checkpoint(self, step: int) -> Path:
        """The checkpoint saved after global step `step`."""
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    @staticmethod
    def tmp_folder(folder: Path) -> Path:
        """Where `folder` (a checkpoint, model/) is written before one rename puts it in place."""
        return folder.with_name(TMP_PREFIX + folder.name)

    def stale_tmp_checkpoints(self) -> list[Path]:
        """Checkpoint folders a killed run was writing."""
        return sorted(self.checkpoints.glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*")) if self.checkpoints.is_dir() else []

    @staticmethod
    def checkpoint_step(folder: Path) -> int | None:
        """The global step of a checkpoint folder's name, None for another name."""
        digits = folder.name.removeprefix(CHECKPOINT_PREFIX)
        return int(digits) if folder.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None

    def checkpoint_folders(self) -> list[Path]:
        """Checkpoint folders that have their final name, oldest first (temporary ones start with '.')."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and self.checkpoint_step(p) is not None]
        return sorted(found, key=self.checkpoint_step)

    def latest(self, warn=None) -> Path | None:
        """The final model when the run finished, else the newest checkpoint; the newest that verifies.
        Each one that does not verify is named in one warning, with why."""
        for folder in [self.final_model, *reversed(self.checkpoint_folders())]:
            if not folder.is_dir():
                continue
            why = verify(folder)
            if why is None:
                return folder
            if warn is not None:
                warn(f"warning: {folder} is damaged ({why}); using an older checkpoint")
        return None

    def valid_checkpoints(self) -> list[Path]:
        """The checkpoints that verify, oldest first."""
        return [f for f in self.checkpoint_folders() if verify(f) is None]

    # -- the owner
    def claim(self, resume: bool) -> None:
        """Become the folder's only owner (main process): lock it, then refuse to start a new run over one
        that is already here. Nothing is written before both checks pass; on failure, what this call
        created (the folder, the lock file) is removed again."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--output-dir {self.path} is a file, not a folder. Pass a folder (it is created "
                              "when missing).")
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._created.append(self.path)
        lock = self.path / LOCK_FILE
        if not lock.exists():
            self._created.insert(0, lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            self.abandon()
            raise RunDirError(f"{self.path} is in use by another run ({holder}); wait for it to end, or pass "
                              "another --output-dir.") from None
        self._lock_fd = fd
        if not resume and self.holds_run():
            self.abandon()
            raise RunDirError(f"{self.path} already holds a run. Continue it with --resume auto --output-dir "
                              f"{self.path}, or start a new one in another --output-dir.")

    def record_owner(self) -> None:
        """Write who holds the lock into the lock file (main process, once the run is sure to start)."""
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, (json.dumps(owner) + "\n").encode(), 0)
        self._created = []

    def holder(self) -> str:
        try:
            owner = read_json(self.path / LOCK_FILE)
            return f"host {owner['host']}, pid {owner['pid']}, since {owner['started']}"
        except (OSError, DamagedFileError, KeyError, TypeError):  # empty until the owner writes it
            return "a process that has not yet said who it is"

    def abandon(self) -> None:
        """Give up a claim that did not lead to a run: unlock, and remove what claim() created."""
        self.release()
        for path in self._created:
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        self._created = []

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
