"""Class names in any script show in the pictures: a real run on generated images whose classes have
Japanese and Cyrillic names draws both pictures without a matplotlib warning, and with the names' real
glyphs, not boxes. The check of the glyphs: the same report drawn with only matplotlib's default font
(which has no Japanese) differs where the names are, and each character drawn alone with the report's
fonts differs from every other one (missing glyphs are drawn as one box per Unicode block)."""

from __future__ import annotations

import csv
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ci_tools import missing_tool
from conftest import launch, make_image_tree, read_metrics, tiny_args
from tl_dist import report as rpt
from tl_dist import run_dir as run_files

NAMES = ["ラーメン", "猫の写真", "Собака", "ёжик_и_медведь"]  # the data folder sorts them: Cyrillic first


@pytest.fixture(scope="module")
def cjk_font() -> None:
    """Noto Sans CJK, which the Japanese names need (Debian's fonts-noto-cjk, which CI installs)."""
    if "Noto Sans CJK JP" not in rpt.font_families():
        missing_tool("no Noto Sans CJK font: fonts-noto-cjk is not installed (apt-get install fonts-noto-cjk)")


@pytest.fixture(scope="module")
def named_run(cjk_font, tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("fonts")
    generated = make_image_tree(root / "generated", classes=4, per_class=10)
    data = root / "data"
    for folder, name in zip(sorted(generated.iterdir()), NAMES):
        shutil.copytree(folder, data / name)
    out = root / "run"
    # A barely trained model: mistakes, so the names show in both pictures (test 1 checks all four do).
    proc = launch(tiny_args(data, out, cache_dir, "--epochs", "1", "--lr", "0.0001"))
    return out, proc


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.int16)


def report_from_files(out) -> rpt.Report:
    """The run's report, rebuilt from its CSVs (the pictures depend on nothing else)."""
    with open(out / run_files.CONFUSION_CSV, newline="") as f:
        header, *lines = list(csv.reader(f))
    classes = header[1:]
    confusion = torch.tensor([[int(v) for v in line[1:]] for line in lines])
    with open(out / run_files.MISTAKES_CSV, newline="") as f:
        mistakes = list(csv.DictReader(f))
    return rpt.Report(classes=classes, confusion=confusion,
                      mistake_positions=[int(m["test_position"]) for m in mistakes],
                      mistake_preds=[classes.index(m["pred"]) for m in mistakes],
                      mistake_labels=[classes.index(m["label"]) for m in mistakes],
                      mistake_confidences=[float(m["confidence"]) for m in mistakes],
                      num_wrong=int(confusion.sum() - confusion.trace()))


def test_names_in_any_script_draw_without_warnings(named_run):
    out, proc = named_run
    assert sorted(read_metrics(out)["test"]["per_class_accuracy"]) == sorted(NAMES)
    for text in (proc.stdout, proc.stderr):
        assert "Glyph" not in text and "missing from font" not in text and "findfont" not in text, text[-3000:]
        assert "no installed font" not in text
    report = report_from_files(out)
    assert report.num_wrong >= 4 and set(report.mistake_preds) | set(report.mistake_labels) == {0, 1, 2, 3}
    assert "Noto Sans CJK JP" in rpt.font_families() and rpt.missing_glyphs(NAMES) == ""


def test_the_pictures_show_the_glyphs_not_boxes(named_run, tmp_path, monkeypatch):
    out, _ = named_run
    report = report_from_files(out)
    rpt.draw_confusion_matrix(report, tmp_path / "cm.png")
    rpt.draw_mistakes(report, None, tmp_path / "mistakes.png")
    run_cm, run_mistakes = pixels(out / run_files.CONFUSION_PNG), pixels(out / run_files.MISTAKES_PNG)
    assert (pixels(tmp_path / "cm.png") == run_cm).all()  # the rebuilt report draws the run's picture
    captions = caption_bands(run_mistakes, len(report.mistake_positions))
    assert (caption_bands(pixels(tmp_path / "mistakes.png"), len(report.mistake_positions)) == captions).all()

    # With matplotlib's default font alone the Japanese names become boxes: other pixels.
    monkeypatch.setattr(rpt, "font_families", lambda: ["DejaVu Sans"])
    rpt.draw_confusion_matrix(report, tmp_path / "cm_boxes.png")
    rpt.draw_mistakes(report, None, tmp_path / "mistakes_boxes.png")
    assert (pixels(tmp_path / "cm_boxes.png") != run_cm).sum() > 200
    boxes = caption_bands(pixels(tmp_path / "mistakes_boxes.png"), len(report.mistake_positions))
    assert (boxes != captions).sum() > 200


def caption_bands(grid: np.ndarray, n: int) -> np.ndarray:
    """The caption bands above the mistakes' pictures (their text only: the pictures are left out)."""
    pad, rows = 6, -(-n // rpt.GRID_COLUMNS)
    header = grid.shape[0] - (rows * (rpt.TILE + rpt.CAPTION + pad) + pad)
    return np.concatenate([grid[header + pad + r * (rpt.TILE + rpt.CAPTION + pad):][:rpt.CAPTION]
                           for r in range(rows)])


def test_each_character_of_the_names_has_its_own_glyph(cjk_font):
    """Drawn alone, no two different characters of the names look the same: with the report's fonts
    each has its glyph; with the default font alone the Japanese ones are boxes."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def draw(ch: str, families: list[str]) -> bytes:
        with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the default font's "Glyph ... missing" for the control
            fig = Figure(figsize=(0.4, 0.4), dpi=100)
            canvas = FigureCanvasAgg(fig)
            fig.text(0.5, 0.5, ch, ha="center", va="center", fontsize=20)
            canvas.draw()
            return bytes(canvas.buffer_rgba())

    characters = sorted({ch for name in NAMES for ch in name if ch != "_"})
    ours = {ch: draw(ch, rpt.font_families()) for ch in characters}
    assert len(set(ours.values())) == len(characters) > 15
    japanese = [ch for ch in characters if ord(ch) > 0x3000]
    # The control: the default font alone draws matplotlib's "Last Resort" box, one per Unicode block
    # (hiragana, katakana, CJK ideographs), so the same picture for different characters.
    assert len(japanese) == 8 and len({draw(ch, ["DejaVu Sans"]) for ch in japanese}) == 3


def test_characters_no_font_has_get_one_warning_line(tmp_path, capsys):
    """Hieroglyphs (no installed font has them): one line from us naming them, not one matplotlib warning
    per character, and the pictures are still written."""
    names = ["𓀀𓀁", "𓃰", "cat"]
    perfect = {"logits": torch.eye(3) * 10, "labels": torch.arange(3), "positions": torch.arange(3)}
    report = rpt.build_report(perfect, names)
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rpt.write_report(report, tmp_path, test_images=None, test_files=[], warn=lines.append)
    assert [w for w in caught if "Glyph" in str(w.message)] == []
    assert len(lines) == 1 and "𓀀𓀁𓃰" in lines[0] and "no installed font" in lines[0], lines
    assert (tmp_path / run_files.CONFUSION_PNG).is_file() and (tmp_path / run_files.MISTAKES_PNG).is_file()
