"""Fit a Config's phases into a run dir: data on the device, per-phase plan, checkpoint/resume,
keep-best, the bundle, and DistributedDataParallel under torchrun (see distributed.py).

The loops themselves are loop.py (train_one_epoch, validate); the probe phase is probe.py; the
record of the run is runlog.py; the checkpoint format is checkpoint.TrainState; the run dir's
layout is rundir.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cifar_transfer.artifacts import bundle, rundir
from cifar_transfer.artifacts.checkpoint import (
    Best,
    TrainState,
    atomic_write_text,
    save_safetensors,
)
from cifar_transfer.config import Config, to_toml
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import class_weights, load_train_val
from cifar_transfer.models.transfer import apply_freeze, create_model
from cifar_transfer.results import calibration
from cifar_transfer.results.evaluate import batched_logits, predict_logits
from cifar_transfer.system import hardware
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import distributed, probe
from cifar_transfer.training.budget import Cell
from cifar_transfer.training.features import (
    cache_key,
    cached_features,
    extract_features,
    fingerprint,
    load_cached,
    should_compile,
    weights_fingerprint,
)
from cifar_transfer.training.loop import Diverged, PhaseInputs, train_one_epoch, validate
from cifar_transfer.training.measure import Throughputs
from cifar_transfer.training.optim import make_optimizer, make_scheduler
from cifar_transfer.training.pacing import Deadline, Pacer
from cifar_transfer.training.plan import PhasePlan, plan_phases
from cifar_transfer.training.runlog import RunLog


@dataclass
class Data:
    """The split, resident on the training device as uint8 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    fingerprint: str  # of every image and label read: a resumed run checks it is the same data
    classes: list[str]
    storage_size: int  # images are (3, S, S)
    kind: str  # cifar10 | cifar100 | folder (datasets.py)


def load_data(cfg: Config, device: torch.device, progress: bool = True) -> Data:
    """Read the dataset's training split, split off validation, cap training images, move to device."""
    s = load_train_val(cfg, progress=progress)
    tensors = (t.to(device) for t in (s.train_x, s.train_y, s.val_x, s.val_y))
    return Data(*tensors, s.fingerprint, s.source.classes, s.source.storage_size, s.source.kind)


def check_batch_sizes(cfg: Config, world: int) -> None:
    """Under torchrun each phase's batch_size is the global batch: it must split evenly over ranks."""
    for i, phase in enumerate(cfg.phases):
        if phase.epochs > 0 and phase.batch_size % world:
            raise UserError(
                f"phases.{i}.batch_size {phase.batch_size} (the global batch) does not split "
                f"evenly over {world} processes: start a number of processes that divides it, or "
                f"set a batch size that is a multiple of {world}"
            )


def signature(cfg: Config) -> dict:
    """What a checkpoint must agree with to be resumed under this config."""
    return {
        "backbone": cfg.model.backbone, "head": cfg.model.head,
        "phases": [p.name for p in cfg.phases],
    }  # fmt: skip


class Run:
    """One run: model and data on the device, its plan and log; trains phase after phase."""

    def __init__(self, cfg: Config, out: Path, resume: bool = False, progress: bool = True,
                 deadline: Deadline | None = None):
        self.cfg, self.out, self.deadline = cfg, Path(out), deadline
        self.main = distributed.is_main()  # under torchrun only rank 0 prints and writes
        check_batch_sizes(cfg, distributed.world_size())
        hardware.set_threads(cfg.run.threads)
        self.device = distributed.rank_device(hardware.pick_device(cfg.run.device))
        self.state = TrainState.load(self.out / rundir.LAST, signature(cfg)) if resume else None
        torch.manual_seed(cfg.run.seed)
        self.data = load_data(cfg, self.device, progress and self.main)
        if self.state is not None and self.state.data != self.data.fingerprint:
            raise UserError(
                f"the images in {cfg.data.data_dir or 'the download cache'} are not the images "
                f"this run trained on: pass the --data-dir it used (config.toml's data.data_dir)"
            )
        # Resuming needs no weights source: the checkpoint holds every weight.
        weights = "none" if self.state is not None else cfg.model.weights
        self.model = create_model(
            cfg.model.backbone, weights, cfg.model.head, num_classes=len(self.data.classes)
        ).to(self.device)
        if distributed.world_size() > 1:  # BatchNorm over the global batch, as one process would
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.plans = plan_phases(cfg, self.model.spec.resolution, self.device)
        self.gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.last = Best()  # validation of the weights the run ends on (keep_best off)
        self._temperature: tuple[tuple[int, str], float] | None = None  # ((epoch, tta), T) last fitted
        # Validation logits by epoch, of the best and the last validated weights only: what the
        # temperature fit reads instead of a second pass over the images.
        self._logits: dict[int, torch.Tensor] = {}
        rows, best = [], None
        if self.state is not None:
            self._restore(self.state)
            rows = rundir.read_metrics(self.out)[: self.state.global_epoch]
            best, self.last = self.state.best, self.state.last
        self.log = RunLog(self.out, self.main, progress and self.main, cfg.run.tensorboard, rows, best)
        if cfg.run.select_by == "balanced_accuracy":
            self.log.select_key = "val_balanced_acc"

    def _restore(self, state: TrainState) -> None:
        self.model.load_state_dict(state.model)
        self.gen.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.cuda_rng)

    # -- what phases report back -----------------------------------------------------------------
    def keep_if_best(self, row: dict, plan: PhasePlan, evaluated: torch.nn.Module) -> None:
        """Record a new best val_acc and, with keep_best, save the weights that reached it."""
        if not self.log.improved(row, plan) or not self.cfg.run.keep_best:
            return
        # A file per best epoch, written before the checkpoint that names it: a kill between
        # the two leaves the checkpoint's own best file in place (older ones go after a checkpoint).
        self.log.best.file = f"checkpoints/best-epoch{row['epoch']}.safetensors"
        if self.main:
            meta = {"epoch": str(row["epoch"]), "resolution": str(plan.resolution)}
            save_safetensors(self.out / self.log.best.file, evaluated.state_dict(), meta)

    def ended_on(self, val_acc: float | None, plan: PhasePlan) -> None:
        """The weights the model now holds scored `val_acc` (validated at the plan's settings)."""
        self.last = Best(-1.0 if val_acc is None else val_acc, self.log.epochs, plan.resolution,
                         plan.precision)

    def keep_logits(self, epoch: int, logits: torch.Tensor | None) -> None:
        """Hold epoch's validation logits while they are the best's or the last's."""
        if logits is not None:
            self._logits[epoch] = logits
        keep = {self.log.best.epoch, self.last.epoch}
        self._logits = {e: v for e, v in self._logits.items() if e in keep}

    def checkpoint(self, plan: PhasePlan, phase_epoch: int, done: bool, stale: int = 0,
                   optimizer=None, scheduler=None, ema=None) -> None:
        """Write last.pt (rank 0), then drop best-weight files it no longer names."""
        if not self.main:
            return
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        TrainState(
            self.model.state_dict(), self.data.fingerprint, self.gen.get_state(),
            torch.get_rng_state(), cuda_rng,
            plan.index, phase_epoch, done, stale, self.log.epochs, self.log.best, self.last,
            optimizer.state_dict() if optimizer is not None else None,
            scheduler.state_dict() if scheduler is not None else None,
            ema.state_dict() if ema is not None else None, signature(self.cfg),
        ).save(self.out / rundir.LAST)
        for old in (self.out / "checkpoints").glob("best-epoch*.safetensors"):
            if old.name != Path(self.log.best.file).name:
                old.unlink(missing_ok=True)

    # -- the run ----------------------------------------------------------------------------------
    def inputs(self, plan: PhasePlan) -> PhaseInputs:
        """The phase's training and validation inputs: raw images or cached features."""
        d, spec = self.data, self.model.spec
        tensors, seconds = (d.train_x, d.train_y, d.val_x), 0.0
        if plan.cached:
            *tensors, seconds = frozen_features(self, plan)
        weights = None
        if self.cfg.data.class_weights == "auto":
            weights = class_weights(d.train_y, len(d.classes))
        return PhaseInputs(
            *tensors, d.val_y, plan.cached, plan.resolution, spec.mean, spec.std,
            plan.phase.augment, self.cfg.run.channels_last, seconds, weights,
        )

    def fit(self) -> dict:
        """Train every phase (resuming where the checkpoint says), then write the model bundle."""
        s = self.state
        first = 0 if s is None else s.phase + (1 if s.phase_done else 0)
        running = [p for p in self.plans[first:] if p.runs]
        for plan in running:
            if self.deadline is not None and self.deadline.expired():
                self.log.say(f"deadline reached: phase {plan.phase.name!r} and later ones skipped")
                break
            self.run_plan(plan, s if s is not None and s.phase == plan.index else None)
            if self.deadline is not None and plan is not running[-1]:  # the last: _finish
                self._bundle_if_best()
        return self._finish()

    def run_plan(self, plan: PhasePlan, resume: TrainState | None = None) -> None:
        """Freeze what the phase says, then run it by its kind (L-BFGS probe or gradient steps)."""
        apply_freeze(self.model, plan.phase.freeze, plan.phase.batchnorm)
        if plan.phase.optimizer == "lbfgs":
            probe.run_probe_phase(self, plan, self.inputs(plan))
        else:
            run_phase(self, plan, self.inputs(plan), resume)

    def _bundle_if_best(self) -> None:
        """A budgeted run bundles each phase that ends on its best weights (the probe first), so
        the run dir holds a usable model long before the deadline; weaker phases leave it as is."""
        last, best = self.log.score_of(self.last.epoch), self.log.score_of(self.log.best.epoch)
        if self.main and self.last.epoch > 0 and last >= best:
            summary = self._summary(self.last)
            if len(self.data.val_y):
                summary.update(self._calibrated(self.last, tta="off"))  # the last bundle tries TTA
            bundle.save_bundle(self.model, self.cfg, self.out, self.last.resolution, summary)

    def _summary(self, final: Best) -> dict:
        """model.json's record of the run, for the weights validated as `final`."""
        return {
            "val_acc": final.acc if final.epoch > 0 else None, "best_epoch": self.log.best.epoch,
            "epochs_run": self.log.epochs,
            "train_images": len(self.data.train_y), "val_images": len(self.data.val_y),
            "classes": list(self.data.classes), "storage_size": self.data.storage_size,
            "data_kind": self.data.kind,
            **hardware.describe(self.device, final.precision),
        }  # fmt: skip

    def _finish(self) -> dict:
        """Load the weights the run ends on (the best epoch's, with keep_best) and bundle them."""
        best = self.log.best
        ran = [p for p in self.plans if p.runs] or self.plans[-1:]
        final = Best(-1.0, -1, ran[-1].resolution, ran[-1].precision)  # nothing validated
        if not self.cfg.run.keep_best:
            final = self.last if self.last.epoch > 0 else final
        elif best.epoch > 0:
            final = best
            if self.main and (self.out / best.file).is_file():
                self.model.load_state_dict(load_file(self.out / best.file, device=str(self.device)))
            elif self.main:  # a best file deleted by hand: say what the bundle holds instead
                self.log.warning(f"{best.file} is missing: the bundle holds the last epoch's weights")
                final = self.last
        summary = self._summary(final)
        if self.main and len(self.data.val_y):
            summary.update(self._calibrated(final, self.cfg.run.tta))
        if self.main:
            bundle.save_bundle(self.model, self.cfg, self.out, final.resolution, summary)
        self.log.close()
        return summary

    def _calibrated(self, final: Best, tta: str) -> dict:
        """model.json's test-time views and temperature for the kept weights `final`.

        With `tta` (run.tta) "flip", or "auto" and weights that validated on images (not on
        cached features: a probe's bundle stays one pass, and a budget reserves the mirror pass
        after fine-tuning only), the mirror images are scored once more: the bundle averages both
        views when `tta` is "flip" or when that validates better, and its val_acc is then the
        averaged views' (what `evaluate` reproduces). The temperature is fitted to the logits the
        bundle will output, once per (epoch, views): a budgeted run's intermediate and final
        bundles often share them.
        """
        flip = tta == "flip" or (tta == "auto" and self._validated_on_images(final.epoch))
        logits, labels = self._val_logits(final).cpu(), self.data.val_y.cpu()
        out: dict = {"tta": "none"}
        if flip:
            d, model = self.data, self.model
            mirrored = predict_logits(
                model, d.val_x, final.resolution, model.spec.mean, model.spec.std,
                self.cfg.run.eval_batch_size, final.precision, self.cfg.run.channels_last,
                mirrored=True,
            )  # fmt: skip
            both = (logits + mirrored) / 2
            single, flipped = (float((x.argmax(1) == labels).float().mean()) for x in (logits, both))
            keep = tta == "flip" or flipped > single
            self.log.say(f"flip TTA (run.tta={tta}): val_acc {single:.4f} single view, {flipped:.4f} "
                         f"with the mirror image: {'bundled' if keep else 'not bundled'}")  # fmt: skip
            if keep:
                logits = both
                out = {"tta": "flip", "val_acc": flipped, "val_acc_single_view": single}
        key = (final.epoch, out["tta"])
        if self._temperature is None or self._temperature[0] != key or final.epoch <= 0:
            t = calibration.fit_temperature(logits, labels)
            before, after = (calibration.ece(calibration.scaled(logits, x).softmax(1), labels)
                             for x in (1.0, t))  # fmt: skip
            self.log.say(f"temperature {t:.3f} fitted on {len(labels)} validation images "
                         f"(ECE {before:.2%} -> {after:.2%})")  # fmt: skip
            self._temperature = (key, t)
        out["temperature"] = self._temperature[1]
        return out

    def _validated_on_images(self, epoch: int) -> bool:
        """Whether `epoch` was validated by a pass over the images (not over cached features)."""
        phases = [r["phase"] for r in self.log.rows if r["epoch"] == epoch]
        return bool(phases) and not self.plans[phases[-1]].cached

    def _val_logits(self, final: Best) -> torch.Tensor:
        """The kept weights' validation logits at the resolution and precision they were validated
        at: the ones their epoch's validation computed (fine-tuning), else from the frozen-feature
        cache when a cached phase left their features there (the probe: no second pass of the
        backbone; validation features are extracted eagerly, as `evaluate` runs the bundle), else
        (a resumed run, torchrun) one pass as `evaluate` runs it."""
        if final.epoch in self._logits:
            return self._logits[final.epoch]
        d, cfg, model = self.data, self.cfg, self.model
        key = cache_key(
            cfg.model.backbone, weights_fingerprint(model.backbone), cfg.model.head,
            final.resolution, final.precision, fingerprint(d.val_x, d.val_y),
        )  # fmt: skip
        feats = load_cached(default_cache_dir() / "features" / f"{key}.safetensors", len(d.val_y),
                            self.device)
        if feats is None:
            return predict_logits(
                model, d.val_x, final.resolution, model.spec.mean, model.spec.std,
                cfg.run.eval_batch_size, final.precision, cfg.run.channels_last,
            )  # fmt: skip
        with torch.inference_mode():
            return torch.cat([y for _, y in batched_logits(
                model.head.eval(), feats, cfg.run.eval_batch_size, final.precision, lambda x: x)])


def run_phase(run: Run, plan: PhasePlan, inputs: PhaseInputs, resume: TrainState | None) -> None:
    """Train one gradient phase from its start or from the checkpointed epoch inside it."""
    phase, model, log = plan.phase, run.model, run.log
    net = model.head if plan.cached else model
    optimizer = make_optimizer(net, phase)
    steps_per_epoch = -(-len(inputs.train_y) // phase.batch_size)
    scheduler = make_scheduler(optimizer, phase, steps_per_epoch)
    scaler = torch.amp.GradScaler(run.device.type) if plan.precision == "fp16" else None
    ema = None
    if run.cfg.run.ema > 0 and not plan.cached:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(run.cfg.run.ema), use_buffers=True)
    start, stale = 0, 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
        start, stale = resume.phase_epoch, resume.stale
    forward = net
    if distributed.world_size() > 1:  # a new wrapper per phase: each phase trains other parameters
        forward = DistributedDataParallel(net, device_ids=[run.device] if run.device.type == "cuda" else None)
    if run.cfg.run.compile and not plan.cached:
        forward = torch.compile(forward)
    evaluated = ema.module if ema is not None else model
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
                plan.precision, phase.label_smoothing, ema,
                f"{phase.name} {epoch + 1}/{phase.epochs}", log.console, pacer, scaler,
            )  # fmt: skip
        except Diverged as e:
            raise UserError(
                f"loss became {e.loss} in phase {phase.name!r} epoch {epoch + 1}: lower the lr "
                f"({phase.lr}); the last good checkpoint is {run.out / rundir.LAST}"
            ) from None
        t_val = time.perf_counter()
        val_loss, val_acc, val_balanced, val_logits = validate(
            evaluated.head if plan.cached else evaluated, inputs, run.cfg.run.eval_batch_size,
            plan.precision,
        )  # fmt: skip
        row = log.row(
            plan, epoch + 1, train_loss=fit.loss, train_acc=fit.acc, val_loss=val_loss,
            val_acc=val_acc, lr=optimizer.param_groups[0]["lr"], img_per_s=fit.seen / fit.seconds,
            seconds=fit.seconds, val_balanced_acc=val_balanced,
        )  # fmt: skip
        if plan.cached and epoch == start:
            row["extract_seconds"] = inputs.extract_seconds
        log.log(row, phase.epochs)
        run.keep_if_best(row, plan, evaluated)
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
        if done and ema is not None:  # later phases and the final model go on from the average
            model.load_state_dict(ema.module.state_dict())
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
    run: Run, plan: PhasePlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Cached frozen-backbone features: (train features, their labels, val features, seconds).

    With the phase's `cached_flips` the training rows are each image's features followed by its
    mirror image's (labels repeated), so a head trained on them sees flip augmentation.

    Under torchrun rank 0 extracts them into the cache while the others wait, then they read
    them (a rank that cannot see rank 0's cache folder, e.g. on another machine, extracts too).
    """
    cfg, data = run.cfg, run.data
    # (name, images, labels, may compile): validation features are extracted eagerly, as
    # `evaluate` runs the bundle (compiled, BN-folded bf16 numerics moved a val_acc 0.3 points).
    sets = [("train", data.train_x, data.train_y, True), ("val", data.val_x, data.val_y, False)]
    if plan.phase.cached_flips:
        sets.insert(1, ("mirrored train", data.train_x.flip(-1), data.train_y, True))
    out, seconds = [], 0.0
    backbone_fp = weights_fingerprint(run.model.backbone)  # as it is now: maybe fine-tuned
    with distributed.main_first():
        for name, x, y, may_compile in sets:
            key = cache_key(
                cfg.model.backbone, backbone_fp, cfg.model.head, plan.resolution,
                plan.precision, fingerprint(x, y),
            )  # fmt: skip
            compiled = may_compile and should_compile(cfg.run.compile_features, len(x))
            extract = functools.partial(
                extract_features, run.model, resolution=plan.resolution,
                batch_size=cfg.run.eval_batch_size, precision=plan.precision,
                channels_last=cfg.run.channels_last, desc=f"{name} features",
                compile_model=compiled, progress=run.log.console,
            )  # fmt: skip
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


@contextlib.contextmanager
def _holding(out: Path, new: bool) -> Iterator[None]:
    """Rank 0 holds the run dir's lock for the body; a refusal stops every rank."""
    out = Path(out)
    existed = out.exists()
    locks = []
    distributed.main_only(lambda: locks.append(rundir.claim(out, new)))
    try:
        yield
    finally:
        for lock in locks:
            lock.release()
        if new and not existed and locks and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # bad input stopped a new run before it wrote anything: leave no trace


def train(
    cfg: Config, out: Path, progress: bool = True, on_start: Callable[[Path], None] | None = None,
    deadline: Deadline | None = None,
) -> dict:
    """Start a new run in `out` and train it to the end (under torchrun: on every rank).

    `on_start(out)` runs on rank 0 once data and model are loaded, just before the first epoch.
    With a `deadline` (a budgeted run) training stops cleanly by then: the best model so far
    bundled, the checkpoint resumable.
    """
    out = Path(out)
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=True):
        # Data and model are checked before the first file is written, so bad input leaves no run dir.
        run = Run(cfg, out, resume=False, progress=progress, deadline=deadline)
        if run.main:
            atomic_write_text(out / rundir.CONFIG, to_toml(cfg))
            if on_start is not None:
                on_start(out)
        summary = run.fit()
        del run  # its DDP wrapper must go before the process group (see process_group)
        return summary


def resume(out: Path, progress: bool = True, data_dir: str | None = None) -> dict:
    """Continue the run in `out` from its last checkpoint, to the same result as an unbroken run.

    The checkpoint holds every weight (no weights source is needed) and no per-rank state, so a
    run may resume offline and under another number of processes. `data_dir` is where the run's
    images are now, if they moved: checked against the checkpoint's fingerprint of them.
    """
    out = Path(out)
    cfg = rundir.load_run_config(out)
    if data_dir:
        cfg.data.data_dir = str(Path(data_dir).expanduser().resolve())
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=False):
        # A run killed before its first checkpoint starts over in its own dir.
        run = Run(cfg, out, resume=(out / rundir.LAST).is_file(), progress=progress)
        if data_dir and run.main:  # the same images, found elsewhere: remember where
            atomic_write_text(out / rundir.CONFIG, to_toml(cfg))
        summary = run.fit()
        del run  # its DDP wrapper must go before the process group (see process_group)
        return summary
