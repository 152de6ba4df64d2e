"""What the cached kind of a `--budget` plan costs (cached partial fine-tuning: the candidate's cut
run once over train, mirror train and val, its maps stored, then epochs of the top on them), as
numbers in, seconds out; budget.py turns the prices into plans. And what a cached plan changes
in the run's config (`cached_phase`, `cached_run`). No torch here.

The probe before a cached phase takes its features from that phase's stored maps when both run
at one precision (training/partial.py, probe_maps): then the probe costs the rest of the
backbone's forward over the maps, not the whole backbone's over the images. Its seconds per
image are the eager inference cell's minus the frozen bottom's (both measured at the candidate's
inference batch), floored at MIN_TOP_SHARE of the whole: a difference of two measurements can
come out near zero or below, and a top is never that cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from cifar_transfer.config import PhaseConfig, RunConfig
from cifar_transfer.config.augment import MAP_OPS

MAP_VAL_SPEEDUP = 3.0  # a top's inference on stored val maps vs its training step (fwd ~ 1/3)
# The least a top costs of the whole backbone's inference, per image. The planned cuts leave far
# more on top (ResNet's layer4 + pool, Lite's blocks 5-6 + conv head): a floor for noise only.
MIN_TOP_SHARE = 0.1



def feeding_phase(probe: PhaseConfig, at: tuple[int, str],
                  later: Sequence[tuple[PhaseConfig, bool, tuple[int, str]]]) -> int | None:
    """Which of the phases after cached phase `probe` (each: its config, whether it stores maps,
    its (resolution, precision)) gives the probe its features from its stored maps, or None: the
    first later phase that runs and stores maps, when it has the probe's resolution and precision
    `at` and stores mirror maps where the probe has cached_flips, with only head-only phases
    between (the backbone then is the one the probe sees). The run (training/partial.py) and a
    recipe's price (training/recipe_price.py) both ask this."""
    for k, (phase, maps, phase_at) in enumerate(later):
        if phase.epochs == 0:
            continue
        if maps:
            return k if phase_at == at and ("flip" in phase.augment or not probe.cached_flips) else None
        if phase.freeze != "all":
            return None  # it trains the backbone: the maps of then are not the features of now
    return None

@dataclass(frozen=True)
class CachedPrice:
    """A cached plan's seconds at one precision, with its probe priced one way."""

    probe_precision: str
    probe_seconds: float
    probe_from_maps: bool  # the probe's features are the top run on the stored maps
    maps_seconds: float  # the frozen bottom once over train, mirror train and val
    epoch_seconds: float  # an epoch of the top on the maps, with its validation
    tta_seconds: float  # flip TTA after the phase: the mirror val images through the whole model


def top_seconds(infer_speed: float, maps_speed: float) -> float:
    """Seconds per image of the top (all of the backbone after the cut) in inference: the whole
    backbone's minus the bottom's, at least MIN_TOP_SHARE of the whole."""
    whole = 1.0 / infer_speed
    return max(whole - 1.0 / maps_speed, MIN_TOP_SHARE * whole)


def cached_prices(precision: str, infer_speed: float, maps_speed: float, train_speed: float,
                  probe: tuple[str, float], fit_s: float, n_train: int, n_val: int, tta: bool,
                  probe_flips: bool) -> list[CachedPrice]:
    """The cached kind at `precision` (img/s of the whole backbone's inference, the bottom's and
    the top's training step there), one price per way the probe can run: on the stored maps at
    this precision (when the whole backbone's inference was measured: 0 = not), and extracting
    its own features at `probe` = (precision, seconds) as priced for the probe alone, when that
    precision is another (at the same one the run takes the maps: that price would not be paid).

    `fit_s`: the L-BFGS sweep's seconds; `probe_flips`: the probe also takes each training
    image's mirror image (cached_flips), so its features cover the mirror maps too.
    """
    maps_s = (2 * n_train + n_val) / maps_speed
    epoch_s = n_train / train_speed + n_val / (MAP_VAL_SPEEDUP * train_speed)
    tta_s = n_val / maps_speed * 1.5 if tta else 0.0  # the mirror images through the whole model
    out = []
    if infer_speed > 0:
        on_maps = top_seconds(infer_speed, maps_speed) * (n_train * (2 if probe_flips else 1) + n_val)
        out.append(CachedPrice(precision, on_maps + fit_s, True, maps_s, epoch_s, tta_s))
    if probe[0] != precision:
        out.append(CachedPrice(probe[0], probe[1], False, maps_s, epoch_s, tta_s))
    return out


def cached_phase(tune: PhaseConfig) -> PhaseConfig:
    """A plan's fine-tuning template as a cached phase: on stored maps its crops (rrc too) become
    map translation; the ops that need pixels, mixup and cutmix are dropped."""
    ops = ["crop" if op.startswith("rrc") else op for op in tune.augment]
    return dataclasses.replace(tune, cache_frozen=True, mixup=0.0, cutmix=0.0, augment=[
        op for i, op in enumerate(ops) if op in MAP_OPS and op not in ops[:i]])


def cached_run(run: RunConfig, infer_batch: int) -> RunConfig:
    """The run settings of a cached plan: inference at the batch it was priced at.

    The maps' extraction is priced at the infer-maps cell, measured at the candidate's inference
    batch (a recipe's eval_batch_size up to 256 on a GPU, 64 on a CPU; the default candidates' own), so
    run.eval_batch_size becomes it (a CIFAR-10 cached plan measured at 64 extracted at 256 at 0.8x
    the priced speed). The probe's features (extracted, or the top on the maps) and every validation
    pass then run at that batch too: the probe was priced at the infer cell of the same batch,
    validation on maps and features is a small part of an epoch, and `evaluate` reads the batch
    from the run's config, so it scores the bundle as the run validated it.
    """
    return dataclasses.replace(run, eval_batch_size=infer_batch or run.eval_batch_size)
