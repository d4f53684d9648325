"""Bad input, built on the fly: files that cannot be decoded are skipped and reported, odd but valid images
are kept as RGB, junk that is not data is never indexed, and every unusable input the user gives ends
the run with one `error:` line, a non-zero exit and nothing written to the output folder."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ci_tools import missing_tool
from conftest import REPO, make_image_tree, run_env, tiny_args
from PIL import Image

from tl_dist.runtime import usable_cores
from tl_dist.data import DataError, ImageCache, download_caltech101, index_images, load_image

UNDECODABLE = ["class_00/empty.jpg", "class_00/text.jpg", "class_01/truncated.jpg", "class_01/corrupt.jpg"]
# Odd but valid images (all in class_02) and the RGB colour each must decode to.
KEPT = {"class_02/cmyk.jpg": (255, 0, 0), "class_02/palette.png": (0, 0, 255),
        "class_02/rgba.png": (0, 255, 0), "class_02/sixteen_bit.png": (128, 128, 128),
        "class_02/gray.jpg": (200, 200, 200)}


def jpeg_bytes(seed: int = 0, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def corrupt_scan(data: bytes) -> bytes:
    """Bit rot in the entropy-coded data after the start-of-scan marker: libjpeg reports a broken stream."""
    damaged = bytearray(data)
    for k in range(data.index(b"\xff\xda") + 20, len(data) - 2, 7):
        damaged[k] = 0xFF
    return bytes(damaged)


def add_bad_files(root: Path) -> None:
    c0, c1, c2 = root / "class_00", root / "class_01", root / "class_02"
    # cannot be decoded: skipped and reported
    (c0 / "empty.jpg").write_bytes(b"")
    (c0 / "text.jpg").write_text("<html>404 Not Found</html>\n")
    (c1 / "truncated.jpg").write_bytes(jpeg_bytes(1)[:-300])
    (c1 / "corrupt.jpg").write_bytes(corrupt_scan(jpeg_bytes(2)))
    # odd but valid: kept, as RGB
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(c2 / "cmyk.jpg", quality=95)
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(c2 / "palette.png", transparency=1)  # its only colour is the transparent one
    Image.new("RGBA", (24, 24), (0, 255, 0, 100)).save(c2 / "rgba.png")
    Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16)).save(c2 / "sixteen_bit.png")  # 128 * 257
    Image.new("L", (24, 24), 200).save(c2 / "gray.jpg", quality=95)
    # never indexed: junk that would be skipped with a warning if it were read
    junk = b"\x00\x05\x16\x07 AppleDouble resource fork"
    (c0 / "._img_001.jpg").write_bytes(junk)
    (c0 / ".hidden.png").write_bytes(junk)
    (c0 / "Thumbs.db").write_bytes(junk)
    (c1 / ".ipynb_checkpoints").mkdir()
    (c1 / ".ipynb_checkpoints" / "img_001-checkpoint.jpg").write_bytes(junk)
    (root / ".ipynb_checkpoints").mkdir()  # would be a fourth class
    (root / ".ipynb_checkpoints" / "img.jpg").write_bytes(jpeg_bytes(3))
    (c2 / "tmp").write_bytes(jpeg_bytes(4))  # like Caltech-101's BACKGROUND_Google/tmp: no extension
    # an empty class folder (nothing but an ignored file): left out with a warning
    (root / "empty_class").mkdir()
    (root / "empty_class" / "Thumbs.db").write_bytes(junk)


NEVER_INDEXED = ["class_00/._img_001.jpg", "class_00/.hidden.png", "class_00/Thumbs.db",
                 "class_01/.ipynb_checkpoints/img_001-checkpoint.jpg", ".ipynb_checkpoints/img.jpg",
                 "class_02/tmp", "empty_class/Thumbs.db"]


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> Path:
    root = make_image_tree(tmp_path_factory.mktemp("bad-input") / "caltech-101", classes=3, per_class=6)
    add_bad_files(root)
    return root


@pytest.fixture(scope="module")
def bad_run(bad_tree, tmp_path_factory):
    """One real run over the tree (one process, a few steps)."""
    root = tmp_path_factory.mktemp("bad-input-run")
    out, cache = root / "run", root / "cache"
    args = tiny_args(bad_tree, out, cache, "--epochs", "1", "--max-steps", "2", "--wandb-mode", "disabled")
    proc = subprocess.run([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "cache": cache, "stderr": " ".join(proc.stderr.split()), "stdout": proc.stdout}


def test_undecodable_files_are_skipped_with_one_warning(bad_run):
    stderr = bad_run["stderr"]
    assert stderr.count("cannot be decoded") == 1, stderr
    for name in UNDECODABLE:
        assert name in stderr
    assert "skipped_files.txt" in stderr  # where the whole list is
    listed = dict(line.split("\t", 1) for line in (bad_run["out"] / "skipped_files.txt").read_text().splitlines())
    assert sorted(listed) == sorted(UNDECODABLE)
    assert all(listed.values())  # each with the reason
    assert json.loads((bad_run["out"] / "metrics.json").read_text())["skipped_files"] == sorted(UNDECODABLE)


def test_odd_images_are_kept_and_decoded_to_rgb(bad_run, bad_tree):
    split = json.loads((bad_run["out"] / "split.json").read_text())
    used = split["train"] + split["test"]
    assert set(KEPT) <= set(used)
    assert not set(UNDECODABLE) & set(used)
    # The decoded-image cache the run trained on: one S x S x 3 uint8 row per indexed file.
    (array_path,) = bad_run["cache"].glob("images-*.npy")
    images = np.load(array_path)
    files = index_images(bad_tree, warn=lambda _: None).files
    assert images.shape == (len(files), 32, 32, 3)
    for name, rgb in KEPT.items():
        pixels = images[files.index(name)].reshape(-1, 3).astype(int)
        assert np.abs(pixels - rgb).max() <= 3, (name, pixels.mean(0))


def test_junk_is_never_indexed_and_empty_classes_are_left_out(bad_run):
    split = json.loads((bad_run["out"] / "split.json").read_text())
    used = split["train"] + split["test"]
    assert split["classes"] == ["class_00", "class_01", "class_02"]
    assert not set(NEVER_INDEXED) & set(used)
    for name in NEVER_INDEXED:
        assert name not in bad_run["stderr"]
    assert "empty_class" in bad_run["stderr"] and "no images" in bad_run["stderr"]
    config = json.loads((bad_run["out"] / "config.json").read_text())
    assert config["num_classes"] == 3


def test_a_class_with_no_decodable_file_is_left_out(tmp_path):
    """A folder whose only images are broken is as empty as one without images: the class count follows."""
    from tl_dist.data import keep_decodable

    root = make_image_tree(tmp_path / "data", classes=3, per_class=3)
    for f in (root / "class_01").iterdir():
        f.write_bytes(b"")
    index = index_images(root)
    bad = {f: "empty" for f in index.files if f.startswith("class_01/")}
    warnings_seen = []
    kept, rows = keep_decodable(index, bad, warnings_seen.append)
    assert kept.classes == ["class_00", "class_02"]
    assert [kept.labels[r] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [kept.files[r] for r in rows] == [f for f in index.files if f not in bad]
    assert len(warnings_seen) == 1 and "class_01" in warnings_seen[0]
    with pytest.raises(DataError, match="none of the 9 images"):
        keep_decodable(index, {f: "empty" for f in index.files}, warnings_seen.append)


def test_very_large_images_are_kept(tmp_path, monkeypatch):
    """Pillow warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS (89.5 Mpx by default) and
    refuses (DecompressionBombError) above twice that. A real 90 Mpx image takes seconds and a gigabyte
    to decode, so this lowers the limit in this process: the same two thresholds, at 1,000 pixels. Warnings
    are made errors here, as under `python -W error`: the verify pass, decoding in several threads, must
    still keep every large image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (40, 40), (10, 20, 30)).save(root / "a" / f"large_{i}.png")  # 1,600 px: a warning
    Image.new("RGB", (50, 50), (10, 20, 30)).save(root / "a" / "bomb.png")  # 2,500 px: an error
    (root / "b").mkdir()  # a second class: a dataset needs two
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "b" / "small.png")
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(root / "a" / "large_0.png")
    index = index_images(root)
    cache = ImageCache(tmp_path / "cache", index, 8)
    tmp = cache.create_tmp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bad, _ = cache.fill(tmp, range(len(index)), threads=4)
        assert (load_image(root / "a" / "large_0.png", 8) == (10, 20, 30)).all()
    assert index.files[0] == "a/bomb.png"
    assert list(bad) == [0] and "DecompressionBombError" in bad[0]
    assert (np.load(tmp)[1:] == (10, 20, 30)).all()


# ---------------------------------------------------------------- unusable input: one error line


def _missing_data_dir(tmp: Path) -> list[str]:
    return ["--data-dir", str(tmp / "no-such-folder")]


def _folder_without_classes(tmp: Path) -> list[str]:
    folder = tmp / "no-classes"
    folder.mkdir()
    (folder / "README.txt").write_text("the images are elsewhere\n")
    (folder / "empty_class").mkdir()
    return ["--data-dir", str(folder)]


def _weights_of_another_network(tmp: Path) -> list[str]:
    """A real state_dict, of another network (SqueezeNet), as a user might pass by mistake."""
    from torchvision.models import squeezenet1_1

    torch.save(squeezenet1_1().state_dict(), tmp / "squeezenet.pt")
    return ["--model", "vgg16", "--weights", str(tmp / "squeezenet.pt")]


def _not_a_checkpoint(tmp: Path) -> list[str]:
    folder = tmp / "checkpoints" / "step_5"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("x\n")
    return ["--resume", str(folder)]


def _one_class(tmp: Path) -> list[str]:
    """One class folder with images (and one without): a classifier of one class would score 100%."""
    folder = make_image_tree(tmp / "one-class", classes=1, per_class=4)
    (folder / "empty_class").mkdir()
    return ["--data-dir", str(folder)]


def _too_many_workers(tmp: Path) -> list[str]:
    return ["--num-workers", "1000"]


def _image_too_small_for_vgg16(tmp: Path) -> list[str]:
    return ["--model", "vgg16", "--image-size", "31"]


def _data_dir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "caltech-101.zip").write_bytes(b"PK\x03\x04 an archive, not unpacked")
    return ["--data-dir", str(tmp / "caltech-101.zip")]


def _output_dir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "run").unlink(missing_ok=True)
    (tmp / "run").write_text("keep me\n")
    return []


def _one_image_per_class(tmp: Path) -> list[str]:
    return ["--max-samples", "1"]  # about one image: at least one per class, so none for the test split


def _validation_without_images(tmp: Path) -> list[str]:
    return ["--max-samples", "8", "--val-fraction", "0.5"]  # 2 an class: one for training, one for testing


def _every_image_unreadable(tmp: Path) -> list[str]:
    for name in ("a", "b"):
        (tmp / "junk" / name).mkdir(parents=True)
        for i in range(3):
            (tmp / "junk" / name / f"{i}.jpg").write_text("<html>404 Not Found</html>\n")
    return ["--data-dir", str(tmp / "junk")]


def _malformed_yaml(tmp: Path) -> list[str]:
    (tmp / "options.yaml").write_text("lr: [0.1\nepochs: 2\n")
    return ["--config", str(tmp / "options.yaml")]


def _missing_weights_file(tmp: Path) -> list[str]:
    return ["--weights", str(tmp / "vgg_tiny.pth")]


def _image_size_that_cannot_fit(tmp: Path) -> list[str]:
    return ["--image-size", "100000"]


def _cache_dir_is_the_data_dir(tmp: Path) -> list[str]:
    """The folder the user gives wraps the class folders (as Kaggle's download does)."""
    make_image_tree(tmp / "download" / "caltech-101", classes=2, per_class=2)
    return ["--data-dir", str(tmp / "download"), "--cache-dir", str(tmp / "download")]


def _output_dir_inside_the_data_dir(tmp: Path) -> list[str]:
    make_image_tree(tmp / "images", classes=2, per_class=2)
    return ["--data-dir", str(tmp / "images"), "--output-dir", str(tmp / "images" / "run")]


ERROR_CASES = {
    # case: (the arguments that make it, built on the fly; what the error says; --output-dir exists already;
    #        exit code: 2 for options refused by the parser, 1 for data found unusable)
    "missing data dir": (_missing_data_dir, "does not exist", False, 1),
    "no classes": (_folder_without_classes, "no class folders", True, 1),
    "one class": (_one_class, "only one class folder with images", True, 1),
    "weights not vgg16": (_weights_of_another_network, "does not match torchvision's vgg16", False, 1),
    "resume not a checkpoint": (_not_a_checkpoint, "not a usable tl_dist checkpoint", True, 1),
    "too many workers": (_too_many_workers, f"--num-workers: 1000 is more than the {usable_cores()} CPU core",
                         False, 2),
    "image too small for vgg16": (_image_too_small_for_vgg16, "31 px is too small for vgg16, which takes 32 px",
                                  False, 2),
    "data dir is a file": (_data_dir_is_a_file, "caltech-101.zip is a file, not a folder", False, 2),
    "output dir is a file": (_output_dir_is_a_file, "run is a file, not a folder", False, 2),
    "one image per class": (_one_image_per_class, "no test image can be held out: every class has a single image "
                            "(--max-samples 1 keeps about that many images)", True, 1),
    "validation without images": (_validation_without_images, "--val-fraction 0.5: no validation image can be "
                                  "held out", False, 1),
    "every image unreadable": (_every_image_unreadable, "none of the 6 images in", False, 1),
    "malformed yaml": (_malformed_yaml, "argument --config: cannot read", False, 2),
    "missing weights file": (_missing_weights_file, "vgg_tiny.pth: no such file; pass the PATH of a state_dict",
                             False, 2),
    "image size that cannot fit": (_image_size_that_cannot_fit, "argument --image-size: one batch of 4 images at "
                                   "100000 px through vgg_tiny needs at least", False, 2),
    "cache dir is the data dir": (_cache_dir_is_the_data_dir, "download is inside --data-dir", False, 2),
    "output dir inside the data dir": (_output_dir_inside_the_data_dir, "run is inside --data-dir", False, 2),
}
# The weights are loaded after the decode (the new head needs the number of classes that decoded), and the
# split is drawn from the files that decoded.
CACHE_WRITTEN_BEFORE_ERROR = {"weights not vgg16", "one image per class", "validation without images",
                              "every image unreadable"}


@pytest.fixture(scope="module")
def error_runs(image_tree, tmp_path_factory):
    """The cases at once, each a real process (they spend most of their time importing torch)."""
    procs = {}
    for case, (build, message, pre_exists, code) in ERROR_CASES.items():
        tmp = tmp_path_factory.mktemp(case.replace(" ", "-"))
        out = tmp / "run"
        if pre_exists:  # a folder the user already had: it must stay as it was
            out.mkdir()
            (out / "mine.txt").write_text("keep me\n")
        args = tiny_args(image_tree, out, tmp / "cache") + build(tmp) + ["--wandb-mode", "disabled"]
        procs[case] = (subprocess.Popen([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO,
                                        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), tmp, message, pre_exists, code)
    results = {}
    for case, (proc, tmp, message, pre_exists, code) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[case] = {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "tmp": tmp,
                         "message": message, "pre_exists": pre_exists, "expected_code": code}
    return results


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_unusable_input_gives_one_error_line_and_writes_nothing(error_runs, case):
    """One line with `error:` (argparse's own start with the program's name, after its usage line), the
    exit code, and nothing written: neither the output folder nor the decoded-image cache (where the
    error needs the decoded images, only the cache)."""
    run = error_runs[case]
    assert run["code"] == run["expected_code"], run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"] + run["stdout"]
    errors = [line for line in run["stderr"].splitlines() if "error:" in line]
    assert len(errors) == 1 and run["message"] in " ".join(run["stderr"].split()), run["stderr"]
    assert "skipped_files.txt" not in run["stderr"]  # no message names a file that was not written
    out = run["tmp"] / "run"
    if run["pre_exists"]:
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
        assert (out / "mine.txt").read_text() == "keep me\n"
    elif out.is_file():  # --output-dir given as a file: left as it was
        assert out.read_text() == "keep me\n"
    else:
        assert not out.exists()
    # no run folder and no cache elsewhere either (among the images, say)
    assert not [p for p in run["tmp"].rglob("*") if p.name in ("split.json", "config.json", ".lock")]
    if case not in CACHE_WRITTEN_BEFORE_ERROR:
        assert not (run["tmp"] / "cache").exists() and not list(run["tmp"].rglob("*.npy"))


def test_a_read_only_cache_or_output_folder_is_refused_before_anything_runs(image_tree, tmp_path):
    """On a read-only mount (as root, permissions alone would not stop a write): one argparse error line
    naming the option, exit 2, and neither folder created."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], capture_output=True)
    if done.returncode != 0:
        missing_tool(f"cannot mount a read-only tmpfs: {done.stderr.decode().strip()}")
    try:
        for flag in ("--cache-dir", "--output-dir"):
            args = tiny_args(image_tree, tmp_path / "run", tmp_path / "cache", "--wandb-mode", "disabled")
            args[args.index(flag) + 1] = str(read_only / "sub")
            proc = subprocess.run([sys.executable, "-m", "tl_dist.train", *args], cwd=REPO, env=run_env(),
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
            assert f"error: argument {flag}: {read_only / 'sub'} cannot be written ({read_only} is read-only" in line
            assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)


def test_download_failing_from_every_source(tmp_path):
    """Every source fails (no network needed): one DataError that names each source's failure and says
    what to do; nothing is left behind, neither the dataset folder nor a partial download."""
    def kaggle(tmp: Path) -> Path:
        (tmp / "caltech-101" / "airplanes").mkdir(parents=True)
        (tmp / "caltech-101" / "airplanes" / "image_0001.jpg").write_bytes(b"\xff\xd8 half")
        raise OSError("Could not find kaggle.json. Make sure it's located in /root/.config/kaggle")

    def torchvision(tmp: Path) -> Path:
        raise ConnectionError("HTTPSConnectionPool(host='drive.google.com'): Max retries exceeded")

    dest = tmp_path / "data" / "caltech-101"
    with pytest.raises(DataError) as failure:
        download_caltech101(dest, sources=[("Kaggle", kaggle), ("torchvision", torchvision)])
    message = str(failure.value)
    assert "Kaggle: OSError: Could not find kaggle.json" in message
    assert "torchvision: ConnectionError" in message
    assert "--data-dir" in message and "network" in message
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # not even an empty data/ folder


def test_a_failed_download_keeps_folders_it_did_not_create(tmp_path):
    """./data existed before (the user's): it stays, with what it held."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine\n")

    def failing(tmp: Path) -> Path:
        raise ConnectionError("no network")

    with pytest.raises(DataError):
        download_caltech101(tmp_path / "data" / "caltech-101", sources=[("x", failing)])
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]
