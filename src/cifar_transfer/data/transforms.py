"""Batches on the device: epoch index batches and the resize + normalize step every model input
goes through (training, validation, extraction, evaluate, bench). Augmentation: data/augment.py.

Whole batches, on whatever device the images are on: no per-image PIL pipeline, no workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Index tensors for one epoch; a seeded permutation when shuffle."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def to_model_input(
    images: torch.Tensor,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalized float32 (B,3,R,R), bilinear-resized (no antialias) if R!=H."""
    if images.dtype != torch.uint8:  # a float input here usually means it was normalized twice
        raise ValueError(f"to_model_input expects uint8 images (0..255), got {images.dtype}")
    if images.ndim != 4 or len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"images {tuple(images.shape)} need (B,C,H,W) with C == len(mean) == len(std) "
            f"({len(mean)}, {len(std)})"
        )
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    # Normalizing before resizing gives the same result as after (bilinear weights sum to 1, so
    # the per-channel affine map commutes with it) while touching 49x fewer pixels at 224 px.
    # torch.tensor(..., device=cuda) copies with a stream sync; a non-blocking copy of a small
    # host tensor does not make the host wait for the GPU's queue (the driver stages it at once).
    stats = torch.tensor([mean, std], dtype=torch.float32).to(images.device, non_blocking=True) * 255.0
    shift, scale = stats[0].view(1, -1, 1, 1), stats[1].view(1, -1, 1, 1)
    x = (images.float() - shift) / scale
    if (resolution, resolution) != tuple(images.shape[-2:]):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False
        )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
