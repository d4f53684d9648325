"""Classification metrics from the gathered logits of a whole split (no padded duplicates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Loss, top-1/top-5 accuracy, macro precision/recall/F1 and per-class accuracy.

    Macro averages are over the classes present in the split (support > 0), so that a class with no
    test images does not count as a zero."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    num_classes = len(classes)
    preds = logits.argmax(1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    cm = confusion_matrix(preds, labels, num_classes).double()
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diag()
    present = support > 0
    recall = torch.where(present, correct / support.clamp(min=1), torch.zeros_like(correct))
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(correct))
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (preds == labels).double().mean().item(),
        "top5_accuracy": top5.double().mean().item(),
        "precision_macro": precision[present].mean().item(),
        "recall_macro": recall[present].mean().item(),
        "f1_macro": f1[present].mean().item(),
        "mean_class_accuracy": recall[present].mean().item(),
        "num_samples": int(labels.numel()),
        "per_class_accuracy": {classes[c]: recall[c].item() for c in range(num_classes) if present[c]},
    }
