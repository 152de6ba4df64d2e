"""The self-describing model bundle: model.safetensors + model.json, loadable without the recipe."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cifar_transfer.checkpoint import atomic_write_json, save_safetensors
from cifar_transfer.config import Config
from cifar_transfer.data import CLASSES
from cifar_transfer.errors import UserError

FORMAT = "cifar-transfer/1"


def save_bundle(model: torch.nn.Module, cfg: Config, out: Path, summary: dict[str, Any]) -> None:
    """Write the final weights and everything needed to use them (classes, resolution, mean/std)."""
    resolution = cfg.model.resolution or model.spec.resolution
    if cfg.phases:
        resolution = cfg.phases[-1].resolution or resolution
    meta = {
        "format": FORMAT,
        "classes": list(CLASSES),
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "pretrained_from": cfg.model.weights,
        "resolution": resolution,
        "input": "uint8 RGB images (N, 3, 32, 32); resized to `resolution` and normalized inside",
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "recipe": cfg.recipe,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **summary,
    }
    save_safetensors(Path(out) / "model.safetensors", model.state_dict(), {"format": FORMAT})
    atomic_write_json(Path(out) / "model.json", meta)


def read_meta(path: Path) -> dict[str, Any]:
    """model.json of a run dir (or beside a model.safetensors file)."""
    path = Path(path)
    meta_path = path / "model.json" if path.is_dir() else path.with_name("model.json")
    if not meta_path.is_file():
        raise UserError(
            f"no model.json at {meta_path}: pass a finished run dir (train writes model.json at the end)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}): re-run train or restore the file") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a cifar-transfer model (format {meta.get('format')!r})")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from a run dir or its model.safetensors, in eval mode.

    The weights are in channels_last memory format, as training (by default) and predict use them;
    it takes NCHW-contiguous and channels_last inputs alike.
    """
    from cifar_transfer.models import create_model

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
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
    return model.to(device, memory_format=torch.channels_last).eval(), meta
