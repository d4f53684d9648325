"""What a run is made of once it is set up: its data, network, phases, batches and tracker (`Setup`), and
the two steps of set-up that build them from the options: the batches of each split (`split_batches`: the
cached images, or the frozen backbone's cached features) and the files that mark the start of the run
(`write_run_start`). `train.FineTune` runs the recipe on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from tl_dist.checkpoint import TrainState
from tl_dist.config import Config, RunFacts
from tl_dist.console import RunConsole
from tl_dist.data import GlobalBatchSampler
from tl_dist.engine import Batches, LoopSettings, Training
from tl_dist.model import TransferNet
from tl_dist.optim import effective_lr
from tl_dist.phases import Phase
from tl_dist.prepare import PreparedData, build_feature_store, feature_batches, image_batches, training_batches
from tl_dist.run_dir import RunDir, write_json, write_text
from tl_dist.runtime import gradient_accumulation
from tl_dist.tracking import Tracker


@dataclass
class SplitBatches:
    """The batches of each split: training (our global sampler), validation (None without --val-fraction)
    and test (sharded by Accelerate)."""
    train: Batches
    val: Batches | None
    test: Batches


@dataclass
class Setup:
    """Everything FineTune.setup built, which the rest of the recipe uses. `phase`, `training`, `settings` and
    `batches` are those of the phase in progress (FineTune.start_phase)."""
    cfg: Config  # the options, resolved for a resume (the per-process batch follows the processes)
    data: PreparedData
    net: TransferNet  # the network itself, which each phase's `training.model` wraps
    sampler: GlobalBatchSampler  # the same global batches for any number of processes
    phases: list[Phase]
    state: TrainState
    tracker: Tracker
    facts: RunFacts | None = None
    phase: int = 0
    training: Training | None = None  # the model, optimizer and schedule under Accelerate
    settings: LoopSettings | None = None
    batches: SplitBatches | None = None
    features: dict | None = None  # where the frozen backbone's features are, and what they cost (None: no cache)

    @property
    def run_config(self) -> dict:
        return {**self.cfg.to_dict(), **dataclasses.asdict(self.facts)}

    def run_facts(self, accelerator: Accelerator, run_dir: RunDir) -> RunFacts:
        cfg, data, sampler = self.cfg, self.data, self.sampler
        return RunFacts(
            num_processes=accelerator.num_processes, gradient_accumulation_resolved=gradient_accumulation(cfg),
            global_batch_size=sampler.global_batch, effective_lr=effective_lr(cfg, accelerator.num_processes),
            num_classes=len(data.index.classes), train_samples=len(data.train_rows), val_samples=len(data.val_rows),
            test_samples=len(data.test_rows), device=str(accelerator.device),
            mixed_precision_resolved=accelerator.mixed_precision,
            feature_cache=any(p.cfg.uses_feature_cache for p in self.phases), steps_per_epoch=sampler.steps_per_epoch,
            output_dir_resolved=str(run_dir), cpu_threads=torch.get_num_threads(), mean=list(self.net.mean),
            std=list(self.net.std))

    @property
    def final_model(self) -> torch.nn.Module:
        """What the run delivers: the average of the weights with --ema-decay, else the weights."""
        return self.training.ema.model if self.training.ema is not None else self.training.model

    def metrics_record(self, test: dict, test_raw: dict | None) -> dict:
        """What metrics.json holds: the test metrics before fine-tuning, after the LP-FT probe, of the final
        model and (with --ema-decay) of the trained weights; the training; validation after every epoch."""
        state, facts = self.state, self.facts
        train = {"epoch_loss": state.epoch_losses, "seconds": state.train_seconds,
                 "images_per_second": state.train_images / max(state.train_seconds, 1e-9),
                 "global_step": state.global_step, "global_batch_size": facts.global_batch_size,
                 "lr": facts.effective_lr, "num_processes": facts.num_processes, "skipped_steps": state.skipped_steps}
        record = {"baseline": state.baseline, "test": test, "train": train, "features": self.features,
                  "skipped_files": sorted(self.data.bad), "config": self.run_config}
        record.update({k: v for k, v in (("probe", state.probe), ("test_raw", test_raw)) if v is not None})
        if state.val_history:  # the last epoch's numbers, and every epoch's
            record["val"] = {**state.val_history[-1], "history": state.val_history}
        return record


def split_batches(cfg: Config, accelerator: Accelerator, console: RunConsole, data: PreparedData, model,
                  sampler: GlobalBatchSampler) -> tuple[SplitBatches, dict | None]:
    """The batches of `cfg`'s training: cached images, or (a frozen backbone) its features, computed once per
    image and kept on disk. Training batches come from `sampler`, augmented when `cfg` says so. Returns the
    batches and what the features cost (None without the feature cache)."""
    store, features = None, None
    if cfg.uses_feature_cache:
        store, seconds = build_feature_store(cfg, accelerator, console, model, data)
        images = len(data.train_rows) + len(data.val_rows) + len(data.test_rows)
        features = {"path": str(store.array_path), "reused": seconds is None, "seconds": seconds,
                    "images_per_second": images / seconds if seconds else None}

    def batches(rows: list[int], sampler=None) -> Batches | None:
        if not rows:
            return None
        if store is not None:
            return feature_batches(cfg, accelerator, store, data.images(rows), sampler)
        return image_batches(cfg, accelerator, data.images(rows), model, sampler)

    train = (batches(data.train_rows, sampler) if store is not None
             else training_batches(cfg, accelerator, data, model, sampler))
    return SplitBatches(train, batches(data.val_rows), batches(data.test_rows)), features


def write_run_start(s: Setup, accelerator: Accelerator, run_dir: RunDir, console: RunConsole) -> None:
    """The run folder's first files, once everything is known to be good: the owner's name in the lock, the
    options (config.json), the split (a new run's), the files that could not be decoded."""
    bad = s.data.bad
    if accelerator.is_main_process:
        run_dir.record_owner()
        write_json(run_dir.config, s.run_config)
        if not run_dir.split.is_file():
            write_json(run_dir.split, s.data.split_record(s.cfg))
        if bad:
            write_text(run_dir.skipped, "".join(f"{f}\t{why}\n" for f, why in bad.items()))
    accelerator.wait_for_everyone()
    if bad:
        first = ", ".join(f"{f} ({why})" for f, why in list(bad.items())[:10])
        console.warn(f"warning: skipped {len(bad)} file(s) that cannot be decoded (all listed in "
                     f"{run_dir.skipped}): {first}" + (" ..." if len(bad) > 10 else ""))
