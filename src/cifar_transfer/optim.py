"""A phase's optimizer and per-step learning-rate schedule (timm's create_optimizer/scheduler)."""

from __future__ import annotations

import math

import torch

from cifar_transfer.config import PhaseConfig
from cifar_transfer.errors import UserError


def make_optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    """The phase's optimizer over trainable parameters; no weight decay on biases and norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"phase {phase.name!r} freezes every parameter: nothing to train; fix its freeze")
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": phase.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=phase.momentum > 0)
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    return torch.optim.AdamW(groups, lr=phase.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, phase: PhaseConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: constant or cosine (both with linear warmup), or one-cycle."""
    total = max(1, phase.epochs * steps_per_epoch)
    warmup = min(total - 1, round(phase.warmup_epochs * steps_per_epoch))
    if phase.schedule == "onecycle":
        pct = warmup / total if warmup > 0 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=phase.lr, total_steps=total, pct_start=max(pct, 1e-3),
            cycle_momentum=phase.optimizer == "sgd", div_factor=25.0, final_div_factor=1e3,
        )
    cosine = phase.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
