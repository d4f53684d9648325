"""The entry point as the README describes it: the `tl-dist-train` command, the throughput in the log and in
W&B, a machine without wandb, an --lr float32 cannot hold, and XLA refused at start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wandb_reader
from ci_tools import missing_tool
from conftest import REPO, read_metrics, run_env, run_module, tiny_args
from tl_dist.config import parse_args


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_the_console_script_trains(image_tree, tmp_path):
    """`tl-dist-train` (pyproject's [project.scripts], installed by `pip install -e .`) is the entry point:
    it trains, and a user error ends with one line and exit code 1."""
    script = Path(sys.executable).with_name("tl-dist-train")
    if not script.is_file():
        missing_tool(f"tl-dist-train is not installed next to {sys.executable} (pip install -e .)")
    out = tmp_path / "run"
    proc = subprocess.run([str(script), *tiny_args(image_tree, out, tmp_path / "cache", "--max-steps", "2",
                                                   "--wandb-mode", "disabled")],
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)["train"]["global_step"] == 2
    missing = subprocess.run([str(script), "--data-dir", str(tmp_path / "nowhere"), "--output-dir",
                              str(tmp_path / "run2"), "--wandb-mode", "disabled"],
                             cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and error_lines(missing.stderr) == [
        f"error: --data-dir {tmp_path / 'nowhere'} does not exist. Pass the folder that holds one sub-folder per "
        "class, or leave --data-dir at its default to download Caltech-101."]


def test_the_throughput_in_the_log_and_in_wandb(image_tree, tmp_path):
    """A log (not a terminal) gets each epoch's training lines with the loss and images/s, its last at the
    epoch's last step (how often they come, --log-every seconds, is tests/test_edges.py's); W&B gets
    train/images_per_second at every step, ending at metrics.json's figure."""
    out = tmp_path / "run"
    proc = run_module(tiny_args(image_tree, out, tmp_path / "cache", "--wandb-mode", "offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ends = re.findall(r"^epoch (\d)/2 8/8 steps \(.*\)  loss \d+\.\d{4}  [\d,]+ img/s$", proc.stdout, re.M)
    assert ends == ["1", "2"], proc.stdout  # 2 epochs of 8 steps
    (run,) = wandb_reader.run_dirs(out / "wandb")
    rows = [r for r in wandb_reader.history(run) if "train/images_per_second" in r]
    assert [r["_step"] for r in rows] == list(range(1, 17)) and all(r["train/images_per_second"] > 0 for r in rows)
    assert rows[-1]["train/images_per_second"] == pytest.approx(read_metrics(out)["train"]["images_per_second"])


@pytest.fixture
def without_wandb(tmp_path) -> dict:
    """The environment of a machine where `import wandb` fails: a sitecustomize that blocks it."""
    shim = tmp_path / "no-wandb"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # import wandb: ImportError\n")
    return {"PYTHONPATH": f"{shim}:{REPO}", "HOME": str(tmp_path), "WANDB_MODE": None, "WANDB_API_KEY": None}


def test_without_wandb_disabled_runs_and_the_default_says_what_to_do(image_tree, tmp_path, without_wandb):
    check = subprocess.run([sys.executable, "-c", "import wandb"], env=run_env(without_wandb), capture_output=True,
                           text=True)
    assert check.returncode == 1 and "ModuleNotFoundError" in check.stderr  # the machine has no wandb
    out = tmp_path / "run"
    proc = run_module(tiny_args(image_tree, out, tmp_path / "cache", "--max-steps", "2", "--wandb-mode",
                                "disabled"), env=without_wandb)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)["train"]["global_step"] == 2 and not (out / "wandb").exists()

    default = run_module(tiny_args(image_tree, tmp_path / "run2", tmp_path / "cache2"), env=without_wandb)
    assert default.returncode == 2 and "Traceback" not in default.stderr
    assert error_lines(default.stderr) == [
        "error: argument --wandb-mode: W&B logging (offline) needs wandb: pip install wandb, or pass "
        "--wandb-mode disabled (see python -m tl_dist.train --help)"], default.stderr[-3000:]
    assert default.stderr.strip().splitlines()[-1] == error_lines(default.stderr)[0]
    assert not (tmp_path / "run2").exists() and not (tmp_path / "cache2").exists()


@pytest.mark.parametrize("lr", ["1e39", "0", "-0.1"])
def test_an_lr_float32_cannot_hold_is_refused(lr, image_tree, tmp_path, capsys):
    """The optimizer computes in float32, whose largest number is about 3.4e38: an --lr above 3e38 would be
    inf in the first step. Refused by the parser, as a non-positive one (so before anything is written)."""
    with pytest.raises(SystemExit) as exit:
        parse_args(tiny_args(image_tree, tmp_path / "run", tmp_path / "cache", "--lr", lr))
    assert exit.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: argument --lr: must be positive and below 3e38, got {float(lr)} (see python -m tl_dist.train --help)"]
    assert list(tmp_path.iterdir()) == []


FAKE_XLA = {  # the modules of torch_xla that Accelerate imports when it finds it installed
    "torch_xla/__init__.py": "",
    "torch_xla/amp.py": "",
    "torch_xla/core/__init__.py": "",
    "torch_xla/core/xla_model.py": "",
    "torch_xla/distributed/__init__.py": "",
    "torch_xla/distributed/parallel_loader.py": "class MpDeviceLoader:\n    pass\n",
    "torch_xla/distributed/xla_multiprocessing.py": "",
    "torch_xla/runtime.py": "def device_type():\n    return 'TPU'\n",
}


def test_xla_is_refused_at_start(image_tree, tmp_path):
    """With torch_xla installed (a stand-in package here) Accelerate would run on XLA whatever the launch
    said: one error line, exit 1, nothing written. USE_TORCH_XLA=0, which the line names, hides it."""
    fake = tmp_path / "fake-xla"
    for name, text in FAKE_XLA.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    args = tiny_args(image_tree, tmp_path / "run", tmp_path / "cache", "--max-steps", "1", "--wandb-mode", "disabled")
    env = {"PYTHONPATH": f"{fake}:{REPO}"}
    proc = run_module(args, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: XLA/TPU (torch_xla is installed; USE_TORCH_XLA=0 hides it from Accelerate) "
                           "is not supported: tl_dist trains with DDP on the CPU")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    hidden = run_module(args, env={**env, "USE_TORCH_XLA": "0"})
    assert hidden.returncode == 0, hidden.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_processes"] == 1
