"""Mixup and CutMix on a batch of model inputs, with the soft targets their loss needs.

As timm's Mixup: one lambda per batch from Beta(alpha, alpha), each image mixed with the image at
the mirrored position of the (already shuffled) batch, and with both set, CutMix or mixup with
probability 1/2 each; CutMix's lambda is corrected to the box's exact area share. The images
mixed are the normalized float inputs after resizing (what timm mixes), so nothing is rounded
to uint8. The draws come from the phase's generator, one seed per batch, so resume is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Mixed:
    """A mixed batch: the images, the dominant label of each, the other label and its weight."""

    x: torch.Tensor
    y: torch.Tensor  # the label with weight lam >= 1/2 (what train accuracy is measured against)
    other: torch.Tensor  # the label mixed in with weight 1 - lam
    lam: float
    box: tuple[int, int, int, int] | None = None  # CutMix: rows y0:y1, columns x0:x1 pasted in

    def targets(self, classes: int) -> torch.Tensor:
        """(B, classes) soft targets: lam on y, 1 - lam on other (rows sum to 1)."""
        return self.lam * F.one_hot(self.y, classes).float() + (1 - self.lam) * F.one_hot(
            self.other, classes
        ).float()


def mix(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, mixup: float, cutmix: float
) -> Mixed:
    """Mixup (alpha `mixup`) or CutMix (alpha `cutmix`) of a (B,C,H,W) float batch; 0 = off."""
    if mixup <= 0 and cutmix <= 0:
        raise ValueError("mix needs mixup > 0 or cutmix > 0")
    # One draw from the phase's generator per batch seeds the rest (numpy has the Beta sampler).
    seed = int(torch.randint(2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    partner_x, partner_y = x.flip(0), y.flip(0)
    box = None
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = np.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        box = (int(y0), int(y1), int(x0), int(x1))
        out = x.clone()
        out[:, :, box[0] : box[1], box[2] : box[3]] = partner_x[:, :, box[0] : box[1], box[2] : box[3]]
        lam = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w)  # the exact area share kept
    else:
        out = torch.lerp(partner_x, x, lam)  # lam * x + (1 - lam) * partner, in one pass
    if lam < 0.5:  # the dominant label first: train accuracy is measured against it
        return Mixed(out, partner_y, y, 1 - lam, box)
    return Mixed(out, y, partner_y, lam, box)
