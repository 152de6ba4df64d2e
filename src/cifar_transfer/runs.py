"""A finished run's model scored on its own images: `evaluate`, and the predictions `report` draws.

Both go through `predict_split`, so a report and `evaluate --split val` can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cifar_transfer.bundle import load_model
from cifar_transfer.checkpoint import atomic_write_json
from cifar_transfer.evaluate import compute_metrics, predict_logits
from cifar_transfer.hardware import pick_device, pick_precision
from cifar_transfer.rundir import RunSplit, eval_file, load_run_config, run_dir_of, run_split


@dataclass
class Predictions:
    """Model outputs on a split: what the metrics and the report's sample grids are made from."""

    split: RunSplit
    logits: torch.Tensor = field(repr=False)  # float32 (N, classes), on the CPU
    precision: str  # what the forward pass ran at

    @property
    def probs(self) -> torch.Tensor:
        """Softmax probabilities, (N, classes)."""
        return self.logits.softmax(1)


def bundle_precision(meta: dict, run_precision: str, device: torch.device) -> str:
    """The precision the bundle's val_acc was measured at (model.json), else the run's setting."""
    recorded = meta.get("precision")
    if recorded in ("bf16", "fp16", "fp32"):
        return recorded
    return pick_precision(run_precision, device)


def predict_split(run_dir: str | Path, split: RunSplit, tta: bool = False) -> Predictions:
    """Run the bundle once over a split, at the resolution and precision it was validated at."""
    cfg = load_run_config(run_dir)
    device = pick_device(cfg.run.device)
    model, meta = load_model(run_dir, device)
    precision = bundle_precision(meta, cfg.run.precision, device)
    logits = predict_logits(
        model, split.images.to(device), meta["resolution"], meta["mean"], meta["std"],
        cfg.run.eval_batch_size, precision, cfg.run.channels_last, tta=tta,
    )
    return Predictions(split, logits, precision)


def evaluation(preds: Predictions, tta: bool = False) -> dict:
    """compute_metrics plus what the figures were measured on (eval-<split>.json's content)."""
    result = compute_metrics(preds.logits, preds.split.labels)
    result.update({
        "split": preds.split.name, "tta": tta, "precision": preds.precision,
        "data_dir": str(preds.split.data_dir),
    })  # fmt: skip
    return result


def evaluate_run(run_dir: Path, split: str, data_dir: str | None, tta: bool = False) -> dict:
    """Evaluate a run's final model on its validation split or on test_batch; write eval-<split>.json."""
    images = run_split(run_dir, data_dir, split, purpose="evaluate needs")
    result = evaluation(predict_split(run_dir, images, tta), tta)
    path = run_dir_of(run_dir) / eval_file(split)
    atomic_write_json(path, result)
    result["path"] = str(path)
    return result
