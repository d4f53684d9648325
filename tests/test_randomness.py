"""The counter-based generator (tl_dist/randomness.py), keyed dropout and stochastic depth, and the sampler's
mixing partners: every draw is a function of (seed, epoch, image index) or (seed, epoch, step), never of the
batch an image arrives in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.ops import StochasticDepth

from tl_dist.data import GlobalBatchSampler
from tl_dist.model import build_model
from tl_dist.randomness import (KeyedDropout, KeyedStochasticDepth, StepDraws, fold, hash32, image_keys, keyed,
                                step_generator, uniforms, use_keyed_randomness)

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The hash's definition on Python integers (unbounded, so the products are exact)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_hash32_on_int64_tensors_is_the_32_bit_hash_exactly():
    values = torch.cat([torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, M32]),
                        torch.randint(0, 2**32, (3000,), generator=torch.Generator().manual_seed(0))])
    hashed = hash32(values)
    assert hashed.dtype == torch.int64 and int(hashed.min()) >= 0 and int(hashed.max()) <= M32
    assert hashed.tolist() == [lowbias32(v) for v in values.tolist()]
    assert [hash32(v) for v in values[:50].tolist()] == hashed[:50].tolist()  # Python ints: the same numbers
    assert len(set(hashed.tolist())) == len(set(values.tolist()))  # a bijection


def test_an_images_numbers_do_not_depend_on_its_batch():
    indices = torch.tensor([7, 3, 1000, 0, 55])
    keys = image_keys(12, 4, indices)
    assert keys.tolist() == [image_keys(12, 4, torch.tensor([i])).item() for i in indices.tolist()]
    assert keys.tolist() == image_keys(12, 4, indices.flip(0)).flip(0).tolist()
    assert len(set(image_keys(0, 0, torch.arange(100_000)).tolist())) == 100_000  # distinct within an epoch
    for other in (image_keys(13, 4, indices), image_keys(12, 5, indices), image_keys(-12, 4, indices),
                  image_keys(12 + 2**32, 4, indices)):  # another seed (all 64 bits count), another epoch
        assert not set(other.tolist()) & set(keys.tolist())

    u = uniforms(keys, 3, 6)
    assert u.shape == (5, 6) and u.dtype == torch.float32
    torch.testing.assert_close(uniforms(keys, 3, 2), u[:, :2], rtol=0, atol=0)  # more counters: a prefix kept
    torch.testing.assert_close(uniforms(keys[2:3], 3, 6), u[2:3], rtol=0, atol=0)
    assert not torch.equal(uniforms(keys, 4, 6), u)  # another stream
    # counter j of stream s of key k is fold(fold(k, s), j), in [0, 1) on a 2**-24 grid
    expected = (fold(fold(keys[0].item(), 3), 5) >> 8) / 2**24
    assert u[0, 5].item() == expected


def test_uniforms_are_uniform_and_independent():
    u = uniforms(image_keys(0, 0, torch.arange(20_000)), 1, 8).double()
    assert 0 <= u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    counts = torch.histc(u[:, 0], bins=20, min=0, max=1)
    assert counts.min() > 20_000 / 20 * 0.9 and counts.max() < 20_000 / 20 * 1.1
    corr = torch.corrcoef(u.T)
    assert (corr - torch.eye(8)).abs().max() < 0.03, corr  # counters uncorrelated
    neighbours = torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1]
    assert abs(neighbours) < 0.03  # neither are consecutive images


def test_step_generator_is_keyed_by_seed_epoch_and_step():
    draws = StepDraws(5, 2, 3)
    assert draws.generator().random(4).tolist() == step_generator(5, 2, 3).random(4).tolist()
    others = [step_generator(6, 2, 3), step_generator(5, 3, 3), step_generator(5, 2, 4)]
    assert all(g.random() != step_generator(5, 2, 3).random() for g in others)


# ---------------------------------------------------------------- dropout and stochastic depth


def test_keyed_dropout_draws_each_images_mask_from_its_key():
    layer = use_keyed_randomness(nn.Sequential(nn.Dropout(0.3)))[0]
    assert isinstance(layer, KeyedDropout) and layer.p == 0.3
    x = torch.ones(6, 40, 5)
    keys = image_keys(0, 1, torch.arange(6))
    with keyed(layer, keys):
        out = layer(x)
    kept = out != 0
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1 / 0.7))  # F.dropout's scale
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.05)
    with keyed(layer, keys[[4, 1]]):  # the same images in another batch, in another order
        assert torch.equal(layer(x[:2]), out[[4, 1]])
    with keyed(layer, image_keys(0, 2, torch.arange(6))):  # the next epoch: other masks
        assert not torch.equal(layer(x), out)
    assert layer.keys is None  # handed back
    with pytest.raises(RuntimeError, match="needs the keys"):
        layer(x)
    with keyed(layer, keys[:0]):  # a process's empty share of a short last batch still runs the forward pass
        assert layer(x[:0]).shape == (0, 40, 5)
    layer.eval()
    assert torch.equal(layer(x), x)


def test_keyed_stochastic_depth_drops_whole_images_by_key():
    layer = use_keyed_randomness(nn.Sequential(StochasticDepth(0.4, "row")))[0]
    assert isinstance(layer, KeyedStochasticDepth)
    x = torch.ones(2000, 3, 2, 2)
    with keyed(layer, image_keys(0, 0, torch.arange(2000))):
        out = layer(x)
    per_image = out.flatten(1)
    assert ((per_image == 0).all(1) | (per_image == 1 / 0.6).all(1)).all()
    assert (per_image[:, 0] == 0).float().mean().item() == pytest.approx(0.4, abs=0.04)
    layer.eval()
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("arch", ["vgg16", "efficientnet_b0"])
def test_every_dropout_and_stochastic_depth_of_a_network_is_keyed(arch):
    with torch.device("meta"):  # no memory, no initialisation: only the layers count
        model = build_model(arch, 5, "none", "none", image_size=32)
        reference = models.get_model(arch, num_classes=5)
    keyed_layers = [m for m in model.modules() if isinstance(m, (KeyedDropout, KeyedStochasticDepth))]
    assert keyed_layers and not [m for m in model.modules() if type(m) in (nn.Dropout, StochasticDepth)]
    assert len({m.stream for m in keyed_layers}) == len(keyed_layers)  # each layer its own stream
    assert model.state_dict().keys() == reference.state_dict().keys()
    if arch == "vgg16":
        assert [m.p for m in keyed_layers] == [0.5, 0.5]


def test_dropout_masks_of_a_batch_split_over_processes_are_the_unsplit_batchs():
    """What DDP processes do with their shares of a global batch: the same outputs as one process."""
    torch.manual_seed(0)
    model = build_model("vgg_tiny", 4, "none", "none", dropout=0.5, image_size=16).train()
    x, indices = torch.randn(6, 3, 16, 16), torch.tensor([4, 9, 0, 2, 7, 5])
    draws = StepDraws(0, 3, 1)
    with keyed(model, draws.image_keys(indices)):
        whole = model(x)
    shares = []
    for rank in range(3):
        with keyed(model, draws.image_keys(indices[rank::3])):
            shares.append(model(x[rank::3]))
    split = torch.empty_like(whole)
    for rank in range(3):
        split[rank::3] = shares[rank]
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    with torch.no_grad(), keyed(model, draws.image_keys(indices)):  # the frozen-feature path: the same masks
        torch.testing.assert_close(model(model.embed(x), pooled=True), whole, rtol=1e-6, atol=1e-7)
    model.eval()
    assert not torch.allclose(model(x), whole, atol=1e-3)  # control: the masks did something


# ---------------------------------------------------------------- mixing partners


@pytest.mark.parametrize("size, batch, world, accumulation", [(32, 12, 1, 1), (32, 6, 2, 1), (32, 4, 3, 1),
                                                              (30, 2, 2, 3), (7, 4, 3, 1)])
def test_partners_are_the_previous_image_of_the_global_batch(size, batch, world, accumulation):
    pairs = {}
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, world, rank, seed=3, accumulation=accumulation, partners=True)
        sampler.set_epoch(2)
        plain = GlobalBatchSampler(size, batch, world, rank, seed=3, accumulation=accumulation)
        plain.set_epoch(2)
        for step, (micro, images) in enumerate(zip(sampler, plain)):
            assert micro[:len(images)] == images  # the images first, then their partners
            pairs.update({(step // accumulation, image): partner
                          for image, partner in zip(images, micro[len(images):])})
    order = torch.randperm(size, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    global_batch = batch * world * accumulation
    expected = {}
    for step in range(-(-size // global_batch)):
        images = order[step * global_batch:(step + 1) * global_batch]
        expected.update({(step, image): partner for image, partner in zip(images, np.roll(images, 1).tolist())})
    assert pairs == expected
