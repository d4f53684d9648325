"""The batched augmentation (tl_dist/augment.py) against torchvision's own transforms, op by op, and the
evaluation resize against torchvision's weights.transforms()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import models
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tl_dist.augment import (TRIVIAL_OPS, AugmentOptions, MixDraw, TrainingInputs, crop_boxes, cutmix_box, draw_mix,
                             erase, erase_boxes, flip, mix, resized_crop, trivial_augment, trivial_params)
from tl_dist.config import parse_args
from tl_dist.data import Resize, load_image, normalize
from tl_dist.model import eval_resize
from tl_dist.randomness import StepDraws, image_keys, step_generator, uniforms

BILINEAR = v2.InterpolationMode.BILINEAR


def rand_u(n: int, count: int, seed: int = 0) -> torch.Tensor:
    return uniforms(image_keys(seed, 0, torch.arange(n)), 1, count)


# ---------------------------------------------------------------- random resized crop and flip


@pytest.mark.parametrize("width, height", [(40, 30), (100, 60), (17, 90), (32, 32)])
def test_crop_box_sizes_are_random_resized_crops(width, height):
    """With one area share and one ratio, RandomResizedCrop's box size is determined: ours is torchvision's;
    the offsets then cover every position."""
    crop = v2.RandomResizedCrop(32, scale=(0.3, 0.3), ratio=(0.6, 0.6))
    expected = crop.make_params([torch.zeros(3, height, width)])
    boxes = crop_boxes(rand_u(4000, 40), torch.tensor([[width, height]] * 4000), (0.3, 0.3), (0.6, 0.6))
    left, top, w, h = boxes.unbind(1)
    assert set(w.tolist()) == {expected["width"]} and set(h.tolist()) == {expected["height"]}
    assert set(top.tolist()) == set(map(float, range(height - expected["height"] + 1)))
    assert set(left.tolist()) == set(map(float, range(width - expected["width"] + 1)))


@pytest.mark.parametrize("width, height", [(40, 30), (30, 60), (30, 40)])
def test_crop_falls_back_to_torchvisions_central_box(width, height):
    crop = v2.RandomResizedCrop(32, scale=(2.0, 3.0), ratio=(0.6, 0.9))  # no try can fit
    p = crop.make_params([torch.zeros(3, height, width)])
    boxes = crop_boxes(rand_u(3, 40), torch.tensor([[width, height]] * 3), (2.0, 3.0), (0.6, 0.9))
    assert boxes.tolist() == [[p["left"], p["top"], p["width"], p["height"]]] * 3


def test_crop_boxes_are_distributed_as_torchvisions():
    """Ten tries, then the fallback, on a small image where many tries fail: the box sizes' distribution is
    torchvision's (20,000 draws each, total variation distance)."""
    width, height, n = 24, 16, 20_000
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(0.2, 5.0))
    theirs = [crop.make_params([torch.zeros(3, height, width)]) for _ in range(n)]
    ours = crop_boxes(rand_u(n, 40), torch.tensor([[width, height]] * n), (0.08, 1.0), (0.2, 5.0))
    for key, column, size in (("width", 2, width), ("height", 3, height)):
        a = np.bincount([t[key] for t in theirs], minlength=size + 1) / n
        b = np.bincount(ours[:, column].long().numpy(), minlength=size + 1) / n
        assert 0.5 * np.abs(a - b).sum() < 0.02, key


def test_a_crop_is_the_bilinear_resize_of_its_box():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 20, 30)
    whole = resized_crop(image, torch.tensor([[0.0, 0.0, 30.0, 20.0]]), 32)
    torch.testing.assert_close(whole, F.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False))
    # a box inside: torchvision's resized_crop, but for the outermost pixels, where roi_align still sees the
    # image's pixels beyond the box and torchvision repeats the box's edge
    box = resized_crop(image, torch.tensor([[5.0, 3.0, 21.0, 15.0]]), 32)
    ref = TF.resized_crop(image, 3, 5, 12, 16, [32, 32], antialias=False)
    torch.testing.assert_close(box[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    # a box twice the output: each output pixel is the mean of its 2 x 2 pixels (a box filter, no aliasing)
    large = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(resized_crop(large, torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2), 32),
                               F.avg_pool2d(large, 2))


def test_flip_mirrors_the_flagged_images():
    x = torch.rand(4, 3, 5, 6)
    out = flip(x, torch.tensor([True, False, False, True]))
    assert torch.equal(out[[0, 3]], torch.flip(x[[0, 3]], dims=[-1])) and torch.equal(out[[1, 2]], x[[1, 2]])


# ---------------------------------------------------------------- TrivialAugmentWide


def test_trivial_augment_tables_are_torchvisions():
    space = v2.TrivialAugmentWide._AUGMENTATION_SPACE
    assert [name for name, _, _ in TRIVIAL_OPS] == list(space)
    for name, magnitudes, signed in TRIVIAL_OPS:
        theirs, their_signed = space[name][0](31, 32, 32), space[name][1]
        assert signed == their_signed, name
        if theirs is None:
            assert magnitudes is None, name
        else:
            np.testing.assert_array_equal(magnitudes, theirs.double().numpy(), err_msg=name)


def test_trivial_params_draw_one_op_bin_and_sign_per_image():
    op, magnitude = trivial_params(rand_u(28_000, 3))
    assert np.bincount(op.numpy(), minlength=14).min() > 28_000 / 14 * 0.9
    rotate = magnitude[op == 5]
    assert (rotate < 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert set(rotate.abs().tolist()) == set(torch.linspace(0, 135, 31).tolist())
    assert set(magnitude[op == 10].tolist()) == {8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0}  # posterize bits, unsigned


@pytest.mark.parametrize("k", range(len(TRIVIAL_OPS)), ids=[name for name, _, _ in TRIVIAL_OPS])
def test_each_trivial_augment_op_is_torchvisions(k):
    """Each image through its own op and magnitude, in one call, equals torchvision's TrivialAugmentWide
    applying that op to that image alone (bilinear, as torchvision's reference recipe asks for it)."""
    name, magnitudes, signed = TRIVIAL_OPS[k]
    torch.manual_seed(k)
    images = torch.rand(8, 3, 24, 24)
    images[3] = images[3] * 0.4 + 0.3  # autocontrast and equalize have something to stretch
    bins = [0, 4, 9, 13, 17, 20, 25, 30]  # bin 20 of Rotate is 90 degrees: torchvision's rot90 shortcut
    values = [0.0 if magnitudes is None else float(magnitudes[b]) * (-1 if signed and i % 2 else 1)
              for i, b in enumerate(bins)]
    ours = trivial_augment(images, torch.full((8,), k), torch.tensor(values, dtype=torch.float64))
    augment = v2.TrivialAugmentWide(interpolation=BILINEAR)
    for i, value in enumerate(values):
        theirs = augment._apply_image_or_video_transform(images[i], name, value, interpolation=BILINEAR,
                                                         fill={torch.Tensor: None})
        # 2e-6: at 0 and 90 degrees torchvision copies or transposes the pixels, where the sampling grid
        # lands within float rounding of the pixel centres
        torch.testing.assert_close(ours[i], theirs, rtol=0, atol=2e-6, msg=f"{name} {value}")
    if name != "Identity":
        assert not torch.equal(ours, images)


def test_trivial_augment_applies_each_images_own_op():
    images = torch.rand(6, 3, 16, 16)
    op = torch.tensor([0, 5, 6, 5, 13, 11])
    magnitude = torch.tensor([0.0, 30.0, 0.5, -45.0, 0.0, 0.5], dtype=torch.float64)
    together = trivial_augment(images, op, magnitude)
    for i in range(6):
        torch.testing.assert_close(together[i:i + 1], trivial_augment(images[i:i + 1], op[i:i + 1],
                                                                      magnitude[i:i + 1]), rtol=0, atol=0)


# ---------------------------------------------------------------- random erasing


@pytest.mark.parametrize("scale, ratio", [((0.1, 0.1), (0.5, 0.5)), ((0.3, 0.3), (2.0, 2.0))])
def test_erased_box_sizes_are_torchvisions(scale, ratio):
    p = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio).make_params([torch.zeros(3, 32, 32)])
    boxes = erase_boxes(rand_u(2000, 41), 1.0, 32, scale, ratio)
    top, left, h, w = boxes.unbind(1)
    assert set(h.tolist()) == {p["h"]} and set(w.tolist()) == {p["w"]}
    assert set(top.tolist()) == set(map(float, range(32 - p["h"] + 1)))
    assert set(left.tolist()) == set(map(float, range(32 - p["w"] + 1)))


def test_erasing_happens_with_probability_p_and_not_when_no_box_fits():
    boxes = erase_boxes(rand_u(5000, 41), 0.25, 32)
    assert (boxes[:, 2] > 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert (erase_boxes(rand_u(100, 41), 1.0, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == 0).all()  # torchvision: no-op


def test_erase_sets_each_box_to_zero_as_torchvision():
    images = torch.rand(3, 3, 10, 12)
    boxes = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [5, 0, 5, 12]], dtype=torch.float64)
    out = erase(images, boxes)
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        expected = TF.erase(images[i], top, left, h, w, torch.zeros(3, 1, 1)) if h else images[i]
        assert torch.equal(out[i], expected), i


# ---------------------------------------------------------------- mixup and cutmix


def test_mixup_is_torchvisions_mixup_of_the_batch_rolled_by_one():
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(1)
    lam = float(torch.distributions.Beta(torch.tensor([0.4]), torch.tensor([0.4])).sample(()))
    torch.manual_seed(1)  # the same draw inside torchvision
    their_images, their_targets = v2.MixUp(alpha=0.4, num_classes=5)(images, labels)
    ours, targets = mix(images, images.roll(1, 0), labels, labels.roll(1, 0), MixDraw(False, lam), 5)
    torch.testing.assert_close(ours, their_images, rtol=0, atol=0)
    torch.testing.assert_close(targets, their_targets, rtol=0, atol=0)
    assert targets[1].tolist() == pytest.approx([1 - lam, lam, 0, 0, 0])  # class 1, its partner class 0
    assert targets[0].tolist() == pytest.approx([1, 0, 0, 0, 0])  # image 0 and its partner share class 0


def test_cutmix_is_torchvisions_cutmix_and_its_weight_the_boxs_share():
    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 20, 20), torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        torch.manual_seed(seed)
        lam = float(torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample(()))
        center = (int(torch.randint(20, size=(1,))), int(torch.randint(20, size=(1,))))
        torch.manual_seed(seed)
        their_images, their_targets = v2.CutMix(alpha=1.0, num_classes=4)(images, labels)
        draw = MixDraw(True, lam, center)
        ours, targets = mix(images, images.roll(1, 0), labels, labels.roll(1, 0), draw, 4)
        torch.testing.assert_close(ours, their_images, rtol=0, atol=0)
        torch.testing.assert_close(targets, their_targets, rtol=0, atol=0)
        (x1, y1, x2, y2), adjusted = cutmix_box(draw, 20, 20)
        pasted = (ours != images).any(1)  # the pixels that came from the partner
        assert pasted.sum(dim=(1, 2)).max().item() <= (x2 - x1) * (y2 - y1)
        assert targets[0, 0].item() == pytest.approx(adjusted)  # image 0 keeps its share of its class
        assert 1 - adjusted == pytest.approx((x2 - x1) * (y2 - y1) / 400)


def test_each_step_draws_one_mix_for_the_whole_batch():
    both = AugmentOptions(mixup=0.2, cutmix=1.0)
    draws = [draw_mix(both, step_generator(0, 0, step), 32) for step in range(400)]
    assert 0.4 < np.mean([d.cutmix for d in draws]) < 0.6  # torchvision's RandomChoice([MixUp, CutMix])
    assert draws[7] == draw_mix(both, step_generator(0, 0, 7), 32)
    mixup_weights = [d.lam for d in draws if not d.cutmix]
    assert np.mean([w < 0.1 or w > 0.9 for w in mixup_weights]) > 0.5  # Beta(0.2, 0.2): mostly near 0 or 1


# ---------------------------------------------------------------- the training batch


def test_an_images_augmentation_does_not_depend_on_its_batch():
    """The whole pipeline (crop, flip, TrivialAugment, erasing) on a batch equals the same images processed
    in two other batches; mixing gives the formula over those images."""
    options = AugmentOptions("trivial", random_erasing=0.5)
    torch.manual_seed(0)
    cache = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    sizes = torch.tensor([[60, 40], [40, 40], [30, 90], [40, 41]] * 2)
    inputs = TrainingInputs(options, 24, sizes, num_classes=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    labels, indices, draws = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.arange(8), StepDraws(1, 2, 3)
    x, targets, keys = inputs(cache, labels, indices, draws, "cpu")
    assert x.shape == (8, 3, 24, 24) and torch.equal(targets, labels)
    assert torch.equal(keys, draws.image_keys(indices))
    for part in ([5, 0, 2], [1, 3, 4, 6, 7]):
        alone, _, _ = inputs(cache[part], labels[part], indices[part], draws, "cpu")
        torch.testing.assert_close(alone, x[part], rtol=0, atol=0)
    other_epoch, _, _ = inputs(cache, labels, indices, StepDraws(1, 3, 0), "cpu")
    assert not torch.allclose(other_epoch, x)

    mixing = TrainingInputs(AugmentOptions("trivial", random_erasing=0.5, mixup=0.4), 24, sizes, 3,
                            (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    pairs = torch.tensor([0, 1, 2, 3, 1, 0, 7, 6])  # images 0-3, then their partners
    mixed, soft, mixed_keys = mixing(cache[pairs], labels[pairs], pairs, draws, "cpu")
    lam = draw_mix(mixing.options, draws.generator(), 24).lam
    torch.testing.assert_close(mixed, x[[1, 0, 7, 6]] * (1 - lam) + x[:4] * lam)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    assert torch.equal(mixed_keys, keys[:4])  # dropout follows the image, not its partner


def test_crops_are_drawn_in_the_shape_evaluation_sees():
    """Boxes are drawn in the image's own shape, then mapped onto its cached square: a 2:1 image (200 x 100)
    takes a 2:1 box of its whole area, which is the whole square (the square itself could not: torchvision's
    fallback would cut a strip)."""
    cache = torch.arange(16, dtype=torch.uint8).repeat_interleave(4).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    inputs = TrainingInputs(AugmentOptions("basic", crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0), hflip=0.0), 32,
                            torch.tensor([[200, 100]]), 2, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x, _, _ = inputs(cache.contiguous(), torch.tensor([0]), torch.tensor([0]), StepDraws(0, 0, 0), "cpu")
    torch.testing.assert_close(x, F.avg_pool2d(cache.float() / 255, 2))


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("arch", ["vgg16", "convnext_tiny", "efficientnet_b3"])
def test_eval_resize_weights_is_the_weights_own_transform(arch, tmp_path):
    """--eval-resize weights: the cached uint8 pixels, normalised, are exactly what the torchvision weights'
    transforms() give for the image (resize of the shorter side, centre crop, their interpolation)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.jpg"
    Image.fromarray(rng.integers(0, 255, (210, 301, 3), dtype=np.uint8)).save(path, quality=90)
    transform = models.get_model_weights(arch).DEFAULT.transforms()
    resize = eval_resize(arch, "imagenet", transform.crop_size[0], "weights")
    assert (resize.size, resize.shorter, resize.interpolation) == (
        transform.crop_size[0], transform.resize_size[0], transform.interpolation.value)
    pixels = torch.from_numpy(load_image(path, resize)).permute(2, 0, 1)[None]
    ours = normalize(pixels, mean=transform.mean, std=transform.std)[0]
    torch.testing.assert_close(ours, transform(Image.open(path)), rtol=0, atol=1e-6)


def test_eval_resize_modes():
    assert eval_resize("vgg16", "imagenet", 112, "squash") == Resize(112)
    assert eval_resize("vgg16", "imagenet", 112, "weights") == Resize(112, 128)  # 256/224, scaled
    assert eval_resize("vgg_tiny", "none", 32, "weights") == Resize(32, 36)  # ImageNet's ratio
    assert eval_resize("vgg16", "none", 32, "40") == Resize(32, 40)
    assert Resize(32).name == "32px" and Resize(32, 40).name == "40-32px"
    assert Resize(300, 320, "bicubic").name == "320-300px-bicubic"
    assert math.isclose(AugmentOptions().crop_ratio[1], 4 / 3)


# ---------------------------------------------------------------- options


def test_the_defaults_augment_nothing_and_define_the_run():
    from tl_dist.config import RUN_DEFINING

    cfg = parse_args([])
    assert not AugmentOptions.from_config(cfg).active and cfg.eval_resize == "squash" and cfg.cache_size == 0
    assert AugmentOptions.from_config(cfg) == AugmentOptions()
    assert {"augment", "crop_scale", "crop_ratio", "hflip", "random_erasing", "mixup", "cutmix", "cache_size",
            "eval_resize"} <= set(RUN_DEFINING)


def test_crop_ranges_come_from_the_command_line_and_from_files(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("crop-scale: [0.2, 0.9]\naugment: basic\n")
    cfg = parse_args(["--config", str(config), "--crop-ratio", "0.5", "2"])
    options = AugmentOptions.from_config(cfg)
    assert (options.policy, options.crop_scale, options.crop_ratio) == ("basic", (0.2, 0.9), (0.5, 2.0))


@pytest.mark.parametrize("argv, message", [
    (["--crop-scale", "0.5", "0.2"], "--crop-scale: needs 0 < LO <= HI <= 1"),
    (["--crop-scale", "0.5"], "--crop-scale: expected 2 arguments"),
    (["--crop-ratio", "0", "1"], "--crop-ratio: needs 0 < LO <= HI"),
    (["--hflip", "1.5"], "--hflip: a probability, in [0, 1]"),
    (["--random-erasing", "-0.1"], "--random-erasing: a probability"),
    (["--mixup", "-1"], "--mixup: the alpha of Beta(alpha, alpha)"),
    (["--image-size", "32", "--cache-size", "16"], "--cache-size: 16 is below --image-size 32"),
    (["--image-size", "32", "--eval-resize", "20"], "--eval-resize: squash, weights, or a size of at least"),
    (["--eval-resize", "center"], "--eval-resize: squash, weights"),
    (["--augment", "basic", "--cache-features", "on"], "--cache-features: on trains on stored features of "
                                                        "unaugmented images"),
])
def test_bad_augmentation_options_get_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"error: argument {message}" in err, err


def test_predict_resizes_as_the_runs_evaluation():
    from tl_dist.predict import LoadedModel

    def loaded(config: dict) -> LoadedModel:
        return LoadedModel(torch.nn.Identity(), config["model"], ["a", "b"], config["image_size"], (0.5,) * 3,
                           (0.2,) * 3, None, config)

    assert loaded({"model": "vgg16", "weights": "imagenet", "image_size": 224}).resize() == Resize(224)
    run = loaded({"model": "vgg16", "weights": "imagenet", "image_size": 224, "eval_resize": "weights"})
    assert run.resize() == Resize(224, 256) and run.resize(112) == Resize(112, 128)  # --image-size of predict
    assert loaded({"model": "vgg_tiny", "weights": "none", "image_size": 32, "eval_resize": "40"}).resize(64) == \
        Resize(64, 80)
