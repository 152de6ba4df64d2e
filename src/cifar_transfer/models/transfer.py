"""The model a run trains: TransferModel (backbone + head), heads, and freezing.

Owns: `create_model` (a registry backbone from backbones.py with its weights, plus a linear, mlp
or keep-the-ImageNet-top head) and `apply_freeze` (none, all, until:<stage>, from-layer:N, from-module:N), which
keeps frozen BatchNorm in eval so its running statistics stay untouched in train mode.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cifar_transfer.config import HEADS
from cifar_transfer.models.backbones import build_backbone, family_of, get_spec
from cifar_transfer.models.families import BackboneSpec, Layers, Stages, keras_resnet_layers
from cifar_transfer.system.errors import UserError


class TransferModel(nn.Module):
    """Backbone + head; remembers which BatchNorm layers are frozen so train() keeps them eval."""

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self._frozen_bn: tuple[str, ...] = ()  # module names, so deepcopy (EMA) carries them
        # Temperature scaling (temperature.py): a plain float, not a buffer, so the weights file
        # is unchanged; load_model sets it from model.json, and exports trace it as a constant.
        self.temperature = 1.0
        # Flip TTA (run.tta): in eval mode the logits are the mean of the image's and its mirror
        # image's, as `evaluate --tta` computes them; load_model sets it from model.json.
        self.flip_tta = False

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalized images -> what the head consumes (pooled features or ImageNet logits)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalized images -> (B, num_classes) logits (divided by the temperature, in float32)."""
        logits = self.head(self.forward_features(x))
        if self.flip_tta and not self.training:
            logits = (logits.float() + self.head(self.forward_features(x.flip(3))).float()) / 2
        if self.temperature != 1.0:  # float32 first: bf16 rounding after / T could tie two classes
            logits = logits.float() / self.temperature
        return logits

    def train(self, mode: bool = True) -> TransferModel:
        """Set train/eval mode, but frozen BatchNorm always stays in eval (stats untouched)."""
        super().train(mode)
        if mode:
            for name in self._frozen_bn:
                self.get_submodule(name).eval()
        return self

    @property
    def frozen_batchnorm(self) -> tuple[str, ...]:
        """Names of the BatchNorm modules apply_freeze froze."""
        return self._frozen_bn


# --------------------------------------------------------------------------- heads


def _build_head(head: str, in_features: int, num_classes: int) -> nn.Module:
    """The trainable head on in_features: one Linear, or the mlp."""
    if head == "mlp":  # write-up 4's Dense(128)-Dense(64)-Dense(10)
        return nn.Sequential(
            nn.Linear(in_features, 128), nn.ReLU(inplace=True),
            nn.Linear(128, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )
    # linear, and imagenet-top's Dense(10) on the 1000 ImageNet outputs. Write-up 2's Keras
    # model had a softmax before that Dense; we feed logits, which keeps the gradient
    # well-scaled and loses nothing (softmax is monotone per sample).
    return nn.Linear(in_features, num_classes)


def create_model(
    backbone: str, weights: str, head: str, num_classes: int = 10
) -> TransferModel:
    """Build backbone (with weights) + head; nothing frozen yet."""
    spec = get_spec(backbone)
    if head not in HEADS:
        raise UserError(f"unknown head '{head}': use one of {', '.join(HEADS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    net, out_dim = build_backbone(spec, weights, keep_top=(head == "imagenet-top"))
    return TransferModel(spec, net, _build_head(head, out_dim, num_classes))


# --------------------------------------------------------------------------- freezing


def freeze_layer_order(model: TransferModel) -> Layers:
    """The layer list `from-module:N` counts in: Keras' order for resnets, else weight owners.

    For non-resnet backbones the list is the backbone modules that own parameters directly
    (conv, BatchNorm, linear ...), in registration order; each family says which.
    """
    return family_of(model.spec).layer_order(model.backbone)


KERAS_RESNET50_LAYERS = 175  # len(keras.applications.ResNet50(include_top=False).layers)


@functools.cache
def _keras_resnet50_weight_layers() -> tuple[bool, ...]:
    """For each of Keras ResNet50's 175 layers (no top), whether it owns weights (106 do)."""
    import torch
    import torchvision

    with torch.device("meta"):  # the layout only: no memory, no weights
        net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    return tuple(m is not None for _, m in keras_resnet_layers(net))


def keras_depth(n: int) -> float:
    """The share of Keras ResNet50's weight layers among its first n layers.

    Write-up 3's `layers[:100]` froze 61 of ResNet50's 106 weight layers: keras_depth(100) is
    0.575, the early 57% of the network. `from-layer:N` on a backbone that is not a ResNet
    freezes the same share of its own weight layers.
    """
    owns = _keras_resnet50_weight_layers()
    return sum(owns[:n]) / sum(owns)


def _from_layer(model: TransferModel, freeze: str, form: str) -> list[nn.Module]:
    """Modules frozen by from-layer:N (Keras ResNet50 numbering) or from-module:N (literal)."""
    layers = freeze_layer_order(model)
    keras_scale = form == "from-layer" and not family_of(model.spec).keras_order
    top = KERAS_RESNET50_LAYERS if keras_scale else len(layers)
    text = freeze[len(form) + 1:].strip()
    n = int(text) if text.isdigit() else -1
    if not 0 <= n <= top:
        scale = (
            f"Keras ResNet50's layer numbers, mapped to the same depth of {model.spec.name}"
            if keras_scale else f"the number of layers of {model.spec.name}"
        )
        raise UserError(f"bad freeze '{freeze}': N must be an integer from 0 to {top} ({scale})")
    if keras_scale:
        n = round(keras_depth(n) * len(layers))
    return [m for _, m in layers[:n] if m is not None]


def _stages(model: TransferModel) -> Stages:
    """The spec's stages, in order, each with the backbone modules it covers."""
    return family_of(model.spec).stages(model.spec, model.backbone)


def stage_depths(model: TransferModel) -> dict[int, int]:
    """id(parameter) -> its depth from the top: 0 for the head, 1 for the backbone's last stage,
    ... len(stages) for the first (the stem); backbone parameters outside every stage count with
    the first stage. What layer-wise LR decay scales by (training/optim.py)."""
    stages = _stages(model)
    depths = {id(p): len(stages) for p in model.backbone.parameters()}
    for i, (_, modules) in enumerate(stages):
        depths.update({id(p): len(stages) - i for m in modules for p in m.parameters()})
    depths.update({id(p): 0 for p in model.head.parameters()})
    return depths


def _frozen_modules(model: TransferModel, freeze: str) -> list[nn.Module]:
    """Backbone modules a freeze string freezes."""
    if freeze == "none":
        return []
    if freeze == "all":
        return [model.backbone]
    if freeze.startswith("until:"):
        stages = _stages(model)
        names = [n for n, _ in stages]
        wanted = freeze[len("until:"):].strip()
        key = wanted.replace(".", "")  # accept "blocks.3" for "blocks3"
        matches = [i for i, n in enumerate(names) if n.replace(".", "") == key]
        if not matches:
            raise UserError(
                f"unknown stage '{wanted}' in freeze '{freeze}' for {model.spec.name}: "
                f"use one of {', '.join(names)}"
            )
        return [m for _, modules in stages[: matches[0] + 1] for m in modules]
    for form in ("from-layer", "from-module"):
        if freeze.startswith(form + ":"):
            return _from_layer(model, freeze, form)
    stages = ", ".join(n for n, _ in _stages(model))
    raise UserError(
        f"unknown freeze '{freeze}': use none, all, until:<stage> (stages: {stages}) "
        "from-layer:<N> or from-module:<N>"
    )


def apply_freeze(model: TransferModel, freeze: str, batchnorm: str = "train") -> None:
    """Freeze what `freeze` says (everything else trainable); frozen BatchNorm stays in eval.

    batchnorm="eval" keeps every BatchNorm of the backbone in eval mode (its running statistics
    fixed, its scale and shift still trained where not frozen): Keras' advice for fine-tuning
    (`base_model(x, training=False)`), and what a small input needs, where the deep layers'
    batch statistics over 1x1 or 2x2 maps are far from the ImageNet ones the weights expect.
    """
    freeze = str(freeze).strip()
    frozen = _frozen_modules(model, freeze)
    # Start from all-trainable so phases can call this again to unfreeze.
    for p in model.parameters():
        p.requires_grad_(True)
    frozen_ids = set()
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
        frozen_ids.update(id(m) for m in module.modules())
    # A frozen BatchNorm in train mode would still rewrite running_mean/var from CIFAR batches
    # (and normalise with batch statistics), silently changing the "frozen" features.
    if batchnorm == "eval":
        frozen_ids.update(id(m) for m in model.backbone.modules())
    model._frozen_bn = tuple(
        name for name, m in model.named_modules()
        if id(m) in frozen_ids and isinstance(m, _BatchNorm)
    )
    model.train(model.training)  # re-apply the mode: BN unfrozen since the last call trains again
