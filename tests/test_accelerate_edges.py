"""Where tl_dist meets a user's Accelerate: real `accelerate launch` every time.

- A user's default config (`gpu_ids: '0'` from a one-GPU workstation) stops a launch that reads it; the
  shipped configs and scripts do not read it (the Slurm jobs: tests/test_slurm.py).
- A user error ends with our one `error:` line under `accelerate launch -q` (one process).
- DeepSpeed, FSDP and Megatron-LM launches are refused with one `error:` line, before anything is written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from accelerate_user_config import write_user_default_config
from conftest import REPO, run_env, taken_port, tiny_args

TRAIN = str(REPO / "tl_dist" / "train.py")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def accelerate_launch(launch_args: list[str], train_args: list[str], cwd: Path, env: dict | None = None
                      ) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCH_ARGS tl_dist/train.py TRAIN_ARGS`; `{port}` in LAUNCH_ARGS becomes a port
    of conftest.taken_port()."""
    with taken_port() as s:
        launch_args = [a.replace("{port}", str(s.getsockname()[1])) for a in launch_args]
        return subprocess.run([*ACCELERATE, *launch_args, TRAIN, *train_args], cwd=cwd, env=run_env(env),
                              capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_a_user_default_config_stops_a_launch_without_config_file(tmp_path):
    """Why the scripts name their config: the same launch as theirs, without --config_file, reads the
    user's default config and dies before starting anything."""
    hf_home = write_user_default_config(tmp_path / "hf_home")
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1"], ["--help"],
                             cwd=tmp_path, env={"HF_HOME": str(hf_home)})
    assert proc.returncode != 0
    assert "Less than two GPU ids were configured" in proc.stderr


def test_quiet_single_process_launch_ends_with_our_error_line(tmp_path):
    """`accelerate launch -q` (one process): the last thing on stderr is our line, no CalledProcessError."""
    missing = tmp_path / "no-such-folder"
    args = ["--data-dir", str(missing), "--output-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"]
    quiet = accelerate_launch(["-q", "--num_processes", "1"], args, cwd=tmp_path)
    assert quiet.returncode == 1
    assert len(error_lines(quiet.stderr)) == 1, quiet.stderr
    assert last_line(quiet.stderr) == error_lines(quiet.stderr)[0]
    assert str(missing) in last_line(quiet.stderr) and "Traceback" not in quiet.stderr
    assert not (tmp_path / "run").exists()
    # Without -q, Accelerate's launcher adds its own traceback after our line: what -q removes.
    loud = accelerate_launch(["--num_processes", "1"], args, cwd=tmp_path)
    assert loud.returncode == 1 and len(error_lines(loud.stderr)) == 1
    assert "CalledProcessError" in last_line(loud.stderr)


def check_refused(proc: subprocess.CompletedProcess, name: str, out: Path) -> None:
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {name} ") and "is not supported" in errors[0]
    assert "DDP on the CPU, one GPU, several GPUs of one node or several nodes" in errors[0]
    assert not out.exists(), sorted(out.rglob("*"))


def test_fsdp_launch_is_refused_before_anything_is_written(tmp_path, image_tree):
    out = tmp_path / "run"
    proc = accelerate_launch(
        ["--use_fsdp", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "{port}"],
        tiny_args(image_tree, out, tmp_path / "cache"), cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    check_refused(proc, "FSDP", out)
    assert not (tmp_path / "cache").exists()


def test_deepspeed_and_megatron_are_refused(tmp_path, image_tree):
    """DeepSpeed's own launcher needs the deepspeed package (not installed here): what it sets in the
    training process, ACCELERATE_USE_DEEPSPEED, comes through the environment of a real single-process launch.
    Megatron-LM launches without its package."""
    out = tmp_path / "run"
    deepspeed = accelerate_launch(["-q", "--num_processes", "1", "--mixed_precision", "no"],
                                  tiny_args(image_tree, out, tmp_path / "cache"), cwd=tmp_path,
                                  env={"HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_DEEPSPEED": "true"})
    check_refused(deepspeed, "DeepSpeed", out)
    assert last_line(deepspeed.stderr) == error_lines(deepspeed.stderr)[0]
    megatron = accelerate_launch(
        ["--use_megatron_lm", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "{port}"],
        tiny_args(image_tree, out, tmp_path / "cache"), cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    check_refused(megatron, "Megatron-LM", out)
