"""What `--resume` continues, and what it may change.

A resume continues the run saved in the run folder: its `config.json` gives every option the command line
does not (so `--resume auto --output-dir X` alone continues X as it was set up). Options that define the
run (`config.RUN_DEFINING`, and the global batch) may not change: each difference is one line of the error.
Everything else may: --epochs (a finished run is extended), --output-dir, --cache-dir, --num-workers, W&B
and logging options, checkpoint cadence, speed options, and the number of processes (the global batch is
kept: the per-process batch becomes global batch / processes).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

from tl_dist.checkpoint import CheckpointError, TrainState, check_checkpoint, read_classes
from tl_dist.config import NOT_FROM_FILES, RUN_DEFINING, Config, as_saved, read_options_file
from tl_dist.run_dir import CONFIG_FILE, FINAL_MODEL, DamagedFileError, RunDir, RunDirError, read_json


def run_dir_of(cfg: Config) -> Path | None:
    """--output-dir, else the run folder holding a --resume PATH."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume not in (None, "auto"):
        return run_folder_of(Path(cfg.resume))
    return None


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder that holds a checkpoints/step_N or model/ folder."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent if checkpoint.name == FINAL_MODEL else checkpoint.parent.parent


def choose_run_dir(cfg: Config, accelerator) -> Path:
    """--output-dir (or the folder of --resume PATH), else runs/<date-time> chosen by the main process."""
    from accelerate.utils import broadcast_object_list

    folder = run_dir_of(cfg)
    if folder is not None:
        return folder
    return Path(broadcast_object_list([datetime.datetime.now().strftime("runs/%Y-%m-%d_%H-%M-%S")])[0])


def claim_run_dir(run_dir: RunDir, accelerator, cfg: Config) -> str | None:
    """The main process locks the run folder and checks that a new run does not reuse one (RunDir.claim);
    every process hears the outcome. A folder that holds nothing but the start of a run with the same
    options (one that failed before its first checkpoint) is taken back by the same command, which
    continues it as --resume auto would: returns a line that says so, else None."""
    from accelerate.utils import broadcast_object_list

    error, note = None, None
    if accelerator.is_main_process:
        try:
            again = cfg.resume is None and _same_start(run_dir, cfg)
            run_dir.claim(resume=cfg.resume is not None or again)
            if again:
                note = (f"{run_dir} holds only the start of a run with these options, stopped before its first "
                        "checkpoint: starting it again")
        except RunDirError as exc:
            error = str(exc)
    error, note = broadcast_object_list([error, note])
    if error:
        raise RunDirError(error)
    return note


def _same_start(run_dir: RunDir, cfg: Config) -> bool:
    """The folder holds only the start of a run (RunDir.holds_only_a_start) whose options are these."""
    if not run_dir.holds_only_a_start() or not run_dir.config.is_file():
        return False
    try:
        saved = read_json(run_dir.config)
    except DamagedFileError:
        return False
    same = (*RUN_DEFINING, "data_dir", "batch_size", "epochs", "max_steps")
    return all(saved.get(name) == as_saved(getattr(cfg, name)) for name in same)


def with_saved_options(cfg: Config) -> tuple[Config, dict | None]:
    """On a resume, the run's saved options for every option not given: those of the checkpoint given as
    --resume PATH (it carries them), else of the run folder. Returns (options, saved config)."""
    path = _saved_config(cfg)
    if path is None:
        return cfg, None
    try:
        saved = read_json(path)
        options = read_options_file(path)
    except (DamagedFileError, ValueError) as exc:
        if cfg.resume != "auto" and path.parent == Path(cfg.resume):
            check_checkpoint(path.parent)  # a checkpoint's own file: it does not verify, and says why
        why = exc.why if isinstance(exc, DamagedFileError) else f"{type(exc).__name__}: {exc}"
        raise RunDirError(_damaged_config_advice(path, why)) from None
    known = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    keep = {k: v for k, v in options.items() if k in known and k not in cfg.given and k not in NOT_FROM_FILES
            and k != "output_dir"}
    return dataclasses.replace(cfg, **keep), saved


def _saved_config(cfg: Config) -> Path | None:
    """The config.json a resume is checked against: the checkpoint's own (--resume PATH), else its run
    folder's (a checkpoint saved before they carried one), else the --output-dir's (--resume auto)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        candidates = [RunDir(cfg.output_dir).config]
    else:
        checkpoint = Path(cfg.resume)
        candidates = [checkpoint / CONFIG_FILE, RunDir(run_folder_of(checkpoint)).config]
    return next((path for path in candidates if path.is_file()), None)


def _damaged_config_advice(path: Path, why: str) -> str:
    """What to do about a run folder's config.json that cannot be read: resume from a checkpoint, which
    carries the options (in the same --output-dir)."""
    folder = path.parent
    newest = RunDir(folder).latest()
    if newest is not None and (newest / CONFIG_FILE).is_file():
        return (f"{path} cannot be read ({why}). Resume from a checkpoint, which carries the run's options: "
                f"--resume {newest} --output-dir {folder}")
    return (f"{path} cannot be read ({why}) and no checkpoint of the run carries its options. Remove it and "
            f"resume with --resume auto and the run's options on the command line, or start a new run in "
            "another --output-dir.")


def check_classes(checkpoint: Path, classes: list[str], data_dir: str) -> None:
    """The classes of --data-dir (or of the run's split) must be those the checkpoint was trained on, in the
    same order: a label is an index into them. One line per difference."""
    saved = read_classes(checkpoint)
    if saved == classes:
        return
    lines = []
    if len(saved) != len(classes):
        lines.append(f"{len(saved)} classes in the checkpoint, {len(classes)} in --data-dir")
    only_saved, only_found = [c for c in saved if c not in classes], [c for c in classes if c not in saved]
    if only_saved or only_found:
        lines.append(f"only in the checkpoint: {', '.join(only_saved[:5]) or '-'}; only in --data-dir: "
                     f"{', '.join(only_found[:5]) or '-'}")
    else:
        lines.append("the same class names in another order")
    raise CheckpointError(f"--resume {checkpoint}: it was trained on other classes than --data-dir {data_dir} "
                          "holds; pass the --data-dir it was trained on:\n  " + "\n  ".join(lines))


@dataclass
class ResumePlan:
    cfg: Config  # the options, adjusted to what is resumed (the per-process batch)
    checkpoint: Path | None = None  # what to load: a step_N folder or the final model (--eval-only)
    state: TrainState | None = None
    finished: str | None = None  # the run is finished and not extended: say this, and do nothing
    note: str | None = None  # one line on what changed (the number of processes)
    report_only: bool = False  # a finished run whose results are missing: `checkpoint` is its final model


def plan_resume(cfg: Config, saved: dict | None, run_dir: RunDir, num_processes: int, accumulation: int,
                precision: str, warn) -> ResumePlan:
    """The checkpoint to continue from (or to evaluate), and the options adjusted to it. Raises RunDirError
    with one line per option that a resume may not change."""
    if cfg.resume is None:
        return ResumePlan(cfg)
    if cfg.resume == "auto":
        ckpt = run_dir.latest(warn=warn)
    else:
        ckpt = Path(cfg.resume)
        check_checkpoint(ckpt)
    if ckpt is None:
        if cfg.eval_only:
            raise CheckpointError(f"--eval-only: no checkpoint or final model in {run_dir}. Pass the output "
                                  "folder of a run that saved one, or --resume PATH.")
        return ResumePlan(cfg)  # --resume auto on a run that saved nothing yet: a fresh start
    state = TrainState.load(ckpt)
    if cfg.eval_only:
        return ResumePlan(cfg, ckpt, state)
    cfg, note = _check_identity(cfg, saved, num_processes, accumulation, precision)
    if state.finished:
        return _extend(cfg, saved, run_dir, ckpt, state, note)
    _check_length(cfg, state, run_dir)
    return ResumePlan(cfg, ckpt, state, note=note)


def _check_length(cfg: Config, state: TrainState, run_dir: RunDir) -> None:
    """A run resumed with fewer --epochs (or --max-steps) than it has already trained would stop at once
    and call itself finished at a length nobody asked for."""
    begun = state.epoch + (1 if state.step_in_epoch else 0)  # epochs begun; the last may be partial
    if cfg.total_epochs < begun:  # the run's epochs count the LP-FT probe's too
        raise RunDirError(f"--epochs {cfg.epochs}: {run_dir} is already in epoch {begun} (step "
                          f"{state.global_step}); pass --epochs {begun - cfg.probe_epochs} or more, or leave --epochs "
                          "out to finish the run as planned.")
    if cfg.max_steps and cfg.max_steps < state.global_step:
        raise RunDirError(f"--max-steps {cfg.max_steps}: {run_dir} is already at step {state.global_step}; "
                          f"pass --max-steps {state.global_step} or more, or leave it out.")


def _check_identity(cfg: Config, saved: dict | None, num_processes: int, accumulation: int,
                    precision: str) -> tuple[Config, str | None]:
    """Differences in what defines the run are errors; the per-process batch follows the processes."""
    if saved is None:
        return cfg, None
    lines = [f"--{k.replace('_', '-')}: saved {saved[k]!r}, given {getattr(cfg, k)!r}"
             for k in RUN_DEFINING if k in cfg.given and k in saved and saved[k] != as_saved(getattr(cfg, k))]
    if "mixed_precision_resolved" in saved and saved["mixed_precision_resolved"] != precision:
        lines.append(f"--mixed-precision: saved {saved['mixed_precision_resolved']!r}, given {precision!r}")
    saved_accumulation = saved.get("gradient_accumulation_resolved", 1)
    if accumulation != saved_accumulation:
        lines.append(f"--gradient-accumulation-steps: saved {saved_accumulation}, given {accumulation}")
    if "batch_size" in cfg.given and cfg.batch_size != saved.get("batch_size", cfg.batch_size):
        lines.append(f"--batch-size: saved {saved['batch_size']} per process ({saved['num_processes']} "
                     f"process(es)), given {cfg.batch_size}")
    if cfg.lr_schedule == "cosine" and ("epochs" in cfg.given and cfg.epochs != saved.get("epochs")
                                        or "max_steps" in cfg.given and cfg.max_steps != saved.get("max_steps")):
        lines.append(f"--epochs/--max-steps: the cosine schedule was fitted to {saved.get('epochs')} epochs "
                     f"(max steps {saved.get('max_steps')}); it cannot change length")
    if lines:
        raise RunDirError("--resume: these options differ from those the run was saved with, and they define "
                          "the run; drop them, or start a new run in another --output-dir:\n  " + "\n  ".join(lines))
    return _per_process_batch(cfg, saved, num_processes, accumulation)


def _per_process_batch(cfg: Config, saved: dict, num_processes: int, accumulation: int) -> tuple[Config, str | None]:
    saved_processes = saved.get("num_processes", num_processes)
    if saved_processes == num_processes:
        return cfg, None
    global_batch = saved["global_batch_size"]
    if global_batch % (num_processes * accumulation):
        works = [p for p in range(1, global_batch + 1) if global_batch % (p * accumulation) == 0]
        raise RunDirError(f"--resume: the run's global batch of {global_batch} cannot be split over "
                          f"{num_processes} processes; resume it on {', '.join(map(str, works))} process(es).")
    batch = global_batch // (num_processes * accumulation)
    note = (f"resuming on {num_processes} process(es) instead of {saved_processes}: {batch} images per process "
            f"and micro-batch, global batch {global_batch} as before")
    return dataclasses.replace(cfg, batch_size=batch), note


def _extend(cfg: Config, saved: dict | None, run_dir: RunDir, final: Path, state: TrainState,
            note: str | None) -> ResumePlan:
    """A finished run: nothing to do, or, with --epochs above its epochs, continue from its last state."""
    trained = len(state.epoch_losses) - cfg.probe_epochs  # the LP-FT probe's epochs come first
    if cfg.epochs <= trained:
        missing = run_dir.missing_report() if final.resolve() == run_dir.final_model.resolve() else []
        if missing:  # a full disk or a kill while it wrote them
            return ResumePlan(cfg, final, state, report_only=True,
                              note=f"{run_dir} is finished but lacks {', '.join(missing)}: evaluating its final "
                                   "model again to write its results")
        return ResumePlan(cfg, finished=f"{run_dir} is finished ({trained} epochs; its final model is {final}). "
                                   f"To train it further, pass --resume auto --epochs N with N above {trained}.")
    if cfg.lr_schedule == "cosine":
        raise RunDirError(f"--epochs {cfg.epochs}: {run_dir} was trained with --lr-schedule cosine, fitted to "
                          f"{trained} epochs; it cannot be extended. Start a new run with --epochs {cfg.epochs}.")
    last = run_dir.checkpoint(state.global_step)
    try:
        check_checkpoint(last)
    except CheckpointError:
        raise RunDirError(f"--epochs {cfg.epochs}: {run_dir} kept no usable training state after its last step "
                          f"({last}; checkpoints were off, or it is damaged), so it cannot be extended. Start a "
                          f"new run with --epochs {cfg.epochs}.") from None
    message = f"extending {run_dir} from {trained} to {cfg.epochs} epochs"
    return ResumePlan(cfg, last, TrainState.load(last), note=f"{note}; {message}" if note else message)
