"""Logits -> metrics: accuracy, balanced accuracy, per-class precision/recall, confusion matrix.
(The logits themselves come from models/inference.py, the one forward path.)"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cifar_transfer.data.cifar10 import CLASSES


def compute_metrics(
    logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str] = CLASSES
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, mean loss, per-class precision/recall/F1 and the
    confusion matrix (rows = true)."""
    # Imported here, not at module level: scikit-learn (with scipy) takes most of a second to
    # import, which every command start (train, predict, export) would otherwise pay.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = labels.cpu()
    pred = logits.argmax(1)
    y, p = labels.numpy(), pred.numpy()
    classes = list(range(len(names)))
    prec, rec, f1, support = precision_recall_fscore_support(
        y, p, labels=classes, zero_division=0
    )
    return {
        "n": len(labels),
        "accuracy": float((pred == labels).float().mean()) if len(labels) else float("nan"),
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
        # Mean recall over the classes present, and the unweighted mean F1: what imbalanced
        # classes need next to accuracy (a majority-class guesser scores 1/classes on both).
        "balanced_accuracy": float(rec[support > 0].mean()) if support.sum() else float("nan"),
        "macro_f1": float(f1[support > 0].mean()) if support.sum() else float("nan"),
        "classes": list(names),
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y, p, labels=classes).astype(np.int64).tolist(),
    }
