"""The report after a run and after --eval-only: per-class table, confusion matrix, worst mistakes, summary,
W&B table and pictures; the same from 1 and 2 processes. Real entry point, 8 classes of generated shapes
(tl_dist/shapes.py, with the real data's file formats), the small stand-in network at 32 px."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import wandb_reader
from conftest import assert_close, launch, read_metrics, tiny_args
from test_metrics import check_against_logits
from tl_dist import report as rpt
from tl_dist import run_dir as run_files
from tl_dist.shapes import class_names, make_shapes

CLASSES = sorted(class_names(8))
# Enough training for a model that is right about half the time: varied predictions, and mistakes to show.
TRAIN = ["--freeze", "none", "--dropout", "0", "--epochs", "5", "--lr", "0.02"]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("report")
    data = make_shapes(root / "data", classes=8, per_class=20, size=40)
    out = root / "run"
    proc = launch(tiny_args(data, out, cache_dir, *TRAIN))
    return data, out, proc


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_png(path, min_width=600) -> Image.Image:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    img = Image.open(path)
    assert img.width >= min_width and 250 <= img.height <= 4000, img.size
    return img


def test_run_writes_the_report(report_run):
    _, out, proc = report_run
    metrics = read_metrics(out)
    test = metrics["test"]
    # The core's keys are still there; per_class adds precision, recall, F1 and support.
    for key in ("accuracy", "top5_accuracy", "mean_class_accuracy", "per_class_accuracy", "f1_macro"):
        assert key in test
    per_class = {row["class"]: row for row in test["per_class"]}
    assert list(per_class) == CLASSES
    assert sum(r["support"] for r in per_class.values()) == test["num_samples"] == 32
    assert sum(r["correct"] for r in per_class.values()) == round(test["accuracy"] * 32)
    assert 0.2 < test["accuracy"] < 1.0, "the run should have learnt something, and still make mistakes"
    for name, acc in test["per_class_accuracy"].items():
        assert per_class[name]["accuracy"] == pytest.approx(acc) == pytest.approx(per_class[name]["recall"])
    assert np.mean([r["f1"] for r in per_class.values()]) == pytest.approx(test["f1_macro"])
    assert np.mean([r["precision"] for r in per_class.values()]) == pytest.approx(test["precision_macro"])

    rows = read_csv(out / run_files.PER_CLASS_CSV)
    assert [r["class"] for r in rows] == CLASSES
    assert [int(r["support"]) for r in rows] == [per_class[c]["support"] for c in CLASSES]
    assert [float(r["f1"]) for r in rows] == pytest.approx([per_class[c]["f1"] for c in CLASSES], abs=1e-6)

    with open(out / run_files.CONFUSION_CSV, newline="") as f:
        matrix = list(csv.reader(f))
    assert matrix[0][1:] == CLASSES and [r[0] for r in matrix[1:]] == CLASSES
    counts = np.array([[int(v) for v in r[1:]] for r in matrix[1:]])
    assert counts.sum() == 32
    assert counts.diagonal().tolist() == [per_class[c]["correct"] for c in CLASSES]

    # The worst mistakes: most confident first, really wrong, and the right files (a file's folder is its class).
    mistakes = read_csv(out / run_files.MISTAKES_CSV)
    wrong = 32 - counts.trace()
    assert len(mistakes) == min(rpt.MAX_MISTAKES, wrong) > 0
    confidences = [float(m["confidence"]) for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    split = json.loads((out / "split.json").read_text())
    for m in mistakes:
        assert m["pred"] != m["label"] and m["pred"] in CLASSES
        assert m["file"] == split["test"][int(m["test_position"])] and m["file"].split("/")[0] == m["label"]
    for m in mistakes:  # each mistake is counted in its confusion-matrix cell
        assert counts[CLASSES.index(m["label"]), CLASSES.index(m["pred"])] >= 1

    check_png(out / run_files.CONFUSION_PNG)
    grid = np.asarray(check_png(out / run_files.MISTAKES_PNG).convert("L"), dtype=np.float64)
    # One picture per mistake, then blank slots: the tile areas (below each caption band) are checked.
    header = grid.shape[0] - (-(-len(mistakes) // rpt.GRID_COLUMNS) * (rpt.TILE + rpt.CAPTION + 6) + 6)
    for slot in range(-(-len(mistakes) // rpt.GRID_COLUMNS) * rpt.GRID_COLUMNS):
        x = 6 + (slot % rpt.GRID_COLUMNS) * (rpt.TILE + 6)
        y = header + 6 + (slot // rpt.GRID_COLUMNS) * (rpt.TILE + rpt.CAPTION + 6) + rpt.CAPTION
        tile = grid[y + 4:y + rpt.TILE - 4, x + 4:x + rpt.TILE - 4]
        assert (tile.std() > 1) == (slot < len(mistakes)), slot  # a blank slot is one colour

    # The terminal summary: baseline vs fine-tuned, the weakest classes by name, where the files are.
    text = proc.stdout
    assert "baseline" in text and "fine-tuned" in text
    weakest = min(CLASSES, key=lambda c: (per_class[c]["accuracy"], per_class[c]["f1"]))
    summary = text[text.index("weakest"):]
    assert weakest in summary
    for name in (run_files.PER_CLASS_CSV, run_files.CONFUSION_PNG, run_files.MISTAKES_PNG, "metrics.json"):
        assert name in summary


def test_run_metrics_match_an_independent_computation(report_run):
    data, out, _ = report_run
    expected = check_against_logits(out, data)  # numpy on the saved model's logits, not our confusion matrix
    assert 0.2 < expected["accuracy"] < expected["top5_accuracy"] <= 1.0


def test_run_logs_the_report_to_wandb(report_run):
    _, out, _ = report_run
    (run,) = wandb_reader.run_dirs(out / "wandb")
    rows = [r for r in wandb_reader.history(run) if "finetuned/per_class/_type" in r]
    assert len(rows) == 1
    row = rows[0]
    assert row["finetuned/per_class/_type"] == "table-file" and row["finetuned/per_class/nrows"] == len(CLASSES)
    table = json.loads((run / "files" / row["finetuned/per_class/path"]).read_text())
    assert table["columns"][:2] == ["class", "support"] and [r[0] for r in table["data"]] == CLASSES
    # W&B's confusion-matrix chart, fed one row per non-zero cell (test_wandb_tracking.py: all 102 classes).
    cells = json.loads((run / "files" / row["finetuned/confusion_matrix_table/path"]).read_text())["data"]
    assert sum(count for _, _, count in cells) == 32 and len(cells) == row["finetuned/confusion_matrix_table/nrows"]
    with Image.open(out / run_files.MISTAKES_PNG) as img:
        assert row["finetuned/mistakes/width"] == img.width
    assert (run / "files" / row["finetuned/confusion_matrix_top/path"]).is_file()


def test_eval_only_gives_the_same_report_from_two_processes(report_run, cache_dir, tmp_path):
    data, out, _ = report_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("wandb"))
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    proc = launch(tiny_args(data, copy, cache_dir, "--resume", "auto", "--eval-only"), nproc=2)
    # --eval-only only reads the run: its results go to eval/model/, every file of the run is unchanged
    assert {p: p_bytes for p, p_bytes in before.items()} == \
        {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file() and "eval" not in p.parts}
    evaluated = copy / "eval" / "model"
    assert read_metrics(evaluated)["eval_only"]["num_processes"] == 2
    one, two = read_csv(out / run_files.PER_CLASS_CSV), read_csv(evaluated / run_files.PER_CLASS_CSV)
    for a, b in zip(one, two, strict=True):
        assert (a["class"], a["support"], a["correct"], a["most_confused_with"]) == \
               (b["class"], b["support"], b["correct"], b["most_confused_with"])
        for key in ("precision", "recall", "f1"):
            assert float(a[key]) == pytest.approx(float(b[key]))
    m1, m2 = read_csv(out / run_files.MISTAKES_CSV), read_csv(evaluated / run_files.MISTAKES_CSV)
    assert [(m["file"], m["pred"]) for m in m1] == [(m["file"], m["pred"]) for m in m2]
    assert [float(m["confidence"]) for m in m1] == pytest.approx([float(m["confidence"]) for m in m2], abs=1e-5)
    assert_close(read_metrics(evaluated)["test"]["per_class"], read_metrics(out)["test"]["per_class"], 1e-6)
    check_png(evaluated / run_files.CONFUSION_PNG)
    check_png(evaluated / run_files.MISTAKES_PNG)
    assert "weakest" in proc.stdout and "baseline" in proc.stdout


def synthetic_outputs(num_classes: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), labels] += 4
    logits[torch.arange(0, n, 5), (labels[::5] + 1) % num_classes] += 8  # class c -> c+1, 1 in 5 images
    logits[torch.arange(0, n, 3), 7] += 12  # many classes -> class 7: the largest confusions
    return {"logits": logits, "labels": labels, "positions": torch.arange(n)}


def test_confusion_matrix_of_102_classes_shows_the_most_confused(tmp_path):
    classes = [f"category_{i:03d}" for i in range(102)]
    report = rpt.build_report(synthetic_outputs(102, 408), classes)
    pairs = report.confused_pairs()
    counts = [c for _, _, c in pairs]
    assert counts == sorted(counts, reverse=True) and all(t != p for t, p, _ in pairs)
    shown = rpt.matrix_classes(report)
    assert len(shown) == rpt.MAX_MATRIX_CLASSES and shown[:2] == [pairs[0][0], pairs[0][1]]
    assert 7 in shown[:2]  # class 7 is where most mistakes go
    rpt.draw_confusion_matrix(report, tmp_path / "cm.png")
    img = check_png(tmp_path / "cm.png")
    assert img.width >= 1200  # 30 named rows and columns plus the list of pairs

    # A perfect model: an empty mistakes grid that says so, still a readable PNG.
    perfect = {"logits": torch.eye(4) * 10, "labels": torch.arange(4), "positions": torch.arange(4)}
    report = rpt.build_report(perfect, ["a", "b", "c", "d"])
    assert report.num_wrong == 0 and report.mistake_positions == []
    rpt.draw_mistakes(report, None, tmp_path / "m.png")
    rpt.draw_confusion_matrix(report, tmp_path / "cm4.png")
    check_png(tmp_path / "m.png")
    check_png(tmp_path / "cm4.png")
