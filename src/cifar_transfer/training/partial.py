"""Cached partial fine-tuning (phases.N.cache_frozen): the frozen bottom of the backbone runs once
per image (and once per mirror image), its output maps are stored, and the phase trains the top
blocks + head on them (models/split.py cuts the model).

Augmentation happens on the maps: `flip` picks each image's stored mirror-image map, `crop`
translates the map by up to CROP_PAD/32 of its size with zero padding (CIFAR's 4-of-32 px pad-
and-crop at map scale). The maps are kept as the bottom outputs them (bf16 under bf16 autocast),
so the top computes from them exactly what the whole model computes from the images: validation
on stored val maps gives the val_acc `evaluate` prints for the bundle.

A cached head-only phase (the probe) before such a phase takes its features from the same maps
(`probe_maps`): top(maps) is backbone(images), so the frozen bottom runs once for the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cifar_transfer.config.augment import MAP_OPS
from cifar_transfer.data.augment import map_shift, translate
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import fingerprint
from cifar_transfer.data.folder import available_memory, fits_memory
from cifar_transfer.data.mixing import Mixed, mix
from cifar_transfer.data.transforms import to_model_input
from cifar_transfer.models.split import Split, TopModel, frozen_split, split_as
from cifar_transfer.system import hardware
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import distributed
from cifar_transfer.training.cached_plan import feeding_phase
from cifar_transfer.training.core import RunCore
from cifar_transfer.training.features import cached_features, weights_fingerprint
from cifar_transfer.training.loop import PhaseInputs
from cifar_transfer.training.plan import PhasePlan


@dataclass
class MapInputs(PhaseInputs):
    """A cached partial phase's inputs: stored bottom maps (train, mirror train, val) and the
    TopModel that trains on them."""

    mirror_x: torch.Tensor | None = None
    net: TopModel | None = None

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored maps are what the top takes."""
        return x

    def train_batch(
        self, idx: torch.Tensor, part: slice, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, Mixed | None]:
        """The batch's maps: each its image's or (flip) its mirror image's, then (crop) moved;
        the draws are per global batch, so every rank and a resumed run see the same."""
        x = self.train_x[idx]
        if "flip" in self.augment and self.mirror_x is not None:
            pick = (torch.rand(len(idx), generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(pick, self.mirror_x[idx], x)
        if "crop" in self.augment:
            x = translate(x, gen, map_shift(x.shape[-1]))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, y = x[part], self.train_y[idx[part]]
        if not (self.mixup or self.cutmix):
            return x, y, None
        mixed = mix(x, y, gen, self.mixup, self.cutmix)
        return mixed.x, mixed.y, mixed


def map_key(backbone: str, bottom_fp: str, split: Split, resolution: int, precision: str,
            data_fp: str) -> str:
    """File stem of a map cache entry: the bottom's weights, where it is cut, size, precision, images."""
    safe = backbone.replace("/", "_")
    return f"{safe}-w{bottom_fp}-maps{split.at}-r{resolution}-{precision}-{data_fp}"


def _in_batches(step: Callable[[slice], torch.Tensor], n: int, batch_size: int, desc: str,
                progress: bool) -> torch.Tensor:
    """torch.cat of step(batch) over n rows taken batch_size at a time, with a progress bar."""
    out = []
    bar = tqdm(total=n, desc=desc, unit="img", mininterval=2, dynamic_ncols=True, disable=not progress)
    for start in range(0, n, batch_size):
        out.append(step(slice(start, start + batch_size)))
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out)


@torch.inference_mode()
def extract_maps(bottom: torch.nn.Module, images: torch.Tensor, plan: PhasePlan, mean, std,
                 batch_size: int, channels_last: bool, desc: str, progress: bool) -> torch.Tensor:
    """bottom(images) batch by batch in eval mode, as the bottom outputs them (dtype included)."""
    bottom.eval()

    def step(batch: slice) -> torch.Tensor:
        x = to_model_input(images[batch], plan.resolution, mean, std, channels_last)
        with hardware.autocast(images.device, plan.precision):
            return bottom(x).contiguous()

    return _in_batches(step, len(images), batch_size, desc, progress)


@torch.inference_mode()
def top_features(top: torch.nn.Module, maps: torch.Tensor, precision: str, batch_size: int,
                 desc: str = "features", progress: bool = False) -> torch.Tensor:
    """top(maps) batch by batch in eval mode, in float32: from a cut's maps, what extract_features
    computes from their images when it runs eagerly at the same batches (tested bit for bit)."""
    top.eval()

    def step(batch: slice) -> torch.Tensor:
        with hardware.autocast(maps.device, precision):
            return top(maps[batch]).float()

    return _in_batches(step, len(maps), batch_size, desc, progress)


def map_shape(bottom: torch.nn.Module, images: torch.Tensor, plan: PhasePlan, mean, std
              ) -> tuple[tuple[int, ...], torch.dtype]:
    """One map's shape and dtype, from one image."""
    return tuple((m := extract_maps(bottom, images[:1], plan, mean, std, 1, False, "", False)).shape[1:]), m.dtype


def check_map_memory(n: int, shape: tuple[int, ...], dtype: torch.dtype, where: str) -> None:
    """Refuse, before extracting, maps that would not fit the memory available."""
    need = n * torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    have = available_memory()
    if not fits_memory(need, have):
        raise UserError(
            f"storing the frozen part's output for {where} takes {need / 2**30:.1f} GiB ({n:,} maps "
            f"of {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}), more than the "
            f"{have / 2**30:.1f} GiB of memory available: freeze more of the backbone (a later "
            f"cut has smaller maps), lower the resolution, or set cache_frozen = false"
        )


def check_maps_fit(run: RunCore, plan: PhasePlan, split: Split) -> tuple[int, ...]:
    """One stored map's shape, after refusing maps that would not fit the memory."""
    d, spec = run.data, run.model.spec
    shape, dtype = map_shape(split.bottom, d.train_x, plan, spec.mean, spec.std)
    n = len(d.train_x) * (2 if "flip" in plan.phase.augment else 1) + len(d.val_x)
    check_map_memory(n, shape, dtype, f"phase {plan.phase.name!r}")
    return shape


def frozen_maps(run: RunCore, plan: PhasePlan, split: Split) -> list[torch.Tensor | None]:
    """[train maps, mirror train maps or None, val maps] from the cache or extracted now.

    Val maps are extracted eagerly (as `evaluate` runs the bundle); rank 0 extracts under torchrun
    while the others wait, then they read the cache.
    """
    cfg, d, spec = run.cfg, run.data, run.model.spec
    mirror = "flip" in plan.phase.augment
    sets = [("train", d.train_x, d.train_y), ("mirrored train", d.train_x.flip(-1) if mirror else None, d.train_y),
            ("val", d.val_x, d.val_y)]
    shape = check_maps_fit(run, plan, split)
    bottom_fp = weights_fingerprint(split.bottom)
    out: list[torch.Tensor | None] = []
    with distributed.main_first():
        for name, x, y in sets:
            if x is None:
                out.append(None)
                continue
            key = map_key(cfg.model.backbone, bottom_fp, split, plan.resolution, plan.precision,
                          fingerprint(x, y))  # fmt: skip

            def extract(images: torch.Tensor, name: str = name) -> torch.Tensor:
                return extract_maps(split.bottom, images, plan, spec.mean, spec.std,
                                    cfg.run.eval_batch_size, cfg.run.channels_last,
                                    f"{name} maps ({split.name} on)", run.log.console)  # fmt: skip

            maps, _ = cached_features(default_cache_dir() / "maps", key, x, extract, shape=shape)
            if cfg.run.channels_last:
                maps = maps.contiguous(memory_format=torch.channels_last)
            out.append(maps)
    return out


def map_inputs(run: RunCore, plan: PhasePlan, weights: torch.Tensor | None = None) -> MapInputs:
    """The cached partial phase's inputs (apply_freeze has run): the model cut at its frozen part;
    `weights` the loss weight per class (data.class_weights = "auto"), as phase_inputs makes them."""
    bad = [op for op in plan.phase.augment if op not in MAP_OPS]
    if bad:  # config validation says so too; a PhaseConfig built in code lands here
        raise UserError(f"phase {plan.phase.name!r}: cache_frozen trains on stored maps, where only "
                        f"{' and '.join(MAP_OPS)} apply, not {', '.join(bad)}")
    split = frozen_split(run.model)
    t0 = time.perf_counter()
    # The maps the probe took its features from (probe_maps), handed on: not read back from the
    # map cache (nor extracted again where the cache could not be written).
    handed = run.handed_maps.pop(plan.index, None)
    train, mirror, val = handed[1] if handed and handed[0] == split.at else frozen_maps(run, plan, split)
    d, spec = run.data, run.model.spec
    run.log.say(f"{plan.phase.name}: the frozen {split.at} of {split.blocks} blocks run once per image; "
                f"training {split.name} on, on stored {'x'.join(map(str, train.shape[1:]))} maps")
    return MapInputs(
        train, d.train_y, val, d.val_y, False, plan.resolution, spec.mean, spec.std,
        plan.phase.augment, run.cfg.run.channels_last, time.perf_counter() - t0, weights,
        mixup=plan.phase.mixup, cutmix=plan.phase.cutmix, mirror_x=mirror, net=TopModel(split, run.model),
    )  # fmt: skip


def maps_phase_for(run: RunCore, plan: PhasePlan) -> PhasePlan | None:
    """The later cache_frozen phase whose stored maps can give cached phase `plan` its features,
    or None (the rule: cached_plan.feeding_phase)."""
    if not plan.cached:
        return None
    later = run.plans[plan.index + 1 :]
    k = feeding_phase(plan.phase, (plan.resolution, plan.precision),
                      [(p.phase, p.maps, (p.resolution, p.precision)) for p in later])
    return None if k is None else later[k]


@dataclass
class StoredMaps:
    """A later cache_frozen phase's maps, held while a cached phase takes its features from them:
    top(maps), the rest of the backbone (its pooling included) in eval mode."""

    later: PhasePlan
    top: torch.nn.Module
    maps: dict[str, torch.Tensor]  # "train", "mirrored train" (when stored), "val"
    seconds: float  # getting them: extracted once, or read from the map cache

    def features(self, images: torch.Tensor, name: str, batch_size: int, progress: bool) -> torch.Tensor:
        """The features of `images` (the set `name`, whose maps these are)."""
        maps = self.maps[name]
        assert len(maps) == len(images), (name, len(maps), len(images))
        return top_features(self.top, maps, self.later.precision, batch_size,
                            f"{name} features (from maps)", progress)  # fmt: skip


def probe_maps(run: RunCore, plan: PhasePlan) -> StoredMaps | None:
    """The maps a later cache_frozen phase stores (into the map cache, and handed to that phase in
    run.handed_maps), for cached phase `plan` to take its features from: the frozen bottom then
    runs once for the whole run. None when maps_phase_for finds no such phase, when it cannot be cut or its maps
    would not fit the memory (that phase says so when it runs): the features are extracted then."""
    later = maps_phase_for(run, plan)
    if later is None:
        return None
    try:
        split = split_as(run.model, later.phase.freeze)
        check_maps_fit(run, later, split)
    except UserError:
        return None
    run.log.say(f"{plan.phase.name}: features from the maps stored for phase {later.phase.name!r} "
                f"(the frozen {split.at} of {split.blocks} blocks run once per image for both; the "
                f"rest of the backbone runs on the maps)")  # fmt: skip
    t0 = time.perf_counter()
    train, mirror, val = frozen_maps(run, later, split)
    run.handed_maps[later.index] = (split.at, [train, mirror, val])  # for map_inputs of `later`
    maps = {"train": train, "val": val} | ({} if mirror is None else {"mirrored train": mirror})
    return StoredMaps(later, split.top, maps, time.perf_counter() - t0)
