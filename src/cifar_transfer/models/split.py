"""Cut a model at its frozen part (cached partial fine-tuning): `bottom` is the leading chain of
fully frozen blocks, `top` the rest of the backbone; head(top(bottom(x))) is the model's forward.

A phase that freezes a prefix of the backbone (until:<stage>, from-layer:N) computes bottom(x)
once per image and trains top + head on the stored maps (training/partial.py). The modules are
the model's own: training `top` trains the model, whose state dict stays the whole bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cifar_transfer.models.backbones import family_of
from cifar_transfer.models.transfer import TransferModel, apply_freeze
from cifar_transfer.system.errors import UserError


@dataclass
class Split:
    """A model cut after its first `at` blocks (block `name` is the first of the top)."""

    bottom: nn.Sequential  # frozen: run once per image, in eval mode
    top: nn.Sequential  # the rest of the backbone; its parameters may be partly frozen
    at: int
    name: str
    blocks: int  # how many blocks the backbone has


def blocks_of(model: TransferModel) -> list[tuple[str, nn.Module]]:
    """The backbone's chain of blocks (its family's `blocks`)."""
    return family_of(model.spec).blocks(model.backbone)


def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


def frozen_split(model: TransferModel) -> Split:
    """The model cut after its longest chain of fully frozen leading blocks (apply_freeze first).

    One UserError line when no block is wholly frozen, or when every one is (freeze = "all": the
    head-only feature cache does that job).
    """
    chain = blocks_of(model)
    at = 0
    while at < len(chain) and _frozen(chain[at][1]):
        at += 1
    if at == 0:
        raise UserError(
            f"cache_frozen caches the frozen part of the backbone, but the first block of "
            f"{model.spec.name} ({chain[0][0]}) trains: freeze a prefix (until:<stage>, "
            f"from-layer:N) or set cache_frozen = false"
        )
    if at == len(chain):
        raise UserError(
            "cache_frozen with the whole backbone frozen: the feature cache already trains the "
            "head on stored features; set cache_frozen = false"
        )
    return Split(nn.Sequential(*(m for _, m in chain[:at])), nn.Sequential(*(m for _, m in chain[at:])),
                 at, chain[at][0], len(chain))


def split_as(model: TransferModel, freeze: str) -> Split:
    """frozen_split of the model as apply_freeze(freeze) would leave it, without leaving it so:
    what trains, the frozen BatchNorm and every module's mode are as they were after."""
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    frozen_bn = model.frozen_batchnorm
    try:
        apply_freeze(model, freeze)
        return frozen_split(model)
    finally:
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(grad)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
        model._frozen_bn = frozen_bn


class TopModel(nn.Module):
    """head(top(maps)): what a cached partial phase trains and validates on stored maps.

    `whole` is the model it was cut from (not a submodule: the state dict that matters is the
    model's); layer-wise LR decay reads its stages through it.
    """

    def __init__(self, split: Split, model: TransferModel) -> None:
        super().__init__()
        self.top, self.head = split.top, model.head
        object.__setattr__(self, "whole", model)

    def forward(self, maps: Tensor) -> Tensor:
        """Stored maps -> logits, as the whole model's forward computes them from images."""
        return self.head(self.top(maps))

    def train(self, mode: bool = True) -> TopModel:
        """The whole model's mode rules: frozen BatchNorm inside the top stays in eval."""
        super().train(mode)
        self.whole.train(mode)
        return self
