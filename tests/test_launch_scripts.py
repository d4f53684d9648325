"""The scripts under launch/: bash -n and shellcheck on every one, the Slurm settings that make a job
preemption-safe, what the two job scripts share (launch/slurm_common.sh); each job script run as Slurm runs
it, with stand-ins for the training and Slurm's commands (what it launches, how, and what a signal to it
does); and a real run of the local debug script with a user's Accelerate default config in place. The
Slurm tests run the same scripts on a real cluster (tests/test_slurm.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accelerate_user_config import write_user_default_config
from ci_tools import missing_tool
from conftest import REPO, read_metrics, run_env

SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
SBATCH = [p for p in SCRIPTS if p.suffix == ".sbatch"]
COMMON = REPO / "launch" / "slurm_common.sh"  # sourced by the job scripts, not run


def test_the_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_single_node.sbatch", "slurm_multi_node.sbatch", "local_debug.sh", COMMON.name} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK) == (script != COMMON), f"{script.name}: executable only if run"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        missing_tool("shellcheck is not installed (apt-get install shellcheck)")
    # -x: the job scripts are checked together with the file they source
    proc = subprocess.run(["shellcheck", "--shell=bash", "-x", str(script)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def code_lines(script: Path) -> list[str]:
    return [line.strip() for line in script.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_job_scripts_share_their_logic_through_one_file():
    """The run folder, signals, wait and requeue live in launch/slurm_common.sh; each job script holds what
    differs, and the two repeat only the few lines that find and source it."""
    single, multi = (code_lines(REPO / "launch" / name) for name in
                     ("slurm_single_node.sbatch", "slurm_multi_node.sbatch"))
    shared = [line for line in single if line in multi]
    assert len(shared) <= 12, shared
    for lines in (single, multi):
        assert 'source "$REPO/launch/slurm_common.sh"' in lines
        assert not any("trap " in line or "scontrol requeue" in line for line in lines)
    assert "scontrol requeue" in COMMON.read_text()


# Stand-ins for what a job script calls: the training (PYTHON; it writes down its arguments, then exits with
# STUB_EXIT, or at the STOP file leaves a checkpoint and exits 75 as the training does), Slurm's scontrol
# (one node, at 127.0.0.1; `requeue` is written down) and srun (runs its command once, as node 0), and an
# nvidia-smi that finds no GPU.
STUB_PYTHON = """#!/bin/bash
if [[ $1 == -c ]]; then echo 29511; exit 0; fi  # the multi-node script's free port
printf '%s\\n' "$@" >"$CALLS/python"
echo "$ACCELERATE_MIXED_PRECISION" >"$CALLS/precision"
if [[ -n ${STUB_STOP:-} ]]; then
  while [[ ! -e $STUB_STOP/STOP ]]; do sleep 0.02; done
  mkdir -p "$STUB_STOP/checkpoints/step_5" && touch "$STUB_STOP/checkpoints/step_5/train_state.json"
  exit 75
fi
exit "${STUB_EXIT:-0}"
"""
STUBS = {"python": STUB_PYTHON,
         "scontrol": """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 NodeAddr=127.0.0.1" ;;
  *) echo "$*" >>"$CALLS/scontrol" ;;
esac
""",
         "srun": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
         "nvidia-smi": "#!/bin/sh\nexit 9\n"}


def fake_job(tmp_path: Path, script: Path, args: list[str], **env) -> subprocess.Popen:
    """Start `script` as Slurm would in job 7 (array task 0), with the stand-ins; its output goes to
    tmp_path/job.out, what the stand-ins were given to tmp_path/calls/."""
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    for folder in (stubs, calls):
        folder.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST":
             "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "6"}
    env = run_env({**slurm, "PYTHON": str(stubs / "python"), "REAL_PYTHON": sys.executable, "CALLS": str(calls),
                   "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path), **env})
    with open(tmp_path / "job.out", "wb") as log:
        return subprocess.Popen(["bash", str(script), *args], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text("name: g\nmethod: grid\nparameters:\n  lr: {values: [0.05, 0.01]}\n")
    return path


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_job_scripts_launch_the_training_with_a_config_file_of_the_repository(script, image_tree, tmp_path):
    """`accelerate launch` without --config_file reads the user's default config: every job script launches
    with one from accelerate_configs/ (the Slurm tests run them with a hostile default in place); the user's
    options go through, with the run folder and --resume auto added. The sweep's script starts a worker, whose
    runs launch with the repository's config."""
    user = ["--data-dir", str(image_tree), "--epochs", "3"]
    if script.name == "slurm_sweep.sbatch":
        job = fake_job(tmp_path, script, [str(sweep_file(tmp_path)), *user, "--output-dir", str(tmp_path / "sw")])
    else:
        job = fake_job(tmp_path, script, user)
    assert job.wait(timeout=120) == 0, (tmp_path / "job.out").read_text()
    argv = (tmp_path / "calls" / "python").read_text().splitlines()
    if script.name == "slurm_sweep.sbatch":
        # The script starts a worker of the sweep with the node's processes per run (SLURM_GPUS_ON_NODE=2);
        # the worker launches each run under accelerate launch with --accelerate-config, a repository file.
        assert argv == ["-m", "tl_dist.sweep", str(tmp_path / "grid.yaml"), "--num-processes", "2", *user,
                        "--output-dir", str(tmp_path / "sw")]
        from tl_dist.sweep.__main__ import build_parser
        config = Path(build_parser().parse_args([str(tmp_path / "grid.yaml")]).accelerate_config)
        assert config.parent == REPO / "accelerate_configs" and config.is_file()
        assert "the sweep worker exited with code 0" in (tmp_path / "job.out").read_text()
        return
    train = argv.index(str(REPO / "tl_dist" / "train.py"))
    launcher, options = argv[:train], argv[train + 1:]
    config = {"slurm_single_node.sbatch": "multi_gpu.yaml", "slurm_multi_node.sbatch": "multi_node.yaml"}
    assert launcher[:4] == ["-m", "accelerate.commands.launch", "--config_file",
                            str(REPO / "accelerate_configs" / config[script.name])]
    assert launcher[launcher.index("--num_processes") + 1] == "2"
    assert options[options.index("--output-dir") + 1] == "runs/slurm-7" and (tmp_path / "runs/slurm-7").is_dir()
    assert options[:len(user)] == user and options[-2:] == ["--resume", "auto"]
    assert (tmp_path / "calls" / "precision").read_text().strip() == "no"  # no GPU: fp32
    assert "training exited with code 0" in (tmp_path / "job.out").read_text()


@pytest.mark.parametrize("signame", ["USR1", "TERM"])
def test_a_signal_to_the_batch_shell_stops_the_training_with_a_checkpoint(signame, tmp_path):
    """USR1 (the time limit ahead) or TERM to the batch shell: it touches STOP in the run folder (torchrun
    would not pass USR1 on), the training saves a checkpoint and exits 75; after USR1 the job requeues itself
    and exits 0, after TERM it exits 75 and says how to continue."""
    out = tmp_path / "runs" / "slurm-7"
    job = fake_job(tmp_path, REPO / "launch" / "slurm_single_node.sbatch", ["--epochs", "3"], STUB_STOP=str(out))
    deadline = time.monotonic() + 60
    while not (tmp_path / "calls" / "python").exists():  # the training has started
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.out").read_text()
        time.sleep(0.02)
    job.send_signal(getattr(signal, f"SIG{signame}"))
    code = job.wait(timeout=60)
    log = (tmp_path / "job.out").read_text()
    requeued = (tmp_path / "calls" / "scontrol").read_text() if (tmp_path / "calls" / "scontrol").exists() else ""
    assert f"SIG{signame}: asking the training to save a checkpoint and stop" in log
    assert "training exited with code 75" in log and not (out / "STOP").exists()  # removed for the next start
    if signame == "USR1":
        assert (code, requeued) == (0, "requeue 7\n"), log
        assert "requeueing job 7; it resumes from the latest checkpoint in runs/slurm-7 (saved after the signal: " \
               "runs/slurm-7/checkpoints/step_5)" in log
    else:
        assert (code, requeued) == (75, ""), log
        assert "stopped with a checkpoint, runs/slurm-7/checkpoints/step_5; continue with sbatch " \
               "launch/slurm_single_node.sbatch <the same options> --output-dir runs/slurm-7" in log


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_options_for_time_limits_and_preemption(script):
    options = re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M)
    assert "--requeue" in options
    assert "--open-mode=append" in options
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in options), options
    assert any(o.startswith("--gpus-per-node=") for o in options), options


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_script_outside_slurm_says_how_to_submit(script):
    env = {k: v for k, v in run_env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(script), "--epochs", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "submit this script with sbatch" in proc.stderr


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_script_outside_the_repository_says_where_to_submit(script, tmp_path):
    """Slurm runs a copy of the script: submitted from elsewhere without TL_DIST_REPO, it cannot find the
    shared part and says so in one line."""
    env = {k: v for k, v in run_env({"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path)}).items()
           if k != "TL_DIST_REPO"}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path} is not the tl_dist repository. Submit from its root, or " \
        "set TL_DIST_REPO."
    assert list(tmp_path.iterdir()) == []


def test_local_debug_run(image_tree, tmp_path):
    """launch/local_debug.sh, with the user's options after the script's own: a few steps, one process.
    A user's Accelerate default config (gpu_ids '0', fp16) is in place and changes nothing: the script
    starts the training directly, and only `accelerate launch` reads that file."""
    hf_home = write_user_default_config(tmp_path / "hf_home")
    out = tmp_path / "debug"
    proc = subprocess.run(
        [str(REPO / "launch" / "local_debug.sh"), "--data-dir", str(image_tree), "--cache-dir",
         str(tmp_path / "cache"), "--model", "vgg_tiny", "--weights", "none", "--image-size", "32",
         "--batch-size", "4", "--max-steps", "3", "--output-dir", str(out), "--wandb-mode", "disabled"],
        cwd=tmp_path, env=run_env({"PYTHON": sys.executable, "HF_HOME": str(hf_home)}), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics["train"]["global_step"] == 3
    assert metrics["train"]["num_processes"] == 1
    assert Path(out / "model").is_dir()
