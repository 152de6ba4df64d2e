"""Train to a time budget: plan backbone, resolution, precision per phase and fine-tuning epochs
from this machine's measured throughputs (`plan_budget`, a pure function), and turn the plan
into a Config (`apply_plan`).

A plan is always the L-BFGS probe on cached frozen features first (a deployable model in
minutes), then, when time allows, one fine-tuning phase whose cosine schedule ends at the
deadline: the partly frozen kind (`from-layer:100`: the early 57% of the backbone frozen, ~3x
the training speed) or the full one (every layer). Which one, at which resolution and how many
epochs is decided by predicted validation accuracy (PRIORS, below), so more time never gives a
worse plan. The training loop re-checks the pace as it runs (pacing.py).

No torch here: the planner takes numbers and returns numbers; measure.py measures.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cifar_transfer.config import LR_FIND, Config, PhaseConfig
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import cached_plan
from cifar_transfer.training.priors import PRIORS, Prior

FREEZE = {"full": "none", "partial": "from-layer:100"}  # fine-tuning kind -> phase freeze
# "cached": cached partial fine-tuning (phases.N.cache_frozen): the candidate's `cut` frozen, its
# output stored once per image and mirror image, the top trained on the maps (cached_plan.py).
MIN_EPOCHS = 0.25  # less fine-tuning than this is not planned: the probe alone is kept
MARGIN = 0.03  # of the budget, kept free for pace drift (the run re-plans as it goes)
PROBE_FIT_S = 40.0 / 45_000  # L-BFGS sweep seconds per training image (Lite0, 5 penalties)


@dataclass(frozen=True)
class Candidate:
    """A backbone the planner may pick, with the resolutions and batch sizes to consider."""

    backbone: str
    resolutions: tuple[int, ...]
    train_batch: int = 32
    infer_batch: int = 64
    precisions: tuple[str, ...] = ("fp32", "bf16")
    kinds: tuple[str, ...] = ("partial", "full")  # and "cached" where the family has blocks
    cut: str = "until:blocks4"  # the "cached" kind's freeze: what is run once and stored


@dataclass(frozen=True)
class Cell:
    """One measured configuration: a step of `mode` (train or infer); measure.py times it."""

    backbone: str
    resolution: int
    precision: str
    mode: str  # train | infer | extract (a run's compiled feature extraction, recorded by runs)
    batch_size: int
    freeze: str = "none"

    def text(self) -> str:
        """The cell as plan.json and the per-machine cache name it."""
        return (f"{self.backbone}/{self.resolution}px/{self.precision}/{self.mode}"
                f"/bs{self.batch_size}/freeze={self.freeze}")


def cells_needed(candidates: Sequence[Candidate]) -> list[Cell]:
    """Every throughput `plan_budget` may read for these candidates (measure them first)."""
    out = []
    for c in candidates:
        for r in c.resolutions:
            for p in c.precisions:
                out.append(Cell(c.backbone, r, p, "infer", c.infer_batch))
                out += [Cell(c.backbone, r, p, "train", c.train_batch, FREEZE[k]) for k in c.kinds
                        if k != "cached"]
                if "cached" in c.kinds:
                    out += [Cell(c.backbone, r, p, "infer-maps", c.infer_batch, c.cut),
                            Cell(c.backbone, r, p, "train-maps", c.train_batch, c.cut)]
    return out


SLOW_PRECISION = 0.5  # below this fraction of another precision's speed in every step: dropped


def measure_cells(candidates: Sequence[Candidate], speed: Callable[[Cell], float]) -> dict[Cell, float]:
    """The throughputs `plan_budget` reads (cells_needed's), from `speed` (which measures), smaller
    resolutions first. A precision that ran under SLOW_PRECISION x another's speed in every step
    (inference and each training kind) at one size is not measured at the larger ones: it cannot
    win there, and its steps are the slowest to time (bf16 without bf16 instructions runs at
    0.05-0.1x fp32, seconds a step)."""
    out: dict[Cell, float] = {}
    for c in candidates:
        precisions = tuple(c.precisions)
        for r in sorted(c.resolutions):
            got = {cell: speed(cell) for cell in cells_needed(
                [dataclasses.replace(c, resolutions=(r,), precisions=precisions)])}
            out.update(got)
            best: dict[tuple, float] = {}
            for cell, v in got.items():
                step = (cell.mode, cell.batch_size, cell.freeze)
                best[step] = max(best.get(step, 0.0), v)
            precisions = tuple(p for p in precisions if any(
                v >= SLOW_PRECISION * best[cell.mode, cell.batch_size, cell.freeze]
                for cell, v in got.items() if cell.precision == p))
    return out


@dataclass
class BudgetPlan:
    """What the run will do, and why: predictions from the throughputs it was based on."""

    budget_s: float
    backbone: str
    resolution: int
    probe_precision: str
    probe_seconds: float
    kind: str  # "probe" (the probe alone), "partial" or "full"
    finetune_precision: str
    finetune_freeze: str
    train_batch: int
    epochs: float  # fine-tuning epochs, fractional: the schedule ends when the time does
    epoch_seconds: float
    overhead_seconds: float
    predicted_seconds: float
    predicted_val_acc: float  # %, from PRIORS: a ranking, not a promise
    # After fine-tuning, flip TTA's one pass over the mirror validation images (run.tta): the
    # deadline leaves room for it. The prediction above is for the single view.
    tta_seconds: float = 0.0
    maps_seconds: float = 0.0  # "cached": the frozen bottom run once over train, mirror and val
    pilot_seconds: float = 0.0  # the fine-tune's pilot / LR range test before it trains (pilot_cost.py)
    probe_from_maps: bool = False  # "cached": the probe's features are the top on those maps
    infer_batch: int = 0  # the batch the inference cells were measured at (run.eval_batch_size)
    throughputs: dict[str, float] = field(default_factory=dict)  # img/s by cell, as used
    alternatives: list[dict] = field(default_factory=list)  # the other plans considered

    def to_dict(self) -> dict:
        """JSON-ready (plan.json)."""
        return dataclasses.asdict(self)

    def lines(self, prediction: str = "") -> list[str]:
        """The plan in words, one step a line; `prediction` replaces the predicted accuracy's
        words (a photo folder's is relative to its probe: priors.photo_accuracy)."""
        probe = (f"  probe: extract features ({self.probe_precision}) and fit the L-BFGS head, "
                 f"~{format_seconds(self.probe_seconds)}")
        maps = [(f"  store the frozen part's output ({self.finetune_freeze} run once per image and "
                 f"mirror image, {self.finetune_precision}), ~{format_seconds(self.maps_seconds)}")
                ] if self.maps_seconds else []  # fmt: skip
        if self.probe_from_maps:  # first the maps, then the probe on them
            probe = (f"  probe: features from those maps (the rest of the backbone run on them, "
                     f"{self.probe_precision}) and the L-BFGS head, ~{format_seconds(self.probe_seconds)}")
        out = [
            (f"plan for a {format_seconds(self.budget_s)} budget: {self.backbone} at "
             f"{self.resolution} px, predicted val_acc {prediction or f'~{self.predicted_val_acc:.1f}%'} "
             f"in {format_seconds(self.predicted_seconds)}"),
            *(maps + [probe] if self.probe_from_maps else [probe] + maps),
        ]
        if self.kind != "probe" and self.pilot_seconds:
            out.append(f"  pilot: BatchNorm mode and/or learning rate measured on this data before "
                       f"fine-tuning, ~{format_seconds(self.pilot_seconds)}")
        if self.kind != "probe":
            out.append(
                f"  finetune ({self.kind}, freeze {self.finetune_freeze}): {self.epochs:.2f} epochs "
                f"at batch {self.train_batch} in {self.finetune_precision}, "
                f"~{format_seconds(self.epoch_seconds)} each, cosine schedule ending at the deadline"
            )
            if self.tta_seconds:
                out.append(
                    f"  then flip TTA: the mirror images validated once (~{format_seconds(self.tta_seconds)}), "
                    f"bundled if that scores higher (predictions then cost two passes; --set run.tta=off)"
                )
        else:
            out.append("  no fine-tuning: the budget leaves too little time after the probe")
        return out

    def alternative_lines(self) -> list[str]:
        """The other plans weighed, best predicted first (what `--plan-only` adds)."""
        rows = sorted(self.alternatives, key=lambda a: -a["predicted_val_acc"])
        return ["  instead of: " + (
            f"{a['resolution']} px, the probe alone" if a["kind"] == "probe" else
            f"{a['resolution']} px, {a['epochs']:.2f} epochs of {a['kind']} fine-tuning"
        ) + f": ~{a['predicted_val_acc']:.1f}%" for a in rows]


def _fastest(tput: Mapping[Cell, float], cells: list[Cell]) -> tuple[Cell, float]:
    """The fastest of `cells` that was measured (fp32 on a tie)."""
    known = [(c, tput[c]) for c in cells if tput.get(c, 0) > 0]
    if not known:
        raise UserError(f"no throughput measured for {cells[0].text()}: measure it first")
    return max(known, key=lambda cv: (cv[1], cv[0].precision == "fp32"))


def plan_budget(
    throughputs: Mapping[Cell, float], budget_s: float, n_train: int, n_val: int,
    candidates: Sequence[Candidate], overhead_s: float = 0.0,
    priors: Mapping[str, Prior] | None = None, tta: bool = False,
    maps_fit: Callable[[Candidate, int, str], bool] | None = None, probe_flips: bool = False,
    pilot: Callable[[int], tuple[int, int]] | None = None,
) -> BudgetPlan:
    """The plan with the best predicted validation accuracy that fits `budget_s` seconds.

    `maps_fit(candidate, resolution, precision)`: whether a cached plan's stored maps fit this
    machine's memory (measure.py asks the model's shapes); None: assumed to.

    `throughputs` are images per second by Cell (cells_needed lists them); `overhead_s` is what
    the run spends outside the phases (data load, model build, bundle); `tta`: after fine-tuning
    the run scores the mirror validation images once (run.tta), which the plan leaves time for;
    `probe_flips`: the probe takes each training image's mirror image too (cached_flips);
    `pilot(train_batch)`: the (training steps, validation passes) the fine-tune spends measuring
    its settings before it trains (pilot_cost.pilot_cost of its template), priced per plan.
    A budget below the cheapest probe raises one UserError line saying what the probe needs.
    """
    priors = priors or PRIORS
    # What earlier runs on this machine measured their compiled training-feature extraction at
    # (2.2-2.4x the eager infer cell on machine C, BENCHMARKS.md); without one the probe is priced at the eager speed.
    extracted = {(k.backbone, k.resolution, k.precision): (k, v) for k, v in throughputs.items()
                 if k.mode == "extract" and v > 0}

    def extraction_s(infer: Cell) -> float:  # the probe's features: training, then val (eager)
        speed = throughputs[infer]
        key = (infer.backbone, infer.resolution, infer.precision)
        return n_train * (2 if probe_flips else 1) / extracted.get(key, (infer, speed))[1] + n_val / speed

    plans: list[BudgetPlan] = []
    cheapest = math.inf
    for c in candidates:
        prior = priors.get(c.backbone, priors.get("default", Prior()))
        for r in c.resolutions:
            infer_cells = [Cell(c.backbone, r, p, "infer", c.infer_batch) for p in c.precisions]
            _fastest(throughputs, infer_cells)  # one line if none was measured
            infer = min((cell for cell in infer_cells if throughputs.get(cell, 0) > 0),
                        key=lambda cell: (extraction_s(cell), cell.precision != "fp32"))
            infer_speed = throughputs[infer]
            probe_s = extraction_s(infer) + PROBE_FIT_S * n_train
            cheapest = min(cheapest, overhead_s + probe_s)
            left = budget_s * (1 - MARGIN) - overhead_s - probe_s
            if left < 0:
                continue
            base = {"budget_s": budget_s, "backbone": c.backbone, "resolution": r,
                    "probe_precision": infer.precision, "probe_seconds": probe_s,
                    "train_batch": c.train_batch, "overhead_seconds": overhead_s,
                    "infer_batch": c.infer_batch}
            used = {infer.text(): infer_speed}
            if (c.backbone, r, infer.precision) in extracted:
                cell, speed = extracted[c.backbone, r, infer.precision]
                used[cell.text()] = speed
            plans.append(BudgetPlan(
                **base, kind="probe", finetune_precision="", finetune_freeze="", epochs=0.0,
                epoch_seconds=0.0, predicted_seconds=overhead_s + probe_s,
                predicted_val_acc=prior.accuracy("probe", 0, r), throughputs=used))
            pilot_steps, pilot_vals = pilot(c.train_batch) if pilot else (0, 0)
            if "cached" in c.kinds:
                plans += [p for p in _cached_plans(throughputs, c, r, n_train, n_val, left + probe_s,
                                                   (tta, probe_flips), prior, base, used,
                                                   (pilot_steps, pilot_vals))
                          if maps_fit is None or maps_fit(c, r, p.finetune_precision)]
            for kind in (k for k in c.kinds if k != "cached"):
                train, train_speed = _fastest(throughputs, [
                    Cell(c.backbone, r, p, "train", c.train_batch, FREEZE[kind]) for p in c.precisions])
                val_speed = throughputs.get(Cell(c.backbone, r, train.precision, "infer", c.infer_batch))
                # Each epoch's validation pass; the temperature fit at the end reuses the kept
                # epoch's logits, so only flip TTA's pass over the mirror images follows them.
                val_s = n_val / (val_speed or infer_speed)
                epoch_s = n_train / train_speed + val_s
                tta_s = val_s if tta else 0.0
                pilot_s = pilot_steps * c.train_batch / train_speed + pilot_vals * val_s
                epochs = (left - tta_s - pilot_s) / epoch_s
                if epochs < MIN_EPOCHS:
                    continue
                plans.append(BudgetPlan(
                    **base, kind=kind, finetune_precision=train.precision,
                    finetune_freeze=FREEZE[kind], epochs=epochs, epoch_seconds=epoch_s,
                    predicted_seconds=overhead_s + probe_s + pilot_s + epochs * epoch_s + tta_s,
                    predicted_val_acc=prior.accuracy(kind, epochs, r),
                    throughputs={**used, train.text(): train_speed}, tta_seconds=tta_s,
                    pilot_seconds=pilot_s))
    if not plans:
        raise UserError(
            f"a budget of {format_seconds(budget_s)} is below the probe's own cost on this machine "
            f"(~{format_seconds(cheapest)} with {n_train + n_val} images to extract): give "
            f"--budget {format_seconds(math.ceil(cheapest * 1.1 / 60) * 60)} or more, or fewer "
            f"images (--set data.train_limit=N)"
        )
    # Best predicted accuracy; on a tie the simpler, shorter plan.
    best = max(plans, key=lambda p: (round(p.predicted_val_acc, 6), -p.predicted_seconds))
    best.alternatives = [
        {"resolution": p.resolution, "kind": p.kind, "epochs": round(p.epochs, 2),
         "predicted_val_acc": round(p.predicted_val_acc, 2)}
        for p in plans if p is not best
    ]
    return best


def _cached_plans(throughputs: Mapping[Cell, float], c: Candidate, r: int, n_train: int, n_val: int,
                  room: float, flags: tuple[bool, bool], prior: Prior, base: dict, used: dict,
                  pilot: tuple[int, int] = (0, 0)) -> list[BudgetPlan]:  # fmt: skip
    """Cached partial plans at resolution r per measured precision (it rules the one extraction and
    the epochs), the probe on the stored maps at it or extracting at its own (cached_plan.py
    prices both). `room`: the seconds after the overhead; `flags`: (tta, probe_flips); `pilot`:
    the fine-tune's (training steps, validation passes) before it trains, on the maps."""
    plans = []
    for p in c.precisions:
        infer = Cell(c.backbone, r, p, "infer-maps", c.infer_batch, c.cut)
        train = Cell(c.backbone, r, p, "train-maps", c.train_batch, c.cut)
        whole = Cell(c.backbone, r, p, "infer", c.infer_batch)
        speeds = [throughputs.get(cell, 0.0) for cell in (whole, infer, train)]
        if speeds[1] <= 0 or speeds[2] <= 0:
            continue
        for price in cached_plan.cached_prices(p, *speeds, (base["probe_precision"], base["probe_seconds"]),
                                               PROBE_FIT_S * n_train, n_train, n_val, *flags):  # fmt: skip
            pilot_s = pilot[0] * c.train_batch / speeds[2] + pilot[1] * n_val / (
                cached_plan.MAP_VAL_SPEEDUP * speeds[2])
            spent = price.probe_seconds + price.maps_seconds + price.tta_seconds + pilot_s
            epochs = (room - spent) / price.epoch_seconds
            if epochs < MIN_EPOCHS:
                continue
            probe_cells = {whole.text(): throughputs[whole]} if price.probe_from_maps else used
            plans.append(BudgetPlan(
                **{**base, "probe_precision": price.probe_precision, "probe_seconds": price.probe_seconds},
                kind="cached", finetune_precision=p, finetune_freeze=c.cut, epochs=epochs,
                epoch_seconds=price.epoch_seconds, maps_seconds=price.maps_seconds,
                probe_from_maps=price.probe_from_maps,
                predicted_seconds=base["overhead_seconds"] + spent + epochs * price.epoch_seconds,
                predicted_val_acc=prior.accuracy("cached", epochs, r),
                throughputs={**probe_cells, infer.text(): throughputs[infer], train.text(): throughputs[train]},
                tta_seconds=price.tta_seconds, pilot_seconds=pilot_s))  # fmt: skip
    return plans


STRETCH = 1.2  # a budgeted fine-tuning phase may run to this multiple of its planned epochs


def apply_plan(cfg: Config, plan: BudgetPlan, template: list[PhaseConfig]) -> Config:
    """`cfg` with the plan's backbone, resolution and phases: the template's probe phase, then its
    fine-tuning phase (lr scaled linearly with the batch) when the plan fine-tunes."""
    if cfg.model.head != "linear":
        raise UserError(
            f"--budget starts with an L-BFGS probe, which fits a linear head, but model.head is "
            f"{cfg.model.head!r}: add --set model.head=linear"
        )
    probe_t, tune_t = template
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, backbone=plan.backbone, resolution=plan.resolution))
    probe = dataclasses.replace(probe_t, precision=plan.probe_precision, resolution=0)
    cfg.phases = [probe]
    if plan.kind == "cached":  # on stored maps, extracted at the batch they were priced at
        tune_t, cfg.run = cached_plan.cached_phase(tune_t), cached_plan.cached_run(cfg.run, plan.infer_batch)
    if plan.kind != "probe":
        # The cosine is planned for plan.epochs; the pacer may stretch it by up to a fifth when
        # the run is ahead of its plan (the probe took less time than priced, a faster pace).
        epochs = math.ceil(plan.epochs * STRETCH)
        cfg.phases.append(dataclasses.replace(
            tune_t, epochs=epochs, schedule_epochs=plan.epochs, freeze=plan.finetune_freeze,
            precision=plan.finetune_precision,
            batch_size=plan.train_batch,
            lr=tune_t.lr if tune_t.lr == LR_FIND else tune_t.lr * plan.train_batch / tune_t.batch_size,
            resolution=0, early_stop_patience=0,
            warmup_epochs=min(tune_t.warmup_epochs, plan.epochs / 10),
        ))
    cfg.recipe = f"{cfg.recipe}-budget"
    return cfg


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'20m', '90s', '1h30m', '1.5h' or plain seconds -> seconds; a UserError line otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", t)
    if not t or "".join(n + u for n, u in parts) != t or (len(parts) > 1 and not all(u for _, u in parts)):
        raise UserError(f"bad value for --budget: {text!r}: write a duration such as 90s, 20m or 1h30m")
    seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"bad value for --budget: {text!r}: the budget must be more than 0")
    return seconds


def format_seconds(seconds: float) -> str:
    """12 -> '12s', 150 -> '2m30s', 3900 -> '1h05m'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
