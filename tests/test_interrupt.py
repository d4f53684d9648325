"""Interrupted decoding leaves nothing behind: real signals to a real `python -m tl_dist.train`.

Ctrl-C (SIGINT) or SIGTERM during the decode or the feature pass ends the run with the stop code (75),
one line and no traceback, and no temp file in --cache-dir. A temp file left by SIGKILL is removed by the
next run that builds that cache; the temp file of a run still writing is left alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_SUCH_PID, REPO, make_image_tree, run_env, start_launch, tiny_args
from PIL import Image

from tl_dist.cache_entry import STALE_TMP_SECONDS, remove_stale_temps
from tl_dist.data import ImageCache, index_images
from tl_dist.runtime import EXIT_STOPPED


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> Path:
    """2 classes x 30 links to one 2400 x 2400 JPEG: a decode of seconds (~0.1 s an image on one thread)
    from 360 KB of disk."""
    root = tmp_path_factory.mktemp("slow") / "data"
    yy, xx = np.mgrid[0:2400, 0:2400]
    big = root / "big.jpg"
    root.mkdir()
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(big, quality=80)
    for c in range(2):
        (root / f"class_{c}").mkdir()
        for i in range(30):
            os.link(big, root / f"class_{c}" / f"img_{i:03d}.jpg")
    big.unlink()
    return root


def start(args: list[str], log: Path) -> subprocess.Popen:
    """The entry point in a process of its own, with SIGINT at its default (a shell starts background
    jobs with SIGINT ignored, and the child would inherit that) and its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, env=run_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never happened (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def temp_files(cache: Path) -> list[Path]:
    """Hidden files but the features' build lock (empty, kept for the next build)."""
    return sorted(p for p in cache.glob(".*") if p.suffix != ".lock") if cache.is_dir() else []


def slow_args(data: Path, tmp: Path) -> list[str]:
    # One decoding thread: seconds of decoding on any machine, so that the signal lands in it.
    return tiny_args(data, tmp / "run", tmp / "cache", "--num-threads", "1", "--wandb-mode", "disabled")


def assert_stopped(proc: subprocess.Popen, log: Path, signame: str, during: str) -> str:
    code = proc.wait(timeout=120)
    output = log.read_text()
    assert code == EXIT_STOPPED, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and f"stopped by {signame} while {during}" in stopped[0], output[-3000:]
    return output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_decode_removes_the_partial_cache(slow_tree, tmp_path, sig):
    log = tmp_path / "log.txt"
    proc = start(slow_args(slow_tree, tmp_path), log)
    wait_for(lambda: temp_files(tmp_path / "cache"), proc, log)  # the decode has begun
    proc.send_signal(sig)
    output = assert_stopped(proc, log, sig.name, "decoding images")
    assert "decoding 60/60" not in output  # it did stop mid-decode
    assert list((tmp_path / "cache").iterdir()) == []  # no temp file, no half-written cache
    assert not (tmp_path / "run").exists()


def test_a_signal_during_the_feature_pass_exits_75_and_keeps_the_complete_cache(tmp_path):
    """VGG16 (random weights) at 64 px on one thread: seconds of feature pass over 100 small images."""
    data = make_image_tree(tmp_path / "data", classes=4, per_class=25)
    log = tmp_path / "log.txt"
    proc = start(slow_args(data, tmp_path) + ["--model", "vgg16", "--image-size", "64"], log)
    wait_for(lambda: "features 0/" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGTERM)
    output = assert_stopped(proc, log, "SIGTERM", "computing backbone features")
    assert "To continue, run the same command again." in output  # nothing of the run was written yet
    assert not (tmp_path / "run").exists()
    assert not temp_files(tmp_path / "cache")
    # the finished image cache, and the features' build lock; no features file, complete or not
    assert sorted(p.name.split("-")[0] + p.suffix for p in (tmp_path / "cache").iterdir()) == \
        [".features.lock", "images.json", "images.npy"]


def test_the_temp_file_of_a_killed_run_is_removed_by_the_next_build(slow_tree, tmp_path):
    """SIGKILL mid-decode leaves its temp file (nothing can remove it); the next run that builds the
    cache removes it, and says so, but not the temp file of a run that is still writing (this test's
    own pid stands for one) or a recent one of another host (a shared cache folder)."""
    log = tmp_path / "log.txt"
    proc = start(slow_args(slow_tree, tmp_path), log)
    wait_for(lambda: temp_files(tmp_path / "cache"), proc, log)
    proc.kill()
    proc.wait(timeout=60)
    (killed,) = temp_files(tmp_path / "cache")
    assert killed.name.endswith(f"-{proc.pid}.npy") and killed.stat().st_size > 60 * 32 * 32 * 3
    # Its writer is dead, but its pid, reaped, may be given to a new process before the next run looks: the
    # file gets a pid no process can have.
    left = killed.with_name(killed.name.removesuffix(f"-{proc.pid}.npy") + f"-{NO_SUCH_PID}.npy")
    killed.rename(left)
    stem = left.name.split(".tmp-")[0]
    alive = tmp_path / "cache" / f"{stem}.tmp-{socket.gethostname()}-{os.getpid()}.npy"
    elsewhere = tmp_path / "cache" / f"{stem}.tmp-other-host.example-{proc.pid}.npy"
    for path in (alive, elsewhere):
        path.write_bytes(b"being written")

    again = subprocess.run([sys.executable, "-m", "tl_dist.train", *slow_args(slow_tree, tmp_path),
                            "--epochs", "1", "--num-threads", "0"], cwd=REPO, env=run_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed 1 partial cache file(s) left by an interrupted run: {left.name}" in \
        " ".join(again.stdout.split())
    assert temp_files(tmp_path / "cache") == sorted([alive, elsewhere])
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 1  # the cache, complete


def test_stale_temp_files_rules(image_tree, tmp_path):
    """Which leftovers a build removes (cache_entry.remove_stale_temps, the one rule of both caches and of
    `tl_dist.cache prune`): a dead writer's on this host, or anyone's untouched for a day."""
    cache = ImageCache(tmp_path, index_images(image_tree), 8)
    host, stem, dead = socket.gethostname(), f".{cache.array_path.stem}", NO_SUCH_PID
    names = {"dead writer": f"{stem}.tmp-{host}-{dead}.npy",
             "dead writer's metadata": f"{stem}.tmp-{host}-{dead}.json",
             "live writer": f"{stem}.tmp-{host}-{os.getpid()}.npy",
             "other host, recent": f"{stem}.tmp-node-7-{dead}.npy",
             "other host, a day old": f"{stem}.tmp-node-8-{dead}.npy",
             "another cache, dead writer": f".images-0123abcd-224px.tmp-{host}-{dead}.npy",
             "features, dead writer": f".features-0123abcd.tmp-{host}-{dead}.npy",
             "not ours": f".notes.tmp-{host}-{dead}.npy"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    day_ago = time.time() - STALE_TMP_SECONDS - 60
    os.utime(tmp_path / names["other host, a day old"], (day_ago, day_ago))
    removed = {p.name for p in remove_stale_temps(tmp_path)}
    assert removed == {names[k] for k in ("dead writer", "dead writer's metadata", "other host, a day old",
                                          "another cache, dead writer", "features, dead writer")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names.values()) - removed)


def test_sigterm_to_every_process_of_a_two_process_decode(slow_tree, tmp_path):
    """As Slurm's scancel or a preemption does: SIGTERM to the launcher and both training processes in the
    middle of the decode. Rank zero removes the temp file it created (rank one only wrote into it), and
    only rank zero prints the one line."""
    from test_resume import descendants

    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = start_launch(slow_args(slow_tree, tmp_path), 2, stdout=sink, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: "decoding 0/60" in log.read_text(), proc, log)  # both processes are decoding
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    proc.wait(timeout=120)
    output = log.read_text()
    assert output.count("stopped by SIGTERM while decoding images") == 1, output[-3000:]
    assert "decoding 60/60" not in output
    assert list((tmp_path / "cache").iterdir()) == []
