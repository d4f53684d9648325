"""Shared test fixtures: generated image trees, and the real entry point, in process and through
`accelerate launch` with several CPU processes (gloo). Nothing here needs the network or files outside the
repository."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/wandb_reader.py
sys.path.insert(0, str(REPO))  # in-process tests import this checkout's tl_dist, installed or not
from tl_dist.runtime import reset_accelerate_state  # noqa: E402

# Collected first: the Slurm tests mostly wait on their jobs, and these files run longest. Under the README's
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` they then overlap the others instead of running alone
# at the end (without --no-loadscope-reorder, pytest-xdist hands out the files with the most tests first).
FIRST_FILES = ("test_slurm.py", "test_run_folder.py", "test_sweep.py", "test_options.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_FILES)))  # stable: each file keeps its order


# A pid no process can have: Linux keeps pids below pid_max, which is at most 2**22. A test's own child that has
# exited is no such pid: once reaped, its pid may be given to a new process.
NO_SUCH_PID = 2**22 + 7

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
def caltech_like(tmp_path_factory) -> Path:
    """Caltech-101's shape, generated (read-only): 102 classes of 7 to 10 images (869 in all) with the real
    files' quirks (tl_dist/shapes.py), inside a `caltech-101/` folder as in Kaggle's archive, and a stray
    file without an extension in one class folder, as the real BACKGROUND_Google/tmp."""
    from tl_dist.shapes import make_shapes

    root = tmp_path_factory.mktemp("caltech-like")
    classes = make_shapes(root / "caltech-101", classes=102, per_class=10, size=40)
    for c, folder in enumerate(sorted(classes.iterdir())):
        for extra in sorted(folder.iterdir())[10 - c % 4:]:  # 10, 9, 8, 7 images
            extra.unlink()
    (folder / "tmp").write_bytes(b"\x00" * 64)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# An HF_HOME that does not exist: `accelerate launch` merges in $HF_HOME/accelerate/default_config.yaml, and a
# developer's own (a one-GPU workstation's `gpu_ids: '0'` stops every multi-process launch) must not reach
# the tests. Tests of that file set HF_HOME themselves (tests/accelerate_user_config.py).
NO_HF_HOME = Path(tempfile.gettempdir()) / "tl_dist-tests-no-hf-home"


def run_env(extra: dict | None = None) -> dict:
    """The environment of a run started by a test: this checkout's tl_dist, W&B offline and quiet, no
    Accelerate, W&B or Kaggle settings of the developer's, the planted secrets; then `extra` (a None value
    removes that variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "KAGGLE_"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               HF_HOME=str(NO_HF_HOME), **PLANTED_SECRETS)
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}  # extra={"NAME": None} removes NAME


def launch_command(args: list[str], nproc: int, port: int | None = None) -> list[str]:
    """`accelerate launch tl_dist/train.py ARGS` with `nproc` CPU processes (gloo when more than one, with
    the port of a `taken_port()`)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--num_processes", str(nproc)]
    if nproc > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(port)]
    return cmd + [str(REPO / "tl_dist" / "train.py"), *args]


@contextlib.contextmanager
def taken_port():
    """A listening socket whose port is given to `accelerate launch`, which inherits the socket: finding the
    port in use, it has torchrun choose one itself (its standalone rendezvous binds port 0). A port found
    free and handed over could be taken by another process between the choice and the launcher's bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def start_launch(args: list[str], nproc: int, **popen_kwargs) -> subprocess.Popen:
    """Start `launch_command(ARGS, nproc)` (cwd: the repository, run_env() unless given) without waiting."""
    popen_kwargs = {"cwd": REPO, "env": run_env(), **popen_kwargs}
    with taken_port() as s:
        return subprocess.Popen(launch_command(args, nproc, s.getsockname()[1]), pass_fds=(s.fileno(),),
                                **popen_kwargs)


def launch(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600,
           check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `launch_command(ARGS, nproc)` to its end; with check, fail the test unless it exits 0."""
    with taken_port() as s:
        proc = subprocess.run(launch_command(args, nproc, s.getsockname()[1]), pass_fds=(s.fileno(),), cwd=cwd,
                              env=run_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_module(args: list[str], module: str = "tl_dist.train", env: dict | None = None, timeout: int = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=run_env(env),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(data_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """The small stand-in network at a small image size: the same code path, in seconds."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--cache-dir", str(cache),
            "--model", "vgg_tiny", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--epochs", "2", "--lr", "0.05", *extra]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def assert_close(ours, expected, rel: float, where: str = "") -> None:
    """`ours == pytest.approx(expected, rel=rel)` for nested dicts and lists (pytest.approx takes flat ones
    only, and from pytest 9.2 refuses the others): floats within `rel`, everything else equal."""
    if isinstance(expected, dict):
        assert isinstance(ours, dict) and ours.keys() == expected.keys(), where
        for key in expected:
            assert_close(ours[key], expected[key], rel, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(ours, list) and len(ours) == len(expected), where
        for i, (a, b) in enumerate(zip(ours, expected)):
            assert_close(a, b, rel, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert ours == pytest.approx(expected, rel=rel), where
    else:
        assert ours == expected, where


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
