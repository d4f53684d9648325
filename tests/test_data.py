"""Index, split and decode rules, on generated trees (one in Caltech-101's shape: conftest.caltech_like)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tl_dist.data import (DataError, ImageCache, find_image_root, index_images, load_image, normalize,
                          original_sizes, stratified_sample, stratified_split, warn_untested_classes)


def test_caltech_layout_index(caltech_like):
    """The Kaggle layout's nested caltech-101/ is found; 102 classes as in the article; a file without an
    extension (the real BACKGROUND_Google/tmp) is not an image; every quirky format is."""
    index = index_images(caltech_like)
    assert index.root == caltech_like / "caltech-101"
    assert len(index.classes) == 102 and index.classes == sorted(index.classes)
    assert len(index) == 869 and not [f for f in index.files if f.endswith("/tmp")]
    assert (index.root / index.classes[-1] / "tmp").is_file()
    assert sorted(np.bincount(index.labels).tolist()) == [7] * 25 + [8] * 25 + [9] * 26 + [10] * 26
    suffixes = {f.rsplit(".", 1)[1] for f in index.files}
    assert suffixes == {"jpg", "JPG", "png", "gif", "bmp", "tiff", "webp"}


def test_split_is_stratified_deterministic_and_disjoint(caltech_like):
    index = index_images(caltech_like)
    train, test = stratified_split(index.labels, 0.3, seed=0)
    assert sorted(train + test) == list(range(len(index))) and not set(train) & set(test)
    per_class_test = np.bincount([index.labels[i] for i in test], minlength=102)
    per_class_all = np.bincount(index.labels, minlength=102)
    assert (per_class_test == np.floor(per_class_all * 0.3 + 0.5)).all()  # 10, 9 -> 3; 8, 7 -> 2
    assert stratified_split(index.labels, 0.3, seed=0) == (train, test)
    assert stratified_split(index.labels, 0.3, seed=1) != (train, test)


def test_split_keeps_one_test_image_per_class_of_two_or_more():
    labels = [0, 0, 1, 1, 1, 2]  # 2, 3 and 1 images
    train, test = stratified_split(labels, 0.1, seed=0)
    assert sorted(labels[i] for i in test) == [0, 1]  # round(0.2)=0 -> 1; a single image stays in train
    assert len(train) == 4


def test_stratified_sample_keeps_every_class(caltech_like):
    index = index_images(caltech_like)
    keep = stratified_sample(index.labels, 200, seed=0)
    assert 190 <= len(keep) <= 210
    assert len({index.labels[i] for i in keep}) == 102


def test_index_rules(tmp_path):
    root = tmp_path / "data" / "wrapper"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / ".ipynb_checkpoints").mkdir(parents=True)
    (root / ".hidden_class").mkdir()
    (root / "empty").mkdir()
    img = Image.new("RGB", (8, 8), "red")
    img.save(root / "cats" / "a.JPG")
    img.save(root / "cats" / "b.webp")
    img.save(root / "cats" / ".c.jpg")
    img.save(root / "dogs" / "d.png")
    img.save(root / "dogs" / ".ipynb_checkpoints" / "e.png")
    img.save(root / ".hidden_class" / "f.png")
    (root / "dogs" / "Thumbs.db").write_bytes(b"x")
    (root / "dogs" / "notes.txt").write_text("x")
    warnings = []
    index = index_images(tmp_path / "data", warn=warnings.append)
    assert index.root == root
    assert index.classes == ["cats", "dogs"]
    assert index.files == ["cats/a.JPG", "cats/b.webp", "dogs/d.png"] and index.labels == [0, 0, 1]
    assert len(warnings) == 1 and "empty" in warnings[0]


def test_missing_and_empty_data_dir_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index_images(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no class folders with images"):
        index_images(tmp_path)


def test_decoded_image_matches_the_articles_transform(caltech_like):
    """uint8 cache + normalize() on the device == Resize((S, S)) + ToTensor + Normalize on the PIL image, for
    each format of the data (grayscale, palette with transparency, CMYK, RGBA, GIF, BMP, TIFF, WebP, JPEG)
    but 16-bit, where the article's convert("RGB") saturates (test_bad_input.py checks ours)."""
    article = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                                  transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    index = index_images(caltech_like)
    files = [f for f in index.files[:10] if Image.open(index.root / f).mode not in ("I;16", "I")]
    modes = {Image.open(index.root / f).mode for f in files}
    assert modes == {"RGB", "L", "P", "CMYK", "RGBA"} and len(files) == 9
    for rel in files:
        ours = normalize(torch.from_numpy(load_image(index.root / rel, 64)).permute(2, 0, 1)[None])[0]
        theirs = article(Image.open(index.root / rel).convert("RGB"))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_image_cache_is_keyed_by_files_and_size(image_tree, tmp_path):
    index = index_images(image_tree)
    cache = ImageCache(tmp_path, index, 16)
    assert not cache.complete()
    tmp = cache.create_tmp()
    bad, sizes = cache.fill(tmp, range(len(index)), threads=2)
    cache.publish(tmp, bad, sizes)
    assert cache.complete() and cache.bad_files() == {}
    assert original_sizes(cache.array_path).tolist() == [[40, 40]] * len(index)  # the tree's images, 40 px
    arr = np.load(cache.array_path, mmap_mode="r")
    assert arr.shape == (len(index), 16, 16, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[5], load_image(index.root / index.files[5], 16))
    assert json.loads(cache.meta_path.read_text())["files"] == len(index)
    assert ImageCache(tmp_path, index, 16).key == cache.key
    assert ImageCache(tmp_path, index, 24).array_path != cache.array_path
    assert ImageCache(tmp_path, index.subset(list(range(10))), 16).key != cache.key


def test_find_image_root_descends_only_through_wrappers(tmp_path):
    (tmp_path / "caltech-101" / "a").mkdir(parents=True)
    (tmp_path / "caltech-101" / "b").mkdir()
    assert find_image_root(tmp_path) == tmp_path / "caltech-101"
    (tmp_path / "single" / "only_class").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "single" / "only_class" / "x.png")
    # one class folder holding images is a dataset of one class, not a wrapper
    assert find_image_root(tmp_path / "single") == tmp_path / "single"


def test_data_dir_that_is_a_file_and_a_single_class(tmp_path):
    (tmp_path / "caltech-101.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a folder"):
        index_images(tmp_path / "caltech-101.zip")
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "dogs").mkdir()  # no images: left out, so one class remains
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cats" / "b.png")
    with pytest.raises(DataError, match=r"only one class folder with images .* \(cats\)"):
        index_images(tmp_path / "data", warn=lambda _: None)


def test_classes_without_a_test_image_are_named_once():
    warnings = []
    untested = warn_untested_classes(["a", "b", "c", "d"], [0, 0, 2], warnings.append)
    assert untested == ["b", "d"]
    assert len(warnings) == 1 and warnings[0].endswith(": b, d")
    assert warn_untested_classes(["a"], [0], warnings.append) == [] and len(warnings) == 1


def test_the_smallest_image_size_is_what_the_network_accepts():
    """check_image_size's minimum matches a real forward pass: the minimum works, one pixel less fails."""
    from tl_dist.model import build_model, check_image_size

    assert check_image_size("vgg16", 32) is None and "32 px or more" in check_image_size("vgg16", 31)
    assert check_image_size("vgg_tiny", 4) is None and "4 px or more" in check_image_size("vgg_tiny", 3)
    net = build_model("vgg_tiny", 3, "none", "features", 0.5).eval()
    assert net(torch.zeros(1, 3, 4, 4)).shape == (1, 3)
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 3, 3, 3))
