"""This machine's measured speeds: short `bench.measure` cells, cached per machine.

What the budget planner, `precision = "auto"` and `cifar-transfer recipes` decide from. A cell
is one (backbone, resolution, precision, mode, batch size, freeze) on one device, timed for about
a second with random-init weights and synthetic images; its images per second are kept in
CACHE_DIR/machine/<machine key>.json, so a machine is measured once per cell (delete the file, or
pass `fresh`, to measure again, e.g. after changing torch or what else runs on the machine).
Speeds measured while other processes keep a CPU busy are used by that run only, never cached:
they would slow every later plan on the machine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cifar_transfer.config import Config, PhaseConfig
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import split_counts
from cifar_transfer.models.backbones import family_of, get_spec
from cifar_transfer.models.families import BackboneFamily
from cifar_transfer.system import hardware
from cifar_transfer.system.atomic import atomic_write_json
from cifar_transfer.training import distributed
from cifar_transfer.training.bench import measure
from cifar_transfer.training.budget import (
    BudgetPlan,
    Candidate,
    Cell,
    measure_cells,
    plan_budget,
)
from cifar_transfer.training.pilot_cost import pilot_cost
from cifar_transfer.training.recipe_price import recipe_seconds

SECONDS = 1.0  # timed per cell (after one untimed warm-up step); at least 2 steps
AUTO_SECONDS, AUTO_BATCH = 0.5, 32  # precision "auto": a quick comparison of two cells
MEASURED_PRECISIONS = ("fp32", "bf16")  # what "auto" chooses between on a CPU
BUSY_CORES = 0.5  # other processes using more than this many cores: speeds measured now not cached


def _cpuinfo(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _kernels() -> str:
    """The instruction sets torch's CPU kernels use: ATen's dispatch level and oneDNN's cap, which
    ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can lower below what the flags offer."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return torch.backends.cpu.get_cpu_capability() + (f", oneDNN {isa.upper()}" if isa else "")


def machine_key(device: torch.device) -> str:
    """What makes measurements comparable: processor or GPU, threads, kernels, torch version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        # The flags too: virtual machines often name every CPU "Intel(R) Xeon(R) Processor".
        what = f"{_cpu_model()} x{torch.get_num_threads()} {_cpuinfo('flags')} {_kernels()}"
    text = f"{what}|{device.type}|torch {torch.__version__}|{platform.machine()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_machine(device: torch.device) -> str:
    """The machine in words, for plans and the recipes table."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads, {_kernels()} kernels"


class Throughputs:
    """Measured images per second by Cell, read from and written to the per-machine cache."""

    def __init__(self, device: torch.device, cache_dir: Path | None = None, fresh: bool = False,
                 seconds: float = SECONDS, weights: str = "none") -> None:
        self.device, self.seconds, self.weights = device, seconds, weights
        self.path = (cache_dir or default_cache_dir()) / "machine" / f"{machine_key(device)}.json"
        self.cells: dict[str, float] = {} if fresh else _read(self.path)
        self.measured_now = 0.0  # seconds this object spent measuring
        self.busy: float | None = None  # others' cores in use, checked before the first measuring
        self.unsaved: set[str] = set()  # cells measured on a busy machine: this object's only

    def get(self, key: Cell, announce: bool = False) -> float:
        """Images per second of `key`: cached, else measured now (and cached)."""
        text = key.text()
        if text not in self.cells:
            if announce and not self.measured_now and distributed.is_main():
                print(f"measuring this machine (once; cached in {self.path})", file=sys.stderr,
                      flush=True)
            if self.busy is None:
                self.busy = self._check_busy()
            # bench seeds torch: a run that measured must draw the same numbers as one that read
            # the cache (resume equals an unbroken run).
            gpus = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=gpus):
                cell = measure(key.backbone, key.resolution, key.precision, key.mode,
                               key.batch_size, self.seconds, self.device, weights=self.weights,
                               freeze=key.freeze)
            self.measured_now += cell.seconds
            self.cells[text] = cell.img_per_s
            if self.busy > BUSY_CORES:
                self.unsaved.add(text)
            self._save()
        return self.cells[text]

    def _check_busy(self) -> float:
        """Others' CPU use now (0 on a GPU, or where it cannot be read); one warning when busy."""
        if self.device.type != "cpu":
            return 0.0
        busy = hardware.others_cpu_use() or 0.0
        if busy > BUSY_CORES and distributed.is_main():
            print(f"warning: other processes are using {busy:.1f} of this machine's "
                  f"{os.cpu_count()} cores: the speeds measured now are slower than this machine "
                  f"is; this run plans with them but does not cache them (a quiet run measures "
                  f"them once for good)", file=sys.stderr, flush=True)
        return busy

    def record(self, key: Cell, img_per_s: float) -> None:
        """Keep a speed a run measured doing real work (e.g. its compiled feature extraction)."""
        if img_per_s > 0 and math.isfinite(img_per_s):
            self.cells[key.text()] = float(img_per_s)
            self._save()

    def _save(self) -> None:
        if not distributed.is_main():
            return
        try:
            kept = {k: v for k, v in self.cells.items() if k not in self.unsaved}
            atomic_write_json(self.path, {"machine": describe_machine(self.device),
                                          "img_per_s": kept})
        except OSError:  # an unwritable cache only costs measuring again next time
            pass


def _read(path: Path) -> dict[str, float]:
    try:
        cells = json.loads(path.read_text()).get("img_per_s", {})
        return {str(k): float(v) for k, v in cells.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def fastest_precision(tput: Throughputs, backbone: str, resolution: int, mode: str,
                      batch_size: int, freeze: str = "none") -> str:
    """The precision that measured fastest for this step on a CPU ("auto"'s meaning there)."""
    speeds = {
        p: tput.get(Cell(backbone, resolution, p, mode, batch_size, freeze))
        for p in MEASURED_PRECISIONS
    }
    return max(speeds, key=lambda p: (speeds[p], p == "fp32"))


def auto_precision(device: torch.device, backbone: str, resolution: int, mode: str,
                   batch_size: int, freeze: str = "none") -> str:
    """Resolve precision "auto": on a CUDA GPU bf16 where supported, else fp16 (with a gradient
    scaler); on a CPU the faster of fp32 and bf16 as measured (cached per machine)."""
    if device.type != "cpu":
        return hardware.pick_precision("auto", device)
    with distributed.main_first():  # rank 0 measures, the others read its cache
        tput = Throughputs(device, seconds=AUTO_SECONDS)
        # Measure small: the ratio is what matters, and a big eval batch makes a slow cell.
        return fastest_precision(tput, backbone, resolution, mode, min(batch_size, AUTO_BATCH), freeze)


# What a budget plans with when no recipe names a backbone: Lite0 on a CPU (fast-cpu's), ResNet50
# on a GPU. A recipe's own backbone and resolution replace these. Lite0 up to its native 224 px:
# a long budget buys resolution rather than more epochs (at 160 px the curve is flat after ~4
# epochs, BENCHMARKS.md); measuring the two larger sizes costs ~20 s of a cold start.
# No "cached" kind here: on CIFAR-10 a 20-minute cached plan (Lite0 160 px, until:blocks4) reached
# 93.84% against its predicted 94.6%: the extraction ran at 0.8x and the epochs at 0.75x the speeds
# it was priced at (BENCHMARKS.md, "Cached partial fine-tuning"). Photo folders, where it won
# (flower_photos 0.9226 vs the probe's 0.8981 held-out), get it through candidates_for.
CPU_CANDIDATE = Candidate("efficientnet_lite0", (128, 160, 192, 224), train_batch=32, infer_batch=64)
GPU_CANDIDATE = Candidate("resnet50", (160, 224), train_batch=128, infer_batch=256)
OVERHEAD_S = {"cpu": 20.0, "cuda": 30.0}  # data load, model build, bundle (outside the phases)


def maps_fit(c: Candidate, resolution: int, precision: str, n_train: int, n_val: int) -> bool:
    """Whether a cached plan's maps (train, mirror train, val) fit the memory check the run makes
    (training/partial.py); the map's shape comes from the model built on the meta device."""
    from cifar_transfer.data.folder import fits_memory

    return fits_memory((2 * n_train + n_val) * _map_values(c.backbone, c.cut, resolution) * (
        2 if precision == "bf16" else 4))


@functools.cache
def _map_values(backbone: str, cut: str, resolution: int) -> int:
    """Values in one stored map of `backbone` cut at `cut` (shapes only: the meta device)."""
    from cifar_transfer.models.split import frozen_split
    from cifar_transfer.models.transfer import apply_freeze, create_model

    with torch.device("meta"):
        model = create_model(backbone, "none", "linear")
        apply_freeze(model, cut)
        return frozen_split(model).bottom.eval()(torch.empty(1, 3, resolution, resolution))[0].numel()


def has_blocks(spec) -> bool:
    """Whether the backbone's family can be cut into blocks (cached partial fine-tuning)."""
    return type(family_of(spec)).blocks is not BackboneFamily.blocks


def candidates_for(cfg: Config, device: torch.device, from_recipe: bool) -> list[Candidate]:
    """The candidates a budget plans among: the recipe's model, or this device's default."""
    gpu = device.type == "cuda"
    precisions = (hardware.pick_precision("auto", device),) if gpu else MEASURED_PRECISIONS
    if not from_recipe:
        c = GPU_CANDIDATE if gpu else CPU_CANDIDATE
        return [dataclasses.replace(c, precisions=precisions)]
    res = cfg.model.resolution or get_spec(cfg.model.backbone).resolution
    batches = [p.batch_size for p in cfg.phases if p.epochs and not p.uses_cache(cfg.run.feature_cache)]
    train_batch = batches[0] if batches else (128 if gpu else 32)
    spec = get_spec(cfg.model.backbone)
    # Cached partial: the last two stages and the head train (Lite: blocks5-6, ResNet: layer4).
    cut = next((f"until:{s}" for s in ("blocks4", "layer3") if s in spec.stages), None)
    kinds = ("partial", "full") + (("cached",) if not gpu and cut and has_blocks(spec) else ())
    # Inference at the recipe's eval batch, capped as the default candidates are: on a 2-core CPU
    # batches of 256 extracted at 0.5-0.8x the speed of 64 (BENCHMARKS.md, issue 24).
    infer_batch = min(cfg.run.eval_batch_size, 256 if gpu else CPU_CANDIDATE.infer_batch)
    return [Candidate(cfg.model.backbone, (res,), train_batch, infer_batch,
                      precisions, kinds, cut or "until:blocks4")]


def plan_this_machine(cfg: Config, budget_s: float, device: torch.device, from_recipe: bool,
                      spent_s: float = 0.0, probe_flips: bool = False,
                      tune: PhaseConfig | None = None) -> tuple[BudgetPlan, dict[str, float]]:
    """Measure what the candidates need (cached per machine), then plan the rest of the budget
    (`probe_flips`: the probe the plan starts with has cached_flips; `tune`: the fine-tuning
    template, whose pilot before it trains is priced).

    Returns the plan and every throughput measured for it (for plan.json).
    """
    candidates = candidates_for(cfg, device, from_recipe)
    tput = Throughputs(device)
    t0 = time.monotonic()
    speeds = measure_cells(candidates, lambda cell: tput.get(cell, announce=True))
    spent_s += time.monotonic() - t0
    for c in candidates:  # what earlier runs here recorded for their compiled feature extraction
        for cell in (Cell(c.backbone, r, p, "extract", cfg.run.eval_batch_size)
                     for r in c.resolutions for p in c.precisions):
            if cell.text() in tput.cells:
                speeds[cell] = tput.cells[cell.text()]
    # The split's size (CIFAR-10/100's 50,000 or a folder's files, counted without decoding).
    n_train, n_val = split_counts(cfg)
    overhead = OVERHEAD_S.get(device.type, 20.0) * min(1.0, (n_train + n_val) / 50_000) + spent_s
    plan = plan_budget(speeds, budget_s, n_train, n_val, candidates, overhead_s=overhead,
                       tta=cfg.run.tta != "off", maps_fit=lambda c, r, p: maps_fit(c, r, p, n_train, n_val),
                       probe_flips=probe_flips, pilot=None if tune is None else (
                           lambda batch: pilot_cost(dataclasses.replace(tune, batch_size=batch), n_train)))
    return plan, {c.text(): v for c, v in speeds.items()}


def recipe_time(cfg: Config, device: torch.device, tput: Throughputs, batch_cap: int = 8) -> float:
    """Predicted wall time of `cfg` on this machine: cells measured small (batches of at most
    `batch_cap`, so a table of every recipe is quick) and cached; "auto" is the faster precision."""
    gpu = device.type == "cuda"

    def speed(cell: Cell) -> float:
        cell = dataclasses.replace(cell, batch_size=min(cell.batch_size, batch_cap))
        precisions = [cell.precision] if cell.precision != "auto" else (
            [hardware.pick_precision("auto", device)] if gpu else MEASURED_PRECISIONS)
        return max(tput.get(dataclasses.replace(cell, precision=p), announce=True) for p in precisions)

    native = get_spec(cfg.model.backbone).resolution
    return recipe_seconds(cfg, speed, native, OVERHEAD_S.get(device.type, 20.0))
