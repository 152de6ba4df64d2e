"""Operations on a finished run dir: re-create its split and evaluate it."""

from __future__ import annotations

from pathlib import Path

from cifar_transfer.bundle import load_model
from cifar_transfer.checkpoint import atomic_write_json
from cifar_transfer.data import load_split, resolve_data_dir, stratified_split
from cifar_transfer.errors import UserError
from cifar_transfer.evaluate import compute_metrics, predict_logits
from cifar_transfer.hardware import pick_device, pick_precision
from cifar_transfer.train import load_run_config


def evaluate_run(run_dir: Path, split: str, data_dir: str | None, tta: bool = False) -> dict:
    """Evaluate a run's final model on its validation split or on test_batch; write eval-<split>.json."""
    cfg = load_run_config(run_dir)
    device = pick_device(cfg.run.device)
    precision = pick_precision(cfg.run.precision, device)
    model, meta = load_model(run_dir, device)
    batches_dir = resolve_data_dir(data_dir or cfg.data.data_dir or None)
    if split == "val":
        x, y = load_split(batches_dir, "train")
        if cfg.data.val_size == 0:
            raise UserError(f"run {run_dir} trained with data.val_size=0: evaluate it with --split test")
        _, val_idx = stratified_split(y, cfg.data.val_size, cfg.data.seed)
        x, y = x[val_idx], y[val_idx]
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
