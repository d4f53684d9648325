"""A sweep trial's side of pruning, inside its training run: after every epoch the run reports its validation
metric to the study, and the sweep's pruner says whether the run ends there.

The sweep tells a run which trial it is through the environment variable TL_DIST_SWEEP_TRIAL (JSON: where
the study is, its name, the trial's number, the metric, the pruning), whether the run is a child process or
runs inside the sweep's own process. Only the main process talks to the study; every process hears its
answer, so that all of them stop after the same epoch. Outside a sweep the variable is not set and the run
has no trial. Nothing here imports Optuna until a trial reports.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

TRIAL_ENV = "TL_DIST_SWEEP_TRIAL"


@dataclass(frozen=True)
class TrialAddress:
    storage: str  # a journal file or an RDB URL (study.open_storage)
    study: str
    number: int
    metric: str  # val/loss, val/accuracy or val/top5_accuracy
    pruning: tuple[int, int] | None  # (the first epoch of comparison, eta); None: the sweep prunes nothing

    def to_env(self) -> dict[str, str]:
        return {TRIAL_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "TrialAddress | None":
        text = os.environ.get(TRIAL_ENV)
        if not text:
            return None
        fields = json.loads(text)
        return cls(**{**fields, "pruning": tuple(fields["pruning"]) if fields["pruning"] else None})


class SweepTrial:
    """The trial a training run is, seen from the run."""

    def __init__(self, address: TrialAddress, accelerator):
        self.address, self.accelerator = address, accelerator
        self._trial = None
        self._broken = False

    @classmethod
    def from_environment(cls, accelerator) -> "SweepTrial | None":
        address = TrialAddress.from_env()
        return cls(address, accelerator) if address is not None and address.pruning else None

    def should_prune(self, epoch: int, scores: dict) -> bool:
        """Report the metric of `epoch` (validation scores: loss, accuracy, top5_accuracy) and return whether the
        pruner ends the run after it; the same answer on every process."""
        from accelerate.utils import broadcast_object_list

        prune = False
        if self.accelerator.is_main_process and not self._broken:
            try:
                prune = self._report(epoch, scores[self.address.metric.split("/", 1)[1]])
            except Exception as exc:  # the study cannot be reached: train on, unpruned
                self._broken = True
                print(f"warning: the sweep's study cannot be reached ({exc!r}); this run trains to the end",
                      file=sys.stderr, flush=True)
        return broadcast_object_list([prune])[0]

    def _report(self, epoch: int, value: float) -> bool:
        trial, reported = self._open()
        if epoch not in reported():  # a run resumed from an earlier checkpoint validates an epoch again
            trial.report(value, epoch)
        return trial.should_prune()

    def _open(self):
        """The trial, and a function giving the epochs it has reported."""
        if self._trial is None:
            import optuna

            from tl_dist.sweep.spec import Pruning
            from tl_dist.sweep.study import open_storage

            storage = open_storage(self.address.storage)
            study = optuna.load_study(study_name=self.address.study, storage=storage,
                                      sampler=optuna.samplers.RandomSampler(),
                                      pruner=Pruning(*self.address.pruning).pruner())
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(self.address.study), self.address.number)
            self._trial = (optuna.trial.Trial(study, trial_id),
                           lambda: storage.get_trial(trial_id).intermediate_values)
        return self._trial
