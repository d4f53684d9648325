"""The scripts under launch/: bash -n and shellcheck on every one, the Slurm settings that make a job
preemption-safe, and a real run of the local debug script."""

from __future__ import annotations

import os
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_env

SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
SBATCH = [p for p in SCRIPTS if p.suffix == ".sbatch"]


def test_the_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_single_node.sbatch", "slurm_multi_node.sbatch", "local_debug.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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


def test_local_debug_run(image_tree, tmp_path):
    """launch/local_debug.sh, with the user's options after the script's own: a few steps, one process."""
    out = tmp_path / "debug"
    proc = subprocess.run(
        [str(REPO / "launch" / "local_debug.sh"), "--data-dir", str(image_tree), "--cache-dir",
         str(tmp_path / "cache"), "--model", "vgg_tiny", "--weights", "none", "--image-size", "32",
         "--batch-size", "4", "--max-steps", "3", "--output-dir", str(out), "--wandb-mode", "disabled"],
        cwd=tmp_path, env=run_env({"PYTHON": sys.executable}), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics["train"]["global_step"] == 3
    assert metrics["train"]["num_processes"] == 1
    assert Path(out / "model").is_dir()
