"""Logits -> metrics (accuracy, per-class precision/recall, confusion matrix), with optional flip TTA."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cifar_transfer.data.cifar10 import CLASSES
from cifar_transfer.data.transforms import to_model_input
from cifar_transfer.system import hardware


def batched_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
    precision: str, to_input: Callable[[torch.Tensor], torch.Tensor], tta: bool = False,
    mirrored: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 logits) for each batch of `images`, under autocast: the one forward pass
    that validation and `evaluate` share, so the bundle's val_acc is what `evaluate` prints.
    `tta` averages with the mirror image (the cheapest TTA that pays on CIFAR); `mirrored` scores
    the mirror images alone (a run that has the plain logits already: their mean is the TTA's)."""
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size])
        with hardware.autocast(images.device, precision):
            y = forward(torch.flip(x, dims=[3]) if mirrored else x).float()
            if tta:
                y = (y + forward(torch.flip(x, dims=[3])).float()) / 2
        yield start, y


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    precision: str,
    channels_last: bool = True,
    tta: bool = False,
    mirrored: bool = False,
) -> torch.Tensor:
    """Run the model in eval mode over uint8 images already on its device; float32 logits on CPU
    (of the mirror images with `mirrored`)."""
    was_training = model.training
    model.eval()
    out = [y.cpu() for _, y in batched_logits(
        model.forward, images, batch_size, precision,
        lambda x: to_model_input(x, resolution, mean, std, channels_last), tta, mirrored,
    )]  # fmt: skip
    model.train(was_training)
    dim = out[0].shape[1] if out else 0
    return torch.cat(out) if out else torch.empty(0, dim)


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
