"""The augmentation toolbox as a user meets it: every op keeps the batch's shape, dtype and device,
changes the images, replays exactly from a seed; mixup/cutmix targets add up; bad names are one
line; layer-wise LR decay gives each stage its share; a run with all of it resumes bit-exactly."""

from __future__ import annotations

import tomllib

import pytest
import torch
from conftest import interrupted_run
from test_resume import cnn_cfg, one_line, same_weights

from cifar_transfer.artifacts import rundir
from cifar_transfer.cli import main
from cifar_transfer.config import PhaseConfig
from cifar_transfer.config.augment import augment_ops
from cifar_transfer.data import autoaugment
from cifar_transfer.data.augment import augment
from cifar_transfer.data.mixing import mix
from cifar_transfer.models.transfer import create_model
from cifar_transfer.recipes import apply_overrides, load_recipe, to_toml
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.optim import make_optimizer, make_scheduler

OPS = ["flip", "crop", "crop-flip", "rrc", "rrc:0.35-1", "trivial", "randaugment",
       "randaugment:3-15", "jpeg:50-95", "jpeg:50-95:0.5", "rrc,flip,trivial"]  # fmt: skip


def images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images (a gradient + noise): no op leaves them unchanged by accident."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size).view(1, 1, 1, size)
    noise = torch.randint(0, 55, (n, 3, size, size), generator=g)
    return (ramp + noise).to(torch.uint8)


def run(x: torch.Tensor, ops, seed: int) -> torch.Tensor:
    return augment(x, ops, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ops", OPS)
def test_each_op_keeps_the_batch_changes_it_and_replays_from_its_seed(ops):
    x = images()
    out = run(x, ops, 1)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    assert not torch.equal(out, x)
    assert torch.equal(run(x, ops, 1), out)
    assert not torch.equal(run(x, ops, 2), out)


def test_the_old_words_are_their_lists_with_the_same_draws():
    x = images()
    assert augment_ops("none") == [] and torch.equal(run(x, "none", 0), x)
    assert augment_ops("crop-flip") == ["crop", "flip"]
    assert torch.equal(run(x, "crop-flip", 3), run(x, ["crop", "flip"], 3))
    assert augment_ops(["rrc:0.35-1", "flip"]) == augment_ops(" rrc:0.35-1 , flip")


def test_rrc_of_the_whole_image_is_the_image():
    """Scale 1 only fits at ratio 1 (else the fallback is the whole image): the grid is exact."""
    x = images()
    assert torch.equal(run(x, "rrc:1-1", 0), x)


def test_rrc_zooms_in():
    """A box of 10-20% of the area enlarged to the full size: neighbouring pixels agree more."""
    x = images(size=64)
    out = run(x, "rrc:0.1-0.2", 0).float()
    jumps = (out[..., 1:] - out[..., :-1]).abs().mean()
    assert jumps < 0.6 * (x.float()[..., 1:] - x.float()[..., :-1]).abs().mean()


def test_trivial_augment_picks_an_op_per_image_not_per_batch():
    """torchvision's v2 TrivialAugmentWide on a batch gives every image the same op; ours does not."""
    x = images(1).expand(32, -1, -1, -1).contiguous()  # 32 copies of one image
    out = run(x, "trivial", 0)
    distinct = {bytes(img.numpy()) for img in out}
    assert len(distinct) > 10


def test_trivial_augment_is_torchvisions_op_on_each_image():
    """Each image is exactly torchvision v2's op at the op, bin and sign drawn for it."""
    x = images(12)
    out = run(x, "trivial", 5)
    g = torch.Generator().manual_seed(5)  # replay the draws: op, bin, sign per image
    policy = autoaugment._policy("trivial")
    space = list(policy._AUGMENTATION_SPACE.items())
    ops = torch.randint(len(space), (12,), generator=g)
    bins = torch.randint(autoaugment.BINS, (12,), generator=g)
    negative = torch.rand(12, generator=g) <= 0.5
    for i in range(12):
        name, (magnitudes_fn, signed) = space[ops[i]]
        magnitudes = magnitudes_fn(autoaugment.BINS, 32, 32)
        value = 0.0 if magnitudes is None else float(magnitudes[bins[i]])
        value = -value if signed and negative[i] else value
        one = policy._apply_image_or_video_transform(
            x[i : i + 1], name, value, interpolation=policy.interpolation, fill=policy._fill
        )
        assert torch.equal(out[i : i + 1], one), (i, name, value)


def test_jpeg_quality_range_sets_the_damage():
    x = images(8, 64)
    err = {q: (run(x, f"jpeg:{q}-{q}", 0).float() - x.float()).abs().mean() for q in (10, 95)}
    assert 0 < err[95] < err[10]


def test_jpeg_with_a_share_recompresses_about_that_share_and_leaves_the_rest_lossless():
    x = images(200, 32)
    out = run(x, "jpeg:30-30:0.25", 0)
    changed = (out != x).flatten(1).any(1)
    assert 30 <= int(changed.sum()) <= 70  # ~50 of 200
    assert torch.equal(out[~changed], x[~changed])
    assert torch.equal(run(x, "jpeg:30-30:1", 0), run(x, "jpeg:30-30", 0))  # P = 1: as before


@pytest.mark.parametrize("ops", ["trivail", "rrc:0-1", "rrc:0.5-0.2", "jpeg:0-50", "jpeg:50.5-90",
                                 "flip:2", "randaugment:2-31", "rrc:small", "jpeg:50-95:0",
                                 "jpeg:50-95:1.5", "rrc:0.3-1:0.5"])  # fmt: skip
def test_a_bad_augment_is_one_line_naming_the_key_and_the_fix(ops):
    with pytest.raises(UserError) as err:
        apply_overrides(load_recipe("default"), [f"phases.1.augment={ops}"])
    message = str(err.value)
    assert message.startswith("bad value for phases.1.augment:") and "\n" not in message
    assert "choose from" in message or ":LO-HI" in message or ":N-M" in message


def test_a_bad_augment_on_the_command_line_is_one_error_line(tmp_path, capsys):
    code = main(["train", "--recipe", "cnn-baseline", "--set", "phases.0.augment=rrc,trivail",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    one_line(capsys, "phases.0.augment", "'trivail'", "choose from", "trivial")


@pytest.mark.parametrize("override", ["phases.0.mixup=-1", "phases.0.cutmix=-0.5",
                                      "phases.0.layer_decay=0", "phases.0.layer_decay=1.5"])  # fmt: skip
def test_bad_mixing_and_decay_values_are_one_line(override):
    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")) as err:
        apply_overrides(load_recipe("cnn-baseline"), [override])
    assert "\n" not in str(err.value)


def test_the_list_round_trips_through_toml_and_old_configs_load(tmp_path):
    cfg = apply_overrides(load_recipe("default"), ["phases.1.augment=rrc:0.35-1,flip,jpeg:60-90"])
    text = to_toml(cfg)
    assert tomllib.loads(text)["phases"][1]["augment"] == ["rrc:0.35-1", "flip", "jpeg:60-90"]
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_recipe(str(path)).phases[1].augment == ["rrc:0.35-1", "flip", "jpeg:60-90"]
    old = text.replace('augment = [\n    "rrc:0.35-1",\n    "flip",\n    "jpeg:60-90",\n]', 'augment = "crop-flip"')
    assert old != text
    path.write_text(old)
    assert load_recipe(str(path)).phases[1].augment == ["crop", "flip"]


def test_mixing_keeps_the_frozen_feature_cache_off():
    phase = PhaseConfig(freeze="all", augment="none")
    assert phase.uses_cache(True)
    phase.mixup = 0.2
    assert not phase.uses_cache(True)


# ---------------------------------------------------------------- mixup / cutmix


def labelled_batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i, label i: every pixel says where it came from."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return x, torch.arange(n)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_targets_sum_to_one_and_replay_from_the_seed(mixup, cutmix):
    x, y = labelled_batch()
    for seed in range(6):
        m = mix(x, y, torch.Generator().manual_seed(seed), mixup, cutmix)
        soft = m.targets(8)
        assert soft.shape == (8, 8) and torch.allclose(soft.sum(1), torch.ones(8))
        assert 0.5 <= m.lam <= 1 and m.x.shape == x.shape
        again = mix(x, y, torch.Generator().manual_seed(seed), mixup, cutmix)
        assert torch.equal(again.x, m.x) and again.lam == m.lam


def test_a_cutmix_box_carries_its_area_share_of_the_label():
    x, y = labelled_batch()
    for seed in range(10):
        m = mix(x, y, torch.Generator().manual_seed(seed), 0.0, 1.0)
        soft = m.targets(8)
        for i in range(8):
            partner = 7 - i  # paired with the mirrored position
            share = (m.x[i, 0] == partner).float().mean()
            assert torch.isclose(soft[i, partner], share), (seed, i)
        assert (soft[torch.arange(8), m.y] >= 0.5).all()  # y is each image's dominant label


def test_mixup_is_the_weighted_mean_of_the_pair():
    x, y = labelled_batch()
    m = mix(x, y, torch.Generator().manual_seed(0), 0.4, 0.0)
    soft = m.targets(8)
    # every pixel of image i is sum_j soft[i, j] * j
    assert torch.allclose(m.x[:, 0, 0, 0], soft @ torch.arange(8.0), atol=1e-5)


# ---------------------------------------------------------------- layer-wise LR decay


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_layer_decay_gives_each_stage_its_share_of_the_lr(schedule):
    model = create_model("resnet18", "none", "linear", num_classes=10)
    phase = PhaseConfig(lr=0.1, layer_decay=0.5, schedule=schedule, epochs=2)
    opt = make_optimizer(model, phase)
    sched = make_scheduler(opt, phase, steps_per_epoch=5)
    for _ in range(3):
        opt.step()
        sched.step()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    head = lr_of[id(model.head.weight)]
    b = model.backbone
    expected = {b.layer4[0].conv1.weight: 0.5, b.layer3[0].bn1.bias: 0.25, b.layer2[1].conv2.weight: 0.125,
                b.layer1[0].conv1.weight: 0.0625, b.conv1.weight: 0.03125, b.bn1.weight: 0.03125}
    for param, ratio in expected.items():
        assert lr_of[id(param)] == pytest.approx(head * ratio, rel=1e-9)
    assert opt.param_groups[0]["lr"] == head  # the logged lr is the head's
    assert {g["weight_decay"] for g in opt.param_groups} == {phase.weight_decay, 0.0}


def test_layer_decay_reaches_the_top_a_cached_phase_trains():
    from cifar_transfer.models.split import TopModel, frozen_split
    from cifar_transfer.models.transfer import apply_freeze

    model = create_model("resnet18", "none", "linear", num_classes=10)
    apply_freeze(model, "until:layer2")
    top = TopModel(frozen_split(model), model)  # what a cached phase's optimizer sees
    opt = make_optimizer(top, PhaseConfig(lr=0.1, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    b = model.backbone
    assert lr_of[id(model.head.weight)] == pytest.approx(0.1)
    assert lr_of[id(b.layer4[0].conv1.weight)] == pytest.approx(0.05)  # it used to be 0.1 everywhere
    assert lr_of[id(b.layer3[0].conv1.weight)] == pytest.approx(0.025)


def test_layer_decay_one_is_the_two_groups_as_before():
    model = create_model("resnet18", "none", "linear", num_classes=10)
    opt = make_optimizer(model, PhaseConfig(lr=0.1))
    assert len(opt.param_groups) == 2 and {g["lr"] for g in opt.param_groups} == {0.1}


# ---------------------------------------------------------------- resume


def test_a_run_with_rrc_flip_trivial_mixup_and_decay_resumes_bit_exactly(cifar_dir, tmp_path, monkeypatch):
    cfg = cnn_cfg(cifar_dir, "phases.0.augment=rrc,flip,trivial", "phases.0.mixup=0.2",
                  "phases.0.cutmix=1.0", "phases.0.layer_decay=0.7", "phases.0.epochs=2")  # fmt: skip
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 1)
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert same_weights(tmp_path / "whole", tmp_path / "run")
    whole, resumed = (rundir.read_metrics(tmp_path / d) for d in ("whole", "run"))
    drop = rundir.TIMING_KEYS | {"time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole
    ]
    assert all(0 <= r["train_acc"] <= 1 for r in whole if "train_acc" in r)
