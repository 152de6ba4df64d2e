"""A fine-tuning phase's data-dependent settings, measured on the run's own data before it trains:
`batchnorm = "auto"` and `lr = "find"` (issue 31).

Whether unfrozen BatchNorm should adapt its statistics to the data ("train") or keep ImageNet's
("eval") depends on the data: a probe's head is fitted to features computed with ImageNet's
statistics, and on photos near ImageNet's letting the top blocks re-estimate them moves the
features out from under the head (flowers: -22 points with no learning at all), while on CIFAR's
upsampled 32 px images adapted statistics gain 4 points in one epoch. So with "auto" the phase
runs a pilot of each mode: its LR (found by the range test with "find", else the phase's), then
the first pilot_cost.PILOT_EPOCHS of the phase's own schedule from the probe's weights, validated; the
better mode is kept (on a tie "eval": it keeps the probe's features). Each pilot starts from the
same weights and is undone after.

The switch: when even the better pilot validates more than SWITCH_BELOW (and SWITCH_IMAGES
validation images' worth) under the probe it started from, fine-tuning as planned would spend the budget making the model worse first; the
phase then trains with BatchNorm frozen at a tenth of its LR, which stays next to the probe
(as the LR goes to 0 the fine-tune is the probe) and moves only as the data pays.

What was chosen is written back into the phase (config.toml: a resumed run does not pilot again),
into RUN/pilot.json (each mode's LR curve and pilot) and into the log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cifar_transfer.artifacts import rundir
from cifar_transfer.config import LR_FIND, PhaseConfig
from cifar_transfer.models.transfer import apply_freeze
from cifar_transfer.recipes import to_toml
from cifar_transfer.system.atomic import atomic_write_json, atomic_write_text
from cifar_transfer.system.errors import UserError
from cifar_transfer.training.core import RunCore
from cifar_transfer.training.loop import PhaseInputs, train_one_epoch, validate
from cifar_transfer.training.lr_find import LRFind, lr_range_test, undone
from cifar_transfer.training.optim import make_optimizer, make_scheduler
from cifar_transfer.training.pilot_cost import pilot_cost, pilot_steps
from cifar_transfer.training.plan import PhasePlan
from cifar_transfer.training.priors import PHOTO_PREDICTION, photo_accuracy

# The better pilot this far under the probe: the switch. 0.3 points (issue 31's tolerance), and at
# least SWITCH_IMAGES validation images' worth: on a few hundred images one image is 0.2-0.3
# points, and a switch on noise would cost the fine-tune its learning rate.
SWITCH_BELOW, SWITCH_IMAGES = 0.003, 3
SWITCH_LR = 0.1  # the switch's share of the eval mode's LR
PILOT_FILE = rundir.PILOT


@dataclass
class Trial:
    """One BatchNorm mode as the pilot measured it."""

    batchnorm: str
    lr: float
    val_acc: float | None = None  # after the pilot steps (None: only one mode, not piloted)
    found: LRFind | None = None  # the range test, when lr = "find"


def needs_pilot(phase: PhaseConfig) -> bool:
    """Whether the phase has a setting to measure before it trains."""
    return phase.batchnorm == "auto" or phase.lr == LR_FIND


def pilot_accuracy(net: torch.nn.Module, forward: torch.nn.Module, inputs: PhaseInputs,
                   phase: PhaseConfig, plan: PhasePlan, eval_batch: int, seed: int) -> float:
    """Validation accuracy after the first pilot_steps of the phase's schedule from `net`'s
    weights, which are put back afterwards (and torch's random state with them)."""
    per_epoch = -(-len(inputs.train_y) // phase.batch_size)
    optimizer = make_optimizer(net, phase)
    scheduler = make_scheduler(optimizer, phase, per_epoch)
    steps, done = pilot_steps(len(inputs.train_y), phase.batch_size), [0]

    def stop() -> bool:
        done[0] += 1
        return done[0] >= steps

    with undone(net, inputs.train_y.device):
        train_one_epoch(forward, net, inputs, phase.batch_size, optimizer, scheduler,
                        torch.Generator().manual_seed(seed), plan.precision, phase.label_smoothing,
                        progress=False, stop=stop)  # fmt: skip
        acc = validate(net, inputs, eval_batch, plan.precision).acc
    return -1.0 if acc is None else acc


def resolve(run: RunCore, plan: PhasePlan, inputs: PhaseInputs, net: torch.nn.Module,
            forward: torch.nn.Module) -> list[Trial]:
    """Measure and fix the phase's "auto" BatchNorm and "find" LR (see the module's docstring);
    the model is left frozen as chosen. Returns the trials, the chosen one first."""
    phase, cfg = plan.phase, run.cfg
    if phase.batchnorm == "auto" and len(inputs.val_y) == 0:
        raise UserError(f"phases.{plan.index}.batchnorm = \"auto\" chooses on the validation split, and "
                        f"this run has none: set data.val_size above 0, or batchnorm to train or eval")
    modes = ("eval", "train") if phase.batchnorm == "auto" else (phase.batchnorm,)
    seed = cfg.run.seed * 1_000 + 101 * (plan.index + 1)  # the pilot's own draws, not the run's
    probe = run.log.best.acc  # what the phase starts from: the best validated so far (the probe)
    what = [w for w, on in (("BatchNorm's mode (eval, train)", len(modes) > 1),
                            ("the learning rate", phase.lr == LR_FIND)) if on]
    steps, _ = pilot_cost(phase, len(inputs.train_y))
    run.log.say(f"{phase.name}: measuring {' and '.join(what)} on this data before training "
                f"(up to {steps} steps)")
    trials = []
    for mode in modes:
        apply_freeze(run.model, phase.freeze, mode)
        trial = Trial(mode, phase.lr if phase.lr != LR_FIND else 0.0)
        if phase.lr == LR_FIND:
            trial.found = lr_range_test(net, forward, inputs, phase, plan.precision, seed)
            trial.lr = trial.found.pick
            if not trial.lr > 0:
                raise UserError(f"phase {phase.name!r}: the LR range test found no learning rate "
                                f"(the loss never fell): set phases.{plan.index}.lr to a number")
        if len(modes) > 1:
            tried = dataclasses.replace(phase, lr=trial.lr, batchnorm=mode)
            trial.val_acc = pilot_accuracy(net, forward, inputs, tried, plan, cfg.run.eval_batch_size, seed)
        trials.append(trial)
    chosen = max(trials, key=lambda t: (t.val_acc if t.val_acc is not None else 0.0, t.batchnorm == "eval"))
    margin = max(SWITCH_BELOW, SWITCH_IMAGES / max(1, len(inputs.val_y)))
    switched = len(modes) > 1 and probe >= 0 and chosen.val_acc is not None and chosen.val_acc < probe - margin
    if switched:
        frozen = next(t for t in trials if t.batchnorm == "eval")
        chosen = Trial("eval", frozen.lr * SWITCH_LR)
    trials = [chosen] + [t for t in trials if t is not chosen]
    apply_freeze(run.model, phase.freeze, chosen.batchnorm)
    phase.batchnorm, phase.lr = chosen.batchnorm, float(chosen.lr)
    _report(run, plan, trials, probe, switched)
    return trials


def _report(run: RunCore, plan: PhasePlan, trials: list[Trial], probe: float, switched: bool) -> None:
    """The choice in the log (one line each), RUN/pilot.json, and the resolved config.toml."""
    name, chosen = plan.phase.name, trials[0]
    for t in trials:
        if t.found is not None:
            f = t.found
            why = ("valley: halfway down the longest fall" if f.rule == "valley" else
                   "a decade below where the loss turns up: the curve has no real fall")
            run.log.say(f"{name}: LR range test ({t.batchnorm} BatchNorm, {len(f.lrs)} steps): lr "
                        f"{f.pick:.2e} ({why}; valley {f.valley:.2e}, edge {f.edge:.2e}, min/10 "
                        f"{f.minimum_tenth:.2e}, steepest {f.steepest:.2e})")
    piloted = [t for t in trials if t.val_acc is not None]
    steps = pilot_steps(len(run.data.train_y), plan.phase.batch_size) if piloted else 0
    if piloted:
        scores = ", ".join(f"{t.batchnorm} {t.val_acc:.4f} at lr {t.lr:.2e}" for t in piloted)
        against = f" (the probe: {probe:.4f})" if probe >= 0 else ""
        if switched:
            run.log.say(f"{name}: pilot of {steps} steps each validated below the probe ({scores}"
                        f"{against}): fine-tuning with BatchNorm frozen at a tenth of its lr, "
                        f"{chosen.lr:.2e}, which stays by the probe and moves as the data pays")
        else:
            run.log.say(f"{name}: BatchNorm {chosen.batchnorm}: the pilot of {steps} steps each "
                        f"validated {scores}{against}")
    if probe >= 0 and run.data.kind == "folder" and not switched:  # the plan's figure, now that the probe has one
        run.log.say(f"{name}: expected after fine-tuning: val_acc ~{photo_accuracy(probe):.4f} = "
                    f"{PHOTO_PREDICTION} ({probe:.4f}), as on the photo folders measured")
    if run.main:
        atomic_write_json(run.out / PILOT_FILE, {
            "phase": plan.index, "batchnorm": chosen.batchnorm, "lr": chosen.lr, "switched": switched,
            "probe_val_acc": probe if probe >= 0 else None,
            "pilot_steps": steps,
            "trials": [{"batchnorm": t.batchnorm, "lr": t.lr, "val_acc": t.val_acc,
                        "lr_find": t.found.to_dict() if t.found else None} for t in trials],
        })  # fmt: skip
        atomic_write_text(run.out / rundir.CONFIG, to_toml(run.cfg))
