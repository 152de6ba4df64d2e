"""Operations on a finished run dir: re-create its split and evaluate it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_transfer.bundle import load_model
from cifar_transfer.checkpoint import atomic_write_json
from cifar_transfer.config import Config
from cifar_transfer.data import load_split, resolve_data_dir, stratified_split
from cifar_transfer.errors import UserError
from cifar_transfer.evaluate import compute_metrics, predict_logits
from cifar_transfer.hardware import pick_device, pick_precision
from cifar_transfer.train import load_run_config


@dataclass
class RunSplit:
    """The images a run is judged on: its own validation split (or test_batch without one)."""

    name: str
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)
    data_dir: Path


def val_split(cfg: Config, batches: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's seeded, stratified validation images and labels, as training drew them."""
    x, y = load_split(batches, "train")
    _, val_idx = stratified_split(y, cfg.data.val_size, cfg.data.seed)
    return x[val_idx], y[val_idx]


def run_split(
    run_dir: str | Path, data_dir: str | None = None, purpose: str = "this needs"
) -> RunSplit:
    """Re-create a run's validation split from its config.toml (test_batch when val_size=0)."""
    run_dir = Path(run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    cfg = load_run_config(run_dir)
    source = data_dir or cfg.data.data_dir or None
    try:
        batches = resolve_data_dir(source)
        if cfg.data.val_size > 0:
            return RunSplit("val", *val_split(cfg, batches), batches)
        x, y = load_split(batches, "test")
        return RunSplit("test", x, y, batches)
    except UserError as e:
        fix = "" if "--data-dir" in str(e) else (
            "; pass --data-dir pointing at the cifar-10-batches-py folder the run trained on")
        raise UserError(f"{purpose} the run's CIFAR-10 images: {e}{fix}") from None


def evaluate_run(run_dir: Path, split: str, data_dir: str | None, tta: bool = False) -> dict:
    """Evaluate a run's final model on its validation split or on test_batch; write eval-<split>.json."""
    cfg = load_run_config(run_dir)
    device = pick_device(cfg.run.device)
    precision = pick_precision(cfg.run.precision, device)
    model, meta = load_model(run_dir, device)
    batches_dir = resolve_data_dir(data_dir or cfg.data.data_dir or None)
    if split == "val":
        if cfg.data.val_size == 0:
            raise UserError(f"run {run_dir} trained with data.val_size=0: evaluate it with --split test")
        x, y = val_split(cfg, batches_dir)
    else:
        x, y = load_split(batches_dir, "test")
    logits = predict_logits(
        model, x.to(device), meta["resolution"], meta["mean"], meta["std"],
        cfg.run.eval_batch_size, precision, cfg.run.channels_last, tta=tta,
    )
    result = compute_metrics(logits, y)
    result.update({"split": split, "tta": tta, "precision": precision, "data_dir": str(batches_dir)})
    path = Path(run_dir) / f"eval-{split}.json"
    atomic_write_json(path, result)
    result["path"] = str(path)
    return result
