"""Checkpoints that are complete and verified, or absent, and the train state that makes a resume exact.

A checkpoint is `<run_dir>/checkpoints/step_<global step>/`: Accelerate's `save_state` (model weights in
safetensors, optimizer, scheduler, grad scaler, the RNG states of every process) plus `train_state.json`
(where in the data the run is, its running loss), and the run's identity: `classes.json` and `config.json`
(what a resume from it, into any folder, is checked against); last a manifest of every file's size and
SHA-256. Every process writes into a temporary folder; the main process reads the weights back (all
finite, or nothing is saved), and one rename, after everyone has written, makes it complete. Older
checkpoints are pruned only after that. A save that fails (a full disk) leaves no temporary folder. The final
model is `<run_dir>/model/`, in the same format without optimizer state, put in place by one atomic exchange.
Names and the verification live in `run_dir.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from tl_dist.run_dir import (CLASSES_FILE, CONFIG_FILE, RAW_WEIGHTS_FILE, STATE_FILE, WEIGHTS_FILE, DiskFullError,
                             RunDir, exchange, read_json, verify, write_json, write_manifest)
from tl_dist.runtime import together


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what to do."""


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN or inf: the run diverged, and they are not saved."""


def nonfinite_tensors(weights: dict) -> list[str]:
    return [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _diverged(step: int, names: list[str], kept: Path | None) -> NonFiniteWeightsError:
    return NonFiniteWeightsError(
        f"non-finite weights after step {step} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): "
        f"not saved; the last good checkpoint is {kept or 'none'}. The run diverged: try a lower --lr, "
        "or --mixed-precision no.")


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress, counted from 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum of the (all-process mean) step losses of `epoch` so far
    epoch_loss_steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)  # mean loss of each finished epoch
    train_images: int = 0  # images trained on, over all processes
    train_seconds: float = 0.0  # time spent in training steps, over all sessions of the run
    skipped_steps: int = 0  # fp16 steps skipped by the grad scaler
    baseline: dict | None = None  # test metrics before fine-tuning
    probe: dict | None = None  # LP-FT: test metrics after the probe phase
    val_history: list[dict] = field(default_factory=list)  # validation metrics after each epoch
    pruned: bool = False  # a sweep's pruner ended the run after `epoch` epochs
    finished: bool = False

    def count_step(self, loss: float, images: int, skipped_steps: int) -> None:
        """One optimizer step was taken over `images` images (a non-finite fp16 loss is left out of the mean)."""
        self.global_step += 1
        self.step_in_epoch += 1
        if math.isfinite(loss):
            self.epoch_loss_sum += loss
            self.epoch_loss_steps += 1
        self.train_images += images
        self.skipped_steps = skipped_steps

    def end_epoch(self) -> None:
        """Close the epoch in progress (at its end, or at --max-steps): keep its mean loss, start the next."""
        self.epoch_losses.append(self.epoch_loss_sum / max(self.epoch_loss_steps, 1))
        self.epoch, self.step_in_epoch, self.epoch_loss_sum, self.epoch_loss_steps = self.epoch + 1, 0, 0.0, 0

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / STATE_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        saved = read_json(Path(folder) / STATE_FILE)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})  # fields this version does not know are ignored


def check_checkpoint(folder: Path, option: str = "--resume") -> None:
    """A clear error for a folder that is not a complete, undamaged checkpoint or final model."""
    folder = Path(folder)
    why = verify(folder)
    if why is not None:
        raise CheckpointError(
            f"{option} {folder}: not a usable tl_dist checkpoint ({why}). Pass a run's output folder with "
            "--resume auto (it falls back to the newest checkpoint that verifies), or another step_N folder.")


SAVE_STEPS = 3  # written, checked, in place: what `on_step` counts


def save_checkpoint(accelerator, run_dir: RunDir, state: TrainState, classes: list[str], config: dict, keep: int,
                    on_step=lambda: None) -> Path:
    """Called by every process. Returns the complete checkpoint folder. `config`: the run's config.json.
    `on_step()` is called after each of its SAVE_STEPS steps (progress)."""
    run_dir = RunDir.of(run_dir)
    final = run_dir.checkpoint(state.global_step)
    tmp = run_dir.tmp_folder(final)
    if accelerator.is_main_process:
        for leftover in run_dir.stale_tmp_checkpoints():  # from a run killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _all_or_nothing(accelerator, run_dir, tmp, lambda: accelerator.save_state(str(tmp)))
    on_step()
    # Never keep NaN weights: read back what was written (the weights are the same on every process).
    bad = nonfinite_tensors(load_file(str(tmp / WEIGHTS_FILE))) if accelerator.is_main_process else []
    bad = broadcast_object_list([bad])[0]
    if bad:
        if accelerator.is_main_process:
            shutil.rmtree(tmp)
        raise _diverged(state.global_step, bad, run_dir.latest())
    on_step()

    def finish():
        if accelerator.is_main_process:
            write_json(tmp / CLASSES_FILE, classes)
            write_json(tmp / CONFIG_FILE, config)
            state.save(tmp)
            write_manifest(tmp)  # last: a folder whose files match it is complete and undamaged
            exchange(tmp, final)  # a checkpoint saved at this step before (a stop right after a resume)
    _all_or_nothing(accelerator, run_dir, tmp, finish)
    on_step()
    if accelerator.is_main_process:  # prune; folders numbered above this step (damaged, say) are left alone
        older = [f for f in run_dir.checkpoint_folders() if run_dir.checkpoint_step(f) <= state.global_step]
        for stale in older[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _all_or_nothing(accelerator, run_dir: RunDir, tmp: Path, write) -> None:
    """Run `write` on every process; if it failed on any, remove `tmp` and raise on all (DiskFullError for a
    full disk), so that they stop together and nothing half-written stays."""
    try:
        together(write, run_dir.path)
    except Exception as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DiskFullError):
            raise
        raise CheckpointError(f"saving a checkpoint in {run_dir.checkpoints} failed: {type(exc).__name__}: "
                              f"{exc}") from exc


def _weights(accelerator, model) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def save_final_model(accelerator, model, run_dir: RunDir, state: TrainState, classes: list[str],
                     config: dict, raw_model=None) -> Path:
    """`<run_dir>/model/`: weights (safetensors), class names, config and train state, and their manifest;
    it replaces an older model/ (an extended run) in one step. Main process. With --ema-decay, `model` is the
    average of the weights and `raw_model` the trained weights themselves, kept beside it (raw.safetensors)."""
    run_dir = RunDir.of(run_dir)
    weights = _weights(accelerator, model)
    raw = _weights(accelerator, raw_model) if raw_model is not None else None
    if bad := nonfinite_tensors({**weights, **(raw or {})}):
        raise _diverged(state.global_step, bad, run_dir.latest())
    tmp = run_dir.tmp_folder(run_dir.final_model)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        if raw is not None:
            save_file(raw, str(tmp / RAW_WEIGHTS_FILE))
        write_json(tmp / CLASSES_FILE, classes)
        write_json(tmp / CONFIG_FILE, config)
        state.save(tmp)
        write_manifest(tmp)
        exchange(tmp, run_dir.final_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir.final_model


def load_weights(model, folder: Path, option: str = "--resume") -> None:
    """Load a checkpoint's or final model's weights into an unwrapped model."""
    check_checkpoint(folder, option)
    with unloadable(folder, option):
        state = load_file(str(Path(folder) / WEIGHTS_FILE))
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{option} {folder}: its weights do not fit this network (another --model, or another number "
            f"of classes). Resume with the options of the run that wrote it.") from None


def load_state(accelerator, folder: Path) -> None:
    """Accelerate's load_state of a checkpoint (model, optimizer, scheduler, every RNG), on every process."""
    with unloadable(folder, "--resume"):
        accelerator.load_state(str(folder))


@contextlib.contextmanager
def unloadable(folder: Path, option: str) -> Iterator[None]:
    """A folder that verifies but whose files cannot be loaded (not what their names say: a pickle where
    safetensors belong, files of another program) is a CheckpointError of one line. The loader's own
    message is left out: torch's, for one, advises loading with weights_only=False, which would run
    whatever code a pickle holds."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - safetensors, torch.load, pickle and Accelerate raise many kinds
        raise CheckpointError(
            f"{option} {folder}: its files verify but cannot be loaded ({type(exc).__name__}): they are not what "
            "tl_dist writes. Pass another checkpoint of the run (a checkpoints/step_N folder).") from None


def read_classes(folder: Path) -> list[str]:
    return read_json(Path(folder) / CLASSES_FILE)
