"""Top-5 accuracy and macro precision/recall/F1 checked against an independent computation: plain numpy,
written here from the definitions, never the package's confusion matrix. On synthetic logits with ties,
classes without test images and classes never predicted; the real runs of test_report.py and
test_wandb_tracking.py check their metrics.json the same way (`check_against_logits`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_dist.data import find_image_root, load_image, normalize
from tl_dist.metrics import compute_metrics
from tl_dist.predict import load_model
from tl_dist.report import build_report


def independent_metrics(logits, labels, num_classes: int) -> dict:
    """From the definitions. Top-1: the first highest logit (numpy's argmax, as torch's). Top-5: the label is
    among the first 5 of the classes sorted by logit, ties in class order (a stable sort), which makes
    top-1 the first 1 of the same order. Macro averages: over the classes that have test images."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    pred = logits.argmax(1)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    per_class = {}
    for c in sorted(set(labels.tolist())):
        true_positive = int(np.sum((pred == c) & (labels == c)))
        predicted, support = int(np.sum(pred == c)), int(np.sum(labels == c))
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"support": support, "correct": true_positive, "precision": precision, "recall": recall,
                        "f1": f1}
    return {"loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "accuracy": float(np.mean(pred == labels)),
            "top5_accuracy": float(np.mean((ranked[:, :5] == labels[:, None]).any(1))),
            "precision_macro": float(np.mean([v["precision"] for v in per_class.values()])),
            "recall_macro": float(np.mean([v["recall"] for v in per_class.values()])),
            "f1_macro": float(np.mean([v["f1"] for v in per_class.values()])),
            "per_class": per_class}


def assert_same(ours: dict, expected: dict, per_class_rows: list[dict] | None = None, loss_tol=1e-6) -> None:
    assert ours["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert ours["top5_accuracy"] == pytest.approx(expected["top5_accuracy"], abs=1e-12)
    for key in ("precision_macro", "recall_macro", "f1_macro"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-12), key
    assert ours["mean_class_accuracy"] == pytest.approx(expected["recall_macro"], abs=1e-12)
    assert ours["loss"] == pytest.approx(expected["loss"], rel=loss_tol)
    for row in per_class_rows or []:
        c = row["index"]
        if c in expected["per_class"]:
            want = expected["per_class"][c]
            assert (row["support"], row["correct"]) == (want["support"], want["correct"])
            for key in ("precision", "recall", "f1"):
                assert row[key] == pytest.approx(want[key], abs=1e-12), (row["class"], key)
        else:  # no test images: nothing to average, precision 0 unless predicted
            assert row["support"] == 0 and row["recall"] is None and row["f1"] is None


def synthetic_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """12 classes; labels only from classes 0-8 (9-11 have no test images, 11 is still predicted); class 8
    has images but is never predicted; logits rounded to halves, so ties are everywhere, including whole
    rows of equal logits and ties across the top-5 boundary."""
    g = torch.Generator().manual_seed(seed)
    n, num_classes = 300, 12
    labels = torch.randint(0, 9, (n,), generator=g)
    logits = (torch.randn(n, num_classes, generator=g) * 1.5).round() / 2
    logits[torch.arange(n), labels] += (torch.rand(n, generator=g) < 0.4).float()  # some right answers
    logits[:, 8] = -10  # never predicted
    logits[::7, 11] = 10  # predicted, but no test images
    logits[::11] = 0.5  # every class tied: argmax is class 0, top-5 is classes 0-4
    return logits, labels, num_classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_an_independent_computation_with_ties_and_absent_classes(seed):
    logits, labels, num_classes = synthetic_logits(seed)
    classes = [f"class_{c}" for c in range(num_classes)]
    expected = independent_metrics(logits.numpy(), labels.numpy(), num_classes)
    ours = compute_metrics(logits, labels, classes)
    report = build_report({"logits": logits, "labels": labels, "positions": torch.arange(len(labels))}, classes)
    rows = [{**row, "index": c} for c, row in enumerate(report.per_class())]
    assert_same(ours, expected, rows)
    # The data really has what the test is about.
    ranked = np.argsort(-logits.numpy(), axis=1, kind="stable")
    label_logit = logits[torch.arange(len(labels)), labels]
    assert (logits.numpy() == label_logit.numpy()[:, None]).sum(1).max() > 1, "no ties with the label"
    fifth = logits.numpy()[np.arange(len(labels)), ranked[:, 4]]
    sixth = logits.numpy()[np.arange(len(labels)), ranked[:, 5]]
    assert (fifth == sixth).any(), "no tie across the top-5 boundary"
    assert 0 < expected["top5_accuracy"] < 1 and 0 < expected["accuracy"] < expected["top5_accuracy"]
    assert rows[8]["support"] > 0 and rows[8]["precision"] == 0.0  # never predicted, still averaged
    assert rows[11]["support"] == 0 and sum(r["support"] for r in rows) == len(labels)
    assert set(ours["per_class_accuracy"]) == {f"class_{c}" for c in range(9)}


def test_ties_in_top5_are_ranked_by_class_index():
    logits = torch.zeros(3, 8)  # all tied: the top 5 are classes 0-4
    labels = torch.tensor([4, 5, 0])
    assert compute_metrics(logits, labels, list("abcdefgh"))["top5_accuracy"] == pytest.approx(2 / 3)
    assert compute_metrics(logits, labels, list("abcdefgh"))["accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- real runs


@torch.inference_mode()
def test_split_logits(run_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Logits of the run's test split from its saved model/, the images decoded here (data.load_image,
    as training does), labels from each file's class folder."""
    loaded = load_model(Path(run_dir) / "model")
    model, classes, config = loaded.network, loaded.classes, loaded.config
    split = json.loads((Path(run_dir) / "split.json").read_text())
    root = find_image_root(data_dir)
    images = torch.stack([torch.from_numpy(load_image(root / f, config["image_size"])).permute(2, 0, 1)
                          for f in split["test"]])
    logits = torch.cat([model(normalize(chunk)).float() for chunk in images.split(64)])
    labels = np.array([classes.index(f.split("/")[0]) for f in split["test"]])
    return logits.numpy(), labels, len(classes)


test_split_logits.__test__ = False  # a helper, not a test


def check_against_logits(run_dir: Path, data_dir: Path) -> dict:
    """metrics.json's test section (and its per-class rows) against numpy on the saved model's logits."""
    logits, labels, num_classes = test_split_logits(run_dir, data_dir)
    expected = independent_metrics(logits, labels, num_classes)
    test = json.loads((Path(run_dir) / "metrics.json").read_text())["test"]
    rows = [{**row, "index": c} for c, row in enumerate(test["per_class"])]
    assert_same(test, expected, rows, loss_tol=1e-4)
    return expected
