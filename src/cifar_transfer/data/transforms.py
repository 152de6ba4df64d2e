"""Batches on the device: epoch index batches, batched augmentation (flip, crop-flip) and the
resize + normalize step every model input goes through (training, validation, extraction,
evaluate, bench).

Whole batches, on whatever device the images are on: no per-image PIL pipeline, no workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cifar_transfer.config import AUGMENTS

_CROP_PAD = 4  # the standard CIFAR recipe: 4 px reflect padding, i.e. 9x9 = 81 possible shifts


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


def _reflect_positions(size: int, pad: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis (size 5, pad 2: 2 1 0 1 2 3 4 3 2)."""
    positions = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Batched augmentation of (B,3,H,W) images on their own device: none, flip, crop-flip."""
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augmentation {mode!r}: use one of {', '.join(AUGMENTS)}")
    if images.ndim != 4:
        raise ValueError(f"augment expects (B,C,H,W) images, got shape {tuple(images.shape)}")
    if mode == "none":
        return images
    if generator.device.type != "cpu":  # CPU state is what checkpoints save and restore
        raise ValueError("augment needs a CPU torch.Generator (its state goes into checkpoints)")
    b, c, h, w = images.shape
    device = images.device
    # Random parameters are drawn on the CPU in a fixed order (flip, then dy, dx), so a restored
    # generator state replays the same augmentation on any device.
    flip = (torch.rand(b, generator=generator) < 0.5).to(device, non_blocking=True)
    if mode == "flip":
        return torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    shifts = 2 * _CROP_PAD + 1
    dy = torch.randint(0, shifts, (b,), generator=generator).to(device, non_blocking=True)
    dx = torch.randint(0, shifts, (b,), generator=generator).to(device, non_blocking=True)
    # Instead of padding then cropping, map every output pixel straight to its source pixel:
    # row i of the crop is padded row dy+i, i.e. source row reflect(dy+i - pad); a flip reads the
    # crop's columns right to left. Two gathers, no per-image loop, any dtype, no padded copy.
    # Built on the device: a blocking host->GPU copy here would stall the GPU every step.
    rows_src = _reflect_positions(h, _CROP_PAD, device)
    cols_src = _reflect_positions(w, _CROP_PAD, device)
    out_rows = torch.arange(h, device=device)
    out_cols = torch.arange(w, device=device)
    rows = rows_src[dy[:, None] + out_rows]  # (B,H)
    cols = cols_src[dx[:, None] + torch.where(flip[:, None], w - 1 - out_cols, out_cols)]  # (B,W)
    out = torch.gather(images, 2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return torch.gather(out, 3, cols.view(b, 1, 1, w).expand(b, c, h, w))


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
