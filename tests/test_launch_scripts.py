"""The scripts under launch/: bash -n and shellcheck on every one, the Slurm settings that make a job
preemption-safe, what the two job scripts share (launch/slurm_common.sh) and how they launch, and a real
run of the local debug script with a user's Accelerate default config in place."""

from __future__ import annotations

import os
import re
import shutil
import sys
import subprocess
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


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_job_scripts_launch_with_a_config_file_of_the_repository(script):
    """`accelerate launch` without --config_file reads the user's default config: every launch in the job
    scripts names one from accelerate_configs/ (the Slurm tests run them with a hostile default in place)."""
    text = script.read_text()
    launches = re.findall(r"accelerate\.commands\.launch\s+(--config_file\s+\S+)?", text)
    assert launches and all(launches), launches
    for config in re.findall(r"(\w+\.yaml)", text):
        assert (REPO / "accelerate_configs" / config).is_file(), config


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
