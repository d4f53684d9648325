"""Running a sweep's trials: the worker loop, one trial's training, and the signals that stop a sweep.

A trial with one training process runs inside the worker's own process (`tl_dist.train.main`), so that the
imports, W&B's service and Python's start are paid once per worker, not once per trial; Accelerate's state is
reset between trials, and every random draw of a run is seeded by its own options (`--seed`), so a trial
trains exactly as a fresh process would. A trial with several processes runs under `accelerate launch`, a
child in its own process group that dies with the worker (it gets SIGTERM, checkpoints and exits).

Signals: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 sent to the worker stop the sweep after the current trial's
checkpoint. The run folder's STOP file reaches every training process at its next step; SIGINT and SIGTERM
also go to the child (once: the terminal's Ctrl-C reaches the worker's process group only), which stops a
run that is decoding or computing features too. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tl_dist.run_dir import RunDir
from tl_dist.runtime import EXIT_STOPPED, accelerate_launch, die_with_parent, reset_accelerate_state
from tl_dist.sweep.outcome import read_run
from tl_dist.sweep.spec import SweepError, check_options
from tl_dist.sweep.study import Claim, SweepStudy

LINGER_SECONDS = 120  # how long a worker waits for the processes of a killed worker's trial to end


class SweepSignals:
    """While a sweep runs: SIGINT, SIGTERM and SIGUSR1 stop it after the current trial (`stopped` names the
    first), ask the current run to checkpoint and stop, and reach its child process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.stopped: str | None = None
        self.run_dir: RunDir | None = None  # the run in progress
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def __enter__(self) -> "SweepSignals":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stopped == "SIGINT" and self.child is None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stopped = self.stopped or signal.Signals(signum).name
        if self.run_dir is not None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.run_dir.stop_file.write_text(self.stopped)  # names the signal, whichever the run sees first
        if self.child is not None and signum != signal.SIGUSR1:  # accelerate launch does not pass SIGUSR1 on
            self.child.send_signal(signum)


class TrialRunner:
    """Trains one trial: in this process with one training process, else under accelerate launch."""

    def __init__(self, num_processes: int, accelerate_config: Path, signals: SweepSignals):
        self.num_processes, self.accelerate_config, self.signals = num_processes, accelerate_config, signals

    def run(self, claim: Claim, env: dict[str, str]) -> int:
        """The training's exit code."""
        run_dir = RunDir(claim.folder)
        run_dir.stop_file.unlink(missing_ok=True)  # a leftover would stop the run at once
        self.signals.run_dir = run_dir
        try:
            if self.num_processes == 1:
                return self._in_process(claim.argv, env)
            return self._child(claim, env)
        finally:
            self.signals.run_dir = None
            run_dir.stop_file.unlink(missing_ok=True)

    @staticmethod
    def _in_process(argv: list[str], env: dict[str, str]) -> int:
        from tl_dist import train

        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return train.main(argv)
        except SystemExit as exc:  # an option tl_dist.train refuses (its one error line is printed)
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:  # what a child process would print before exiting 1
            traceback.print_exc()
            return 1
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
            reset_accelerate_state()
            gc.collect()  # the run's network, optimizer and batches, before the next trial builds its own
            _empty_cuda_cache()

    def _child(self, claim: Claim, env: dict[str, str]) -> int:
        cfg = check_options(claim.argv, claim.folder.name)
        precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if _cuda() else "no")
        cmd = accelerate_launch(self.num_processes, self.accelerate_config, precision) + claim.argv
        child = subprocess.Popen(cmd, env={**os.environ, **env}, pass_fds=(claim.lock.fd,),
                                 preexec_fn=_own_group_dying_with_parent)
        self.signals.child = child
        try:
            return child.wait()
        finally:
            self.signals.child = None
            if child.poll() is None:  # the worker is stopping at once (a second Ctrl-C): the run must not outlive it
                child.terminate()
                child.wait()


def _own_group_dying_with_parent() -> None:
    """In the child, before it runs: its own process group (the terminal's Ctrl-C reaches only the worker,
    which passes it on once), and SIGTERM when the worker dies, even by SIGKILL."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGTERM)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the validation split


def validation_images(argv: list[str]) -> int | None:
    """How many validation images a run with these options gets, from the images in --data-dir (the run's
    split is drawn the same way); None when it asks for none, holds a split already, or its data is not there
    yet (the run downloads it)."""
    from tl_dist.data import DataError, index_images, stratified_sample
    from tl_dist.prepare import split_rows

    cfg = check_options(argv, "the trial's options")
    resumed = cfg.output_dir is not None and RunDir(cfg.output_dir).split.is_file()
    if not cfg.val_fraction or not Path(cfg.data_dir).is_dir() or resumed:
        return None
    try:
        index = index_images(Path(cfg.data_dir), warn=lambda message: None)
    except DataError:
        return None  # the run says what is wrong with the data
    if cfg.max_samples:
        index = index.subset(stratified_sample(index.labels, cfg.max_samples, cfg.seed))
    return len(split_rows(cfg, index, list(range(len(index))))[1])


def check_validation(argv: list[str], objective: str) -> None:
    """A sweep that ranks or prunes on validation refuses a trial whose split would have no validation image."""
    if not objective.startswith("val/") or validation_images(argv) != 0:
        return
    cfg = check_options(argv, "the trial's options")
    raise SweepError(f"--val-fraction {cfg.val_fraction} gives no validation image: after the test split every "
                     f"class of {cfg.data_dir} keeps at most one training image, and the sweep ranks on {objective}. "
                     "Raise --val-fraction (or --max-samples), or use classes with more images")


# ---------------------------------------------------------------- the worker


def run_worker(study: SweepStudy, runner: TrialRunner, say: Callable[[str], None]) -> dict[int, str]:
    """Take trials from the study and train them until none is left, or a signal or a stopped run stops the
    sweep (`runner.signals.stopped`). Returns {configuration index: status} of the trials this worker ran."""
    statuses, signals = {}, runner.signals
    while not signals.stopped:
        claim = study.claim() or _after_lingering(study, say)
        if claim is None:
            break
        try:
            statuses[claim.index] = run_trial(study, runner, claim, say)
        except SweepError as exc:
            statuses[claim.index] = study.fail(claim, str(exc))
            raise
        finally:
            claim.lock.release()
        if statuses[claim.index] == "stopped":
            signals.stopped = signals.stopped or f"{claim.folder.name} stopped"  # by a signal it got itself
    return statuses


def run_trial(study: SweepStudy, runner: TrialRunner, claim: Claim, say: Callable[[str], None]) -> str:
    """One trial this worker holds: trained (or only recorded, when its run ended as its last worker died),
    then told to the study. Returns its status."""
    label = f"[{claim.index + 1}/{study.plan.count}] {claim.folder.name}"
    say(f"{label}: {'continuing' if RunDir(claim.folder).holds_run() else 'starting'} in {claim.folder}")
    check_validation(claim.argv, study.plan.objective)
    tic = time.perf_counter()
    if runner.signals.stopped or (claim.adopted and read_run(claim.folder).status in ("finished", "pruned")):
        code = EXIT_STOPPED
    else:
        code = runner.run(claim, study.address(claim).to_env())
    status = study.record(claim, code, stopped=runner.signals.stopped is not None)
    say(f"{label}: {status} ({time.perf_counter() - tic:.1f} s)")
    return status


def _after_lingering(study: SweepStudy, say: Callable[[str], None]) -> Claim | None:
    """When nothing else is left: wait for the trials of a killed worker whose processes are still ending
    (saving their checkpoint), then take them over."""
    deadline = time.monotonic() + LINGER_SECONDS
    while (waiting := study.lingering()) and time.monotonic() < deadline:
        say(f"waiting for the run(s) of configuration(s) {', '.join(map(str, waiting))} of a stopped worker to end")
        time.sleep(2.0)
        claim = study.claim()
        if claim is not None:
            return claim
    return None
