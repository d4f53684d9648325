"""The speed-ups change nothing but the speed: frozen-feature caching trains exactly as the uncached loop
does, the decoded-image cache is reused while the files are unchanged and rebuilt when one changes, and
its uint8 images normalised on the device equal the article's transform of the PIL image."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms
from torchvision.datasets.folder import pil_loader

from conftest import read_metrics, tiny_args, train_in_process
from tl_dist.data import ImageCache, index_images, load_image, normalize


def run_inprocess(args: list[str], capsys) -> str:
    """tl_dist.train.main(ARGS) in this process; returns what it printed."""
    code = train_in_process(args)
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    return out.out


def test_cached_and_uncached_training_give_the_same_losses_and_weights(image_tree, tmp_path, capsys):
    """Same split, order, init and random streams (dropout on), fp32: the classifier trained on cached
    backbone features equals the one trained through the whole network, to rtol 1e-5. The second run
    also finds the decoded-image cache of the first (warm) and decodes nothing."""
    cache = tmp_path / "cache"
    runs = {}
    printed = {}
    for mode in ("on", "off"):
        out = tmp_path / f"run_{mode}"
        args = tiny_args(image_tree, out, cache, "--cache-features", mode, "--mixed-precision", "no",
                         "--wandb-mode", "disabled", "--checkpoint-every-epochs", "0", "--num-workers", "0",
                         "--dropout", "0.5")
        printed[mode] = run_inprocess(args, capsys)
        runs[mode] = out
    assert "backbone features of" in printed["on"] and "backbone features of" not in printed["off"]
    assert "decoding" in printed["on"] and "decoding" not in printed["off"]  # the cache is reused

    on, off = read_metrics(runs["on"]), read_metrics(runs["off"])
    assert on["config"]["feature_cache"] is True and off["config"]["feature_cache"] is False
    assert len(on["train"]["epoch_loss"]) == 2
    np.testing.assert_allclose(on["train"]["epoch_loss"], off["train"]["epoch_loss"], rtol=1e-5)
    for section in ("baseline", "test"):
        np.testing.assert_allclose(on[section]["loss"], off[section]["loss"], rtol=1e-5)
        assert on[section]["accuracy"] == off[section]["accuracy"]
    w_on, w_off = (load_file(str(r / "model" / "model.safetensors")) for r in (runs["on"], runs["off"]))
    assert w_on.keys() == w_off.keys()
    changed = 0
    for name in w_on:
        torch.testing.assert_close(w_on[name], w_off[name], rtol=1e-5, atol=1e-7, msg=name)
        changed += name.startswith("classifier")
    assert changed == 6  # the three trained Linear layers' weights and biases are compared
    # ...and training did move them (both runs from the same init):
    assert on["train"]["epoch_loss"][0] != on["train"]["epoch_loss"][1]
    for mode in ("on", "off"):
        assert read_metrics(runs[mode])["train"]["images_per_second"] > 0
        assert read_metrics(runs[mode])["test"]["images_per_second"] > 0
    assert on["features"]["images_per_second"] > 0 and off["features"] is None


def test_image_cache_is_reused_and_rebuilt_when_a_file_changes(image_tree, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in image_tree.rglob("*"):
        if p.is_file():
            dest = data / p.relative_to(image_tree)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    cache_dir = tmp_path / "cache"

    def build(index):
        cache = ImageCache(cache_dir, index, 24)
        if not cache.complete():
            tmp = cache.create_tmp()
            cache.publish(tmp, *cache.fill(tmp, range(len(index)), threads=2))
            return cache, True
        return cache, False

    first, built = build(index_images(data))
    assert built
    stamp = first.array_path.stat().st_mtime_ns
    again, built = build(index_images(data))
    assert not built and again.array_path == first.array_path  # warm: the same file, untouched
    assert again.array_path.stat().st_mtime_ns == stamp

    index = index_images(data)
    changed = index.files[3]
    img = Image.open(data / changed).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(data / changed, format="PNG" if changed.endswith(".png") else "JPEG")
    os.utime(data / changed, ns=(stamp + 10**9, stamp + 10**9))  # even on a coarse-clock file system
    rebuilt, built = build(index_images(data))
    assert built and rebuilt.array_path != first.array_path
    arr = np.load(rebuilt.array_path, mmap_mode="r")
    np.testing.assert_array_equal(arr[3], load_image(data / changed, 24))
    assert not np.array_equal(arr[3], np.load(first.array_path, mmap_mode="r")[3])


ARTICLE = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                              transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def test_normalize_on_uint8_equals_torchvision_on_the_pil_image(image_tree, tmp_path):
    """Colour JPEGs, grayscale PNGs and a palette image, loaded as ImageFolder loads them."""
    index = index_images(image_tree)
    palette = tmp_path / "palette.png"
    Image.open(index.root / index.files[1]).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    paths = [index.root / f for f in index.files[:6]] + [palette]
    assert {Image.open(p).mode for p in paths} >= {"RGB", "L", "P"}
    batch = torch.stack([torch.from_numpy(load_image(p, 64)).permute(2, 0, 1) for p in paths])
    for channels_last in (False, True):
        ours = normalize(batch, channels_last=channels_last)
        theirs = torch.stack([ARTICLE(pil_loader(str(p))) for p in paths])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
