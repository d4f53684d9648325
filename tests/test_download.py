"""The download path with the real clients installed here (kagglehub, kaggle, torchvision), not stand-ins:
each is imported and reaches its network step, which fails (all traffic goes to a closed local port), and
the run ends with one `error:` line naming each source's network failure, leaving no data/ folder."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_env
from PIL import Image

# A proxy that refuses every connection: requests (kagglehub, kaggle) and urllib (torchvision) honour
# these, so no byte is downloaded even on a machine with network access.
CLOSED_PROXY = "http://127.0.0.1:9"


def test_real_clients_reach_the_network_and_fail_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = run_env({"HOME": str(home), "KAGGLEHUB_CACHE": str(home / "kagglehub"),
                   "KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0123456789abcdef",  # the credentials path too
                   **{name: CLOSED_PROXY for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")},
                   "NO_PROXY": None, "no_proxy": None})
    proc = subprocess.run([sys.executable, "-m", "tl_dist.train", "--model", "vgg_tiny", "--weights", "none",
                           "--image-size", "32", "--output-dir", str(tmp_path / "run"), "--cache-dir",
                           str(tmp_path / "cache"), "--wandb-mode", "disabled"],  # the default --data-dir
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "ModuleNotFoundError" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    message = " ".join(proc.stderr.split())
    # Each source in order, each failing at its connection (through the closed proxy), none earlier.
    assert "could not download Caltech-101 (kagglehub: ProxyError: HTTPSConnectionPool(host='api.kaggle.com'" \
        in message, message
    assert "; kaggle: ProxyError: HTTPSConnectionPool(host='api.kaggle.com'" in message, message
    assert "; torchvision: URLError: <urlopen error [Errno 111] Connection refused>" in message, message
    assert message.endswith("Without network, try the workflow on generated data: python -m tl_dist.shapes "
                            "data/shapes (README, Quick start)."), message  # tests/test_learning.py runs it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no data/, no run folder, no cache


def test_the_installed_clients_are_the_real_ones_and_torchvision_needs_no_gdown():
    """The test above imports the installed packages, not tests/distributed_fakes/. torchvision >= 0.24
    (pyproject's floor) downloads Caltech-101 from data.caltech.edu; before, from Google Drive through
    gdown, by links that no longer exist."""
    import importlib.util
    import inspect

    from torchvision.datasets import Caltech101

    for name in ("kagglehub", "kaggle", "torchvision"):
        origin = importlib.util.find_spec(name).origin
        assert "distributed_fakes" not in origin and str(REPO) not in origin, origin
    source = inspect.getsource(Caltech101.download)
    assert "https://data.caltech.edu/" in source and "drive.google.com" not in source


def test_a_failed_weights_download_is_one_line_and_writes_nothing(tmp_path):
    """ImageNet weights that cannot be downloaded (here: every connection refused by a closed proxy, and an
    empty torch hub cache): one `error:` line naming the URL, the reason and the three ways forward; exit 1,
    no run folder, nothing left in the hub cache."""
    data = tmp_path / "data" / "caltech-101"
    for k in range(2):
        (data / f"class_{k}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * k, 30 * i, 90)).save(data / f"class_{k}" / f"{i}.png")
    env = run_env({"TORCH_HOME": str(tmp_path / "torch"), "NO_PROXY": None, "no_proxy": None,
                   **{name: CLOSED_PROXY for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}})
    proc = subprocess.run([sys.executable, "-m", "tl_dist.train", "--data-dir", str(data), "--image-size", "32",
                           "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                           "--wandb-mode", "disabled"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --weights imagenet: could not get vgg16's weights from "
                           "https://download.pytorch.org/models/vgg16-397923af.pth (")
    assert line.endswith(f"(or put the file in {tmp_path / 'torch' / 'hub' / 'checkpoints'}), pass a local "
                         "state_dict with --weights PATH, or train from random initialisation with --weights none")
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "torch").rglob("*") if p.is_file()]  # no partial download kept
