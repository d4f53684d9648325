"""What a trial's run folder holds, read from its files: a finished run and its metrics, a run the sweep
pruned and its last validation, an unfinished run, or nothing. The study's trial states and summary.csv both
come from here, so they describe what is on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tl_dist.run_dir import STATE_FILE, RunDir, read_json, verify
from tl_dist.sweep.spec import TRAIN_LOSS

SPLIT_METRICS = ("loss", "accuracy", "top5_accuracy")


@dataclass
class RunOutcome:
    status: str  # finished | pruned | unfinished | empty
    metrics: dict = field(default_factory=dict)  # val/..., test/..., train/loss
    epoch: int | None = None  # pruned: the epoch after which the run was stopped
    damaged: str | None = None  # a file that could not be read, and why

    def describe(self) -> str:
        return f"pruned after epoch {self.epoch}" if self.status == "pruned" else self.status


def read_run(folder: Path, just_ended: bool = False) -> RunOutcome:
    """Finished: its metrics.json is written and its final model verifies. Pruned: its latest checkpoint says
    so (a pruned run writes no final model). Unfinished: it holds a run (a split, checkpoints). Empty: not
    started. A file that cannot be read makes the run unfinished (`--resume auto` then deals with it).
    `just_ended`: the caller saw the run end well, after it verified what it wrote: the checksums of its model
    and checkpoint (gigabytes for VGG16) are not computed again."""
    run_dir = RunDir(folder)
    model_ok = run_dir.final_model.is_dir() if just_ended else verify(run_dir.final_model) is None
    if run_dir.metrics.is_file() and run_dir.config.is_file() and model_ok:
        try:
            return RunOutcome("finished", run_metrics(read_json(run_dir.metrics)))
        except (OSError, ValueError) as exc:
            return RunOutcome("unfinished", damaged=f"{run_dir.metrics}: {type(exc).__name__}")
    checkpoint = (run_dir.checkpoint_folders() or [None])[-1] if just_ended else run_dir.latest()
    if checkpoint is not None and checkpoint != run_dir.final_model:
        try:
            state = read_json(checkpoint / STATE_FILE)
        except (OSError, ValueError) as exc:
            return RunOutcome("unfinished", damaged=f"{checkpoint / STATE_FILE}: {type(exc).__name__}")
        if state.get("pruned"):
            return RunOutcome("pruned", pruned_metrics(state), epoch=state["epoch"])
    return RunOutcome("unfinished" if run_dir.holds_run() else "empty")


def run_metrics(saved: dict) -> dict[str, float]:
    """val/..., test/... and train/loss (the last epoch's) from a run's metrics.json."""
    found = {f"{split}/{k}": saved[split][k] for split in ("val", "test") if isinstance(saved.get(split), dict)
             for k in SPLIT_METRICS if k in saved[split]}
    losses = (saved.get("train") or {}).get("epoch_loss") or []
    if losses:
        found[TRAIN_LOSS] = losses[-1]
    return found


def pruned_metrics(state: dict) -> dict[str, float]:
    """The last validation and training loss a pruned run reached, from its checkpoint's train state."""
    history, losses = state.get("val_history") or [], state.get("epoch_losses") or []
    found = {f"val/{k}": history[-1][k] for k in SPLIT_METRICS if history and k in history[-1]}
    if losses:
        found[TRAIN_LOSS] = losses[-1]
    return found
