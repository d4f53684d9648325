"""Classification metrics from the gathered logits of a whole split (no padded duplicates).

Every per-class figure (support, precision, recall, F1) is computed here, once, from the confusion matrix
(`class_scores`); `compute_metrics` averages them for metrics.json and the report (report.py) lists them
per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOP_K = 5


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class ClassScores:
    """Per-class counts and scores (float64, one entry per class) of one confusion matrix."""

    support: torch.Tensor  # test images of the class
    predicted: torch.Tensor  # images predicted as the class
    correct: torch.Tensor
    precision: torch.Tensor  # 0 for a class never predicted
    recall: torch.Tensor  # 0 for a class without test images (see `present`)
    f1: torch.Tensor  # 0 when precision and recall are both 0
    present: torch.Tensor  # bool: support > 0; macro averages are over these classes only


def class_scores(confusion: torch.Tensor) -> ClassScores:
    cm = confusion.double()
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diag()
    zeros = torch.zeros_like(correct)
    recall = torch.where(support > 0, correct / support.clamp(min=1), zeros)
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), zeros)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), zeros)
    return ClassScores(support, predicted, correct, precision, recall, f1, support > 0)


def top_k_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each label ranks among the k highest logits. Ties are ranked by class index, lower first,
    as argmax does (so k = 1 is top-1 accuracy exactly); topk leaves the order of ties unspecified."""
    target = logits.gather(1, labels[:, None])
    ahead = (logits > target) | ((logits == target) & (torch.arange(logits.shape[1]) < labels[:, None]))
    return ahead.sum(1) < k


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Loss, top-1/top-5 accuracy, macro precision/recall/F1 and per-class accuracy.

    Macro averages are over the classes present in the split (support > 0), so that a class with no
    test images does not count as a zero."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    preds = logits.argmax(1)
    scores = class_scores(confusion_matrix(preds, labels, len(classes)))
    present = scores.present
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (preds == labels).double().mean().item(),
        "top5_accuracy": top_k_correct(logits, labels, TOP_K).double().mean().item(),
        "precision_macro": scores.precision[present].mean().item(),
        "recall_macro": scores.recall[present].mean().item(),
        "f1_macro": scores.f1[present].mean().item(),
        "mean_class_accuracy": scores.recall[present].mean().item(),
        "num_samples": int(labels.numel()),
        "per_class_accuracy": {name: scores.recall[c].item() for c, name in enumerate(classes) if present[c]},
    }
