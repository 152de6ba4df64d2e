"""The self-describing model bundle: model.safetensors + model.json, loadable without the recipe."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cifar_transfer.artifacts.rundir import META, WEIGHTS, parse_file, run_dir_of
from cifar_transfer.config import Config
from cifar_transfer.data.cifar10 import CLASSES
from cifar_transfer.system.atomic import atomic_write_json, save_safetensors
from cifar_transfer.system.errors import UserError

FORMAT = "cifar-transfer/1"


def save_bundle(
    model: torch.nn.Module, cfg: Config, out: Path, resolution: int, summary: dict[str, Any]
) -> None:
    """Write the final weights and everything needed to use them (classes, mean/std, ...).

    `resolution` (and `summary`'s `precision`) are what the weights were validated at (the best
    epoch's with keep_best), so `evaluate` scores them as training chose them.
    """
    size = summary.get("storage_size", 32)
    meta = {
        "format": FORMAT,
        "classes": list(CLASSES),
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "pretrained_from": cfg.model.weights,
        "resolution": resolution,
        "input": f"uint8 RGB images (N, 3, {size}, {size}); resized to `resolution` and normalized inside",
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "recipe": cfg.recipe,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **summary,
    }
    save_safetensors(Path(out) / WEIGHTS, model.state_dict(), {"format": FORMAT})
    atomic_write_json(Path(out) / META, meta)


def read_meta(path: Path) -> dict[str, Any]:
    """model.json of a run dir (or beside a model.safetensors file)."""
    meta_path = run_dir_of(path) / META
    meta = parse_file(
        meta_path, json.loads,
        f"no {META} at {meta_path}: pass a finished run dir (train writes {META} at the end)",
        "re-run train or restore the file",
    )  # fmt: skip
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path} is not a cifar-transfer model (format {got!r})")
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{meta_path} {problem}: restore the file the run wrote (or re-run train)")
    return meta


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _meta_problem(meta: dict[str, Any]) -> str:
    """What makes a (hand-edited) model.json unusable, or "" when it is fine."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "has no 'classes' list of names"
    for key in ("backbone", "head"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            return f"has no '{key}' name"
    res = meta.get("resolution")
    if not isinstance(res, int) or isinstance(res, bool) or not 8 <= res <= 4096:
        return f"has resolution {res!r}, expected a whole number of pixels from 8 to 4096"
    for key in ("mean", "std"):
        v = meta.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
            return f"has {key} {v!r}, expected 3 numbers (R, G, B)"
    if not all(x > 0 for x in meta["std"]):
        return f"has std {meta['std']!r}, expected 3 positive numbers"
    t = meta.get("temperature", 1.0)  # absent in bundles from before calibration: T = 1
    if not _is_number(t) or t <= 0:
        return f"has temperature {t!r}, expected a positive number"
    if meta.get("tta", "none") not in ("none", "flip"):  # absent before flip TTA: none
        return f"has tta {meta.get('tta')!r}, expected \"none\" or \"flip\""
    return ""


def temperature_of(meta: dict[str, Any]) -> float:
    """The bundle's fitted temperature; 1.0 (no scaling) for a bundle without one."""
    return float(meta.get("temperature", 1.0))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from a run dir or its model.safetensors, in eval mode.

    The weights are in channels_last memory format, as training (by default) and predict use them;
    it takes NCHW-contiguous and channels_last inputs alike. Its logits are calibrated: divided by
    model.json's temperature (model.temperature; 1.0 when the bundle has none), and the mean of
    the image's and its mirror image's when model.json's tta is "flip" (model.flip_tta).
    """
    from cifar_transfer.models.transfer import create_model

    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    meta = read_meta(path)
    if not weights.is_file():
        raise UserError(f"no weights at {weights}: the run did not finish; resume it with --resume")
    model = create_model(meta["backbone"], "none", meta["head"], num_classes=len(meta["classes"]))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}): re-run train") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{weights} does not fit {meta['backbone']}/{meta['head']} ({first})") from None
    model.temperature = temperature_of(meta)
    model.flip_tta = meta.get("tta") == "flip"
    return model.to(device, memory_format=torch.channels_last).eval(), meta
