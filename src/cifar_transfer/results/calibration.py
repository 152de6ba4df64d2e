"""Probabilities a user can trust: temperature scaling and the figures that say how far to trust.

Pure functions of logits and labels (no files, no models), so each is tested on synthetic data:

- temperature scaling and the calibration metrics it is judged by (`fit_temperature`, `nll`,
  `brier`, `ece`, `reliability_bins`) live in models/temperature.py: training fits T too;
- `wilson_interval`: a 95% interval for an accuracy measured on n images;
- `separable_difference`: how far apart two accuracies on n images must be to be told apart;
- `selective` and `coverage_curve`: accuracy on the images a model answers when it abstains
  below a confidence;
- `suspected_label_errors`: images whose given label the model most strongly contradicts
  (confident learning, Northcutt et al. 2021: another class above its per-class threshold);
- `calibration_report`: all of the above for one split, as the JSON `evaluate` writes.
"""

from __future__ import annotations

import math

import torch

from cifar_transfer.models.temperature import (
    BINS,
    brier,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
    scaled,
)
from cifar_transfer.system.errors import UserError

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CURVE_POINTS = 50
SUSPECTS_KEPT = 100  # suspected label errors written to eval-<split>.json
FOLD_SEED = 0


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion hits/n (95% by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def separable_difference(accuracy: float, n: int, z: float = Z95) -> float:
    """The smallest gap between two accuracies near `accuracy`, each on n other images, that a
    two-sided 95% test tells apart: z * sqrt(2 p (1 - p) / n)."""
    if n <= 0:
        return 1.0
    p = min(max(accuracy, 1.0 / n), 1 - 1.0 / n)  # 0% or 100% would claim infinite precision
    return z * math.sqrt(2 * p * (1 - p) / n)


def check_min_confidence(value: float | None) -> None:
    """--min-confidence must be a probability."""
    if value is not None and not 0.0 <= value <= 1.0:  # also refuses nan
        raise UserError(f"--min-confidence {value} is not a probability: use a value from 0 to 1")


def selective(probs: torch.Tensor, labels: torch.Tensor, min_confidence: float) -> dict:
    """Answer only where the top probability is above `min_confidence`: coverage and accuracy.

    Strictly above, so 0 answers every image and 1.0 none (a softmax never exceeds 1).
    """
    conf, pred = probs.max(1)
    kept = conf > min_confidence
    n, answered = len(labels), int(kept.sum())
    hits = int((pred[kept] == labels[kept]).sum())
    lo, hi = wilson_interval(hits, answered)
    return {
        "min_confidence": min_confidence, "n": n, "answered": answered,
        "coverage": answered / n if n else math.nan,
        "accuracy": hits / answered if answered else None,
        "accuracy_ci95": [lo, hi] if answered else None,
    }  # fmt: skip


def coverage_curve(probs: torch.Tensor, labels: torch.Tensor, points: int = CURVE_POINTS) -> list[dict]:
    """Accuracy on the most confident share of images, for `points` shares from 1/points to 1."""
    n = len(labels)
    if not n:
        return []
    conf, pred = probs.max(1)
    order = torch.argsort(conf, descending=True, stable=True)
    hits = (pred[order] == labels[order]).to(torch.float64).cumsum(0)
    out = []
    for i in range(1, points + 1):
        k = max(1, round(n * i / points))
        out.append({"coverage": k / n, "accuracy": float(hits[k - 1] / k),
                    "min_confidence": float(conf[order[k - 1]])})  # fmt: skip
    return out


def suspected_label_errors(probs: torch.Tensor, labels: torch.Tensor, limit: int = SUSPECTS_KEPT) -> list[dict]:
    """Images the model most strongly says are another class than their label, worst first.

    Confident learning's rule: class j's threshold is the mean probability of j over the images
    labelled j; an image is suspect when, of the classes at or above their thresholds, the most
    probable is not its label and is more probable than its label (that class is the
    suggestion). Ranked by p(suggested) - p(given).
    """
    p = probs.detach().to(torch.float64).cpu()
    y = labels.cpu().long()
    n, k = p.shape if p.ndim == 2 else (0, 0)
    if not n:
        return []
    thresholds = torch.full((k,), math.inf, dtype=torch.float64)
    for j in range(k):
        if (y == j).any():
            thresholds[j] = p[y == j, j].mean()
    candidates = torch.where(p >= thresholds, p, torch.full_like(p, -1.0))
    p_other, other = candidates.max(1)
    p_given = p[torch.arange(n), y]
    suspect = torch.nonzero((other != y) & (p_other > p_given)).flatten()
    margin = p_other[suspect] - p_given[suspect]
    order = suspect[torch.argsort(margin, descending=True, stable=True)][:limit]
    return [
        {"index": int(i), "given": int(y[i]), "suggested": int(other[i]),
         "p_given": float(p_given[i]), "p_suggested": float(p_other[i])}
        for i in order
    ]  # fmt: skip


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    probs = logits.softmax(1)
    return {"nll": nll(logits, labels), "brier": brier(probs, labels), "ece": ece(probs, labels),
            "bins": reliability_bins(probs, labels)}  # fmt: skip


def twofold(logits: torch.Tensor, labels: torch.Tensor, seed: int = FOLD_SEED) -> dict | None:
    """ECE where T never saw the images: fit T on one seeded half, measure on the other, and swap.

    `ece_before` / `ece_after` are image-weighted means over the two held-out halves.
    """
    n = len(labels)
    if n < 4:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    before = after = 0.0
    temps = []
    for fit, held in (halves, halves[::-1]):
        t = fit_temperature(logits[fit], labels[fit])
        temps.append(t)
        before += ece(logits[held].softmax(1), labels[held]) * len(held) / n
        after += ece(scaled(logits[held], t).softmax(1), labels[held]) * len(held) / n
    return {"ece_before": before, "ece_after": after, "temperatures": temps, "seed": seed}


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """Calibration of raw `logits` before and after dividing by `temperature`, and the fit a
    2-fold split of these images gives (eval-<split>.json's "calibration")."""
    return {
        "temperature": temperature, "bins": BINS,
        "before": _metrics(logits.float(), labels),
        "after": _metrics(scaled(logits, temperature), labels),
        "fitted_here": fit_temperature(logits, labels),
        "twofold": twofold(logits, labels),
    }


def accuracy_figures(probs: torch.Tensor, labels: torch.Tensor, min_confidence: float | None) -> dict:
    """The interval, abstention and label-error parts of eval-<split>.json."""
    n = len(labels)
    hits = int((probs.argmax(1) == labels).sum()) if n else 0
    suspects = suspected_label_errors(probs, labels, limit=n)
    result = {
        "accuracy_ci95": list(wilson_interval(hits, n)),
        "coverage_curve": coverage_curve(probs, labels),
        "suspected_label_errors_found": len(suspects),
        "suspected_label_errors": suspects[:SUSPECTS_KEPT],
    }
    if min_confidence is not None:
        result["selective"] = selective(probs, labels, min_confidence)
    return result
