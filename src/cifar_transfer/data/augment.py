"""Batched, seeded augmentation on the device: the ops of `phases.N.augment`, in their order.

Every op takes and returns a uint8 (B,3,H,W) batch on its own device, same shape. Random
parameters are drawn per image on the CPU from the phase's torch.Generator, in a fixed order and
a fixed count per batch, so a restored generator state replays the same augmentation on any
device (resume is bit-exact). Guide: docs/guides/augmentation.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cifar_transfer.config.augment import augment_op, augment_ops
from cifar_transfer.data import autoaugment
from cifar_transfer.system.errors import UserError

CROP_PAD = 4  # the standard CIFAR recipe: 4 px reflect padding, i.e. 9x9 = 81 possible shifts
RRC_TRIES = 10  # torchvision's RandomResizedCrop: 10 draws per image, the first that fits is kept


def augment(images: torch.Tensor, ops: str | Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Batched augmentation of uint8 (B,3,H,W) images on their own device: `ops` in order.

    `ops` is phases.N.augment: a list such as ["rrc", "flip"], "rrc,flip", or an old word
    ("none", "flip", "crop-flip"). A crop directly followed by a flip is one fused gather that
    draws as the old "crop-flip" did (flip, then the shifts), so its results are unchanged.
    """
    try:
        ops = augment_ops(ops)
    except UserError as e:
        raise ValueError(f"unknown augmentation {ops!r}: {e}") from None
    if images.ndim != 4:
        raise ValueError(f"augment expects (B,C,H,W) images, got shape {tuple(images.shape)}")
    if not ops:
        return images
    if generator.device.type != "cpu":  # CPU state is what checkpoints save and restore
        raise ValueError("augment needs a CPU torch.Generator (its state goes into checkpoints)")
    i = 0
    while i < len(ops):
        name, arg = augment_op(ops[i])
        if name == "crop":
            fused = i + 1 < len(ops) and ops[i + 1] == "flip"
            images, i = crop(images, generator, flip=fused), i + 1 + fused
            continue
        if name == "flip":
            images = flip(images, generator)
        elif name == "rrc":
            images = random_resized_crop(images, generator, arg)
        elif name == "jpeg":
            images = jpeg(images, generator, arg)
        elif name == "trivial":
            images = autoaugment.trivial_augment(images, generator)
        else:  # randaugment
            images = autoaugment.rand_augment(images, generator, int(arg[0]), int(arg[1]))
        i += 1
    return images


def flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    b = len(images)
    mirror = (torch.rand(b, generator=generator) < 0.5).to(images.device, non_blocking=True)
    return torch.where(mirror.view(b, 1, 1, 1), images.flip(-1), images)


def _reflect_positions(size: int, pad: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis (size 5, pad 2: 2 1 0 1 2 3 4 3 2)."""
    positions = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def crop(images: torch.Tensor, generator: torch.Generator, flip: bool = False) -> torch.Tensor:
    """Pad-and-crop (4 px reflect padding, a random window of the input size); `flip` also mirrors
    each image with probability 1/2 in the same gather (the old "crop-flip", same draws)."""
    b, c, h, w = images.shape
    device = images.device
    # Drawn on the CPU in a fixed order (flip, then dy, dx): the order the old crop-flip drew in.
    mirror = None
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(device, non_blocking=True)
    shifts = 2 * CROP_PAD + 1
    dy = torch.randint(0, shifts, (b,), generator=generator).to(device, non_blocking=True)
    dx = torch.randint(0, shifts, (b,), generator=generator).to(device, non_blocking=True)
    # Instead of padding then cropping, map every output pixel straight to its source pixel:
    # row i of the crop is padded row dy+i, i.e. source row reflect(dy+i - pad); a flip reads the
    # crop's columns right to left. Two gathers, no per-image loop, any dtype, no padded copy.
    # Built on the device: a blocking host->GPU copy here would stall the GPU every step.
    rows_src = _reflect_positions(h, CROP_PAD, device)
    cols_src = _reflect_positions(w, CROP_PAD, device)
    out_rows = torch.arange(h, device=device)
    out_cols = torch.arange(w, device=device)
    if mirror is not None:
        out_cols = torch.where(mirror[:, None], w - 1 - out_cols, out_cols)  # (B,W)
    rows = rows_src[dy[:, None] + out_rows]  # (B,H)
    cols = cols_src[dx[:, None] + out_cols]  # (B,W)
    out = torch.gather(images, 2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return torch.gather(out, 3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def random_resized_crop(
    images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0)
) -> torch.Tensor:
    """RandomResizedCrop, batched: per image a box of `scale` of the area and aspect ratio in
    [3/4, 4/3] (log-uniform), resized back to the input size (bilinear) with one grid_sample.

    As torchvision: 10 tries per image, the first box that fits is kept, else the whole image.
    Boxes are continuous (sub-pixel), not rounded to whole pixels.
    """
    b, _, h, w = images.shape
    area = torch.empty(b, RRC_TRIES).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b, RRC_TRIES).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    where = torch.rand(b, 2, generator=generator)
    ratio = log_ratio.exp() * h / w  # box width / height in pixels -> in fractions of the sides
    bw, bh = (area * ratio).sqrt(), (area / ratio).sqrt()  # fractions of the width and height
    fits = (bw <= 1) & (bh <= 1)
    first = fits.float().argmax(1, keepdim=True)
    found = fits.any(1)
    bw = torch.where(found, bw.gather(1, first).squeeze(1), torch.ones(b))
    bh = torch.where(found, bh.gather(1, first).squeeze(1), torch.ones(b))
    x0, y0 = where[:, 0] * (1 - bw), where[:, 1] * (1 - bh)
    # affine_grid maps output coordinates in [-1, 1] to input ones: x_in = bw * x_out + shift
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = bw, 2 * x0 + bw - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh, 2 * y0 + bh - 1
    theta = theta.to(images.device, non_blocking=True)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def jpeg(images: torch.Tensor, generator: torch.Generator, quality: tuple[float, ...] = (50, 95)) -> torch.Tensor:
    """Each image re-compressed as a JPEG at a quality drawn uniformly from LO..HI (on the CPU:
    torchvision.io's libjpeg, 4:2:0 chroma; a GPU batch goes there and back). A third value P
    (jpeg:LO-HI:P) re-compresses each image with probability P, the rest stay lossless."""
    with warnings.catch_warnings():  # 0.29 deprecates torchvision.io for torchcodec (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _jpeg(images, generator, quality)


def _jpeg(images: torch.Tensor, generator: torch.Generator, quality: tuple[float, ...]) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    b = len(images)
    qualities = torch.randint(int(quality[0]), int(quality[1]) + 1, (b,), generator=generator).tolist()
    chosen = list(range(b))
    if len(quality) > 2 and quality[2] < 1:  # P = 1 draws nothing more: its results stay as they were
        chosen = torch.nonzero(torch.rand(b, generator=generator) < quality[2]).flatten().tolist()
    if not chosen:
        return images
    cpu = images.cpu()
    # encode_jpeg takes one quality per call, so images sharing a quality are encoded together.
    encoded: dict[int, torch.Tensor] = {}
    for q in sorted({qualities[i] for i in chosen}):
        idx = [i for i in chosen if qualities[i] == q]
        for i, data in zip(idx, encode_jpeg([cpu[i] for i in idx], quality=q), strict=True):
            encoded[i] = data
    decoded = decode_jpeg([encoded[i] for i in chosen])
    out = cpu.clone()
    out[chosen] = torch.stack(decoded)
    return out.to(images.device, non_blocking=True)


# --------------------------------------------------------------------------- stored maps
# Cached partial fine-tuning (training/partial.py) augments the frozen part's output maps.


def map_shift(size: int) -> int:
    """Cells a map of `size` cells may shift: CIFAR's 4 px of 32, at the map's scale (>= 1)."""
    return max(1, round(size * CROP_PAD / 32))


def translate(maps: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Each map moved by up to `shift` cells each way (zero padding: nothing there), one gather."""
    b, _, h, w = maps.shape
    offsets = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).to(maps.device)
    padded = F.pad(maps, (shift, shift, shift, shift))
    rows = (offsets[0].view(b, 1) + torch.arange(h, device=maps.device)).view(b, h, 1)
    cols = (offsets[1].view(b, 1) + torch.arange(w, device=maps.device)).view(b, 1, w)
    out = padded[torch.arange(b, device=maps.device).view(b, 1, 1), :, rows, cols]  # (B,h,w,C)
    return out.permute(0, 3, 1, 2)
