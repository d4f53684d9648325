"""Shared test fixtures: small real and generated image trees, and the real entry point, in process and
through `accelerate launch` with several CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "caltech-101-mini"
sys.path.insert(0, str(Path(__file__).parent))  # tests/wandb_reader.py
sys.path.insert(0, str(REPO))  # in-process tests import this checkout's tl_dist, installed or not
from tl_dist.runtime import reset_accelerate_state  # noqa: E402

# Collected first: the Slurm tests mostly wait on their jobs, and these files run longest. Under the README's
# `pytest -n 2 --dist loadfile` they then overlap the others instead of running alone at the end.
FIRST_FILES = ("test_slurm.py", "test_run_folder.py", "test_sweep.py", "test_options.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_FILES)))  # stable: each file keeps its order


# Secrets a run must never write anywhere; set for every run so tests can look for them.
PLANTED_SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
                   "KAGGLE_KEY": "kaggle-secret-fedcba9876543210"}


def make_image_tree(root: Path, classes: int = 4, per_class: int = 10, size: int = 40, seed: int = 0) -> Path:
    """Class folders of JPEGs whose colour and stripe direction depend on the class: learnable in a few
    steps, with some grayscale and PNG files as in the real data."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 67) % 256, (c * 131 + 80) % 256, (c * 29 + 160) % 256], dtype=np.float64)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size]
            stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.1 * c))[..., None] * 60
            pixels = np.clip(base + stripes + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            if i % 5 == 0:
                img.convert("L").save(folder / f"img_{i:03d}.png")
            else:
                img.save(folder / f"img_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """4 classes x 10 generated images (read-only: copy it to change it)."""
    return make_image_tree(tmp_path_factory.mktemp("images") / "caltech-101")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real Caltech-101 sample in ../shared/data (read-only)."""
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"the real sample is not at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "KAGGLE_"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               **PLANTED_SECRETS)
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}  # extra={"NAME": None} removes NAME


def launch(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600,
           check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch tl_dist/train.py ARGS` with `nproc` CPU processes (gloo when more than one)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--num_processes", str(nproc)]
    if nproc > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    cmd += [str(REPO / "tl_dist" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=run_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_module(args: list[str], module: str = "tl_dist.train", env: dict | None = None, timeout: int = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=run_env(env),
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(data_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """The small stand-in network at a small image size: the same code path, in seconds."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--cache-dir", str(cache),
            "--model", "vgg_tiny", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--epochs", "2", "--lr", "0.05", *extra]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def train_in_process(args: list[str], env: dict | None = None) -> int:
    """tl_dist.train.main(ARGS) in this process, with W&B quiet, the planted secrets and `env` set; the
    environment and Accelerate's process-wide state are restored afterwards."""
    from tl_dist import train

    saved = dict(os.environ)
    os.environ.update(WANDB_SILENT="true", **PLANTED_SECRETS)
    for name, value in (env or {}).items():
        if value is None:  # None removes the variable
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        return train.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reset_accelerate_state()


@pytest.fixture
def fresh_accelerate_state():
    """Reset Accelerate's process-wide singletons around an in-process run."""
    yield
    reset_accelerate_state()


@pytest.fixture
def copy_tree(tmp_path):
    def _copy(src: Path, name: str = "data") -> Path:
        dest = tmp_path / name
        shutil.copytree(src, dest)
        return dest
    return _copy
