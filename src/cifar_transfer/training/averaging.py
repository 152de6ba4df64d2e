"""Weight averaging (run.ema): an exponential moving average of what a phase trains (the whole
model, or the top + head on stored maps, or the head on cached features), kept by torch's
AveragedModel (the EMA timm's ModelEmaV3 keeps), validated beside the raw weights every epoch;
each epoch keeps whichever of the two validates better, and the phase ends on it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The EMA of `net`'s weights (its BatchNorm buffers too)."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.net = net
        self.model = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged copy of `net`, to validate."""
        return self.model.module

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def adopt(self) -> None:
        """`net` takes the averaged weights (the phase ends on them)."""
        self.net.load_state_dict(self.module.state_dict())

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """`net` holds the averaged weights inside the block, its own again after it."""
        raw = copy.deepcopy(self.net.state_dict())
        self.adopt()
        try:
            yield
        finally:
            self.net.load_state_dict(raw)
