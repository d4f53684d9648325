"""The download path with the real clients installed here (kagglehub, kaggle, torchvision), not stand-ins:
each is imported and reaches its network step, which fails (all traffic goes to a closed local port), and
the run ends with one `error:` line naming each source's network failure, leaving no data/ folder."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_env

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
