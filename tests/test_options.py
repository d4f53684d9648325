"""Every training option, exercised by a real run through the real entry point, with an assertion on what it
changes (not only that the run exits 0): --scale-lr, --lr-schedule cosine, --grad-compression bf16/fp16,
--compile and --channels-last; and the STOP file, which makes a run checkpoint and exit with 75.

Two families of runs on the same generated images (4 classes x 25: 80 train / 20 test), each option against
a reference run with the same options but that one:
- two processes (`accelerate launch`, gloo) for the options about several processes, and the STOP file:
  3 epochs of 10 steps on the cached backbone features, a checkpoint every 2 steps;
- one process (in this process, or `python -m tl_dist.train`) for the options about the network: 2 epochs
  of 20 steps, training the whole network so that the convs see --channels-last and --compile in training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import wandb_reader
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME
from conftest import (REPO, assert_close, launch, make_image_tree, read_metrics, run_env, run_module, start_launch,
                      tiny_args, train_in_process)
from safetensors.torch import load_file
from test_resume import descendants, signal_if_alive

from tl_dist.checkpoint import TrainState, check_checkpoint
from tl_dist.run_dir import (CHECKPOINTS, CLASSES_FILE, CONFIG_FILE, FINAL_MODEL, METRICS_FILE, STATE_FILE, STOP_FILE,
                             WEIGHTS_FILE, RunDir)

LR = 0.05  # tiny_args' --lr
TWO_PROCS = ("--epochs", "3", "--checkpoint-every-steps", "2", "--wandb-mode", "offline")
TWO_PROC_STEPS = 3 * 10  # 80 training images, 40 per process, batches of 4
ONE_PROC = ("--epochs", "2", "--freeze", "none", "--wandb-mode", "offline")
ONE_PROC_STEPS = 2 * 20
RTOL = 1e-4  # the same numbers, up to float summation order (NHWC kernels, compiled kernels)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("options-images") / "caltech-101", per_class=25)


@pytest.fixture(scope="module")
def two_procs(data, tmp_path_factory):
    """run(name, *options) -> the folder of a 2-process run with TWO_PROCS and `options`; each run once."""
    root = tmp_path_factory.mktemp("options-2proc")
    done: dict[str, Path] = {}

    def run(name: str, *options: str) -> Path:
        if name not in done:
            launch(tiny_args(data, root / name, root / "cache", *TWO_PROCS, *options), nproc=2)
            done[name] = root / name
        return done[name]
    return run


@dataclass
class ConvCall:
    training: bool
    weight_nhwc: bool  # channels_last (NHWC) memory format
    input_nhwc: bool


@dataclass
class InProcessRun:
    dir: Path
    convs: list[ConvCall]  # every forward call of a Conv2d during the run


@contextlib.contextmanager
def recording_convs():
    """Every Conv2d forward call of the run in this process, with the memory format of its weight and input
    (not the memory estimate's, on the meta device: tl_dist/capacity.py)."""
    calls: list[ConvCall] = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and inputs[0].device.type != "meta":
            nhwc = torch.channels_last
            calls.append(ConvCall(module.training, module.weight.is_contiguous(memory_format=nhwc),
                                  inputs[0].is_contiguous(memory_format=nhwc)))
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def one_proc(data, tmp_path_factory):
    """run(name, *options) -> InProcessRun of a 1-process run with ONE_PROC and `options`, in this
    process; each run once."""
    root = tmp_path_factory.mktemp("options-1proc")
    done: dict[str, InProcessRun] = {}

    def run(name: str, *options: str) -> InProcessRun:
        if name not in done:
            with recording_convs() as convs:
                code = train_in_process(tiny_args(data, root / name, root / "cache", *ONE_PROC, *options),
                                        env={"WANDB_DIR": None})
            assert code == 0
            done[name] = InProcessRun(root / name, convs)
        return done[name]
    return run


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / FINAL_MODEL / WEIGHTS_FILE))


def run_config(run_dir: Path) -> dict:
    return json.loads((run_dir / CONFIG_FILE).read_text())


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of `key` in the run's one offline W&B run."""
    (wandb_run,) = wandb_reader.run_dirs(run_dir / "wandb")
    return {row["_step"]: row[key] for row in wandb_reader.history(wandb_run) if key in row}


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "per_second" not in k and "seconds" not in k}


def assert_same_metrics(run: Path, reference: Path, rtol: float) -> None:
    ours, ref = read_metrics(run), read_metrics(reference)
    for split in ("baseline", "test"):
        assert_close(without_timings(ours[split]), without_timings(ref[split]), rtol, split)
    assert ours["train"]["epoch_loss"] == pytest.approx(ref["train"]["epoch_loss"], rel=rtol)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------- options of several processes


def test_scale_lr_multiplies_the_lr_by_the_number_of_processes(two_procs):
    reference, scaled = two_procs("reference"), two_procs("scale-lr", "--scale-lr")
    assert run_config(reference)["effective_lr"] == read_metrics(reference)["train"]["lr"] == LR
    assert run_config(scaled)["effective_lr"] == read_metrics(scaled)["train"]["lr"] == 2 * LR
    (wandb_run,) = wandb_reader.run_dirs(scaled / "wandb")
    assert wandb_reader.config(wandb_run)["effective_lr"] == 2 * LR
    # The optimizer used it: the lr W&B got at every step is the scaled one, and the weights moved further.
    steps = list(range(1, TWO_PROC_STEPS + 1))
    assert logged(reference, "train/lr") == {s: LR for s in steps}
    assert logged(scaled, "train/lr") == {s: 2 * LR for s in steps}
    ref_loss, scaled_loss = logged(reference, "train/loss"), logged(scaled, "train/loss")
    assert scaled_loss[1] == ref_loss[1]  # the same start
    assert scaled_loss[2] != ref_loss[2]  # after the first, larger, update
    assert all(not torch.equal(w, weights(reference)[k]) for k, w in weights(scaled).items()
               if k.startswith("classifier"))


def test_grad_compression_rounds_the_gradients_of_the_all_reduce(two_procs):
    """The DDP hook rounds each gradient to 16 bits for the all-reduce: the forward pass is untouched (the
    first step's loss is bit-identical), every update after it is off in the low bits, bf16 (8-bit
    mantissa) more than fp16 (11 bits), and the run ends close to the uncompressed one."""
    reference = two_procs("reference")
    compressed = {fmt: two_procs(f"compress-{fmt}", "--grad-compression", fmt) for fmt in ("bf16", "fp16")}
    ref_weights, ref_metrics = weights(reference), read_metrics(reference)
    ref_loss = logged(reference, "train/loss")
    deviation = {}
    for fmt, run in compressed.items():
        assert run_config(run)["grad_compression"] == fmt
        loss = logged(run, "train/loss")
        assert loss[1] == ref_loss[1], fmt
        assert [loss[s] for s in sorted(loss)] != [ref_loss[s] for s in sorted(ref_loss)], fmt
        metrics = read_metrics(run)
        assert metrics["test"]["loss"] == pytest.approx(ref_metrics["test"]["loss"], rel=1e-2), fmt
        assert metrics["test"]["loss"] != ref_metrics["test"]["loss"], fmt
        assert metrics["train"]["epoch_loss"] == pytest.approx(ref_metrics["train"]["epoch_loss"], rel=1e-2)
        deviation[fmt] = max_difference(weights(run), ref_weights)
    assert deviation["bf16"] > deviation["fp16"] > 0, deviation
    assert deviation["bf16"] < 1e-2, deviation  # rounding, not another training


# ---------------------------------------------------------------- the STOP file and exit code 75


@contextlib.contextmanager
def paused(pid: int):
    """SIGSTOP the launcher and every process under it (torchrun puts its workers in sessions of their
    own), SIGCONT them afterwards: what happens meanwhile lands between two of the run's steps."""
    with contextlib.suppress(ProcessLookupError):  # the run is already over: the test says so after
        os.killpg(pid, signal.SIGSTOP)
    frozen: set[int] = set()
    while (pids := {pid, *descendants(pid)}) != frozen:  # until no process appeared while freezing
        for p in pids - frozen:
            signal_if_alive(p, signal.SIGSTOP)
        frozen = pids
    try:
        yield
    finally:
        for p in frozen:
            signal_if_alive(p, signal.SIGCONT)


def run_until_stopped(args: list[str], nproc: int, out: Path, timeout: float = 600) -> tuple[int, str]:
    """Start the run (`python -m tl_dist.train` for one process, `accelerate launch` for more); once its first
    checkpoint is complete, create <out>/STOP while the run is paused, so that the file lands mid-run,
    deterministically. Returns the exit code and the output."""
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the run
        streams = {"stdout": sink, "stderr": subprocess.STDOUT, "start_new_session": True}
        proc = subprocess.Popen([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, env=run_env(),
                                **streams) if nproc == 1 else start_launch(args, nproc, **streams)
    deadline = time.monotonic() + timeout
    try:
        while not RunDir(out).checkpoint_folders():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.005)
        with paused(proc.pid):
            (out / STOP_FILE).touch()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # the test failed: leave no process behind
            for pid in [proc.pid, *descendants(proc.pid)]:
                signal_if_alive(pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def assert_stopped_with_a_checkpoint(out: Path, output: str, steps_per_epoch: int, processes: int) -> Path:
    """The run said where it stopped and how to go on, left a complete checkpoint of that very step,
    nothing of a finished run, and no STOP file. Returns the checkpoint."""
    flat = "".join(output.split())  # rich wraps long lines, anywhere in a path too
    stopped = re.search(r"stoprequested\(\S*?STOPexists\):savingacheckpointatstep(\d+)", flat)
    assert stopped, output[-4000:]
    step = int(stopped.group(1))
    assert 2 < step < 3 * steps_per_epoch  # after the first checkpoint (step 2), before the end
    assert f"stopped;continuewith--resumeauto--output-dir{out}" in flat, output[-4000:]
    latest = RunDir(out).latest()
    assert latest == out / CHECKPOINTS / f"step_{step}"
    check_checkpoint(latest)
    saved = {p.name for p in latest.iterdir()}
    assert {STATE_FILE, CLASSES_FILE, WEIGHTS_FILE, f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin",
            *(f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(processes))} <= saved, saved
    state = TrainState.load(latest)
    assert (state.global_step, state.epoch, state.step_in_epoch) == (step, *divmod(step, steps_per_epoch))
    assert not state.finished
    assert not (out / FINAL_MODEL).exists() and not (out / METRICS_FILE).exists()
    assert not (out / STOP_FILE).exists()
    return latest


def test_stop_file_exits_75(data, tmp_path):
    """`python -m tl_dist.train`, one process (the 2-process runs' options: 20 steps an epoch): the exit
    code is the run's own."""
    out = tmp_path / "stopped"
    code, output = run_until_stopped(tiny_args(data, out, tmp_path / "cache", *TWO_PROCS), 1, out)
    assert code == 75, output[-4000:]
    assert_stopped_with_a_checkpoint(out, output, steps_per_epoch=20, processes=1)


def test_stop_file_stops_every_process_and_resumes_exactly(two_procs, data, tmp_path):
    """`accelerate launch`, two processes: both stop after the same step with one checkpoint, and
    --resume auto then ends exactly where the uninterrupted run ends."""
    reference = two_procs("reference")
    out = tmp_path / "stopped"
    args = tiny_args(data, out, tmp_path / "cache", *TWO_PROCS)
    code, output = run_until_stopped(args, 2, out)
    # The processes exit with 75. torchrun takes the first of them for a failure: it SIGTERMs the others
    # if they are still shutting down, reports "rank : R (local_rank: R) ... exitcode : 75 | -15" and
    # `accelerate launch` exits 1 (the sbatch scripts exit 75 for it).
    assert code != 0, output[-4000:]
    workers = dict(re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*exitcode\s*:\s*(-?\d+)", output))
    assert "75" in workers.values() and set(workers.values()) <= {"75", str(-signal.SIGTERM)}, output[-4000:]
    latest = assert_stopped_with_a_checkpoint(out, output, steps_per_epoch=10, processes=2)
    step = TrainState.load(latest).global_step

    proc = launch(args + ["--resume", "auto"], nproc=2)
    assert f"resumedfrom{latest}atepoch{step // 10 + 1},step{step}" in "".join(proc.stdout.split())
    ours, ref = read_metrics(out), read_metrics(reference)
    assert ours["train"]["epoch_loss"] == ref["train"]["epoch_loss"]
    assert ours["train"]["global_step"] == ref["train"]["global_step"] == TWO_PROC_STEPS
    for split in ("baseline", "test"):
        assert without_timings(ours[split]) == without_timings(ref[split]), split
    ref_weights = weights(reference)
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, ref_weights[name]), name


# ---------------------------------------------------------------- options of the network and the schedule


def test_cosine_schedule_decays_the_lr_to_zero_over_all_steps(one_proc):
    reference, cosine = one_proc("reference").dir, one_proc("cosine", "--lr-schedule", "cosine").dir
    assert run_config(cosine)["lr_schedule"] == "cosine"
    lrs = logged(cosine, "train/lr")
    assert sorted(lrs) == list(range(1, ONE_PROC_STEPS + 1))  # over both epochs, not restarted per epoch
    for step, lr in lrs.items():  # logged after the step's update: the lr of the next step
        expected = LR * 0.5 * (1 + math.cos(math.pi * step / ONE_PROC_STEPS))
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12), step
    assert lrs[ONE_PROC_STEPS] < 1e-12
    assert lrs[ONE_PROC_STEPS // 2] == pytest.approx(LR / 2)
    assert set(logged(reference, "train/lr").values()) == {LR}
    assert all(not torch.equal(w, weights(reference)[k]) for k, w in weights(cosine).items())


def test_channels_last_runs_the_convs_in_nhwc_with_the_same_numbers(one_proc):
    reference, nhwc = one_proc("reference"), one_proc("channels-last", "--channels-last")
    assert_same_metrics(nhwc.dir, reference.dir, RTOL)
    # Every conv call, in training and in evaluation, had NHWC weights and inputs; without the option the
    # weights are NCHW. (The inputs are NHWC either way: the decoded-image cache holds H x W x 3 images,
    # and the batches keep that layout, so the convs already run in NHWC without the option.)
    assert len(nhwc.convs) == len(reference.convs) > 0
    assert {c.training for c in nhwc.convs} == {True, False}
    assert all(c.weight_nhwc and c.input_nhwc for c in nhwc.convs)
    assert not any(c.weight_nhwc for c in reference.convs)


def test_compile_gives_the_same_numbers(one_proc, data, tmp_path):
    """`python -m tl_dist.train --compile` (torch.compile's inductor, which builds C++ kernels with the
    system compiler on a CPU) against the uncompiled run. Its kernels go to a fresh cache folder: that they
    are there shows the network was compiled (torch.compile is lazy: nothing is built unless it runs)."""
    reference = one_proc("reference").dir
    out, kernels = tmp_path / "compiled", tmp_path / "inductor"
    proc = run_module(tiny_args(data, out, tmp_path / "cache", *ONE_PROC, "--compile"),
                      env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert run_config(out)["compile"] is True
    assert list(kernels.rglob("*.so")), sorted(p.name for p in kernels.rglob("*"))[:50]
    assert_same_metrics(out, reference, RTOL)
