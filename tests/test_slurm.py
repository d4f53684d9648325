"""The Slurm job scripts on a real Slurm cluster: a throwaway one on this machine (tests/slurm/cluster.py),
four nodes with two GPUs each that have no CUDA behind them, so the same processes train on the CPU over
gloo. The four jobs are submitted together and run side by side:

1. launch/slurm_multi_node.sbatch on 2 nodes x 2 processes trains, writes metrics.json, one W&B run;
2. launch/slurm_single_node.sbatch with 2 processes, without --output-dir: the same in runs/slurm-<id>;
3. `scancel --signal=USR1 --batch` during training: a checkpoint, a requeue, a resumed run that finishes,
   one W&B run id from start to end and no training step logged twice; a plain `scancel` of another such job
   (held until its test): a checkpoint that a resumed run finishes from;
4. a user error (a missing --data-dir) with 2 processes: the job fails and its log ends with the training's
   one `error:` line (repeated by the script after torchrun's report);
5. launch/slurm_sweep.sbatch as a 2-task job array: two workers of one Optuna study, each configuration
   trained once by one of them, collected by `python -m tl_dist.sweep ... --summary`; and a worker's task
   signalled with USR1, requeued, resuming its run (submitted on their own).

All four are submitted with a user's Accelerate default config in place (HF_HOME, with `gpu_ids: '0'`,
tests/accelerate_user_config.py): the scripts launch with the repository's configs, so it does not merge in.

Needs root, slurm-wlm and munge (apt-get install slurm-wlm munge); skipped with the reason otherwise, and
failed instead under CI=true, where .ci/run runs as root and installs them.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wandb_reader
from accelerate_user_config import write_user_default_config
from ci_tools import missing_tool
from conftest import REPO, launch, read_metrics, run_env
from test_feature_store import flock_holders, pause_the_lock_holder, wait_until

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from cluster import SlurmCluster, missing_requirements  # noqa: E402

pytestmark = pytest.mark.slurm

WHY_NOT = missing_requirements()
JOB_TIMEOUT = 300  # seconds; each job takes well under a minute on two idle cores
# 40 images: 32 train / 8 test, so one epoch is 4 steps with 2 processes (batch 4), 2 steps with 4.
SIGNAL_EPOCHS = 40  # 160 steps: still training when the signal comes, whatever the machine's speed
ARRAY_BACKBONE = ("--model", "resnet18", "--image-size", "64")


@pytest.fixture(scope="session")
def slurm_cluster():
    if WHY_NOT:
        missing_tool(f"no test Slurm cluster: {WHY_NOT}")
    cluster = SlurmCluster(nodes=4, cpus=2, gpus=2)
    cluster.start()
    yield cluster
    cluster.stop()


class Job:
    def __init__(self, cluster: SlurmCluster, job_id: str, out: Path, log: Path):
        self.cluster, self.id, self.out, self.log = cluster, job_id, out, log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def diagnose(self) -> str:
        return (f"job {self.id}: {self.cluster.job(self.id)}\n--- job log (tail)\n{self.text()[-6000:]}\n"
                f"--- cluster logs\n{self.cluster.logs(1500)}")

    def wait(self, **kw) -> dict:
        try:
            return self.cluster.wait_job(self.id, timeout=JOB_TIMEOUT, **kw)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def assert_completed(self) -> dict:
        job = self.wait()
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", self.diagnose()
        return job


def train_args(data: Path, cache: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--cache-dir", str(cache), "--model", "vgg_tiny", "--weights", "none",
            "--image-size", "32", "--batch-size", "4", "--lr", "0.05", "--wandb-mode", "offline",
            "--log-every", "1", *extra]


@pytest.fixture(scope="session")
def slurm_jobs(slurm_cluster, image_tree, tmp_path_factory) -> dict[str, Job]:
    """Submit the four jobs at once (they run side by side on the 4 nodes, the last queued behind them); each
    test waits for its own."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    # The submitting shell's environment, as a user's: W&B writes into the run folder (WANDB_DIR unset).
    env = {k: v for k, v in run_env({"PYTHON": sys.executable}).items()
           if not k.startswith("SLURM_") and k not in ("TL_DIST_REPO",)}
    env["SLURM_CONF"] = str(slurm_cluster.conf)
    # A one-GPU workstation's `accelerate config` (gpu_ids '0', fp16): it would stop both multi-process
    # launches at once, and fp16 the CPU training, if the scripts let it merge in.
    env["HF_HOME"] = str(write_user_default_config(root / "hf_home"))
    common = ["--gpus-per-node=2", "--cpus-per-task=2", "--time=10"]
    jobs = {}

    out = root / "multi"
    job_id = slurm_cluster.sbatch(
        "--nodes=2", *common, f"--output={root}/multi-%j.out", str(REPO / "launch" / "slurm_multi_node.sbatch"),
        *train_args(image_tree, root / "cache-multi", "--epochs", "2", "--output-dir", str(out)),
        cwd=REPO, env=env)
    jobs["multi"] = Job(slurm_cluster, job_id, out, root / f"multi-{job_id}.out")

    # Submitted from another folder without --output-dir: the run folder is runs/slurm-<id> there, and the
    # repository comes from TL_DIST_REPO.
    submit_dir = root / "elsewhere"
    submit_dir.mkdir()
    job_id = slurm_cluster.sbatch(
        *common, f"--output={root}/single-%j.out", str(REPO / "launch" / "slurm_single_node.sbatch"),
        *train_args(image_tree, root / "cache-single", "--epochs", "2"),
        cwd=submit_dir, env={**env, "TL_DIST_REPO": str(REPO)})
    jobs["single"] = Job(slurm_cluster, job_id, submit_dir / "runs" / f"slurm-{job_id}",
                         root / f"single-{job_id}.out")

    out = root / "signal"
    job_id = slurm_cluster.sbatch(
        *common, f"--output={root}/signal-%j.out", str(REPO / "launch" / "slurm_single_node.sbatch"),
        *train_args(image_tree, root / "cache-signal", "--epochs", str(SIGNAL_EPOCHS), "--freeze", "none",
                    "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "5", "--output-dir", str(out)),
        cwd=REPO, env=env)
    jobs["signal"] = Job(slurm_cluster, job_id, out, root / f"signal-{job_id}.out")

    # Cancelled by its test with a plain scancel; held until then, so that it is still training.
    out = root / "cancel"
    job_id = slurm_cluster.sbatch(
        "--hold", *common, f"--output={root}/cancel-%j.out", str(REPO / "launch" / "slurm_single_node.sbatch"),
        *train_args(image_tree, root / "cache-cancel", "--epochs", str(SIGNAL_EPOCHS), "--freeze", "none", "--lr",
                    "0.02", "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "5", "--output-dir", str(out)),
        cwd=REPO, env=env)
    jobs["cancel"] = Job(slurm_cluster, job_id, out, root / f"cancel-{job_id}.out")

    # The multi-node job again, with each node's own disk at the --cache-dir path (node-local scratch).
    out, cache = root / "node-local", root / "cache-node-local"
    cache.mkdir()
    job_id = slurm_cluster.sbatch(
        "--nodes=2", *common, f"--output={root}/node-local-%j.out", str(REPO / "launch" / "slurm_multi_node.sbatch"),
        *train_args(image_tree, cache, "--epochs", "2", "--output-dir", str(out)),
        cwd=REPO, env={**env, "PYTHON": str(node_local_python(root / "disks", cache))})
    jobs["node_local"] = Job(slurm_cluster, job_id, out, root / f"node-local-{job_id}.out")

    # A user error with 2 processes (torchrun's report follows the training's error line): queued behind
    # the others, it fails within seconds of starting.
    job_id = slurm_cluster.sbatch(
        *common, f"--output={root}/error-%j.out", str(REPO / "launch" / "slurm_single_node.sbatch"),
        *train_args(root / "no-such-folder", root / "cache-error", "--output-dir", str(root / "error")),
        cwd=REPO, env=env)
    jobs["error"] = Job(slurm_cluster, job_id, root / "error", root / f"error-{job_id}.out")
    return jobs


def node_local_python(disks: Path, cache: Path) -> Path:
    """The interpreter for the job, in a private mount namespace where `disks/<node name>` is mounted on
    `cache`: the test cluster's nodes all run on this machine, and this gives each its own disk at the same
    path, as node-local scratch does."""
    script = disks.parent / "node-local-python"
    script.write_text(f"""#!/bin/bash
disk={disks}/${{SLURMD_NODENAME:?}}
mkdir -p "$disk"
exec unshare --mount --propagation private /bin/bash -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' \\
  bash "$disk" {cache} {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


def cache_files(folder: Path) -> dict[str, str]:
    """{name: sha256} of every file in a cache folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def train_steps(run_dir: Path) -> list[int]:
    return [row["_step"] for row in wandb_reader.history(run_dir) if "train/loss" in row]


def check_finished_run(job: Job, processes: int, steps: int) -> list[Path]:
    """metrics.json of a finished run, and the W&B run(s) it wrote offline (all with the run's id)."""
    assert (job.out / "metrics.json").is_file(), job.diagnose()
    metrics = read_metrics(job.out)
    assert metrics["train"]["num_processes"] == processes
    assert metrics["train"]["global_step"] == steps
    assert metrics["test"]["num_samples"] == 8
    assert not (job.out / "STOP").exists()
    run_id = (job.out / "wandb_run_id").read_text().strip()
    folders = wandb_reader.run_dirs(job.out / "wandb")
    assert folders and all(wandb_reader.run_id(f) == run_id for f in folders), folders
    return folders


# First: it must see its job while it is training; the other two jobs run meanwhile.
def test_usr1_checkpoints_requeues_and_resumes_the_same_run(slurm_jobs):
    job = slurm_jobs["signal"]
    cluster = job.cluster
    # Deterministic: signal once the first checkpoint is complete, long before the last of 160 steps.
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list((job.out / "checkpoints").glob("step_*/train_state.json")):
        state = cluster.job(job.id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), job.diagnose()
        assert time.monotonic() < deadline, job.diagnose()
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job.id)

    # The job checkpoints, exits and requeues itself; a requeued job waits ~2 minutes (BeginTime) unless
    # told to start now.
    requeued = job.wait(condition=lambda j: j.get("JobState") == "PENDING" and int(j.get("Restarts", 0)) >= 1)
    assert requeued["JobState"] == "PENDING", f"the job ended instead of requeueing\n{job.diagnose()}"
    # slurmd refuses to start a job in the same second as it killed it ("already killed"): wait past it.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    final = job.assert_completed()
    assert final["Restarts"] == "1"

    text = job.text()
    assert "SIGUSR1: asking the training to save a checkpoint and stop" in text, job.diagnose()
    assert f"requeueing job {job.id}" in text
    stopped = re.search(r"stop requested \(\S*STOP\s+exists\):\s+saving\s+a\s+checkpoint\s+at\s+step\s+(\d+)", text)
    assert stopped, job.diagnose()
    stop_step = int(stopped.group(1))
    assert 5 <= stop_step < 4 * SIGNAL_EPOCHS
    assert re.search(rf"resumed\s+from\s+\S*checkpoints/step_{stop_step}\s", text), job.diagnose()
    assert "(restart 1)" in text

    # One W&B run from start to end: two offline folders (one per session) with the same id, every
    # step logged once.
    folders = check_finished_run(job, processes=2, steps=4 * SIGNAL_EPOCHS)
    assert len(folders) == 2, folders
    first, second = (train_steps(f) for f in folders)
    assert first == list(range(1, stop_step + 1))
    assert second == list(range(stop_step + 1, 4 * SIGNAL_EPOCHS + 1))


def test_scancel_stops_the_job_with_a_checkpoint_that_a_resubmission_finishes(slurm_jobs):
    """A plain `scancel` (SIGTERM to every process of the job, SIGKILL KillWait seconds later): the training
    saves a checkpoint at the next step and stops; the same options again with --resume auto (what the
    job script adds) finish the run from there."""
    job = slurm_jobs["cancel"]
    cluster = job.cluster
    cluster.run("scontrol", "release", job.id)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list((job.out / "checkpoints").glob("step_*/train_state.json")):
        assert cluster.job(job.id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job.diagnose()
        assert time.monotonic() < deadline, job.diagnose()
        time.sleep(0.2)
    cluster.run("scancel", job.id)
    assert job.wait()["JobState"] == "CANCELLED", job.diagnose()
    while "stopped with a checkpoint" not in job.text():  # the job script's last line, within KillWait
        assert time.monotonic() < deadline, job.diagnose()
        time.sleep(0.2)
    text = job.text()
    stopped = re.search(r"stop\s+requested\s+\((?:SIGTERM|\S*STOP\s+exists)\):\s+saving\s+a\s+checkpoint\s+at\s+step\s+"
                        r"(\d+)", text)
    assert stopped, job.diagnose()  # (the launcher, SIGTERMed too, exits 1: torchrun's SignalException)
    step = int(stopped.group(1))
    assert 5 <= step < 4 * SIGNAL_EPOCHS
    assert re.search(rf"stopped with a checkpoint, \S*checkpoints/step_{step};", text), job.diagnose()

    resumed = launch(["--resume", "auto", "--output-dir", str(job.out), "--wandb-mode", "disabled"], nproc=2)
    assert re.search(rf"resumed\s+from\s+\S*checkpoints/step_{step}\s", resumed.stdout), resumed.stdout[-3000:]
    assert read_metrics(job.out)["train"]["global_step"] == 4 * SIGNAL_EPOCHS


def test_multi_node_job_trains_on_two_nodes(slurm_jobs):
    job = slurm_jobs["multi"]
    job.assert_completed()
    text = job.text()
    assert "2 node(s) x 2 CPU (gloo; no CUDA device) process(es)" in text, job.diagnose()
    folders = check_finished_run(job, processes=4, steps=4)  # 2 epochs of 32 images at 4 x 4
    assert len(folders) == 1, folders  # one W&B run
    assert train_steps(folders[0]) == [1, 2, 3, 4]


def test_multi_node_caches_in_a_shared_and_in_node_local_cache_dir(slurm_jobs):
    """Shared --cache-dir: one copy of each cache, written once. Node-local (each node its own disk at that
    path): each node builds its own, identical copies, and the run's results are the shared run's."""
    shared, local = slurm_jobs["multi"], slurm_jobs["node_local"]
    shared.assert_completed()
    local.assert_completed()
    assert "is not shared between the nodes" not in shared.text(), shared.diagnose()
    assert "is not shared between the nodes: each node builds or reads its own copy" in local.text(), local.diagnose()
    files = cache_files(shared.out.parent / "cache-multi")
    assert sorted(name.split("-")[0] + Path(name).suffix for name in files) == [
        ".features.lock", "features.json", "features.npy", "images.json", "images.npy"], files  # no temp or probe file
    assert [name for name in os.listdir(shared.out.parent / "cache-node-local")] == []  # under the mounts
    disks = sorted((shared.out.parent / "disks").iterdir())
    assert len(disks) == 2, disks  # the job's two nodes
    arrays = [{k: v for k, v in cache_files(d).items() if k.endswith(".npy")} for d in disks]
    assert arrays[0] == arrays[1] == {k: v for k, v in files.items() if k.endswith(".npy")}
    assert sorted(cache_files(disks[0])) == sorted(files)
    a, b = read_metrics(shared.out), read_metrics(local.out)
    assert b["train"]["epoch_loss"] == pytest.approx(a["train"]["epoch_loss"], rel=1e-6)
    assert b["test"]["accuracy"] == a["test"]["accuracy"] and b["test"]["loss"] == pytest.approx(a["test"]["loss"])


def test_single_node_job_trains_in_runs_slurm_job_id(slurm_jobs):
    job = slurm_jobs["single"]
    job.assert_completed()
    assert "2 CPU process(es) over gloo" in job.text(), job.diagnose()
    folders = check_finished_run(job, processes=2, steps=8)  # 2 epochs of 32 images at 2 x 4
    assert len(folders) == 1, folders
    assert train_steps(folders[0]) == list(range(1, 9))


def test_a_failed_job_log_ends_with_the_training_error(slurm_jobs):
    job = slurm_jobs["error"]
    final = job.wait()
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "1:0", job.diagnose()
    lines = [line for line in job.text().splitlines() if line.strip()]
    error = f"error: --data-dir {job.out.parent / 'no-such-folder'} does not exist."
    assert [line for line in lines if line.startswith("error:")] == [lines[-1].partition(": ")[2]], job.diagnose()
    assert "ChildFailedError" in job.text()  # torchrun's report, between the error and the last line
    assert re.fullmatch(r"\S+ \S+ training exited with code 1: " + re.escape(error) + ".*", lines[-1]), lines[-1]


# ---------------------------------------------------------------- a sweep as a job array

# Two long configurations first (the whole network trains): each worker takes one of them, however late the
# other starts. Then two with a frozen backbone, whose features one worker computes and the other reuses.
SWEEP = """\
name: slurm-grid
method: grid
parameters:
  freeze: {values: [none, features]}
  lr: {values: [0.01, 0.005]}
"""
SWEEP_FOLDERS = ["00-freeze=none,lr=0.01", "01-freeze=none,lr=0.005", "02-freeze=features,lr=0.01",
                 "03-freeze=features,lr=0.005"]


def sweep_job(cluster: SlurmCluster, root: Path, sweep_file: Path, array: str, name: str, env: dict,
              *options: str, hold: bool = False) -> str:
    """sbatch of launch/slurm_sweep.sbatch: the array id (each task logs to <root>/<name>-<array>_<task>.out)."""
    return cluster.sbatch(*(["--hold"] if hold else []), f"--array={array}", "--gpus-per-node=1", "--cpus-per-task=1",
                          "--time=10", f"--output={root}/{name}-%A_%a.out", str(REPO / "launch" / "slurm_sweep.sbatch"),
                          str(sweep_file), *options, cwd=REPO, env=env)


@pytest.fixture(scope="session")
def sweep_array(slurm_cluster, image_tree, tmp_path_factory):
    """launch/slurm_sweep.sbatch as 2 workers (`sbatch --array=0-1`) of a 4-configuration grid, one process per
    run. Submitted on its own (the other jobs' fixture is not needed), so `-k sweep` runs it alone."""
    root = tmp_path_factory.mktemp("slurm_sweep")
    sweep_file = root / "grid.yaml"
    sweep_file.write_text(SWEEP)
    env = {k: v for k, v in run_env({"PYTHON": sys.executable}).items()
           if not k.startswith("SLURM_") and k not in ("TL_DIST_REPO",)}
    env["SLURM_CONF"] = str(slurm_cluster.conf)
    env["HF_HOME"] = str(write_user_default_config(root / "hf_home"))
    out = root / "sweep"
    # ResNet-18 at 64 px: a feature pass long enough to catch its builder holding the features' lock.
    options = train_args(image_tree, root / "cache", "--epochs", "4", "--output-dir", str(out), *ARRAY_BACKBONE)
    array_id = sweep_job(slurm_cluster, root, sweep_file, "0-1", "sweep", env, *options)
    tasks = [Job(slurm_cluster, f"{array_id}_{i}", out, root / f"sweep-{array_id}_{i}.out") for i in range(2)]

    # A long sweep of one configuration, one worker, for the signal test; held until that test releases it: it
    # must still be training when the signal comes.
    long_file = root / "long.yaml"
    long_file.write_text("name: slurm-long\nmethod: grid\nparameters:\n  lr: {values: [0.005]}\n")  # no divergence in 40 epochs
    long_out = root / "long"
    # 96 px: steps slow enough that the run is still training when the signal comes on an idle machine
    long_options = train_args(image_tree, root / "cache-long", "--epochs", str(SIGNAL_EPOCHS), "--freeze", "none",
                              "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "5", "--image-size", "96",
                              "--output-dir", str(long_out))
    long_id = sweep_job(slurm_cluster, root, long_file, "0", "long", env, *long_options, hold=True)
    long_task = Job(slurm_cluster, f"{long_id}_0", long_out / "00", root / f"long-{long_id}_0.out")
    return sweep_file, out, tasks, env, long_task, options


def test_a_sweep_array_shares_one_study_each_task_taking_other_configurations(sweep_array):
    """Two array tasks, two workers of one study: each configuration trains once, in one of them (both take
    some), every run finishes, and the summary command ranks them. The frozen backbone's features are
    computed once for the two runs that use them: the task that takes the features' lock is paused (SIGSTOP)
    while it holds it, and the other waits on the lock until it goes on, then reuses what it wrote. A task
    submitted again finds nothing left and trains nothing."""
    sweep_file, out, tasks, env, _, options = sweep_array
    cache, cluster = out.parent / "cache", tasks[0].cluster
    not_ended = lambda: any(cluster.job(t.id).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING")  # noqa: E731
                            for t in tasks)
    builder = pause_the_lock_holder(cache, not_ended, timeout=JOB_TIMEOUT)
    try:
        (lock,) = cache.glob(".features-*.lock")
        wait_until(lambda: False in flock_holders(lock).values(), JOB_TIMEOUT, "the other task waiting on the lock")
    finally:
        os.kill(builder, signal.SIGCONT)
    for i, task in enumerate(tasks):
        task.assert_completed()
        text = task.text()
        assert f"array task {i} of job {task.id.split('_')[0]}" in text, task.diagnose()
        assert "a worker of sweep" in text and "1 process(es) per run" in text and "exited with code 0" in text
    started = {name: [i for i, task in enumerate(tasks) if f"] {name}: starting" in task.text()]
               for name in SWEEP_FOLDERS}
    assert sorted(len(by) for by in started.values()) == [1, 1, 1, 1], started
    assert {i for by in started.values() for i in by} == {0, 1}, started  # both workers took configurations
    assert started[SWEEP_FOLDERS[0]] != started[SWEEP_FOLDERS[1]], started
    for name, (freeze, lr) in zip(SWEEP_FOLDERS, (("none", 0.01), ("none", 0.005), ("features", 0.01),
                                                 ("features", 0.005))):
        metrics = read_metrics(out / name)
        assert (metrics["config"]["freeze"], metrics["config"]["lr"]) == (freeze, lr)
        assert metrics["train"]["global_step"] == 8 * 4  # 32 images, batch 4, 4 epochs
        (run,) = wandb_reader.run_dirs(out / name / "wandb")
        record = next(r.run for r in wandb_reader.records(run) if r.WhichOneof("record_type") == "run")
        assert record.run_group == "slurm-grid"
    # One task computed the features; the other waited for it, then reused them, and said so.
    waited = ["features: waiting for another run" in task.text() for task in tasks]
    said = ["features: reused" in task.text() for task in tasks]
    assert sorted(said) == [False, True] and waited == said, [task.diagnose() for task in tasks]

    proc = subprocess.run([sys.executable, "-m", "tl_dist.sweep", str(sweep_file), "--summary", "--output-dir",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = {r["run_folder"]: read_metrics(r["run_folder"])["train"]["epoch_loss"][-1] for r in rows}
    assert [r["run_folder"] for r in rows] == sorted(map(str, (out / n for n in SWEEP_FOLDERS)), key=losses.get)
    assert [(r["rank"], r["status"]) for r in rows] == [(str(i), "finished") for i in range(1, 5)]

    again = sweep_job(tasks[0].cluster, out.parent, sweep_file, "0", "again", env, *options)
    task = Job(tasks[0].cluster, f"{again}_0", out, out.parent / f"again-{again}_0.out")
    task.assert_completed()
    assert "starting" not in task.text() and "exited with code 0" in task.text(), task.diagnose()


def test_a_signalled_sweep_task_requeues_and_resumes_its_run(sweep_array):
    """USR1 to the worker's task: its run checkpoints, the task requeues itself and, started again, its worker
    takes the interrupted configuration over and resumes the run from that checkpoint to the end."""
    job = sweep_array[4]
    cluster = job.cluster
    cluster.run("scontrol", "release", job.id.split("_")[0])
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list((job.out / "checkpoints").glob("step_*/train_state.json")):
        assert cluster.job(job.id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job.diagnose()
        assert time.monotonic() < deadline, job.diagnose()
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job.id)
    requeued = job.wait(condition=lambda j: j.get("JobState") == "PENDING" and int(j.get("Restarts", 0)) >= 1)
    assert requeued["JobState"] == "PENDING", f"the task ended instead of requeueing\n{job.diagnose()}"
    time.sleep(2)  # slurmd refuses to start a job in the second it killed it
    cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    assert job.assert_completed()["Restarts"] == "1"
    text = job.text()
    assert "requeueing job" in text and "restart 1) on" in text and "00: continuing" in text, job.diagnose()
    stopped = re.search(r"saving\s+a\s+checkpoint\s+at\s+step\s+(\d+)", text)
    assert stopped, job.diagnose()
    assert re.search(rf"resumed\s+from\s+\S*/00/checkpoints/step_{stopped.group(1)}\s", text), job.diagnose()
    metrics = read_metrics(job.out)
    assert metrics["config"]["lr"] == 0.005 and metrics["train"]["global_step"] == 8 * SIGNAL_EPOCHS
