"""The command-line contract: the article's defaults, clear errors for bad values, the accelerate configs."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_module
from tl_dist.config import parse_args


def test_defaults_are_the_articles_recipe():
    cfg = parse_args([])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.image_size, cfg.test_fraction) == \
        (5, 32, 0.001, 0.9, 224, 0.2)
    assert (cfg.model, cfg.weights, cfg.freeze, cfg.seed) == ("vgg16", "imagenet", "features", 0)
    assert cfg.data_dir == "./data/caltech-101" and cfg.output_dir is None
    assert cfg.wandb_project is None and cfg.wandb_mode is None  # None: $WANDB_PROJECT, else transfer_learn_pytorch
    assert cfg.mixed_precision is None  # = whatever accelerate launch was given


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--weights", "no/such/file.pth"], "--weights"),
    (["--resume", "no/such/folder"], "--resume"),
    (["--eval-only"], "--eval-only"),
    (["--resume", "auto"], "--resume"),
    (["--freeze", "none", "--cache-features", "on"], "--cache-features"),
    (["--image-size", "abc"], "--image-size"),
])
def test_bad_values_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_fp16_on_cpu_is_refused_with_a_clear_error(tmp_path):
    proc = run_module(["--mixed-precision", "fp16", "--data-dir", str(tmp_path / "data"), "--output-dir",
                       str(tmp_path / "run")])
    assert proc.returncode == 2
    assert "--mixed-precision: fp16 needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


CONFIGS = {  # file: (distributed_type, num_machines, use_cpu)
    "single_gpu.yaml": ("NO", 1, False),
    "multi_gpu.yaml": ("MULTI_GPU", 1, False),
    "multi_node.yaml": ("MULTI_GPU", 2, False),
    "cpu_debug.yaml": ("NO", 1, True),
    "cpu_multi_process.yaml": ("MULTI_GPU", 1, False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_load(name):
    """Each file is one that `accelerate launch --config_file` accepts."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "accelerate_configs" / name
    cfg = load_config_from_file(str(path))
    distributed_type, machines, use_cpu = CONFIGS[name]
    assert str(cfg.distributed_type).split(".")[-1] == distributed_type
    assert cfg.num_machines == machines and bool(cfg.use_cpu) == use_cpu
    raw = yaml.safe_load(Path(path).read_text())
    assert raw["num_processes"] >= 1


def test_every_accelerate_config_is_tested():
    assert sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")) == sorted(CONFIGS)
