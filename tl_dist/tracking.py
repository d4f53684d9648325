"""Weights & Biases through Accelerate's tracker, on the main process only.

wandb is imported only when a run logs to it, so `--wandb-mode disabled` needs no wandb at all.
One run id per training run, kept in `<run_dir>/wandb_run_id`: a resumed or requeued run continues the
same W&B run. `<run_dir>/wandb_last_step` records the last step handed to W&B (written before the step is
logged), so that steps redone after a crash are not logged a second time.

Where the run goes follows W&B's conventions: each of project, entity, run name, group and tags comes from
its flag when given, else from W&B's environment variable (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME,
WANDB_RUN_GROUP, WANDB_TAGS), else from our default.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tl_dist.run_dir import write_text


DEFAULT_PROJECT = "transfer_learn_pytorch"


@dataclass(frozen=True)
class WandbRun:
    """Where a W&B run is logged and under what name."""

    project: str
    name: str
    entity: str | None = None  # None: the user's default entity
    group: str | None = None
    tags: tuple[str, ...] = ()


def wandb_run(cfg, default_name: str) -> WandbRun:
    """flag > W&B's environment variable > our default, for each setting (an empty one counts as not set).
    WANDB_TAGS is comma-separated, as W&B reads it."""
    def pick(flag: str | None, env: str) -> str | None:
        return (flag or os.environ.get(env) or "").strip() or None

    tags = pick(cfg.wandb_tags, "WANDB_TAGS")
    return WandbRun(project=pick(cfg.wandb_project, "WANDB_PROJECT") or DEFAULT_PROJECT,
                    name=pick(cfg.wandb_run_name, "WANDB_NAME") or default_name,
                    entity=pick(cfg.wandb_entity, "WANDB_ENTITY"), group=pick(cfg.wandb_group, "WANDB_RUN_GROUP"),
                    tags=tuple(t.strip() for t in (tags or "").split(",") if t.strip()))


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(cli_mode: str | None) -> tuple[str, str | None]:
    """The W&B mode and, when we chose offline for the user, a note saying why."""
    mode = cli_mode or os.environ.get("WANDB_MODE")
    if mode in ("dryrun",):
        mode = "offline"
    if mode:
        return mode, None
    if has_wandb_credentials():
        return "online", None
    return "offline", "no W&B credentials found (wandb login or WANDB_API_KEY): logging offline"


class Tracker:
    """Logs on the main process; a no-op everywhere else and when W&B is disabled."""

    def __init__(self, accelerator, run_dir, mode: str):
        """`run_dir`: a run_dir.RunDir."""
        self.accelerator, self.run_dir, self.mode = accelerator, run_dir, mode
        self.enabled = mode != "disabled"
        self.run_id: str | None = None
        self.skip_until = -1
        self.wandb_dir: Path | None = None
        self.broken = False  # W&B's service went away (Slurm's SIGTERM reaches it too): train on without it

    def start(self, where: WandbRun, config: dict) -> None:
        if not self.enabled:
            return
        id_file = self.run_dir.wandb_id
        if self.accelerator.is_main_process:
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
            else:
                alphabet = string.ascii_lowercase + string.digits
                self.run_id = "".join(secrets.choice(alphabet) for _ in range(8))
                write_text(id_file, self.run_id + "\n")
            last = self.run_dir.wandb_step
            self.skip_until = int(last.read_text()) if last.is_file() else -1
        self.wandb_dir = Path(os.environ.get("WANDB_DIR") or self.run_dir.path)
        init = {"id": self.run_id, "resume": "allow", "name": where.name, "mode": self.mode,
                "dir": str(self.wandb_dir), "entity": where.entity, "group": where.group,
                "tags": list(where.tags) or None}
        # Accelerate creates the W&B run on the main process only.
        self.accelerator.init_trackers(where.project, config=config, init_kwargs={"wandb": init})

    def log(self, values: dict, step: int) -> None:
        """Log `values` at `step`, unless this run already logged that step before a crash."""
        if not (self.enabled and self.accelerator.is_main_process) or step <= self.skip_until or self.broken:
            return
        write_text(self.run_dir.wandb_step, f"{step}\n")
        try:
            self.accelerator.log(values, step=step)
        except Exception as exc:  # never lose the checkpoint a stop is about to save over a W&B error
            self.broken = True
            print(f"warning: W&B stopped logging at step {step} ({exc!r}); training goes on without it",
                  file=sys.stderr, flush=True)

    def images(self, key: str, images, captions: list[str], step: int) -> None:
        """A list of wandb.Image from uint8 N x 3 x H x W tensors."""
        if not (self.enabled and self.accelerator.is_main_process):
            return
        import wandb

        pictures = [wandb.Image(img.permute(1, 2, 0).cpu().numpy(), caption=cap)
                    for img, cap in zip(images, captions)]
        self.log({key: pictures}, step)

    def log_model(self, model_dir: Path, test_metrics: dict) -> None:
        """The final model folder as a W&B artifact of type `model`, named `model-<run id>` (as Lightning's
        WandbLogger names it), aliases `latest` and `final`; its metadata holds the scalar test metrics."""
        if not (self.enabled and self.accelerator.is_main_process) or self.broken:
            return
        import wandb

        scalars = {k: v for k, v in test_metrics.items() if isinstance(v, (int, float))}
        artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"test": scalars},
                                  description=f"the final model of {self.run_dir.path.name}")
        artifact.add_dir(str(model_dir))
        try:
            self.accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact, aliases=["latest", "final"])
        except Exception as exc:  # the model is saved in the run folder; W&B's copy is the extra
            print(f"warning: W&B could not log the model ({exc!r}); it is in {model_dir}", file=sys.stderr,
                  flush=True)

    def mark(self, summary: dict, tag: str) -> None:
        """Add `summary` to the W&B run's summary and `tag` to its tags (a sweep's pruned run)."""
        if not (self.enabled and self.accelerator.is_main_process) or self.broken:
            return
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update(summary)
        run.tags = (*run.tags, tag)

    def finish(self) -> None:
        """End the W&B run on the main process, then let all processes go on together: torchrun stops
        every worker as soon as one exits with an error (a stopped run exits with 75), which would cut
        the main process off while W&B still writes the run."""
        if not self.enabled:
            return
        if self.accelerator.is_main_process:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as exc:  # e.g. Slurm's SIGTERM also stopped W&B's service: keep the exit code
                print(f"warning: W&B could not finish the run: {exc!r}", file=sys.stderr, flush=True)
            self.accelerator.trackers = []
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
