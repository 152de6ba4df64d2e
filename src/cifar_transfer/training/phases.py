"""One phase run against a RunCore: gradient steps (run_phase) or the L-BFGS probe
(run_probe_phase), on raw images or on the frozen backbone's cached features (frozen_features).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import TrainState
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import class_weights, fingerprint
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import distributed, partial, pilot
from cifar_transfer.training.averaging import WeightAverage
from cifar_transfer.training.budget import Cell
from cifar_transfer.training.core import RunCore
from cifar_transfer.training.features import (
    cache_key,
    cached_features,
    extract_features,
    should_compile,
    weights_fingerprint,
)
from cifar_transfer.training.loop import Diverged, PhaseInputs, train_one_epoch, validate
from cifar_transfer.training.measure import Throughputs
from cifar_transfer.training.optim import make_optimizer, make_scheduler
from cifar_transfer.training.pacing import Deadline, Pacer
from cifar_transfer.training.plan import PhasePlan
from cifar_transfer.training.probe import ProbeFit, sweep


def run_phase(run: RunCore, plan: PhasePlan, inputs: PhaseInputs, resume: TrainState | None) -> None:
    """Train one gradient phase from its start or from the checkpointed epoch inside it."""
    phase, model, log = plan.phase, run.model, run.log
    # What trains: the head on cached features, the top + head on stored maps, or the model.
    net = model.head if plan.cached else getattr(inputs, "net", None) or model
    forward = net
    if distributed.world_size() > 1:  # a new wrapper per phase: each phase trains other parameters
        forward = DistributedDataParallel(net, device_ids=[run.device] if run.device.type == "cuda" else None)
    if run.cfg.run.compile and net is model:
        forward = torch.compile(forward)
    if pilot.needs_pilot(phase):  # batchnorm "auto", lr "find": measured here, written back
        pilot.resolve(run, plan, inputs, net, forward)
    optimizer = make_optimizer(net, phase)
    steps_per_epoch = -(-len(inputs.train_y) // phase.batch_size)
    scheduler = make_scheduler(optimizer, phase, steps_per_epoch)
    scaler = torch.amp.GradScaler(run.device.type) if plan.precision == "fp16" else None
    # run.ema: the average of what trains, validated beside the raw weights (averaging.py).
    ema = WeightAverage(net, run.cfg.run.ema) if run.cfg.run.ema > 0 else None
    start, stale = 0, 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
        start, stale = resume.phase_epoch, resume.stale
    validated = model if net is model else net  # the head or top on stored inputs
    use_avg = False  # the last epoch's average validated better than the raw weights
    best_here = log.phase_best(plan.index)
    pacer = None
    schedule = getattr(scheduler, "lr_lambdas", [None])[0]
    schedule = schedule if hasattr(schedule, "refit") else None
    shortened = schedule is not None and schedule.total < phase.epochs * steps_per_epoch
    if run.deadline is not None or shortened:
        # A budgeted run: the schedule ends at the deadline. Resumed without one, the phase
        # still ends where its shortened schedule does.
        pacer = Pacer(run.deadline or Deadline(math.inf), schedule, steps_per_epoch,
                      len(inputs.val_y), phase.batch_size, scheduler.last_epoch)
    for epoch in range(start, phase.epochs):
        try:
            fit = train_one_epoch(
                forward, net, inputs, phase.batch_size, optimizer, scheduler, run.gen,
                plan.precision, phase.label_smoothing, ema.model if ema is not None else None,
                f"{phase.name} {epoch + 1}/{phase.epochs}", log.console, pacer, scaler,
            )  # fmt: skip
        except Diverged as e:
            raise UserError(
                f"loss became {e.loss} in phase {phase.name!r} epoch {epoch + 1}: lower the lr "
                f"({phase.lr}); the last good checkpoint is {run.out / rundir.LAST}"
            ) from None
        t_val = time.perf_counter()
        checked = validate(validated, inputs, run.cfg.run.eval_batch_size, plan.precision)
        averaged = {}
        if ema is not None:
            raw, avg = checked, validate(ema.module, inputs, run.cfg.run.eval_batch_size, plan.precision)
            use_avg = _better(avg, raw, run.cfg.run.select_by)
            checked = avg if use_avg else raw
            averaged = {"val_acc_raw": raw.acc, "val_acc_ema": avg.acc, "ema_kept": use_avg}
        val_loss, val_acc, val_balanced, val_logits = checked
        row = log.row(
            plan, epoch + 1, train_loss=fit.loss, train_acc=fit.acc, val_loss=val_loss,
            val_acc=val_acc, lr=optimizer.param_groups[0]["lr"], img_per_s=fit.seen / fit.seconds,
            seconds=fit.seconds, val_balanced_acc=val_balanced, **averaged,
        )  # fmt: skip
        if (plan.cached or plan.maps) and epoch == start:
            row.update(inputs.extract_fields())
        log.log(row, phase.epochs, f" (EMA {averaged['val_acc_ema']:.4f}, raw {averaged['val_acc_raw']:.4f})"
                if averaged and averaged["val_acc_ema"] is not None else "")  # fmt: skip
        with ema.swapped_in() if use_avg else contextlib.nullcontext():
            run.keep_if_best(row, plan, model)
        run.ended_on(val_acc, plan)
        run.keep_logits(row["epoch"], val_logits)
        score = log.score(row)
        if score is not None:
            stale = 0 if score > best_here else stale + 1
            best_here = max(best_here, score)
        stop = bool(phase.early_stop_patience) and stale >= phase.early_stop_patience
        # A budgeted phase ends when its (maybe shortened) schedule does, or at the deadline.
        timed_out = pacer is not None and pacer.finished()
        done = stop or timed_out or epoch + 1 == phase.epochs
        if done and use_avg:  # later phases and the final model go on from the better of the two
            ema.adopt()
        run.checkpoint(plan, epoch + 1, done, stale, optimizer, scheduler, ema)
        if pacer is not None:  # what every epoch end costs: validation, best file, checkpoint
            pacer.validated(time.perf_counter() - t_val)
        if stop:
            log.say(f"early stop: {phase.name} had no val_acc gain for {stale} epochs")
            break
        if timed_out and epoch + 1 < phase.epochs:
            log.say(f"budget: {phase.name} ended after {pacer.step} steps ({pacer.step / steps_per_epoch:.2f} "
                    f"epochs; its schedule's end moved to fit the deadline {pacer.refits} times)")
            break


def _better(avg, raw, select_by: str) -> bool:
    """Whether the average's validation beats the raw weights' (by what run.select_by ranks)."""
    key = "balanced" if select_by == "balanced_accuracy" else "acc"
    a, r = getattr(avg, key), getattr(raw, key)
    return a is not None and r is not None and a > r


def _recording(extract: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
               cell: Cell) -> Callable[[torch.Tensor], torch.Tensor]:
    """`extract`, its images per second kept in this machine's measurement cache (measure.py)."""

    def timed(images: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        feats = extract(images)
        if distributed.is_main():
            Throughputs(device).record(cell, len(images) / (time.perf_counter() - t0))
        return feats

    return timed


def frozen_features(
    run: RunCore, plan: PhasePlan, stored: partial.StoredMaps | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Cached frozen-backbone features: (train features, their labels, val features, seconds).

    With the phase's `cached_flips` the training rows are each image's features followed by its
    mirror image's (labels repeated), so a head trained on them sees flip augmentation.

    With `stored` (partial.probe_maps: a later phase's stored maps) a feature missing from the
    cache is the top of the backbone run on its image's map instead of the whole backbone run on
    the image (the same numbers), and is cached under the same key.

    Under torchrun rank 0 extracts them into the cache while the others wait, then they read
    them (a rank that cannot see rank 0's cache folder, e.g. on another machine, extracts too).
    """
    cfg, data = run.cfg, run.data
    # (name, images, labels, may compile): validation features are extracted eagerly, as
    # `evaluate` runs the bundle (compiled, BN-folded bf16 numerics moved a val_acc 0.3 points).
    sets = [("train", data.train_x, data.train_y, True), ("val", data.val_x, data.val_y, False)]
    if plan.phase.cached_flips:
        sets.insert(1, ("mirrored train", data.train_x.flip(-1), data.train_y, True))
    out, seconds = [], 0.0 if stored is None else stored.seconds
    backbone_fp = weights_fingerprint(run.model.backbone)  # as it is now: maybe fine-tuned
    with distributed.main_first():
        for name, x, y, may_compile in sets:
            key = cache_key(
                cfg.model.backbone, backbone_fp, cfg.model.head, plan.resolution,
                plan.precision, fingerprint(x, y),
            )  # fmt: skip
            compiled = stored is None and may_compile and should_compile(cfg.run.compile_features, len(x))
            extract = functools.partial(
                extract_features, run.model, resolution=plan.resolution,
                batch_size=cfg.run.eval_batch_size, precision=plan.precision,
                channels_last=cfg.run.channels_last, desc=f"{name} features",
                compile_model=compiled, progress=run.log.console,
            )  # fmt: skip
            if stored is not None:  # the top on the maps, eagerly (as val features always are)
                extract = functools.partial(stored.features, name=name, batch_size=cfg.run.eval_batch_size,
                                            progress=run.log.console)  # fmt: skip
            if compiled:  # its speed, compile included, prices the next --budget's probe here
                extract = _recording(extract, run.device, Cell(
                    cfg.model.backbone, plan.resolution, plan.precision, "extract",
                    cfg.run.eval_batch_size))
            feats, s = cached_features(default_cache_dir() / "features", key, x, extract)
            out.append(feats)
            seconds += s
    if plan.phase.cached_flips:
        return torch.cat(out[:2]), data.train_y.repeat(2), out[2], seconds
    return out[0], data.train_y, out[1], seconds


def phase_inputs(run: RunCore, plan: PhasePlan) -> PhaseInputs:
    """The phase's training and validation inputs: raw images, cached features or stored maps."""
    d, spec = run.data, run.model.spec
    weights = None
    if run.cfg.data.class_weights == "auto":
        weights = class_weights(d.train_y, len(d.classes))
    if plan.maps:
        return partial.map_inputs(run, plan, weights)
    tensors, seconds, stored = (d.train_x, d.train_y, d.val_x), 0.0, None
    if plan.cached:
        stored = partial.probe_maps(run, plan)  # a later phase's maps, or None: extract
        *tensors, seconds = frozen_features(run, plan, stored)
    return PhaseInputs(
        *tensors, d.val_y, plan.cached, plan.resolution, spec.mean, spec.std,
        plan.phase.augment, run.cfg.run.channels_last, seconds, weights,
        mixup=plan.phase.mixup, cutmix=plan.phase.cutmix, features_from_maps=stored is not None,
    )


def run_probe_phase(run: RunCore, plan: PhasePlan, inputs: PhaseInputs) -> None:
    """The probe as a phase: one metrics row per L2 penalty; the head ends on the best one.

    Every rank fits the same probe on the same features (seconds), so nothing is sharded.
    """
    head, phase, log = run.model.head, plan.phase, run.log
    assert isinstance(head, torch.nn.Linear)  # config validation: lbfgs needs a linear head
    t0 = time.perf_counter()
    # (score, fit, head weights, its val_acc)
    best: tuple[tuple[float, float], ProbeFit, dict, float | None] | None = None
    fits = sweep(inputs.train_x, inputs.train_y, phase.l2_values, head.out_features,
                 class_weights=inputs.class_weights)  # fmt: skip
    for n, fit in enumerate(fits, 1):
        if not (torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()):
            raise UserError(
                f"the probe of phase {phase.name!r} diverged at l2 {fit.l2:g} (non-finite weights): "
                f"use larger l2_values, or check the features for NaN"
            )
        with torch.no_grad():
            head.weight.copy_(fit.weight.to(head.weight))
            head.bias.copy_(fit.bias.to(head.bias))
        val_loss, val_acc, val_balanced, _ = validate(
            head, inputs, run.cfg.run.eval_batch_size, plan.precision
        )
        seconds = time.perf_counter() - t0
        row = log.row(
            plan, n, train_loss=fit.train_loss, train_acc=fit.train_acc, val_loss=val_loss,
            val_acc=val_acc, lr=0.0, l2=fit.l2, lbfgs_iterations=fit.iterations,
            img_per_s=len(inputs.train_x) / max(seconds, 1e-9), seconds=seconds,
            val_balanced_acc=val_balanced,
        )  # fmt: skip
        if n == 1:
            row.update(inputs.extract_fields())
        log.log(row, len(phase.l2_values), f" l2 {fit.l2:g} ({fit.iterations} L-BFGS iterations)")
        t0 = time.perf_counter()
        chosen = log.score(row)  # val_acc, or val_balanced_acc with run.select_by
        score = (chosen if chosen is not None else -fit.train_loss, -(val_loss or 0.0))
        if best is None or score > best[0]:
            best = (score, fit, {k: v.clone() for k, v in head.state_dict().items()}, val_acc)
        run.keep_if_best(row, plan, run.model)
    assert best is not None
    head.load_state_dict(best[2])  # later phases start from the chosen penalty's head
    run.ended_on(best[3], plan)
    log.say(f"probe: kept l2 {best[1].l2:g} (best validation accuracy)")
    run.checkpoint(plan, phase.epochs, done=True)
