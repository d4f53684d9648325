"""Signals sent straight to a training process, and the watchdog of a worker whose launcher is gone.

SIGINT (Ctrl-C) and SIGUSR1 to `python -m tl_dist.train` while it trains: it finishes the step, saves a
checkpoint and exits 75 (SIGTERM and the STOP file: tests/test_options.py, tests/test_slurm.py). A worker of
`accelerate launch` whose launcher was killed gets SIGTERM from the kernel; one that cannot stop (its
partner is paused, so the next collective never completes) is ended by its watchdog once
LAUNCHER_GRACE_SECONDS have passed, with one line."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_image_tree, run_env, start_launch, tiny_args
from test_options import paused
from test_resume import descendants
from tl_dist.checkpoint import TrainState, check_checkpoint
from tl_dist.run_dir import RunDir
from tl_dist.runtime import EXIT_STOPPED, LAUNCHER_GRACE_SECONDS, StopRequest

# 100 images, 80 for training at batch 4: 20 steps an epoch, a checkpoint every 2.
OPTIONS = ("--epochs", "2", "--checkpoint-every-steps", "2", "--wandb-mode", "disabled", "--dropout", "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("signal-images") / "caltech-101", per_class=25)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_a_signal_to_the_training_process_stops_it_with_a_checkpoint(sig, data, tmp_path):
    """Sent while the run is paused after its first checkpoint (so it lands mid-run on any machine)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("wb") as sink:  # SIGINT at its default: a shell starts background jobs ignoring it
        proc = subprocess.Popen([sys.executable, "-m", "tl_dist.train", *tiny_args(data, out, tmp_path / "cache",
                                                                                  *OPTIONS)],
                                cwd=REPO, env=run_env(), stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: RunDir(out).checkpoint_folders(), 300, "first checkpoint", proc, log)
        with paused(proc.pid):
            proc.send_signal(sig)
        assert proc.wait(timeout=300) == EXIT_STOPPED, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    flat = " ".join(log.read_text().split())
    assert "Traceback" not in flat and "KeyboardInterrupt" not in flat, flat[-3000:]
    stopped = re.search(rf"stop requested \({sig.name}\): saving a checkpoint at step (\d+)", flat)
    assert stopped, flat[-3000:]
    latest = RunDir(out).latest()
    assert latest.name == f"step_{stopped.group(1)}" and 2 < int(stopped.group(1)) < 40
    check_checkpoint(latest)
    assert not TrainState.load(latest).finished and not (out / "model").exists()
    assert f"stopped; continue with --resume auto --output-dir {out}" in flat


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def test_the_watchdog_ends_a_worker_whose_launcher_is_gone(data, tmp_path):
    """2 processes: rank 1 is paused, then the launcher killed (SIGKILL). Rank 0 is told to stop, but its
    next collective waits for rank 1 forever: the watchdog ends it after the grace period, with one line."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("wb") as sink:
        launcher = start_launch(tiny_args(data, out, tmp_path / "cache", *OPTIONS, "--freeze", "none"), 2,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        wait_for(lambda: RunDir(out).checkpoint_folders(), 300, "first checkpoint", launcher, log)
        workers = sorted((p for p in descendants(launcher.pid)
                          if b"train.py" in Path(f"/proc/{p}/cmdline").read_bytes()), key=rank_of)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGSTOP)
        launcher.kill()
        launcher.wait()
        gone = time.monotonic()
        while running(workers[0]):
            assert time.monotonic() - gone < LAUNCHER_GRACE_SECONDS + 60, "rank 0 still runs"
            time.sleep(0.2)
        waited = time.monotonic() - gone
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert waited >= LAUNCHER_GRACE_SECONDS, waited
    text = log.read_text()
    assert text.count("error: the launcher of this process is gone and the run did not stop in time; exiting. "
                      "Continue with --resume auto.") == 1, text[-3000:]


def test_a_stop_file_names_the_signal_a_parent_relayed(tmp_path):
    """A sweep relays Ctrl-C twice (a STOP file and the signal to accelerate launch): whichever the run sees
    first, it says SIGINT. A STOP file a user touched, or one with anything else in it, says it exists."""
    stop_file = tmp_path / "STOP"
    with StopRequest(stop_file) as stop:
        assert not stop.requested()
        stop_file.write_text("SIGINT")
        assert stop.requested() and stop.reason() == "SIGINT"
        for text in ("", "please stop\n", "SIGKILL"):
            stop_file.write_text(text)
            assert stop.reason() == f"{stop_file} exists"
    assert not stop_file.exists()  # removed when training ends
