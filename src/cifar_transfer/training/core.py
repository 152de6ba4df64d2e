"""A run's state: data on the device, the model, the per-phase plan and the log, and what phases
report back to it (best weights, the last validation, logits, checkpoints).

phases.py runs a phase against it, finish.py bundles what it kept, run.py drives both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import Best, TrainState
from cifar_transfer.config import Config
from cifar_transfer.data.datasets import load_train_val
from cifar_transfer.models.transfer import create_model
from cifar_transfer.system import hardware
from cifar_transfer.system.atomic import save_safetensors
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import distributed
from cifar_transfer.training.pacing import Deadline
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
    near_duplicates: dict | None = None  # a carved folder split: the groups kept on one side


def near_duplicates_line(found: dict) -> str:
    """The run log's line on the near-duplicate groups a carved validation split kept together."""
    examples = "; ".join(found.get("examples", []))
    head = f"near-duplicates (perceptual hash, data.near_duplicates={found['similarity']:g}): "
    if not found["groups"]:
        return head + f"none among the {found['total_images']} images"
    return head + (
        f"{found['groups']} group(s) holding {found['images']} of the {found['total_images']} "
        f"images, each kept on one side of the validation split"
        + (f" (e.g. {examples})" if examples else "")
    )


def load_data(cfg: Config, device: torch.device, progress: bool = True) -> Data:
    """Read the dataset's training split, split off validation, cap training images, move to device."""
    s = load_train_val(cfg, progress=progress)
    tensors = (t.to(device) for t in (s.train_x, s.train_y, s.val_x, s.val_y))
    return Data(*tensors, s.fingerprint, s.source.classes, s.source.storage_size, s.source.kind,
                s.near_duplicates)  # fmt: skip


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


class RunCore:
    """One run's state: model and data on the device, its plan and log, and what phases report
    back (best weights, the last validation, logits, checkpoints). Run adds the phases."""

    def __init__(self, cfg: Config, out: Path, resume: bool = False, progress: bool = True,
                 deadline: Deadline | None = None):
        # A copy: what a phase measures on the data (pilot.py) is written into the run's config,
        # never into the caller's.
        self.cfg, self.out, self.deadline = copy.deepcopy(cfg), Path(out), deadline
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
        self.plans = plan_phases(self.cfg, self.model.spec.resolution, self.device)
        self.gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.last = Best()  # validation of the weights the run ends on (keep_best off)
        self.fitted_temperature: tuple[tuple[int, str], float] | None = None  # ((epoch, tta), T) last fitted
        # Validation logits by epoch, of the best and the last validated weights only: what the
        # temperature fit reads instead of a second pass over the images.
        self.kept_logits: dict[int, torch.Tensor] = {}
        # A cached phase's stored maps by phase index, with the block they were cut at, when the
        # probe before it took its features from them (training/partial.py): used once, then gone.
        self.handed_maps: dict[int, tuple[int, list[torch.Tensor | None]]] = {}
        rows, best = [], None
        if self.state is not None:
            self._restore(self.state)
            rows = rundir.read_metrics(self.out)[: self.state.global_epoch]
            best, self.last = self.state.best, self.state.last
        self.log = RunLog(self.out, self.main, progress and self.main, cfg.run.tensorboard, rows, best)
        if cfg.run.select_by == "balanced_accuracy":
            self.log.select_key = "val_balanced_acc"
        found = self.data.near_duplicates
        if found is not None:
            self.log.say(near_duplicates_line(found))

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
            self.kept_logits[epoch] = logits
        keep = {self.log.best.epoch, self.last.epoch}
        self.kept_logits = {e: v for e, v in self.kept_logits.items() if e in keep}

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
