"""Credentials never land in what a run writes, and a weights file from outside cannot run code.

Every test process gets planted WANDB_API_KEY and KAGGLE_KEY values (conftest.PLANTED_SECRETS); a real run
with W&B offline and checkpoints must not write them anywhere: not in config.json, metrics.json,
the model's config, the checkpoints, the decoded-image cache, any file of the W&B offline folders (run
record, config, logs, debug logs), nor in what it prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import wandb_reader
from conftest import PLANTED_SECRETS, launch, tiny_args

from tl_dist.model import WeightsError, build_model


@pytest.fixture(scope="module")
def secret_run(image_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    out, cache = root / "run", root / "cache"
    proc = launch(tiny_args(image_tree, out, cache, "--checkpoint-every-steps", "3", "--wandb-mode", "offline"))
    return {"out": out, "cache": cache, "printed": proc.stdout + proc.stderr}


def written_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_credential_in_anything_the_run_wrote(secret_run):
    out = secret_run["out"]
    files = written_files(out, secret_run["cache"])
    names = {str(p.relative_to(out)) for p in files if out in p.parents}
    # The files that are most likely to carry the environment are there to be searched.
    assert {"config.json", "metrics.json", "model/config.json"} <= names
    wandb_files = [n for n in names if n.startswith("wandb/offline-run-")]
    assert any(n.endswith(".wandb") for n in wandb_files) and any("debug" in n for n in wandb_files)
    (wandb_run,) = wandb_reader.run_dirs(out / "wandb")
    assert wandb_reader.config(wandb_run)["lr"] == 0.05  # the W&B config is in what is searched
    assert any(n.startswith("checkpoints/") for n in names)
    for secret in PLANTED_SECRETS.values():
        assert secret not in secret_run["printed"]
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret[:6]}... in {path}"


def test_weights_file_cannot_run_code(tmp_path):
    """A --weights file is loaded with weights_only=True: a pickle that would run code on loading is
    refused with a clear error, and its code does not run."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    path = tmp_path / "weights.pt"
    torch.save({"features.0.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="cannot be read as a PyTorch state_dict"):
        build_model("vgg_tiny", 3, str(path), "features", 0.5)
    assert not marker.exists()
