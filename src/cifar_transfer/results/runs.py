"""A finished run's model scored on its own images: `evaluate`, and the predictions `report` draws.

Both go through `predict_split`, so a report and `evaluate --split val` can never disagree.
`calibrate_run` fits a run's temperature afterwards (runs trained before calibration existed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cifar_transfer.artifacts.bundle import load_model, read_meta
from cifar_transfer.artifacts.rundir import (
    META,
    RunSplit,
    claim,
    eval_file,
    load_run_config,
    run_dir_of,
    run_split,
)
from cifar_transfer.models import temperature
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.results import calibration
from cifar_transfer.results.evaluate import compute_metrics
from cifar_transfer.system.atomic import atomic_write_json
from cifar_transfer.system.errors import UserError
from cifar_transfer.system.hardware import pick_device, pick_precision


@dataclass
class Predictions:
    """Model outputs on a split: what the metrics and the report's sample grids are made from."""

    split: RunSplit
    logits: torch.Tensor = field(repr=False)  # float32 (N, classes), on the CPU, before scaling
    precision: str  # what the forward pass ran at
    temperature: float = 1.0  # the bundle's: calibrated logits are logits / temperature

    @property
    def calibrated(self) -> torch.Tensor:
        """Logits divided by the temperature: what the bundle's model outputs."""
        return temperature.scaled(self.logits, self.temperature)

    @property
    def probs(self) -> torch.Tensor:
        """Calibrated softmax probabilities, (N, classes)."""
        return self.calibrated.softmax(1)


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
    temperature, model.temperature = model.temperature, 1.0  # raw logits: before and after
    precision = bundle_precision(meta, cfg.run.precision, device)
    logits = predict_logits(
        model, split.images.to(device), meta["resolution"], meta["mean"], meta["std"],
        cfg.run.eval_batch_size, precision, cfg.run.channels_last, tta=tta,
    )
    return Predictions(split, logits, precision, temperature)


def evaluation(preds: Predictions, tta: bool = False, min_confidence: float | None = None) -> dict:
    """compute_metrics plus what the figures were measured on (eval-<split>.json's content),
    calibration before/after the temperature, the accuracy's 95% interval, abstention and
    suspected label errors (calibration.py)."""
    labels = preds.split.labels
    result = compute_metrics(preds.calibrated, labels, preds.split.classes)
    result.update({
        "split": preds.split.name, "tta": tta, "precision": preds.precision,
        "data_dir": str(preds.split.data_dir),
        "calibration": calibration.calibration_report(preds.logits, labels, preds.temperature),
        **calibration.accuracy_figures(preds.probs, labels, min_confidence),
    })  # fmt: skip
    return result


def evaluate_run(
    run_dir: Path, split: str, data_dir: str | None, tta: bool = False,
    min_confidence: float | None = None,
) -> dict:
    """Evaluate a run's final model on its validation split or on test_batch; write eval-<split>.json."""
    calibration.check_min_confidence(min_confidence)
    images = run_split(run_dir, data_dir, split, purpose="evaluate needs")
    result = evaluation(predict_split(run_dir, images, tta), tta, min_confidence)
    path = run_dir_of(run_dir) / eval_file(split)
    atomic_write_json(path, result)
    result["path"] = str(path)
    return result


def calibrate_run(run_dir: Path, data_dir: str | None = None) -> dict:
    """Fit the temperature of a finished run on its validation split and store it in model.json.

    For runs trained before temperature scaling existed (or to re-fit); eval-val.json is
    rewritten from the same predictions. Holds the run's lock while it writes.
    """
    run_dir = run_dir_of(run_dir)
    if load_run_config(run_dir).data.val_size == 0:
        raise UserError(
            f"run {run_dir} trained with data.val_size=0: there are no validation images to fit "
            f"a temperature on (fitting it on the test split would make the test figures optimistic)"
        )
    preds = predict_split(run_dir, run_split(run_dir, data_dir, "val", purpose="calibrate needs"))
    preds.temperature = temperature.fit_temperature(preds.logits, preds.split.labels)
    lock = claim(run_dir, new=False)
    try:
        meta = read_meta(run_dir)
        meta["temperature"] = preds.temperature
        atomic_write_json(run_dir / META, meta)
        result = evaluation(preds)
        atomic_write_json(run_dir / eval_file("val"), result)
    finally:
        lock.release()
    result["path"] = str(run_dir / META)
    result["stale_exports"] = [str(p) for p in (run_dir / "model.onnx", run_dir / "model.pt")
                               if p.is_file()]  # fmt: skip
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def evaluation_lines(result: dict) -> list[str]:
    """What `evaluate` and `calibrate` print: accuracy with its interval, calibration, the
    2-fold check, abstention and the top suspected label errors."""
    lo, hi = result["accuracy_ci95"]
    split, n = result["split"], result["n"]
    tta = " (flip TTA)" if result.get("tta") else ""
    first = (
        f"{split} accuracy {result['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}) on {n} images{tta}; "
        f"balanced accuracy {result['balanced_accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
    )
    lines = [first]
    c = result["calibration"]
    b, a = c["before"], c["after"]
    t = c["temperature"]
    lines.append(
        f"calibration (T {t:.3f}): ECE {b['ece']:.2%} -> {a['ece']:.2%} ({c['bins']} bins), "
        f"NLL {b['nll']:.4f} -> {a['nll']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}"
    )
    if t == 1.0:
        lines.append("  the bundle has no fitted temperature: `cifar-transfer calibrate RUN_DIR` fits one")
    if c["twofold"]:
        f = c["twofold"]
        lines.append(
            f"2-fold check (T fitted on one half of these {n} images, ECE on the other): "
            f"{f['ece_before']:.2%} -> {f['ece_after']:.2%} (T {f['temperatures'][0]:.3f}, "
            f"{f['temperatures'][1]:.3f})"
        )
    s = result.get("selective")
    if s:
        ci = "" if s["accuracy_ci95"] is None else " (95% CI {:.4f}-{:.4f})".format(*s["accuracy_ci95"])
        lines.append(
            f"answering above {s['min_confidence']:g} confidence: coverage {s['coverage']:.2%} "
            f"({s['answered']} of {s['n']} images), selective accuracy "
            f"{_pct(s['accuracy'])}{ci}"
        )
    suspects = result["suspected_label_errors"]
    classes = result["classes"]
    lines.append(f"suspected label errors: {result['suspected_label_errors_found']} (the worst "
                 f"{len(suspects)} in the JSON)" + (", worst:" if suspects else ""))  # fmt: skip
    for e in suspects[:5]:
        lines.append(
            f"  {split} image {e['index']}: labelled {classes[e['given']]} "
            f"({e['p_given']:.3f}), model says {classes[e['suggested']]} ({e['p_suggested']:.3f})"
        )
    return lines
