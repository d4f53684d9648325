"""The run folder's rules (tl_dist/run_dir.py), with real runs, real processes, real signals and real files.

Two finished reference runs share the module: `ref1` (1 process, batch 8) and `ref2` (2 processes, batch 4),
the same global batch of 8, 2 epochs of 4 steps, a checkpoint every 2 steps, all kept. A killed run is what
a copy of a reference leaves when everything after step 6 is removed: exactly what a kill after step 6's
checkpoint leaves behind. Dropout is 0, so that runs on different numbers of processes are comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ci_tools import missing_tool
from conftest import REPO, launch, make_image_tree, read_metrics, run_env, run_module, start_launch, tiny_args
from test_resume import descendants

from tl_dist.checkpoint import TrainState
from tl_dist.run_dir import RunDir, verify

COMMON = ["--epochs", "2", "--checkpoint-every-steps", "2", "--keep-checkpoints", "20", "--dropout", "0",
          "--wandb-mode", "disabled"]


def args(data: Path, out: Path, cache: Path, *extra: str, batch: int = 8) -> list[str]:
    return [*tiny_args(data, out, cache, *COMMON), "--batch-size", str(batch), *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    text = " ".join(proc.stderr.split())  # rich wraps long lines
    return ["error: " + e for e in text.split("error: ")[1:]]


def killed_after(reference: Path, step: int, dest: Path) -> Path:
    """A copy of a finished run as a kill right after step `step`'s checkpoint leaves it."""
    shutil.copytree(reference, dest)
    run = RunDir(dest)
    for folder in run.checkpoint_folders():
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    shutil.rmtree(run.final_model)
    for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.png",
                 "mistakes.csv"):
        (dest / name).unlink()
    return dest


def same_training(a: dict, b: dict, rtol: float = 0.0) -> None:
    assert a["train"]["global_step"] == b["train"]["global_step"]
    assert a["train"]["epoch_loss"] == pytest.approx(b["train"]["epoch_loss"], rel=rtol, abs=0)
    assert a["test"]["loss"] == pytest.approx(b["test"]["loss"], rel=rtol, abs=0)
    assert a["baseline"]["loss"] == pytest.approx(b["baseline"]["loss"], rel=rtol, abs=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("run-folder-images") / "caltech-101", per_class=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run-folder")


@pytest.fixture(scope="module")
def ref1(data, root) -> Path:
    out = root / "ref1"
    proc = run_module(args(data, out, root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ref2(data, root) -> Path:
    out = root / "ref2"
    launch(args(data, out, root / "cache", batch=4), nproc=2)
    return out


def test_the_references_train_the_same_on_one_and_two_processes(ref1, ref2):
    """The same global batches whatever the number of processes: 1 x 8 and 2 x 4 train alike."""
    one, two = read_metrics(ref1), read_metrics(ref2)
    assert one["train"]["global_batch_size"] == two["train"]["global_batch_size"] == 8
    same_training(one, two, rtol=1e-4)
    assert [p.name for p in RunDir(ref1).valid_checkpoints()] == ["step_2", "step_4", "step_6", "step_8"]


# ---------------------------------------------------------------- 1. reusing a folder


@pytest.mark.parametrize("kind", ["finished", "killed"])
def test_a_new_run_never_reuses_a_folder_that_holds_a_run(kind, data, root, ref1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref1, out) if kind == "finished" else killed_after(ref1, 6, out)
    before = snapshot(out)
    proc = run_module(args(data, out, root / "cache", "--lr", "0.2"))
    assert proc.returncode == 1
    assert errors(proc) == [f"error: {out} already holds a run. Continue it with --resume auto --output-dir "
                            f"{out}, or start a new one in another --output-dir."], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "not a byte of the folder may change"


# ---------------------------------------------------------------- 2. resume checks identity


def test_a_resume_refuses_other_run_defining_options_and_takes_the_saved_ones(data, root, ref1, tmp_path):
    out = killed_after(ref1, 6, tmp_path / "run")
    before = snapshot(out)
    proc = run_module(args(data, out, root / "cache", "--resume", "auto", "--lr", "0.2", "--seed", "3"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    text = proc.stderr
    assert "--lr: saved 0.05, given 0.2" in text and "--seed: saved 0, given 3" in text, text[-2000:]
    assert len(errors(proc)) == 1
    assert snapshot(out) == before
    # `--resume auto --output-dir` alone continues the run as it was set up: every option from config.json
    proc = run_module(["--output-dir", str(out), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_6" in " ".join(proc.stdout.split())
    same_training(read_metrics(out), read_metrics(ref1))


# ---------------------------------------------------------------- 3. one run per folder


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_run_per_folder_and_no_stale_lock(data, root, tmp_path):
    out = tmp_path / "run"
    slow = tiny_args(data, out, root / "cache", "--epochs", "400", "--wandb-mode", "disabled",
                     "--checkpoint-every-epochs", "0")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "tl_dist.train", *slow], cwd=REPO, env=run_env(),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (out / ".lock").is_file() and (out / ".lock").read_text().strip(), 120, "the owner")
        owner = json.loads((out / ".lock").read_text())
        assert owner["pid"] == first.pid
        second = run_module([*slow, "--resume", "auto"], timeout=60)
        assert second.returncode == 1
        assert errors(second) == [f"error: {out} is in use by another run (host {owner['host']}, pid {first.pid}, "
                                  f"since {owner['started']}); wait for it to end, or pass another --output-dir."]
        assert first.poll() is None, "the first run must be unaffected"
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the kernel drops the lock with the process
        first.wait()
        # no stale lock: the resume starts (and stops at once on the STOP file, with a checkpoint)
        (out / "STOP").touch()
        resumed = run_module([*slow, "--resume", "auto", "--checkpoint-every-steps", "1"], timeout=300)
        assert resumed.returncode == 75, resumed.stderr[-3000:]
        assert json.loads((out / ".lock").read_text())["pid"] != first.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)


def test_eval_only_and_predict_only_read_a_run(ref1, data, tmp_path):
    """They take no lock and change nothing: --eval-only writes its results to eval/<model>/ only."""
    out = tmp_path / "run"
    shutil.copytree(ref1, out)
    before = snapshot(out)
    proc = run_module(["--output-dir", str(out), "--resume", "auto", "--eval-only"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before
    assert read_metrics(out / "eval" / "model")["test"]["loss"] == pytest.approx(read_metrics(ref1)["test"]["loss"])
    images = sorted((data / "class_01").iterdir())[:3]
    predict = run_module(["--checkpoint", str(out), *map(str, images), "--json"], module="tl_dist.predict")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert [json.loads(line)["file"] for line in predict.stdout.splitlines()] == list(map(str, images))
    assert snapshot(out) == after


# ---------------------------------------------------------------- 4. killing the launcher


def test_killing_the_launcher_stops_its_workers(data, root, tmp_path):
    out = tmp_path / "run"
    run = args(data, out, root / "cache", "--epochs", "40", "--freeze", "none", batch=4)
    with open(tmp_path / "run.log", "wb") as log:
        launcher = start_launch(run, 2, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        wait_for(lambda: RunDir(out).checkpoint_folders(), 300, "a checkpoint")
        workers = [p for p in descendants(launcher.pid) if b"train.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() and b"Z" not in Path(f"/proc/{p}/stat").read_bytes().split()[2]
                  for p in workers):
            assert time.monotonic() < deadline, "workers still running 30 s after their launcher died"
            time.sleep(0.1)
    finally:
        for p in workers + [launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    assert not list((out / "checkpoints").glob(".*")), "no partial checkpoint"
    assert all(verify(f) is None for f in RunDir(out).checkpoint_folders())
    # Finish early (cheaper), one epoch after the one the workers stopped in, however far a busy machine let
    # them get before the kill.
    stopped = TrainState.load(RunDir(out).latest()).epoch
    epochs = str(stopped + 2)
    resumed = launch(run + ["--resume", "auto", "--epochs", epochs], nproc=2)
    assert resumed.returncode == 0
    reference = tmp_path / "reference"
    launch(args(data, reference, root / "cache", "--epochs", epochs, "--freeze", "none", batch=4), nproc=2)
    same_training(read_metrics(out), read_metrics(reference), rtol=1e-6)


# ---------------------------------------------------------------- 5. a damaged newest checkpoint


@pytest.mark.parametrize("damage", ["truncated weights", "bad JSON", "missing file"])
def test_a_damaged_newest_checkpoint_falls_back(damage, data, root, ref1, tmp_path):
    out = killed_after(ref1, 6, tmp_path / "run")
    newest = out / "checkpoints" / "step_6"
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad JSON":
        (newest / "train_state.json").write_text("{not json")
    else:
        (newest / "optimizer.bin").unlink()
    proc = run_module(args(data, out, root / "cache", "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(" ".join(proc.stderr.split()).split("is damaged")) == 2, proc.stderr  # one warning
    assert str(newest) in " ".join(proc.stderr.split()) and warnings
    assert f"resumed from {out / 'checkpoints' / 'step_4'} " in " ".join(proc.stdout.split())
    same_training(read_metrics(out), read_metrics(ref1))


def test_predict_and_eval_only_fall_back_or_stop_with_one_line(ref1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref1, out)
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    image = next((ref1.parent.parent).rglob("*.jpg"), None) or next(Path("/work").rglob("*.jpg"))
    folder = run_module(["--checkpoint", str(out), str(image)], module="tl_dist.predict")
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert f"{out / 'model'} is damaged" in " ".join(folder.stderr.split())
    assert f"model: {out / 'checkpoints' / 'step_8'}" in " ".join(folder.stderr.split())
    explicit = run_module(["--checkpoint", str(out / "model"), str(image)], module="tl_dist.predict")
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert "model.safetensors has" in explicit.stderr and explicit.stderr.count("error:") == 1
    evaluated = run_module(["--output-dir", str(out), "--resume", str(out / "model"), "--eval-only"])
    assert evaluated.returncode == 1 and len(errors(evaluated)) == 1 and "Traceback" not in evaluated.stderr
    assert "not a usable tl_dist checkpoint (model.safetensors has" in errors(evaluated)[0]
    fallback = run_module(["--output-dir", str(out), "--resume", "auto", "--eval-only"])
    assert fallback.returncode == 0 and (out / "eval" / "step_8" / "metrics.json").is_file()


# ---------------------------------------------------------------- 6. extending a finished run


def test_a_finished_run_is_extended_bit_for_bit(data, root, ref1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref1, out)
    model_before = snapshot(out / "model")
    same = run_module(args(data, out, root / "cache", "--resume", "auto"))
    assert same.returncode == 0 and "is finished (2 epochs" in " ".join(same.stdout.split())
    assert "--epochs N with N above 2" in " ".join(same.stdout.split())
    assert snapshot(out / "model") == model_before
    longer = run_module(args(data, out, root / "cache", "--resume", "auto", "--epochs", "3"))
    assert longer.returncode == 0, longer.stderr[-3000:]
    straight = tmp_path / "straight"
    assert run_module(args(data, straight, root / "cache", "--epochs", "3")).returncode == 0
    extended, reference = read_metrics(out), read_metrics(straight)
    assert extended["train"]["epoch_loss"] == reference["train"]["epoch_loss"]  # bit for bit
    assert extended["test"]["loss"] == reference["test"]["loss"]
    assert extended["train"]["global_step"] == 12 and snapshot(out / "model") != model_before


def test_a_cosine_run_is_not_extended(data, root, tmp_path):
    out = tmp_path / "run"
    assert run_module(args(data, out, root / "cache", "--lr-schedule", "cosine", "--epochs", "1")).returncode == 0
    before = snapshot(out)
    proc = run_module(args(data, out, root / "cache", "--resume", "auto", "--epochs", "2"))
    assert proc.returncode == 1 and len(errors(proc)) == 1 and "cosine" in errors(proc)[0]
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


# ---------------------------------------------------------------- 7. another number of processes


def test_resume_from_two_processes_on_one(data, root, ref2, tmp_path):
    out = killed_after(ref2, 6, tmp_path / "run")
    proc = run_module(args(data, out, root / "cache", "--resume", "auto", batch=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming on 1 process(es) instead of 2: 8 images per process" in " ".join(proc.stdout.split())
    # The first session's decoded images and features are found again, not rebuilt.
    assert "decoding" not in proc.stdout and "features: reused" in proc.stdout, proc.stdout[-3000:]
    same_training(read_metrics(out), read_metrics(ref2), rtol=1e-4)


def test_resume_from_one_process_on_two(data, root, ref1, tmp_path):
    out = killed_after(ref1, 6, tmp_path / "run")
    proc = launch(args(data, out, root / "cache", "--resume", "auto"), nproc=2)
    assert "resuming on 2 process(es) instead of 1: 4 images per process" in " ".join(proc.stdout.split())
    same_training(read_metrics(out), read_metrics(ref1), rtol=1e-4)


def test_a_resume_shorter_than_what_was_trained_is_refused(data, root, ref1, tmp_path):
    out = killed_after(ref1, 6, tmp_path / "run")  # in epoch 2 of 2 (4 steps an epoch)
    before = snapshot(out)
    proc = run_module(args(data, out, root / "cache", "--resume", "auto", "--epochs", "1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc) == [f"error: --epochs 1: {out} is already in epoch 2 (step 6); pass --epochs 2 or more, "
                            "or leave --epochs out to finish the run as planned."]
    assert snapshot(out) == before


def test_a_global_batch_that_does_not_split_is_refused(data, root, ref1, tmp_path):
    out = killed_after(ref1, 6, tmp_path / "run")
    proc = launch(args(data, out, root / "cache", "--resume", "auto"), nproc=3, check=False)
    assert proc.returncode != 0
    assert "global batch of 8 cannot be split over 3 processes; resume it on 1, 2, 4, 8 process(es)" in \
        " ".join(proc.stderr.split())


# ---------------------------------------------------------------- 8. a full disk


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        missing_tool(f"mounting a tmpfs is not allowed here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_and_resumes(data, root, ref1, small_disk):
    out = small_disk / "run"
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 200 * 1024))  # room for one checkpoint (~120 kB), not for two
    proc = run_module(args(data, out, root / "cache", "--keep-checkpoints", "1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = errors(proc)
    assert line.startswith(f"error: the disk is full: a write in {out} failed") and "step_2" in line, line
    leftovers = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert not leftovers, leftovers
    assert all(verify(f) is None for f in RunDir(out).checkpoint_folders())
    filler.unlink()
    resumed = run_module(args(data, out, root / "cache", "--keep-checkpoints", "1", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_training(read_metrics(out), read_metrics(ref1))
