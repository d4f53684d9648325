"""The sweep's Optuna study: the plan it starts from, where it is stored, its sampler, and how workers take
trials from it.

The study lives in the sweep folder (`study.journal`, Optuna's journal file, safe on a shared file system),
or in the database given with --storage. A grid or a random search queues its configurations when the study
is made, in order; bayes asks Optuna's TPE sampler for each new configuration, with the results so far.
Several workers (processes, Slurm array tasks) share one study:

- a worker takes a trial under the sweep folder's lock (`.sweep.lock`, held only while it chooses), and
  holds the trial's own lock (`.trial-<NN>.lock`) for as long as the trial runs. The training process it
  starts inherits that lock, so a trial stays taken while any process of it lives.
- a trial still RUNNING whose lock nobody holds was interrupted (Ctrl-C, SIGTERM, a kill, a preemption): the
  next worker that looks takes it over, and its run resumes from its last checkpoint (`--resume auto`).
- a configuration that failed gets one more attempt, in the same run folder, from each worker that starts
  after the failure.

Configuration NN (counted from 0 in the order they start; the grid's and random search's in the file's
order) trains in the run folder `<sweep folder>/<NN>-<name>=<value>,...`, whatever worker runs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tl_dist.config import RUN_DEFINING, Config, as_saved
from tl_dist.runtime import EXIT_PRUNED, EXIT_STOPPED
from tl_dist.sweep.outcome import read_run
from tl_dist.sweep.pruning import TrialAddress
from tl_dist.sweep.spec import TRAIN_LOSS, Sweep, SweepError, check_options, folder_name, option_argv

JOURNAL_FILE = "study.journal"
SWEEP_LOCK = ".sweep.lock"
# What a worker's options may not change in a study that other workers share: they define its runs.
DEFINING = (*RUN_DEFINING, "epochs", "max_steps", "batch_size", "data_dir")


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The sweep resolved against the train options, before anything is written."""
    sweep: Sweep
    folder: Path  # the sweep folder (--output-dir)
    train_argv: list[str]  # the user's train options, before each configuration's
    extra: list[str]  # what the sweep adds: the W&B group, the file's project and entity
    base: Config  # the user's train options, parsed
    count: int  # how many configurations the sweep runs
    planned: list[dict]  # grid and random: each configuration's searched values; bayes: none
    objective: str  # the metric the study optimises: the sweep's, or train/loss without a validation split

    def argv(self, options: dict, run_folder: Path) -> list[str]:
        return [*self.train_argv, *self.extra, *option_argv(options), "--output-dir", str(run_folder),
                "--resume", "auto"]

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == TRAIN_LOSS else self.sweep.goal


def plan_sweep(sweep: Sweep, folder: Path, train_argv: list[str], runs: int | None) -> Plan:
    """The configurations and their options, each checked as tl_dist.train would check it (for bayes, every
    categorical value and both ends of every range) before anything runs."""
    base = check_options(train_argv, "train options")
    needs_validation = sweep.method == "bayes" or sweep.pruning is not None
    if needs_validation and not base.val_fraction and "val_fraction" not in sweep.space:
        what = "method bayes" if sweep.method == "bayes" else "early_terminate"
        raise SweepError(f"{what} chooses on validation numbers (never the test split), and these runs have "
                         "none: pass --val-fraction, e.g. 0.1")
    extra = [] if base.wandb_group else ["--wandb-group", sweep.name]
    if sweep.project and not base.wandb_project:
        extra += ["--wandb-project", str(sweep.project)]
    if sweep.entity and not base.wandb_entity:
        extra += ["--wandb-entity", str(sweep.entity)]
    count = sweep.count(runs)
    plan = Plan(sweep, folder, list(train_argv), extra, base, count, sweep.planned(base.seed, count),
                sweep.metric if base.val_fraction or "val_fraction" in sweep.space else TRAIN_LOSS)
    for index, params in enumerate(plan.planned):
        name = folder_name(sweep, index, params)
        check_options(plan.argv(sweep.options(params), folder / name), f"{sweep.path}, configuration {index} ({name})")
    if sweep.method == "bayes":
        for param, values in _extremes(sweep.space).items():
            for value in values:
                check_options([*plan.argv(sweep.options({}), folder / "x"), *option_argv({param: value})],
                              f"{sweep.path}, parameter {param} at {value}")
    return plan


def _extremes(space: dict) -> dict[str, list]:
    return {name: list(d.choices) if not isinstance(d, (FloatDistribution, IntDistribution)) else [d.low, d.high]
            for name, d in space.items()}


# ---------------------------------------------------------------- storage and sampler


def open_storage(storage: str):
    """An RDB URL (sqlite:///..., postgresql://...) or the path of a journal file."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(storage))


def default_storage(folder: Path) -> str:
    return str(folder / JOURNAL_FILE)


class SeededPerTrial(optuna.samplers.BaseSampler):
    """A sampler whose every trial draws from its own generator, seeded with (seed, trial number): what trial
    N proposes depends on the results before it, never on which worker asks (workers that ask at the same
    time would otherwise propose the same values)."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self._current = (trial.number, self.make(seed))
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)


def bayes_sampler(seed: int, count: int) -> optuna.samplers.BaseSampler:
    """W&B's bayes as Optuna's TPE: a few random configurations first (a quarter of the budget, 2 to 10),
    then each drawn where the better results lie. Multivariate, so that parameters that work together are
    modelled together; a liar for the trials still running, so that workers spread out."""
    startup = min(10, max(2, count // 4))
    return SeededPerTrial(lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, multivariate=True,
                                                               constant_liar=True), seed)


def suggest(trial: optuna.trial.Trial, space: dict) -> dict:
    """Every parameter of `space` suggested on `trial` (a queued trial gets its fixed values): the values."""
    for name, d in space.items():
        if isinstance(d, FloatDistribution):
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            trial.suggest_categorical(name, d.choices)
    return {name: trial.params[name] for name in space}


# ---------------------------------------------------------------- locks


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """The sweep folder's lock, held while a worker chooses a trial (and while the study is made)."""
    fd = os.open(folder / SWEEP_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class TrialLock:
    """A configuration's lock, `.trial-<NN>.lock` in the sweep folder: held by the worker that runs it and by
    the processes it starts (they inherit the descriptor), so the kernel frees it when the last of them ends.
    The file names the worker that took it."""

    def __init__(self, folder: Path, index: int):
        self.path = folder / f".trial-{index:02d}.lock"
        self.fd: int | None = None

    def take(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_by_gone_worker(self) -> bool:
        """Held, though the worker that took it has ended on this host: processes it started are finishing
        (a training run saving its checkpoint after the worker was killed)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if holder.get("host") != socket.gethostname() or Path(f"/proc/{holder.get('pid')}").exists():
            return False
        return not self.is_free()

    def is_free(self) -> bool:
        if not self.path.exists():
            return True
        taken = self.take()
        self.release()
        return taken


# ---------------------------------------------------------------- the study


@dataclass
class Claim:
    """A trial this worker runs: its configuration, run folder and training options, and its lock."""
    index: int
    number: int  # Optuna's trial number
    folder: Path
    options: dict
    argv: list[str]
    adopted: bool  # an interrupted trial taken over (its run resumes)
    lock: TrialLock


@dataclass
class Configuration:
    """One configuration of the study as the summary shows it: its latest attempt and whether a worker has it."""
    index: int
    trial: FrozenTrial
    folder: Path
    options: dict
    held: bool


class SweepStudy:
    def __init__(self, sweep: Sweep, folder: Path, storage: str, store, plan: Plan | None = None):
        """`storage`: where the study is (a journal file or an RDB URL); `store`: Optuna's storage object."""
        self.sweep, self.folder, self.storage, self.store, self.plan = sweep, folder, storage, store, plan
        self.study = optuna.load_study(study_name=sweep.name, storage=store, sampler=self._sampler())

    @classmethod
    def open(cls, plan: Plan, storage: str | None) -> "SweepStudy":
        """The sweep folder's study, made (with its queued configurations) or found and checked: the same sweep
        file and the same defining train options. Each configuration that failed is queued once more."""
        plan.folder.mkdir(parents=True, exist_ok=True)
        storage = storage or default_storage(plan.folder)
        store = open_storage(storage)
        with folder_lock(plan.folder):  # of several workers starting at once, one makes the study
            if plan.sweep.name not in {s.study_name for s in store.get_all_studies()}:
                optuna.create_study(storage=store, study_name=plan.sweep.name, direction=plan.direction)
            self = cls(plan.sweep, plan.folder, storage, store, plan)
            self._check_or_record()
            self._queue_planned()
            self._queue_retries()
        return self

    @classmethod
    def load(cls, sweep: Sweep, folder: Path, storage: str | None) -> "SweepStudy":
        """The study as it is, to read (--summary)."""
        storage = storage or default_storage(folder)
        if "://" not in storage and not Path(storage).is_file():
            raise SweepError(f"--summary: {folder} holds no sweep study ({JOURNAL_FILE}); pass the --output-dir "
                             "(and --storage) the sweep ran with")
        try:
            return cls(sweep, folder, storage, open_storage(storage))
        except KeyError:
            raise SweepError(f"--summary: the study {sweep.name!r} is not in {storage}; pass the sweep file it "
                             "ran with") from None

    def _sampler(self) -> optuna.samplers.BaseSampler:
        """bayes: TPE; grid and random run queued configurations, so their sampler draws nothing."""
        if self.plan is not None and self.sweep.method == "bayes":
            return bayes_sampler(self.plan.base.seed, self.plan.count)
        return optuna.samplers.RandomSampler()

    # -- making it
    def _check_or_record(self) -> None:
        attrs, plan = self.study.user_attrs, self.plan
        defining = {k: as_saved(getattr(plan.base, k)) for k in DEFINING if k not in self.sweep.order}
        if "sweep" not in attrs:
            self.study.set_user_attr("sweep", self.sweep.identity)
            self.study.set_user_attr("objective", plan.objective)
            self.study.set_user_attr("train_options", defining)
            return
        if json.loads(attrs["sweep"]) != json.loads(self.sweep.identity):
            raise SweepError(f"{self.folder} holds the study of another sweep file {self.sweep.name!r} (its method, "
                             "parameters, metric or early_terminate differ): pass that file, or another --output-dir")
        changed = [k for k, v in attrs["train_options"].items() if defining.get(k) != v]
        if changed:
            k = changed[0]
            raise SweepError(f"{self.folder} holds a sweep whose runs have --{k.replace('_', '-')} "
                             f"{attrs['train_options'][k]}, not {defining.get(k)}: give its workers the same "
                             "options, or pass another --output-dir")
        if attrs["objective"] != plan.objective:
            raise SweepError(f"{self.folder} holds a sweep that ranks on {attrs['objective']}: give the same "
                             "--val-fraction, or pass another --output-dir")

    def _queue_planned(self) -> None:
        """Queue the planned configurations not queued yet (a larger run_cap or --runs adds the next ones)."""
        queued = {t.user_attrs.get("index") for t in self.study.get_trials(deepcopy=False)}
        for index, params in enumerate(self.plan.planned):
            if index not in queued:
                self.study.enqueue_trial(params, user_attrs={
                    "index": index, "run_folder": folder_name(self.sweep, index, params)})

    def _queue_retries(self) -> None:
        """Queue once more each configuration whose latest attempt failed, unless its run got to its end."""
        for config in self.configurations():
            if config.trial.state == TrialState.FAIL and read_run(config.folder).status not in ("finished", "pruned"):
                attrs = {k: v for k, v in config.trial.user_attrs.items() if k not in ("exit_code", "error")}
                self.study.enqueue_trial(config.trial.params, user_attrs={**attrs, "retry_of": config.trial.number})

    # -- taking a trial
    def claim(self) -> Claim | None:
        """The next trial for this worker: an interrupted one first, then a queued one, then (bayes) a new one,
        while fewer than the sweep's count of configurations have started. None when there is none."""
        with folder_lock(self.folder):
            trials = self.study.get_trials(deepcopy=False)
            for trial in trials:  # asked for by a worker that died before it gave it an index: it has no run
                if "index" not in trial.user_attrs and trial.state == TrialState.RUNNING:
                    self.study.tell(trial.number, state=TrialState.FAIL)
            trials = _indexed(trials)
            return self._interrupted(trials) or self._queued(trials) or self._new(trials)

    def _interrupted(self, trials: list[FrozenTrial]) -> Claim | None:
        for trial in (t for t in trials if t.state == TrialState.RUNNING):
            lock = TrialLock(self.folder, trial.user_attrs["index"])
            if lock.take():
                return self._claim(trial, lock, adopted=True)
        return None

    def _queued(self, trials: list[FrozenTrial]) -> Claim | None:
        for trial in (t for t in trials if t.state == TrialState.WAITING):
            retry, index = "retry_of" in trial.user_attrs, trial.user_attrs["index"]
            lock = TrialLock(self.folder, index)
            if (retry or index < self.plan.count) and lock.take():
                if self.store.set_trial_state_values(self._trial_id(trial.number), TrialState.RUNNING):
                    return self._claim(trial, lock, adopted=False)
                lock.release()
        return None

    def _new(self, trials: list[FrozenTrial]) -> Claim | None:
        """Bayes: a configuration chosen from the results so far, when nothing queued waits (study.ask would take
        a queued trial first)."""
        started = {t.user_attrs["index"] for t in trials if t.state != TrialState.WAITING}
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if self.sweep.method != "bayes" or waiting or len(started) >= self.plan.count:
            return None
        index = 1 + max((t.user_attrs["index"] for t in trials), default=-1)
        lock = TrialLock(self.folder, index)
        if not lock.take():
            return None
        trial = self.study.ask()
        params = suggest(trial, self.sweep.space)
        trial.set_user_attr("index", index)
        trial.set_user_attr("run_folder", folder_name(self.sweep, index, params))
        return self._claim(self.store.get_trial(self._trial_id(trial.number)), lock, adopted=False)

    def _claim(self, trial: FrozenTrial, lock: TrialLock, adopted: bool) -> Claim:
        folder = self.folder / trial.user_attrs["run_folder"]
        if trial.params or not self.sweep.space:
            params = trial.params
        else:  # a queued trial: its fixed values, recorded with their distributions
            params = suggest(optuna.trial.Trial(self.study, self._trial_id(trial.number)), self.sweep.space)
        options = self.sweep.options(params)
        argv = trial.user_attrs.get("argv") or self.plan.argv(options, folder)
        if "argv" not in trial.user_attrs:
            self.store.set_trial_user_attr(self._trial_id(trial.number), "argv", argv)
        return Claim(trial.user_attrs["index"], trial.number, folder, options, argv, adopted, lock)

    def _trial_id(self, number: int) -> int:
        study_id = self.store.get_study_id_from_name(self.study.study_name)
        return self.store.get_trial_id_from_study_id_trial_number(study_id, number)

    def address(self, claim: Claim) -> TrialAddress:
        """What the trial's training run needs to report its validation metric to this study."""
        pruning = self.sweep.pruning
        return TrialAddress(self.storage, self.study.study_name, claim.number, self.plan.objective,
                            (pruning.min_epochs, pruning.eta) if pruning else None)

    def lingering(self) -> list[int]:
        """Configurations still RUNNING whose worker on this host has ended while processes it started finish."""
        running = _indexed(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return [t.user_attrs["index"] for t in running
                if TrialLock(self.folder, t.user_attrs["index"]).held_by_gone_worker()]

    # -- the outcome
    def record(self, claim: Claim, exit_code: int, stopped: bool) -> str:
        """Tell the study how the trial ended, as its run folder says: finished (its metric), pruned, stopped
        (it stays RUNNING, to be resumed) or failed. Returns that status, as summary.csv shows it."""
        run = read_run(claim.folder, just_ended=exit_code in (0, EXIT_PRUNED))
        if run.status == "finished":
            value = run.metrics.get(self.study.user_attrs["objective"])
            if value is None:  # the study cannot rank it; summary.csv shows what it has
                self.fail(claim, f"no {self.study.user_attrs['objective']} in its metrics.json")
            else:
                self.study.tell(claim.number, value)
            return "finished"
        if run.status == "pruned":
            self.study.tell(claim.number, state=TrialState.PRUNED)
            return run.describe()
        if stopped or exit_code == EXIT_STOPPED:
            return "stopped"
        self.store.set_trial_user_attr(self._trial_id(claim.number), "exit_code", exit_code)
        self.study.tell(claim.number, state=TrialState.FAIL)
        return f"failed (exit {exit_code})"

    def fail(self, claim: Claim, why: str) -> str:
        """Mark a trial failed for a reason other than its run's exit code."""
        self.store.set_trial_user_attr(self._trial_id(claim.number), "error", why)
        self.study.tell(claim.number, state=TrialState.FAIL)
        return f"failed: {why}"

    def configurations(self) -> list[Configuration]:
        """Every configuration with its latest attempt, by index."""
        latest: dict[int, FrozenTrial] = {}
        for trial in _indexed(self.study.get_trials(deepcopy=False)):
            latest[trial.user_attrs["index"]] = trial  # trials come in number order: the latest wins
        found = []
        for index in sorted(latest):
            trial = latest[index]
            params = trial.params or trial.system_attrs.get("fixed_params", {})
            held = trial.state == TrialState.RUNNING and not TrialLock(self.folder, index).is_free()
            found.append(Configuration(index, trial, self.folder / trial.user_attrs["run_folder"],
                                       self.sweep.options(params), held))
        return found


def _indexed(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that belong to a configuration (all but one asked for by a worker that died at once)."""
    return [t for t in trials if "index" in t.user_attrs]
