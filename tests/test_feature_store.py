"""Features on disk (tl_dist/features.py): computed once, reused by later runs on any number of processes,
one builder at a time, nothing that looks complete after a crash, stored in the autocast dtype."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NO_SUCH_PID, REPO, launch, make_image_tree, read_metrics, run_env, run_module, tiny_args

from tl_dist.prepare import sharing_groups
from tl_dist.features import FeatureStore, StoredFeatures

RUN = ("--wandb-mode", "disabled", "--checkpoint-every-epochs", "0", "--dropout", "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("feature-store-images") / "caltech-101", per_class=10)


def train(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_module([*tiny_args(data, out, cache, *RUN), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def stores(cache: Path) -> list[Path]:
    return sorted(cache.glob("features-*.npy"))


def same_results(a: Path, b: Path) -> None:
    one, two = read_metrics(a), read_metrics(b)
    assert one["train"]["epoch_loss"] == two["train"]["epoch_loss"]
    assert one["test"]["loss"] == two["test"]["loss"] and one["baseline"]["loss"] == two["baseline"]["loss"]


def test_a_second_run_reuses_the_features_and_trains_as_a_cold_one(data, tmp_path):
    shared = tmp_path / "shared"
    first = train(data, tmp_path / "first", shared)
    (path,) = stores(shared)
    assert f"saved in {path}" in first.stdout
    second = train(data, tmp_path / "second", shared, "--lr", "0.02")
    assert f"features: reused {path} (40 rows)" in second.stdout and "backbone features of" not in second.stdout
    assert read_metrics(tmp_path / "second")["features"]["reused"] is True
    cold = train(data, tmp_path / "cold", tmp_path / "own-cache", "--lr", "0.02")
    assert "backbone features of" in cold.stdout
    same_results(tmp_path / "second", tmp_path / "cold")  # reused features: identical to a cold cache
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["kind"], meta["rows"], meta["dim"], meta["dtype"]) == ("features", 40, 64, "float32")
    assert meta["key"]["model"] == "vgg_tiny" and meta["key"]["image_size"] == 32


def test_two_processes_reuse_what_one_computed(data, tmp_path):
    shared = tmp_path / "shared"
    train(data, tmp_path / "one", shared, "--batch-size", "8")
    two = launch([*tiny_args(data, tmp_path / "two", shared, *RUN), "--batch-size", "4"], nproc=2)
    assert "features: reused" in two.stdout and "backbone features of" not in two.stdout
    one, other = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert other["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-5)


def flock_holders(lock: Path) -> dict[int, bool]:
    """{pid: holds} of the processes that hold (True) or wait for (False) an flock of `lock`, from the
    kernel's own list (/proc/locks: `N: FLOCK ADVISORY WRITE pid dev:inode ...`, waiters marked `->`)."""
    try:
        inode = os.stat(lock).st_ino
    except FileNotFoundError:
        return {}
    found = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()[1:]
        waits = fields[0] == "->"
        kind, pid, where = fields[waits:][0], int(fields[waits:][3]), fields[waits:][4]
        if kind == "FLOCK" and int(where.rsplit(":", 1)[1]) == inode:
            found[pid] = not waits
    return found


def pause_the_lock_holder(cache: Path, running, timeout: float = 300) -> int:
    """SIGSTOP the process that holds the features' build lock in `cache`, once one does, while `running()`
    says the runs are not over; returns its pid. It is stopped before it is looked at, so it cannot let go
    of the lock in between."""
    checked = time.monotonic()
    deadline = checked + timeout
    while time.monotonic() < deadline:
        for lock in cache.glob(".features-*.lock"):
            for pid in [p for p, holds in flock_holders(lock).items() if holds]:
                os.kill(pid, signal.SIGSTOP)
                if flock_holders(lock).get(pid):
                    return pid
                os.kill(pid, signal.SIGCONT)
        if time.monotonic() - checked > 1:  # running() may be slow (Slurm's scontrol); the locks are looked
            if not running():  # at every 10 ms however long it takes
                break
            checked = time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"no process was seen holding the features' lock in {cache}")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def test_a_run_waits_while_another_computes_the_features(data, tmp_path):
    """Two runs need the same missing features: the first is paused (SIGSTOP) while it holds the build
    lock, and the second waits for it, however long; once the first goes on, it writes the features and
    the second reuses them. (Without the lock the second computes them too.) ResNet-18 at 64 px on one
    thread: a feature pass long enough to be caught holding the lock."""
    shared = tmp_path / "shared"
    args = [*RUN, "--model", "resnet18", "--image-size", "64", "--num-threads", "1"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []
    try:
        for i, log in enumerate(logs):
            with log.open("wb") as sink:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tl_dist.train", *tiny_args(data, tmp_path / f"run{i}", shared, *args)],
                    cwd=REPO, env=run_env(), stdout=sink, stderr=subprocess.STDOUT))
            if i == 0:
                assert pause_the_lock_holder(shared, lambda: procs[0].poll() is None) == procs[0].pid
        (lock,) = shared.glob(".features-*.lock")
        wait_until(lambda: flock_holders(lock).get(procs[1].pid) is False, 300, "the second run waiting on the lock")
        assert procs[1].poll() is None and "features: waiting for another run" in logs[1].read_text()
        assert stores(shared) == []
        os.kill(procs[0].pid, signal.SIGCONT)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    first, second = (log.read_text() for log in logs)
    assert codes == [0, 0], (first[-2000:], second[-2000:])
    assert "backbone features of" in first and "features: reused" not in first
    assert "features: reused" in second and "backbone features of" not in second
    assert len(stores(shared)) == 1 and not [p for p in shared.glob(".features-*") if p.suffix != ".lock"]


def test_a_crashed_writer_leaves_nothing_that_looks_complete(data, tmp_path):
    shared = tmp_path / "shared"
    train(data, tmp_path / "first", shared)
    (path,) = stores(shared)
    path.with_suffix(".json").unlink()  # as if killed between the array's rename and the sidecar
    stale = shared / f".{path.stem}.tmp-{os.uname().nodename}-{NO_SUCH_PID}.npy"
    stale.write_bytes(b"half")
    again = train(data, tmp_path / "again", shared)
    assert "backbone features of" in again.stdout and "reused" not in again.stdout
    assert not stale.exists() and path.with_suffix(".json").is_file()
    same_results(tmp_path / "first", tmp_path / "again")


def test_features_are_stored_in_the_autocast_dtype(data, tmp_path):
    """bf16 autocast: the rows are bfloat16 on disk (half the bytes of float32) and read back as such."""
    shared = tmp_path / "shared"
    train(data, tmp_path / "bf16", shared, "--mixed-precision", "bf16")
    (path,) = stores(shared)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["key"]["precision"] == "bf16"
    assert path.stat().st_size < 40 * 64 * 2 + 256
    store = FeatureStore.__new__(FeatureStore)
    store.array_path, store.meta_path = path, path.with_suffix(".json")
    rows, labels, positions = StoredFeatures(store, [0, 5, 39], [0, 1, 2]).__getitems__([2, 0])
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 64) and positions.tolist() == [2, 0]
    assert torch.isfinite(rows.float()).all() and rows.float().abs().sum() > 0
    reused = train(data, tmp_path / "bf16-again", shared, "--mixed-precision", "bf16")
    assert "features: reused" in reused.stdout
    same_results(tmp_path / "bf16", tmp_path / "bf16-again")


def test_processes_share_a_cache_file_only_when_each_sees_the_others_probe():
    """2 nodes x 2 processes (node = the index of its first process)."""
    node = [0, 0, 2, 2]
    shared = [[0, 1, 2, 3]] * 4
    assert sharing_groups(shared, node) == [(0, 1, 2, 3)] * 4
    node_local = [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert sharing_groups(node_local, node) == [(0, 1), (0, 1), (2, 3), (2, 3)]
    # A shared network folder whose late view hid node 2's probes from process 1 only: no group of
    # processes that do not all see each other; each node writes its own copy.
    late = [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert sharing_groups(late, node) == [(0, 1), (0, 1), (2, 3), (2, 3)]
