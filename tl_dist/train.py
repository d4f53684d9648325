"""Fine-tune VGG16 on Caltech-101: `accelerate launch tl_dist/train.py [options]` or `python -m tl_dist.train`.

The article's workflow is the recipe `FineTune.run`, read top to bottom: plan (the run folder, what a resume
continues), set up (the data decoded once and split 80/20, the ImageNet network with a new last layer, the
phases of training with their optimizer and batches, W&B: run_setup.py), evaluate before fine-tuning,
fine-tune (phases.py: LP-FT probes the head first), evaluate after it, save and report. `evaluate_only` is
--eval-only. Everything a run writes goes to its run folder (run_dir.py), which it
owns while it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, sys.path[0] is tl_dist/ itself, where our module names (config, data, ...) would
    # shadow other packages' modules. Import the package from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import importlib.util  # noqa: E402
import os  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from tl_dist.augment import AugmentOptions  # noqa: E402
from tl_dist.checkpoint import SAVE_STEPS, CheckpointError, TrainState, load_state, load_weights, save_checkpoint, \
    save_final_model  # noqa: E402
from tl_dist.config import Config, build_parser, check_memory, parse_args  # noqa: E402
from tl_dist.console import RunConsole, end_process  # noqa: E402
from tl_dist.data import DataError, GlobalBatchSampler  # noqa: E402
from tl_dist.engine import LoopHooks, Outcome, TrainLog, evaluate, fit  # noqa: E402
from tl_dist.launch_check import exit_if_unsupported_setup  # noqa: E402
from tl_dist.model import TransferNet, WeightsError, build_network  # noqa: E402
from tl_dist.phases import build_training, phase_at, plan_phases  # noqa: E402
from tl_dist.prepare import PreparedData, image_batches, prepare_data  # noqa: E402
from tl_dist.report import build_report, log_report, print_summary, write_report  # noqa: E402
from tl_dist.resume import ResumePlan, check_classes, choose_run_dir, claim_run_dir, plan_resume, run_dir_of, \
    with_saved_options  # noqa: E402
from tl_dist.run_dir import DamagedFileError, DiskFullError, RunDir, RunDirError, is_disk_full, read_json, \
    write_json  # noqa: E402
from tl_dist.run_setup import Setup, split_batches, write_run_start  # noqa: E402
from tl_dist.runtime import EXIT_PRUNED, EXIT_STOPPED, Interrupted, StopRequest, build_accelerator, \
    configure_threads, gradient_accumulation, stop_on_signals, stop_with_launcher  # noqa: E402
from tl_dist.sweep.pruning import SweepTrial  # noqa: E402
from tl_dist.sync_bn import convert_sync_batchnorm  # noqa: E402
from tl_dist.tracking import Tracker, resolve_mode, wandb_run  # noqa: E402

USER_ERRORS = (DataError, WeightsError, CheckpointError, RunDirError)


class FineTune:
    """The article's recipe on any number of processes: plan, set up, evaluate the baseline, fine-tune (in
    phases: LP-FT probes first), evaluate, save and report, clean up. Every process runs every method;
    Accelerate and the run folder's rules decide who writes what."""

    def __init__(self, cfg: Config, saved: dict | None, accelerator: Accelerator, console: RunConsole,
                 wandb_mode: str, threads: int):
        self.cfg, self.saved, self.accelerator, self.console = cfg, saved, accelerator, console
        self.wandb_mode, self.threads = wandb_mode, threads
        self.run_dir = RunDir(choose_run_dir(cfg, accelerator))

    def run(self) -> int:
        """The recipe. A signal outside training (set-up, the evaluations, the report) ends it with
        runtime.Interrupted, which main() turns into the stop code and one line; in training, fit() saves a
        checkpoint first."""
        with stop_on_signals("setting up"):
            plan = self.plan(claim=True)
            if plan.finished:
                self.console.print(plan.finished)
                return 0
            s = self.setup(plan)
        if s.state.baseline is None:
            with stop_on_signals("evaluating before fine-tuning"):
                s.state.baseline, _ = self.evaluate(s, "baseline", step=0)
        outcome = self.train(s)
        if outcome is Outcome.PRUNED:
            s.tracker.mark({"sweep/pruned_after_epoch": s.state.epoch}, tag="pruned")
        if outcome is not Outcome.FINISHED:
            s.tracker.finish()
        if outcome is Outcome.STOPPED:
            self.console.print(f"stopped; continue with --resume auto --output-dir {self.run_dir}")
            return EXIT_STOPPED
        if outcome is Outcome.PRUNED:
            return EXIT_PRUNED
        if outcome is Outcome.DIVERGED:
            kept = self.run_dir.latest()
            self.console.print(f"the last good checkpoint is {kept}" if kept else
                               "no checkpoint was saved before it: the run has nothing to resume from")
            return 1
        with stop_on_signals("evaluating and saving the fine-tuned model"):
            metrics, outputs = self.evaluate(s, "finetuned", step=s.state.global_step, model=s.final_model)
            self.save_and_report(s, metrics, outputs)
        return 0

    def cleanup(self) -> None:
        self.console.stop_progress()
        self.run_dir.abandon()  # unlocks; removes only what a run that never started created

    # ---- plan and set up
    def plan(self, claim: bool) -> ResumePlan:
        """Claim the run folder (a training run; --eval-only only reads it), then decide what a --resume
        continues or evaluates, with the options adjusted to it (`plan.cfg`)."""
        if claim and (again := claim_run_dir(self.run_dir, self.accelerator, self.cfg)):
            self.console.print(again)
        plan = plan_resume(self.cfg, self.saved, self.run_dir, self.accelerator.num_processes,
                           gradient_accumulation(self.cfg), self.accelerator.mixed_precision, self.console.warn)
        if plan.note:
            self.console.print(plan.note)
        return plan

    def setup(self, plan: ResumePlan) -> Setup:
        """Everything the run needs, checked before the run folder gets its first file: the data and split,
        the checkpoint's classes, the network, the phase the run is in (with the checkpoint it continues), the
        features. So a failure here leaves the folder as it was."""
        cfg, accelerator = plan.cfg, self.accelerator
        data = prepare_data(cfg, accelerator, self.console, self.run_dir, self.threads)
        if plan.checkpoint is not None:
            check_classes(plan.checkpoint, data.index.classes, cfg.data_dir)
        net = self.build_model(plan, data)
        # The same global batches for any number of processes (data.GlobalBatchSampler), with each image's
        # mixing partner when images are mixed.
        sampler = GlobalBatchSampler(len(data.train_rows), cfg.batch_size, accelerator.num_processes,
                                     accelerator.process_index, cfg.seed, gradient_accumulation(cfg),
                                     partners=AugmentOptions.from_config(cfg).mixes)
        phases, state = plan_phases(cfg), plan.state or TrainState()
        s = Setup(cfg, data, net, sampler, phases, state, Tracker(accelerator, self.run_dir, self.wandb_mode))
        if plan.report_only:  # the final model: weights only, nothing left to train
            load_weights(net, plan.checkpoint)
        self.start_phase(s, phase_at(phases, state.global_step, sampler.steps_per_epoch),
                         None if plan.report_only else plan.checkpoint)
        s.facts = s.run_facts(accelerator, self.run_dir)
        write_run_start(s, self.accelerator, self.run_dir, self.console)  # all is known to be good: the run starts
        s.tracker.start(wandb_run(cfg, default_name=self.run_dir.path.name), s.run_config)
        self.console.print(s.facts.describe(cfg.batch_size))
        return s

    def start_phase(self, s: Setup, index: int, checkpoint: Path | None = None) -> None:
        """Phase `index`'s training (phases.build_training) and batches; then the checkpoint it continues
        from, if any (model, optimizer, schedule, weight average, every RNG)."""
        phase = s.phases[index]
        s.phase = index
        s.training, s.settings = build_training(self.accelerator, phase, s.net, s.sampler.steps_per_epoch)
        s.batches, features = split_batches(phase.cfg, self.accelerator, self.console, s.data, s.training.model,
                                            s.sampler)
        s.features = s.features or features
        if len(s.phases) > 1:
            self.console.print(f"phase {index + 1}/{len(s.phases)}, {phase.describe()}")
        if checkpoint is not None:
            load_state(self.accelerator, checkpoint)
            self.console.print(f"resumed from {checkpoint} at epoch {s.state.epoch + 1}, step {s.state.global_step}")

    def build_model(self, plan: ResumePlan, data: PreparedData) -> TransferNet:
        """The network with its new head; its ImageNet weights downloaded once per node (unless a checkpoint
        brings the weights). --sync-bn: with BatchNorm layers synchronised across processes."""
        with self.accelerator.local_main_process_first():
            net = build_network(plan.cfg, len(data.index.classes), from_checkpoint=plan.checkpoint is not None)
        return convert_sync_batchnorm(net, self.accelerator.device) if plan.cfg.sync_bn else net

    # ---- evaluate, train, save
    def evaluate(self, s: Setup, prefix: str, step: int, model=None) -> tuple[dict, dict]:
        """Exact test metrics of `model` (default: the phase's), logged under prefix/ with a grid of predictions
        (the first 32 test images, the same for every number of processes). Returns the metrics and the
        gathered outputs."""
        classes = s.data.index.classes
        model = s.training.model if model is None else model
        metrics, outputs = evaluate(self.accelerator, model, s.batches.test, classes, self.console)
        s.tracker.log({f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        n = min(32, len(outputs["labels"]))
        preds, labels = outputs["logits"][:n].argmax(1).tolist(), outputs["labels"][:n].tolist()
        captions = [f"pred: {classes[p]} / label: {classes[y]}" for p, y in zip(preds, labels)]
        s.tracker.images(f"{prefix}/predictions", s.data.images(s.data.test_rows).images(range(n)), captions,
                         step=step)
        self.console.print(f"{prefix}: test loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.2%}")
        return metrics, outputs

    def train(self, s: Setup) -> Outcome:
        """Each phase in turn, from the one the run is in; a phase before the last ends with its test metrics
        (LP-FT: the probe's, `state.probe`)."""
        trial = SweepTrial.from_environment(self.accelerator)  # a sweep's trial that its pruner may end; else None
        with StopRequest(self.run_dir.stop_file) as stop:
            while True:
                validate = (lambda state: self._validate(s, state, trial)) if s.batches.val is not None else None
                hooks = LoopHooks(stop, lambda: self._save_checkpoint(s), validate)
                outcome = fit(s.training, s.batches.train, s.state, s.settings,
                              TrainLog(s.tracker, self.console, s.settings), hooks)
                if outcome is not Outcome.FINISHED or s.phase == len(s.phases) - 1:
                    return outcome
                if s.state.probe is None:
                    s.state.probe, _ = self.evaluate(s, s.phases[s.phase].name, step=s.state.global_step)
                self.start_phase(s, s.phase + 1)

    def _validate(self, s: Setup, state: TrainState, trial: SweepTrial | None) -> bool:
        """After each epoch: exact loss, accuracy and top-5 on the validation split, of the weights (val/*) and
        of their average (val_ema/*, with --ema-decay), kept in the train state (so a resumed run has the whole
        history). The test split chooses nothing. Returns whether the sweep's pruner ends the run here (on the
        final model's numbers: the average's, with --ema-decay)."""
        record = {"epoch": state.epoch, "global_step": state.global_step}
        models = [("val", "", "validation", s.training.model)]
        if s.training.ema is not None:
            models.append(("val_ema", "ema_", "validation, average of the weights,", s.training.ema.model))
        for prefix, key, title, model in models:
            metrics, _ = evaluate(self.accelerator, model, s.batches.val, s.data.index.classes, self.console)
            scores = {k: metrics[k] for k in ("loss", "accuracy", "top5_accuracy")}
            record.update({key + k: v for k, v in scores.items()})
            s.tracker.log({f"{prefix}/{k}": v for k, v in scores.items()}, step=state.global_step)
            self.console.print(f"epoch {state.epoch}: {title} loss {scores['loss']:.4f}, accuracy "
                               f"{scores['accuracy']:.2%}")
        state.val_history.append(record)
        return trial is not None and trial.should_prune(state.epoch, scores)

    def _save_checkpoint(self, s: Setup) -> None:
        with self.console.phase("saving checkpoint", SAVE_STEPS, unit="steps") as progress:
            folder = save_checkpoint(self.accelerator, self.run_dir, s.state, s.data.index.classes, s.run_config,
                                     s.cfg.keep_checkpoints, on_step=progress.advance)
        self.console.print(f"checkpoint: {folder}")

    def save_and_report(self, s: Setup, test_metrics: dict, outputs: dict) -> None:
        """metrics.json, model/ (what marks the run finished) and the report, on the main process; then W&B
        and the summary. `test_metrics` and `outputs` are the final model's; with --ema-decay the trained
        weights themselves are evaluated too (test_raw)."""
        classes, state, raw_model = s.data.index.classes, s.state, s.training.model
        report = build_report(outputs, classes)  # the same on every process
        test_metrics["per_class"] = report.per_class()
        state.finished = True
        raw = self.evaluate(s, "finetuned_raw", state.global_step, raw_model)[0] if s.training.ema else None
        metrics = s.metrics_record(test_metrics, raw)
        if self.accelerator.is_main_process:
            # metrics.json first: model/ is what marks the run finished, so a crash between the two
            # leaves a run that --resume auto completes rather than one without metrics.
            write_json(self.run_dir.metrics, metrics)
            # The model is written in a thread (safetensors and hashing release the GIL) while this one
            # draws the report's pictures.
            with ThreadPoolExecutor(1) as pool:
                saving = pool.submit(save_final_model, self.accelerator, s.final_model, self.run_dir, state,
                                     classes, s.run_config, raw_model if s.training.ema is not None else None)
                write_report(report, self.run_dir.path, s.data.images(s.data.test_rows), s.data.test_files(),
                             self.console.warn)
                saving.result()
        self.accelerator.wait_for_everyone()
        log_report(s.tracker, report, self.run_dir.path, "finetuned", step=state.global_step)
        if s.cfg.wandb_log_model:
            s.tracker.log_model(self.run_dir.final_model, test_metrics)
        s.tracker.finish()
        print_summary(self.console, report, state.baseline, test_metrics, self.run_dir.path)


# ---------------------------------------------------------------- --eval-only


def evaluate_only(recipe: FineTune) -> int:
    """--eval-only: evaluate a saved model on the run's split. It only reads the run; its results go to
    eval/<model>/ in the run folder, so a finished run's metrics and report stay as they are."""
    plan = recipe.plan(claim=False)
    data = prepare_data(plan.cfg, recipe.accelerator, recipe.console, recipe.run_dir, recipe.threads)
    check_classes(plan.checkpoint, data.index.classes, plan.cfg.data_dir)
    model = recipe.build_model(plan, data)
    load_weights(model, plan.checkpoint)
    model = recipe.accelerator.prepare(model)
    test_images = data.images(data.test_rows)
    metrics, outputs = evaluate(recipe.accelerator, model, image_batches(plan.cfg, recipe.accelerator, test_images,
                                                                       model), data.index.classes, recipe.console)
    report = build_report(outputs, data.index.classes)
    metrics["per_class"] = report.per_class()
    folder = recipe.run_dir.eval_dir(plan.checkpoint)
    if recipe.accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / recipe.run_dir.metrics.name, {"test": metrics, "eval_only": {
            "checkpoint": str(plan.checkpoint), "num_processes": recipe.accelerator.num_processes}})
        write_report(report, folder, test_images, data.test_files(), recipe.console.warn)
    recipe.accelerator.wait_for_everyone()
    baseline = _baseline_of_run(recipe)
    print_summary(recipe.console, report, baseline, metrics, folder)
    return 0

def _baseline_of_run(recipe: FineTune) -> dict | None:
    """The baseline in the run's metrics.json, to compare with; None (and a warning) when it is damaged."""
    try:
        return read_json(recipe.run_dir.metrics).get("baseline") if recipe.run_dir.metrics.is_file() else None
    except DamagedFileError as exc:
        recipe.console.warn(f"warning: {exc}; the summary leaves out the baseline")
        return None


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    exit_if_unsupported_setup()  # DeepSpeed, FSDP, Megatron-LM, XLA: refused before anything is written
    try:
        cfg, saved = with_saved_options(parse_args(argv))  # a resume: the run's own options
    except USER_ERRORS as exc:
        RunConsole(True).error(str(exc))
        return 1
    check_memory(cfg)
    wandb_mode, wandb_note = resolve_mode(cfg.wandb_mode)
    tracking = wandb_mode != "disabled" and not cfg.eval_only
    if tracking and importlib.util.find_spec("wandb") is None:
        build_parser().error(f"argument --wandb-mode: W&B logging ({wandb_mode}) needs wandb: pip install "
                             "wandb, or pass --wandb-mode disabled")
    console = recipe = None
    try:
        stop_with_launcher()
        try:
            accelerator = build_accelerator(cfg, "wandb" if tracking else None)
        except ValueError as exc:
            build_parser().error(str(exc))
        console = RunConsole(accelerator.is_main_process, every_s=cfg.log_every)
        if wandb_note and tracking and accelerator.is_main_process:
            console.print(f"W&B: {wandb_note}; sync later with `wandb sync "
                          f"{os.environ.get('WANDB_DIR') or run_dir_of(cfg) or 'runs/<run>'}/wandb/offline-run-*`")
        recipe = FineTune(cfg, saved, accelerator, console, wandb_mode if tracking else "disabled",
                          configure_threads(cfg, accelerator.device))
        return evaluate_only(recipe) if cfg.eval_only else recipe.run()
    except USER_ERRORS as exc:
        (console or RunConsole(True)).error(str(exc))
        return 1
    except Interrupted as exc:  # outside training: nothing to checkpoint, and what was being written is removed
        started = recipe is not None and recipe.run_dir.holds_run()
        again = (f"Continue with --resume auto --output-dir {recipe.run_dir}." if started else
                 "To continue, run the same command again.")
        (console or RunConsole(True)).print(f"stopped by {exc}; no partial file is left. {again}")
        return EXIT_STOPPED
    except Exception as exc:
        if (message := disk_full_message(exc, cfg, recipe)) is None:
            raise
        (console or RunConsole(True)).error(message)
        return 1
    finally:
        if recipe is not None:
            recipe.cleanup()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo can abort the process at exit


def disk_full_message(exc: Exception, cfg: Config, recipe: FineTune | None) -> str | None:
    """The one line for a write that failed for lack of space, in the run folder or in --cache-dir (None when
    `exc` is something else): the same line for both, with what to do next."""
    run_dir = recipe.run_dir if recipe is not None else None
    folders = ([run_dir.path] if run_dir is not None else []) + [Path(cfg.cache_dir)]
    folder = (Path(exc.filename) if isinstance(exc, DiskFullError) else
              next((f for f in folders if is_disk_full(exc, f)), None))
    if folder is None:
        return None
    if run_dir is not None and folder == run_dir.path:
        then = f"The last complete checkpoint is {run_dir.latest() or 'none'}. Free some space, then run again with " \
               "--resume auto."
    else:
        then = "Free some space (python -m tl_dist.cache prune trims --cache-dir), then run the same command again."
    return f"the disk is full: a write in {folder} failed for lack of space; nothing partial was kept. {then}"


def cli() -> None:
    """The command line: `python -m tl_dist.train`, `accelerate launch tl_dist/train.py`, `tl-dist-train`."""
    end_process(main())


if __name__ == "__main__":
    cli()
