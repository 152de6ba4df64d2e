"""What a whole recipe costs on this machine (`cifar-transfer recipes`, `train --plan-only` with a
recipe): its phases priced from measured throughputs, phase by phase as the run will do them.

A cached phase (the probe) extracts its features once per resolution, precision and flips; later
cached phases read them back. A cache_frozen phase stores the frozen bottom's maps once, then
trains the top on them. A probe that a later cache_frozen phase's maps can feed (the run's rule,
cached_plan.feeding_phase) costs only the top's forward over those maps.

No torch here: numbers in, seconds out; measure.py supplies the throughputs.
"""

from __future__ import annotations

from collections.abc import Callable

from cifar_transfer.config import Config, PhaseConfig, phase_resolution
from cifar_transfer.data.splits import split_sizes
from cifar_transfer.training.budget import PROBE_FIT_S, Cell
from cifar_transfer.training.cached_plan import MAP_VAL_SPEEDUP, feeding_phase, top_seconds


def _at(cfg: Config, p: PhaseConfig, native: int) -> tuple[int, str]:
    """A phase's (resolution, precision) as the recipe says them ("auto" not resolved)."""
    return phase_resolution(cfg, p, native), p.precision or cfg.run.precision


def maps_phase(cfg: Config, index: int, native: int) -> PhaseConfig | None:
    """The later cache_frozen phase whose stored maps give cached phase `index` its features, or
    None (the run's rule, cached_plan.feeding_phase, on the recipe)."""
    p = cfg.phases[index]
    if not p.uses_cache(cfg.run.feature_cache):
        return None
    later = cfg.phases[index + 1 :]
    k = feeding_phase(p, _at(cfg, p, native),
                      [(q, q.caches_maps(cfg.run.feature_cache), _at(cfg, q, native)) for q in later])
    return None if k is None else later[k]


def recipe_seconds(cfg: Config, speed: Callable[[Cell], float], native: int,
                   overhead_s: float = 0.0) -> float:
    """Predicted wall time of a whole recipe from throughputs (`speed(cell)`: images per second;
    a cell's precision "auto" is for `speed` to resolve). Early stopping can only shorten it."""
    n_train, n_val = split_sizes(cfg)
    total, extracted = overhead_s, set()
    for i, p in enumerate(cfg.phases):
        if p.epochs == 0:
            continue
        res, precision = _at(cfg, p, native)
        infer = speed(Cell(cfg.model.backbone, res, precision, "infer", cfg.run.eval_batch_size))
        if p.uses_cache(cfg.run.feature_cache):
            fit = PROBE_FIT_S * n_train * (len(p.l2_values) / 5 if p.optimizer == "lbfgs" else 0.1)
            images = n_train * (2 if p.cached_flips else 1) + n_val
            later = maps_phase(cfg, i, native)
            if later is not None:  # the top over the maps that phase stores (priced there)
                maps = speed(Cell(cfg.model.backbone, res, precision, "infer-maps",
                                  cfg.run.eval_batch_size, later.freeze))
                total += images * top_seconds(infer, maps) + fit
                continue
            if (res, precision, p.cached_flips) not in extracted:  # later phases read the cache
                extracted.add((res, precision, p.cached_flips))
                total += images / infer
            total += fit
            continue
        epochs = min(p.epochs, p.schedule_epochs or p.epochs)  # a schedule ends the phase
        if p.caches_maps(cfg.run.feature_cache):  # one extraction, then epochs on stored maps
            maps = (n_train * (2 if "flip" in p.augment else 1) + n_val) / speed(
                Cell(cfg.model.backbone, res, precision, "infer-maps", cfg.run.eval_batch_size, p.freeze))
            train = speed(Cell(cfg.model.backbone, res, precision, "train-maps", p.batch_size, p.freeze))
            total += maps + epochs * (n_train + n_val / MAP_VAL_SPEEDUP) / train
            continue
        train = speed(Cell(cfg.model.backbone, res, precision, "train", p.batch_size, p.freeze))
        total += epochs * (n_train / train + n_val / infer)
    return total
