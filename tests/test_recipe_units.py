"""Issue 18, the fine-tuning recipe's parts, each against its definition: which layers --freeze trains and
which stay in eval mode, the optimizer's parameter groups, the warm-up and schedule at every step, the
smoothed loss, gradient clipping, the weight average, the recipes' presets and LP-FT's phases. In-process,
small networks (some built on the meta device: structure only)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tl_dist.config import FINETUNE, RECIPES, parse_args
from tl_dist.engine import Batches, Criterion, Training, train_step
from tl_dist.model import build_model, describe_blocks, set_trainable
from tl_dist.optim import WeightAverage, build_optimizer, ema_decay, parameter_groups
from tl_dist.phases import phase_at, plan_phases
from tl_dist.randomness import StepDraws


def trained(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- 1. what is trained


@pytest.mark.parametrize("arch, blocks", [
    ("vgg16", "5 conv stages: features.0-4 .. features.24-30"),
    ("alexnet", "3 conv stages: features.0-2 .. features.6-12"),
    ("resnet50", "4 layers: layer1 .. layer4"),
    ("regnet_y_400mf", "4 stages: trunk_output.block1 .. trunk_output.block4"),
    ("efficientnet_b0", "7 stages: features.1 .. features.7"),
    ("mobilenet_v3_large", "5 stages: features.1 .. features.13-15"),
    ("convnext_tiny", "4 stages: features.1 .. features.6-7"),
    ("swin_t", "4 stages: features.1 .. features.6-7"),
    ("vit_b_16", "12 encoder layers: encoder.layers.encoder_layer_0 .. encoder.layers.encoder_layer_11"),
])
def test_each_family_names_its_blocks(arch, blocks):
    assert describe_blocks(arch) == blocks


def test_last_n_trains_the_last_blocks_and_every_layer_after_them():
    resnet = build_model("resnet18", 5, "none", "last:2")
    assert {n.split(".")[0] for n in trained(resnet)} == {"layer3", "layer4", "fc"}
    assert resnet.frozen_modules == ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
    with torch.device("meta"):  # structure only: ViT-B/32 without initialising its weights
        vit = build_model("vit_b_32", 5, "none", "last:1", image_size=32)
    after = ("encoder.layers.encoder_layer_11.", "encoder.ln.", "heads.")  # its last block, final norm and head
    assert trained(vit) == {n for n, _ in vit.named_parameters() if n.startswith(after)}
    assert "class_token" not in trained(vit) and "encoder.pos_embedding" not in trained(vit)  # before the blocks
    vgg = build_model("vgg_tiny", 5, "none", "last:1")  # features.3-5 is its second conv stage
    assert {n for n in trained(vgg) if n.startswith("features")} == {"features.3.weight", "features.3.bias"}
    set_trainable(vgg, "features")
    assert trained(vgg) == {n for n, _ in vgg.named_parameters() if n.startswith("classifier.")}
    assert vgg.frozen_modules == ("features", "avgpool")
    set_trainable(vgg, "none")
    assert trained(vgg) == {n for n, _ in vgg.named_parameters()} and vgg.frozen_modules == ()


@pytest.mark.parametrize("value, message", [
    ("last:5", "'last:5' does not fit resnet18, whose feature extractor has 4 layers: layer1 .. layer4; pass "
               "features, none, or last:N with N from 1 to 4"),
    ("last:0", "last:N with N from 1 to 4"),
    ("sideways", "'sideways' does not fit resnet18"),
])
def test_a_freeze_value_the_network_cannot_take_is_one_error_line(value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "resnet18", "--weights", "none", "--freeze", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 \
        and err.startswith("usage: ") is False, err


def test_batchnorm_of_frozen_blocks_stays_in_eval_mode_and_its_statistics_never_move():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, "none", "last:1")  # layer4 and fc train
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.eval()
    model.train()  # after a round trip through eval mode, as the loop makes it after each validation
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(m.training == name.startswith("layer4") for name, m in norms.items())
    model(torch.randn(4, 3, 32, 32) * 3 + 1).sum().backward()
    after = model.state_dict()
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        assert moved == key.startswith("layer4"), key


# ---------------------------------------------------------------- 3. the optimizer and its schedule


def options(*argv: str):
    return parse_args(["--model", "resnet18", "--weights", "none", *argv])


def test_weight_decay_spares_biases_norms_and_embeddings_and_the_backbone_trains_at_a_fraction_of_the_lr():
    cfg = options("--recipe", "finetune", "--lr", "0.01", "--weight-decay", "0.05", "--backbone-lr-scale", "0.1")
    model = build_model("resnet18", 5, "none", "none")
    optimizer, _, _ = build_optimizer(cfg, model, 1, torch.device("cpu"), total_steps=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    # the base lr of each group (the schedule scales them all alike: `lr` is the warm-up's first step's)
    groups = {g["name"]: (g["initial_lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in optimizer.param_groups}
    assert set(groups) == {"head", "head, no decay", "backbone", "backbone, no decay"}
    assert [groups[k][:2] for k in sorted(groups)] == [(0.001, 0.05), (0.001, 0.0), (0.01, 0.05), (0.01, 0.0)]
    assert groups["head"][2] == {"fc.weight"} and groups["head, no decay"][2] == {"fc.bias"}
    assert "conv1.weight" in groups["backbone"][2] and "layer4.1.conv2.weight" in groups["backbone"][2]
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn1.weight", "layer2.0.downsample.1.weight"} <= groups[
        "backbone, no decay"][2]
    decayed = groups["head"][2] | groups["backbone"][2]
    assert all(n.endswith("weight") and model.get_parameter(n).dim() > 1 for n in decayed)
    assert sum(len(g[2]) for g in groups.values()) == len(names)  # each parameter in exactly one group
    with torch.device("meta"):
        vit = build_model("vit_b_32", 5, "none", "none", image_size=32)
    spared = {n for g in parameter_groups(cfg, vit, 0.01) if not g["weight_decay"] for n, p in vit.named_parameters()
              if any(p is q for q in g["params"])}
    assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight",
            "encoder.layers.encoder_layer_0.ln_1.weight"} <= spared
    assert "encoder.layers.encoder_layer_0.mlp.0.weight" not in spared
    # Neither option: one group, as the article's optimizer has (its checkpoints resume into it).
    assert [g["name"] for g in parameter_groups(options("--freeze", "none"), model, 0.01)] == ["all"]
    assert [g["name"] for g in parameter_groups(options("--weight-decay", "0.1"), model, 0.01)] == ["all", "all, no decay"]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_linear_warmup_then_the_schedule_at_every_step(schedule):
    """2 warm-up epochs of 3 steps, then 6 steps of `schedule`: the lr each optimizer step uses."""
    cfg = options("--lr", "0.1", "--warmup-epochs", "2", "--lr-schedule", schedule, "--epochs", "4")
    model = build_model("vgg_tiny", 5, "none", "none")
    optimizer, scheduler, _ = build_optimizer(cfg, model, 1, torch.device("cpu"), total_steps=12, steps_per_epoch=3)
    used = []
    for _ in range(12):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [0.1 * (s + 1) / 6 for s in range(6)]
    after = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 6)) if schedule == "cosine" else 0.1 for s in range(6)]
    assert used == pytest.approx(warmup + after, rel=1e-12, abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0 if schedule == "cosine" else 0.1, abs=1e-15)


def test_label_smoothing_is_its_formula():
    """The target (1 - eps) x one-hot + eps / C: the loss is -sum(target x log softmax), averaged over the batch."""
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3]), 0.2
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    expected = -((1 - eps) * log_p[torch.arange(6), labels] + eps / 5 * log_p.sum(1)).mean()
    assert Criterion(eps)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = F.one_hot(labels, 5).float() * 0.7 + F.one_hot(labels.roll(1), 5).float() * 0.3  # a mixup target
    expected_soft = -(((1 - eps) * soft + eps / 5) * log_p).sum(1).mean()
    assert Criterion(eps)(logits, soft).item() == pytest.approx(expected_soft.item(), rel=1e-6)


def test_clip_grad_norm_bounds_the_global_gradient(fresh_accelerate_state):
    """SGD with lr 1 and no momentum moves the weights by the (clipped) gradient: its norm is the limit."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    moves = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_model("vgg_tiny", 5, "none", "features")  # the head, on 64 pooled features
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        before = torch.cat([p.detach().flatten().clone() for p in model.head.parameters()])
        training = Training(accelerator, model, optimizer, scheduler, clip_grad_norm=clip)
        x, y = torch.randn(8, 64) * 5, torch.arange(8) % 5
        train_step(training, Batches(None, pooled=True), [(x, y, torch.arange(8))], global_images=8,
                   draws=StepDraws(seed=0, epoch=1, step=0))
        moves[clip] = (torch.cat([p.detach().flatten() for p in model.head.parameters()]) - before).norm().item()
    assert moves[0.0] > 0.1  # the gradient is well above the limit ...
    assert moves[0.01] == pytest.approx(0.01, rel=1e-4)  # ... and the clipped step is exactly the limit


def test_the_weight_average_is_a_hand_written_exponential_average():
    """First update: a copy; the k-th after it: avg = d * avg + (1 - d) * w, d = min(D, (1 + k) / (10 + k)),
    for parameters and BatchNorm statistics alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.5)
    expected = None
    for k in range(12):  # the warm-up's decay passes 0.5 at k = 8
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(5, 3) * (k + 1))  # moves the running statistics
        current = {n: t.clone() for n, t in model.state_dict().items() if t.is_floating_point()}
        average.update(model)
        d = min(0.5, (1 + k) / (10 + k))
        expected = current if expected is None else {n: d * expected[n] + (1 - d) * current[n] for n in current}
        assert ema_decay(0.5, k) == d
    got = average.model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not any(p.requires_grad for p in average.model.parameters())


# ---------------------------------------------------------------- 4. recipes and LP-FT's phases


def test_a_recipe_gives_its_values_and_given_options_win(tmp_path):
    assert options().to_dict() == options("--recipe", "article").to_dict()  # the default is the article
    cfg = options("--recipe", "finetune", "--lr", "0.01", "--epochs", "3", "--image-size", "224")
    assert all(getattr(cfg, k) == v for k, v in FINETUNE.items() if k not in ("lr", "cache_size"))
    assert (cfg.lr, cfg.epochs, cfg.recipe, cfg.cache_size) == (0.01, 3, "finetune", 256)  # ImageNet's 256 for 224
    assert options("--recipe", "finetune", "--image-size", "112").cache_size == 128
    lpft = options("--recipe", "lp-ft")
    assert all(getattr(lpft, k) == v for k, v in RECIPES["lp-ft"].items() if k != "cache_size")
    assert lpft.probe_epochs > 0
    options_file = tmp_path / "options.json"  # --config gives defaults over the recipe's; flags win over both
    options_file.write_text(json.dumps({"recipe": "finetune", "weight-decay": 0.2, "label-smoothing": 0.3}))
    cfg = options("--config", str(options_file), "--label-smoothing", "0.0")
    assert (cfg.optimizer, cfg.weight_decay, cfg.label_smoothing) == ("adamw", 0.2, 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adamw", "--momentum", "0.5"], "argument --momentum: SGD's; adamw has none"),
    (["--probe-epochs", "2"], "argument --probe-epochs: the probe trains the classifier block before"),
    (["--recipe", "finetune", "--epochs", "1"], "--warmup-epochs: must be 0 or more and below --epochs (1), got 1.0 "
                                                "(the finetune recipe's value; pass your own)"),
    (["--recipe", "lp-ft", "--freeze", "features"], "argument --probe-epochs (the lp-ft recipe's value; pass your "
                                                    "own): the probe trains the classifier block before"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be in [0, 1), got 1.0"),
    (["--ema-decay", "-0.1"], "argument --ema-decay: must be in [0, 1)"),
    (["--backbone-lr-scale", "0"], "argument --backbone-lr-scale: must be positive"),
])
def test_recipe_options_out_of_range_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        options(*argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_lp_ft_phases_count_the_run_s_epochs_and_steps():
    cfg = options("--recipe", "lp-ft", "--probe-epochs", "2", "--epochs", "3", "--probe-lr", "0.01")
    probe, train = plan_phases(cfg)
    assert (probe.name, probe.cfg.freeze, probe.cfg.lr, probe.cfg.ema_decay, probe.cfg.warmup_epochs) == \
        ("probe", "features", 0.01, 0.0, 0.0)
    assert probe.cfg.optimizer == train.cfg.optimizer == "adamw" and train.cfg is cfg
    assert (probe.first_epoch, probe.end_epoch, train.first_epoch, train.end_epoch) == (0, 2, 2, 5)
    # 4 steps an epoch: the probe's steps are 1-8; a checkpoint at step 8 was saved by the probe
    assert [phase_at([probe, train], step, 4) for step in (0, 1, 8, 9, 20)] == [0, 0, 0, 1, 1]
    assert plan_phases(options("--recipe", "finetune"))[0].name == "train"
