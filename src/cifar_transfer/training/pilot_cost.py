"""What a fine-tuning phase spends measuring its data-dependent settings before it trains
(`batchnorm = "auto"`, `lr = "find"`; pilot.py and lr_find.py run them): in steps and validation
passes, without torch, so the budget planner prices them."""

from __future__ import annotations

from cifar_transfer.config import LR_FIND, PhaseConfig

PILOT_EPOCHS = 0.25  # of an epoch, each BatchNorm mode's pilot
PILOT_MIN_STEPS = 20  # at least: BatchNorm's running statistics (momentum 0.1) are ~90% the data's by then
LR_FIND_STEPS = 60  # the range test's most (fastai's 100 at batch 64; here the budget pays each step)


def pilot_steps(n_train: int, batch_size: int) -> int:
    """Steps of one mode's pilot: PILOT_EPOCHS of an epoch, at least PILOT_MIN_STEPS, at most one epoch."""
    per_epoch = -(-n_train // batch_size)
    return min(per_epoch, max(PILOT_MIN_STEPS, round(PILOT_EPOCHS * per_epoch)))


def pilot_cost(phase: PhaseConfig, n_train: int) -> tuple[int, int]:
    """(training steps at most, validation passes) the phase spends before its first epoch."""
    modes = 2 if phase.batchnorm == "auto" else 1
    steps = modes * LR_FIND_STEPS if phase.lr == LR_FIND else 0
    if modes == 1:
        return steps, 0
    return steps + modes * pilot_steps(n_train, phase.batch_size), modes
