"""Networks other than VGG16 (--model): each family splits like torchvision's forward; ResNet, EfficientNet,
ConvNeXt and ViT trained through the real entry point with the feature cache, then `predict` and
`tl_dist.load_model` on their models; --weights PATH (.pth, .safetensors) and NAME; the ImageNet download
with the stand-in hub on 2 processes; sizes a network cannot take and unknown names refused at once.
Every network is built with random weights at a small size it accepts (ViT: one 32 px patch)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision import models

import tl_dist
from conftest import REPO, launch, read_metrics, run_env, run_module
from tl_dist.config import parse_args
from tl_dist.model import (FAMILIES, WeightsError, build_model, check_image_size, family_name, normalization,
                           weights_entry)

FAKES = Path(__file__).parent / "distributed_fakes"

# One small network per family, at the smallest size the tests use for it.
ONE_PER_FAMILY = {"vgg11": 32, "alexnet": 63, "resnet18": 32, "regnet_x_400mf": 32, "efficientnet_b0": 32,
                  "mobilenet_v3_small": 32, "convnext_tiny": 32, "swin_t": 224, "vit_b_32": 32}


def test_every_family_is_tested():
    assert sorted(family_name(arch) for arch in ONE_PER_FAMILY) == sorted(FAMILIES)


@pytest.mark.parametrize("arch", list(ONE_PER_FAMILY))
def test_one_network_per_family_computes_what_torchvision_computes(arch):
    """TransferNet's embed + classifier block == the torchvision network's own forward (its state_dict
    loads into it unchanged), and so does the classifier on embed's (cacheable) output. Under --freeze
    features only the classifier block trains, and it stays the same in train mode."""
    torch.manual_seed(0)
    size = ONE_PER_FAMILY[arch]
    model = build_model(arch, 5, "none", "features", image_size=size).eval()
    options = {"image_size": size} if arch.startswith("vit") else {}
    reference = models.get_model(arch, num_classes=5, **options).eval()
    reference.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, features = model(x), model.embed(x)
        assert torch.equal(logits, reference(x)), arch
        assert torch.equal(model(features, pooled=True), logits), arch
        assert features.shape[0] == 2 and features.dim() == 2, arch
        model.train()
        assert torch.equal(model.embed(x), features), f"{arch}: the frozen extractor changed in train mode"
    head = FAMILIES[family_name(arch)].head
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(head + ".")}, arch


def test_list_models_names_the_default_weights_and_the_trained_block():
    proc = run_module(["--list-models"])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "vgg16 (default)" in rows["vgg16"] and "IMAGENET1K_V1" in rows["vgg16"]
    assert rows["vgg16"].rstrip().endswith("classifier (VGG)")
    assert "IMAGENET1K_V2" in rows["resnet50"] and "fc (ResNet" in rows["resnet50"]
    assert "heads (ViT)" in rows["vit_b_16"] and "x16" in rows["vit_b_16"]
    assert "classifier (ConvNeXt)" in rows["convnext_tiny"] and "fc (RegNet)" in rows["regnet_y_400mf"]
    assert "vgg_tiny" in rows and "densenet121" not in rows


@pytest.mark.parametrize("argv, message", [
    (["--model", "convnext_tiny", "--image-size", "16"], "16 px is too small for convnext_tiny, which takes 32 px"),
    (["--model", "vit_b_16", "--image-size", "100"], "multiples of its 16 px patches (16, 32, ..., 224, ...): "
                                                      "pass 96 or 112"),
    (["--model", "vgg16", "--image-size", "31"], "pass 32 or more"),
    (["--model", "vgg_tiny", "--weights", "none", "--image-size", "3"], "pass 4 or more"),
    (["--model", "resnet5"], "unknown network 'resnet5' (did you mean resnet50"),
    (["--model", "densenet121"], "densenet121 is not supported"),
    (["--model", "resnet50", "--weights", "IMAGENET1K_V9"], "resnet50's weights (IMAGENET1K_V1, IMAGENET1K_V2)"),
    (["--model", "vgg_tiny"], "vgg_tiny has no pretrained weights"),
])
def test_a_network_that_cannot_be_used_is_refused_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_image_size_check_runs_before_anything_is_read(tmp_path, image_tree):
    """One error line, and neither the run folder nor the decoded-image cache is created."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_module(["--data-dir", str(image_tree), "--output-dir", str(out), "--cache-dir", str(cache),
                       "--model", "vit_b_32", "--weights", "none", "--image-size", "40"])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "pass 32 or 64" in errors[0], proc.stderr
    assert not out.exists() and not cache.exists()
    assert check_image_size("vit_b_32", 64) is None and check_image_size("resnet18", 1) is None


def test_normalization_follows_the_weights_metadata():
    assert normalization("efficientnet_v2_l", "imagenet") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = normalization("vgg16", "IMAGENET1K_FEATURES")  # the features-only weights: 0..255 inputs
    assert mean == pytest.approx((0.48235, 0.45882, 0.40784)) and std == pytest.approx((1 / 255.0,) * 3)
    assert weights_entry("resnet50", "imagenet") is models.ResNet50_Weights.IMAGENET1K_V2  # its DEFAULT
    assert weights_entry("resnet50", "IMAGENET1K_V1") is models.ResNet50_Weights.IMAGENET1K_V1
    assert weights_entry("resnet50", "none") is None and weights_entry("vgg16", "imagenet").url.endswith(
        "vgg16-397923af.pth")  # the article's weights, as before
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization("vgg16", "imagenet") == normalization("resnet50", "none") == imagenet


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_round_trip(suffix, tmp_path):
    """A torchvision state_dict with its 1000-way head, saved as a user would: every backbone tensor is the
    file's, the last layer is a new N-way one. A file of another network is refused."""
    state = models.resnet18().state_dict()
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = build_model("resnet18", 7, str(path), "features")
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        if not name.startswith("fc."):
            assert torch.equal(loaded[name], tensor), name
    assert loaded["fc.weight"].shape == (7, 512)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    with pytest.raises(WeightsError, match="does not match torchvision's resnet34 with its 1000-way head"):
        build_model("resnet34", 7, str(path), "features")


def test_vit_weights_are_interpolated_to_the_image_size(tmp_path):
    """A ViT-B/32 state_dict for 224 px (7 x 7 patches) loads into one built for 64 px (2 x 2): the position
    embeddings are resized (torchvision's interpolate_embeddings), everything else is the file's."""
    state = models.vit_b_32().state_dict()
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    model = build_model("vit_b_32", 3, str(path), "features", image_size=64)
    assert model.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    assert torch.equal(model.encoder.pos_embedding[:, 0], state["encoder.pos_embedding"][:, 0])  # class token
    assert torch.equal(model.conv_proj.weight, state["conv_proj.weight"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# ---------------------------------------------------------------- the real entry point, one run per family

RUNS = {  # network: (image size, extra options); two epochs each, with a checkpoint after the first
    "resnet18": (32, []),
    "efficientnet_b0": (32, ["--channels-last", "--lr", "0.001"]),
    "convnext_tiny": (32, ["--mixed-precision", "bf16"]),
    "vit_b_32": (32, []),
}
# At random initialisation EfficientNet's features vanish in eval mode (about 1e-15: its BatchNorm layers
# expect the statistics of trained weights), so no head could learn from them. Its run gets random weights
# whose BatchNorm statistics were measured on the images, as pretrained weights' were on theirs.
MEASURED_BATCHNORM = {"efficientnet_b0"}


def weights_with_measured_batchnorm(arch: str, data: Path, size: int, path: Path) -> Path:
    """A state_dict of `arch` (random, seeded, its 1000-way head) whose BatchNorm running statistics are the
    means over the images of `data`, normalised as the runs do; saved to `path` for --weights PATH."""
    from tl_dist.data import index_images, load_image, normalize

    torch.manual_seed(0)
    net = models.get_model(arch)
    for layer in net.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a cumulative average over every batch
    index = index_images(data)
    images = torch.stack([torch.from_numpy(load_image(index.root / f, size)) for f in index.files])
    with torch.no_grad():
        net.train()(normalize(images.permute(0, 3, 1, 2)))
    save_file(net.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def family_runs(image_tree, tmp_path_factory):
    """Each network trained on the feature cache (the frozen extractor's default) from random weights, run
    at the same time as real processes (much of their time is importing torch)."""
    root = tmp_path_factory.mktemp("backbones")
    procs = {}
    for arch, (size, extra) in RUNS.items():
        out = root / arch
        weights = str(weights_with_measured_batchnorm(arch, image_tree, size, root / f"{arch}.safetensors")
                      if arch in MEASURED_BATCHNORM else "none")
        args = ["--data-dir", str(image_tree), "--output-dir", str(out), "--cache-dir", str(root / "cache"),
                "--model", arch, "--weights", weights, "--image-size", str(size), "--batch-size", "8",
                "--epochs", "2", "--lr", "0.01", "--wandb-mode", "disabled", *extra]
        procs[arch] = (subprocess.Popen([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, env=run_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    runs = {}
    for arch, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{arch}: exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
        runs[arch] = out
    return runs


def confusion_of(run_dir: Path) -> dict[tuple[str, str], int]:
    with open(run_dir / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    return {(row[0], predicted): int(n) for row in rows[1:] for predicted, n in zip(rows[0][1:], row[1:]) if int(n)}


@pytest.mark.parametrize("arch", list(RUNS))
def test_each_family_trains(arch, family_runs):
    """The head learnt: the training loss fell from the first epoch to the second, and the test loss
    moved. The head alone: for EfficientNet every tensor but the head's is its --weights file's."""
    out = family_runs[arch]
    metrics = read_metrics(out)
    losses = metrics["train"]["epoch_loss"]
    assert len(losses) == 2 and losses[1] < 0.97 * losses[0], losses
    assert metrics["test"]["loss"] != metrics["baseline"]["loss"]
    if arch in MEASURED_BATCHNORM:
        trained, started = load_file(out / "model" / "model.safetensors"), load_file(out.parent / f"{arch}.safetensors")
        assert trained.keys() == started.keys()
        new_head = {k for k in trained if trained[k].shape != started[k].shape}  # 4-way, not 1000-way
        assert new_head == {f"{FAMILIES[family_name(arch)].head}.1.{name}" for name in ("weight", "bias")}
        assert [k for k in trained if k not in new_head and not torch.equal(trained[k], started[k])] == []


@pytest.mark.parametrize("arch", list(RUNS))
def test_predict_agrees_with_the_evaluation(arch, family_runs, image_tree):
    """The run evaluated every test image with the feature cache; `python -m tl_dist.predict` on its run
    folder (no --model: the network comes from config.json) gives, image by image, the same top-1 classes:
    the confusion matrix it builds is the run's. predict computes in float32: for a bf16 run an image whose
    two best classes are within bf16's rounding of each other may go to either."""
    out = family_runs[arch]
    metrics, config = read_metrics(out), json.loads((out / "model" / "config.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert config["model"] == arch and config["feature_cache"] is True
    assert (config["mean"], config["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert metrics["test"]["num_samples"] == len(split["test"]) == 8 and len(split["train"]) == 32
    assert metrics["train"]["global_step"] == 2 * 4
    assert metrics["features"]["images_per_second"] > 0
    weights = load_file(out / "model" / "model.safetensors")
    head = FAMILIES[family_name(arch)].head
    assert [tuple(t.shape) for k, t in weights.items() if k.startswith(head) and k.endswith("bias")][-1] == (4,)

    files = [str(image_tree / f) for f in split["test"]]
    proc = run_module(["--checkpoint", str(out), *files, "--json", "--top-k", "2"], module="tl_dist.predict")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    near_tie = 0.02 if config["mixed_precision_resolved"] == "bf16" else 0.0  # in probability
    candidates = [(rel.split("/")[0], [c["class"] for c in result["top_k"]
                                       if result["top_k"][0]["probability"] - c["probability"] <= near_tie])
                  for result, rel in zip(results, split["test"], strict=True)]
    assert sum(len(c) > 1 for _, c in candidates) <= 2, candidates  # a few near-ties at most
    assert confusion_of(out) in possible_confusions(candidates)
    assert f"({arch}, 4 classes, 32 px)" in proc.stderr


def possible_confusions(candidates: list[tuple[str, list[str]]]) -> list[dict[tuple[str, str], int]]:
    """Every confusion matrix ({(label, predicted): count}) that the images' candidate predictions allow."""
    matrices = [{}]
    for label, classes in candidates:
        matrices = [{**m, (label, c): m.get((label, c), 0) + 1} for m in matrices for c in classes]
    return matrices


def test_load_model_from_python(family_runs, image_tree):
    """tl_dist.load_model on a run folder, its model/ and a checkpoint: the network in eval mode, its classes
    and preprocessing; its probabilities are predict's, and follow the recorded mean/std."""
    out = family_runs["resnet18"]
    files = sorted((image_tree / "class_03").iterdir())[:3]
    loaded = tl_dist.load_model(out)
    assert loaded.model_dir == out / "model" and not loaded.network.training
    assert loaded.classes == [f"class_{c:02d}" for c in range(4)] and loaded.image_size == 32
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.std == (0.229, 0.224, 0.225)
    probs = loaded.predict(files)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.equal(tl_dist.load_model(out / "model").predict(files), probs)
    checkpoint = min((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))  # after epoch 1 of 2
    assert not torch.equal(tl_dist.load_model(checkpoint).predict(files), probs)

    config = json.loads((out / "model" / "config.json").read_text())
    shifted = out.parent / "shifted"
    (shifted / "model").mkdir(parents=True)
    for name in ("model.safetensors", "classes.json", "train_state.json"):
        (shifted / "model" / name).write_bytes((out / "model" / name).read_bytes())
    (shifted / "model" / "config.json").write_text(json.dumps({**config, "mean": [0.0] * 3, "std": [1.0] * 3}))
    moved = tl_dist.load_model(shifted)
    assert moved.mean == (0.0, 0.0, 0.0) and not torch.allclose(moved.predict(files), probs)


def test_predict_refuses_an_image_size_the_vit_was_not_trained_at(family_runs, image_tree):
    image = str(sorted((image_tree / "class_00").iterdir())[0])
    proc = run_module(["--checkpoint", str(family_runs["vit_b_32"]), image, "--image-size", "64"],
                      module="tl_dist.predict")
    assert proc.returncode == 2 and "trained at 32 px" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- ImageNet weights: the stand-in download


def test_imagenet_weights_of_a_vit_download_once_and_fit_the_image_size(image_tree, tmp_path):
    """--model vit_b_32 --weights imagenet on 2 processes with an empty torch hub cache: the stand-in hub
    (tests/distributed_fakes) "downloads" ViT-B/32's 224 px weights once, on the main process; both load
    them, interpolated to 64 px, and evaluate the test split exactly once between them."""
    torch_home, log = tmp_path / "torch_home", tmp_path / "hub.log"
    env = {"PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}", "TL_DIST_TEST_FAKE_HUB": str(log),
           "TORCH_HOME": str(torch_home)}
    out = tmp_path / "run"
    launch(["--data-dir", str(image_tree), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--model", "vit_b_32", "--weights", "imagenet", "--image-size", "64", "--batch-size", "4",
            "--epochs", "1", "--max-steps", "2", "--wandb-mode", "disabled"], nproc=2, env=env)
    downloads = log.read_text().splitlines()
    assert len(downloads) == 1 and downloads[0].startswith("rank 0 ") and "vit_b_32" in downloads[0]
    assert [p.name for p in (torch_home / "hub" / "checkpoints").iterdir()] == ["vit_b_32-d86f8d99.pth"]
    metrics = read_metrics(out)
    assert metrics["test"]["num_samples"] == 8 and metrics["config"]["num_processes"] == 2
    weights = load_file(out / "model" / "model.safetensors")
    assert weights["encoder.pos_embedding"].shape == (1, 5, 768) and weights["heads.head.weight"].shape == (4, 768)
