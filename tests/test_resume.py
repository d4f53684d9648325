"""Exact resume after a crash, with real processes.

For 1 and 2 CPU processes (fp32): an uninterrupted run, and a run killed with SIGKILL (the launcher, its
workers and W&B's service, all at once) in the middle of an epoch, after a checkpoint, then started again
with `--resume auto`. Both must end with bit-identical weights and the same metrics; the W&B run is continued
(same id, a second offline folder, no step logged twice). vgg_tiny keeps its dropout (0.5): the resumed run
must draw the masks the uninterrupted run drew (from each image's key, randomness.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import wandb_reader
from conftest import launch, make_image_tree, read_metrics, start_launch, tiny_args
from safetensors.torch import load_file

from tl_dist.checkpoint import TrainState
from tl_dist.run_dir import STATE_FILE, RunDir

KEEP = 2  # --keep-checkpoints
STEPS_PER_EPOCH = {1: 20, 2: 10}  # 100 images, 80 of them for training, batch 4 per process


def checkpoint_every(nproc: int) -> int:
    return 3 if nproc == 1 else 2  # the first one comes early: the kill lands well before the epoch ends


def run_args(data: Path, out: Path, cache: Path, nproc: int) -> list[str]:
    # 1 process: the default frozen backbone (the classifier trains on cached features); 2 processes: the
    # whole network on images, so both training paths are resumed.
    freeze = ["--freeze", "features"] if nproc == 1 else ["--freeze", "none"]
    return tiny_args(data, out, cache, "--checkpoint-every-steps", str(checkpoint_every(nproc)),
                     "--keep-checkpoints", str(KEEP), "--wandb-mode", "offline", *freeze)


def last_logged_step(out: Path) -> int:
    try:
        return int((out / "wandb_last_step").read_text())
    except (FileNotFoundError, ValueError):  # not yet written, or caught mid-write
        return -1


def run_and_kill(args: list[str], nproc: int, out: Path, timeout: float = 600, ready=None) -> dict:
    """Start a run in its own session and look at it paused: every few milliseconds all its processes are
    stopped (SIGSTOP), and once the paused run is where `ready(out)` says (default: it has a complete
    checkpoint inside an epoch and has logged a later step of that epoch), every process is killed as it
    stands (SIGKILL); else they go on. Returns what it had saved."""
    ready = ready or (lambda out: killed_inside_an_epoch(out, STEPS_PER_EPOCH[nproc]))
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the run
        proc = start_launch(args, nproc, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.01)
            paused = pause_everything(proc.pid)
            if ready(out):
                signal_all(paused, signal.SIGKILL)
                break
            signal_all(paused, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            signal_all(pause_everything(proc.pid), signal.SIGKILL)
        proc.wait()
    output = log.read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode}):\n{output[-4000:]}"
    latest = RunDir(out).latest()
    return {"checkpoint": latest, "state": TrainState.load(latest), "killed_after": last_logged_step(out),
            "output": output}


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread or the process is gone
            pass
    return children + [d for c in children for d in descendants(c)]


def pause_everything(pid: int) -> set[int]:
    """SIGSTOP the launcher, its workers (torchrun starts each in a session of its own, so stopping the
    launcher's process group does not reach them) and W&B's service; returns their pids. Until no process
    appears while they are being stopped, so none runs on afterwards."""
    os.killpg(pid, signal.SIGSTOP)
    stopped = set()
    while (pids := {pid, *descendants(pid)}) != stopped:
        signal_all(pids - stopped, signal.SIGSTOP)
        stopped = pids
    return stopped


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        signal_if_alive(pid, sig)


def signal_if_alive(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def killed_inside_an_epoch(out: Path, steps_per_epoch: int) -> bool:
    """Whether the (paused) run's newest complete checkpoint is inside an epoch and the run has logged a
    later step of that same epoch: the crash to resume from."""
    latest = RunDir(out).latest()
    try:
        state = latest and TrainState.load(latest)
    except FileNotFoundError:  # pruned while we looked
        return False
    return bool(state) and 0 < state.step_in_epoch and \
        state.global_step < last_logged_step(out) < (state.epoch + 1) * steps_per_epoch


def plant_incomplete_checkpoints(out: Path, latest: Path) -> list[Path]:
    """What a kill during a save leaves: a temporary folder, and a step folder without train_state.json;
    both numbered above the real one, so `--resume auto` would take them if it did not check."""
    root = out / "checkpoints"
    tmp = root / ".tmp-step_990"
    shutil.copytree(latest, tmp)
    no_state = root / "step_991"
    shutil.copytree(latest, no_state)
    (no_state / STATE_FILE).unlink()
    return [tmp, no_state]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("resume-images") / "caltech-101", per_class=25)


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def runs(request, resume_data, tmp_path_factory):
    """An uninterrupted run, and a killed-then-resumed one, with the same options."""
    nproc = request.param
    root = tmp_path_factory.mktemp(f"resume-{nproc}proc")
    cache = root / "cache"
    reference = root / "reference"
    ref_proc = launch(run_args(resume_data, reference, cache, nproc), nproc=nproc)
    resumed = root / "resumed"
    killed = run_and_kill(run_args(resume_data, resumed, cache, nproc), nproc, resumed)
    planted = plant_incomplete_checkpoints(resumed, killed["checkpoint"])
    resume_proc = launch(run_args(resume_data, resumed, cache, nproc) + ["--resume", "auto"], nproc=nproc)
    return {"nproc": nproc, "reference": reference, "resumed": resumed, "killed": killed, "planted": planted,
            "outputs": [ref_proc.stdout + ref_proc.stderr, killed["output"],
                        resume_proc.stdout + resume_proc.stderr]}


def test_killed_in_the_middle_of_an_epoch(runs):
    state, killed_after = runs["killed"]["state"], runs["killed"]["killed_after"]
    steps_per_epoch = STEPS_PER_EPOCH[runs["nproc"]]
    # The checkpoint it resumes from is inside an epoch, and the run had gone on past it, in that epoch.
    assert 0 < state.step_in_epoch < steps_per_epoch
    assert state.global_step < killed_after < (state.epoch + 1) * steps_per_epoch


def test_resume_auto_ignores_incomplete_checkpoints(runs):
    """.tmp-step_990 and step_991 (no train_state.json) were planted above the real checkpoint."""
    out = " ".join(runs["outputs"][2].split())  # rich wraps long lines
    assert f"resumed from {runs['killed']['checkpoint']} " in out, out[-3000:]
    assert f"step {runs['killed']['state'].global_step}" in out
    tmp, no_state = runs["planted"]
    assert not tmp.exists()  # removed by the next save, as a killed save's leftover
    assert no_state.is_dir() and no_state not in RunDir(runs["resumed"]).valid_checkpoints()


def test_same_weights_bit_for_bit(runs):
    ref = load_file(str(runs["reference"] / "model" / "model.safetensors"))
    res = load_file(str(runs["resumed"] / "model" / "model.safetensors"))
    assert ref.keys() == res.keys()
    for name in ref:
        assert torch.equal(ref[name], res[name]), name


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "per_second" not in k and "seconds" not in k}


def test_same_metrics(runs):
    ref, res = read_metrics(runs["reference"]), read_metrics(runs["resumed"])
    for split in ("baseline", "test"):
        assert without_timings(ref[split]) == without_timings(res[split]), split
    assert ref["train"]["epoch_loss"] == res["train"]["epoch_loss"]
    assert ref["train"]["global_step"] == res["train"]["global_step"] == 2 * STEPS_PER_EPOCH[runs["nproc"]]


def test_pruning_keeps_the_newest_complete_checkpoints(runs):
    for out in (runs["reference"], runs["resumed"]):
        kept = [int(p.name.removeprefix("step_")) for p in RunDir(out).valid_checkpoints()]
        every, epoch_end = checkpoint_every(runs["nproc"]), STEPS_PER_EPOCH[runs["nproc"]]
        # every N steps, at the end of each epoch, and after the last step (what --epochs M extends)
        expected = sorted({*range(every, 2 * epoch_end, every), epoch_end, 2 * epoch_end})[-KEEP:]
        assert kept == expected
        assert not list((out / "checkpoints").glob(".tmp-*"))  # leftovers of a killed save are cleaned up


def test_wandb_run_continued(runs):
    """The resumed run logs into the same W&B run (offline: a second folder with its id) from the step
    after the last one the killed run handed to W&B, so no step is logged twice. Rows that W&B's service
    had not yet written when it was killed with the rest are lost (here usually all of the first
    folder's); every row that exists holds the numbers of the uninterrupted run."""
    ref_dirs = wandb_reader.run_dirs(runs["reference"] / "wandb")
    dirs = wandb_reader.run_dirs(runs["resumed"] / "wandb")
    assert len(ref_dirs) == 1 and len(dirs) == 2
    run_id = (runs["resumed"] / "wandb_run_id").read_text().strip()
    assert [wandb_reader.run_id(d) for d in dirs] == [run_id, run_id]
    before, after = ({row["_step"]: row for row in wandb_reader.history(d)} for d in dirs)
    reference = {row["_step"]: row for row in wandb_reader.history(ref_dirs[0])}
    killed_after = runs["killed"]["killed_after"]
    assert not before.keys() & after.keys(), "a step was logged twice"
    assert set(before) <= {s for s in reference if s <= killed_after}
    assert set(after) == {s for s in reference if s > killed_after}
    for step, row in {**before, **after}.items():
        for key in ("train/loss", "train/epoch_loss", "finetuned/loss", "finetuned/accuracy"):
            assert row.get(key) == reference[step].get(key), (step, key)
