"""Trust at the edges: every file is verified before it is believed, a failure leaves a folder the same command
can use, and what cannot fit is refused before it is allocated.

One finished reference run shares the module (1 process, 2 epochs of 8 steps, a checkpoint after each, dropout
0, the frozen backbone's features cached). The tests copy it, or its cache, and damage the copy as a crash, a
full disk or a hand would, then check what the next command does: one line, or the results of an undamaged
run. The entry point runs in this process where that suffices; real processes where signals, full disks and
several processes are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch, make_image_tree, read_metrics, run_env, run_module, tiny_args, train_in_process
from test_run_folder import killed_after

import tl_dist
from tl_dist import predict
from tl_dist.checkpoint import CheckpointError
from tl_dist.config import parse_args
from tl_dist.console import PlainPhase, RunConsole
from tl_dist.data import ImageIndex
from tl_dist.prepare import check_split, split_rows
from tl_dist.run_dir import RunDir, verify, write_manifest
from tl_dist.runtime import EXIT_STOPPED

REPORT = ("metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.png",
          "mistakes.csv")


def args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, cache, "--dropout", "0", "--wandb-mode", "disabled", *extra)


def errors(text: str) -> list[str]:
    return ["error: " + e for e in " ".join(text.split()).split("error: ")[1:]]  # rich wraps long lines


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """The entry point in this process: (exit code, stdout, stderr with its lines joined)."""
    code = train_in_process([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def same_results(run_dir: Path, reference: Path) -> None:
    ours, theirs = read_metrics(run_dir), read_metrics(reference)
    assert ours["train"]["epoch_loss"] == theirs["train"]["epoch_loss"]
    assert ours["test"]["loss"] == theirs["test"]["loss"] and ours["baseline"]["loss"] == theirs["baseline"]["loss"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("edges-images") / "caltech-101", per_class=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edges")


@pytest.fixture(scope="module")
def reference(data, root) -> Path:
    out = root / "reference"
    proc = run_module(args(data, out, root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in RunDir(out).checkpoint_folders()] == ["step_8", "step_16"]
    return out


# ---------------------------------------------------------------- a checkpoint carries its identity


def test_a_checkpoint_copied_out_of_its_run_resumes_with_its_own_options(data, root, reference, tmp_path, capsys):
    """Only step_8, away from its run folder: --resume PATH into a new folder takes every option from the
    checkpoint (vgg_tiny, 32 px, lr 0.05, ...: none of them the defaults) and ends as the reference ends."""
    alone = shutil.copytree(reference / "checkpoints" / "step_8", tmp_path / "elsewhere" / "step_8")
    out = tmp_path / "continued"
    code, stdout, stderr = run(["--resume", alone, "--output-dir", out, "--data-dir", data, "--cache-dir",
                                root / "cache"], capsys)
    assert code == 0, stderr[-3000:]
    assert f"resumed from {alone} at epoch 2, step 8" in " ".join(stdout.split())
    same_results(out, reference)


def test_a_resume_into_another_folder_checks_the_checkpoint_identity(data, root, reference, tmp_path, capsys):
    """Against the checkpoint's own config.json and classes: options that define the run, class names that
    differ (same count: every label would silently mean another class), another number of classes. One
    error line each time, one line per difference, and no run folder."""
    base = ["--resume", reference / "checkpoints" / "step_8", "--cache-dir", root / "cache"]
    code, _, stderr = run([*base, "--data-dir", data, "--output-dir", tmp_path / "options-run", "--image-size", "48",
                           "--lr", "0.1", "--seed", "3", "--batch-size", "8"], capsys)
    assert code == 1 and len(errors(stderr)) == 1, stderr
    for line in ("--image-size: saved 32, given 48", "--seed: saved 0, given 3", "--lr: saved 0.05, given 0.1",
                 "--batch-size: saved 4 per process (1 process(es)), given 8"):
        assert line in stderr
    renamed = shutil.copytree(data, tmp_path / "renamed")
    (renamed / "class_01").rename(renamed / "class_01b")  # the same order: labels would line up silently
    more = shutil.copytree(data, tmp_path / "more")
    shutil.copytree(data / "class_00", more / "class_04")
    for folder, line in ((renamed, "only in the checkpoint: class_01; only in --data-dir: class_01b"),
                         (more, "4 classes in the checkpoint, 5 in --data-dir")):
        code, _, stderr = run([*base, "--data-dir", folder, "--output-dir", tmp_path / f"{folder.name}-run"], capsys)
        assert code == 1 and len(errors(stderr)) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"it was trained on other classes than --data-dir {folder} holds" in stderr and line in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more", "renamed"]  # no run folder


def test_checkpoint_files_without_a_manifest_are_verified_by_their_format(reference, tmp_path):
    """Folders written before manifests existed are not trusted because their files are there: each file is
    checked as its format allows, and --resume auto falls back past a truncated one with one warning."""
    out = killed_after(reference, 16, tmp_path / "run")  # after its last checkpoint
    for folder in RunDir(out).checkpoint_folders():
        (folder / "manifest.json").unlink()
    newest = out / "checkpoints" / "step_16"
    assert verify(newest) is None
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json"):
        whole = (newest / name).read_bytes()
        (newest / name).write_bytes(whole[:-7])
        assert verify(newest) == f"{name} is not a whole {name.split('.')[1]} file"
        (newest / name).write_bytes(whole)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    warnings = []
    assert RunDir(out).latest(warn=warnings.append) == out / "checkpoints" / "step_8"
    assert warnings == [f"warning: {newest} is damaged (model.safetensors is not a whole safetensors file); using "
                        "an older checkpoint"]


def test_a_checkpoint_that_verifies_but_cannot_be_loaded_is_one_line(reference, tmp_path, capsys):
    """A pickle where safetensors belong, and a pickle of a class torch will not load, each with a manifest
    that matches: predict, load_model, --eval-only and --resume say so in one line, and never pass on torch's
    advice to load with weights_only=False."""
    out = shutil.copytree(reference, tmp_path / "run")
    torch.save({"weight": torch.zeros(2)}, out / "model" / "model.safetensors")
    write_manifest(out / "model")
    newest = out / "checkpoints" / "step_16"
    torch.save(argparse.Namespace(lr=1.0), newest / "optimizer.bin")
    write_manifest(newest)
    with pytest.raises(SystemExit) as stop:
        predict.main(["--checkpoint", str(out), str(REPO / "README.md")])  # refused before it is read
    stderr = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and len(errors(stderr)) == 1
    assert f"--checkpoint {out / 'model'}: its files verify but cannot be loaded (SafetensorError)" in stderr
    with pytest.raises(CheckpointError, match="its files verify but cannot be loaded"):
        tl_dist.load_model(out / "model")
    for resume in (["--resume", "auto", "--eval-only"], ["--resume", newest, "--epochs", "3"]):
        code, _, stderr = run(["--output-dir", out, *resume], capsys)
        assert code == 1 and len(errors(stderr)) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert "its files verify but cannot be loaded" in stderr and "weights_only" not in stderr


# ---------------------------------------------------------------- the run folder's own files


def test_damaged_run_files_are_one_line_and_the_advice_works_in_the_same_folder(reference, tmp_path, capsys):
    """A truncated split.json or config.json (a full disk, a copy cut short): one line each. For config.json
    it names a checkpoint, which carries the options, and resuming from it in the same --output-dir works."""
    out = killed_after(reference, 16, tmp_path / "run")  # after its last checkpoint
    for name in ("split.json", "config.json"):
        path = out / name
        whole = path.read_bytes()
        path.write_bytes(whole[:40])
        code, _, stderr = run(["--output-dir", out, "--resume", "auto"], capsys)
        assert code == 1 and len(errors(stderr)) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert str(path) in stderr and "JSONDecodeError" in stderr
        if name == "split.json":
            path.write_bytes(whole)
    newest = out / "checkpoints" / "step_16"
    assert f"Resume from a checkpoint, which carries the run's options: --resume {newest} --output-dir {out}" \
        in stderr
    code, _, stderr = run(["--resume", newest, "--output-dir", out], capsys)
    assert code == 0, stderr[-3000:]
    same_results(out, reference)
    assert json.loads((out / "config.json").read_text())["image_size"] == 32


def test_a_finished_run_whose_results_are_missing_writes_them(reference, tmp_path, capsys):
    """A full disk or a kill while the report was written: --eval-only reads past a damaged metrics.json with a
    warning, and --resume auto, instead of calling the run finished, evaluates its final model and writes
    the metrics and the report again."""
    out = shutil.copytree(reference, tmp_path / "run")
    (out / "metrics.json").write_bytes((reference / "metrics.json").read_bytes()[:100])
    (out / "mistakes.png").unlink()
    code, _, stderr = run(["--output-dir", out, "--resume", "auto", "--eval-only"], capsys)
    assert code == 0 and f"warning: {out / 'metrics.json'} is damaged" in stderr, stderr[-3000:]
    code, stdout, stderr = run(["--output-dir", out, "--resume", "auto"], capsys)
    assert code == 0, stderr[-3000:]
    assert f"{out} is finished but lacks metrics.json (damaged), mistakes.png: evaluating its final model again" \
        in " ".join(stdout.split())
    assert all((out / name).is_file() for name in REPORT)
    same_results(out, reference)


# ---------------------------------------------------------------- signals outside training

# The entry point, with SIGTERM sent to itself as the evaluation of PHASE begins: the signal lands in that
# phase however fast the machine is.
SIGNAL_IN_PHASE = """
import os, signal, sys
from tl_dist import train
phase, evaluate = sys.argv.pop(1), train.FineTune.evaluate
def evaluate_after_a_signal(self, s, prefix, step, model=None):
    if prefix == phase:
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self, s, prefix, step, model)
train.FineTune.evaluate = evaluate_after_a_signal
train.cli()
"""


def test_sigterm_outside_training_stops_with_75_and_one_line(data, root, reference, tmp_path, capsys):
    """During the evaluation before fine-tuning and during the final phase, as in training: exit 75 (what the
    Slurm scripts requeue on) and one line. The run then goes on: a folder holding only the start of a run is
    taken back by the same command (not by another); a stopped final phase is finished by --resume auto;
    both end as the reference."""
    phases = {"baseline": "evaluating before fine-tuning", "finetuned": "evaluating and saving the fine-tuned model"}
    procs = {phase: subprocess.Popen([sys.executable, "-c", SIGNAL_IN_PHASE, phase,
                                      *args(data, tmp_path / phase, root / "cache")], cwd=REPO, env=run_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for phase in phases}
    for phase, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == EXIT_STOPPED and "Traceback" not in stderr, stderr[-3000:]
        (line,) = [line for line in stdout.splitlines() if line.startswith("stopped by")]
        assert line == (f"stopped by SIGTERM while {phases[phase]}; no partial file is left. Continue with "
                        f"--resume auto --output-dir {tmp_path / phase}.")
    started = tmp_path / "baseline"
    assert RunDir(started).holds_only_a_start()
    code, _, stderr = run(args(data, started, root / "cache", "--lr", "0.02"), capsys)
    assert code == 1 and errors(stderr)[0].startswith(f"error: {started} already holds a run"), stderr
    code, stdout, stderr = run(args(data, started, root / "cache"), capsys)
    assert code == 0 and f"{started} holds only the start of a run with these options" in stdout, stderr[-3000:]
    same_results(started, reference)
    code, _, stderr = run(args(data, tmp_path / "finetuned", root / "cache", "--resume", "auto"), capsys)
    assert code == 0, stderr[-3000:]
    same_results(tmp_path / "finetuned", reference)


# ---------------------------------------------------------------- cache entries


def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(data, root, reference, tmp_path, capsys):
    """The reference's decoded images cut short, one byte of its features changed: each is noticed (its size
    from its shape; its checksum), removed and built again with one warning, and the run trains as on a cold
    cache."""
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    features = cache / Path(read_metrics(reference)["features"]["path"]).name
    images = cache / json.loads(features.with_suffix(".json").read_text())["key"]["images"]
    images.write_bytes(images.read_bytes()[:-100])
    flipped = bytearray(features.read_bytes())
    flipped[-1] ^= 0xFF
    features.write_bytes(bytes(flipped))
    code, stdout, stderr = run(args(data, tmp_path / "run", cache), capsys)
    assert code == 0, stderr[-3000:]
    assert stderr.count("is damaged") == 2, stderr
    assert f"the cache entry {images} is damaged ({images.stat().st_size - 100} bytes, its shape needs " \
           f"{images.stat().st_size})" in stderr
    assert f"the cache entry {features} is damaged (its checksum does not match)" in stderr
    assert "decoding 40 images once" in stdout and "backbone features of 40 images" in stdout
    same_results(tmp_path / "run", reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (we are root in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root in CI: {done.stderr.decode()}")
        pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_dir_stops_every_process_with_one_line(data, small_disk, tmp_path):
    """Room for the decoded images and their sidecar, not for the features: the space of the features' file is
    reserved before it is mapped, so 1 and 2 processes stop with the one line of a full disk (not SIGBUS),
    leave no temporary file, and write nothing to the run folder. A decoded-image cache that cannot fit at
    all is refused before it is written, with the size that would fit."""
    page = os.statvfs(small_disk).f_frsize
    images = -(-(40 * 32 * 32 * 3 + 128) // page) * page  # the .npy, in whole pages
    room = images + 2 * page  # and its sidecar: the features' file (3 pages) does not fit
    (small_disk / "filler").write_bytes(b"\0" * (os.statvfs(small_disk).f_bavail * page - room))
    cache = small_disk / "cache"
    proc = run_module(args(data, tmp_path / "big", cache, "--image-size", "64"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert errors(proc.stderr) == [f"error: the decoded-image cache of 40 images at 64 px needs 0.5 MB in "
                                   f"--cache-dir {cache}, which has 0.1 MB free: pass --image-size 33 or less, "
                                   "free some space, or pass another --cache-dir"]
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        proc = (run_module(args(data, out, cache)) if nproc == 1 else
                launch(args(data, out, cache), nproc=2, check=False))
        assert proc.returncode == 1 and f'File "{REPO / "tl_dist"}' not in proc.stderr, proc.stderr[-3000:]
        # One line, from the main process (2 processes: the launcher adds its own report after it).
        assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
            f"error: the disk is full: a write in {cache} failed for lack of space; nothing partial was kept. Free "
            "some space (python -m tl_dist.cache prune trims --cache-dir), then run the same command again."]
        assert not out.exists()
        assert sorted(p.name.split("-")[0] + p.suffix for p in cache.iterdir()) == \
            [".features.lock", "images.json", "images.npy"]


# ---------------------------------------------------------------- what cannot be measured, or cannot fit


def test_splits_far_from_what_was_asked_are_named_or_refused():
    """Each class of 2 or more keeps a test image: on classes of 2 images --test-fraction 0.2 holds out half
    (a warning); a validation split that gets no image is refused, saying what would work."""
    index = ImageIndex(Path("data"), [f"c{c}/{i}.jpg" for c in range(3) for i in range(2)], [0, 0, 1, 1, 2, 2],
                       ["c0", "c1", "c2"])
    cfg = parse_args(["--model", "vgg_tiny", "--weights", "none", "--image-size", "32"])
    warnings = []
    check_split(cfg, index, split_rows(cfg, index, list(range(6))), warnings.append)
    assert warnings == ["warning: --test-fraction 0.2 holds out 3 of 6 images (50%): on classes this small each "
                        "split takes at least one image of a class that has 2 or more"]
    cfg.val_fraction = 0.5
    with pytest.raises(tl_dist.data.DataError, match=r"--val-fraction 0.5: no validation image can be held out.*"
                                                     r"a class needs 3 images for one of each split"):
        check_split(cfg, index, split_rows(cfg, index, list(range(6))), warnings.append)


def test_predict_refuses_what_this_machine_cannot_do(reference, capsys):
    """A GPU the machine does not have, and an image size whose one batch cannot fit in memory: one line each,
    before an image is read; load_model on a path that does not exist says so."""
    image = str(REPO / "README.md")  # never read
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for flags, message in ((["--device", missing], f"argument --device: {missing}: this machine has "),
                           (["--image-size", "100000"], "argument --image-size: one batch of 32 images at 100000 "
                                                        "px through vgg_tiny needs at least 25,280.0 GB")):
        with pytest.raises(SystemExit) as stop:
            predict.main(["--checkpoint", str(reference), image, *flags])
        stderr = " ".join(capsys.readouterr().err.split())
        assert stop.value.code == 2 and len(errors(stderr)) == 1 and message in stderr, stderr
    with pytest.raises(CheckpointError, match="no such folder"):
        tl_dist.load_model(reference / "no-such-run")


def test_a_long_epoch_in_a_log_is_paced_by_time():
    """A 5,000-step epoch at 0.1 s a step (over 8 minutes), in a log: a line at the start, at each tenth and at
    least every 30 s (--log-every), each with the loss; not one every few steps."""
    console = RunConsole(True, every_s=45)
    console.live = False  # a log, whatever runs the tests
    epoch = console.start_task("epoch 2/5", 5000, completed=100)  # resumed in the middle of the epoch
    assert isinstance(epoch, PlainPhase) and (epoch.unit, epoch.every_s, epoch.count) == ("steps", 45, 100)
    clock, lines = [0.0], []
    phase = PlainPhase(lines.append, "epoch 1/5", 5000, unit="steps", clock=lambda: clock[0])
    for step in range(1, 5001):
        clock[0] += 0.1
        phase.update(step, f"loss {1 / step:.4f}  40 img/s")
    assert 20 <= len(lines) <= 30, lines
    assert lines[0] == "epoch 1/5 0/5000 steps" and lines[-1].startswith("epoch 1/5 5000/5000 steps")
    assert lines[1] == "epoch 1/5 300/5000 steps (10.0 steps/s, ETA 7:50)  loss 0.0033  40 img/s"
