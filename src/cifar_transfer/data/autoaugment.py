"""TrivialAugmentWide and RandAugment per image, batched by op: torchvision.transforms.v2's op
tables and op implementations, with the choices drawn per image from the phase's generator.

torchvision's v2 transforms draw one op and one magnitude per call from torch's global RNG and
apply them to the whole batch: called on a batch, every image gets the same op. Here every image
draws its own op, magnitude bin and sign (TrivialAugmentWide: one op; RandAugment: N rounds of
one op each, at magnitude M), and the images sharing a choice go through v2's op in one call, so
a batch of B images costs at most B op calls (far fewer for RandAugment's fixed magnitude).
"""

from __future__ import annotations

from functools import cache

import torch
from torchvision.transforms import v2

BINS = 31  # torchvision's num_magnitude_bins


@cache
def _policy(kind: str, num_ops: int = 2, magnitude: int = 9) -> v2.Transform:
    """The v2 transform whose op table and op implementations are used (nearest, fill 0)."""
    if kind == "trivial":
        return v2.TrivialAugmentWide(num_magnitude_bins=BINS)
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=BINS)


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide, per image: one op, a magnitude bin in 0..30 and a sign each."""
    b = len(images)
    policy = _policy("trivial")
    op = torch.randint(len(policy._AUGMENTATION_SPACE), (b,), generator=generator)
    bins = torch.randint(BINS, (b,), generator=generator)
    negative = torch.rand(b, generator=generator) <= 0.5
    return _apply(images, policy, op, bins, negative)


def rand_augment(images: torch.Tensor, generator: torch.Generator, num_ops: int, magnitude: int) -> torch.Tensor:
    """RandAugment, per image: `num_ops` rounds, each one op per image (uniform) at bin `magnitude`."""
    b = len(images)
    policy = _policy("randaugment", num_ops, magnitude)
    bins = torch.full((b,), magnitude)
    for _ in range(num_ops):
        op = torch.randint(len(policy._AUGMENTATION_SPACE), (b,), generator=generator)
        negative = torch.rand(b, generator=generator) <= 0.5
        images = _apply(images, policy, op, bins, negative)
    return images


def _apply(
    images: torch.Tensor, policy: v2.Transform, op: torch.Tensor, bins: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """Image i through op[i] at magnitude bin bins[i] (negated where negative[i] and the op is
    signed); one v2 call per distinct (op, magnitude)."""
    h, w = images.shape[-2:]
    space = list(policy._AUGMENTATION_SPACE.items())
    out = images.clone()
    groups: dict[tuple[str, float], list[int]] = {}
    for i, (o, m, neg) in enumerate(zip(op.tolist(), bins.tolist(), negative.tolist(), strict=True)):
        name, (magnitudes_fn, signed) = space[o]
        magnitudes = magnitudes_fn(BINS, h, w)
        value = 0.0 if magnitudes is None else float(magnitudes[m])
        groups.setdefault((name, -value if signed and neg else value), []).append(i)
    for (name, value), members in groups.items():
        if name == "Identity":
            continue
        idx = torch.tensor(members).to(images.device, non_blocking=True)
        out[idx] = policy._apply_image_or_video_transform(
            images[idx], name, value, interpolation=policy.interpolation, fill=policy._fill
        )
    return out
