"""Checkpoints that are complete or absent, and the train state that makes a resume exact.

A checkpoint is `<run_dir>/checkpoints/step_<global step>/`: Accelerate's `save_state` (model weights in
safetensors, optimizer, scheduler, grad scaler, the RNG states of every process) plus `train_state.json`
(where in the data the run is, its running loss, the W&B run id) and `classes.json`. Every process writes
into a temporary folder; the main process reads the weights back (all finite, or nothing is saved), and one
rename, after everyone has written, makes it complete. Older checkpoints are pruned only after that. The
final model is `<run_dir>/model/`, in the same format without optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
STATE_FILE = "train_state.json"
CLASSES_FILE = "classes.json"
WEIGHTS_FILE = "model.safetensors"  # the name Accelerate's save_state gives the first model


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
    train_images: int = 0  # images trained on, over all processes (padding included)
    train_seconds: float = 0.0  # time spent in training steps, over all sessions of the run
    skipped_steps: int = 0  # fp16 steps skipped by the grad scaler
    best_accuracy: float | None = None
    baseline: dict | None = None  # test metrics before fine-tuning
    wandb_run_id: str | None = None
    finished: bool = False

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / STATE_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        return cls(**json.loads((Path(folder) / STATE_FILE).read_text()))


def write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: readers (a resumed run too, after a kill) see the old file
    or the new one, never an empty or half-written one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_", 1)[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step_* folders, oldest first. Temporary folders start with '.', so they never match."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The final model when the run finished, else the newest complete checkpoint, else None."""
    final = Path(run_dir) / FINAL_MODEL
    if (final / STATE_FILE).is_file():
        return final
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def check_checkpoint(folder: Path) -> None:
    folder = Path(folder)
    missing = [name for name in (STATE_FILE, WEIGHTS_FILE, CLASSES_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"--resume {folder}: not a tl_dist checkpoint (missing {', '.join(missing)}). Pass a run's "
            f"output folder with --resume auto, or one of its {CHECKPOINTS}/step_N folders.")


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, classes: list[str], keep: int) -> Path:
    """Called by every process. Returns the complete checkpoint folder."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # each process writes its own RNG state; the main one the rest
    accelerator.wait_for_everyone()
    # Never keep NaN weights: read back what was written (the weights are the same on every process).
    bad = nonfinite_tensors(load_file(str(tmp / WEIGHTS_FILE))) if accelerator.is_main_process else []
    bad = broadcast_object_list([bad])[0]
    if bad:
        if accelerator.is_main_process:
            shutil.rmtree(tmp)
        raise _diverged(state.global_step, bad, find_latest_checkpoint(run_dir))
    if accelerator.is_main_process:
        write_json(tmp / CLASSES_FILE, classes)
        state.save(tmp)  # last file written; the rename below is what makes the folder complete
        if final.exists():  # saved at this step before (a stop right after a resume): swap safely
            old = root / f".old-step_{state.global_step}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
        for leftover in root.glob(".tmp-step_*"):  # from a run that was killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator, model, run_dir: Path, state: TrainState, classes: list[str],
                     config: dict) -> Path:
    """`<run_dir>/model/`: weights (safetensors), class names, config and train state. Main process."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in
               accelerator.unwrap_model(model).state_dict().items()}
    if bad := nonfinite_tensors(weights):
        raise _diverged(state.global_step, bad, find_latest_checkpoint(run_dir))
    final = Path(run_dir) / FINAL_MODEL
    tmp = Path(run_dir) / f".tmp-{FINAL_MODEL}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS_FILE))
    write_json(tmp / CLASSES_FILE, classes)
    write_json(tmp / "config.json", config)
    state.save(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_weights(model, folder: Path) -> None:
    """Load a checkpoint's or final model's weights into an unwrapped model."""
    check_checkpoint(folder)
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"--resume {folder}: its weights do not fit this network (another --model, or another number "
            f"of classes). Resume with the options of the run that wrote it.") from None


def read_classes(folder: Path) -> list[str]:
    return json.loads((Path(folder) / CLASSES_FILE).read_text())
