"""An LR range test on the run's own data (Smith 2015; fastai's `lr_find`): `phases.N.lr = "find"`.

The phase's optimizer (its layer decay, weight decay and momentum included) trains for up to
STEPS batches while the learning rate grows exponentially from LR_MIN to LR_MAX; the training
loss, smoothed and debiased as fastai smooths it, is recorded per step, and the test stops once
it passes DIVERGED x its minimum. The pick is fastai's default rule, "valley": the longest run of
falling loss, halfway down it; its "minimum / 10" and "steepest" picks are kept beside it.

A fine-tune that starts from a fitted probe head often has no fall to find: the loss starts at
its minimum and stays flat, noise and all, until the LR is too high (flowers, BatchNorm frozen:
0.52-0.56 from 1e-6 to 2.4e-2, then 0.60 at 3.0e-2 and 2.7 at 0.19). "valley" then picks noise.
So when the longest fall drops the loss by less than MIN_FALL of its start, the pick is the
"edge" rule instead: one decade below the LR from which on the smoothed loss stays above EDGE x
its minimum (Smith's range test reads the usable LR bound off where the loss turns up); the
first SKIP_START steps, a batch or two of smoothing, neither set the minimum nor mark the edge.
The weights, BatchNorm statistics and random state are put back afterwards: the test only reads
the data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cifar_transfer.config import PhaseConfig
from cifar_transfer.data.transforms import batch_indices
from cifar_transfer.system import hardware
from cifar_transfer.training import distributed
from cifar_transfer.training.loop import PhaseInputs
from cifar_transfer.training.optim import make_optimizer
from cifar_transfer.training.pilot_cost import LR_FIND_STEPS

LR_MIN, LR_MAX = 1e-6, 1.0
STEPS = LR_FIND_STEPS  # at most
DIVERGED = 4.0  # the test stops once the smoothed loss passes this multiple of its minimum
SMOOTH = 0.9  # exponential smoothing of the per-step loss (debiased)
SKIP_END = 3  # the last steps before the stop are the divergence itself: never picked
SKIP_START = 5  # the first steps' smoothed loss is a batch or two: no edge or minimum there
MIN_FALL = 0.05  # a longest fall shallower than this share of its starting loss is no valley
EDGE = 1.1  # the loss this far over its minimum for good: the LR has passed the usable range


@dataclass
class LRFind:
    """One range test: the LR and smoothed loss at each step, and the picks."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    valley: float = 0.0  # fastai's default pick
    minimum_tenth: float = 0.0
    steepest: float = 0.0
    edge: float = 0.0  # a decade below where the loss turns up for good (0: it never did)
    pick: float = 0.0  # what the phase uses: valley, or edge when the curve has no real fall
    rule: str = ""  # "valley" | "edge"

    def to_dict(self) -> dict:
        """JSON-ready (pilot.json's "lr_find")."""
        return dataclasses.asdict(self)


def suggest(lrs: list[float], losses: list[float]) -> LRFind:
    """The picks from a (lr, smoothed loss) curve: valley (fastai's default), min/10, steepest."""
    out = LRFind(list(lrs), list(losses))
    n = max(2, len(losses) - SKIP_END) if len(losses) > SKIP_END + 2 else len(losses)
    if n == 0:
        return out
    lr, loss = lrs[:n], losses[:n]
    # valley: the longest decreasing subsequence, halfway down it (fastai's `valley`).
    run = [1] * n
    best_end, best_start = 0, 0
    for i in range(1, n):
        for j in range(i):
            if loss[i] < loss[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end, best_start = i, i - run[i] + 1
    third = (best_end - best_start) / 3
    out.valley = lr[min(n - 1, best_start + int(third) + int(third / 2))]
    # The edge: where the loss turns up for good (from there on above EDGE x its minimum). "For
    # good", not "first": the first steps' smoothed loss is a batch or two, and noise there
    # crossed the line at 1.6e-7 on clothing; the first steps (a batch or two) set no minimum.
    floor = min(losses[SKIP_START:], default=math.inf)
    up = len(losses)
    while up > SKIP_START and losses[up - 1] > EDGE * floor:
        up -= 1
    out.edge = lrs[up] / 10 if up < len(losses) else 0.0
    fall = (loss[best_start] - loss[best_end]) / max(abs(loss[best_start]), 1e-12)
    out.rule = "valley" if fall >= MIN_FALL or not out.edge else "edge"
    out.pick = out.valley if out.rule == "valley" else out.edge
    out.minimum_tenth = lr[min(range(n), key=loss.__getitem__)] / 10
    if n > 1:
        slopes = [(loss[i + 1] - loss[i]) / (math.log(lr[i + 1]) - math.log(lr[i])) for i in range(n - 1)]
        out.steepest = lr[min(range(n - 1), key=slopes.__getitem__)]
    else:
        out.steepest = lr[0]
    return out


@contextlib.contextmanager
def undone(net: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Whatever the block trains `net` to, it leaves: its weights and BatchNorm statistics, each
    module's train/eval mode and torch's random state are as before afterwards."""
    saved = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        try:
            yield
        finally:
            net.load_state_dict(saved)
            for m, mode in zip(net.modules(), modes, strict=True):
                m.training = mode


def lr_range_test(net: torch.nn.Module, forward: torch.nn.Module, inputs: PhaseInputs,
                  phase: PhaseConfig, precision: str, seed: int, steps: int = STEPS) -> LRFind:
    """Run the range test on `net` (through `forward`, its DDP/compiled wrapper) and put it back.

    The batches come from a generator seeded with `seed`, and torch's global random state is
    restored afterwards, so a run that finds its LR draws the same batches after as one told it.
    Under torchrun every rank sees the same global batches and the mean loss over ranks, so all
    stop at the same step.
    """
    gamma = (LR_MAX / LR_MIN) ** (1 / (steps - 1))
    optimizer = make_optimizer(net, dataclasses.replace(phase, lr=1.0))
    base = [g["lr"] for g in optimizer.param_groups]  # layer decay: each group's share of 1
    gen = torch.Generator().manual_seed(seed)
    device, world = inputs.train_y.device, distributed.world_size()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    with undone(net, device):
        net.train()
        while len(lrs) < steps:
            for idx in batch_indices(len(inputs.train_y), phase.batch_size, True, gen):
                if len(idx) < max(world, 2) or len(lrs) >= steps:
                    continue
                lr = LR_MIN * gamma ** len(lrs)
                for g, b in zip(optimizer.param_groups, base, strict=True):
                    g["lr"] = b * lr
                x, y, mixed = inputs.train_batch(idx.to(device), distributed.shard(len(idx)), gen)
                with hardware.autocast(device, precision):
                    logits = forward(x)
                target = y if mixed is None else mixed.targets(logits.shape[1])
                loss = F.cross_entropy(logits.float(), target, weight=inputs.class_weights,
                                       label_smoothing=phase.label_smoothing)  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                mean = float(distributed.all_reduce_sum(loss.detach().double() / world))
                avg = SMOOTH * avg + (1 - SMOOTH) * mean
                smoothed = avg / (1 - SMOOTH ** (len(lrs) + 1))
                lrs.append(lr)
                losses.append(smoothed)
                best = min(best, smoothed)
                if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
                    steps = len(lrs)  # diverged: the test ends here
                    break
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    return suggest([lrs[i] for i in finite], [losses[i] for i in finite])
