"""The per-phase plan, resolved once before training: resolution, precision, cached or not.

Every later decision reads the plan; nothing re-resolves "auto" or the resolution fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_transfer.config import Config, PhaseConfig, phase_resolution
from cifar_transfer.training import measure


@dataclass(frozen=True)
class PhasePlan:
    """One phase as it will run."""

    index: int
    phase: PhaseConfig
    resolution: int  # input size the backbone sees
    precision: str  # "bf16", "fp16" or "fp32": extraction, training and validation of this phase
    cached: bool  # the head trains on features extracted once (frozen backbone, no augmentation)
    maps: bool = False  # the top blocks + head train on the frozen bottom's stored maps (cache_frozen)

    @property
    def runs(self) -> bool:
        """False for a phase with epochs = 0 (kept in the recipe, skipped)."""
        return self.phase.epochs > 0


def phase_precision(cfg: Config, phase: PhaseConfig, resolution: int, device: torch.device) -> str:
    """A phase's precision; "auto" is what measured fastest for its step on this machine.

    A phase may run at its own precision: bf16 extraction is 2x faster than fp32 on a bf16 CPU
    while Lite training below 224 px can be faster in fp32 (BENCHMARKS.md), so "auto" measures
    the step the phase runs: inference for a cached phase, the top's training on stored maps for
    a cache_frozen one, training (with its freeze) otherwise.
    """
    precision = phase.precision or cfg.run.precision
    if precision != "auto" or phase.epochs == 0:
        return "fp32" if precision == "auto" else precision
    cached = phase.uses_cache(cfg.run.feature_cache)
    train = "train-maps" if phase.caches_maps(cfg.run.feature_cache) else "train"
    return measure.auto_precision(
        device, cfg.model.backbone, resolution, "infer" if cached else train,
        cfg.run.eval_batch_size if cached else phase.batch_size, "none" if cached else phase.freeze,
    )  # fmt: skip


def plan_phases(cfg: Config, native_resolution: int, device: torch.device) -> list[PhasePlan]:
    """Resolve every phase of `cfg` for this device and backbone."""
    plans = []
    for i, phase in enumerate(cfg.phases):
        resolution = phase_resolution(cfg, phase, native_resolution)
        plans.append(PhasePlan(
            i, phase, resolution, phase_precision(cfg, phase, resolution, device),
            phase.uses_cache(cfg.run.feature_cache), phase.caches_maps(cfg.run.feature_cache),
        ))  # fmt: skip
    return plans
