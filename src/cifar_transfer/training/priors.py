"""What `--budget` expects a plan to reach before any run: validation error as a power law of
fine-tuning epochs, scaled by resolution, fitted to this project's measured runs (BENCHMARKS.md).
The planner ranks plans by it; replace the numbers as measured runs come in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


def _scale(table: tuple[tuple[int, float], ...], resolution: int) -> float:
    """`table`'s factor at `resolution`: log-log interpolation between its measured resolutions,
    the nearest segment's slope beyond them."""
    points = sorted(table)
    if len(points) == 1:
        return points[0][1]
    for (r0, f0), (r1, f1) in itertools.pairwise(points):
        if resolution <= r1:
            break
    return f0 * (resolution / r0) ** (math.log(f1 / f0) / math.log(r1 / r0))


@dataclass(frozen=True)
class Prior:
    """Expected validation error (%) of a plan, before any run: err = e1 * epochs^-alpha for
    fine-tuning from the probe's head at 128 px, times the resolution's factor (res_factor); the
    probe's own error at 128 px times probe_res_factor.

    Fitted to EfficientNet-Lite0's measured runs (BENCHMARKS.md): the probe 87.56% at 128 px,
    89.94% at 160 px and 91.04% at 224 px; full fine-tuning (`fast-cpu`, 128 px, cosine) 94.98%
    after 3 epochs and 95.36% after 4; partial (from-layer:100, cosine) at 128 px 92.90% after
    1.39 epochs (`--budget 10m`) and 94.70% after 5 (`seed-from-layer-100`); at 160 px 95.54%
    after 5, 94.82% after 2.09 (`--budget 20m`) and 95.78% after 7.58 (`--budget 60m`), error
    0.80-0.88x of 128 px's; at 224 px 95.90% after 3.57 (`--budget 60m`) and 94.16% after 1
    (`--budget 20m`), 0.72-0.76x. The gain per step of resolution shrinks toward Lite0's native
    224 px, which one power law (tried: exponent 0.77 from 128/160, 0.62 over all) cannot hold.
    They rank plans against each other; they are not a promise: plans within ~0.2 points are
    a tie within one run's noise. Replace them with measured runs as they come.
    """

    probe_err: float = 12.44
    full_e1: float = 6.75
    full_alpha: float = 0.27
    partial_e1: float = 7.65
    partial_alpha: float = 0.23
    res_factor: tuple[tuple[int, float], ...] = ((128, 1.0), (160, 0.84), (224, 0.74))
    probe_res_factor: tuple[tuple[int, float], ...] = ((128, 1.0), (160, 0.809), (224, 0.720))

    # "cached" (cached partial fine-tuning, until:blocks4 on Lite): fitted to its two CIFAR-10
    # runs at 160 px (BENCHMARKS.md, "Cached partial fine-tuning"): `--budget 20m`, 93.64% single
    # view after 1.47 epochs, and `--budget 60m`, 95.78% after 12.04 (both machine B's model).
    # Flatter than the partial curve it took before (7.65, 0.23, which predicted 96.5% for the
    # 60m run): the top (blocks 5-6) alone adapts, on maps whose augmentation is translation and
    # stored mirrors only. Lite0's from-layer:100 cuts at blocks.4.1, two blocks below; on 10,000
    # images, 3 epochs, the cached phase validated 0.8840 / 0.9012 / 0.9006 against the same cut
    # uncached at 0.8806 / 0.8978 / 0.8970: what it buys in a plan is cheaper epochs.
    cached_e1: float = 8.16
    cached_alpha: float = 0.195

    def accuracy(self, kind: str, epochs: float, resolution: int) -> float:
        """Predicted validation accuracy (%) of the probe ("probe") or `epochs` of fine-tuning."""
        err = self.probe_err * _scale(self.probe_res_factor, resolution)
        if kind != "probe" and epochs > 0:
            e1, alpha = {"full": (self.full_e1, self.full_alpha),
                         "cached": (self.cached_e1, self.cached_alpha)}.get(
                kind, (self.partial_e1, self.partial_alpha))
            err = min(err, e1 * epochs ** -alpha * _scale(self.res_factor, resolution))
        return 100.0 - err


PRIORS: dict[str, Prior] = {"default": Prior()}


# Photo folders (issue 31): the CIFAR-10 curves above over-predicted folder runs by 2.7-7.8
# points, because a folder's probe starts elsewhere (0.88-0.96 on the sets measured, against
# CIFAR-10's 87-91%). What carries over is the share of the probe's errors a fine-tune removes:
# measured on validation, flowers 6.98 -> 6.13% (0.88) and 7.16 -> 6.13% (0.86), a 6-class scene
# folder 7.67 -> 6.52% (0.85) (BENCHMARKS.md, "Fine-tuning on photo folders"). The plan states it
# relative to the probe, and the run prints the figure once the probe has validated.
PHOTO_ERR_FACTOR = 0.86
PHOTO_PREDICTION = f"the probe's with ~{1 - PHOTO_ERR_FACTOR:.0%} of its errors fixed"  # plan and run say it


def photo_accuracy(probe_acc: float) -> float:
    """A photo folder's expected val_acc (a fraction) after its fine-tune, from its probe's."""
    return 1.0 - (1.0 - probe_acc) * PHOTO_ERR_FACTOR
