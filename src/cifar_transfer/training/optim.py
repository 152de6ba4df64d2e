"""A phase's optimizer and per-step learning-rate schedule (timm's create_optimizer/scheduler)."""

from __future__ import annotations

import math

import torch

from cifar_transfer.config import PhaseConfig
from cifar_transfer.models.transfer import TransferModel, stage_depths
from cifar_transfer.system.errors import UserError


def make_optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    """The phase's optimizer over trainable parameters; no weight decay on biases and norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"phase {phase.name!r} freezes every parameter: nothing to train; fix its freeze")
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": phase.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    # A cached phase trains a TopModel (the top blocks + head on stored maps): its stages are
    # read through the model it was cut from, or layer decay would silently not apply.
    whole = getattr(model, "whole", model)
    if phase.layer_decay < 1 and isinstance(whole, TransferModel):
        groups = layer_decay_groups(whole, params, phase)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=phase.momentum > 0)
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    return torch.optim.AdamW(groups, lr=phase.lr)


def layer_decay_groups(
    model: TransferModel, params: list[torch.nn.Parameter], phase: PhaseConfig
) -> list[dict]:
    """Layer-wise LR decay (timm's param_groups_layer_decay, fastai's discriminative LRs): one
    group per stage depth and weight-decay kind, lr = phase.lr * layer_decay^depth (the head at
    depth 0 first, so the logged lr is the head's). Schedulers scale every group alike."""
    depths = stage_depths(model)
    groups: dict[tuple[int, bool], dict] = {}
    for p in params:
        depth, decayed = depths.get(id(p), 0), p.ndim > 1
        group = groups.setdefault((depth, decayed), {
            "params": [], "weight_decay": phase.weight_decay if decayed else 0.0,
            "lr": phase.lr * phase.layer_decay**depth,
        })  # fmt: skip
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def make_scheduler(
    optimizer: torch.optim.Optimizer, phase: PhaseConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: constant or cosine (both with linear warmup), or one-cycle (which
    always spans the phase's `epochs`: it cannot be refitted)."""
    ceiling = max(1, phase.epochs * steps_per_epoch)
    # A budgeted phase plans fractional epochs (schedule_epochs) and may stretch to `epochs`.
    planned = phase.schedule_epochs if phase.schedule != "onecycle" else 0
    total = min(ceiling, max(1, round((planned or phase.epochs) * steps_per_epoch)))
    warmup = min(total - 1, round(phase.warmup_epochs * steps_per_epoch))
    if phase.schedule == "onecycle":
        max_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]  # layer decay
        max_lr = max_lrs if len(set(max_lrs)) > 1 else phase.lr
        pct = warmup / total if warmup > 0 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total, pct_start=max(pct, 1e-3),
            cycle_momentum=phase.optimizer == "sgd", div_factor=25.0, final_div_factor=1e3,
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, StepSchedule(total, warmup, phase.schedule == "cosine", ceiling))


class StepSchedule:
    """LR factor by step: linear warmup, then cosine to zero at `total` (or constant).

    `refit` moves the end: earlier (a budgeted run behind its pace) or later, up to `ceiling` (a
    run ahead of it); the cosine goes on from where it is and reaches zero at the new end, so the
    learning rate never jumps. A callable object, not a function, so LambdaLR's state_dict saves
    and restores it (with a checkpoint).
    """

    def __init__(self, total: int, warmup: int, cosine: bool, ceiling: int = 0) -> None:
        self.total, self.warmup, self.cosine = total, warmup, cosine
        self.ceiling = max(ceiling, total)  # the latest end `refit` may move to (the phase's steps)
        self.anchor_step, self.anchor_progress = warmup, 0.0  # cosine progress at anchor_step

    def progress(self, step: int) -> float:
        """Share of the cosine done at `step` (0 at the end of warmup, 1 at `total`)."""
        span = max(1, self.total - self.anchor_step)
        return min(1.0, self.anchor_progress + (step - self.anchor_step) * (1 - self.anchor_progress) / span)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def refit(self, step: int, total: int) -> None:
        """End at step `total` instead (never after `ceiling`, never before `step` + 1)."""
        anchor = max(step, self.warmup)
        total = min(max(total, anchor + 1), self.ceiling)
        if total == self.total:
            return
        self.anchor_progress = self.progress(anchor)
        self.anchor_step, self.total = anchor, total

    def done(self, step: int) -> bool:
        """Every planned step has run."""
        return step >= self.total
