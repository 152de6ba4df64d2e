"""Images in, top-k CIFAR-10 classes out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cifar_transfer.evaluate import predict_logits


@dataclass
class Prediction:
    """Top-k classes of one image, or the reason it could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str = ""


def read_image(path: Path) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32), downscaled the way CIFAR-10 images were made."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def predict_images(
    model: torch.nn.Module, meta: dict, paths: list[str], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Predict every readable image; unreadable ones get their own error and do not stop the rest."""
    results: list[Prediction] = [Prediction(p, []) for p in paths]
    images, ok = [], []
    for i, p in enumerate(paths):
        try:
            images.append(read_image(Path(p)))
            ok.append(i)
        except FileNotFoundError:
            results[i].error = "no such file"
        except IsADirectoryError:
            results[i].error = "is a folder, not an image"
        except (UnidentifiedImageError, OSError, ValueError) as e:
            results[i].error = f"not a readable image ({type(e).__name__})"
    if not images:
        return results
    device = next(model.parameters()).device
    batch = torch.stack(images).to(device)
    logits = predict_logits(
        model, batch, meta["resolution"], meta["mean"], meta["std"], batch_size, "fp32",
        channels_last=False,
    )
    probs = logits.softmax(1)
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    for row, i in enumerate(ok):
        results[i].top = [
            (meta["classes"][int(c)], float(v)) for v, c in zip(values[row], indices[row])
        ]
    return results
