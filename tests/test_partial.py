"""Cached partial fine-tuning (phases.N.cache_frozen): the cut model computes what the whole one
does, a run on stored maps validates to what `evaluate` prints, resumes bit-exactly, and its
cache re-extracts exactly when the frozen weights, the resolution or the images change."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupted_run, write_cifar_dir
from safetensors.torch import load_file

from cifar_transfer.artifacts import rundir
from cifar_transfer.cli import main
from cifar_transfer.config import PhaseConfig
from cifar_transfer.data.augment import map_shift, translate
from cifar_transfer.models.split import TopModel, frozen_split, split_as
from cifar_transfer.models.transfer import apply_freeze, create_model
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import partial, phases
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.bench import measure
from cifar_transfer.training.features import weights_fingerprint
from cifar_transfer.training.plan import PhasePlan


@pytest.mark.parametrize("backbone,freeze", [
    ("efficientnet_lite0", "from-layer:100"), ("efficientnet_lite0", "until:blocks5"),
    ("resnet18", "until:layer2"), ("resnet50", "from-layer:100"),
])  # fmt: skip
def test_the_cut_model_computes_exactly_what_the_whole_one_does(backbone, freeze):
    torch.manual_seed(0)
    model = create_model(backbone, "none", "linear").eval()
    apply_freeze(model, freeze)
    split = frozen_split(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole, cut = model(x), TopModel(split, model)(split.bottom(x))
    assert torch.equal(whole, cut)
    assert 0 < split.at < split.blocks
    # the bottom is exactly the frozen blocks: nothing that trains is cached
    assert all(not p.requires_grad for p in split.bottom.parameters())
    assert any(p.requires_grad for p in split.top[0].parameters())


@pytest.mark.parametrize("freeze,says", [("none", "first block"), ("all", "whole backbone")])
def test_a_split_needs_a_frozen_prefix_and_a_training_top(freeze, says):
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, freeze)
    with pytest.raises(UserError, match=says):
        frozen_split(model)


def test_a_backbone_that_is_not_a_chain_of_blocks_says_so():
    model = create_model("cnn", "none", "linear")
    apply_freeze(model, "until:block1")
    with pytest.raises(UserError, match="cache_frozen = false"):
        frozen_split(model)


def test_map_translation_keeps_shape_dtype_and_is_seeded():
    maps = torch.randn(8, 16, 10, 10).to(torch.bfloat16)
    a = translate(maps, torch.Generator().manual_seed(3), map_shift(10))
    b = translate(maps, torch.Generator().manual_seed(3), map_shift(10))
    assert a.shape == maps.shape and a.dtype == maps.dtype and torch.equal(a, b)
    assert map_shift(10) == 1 and map_shift(14) == 2 and map_shift(5) == 1
    # a shift moves content, never invents it: every output cell is an input cell or zero
    moved = translate(torch.ones(4, 1, 6, 6), torch.Generator().manual_seed(0), 1)
    assert set(moved.unique().tolist()) <= {0.0, 1.0} and moved.sum() >= 4 * 25


def test_map_inputs_pick_the_mirror_maps_for_flip():
    train, mirror = torch.zeros(6, 2, 3, 3), torch.ones(6, 2, 3, 3)
    inputs = partial.MapInputs(train, torch.arange(6), train, torch.arange(6), False, 32, (0.5,) * 3,
                               (0.5,) * 3, ["flip"], False, mirror_x=mirror)  # fmt: skip
    x, y, mixed = inputs.train_batch(torch.arange(6), slice(None), torch.Generator().manual_seed(1))
    picked = x.flatten(1).mean(1)
    assert mixed is None and torch.equal(y, torch.arange(6))
    assert set(picked.tolist()) == {0.0, 1.0}  # some plain, some mirrored, with this seed


def cfg_for(data_dir: Path, *extra: str, backbone: str = "efficientnet_lite0"):
    return apply_overrides(load_recipe("fast-cpu"), [
        f"data.data_dir={data_dir}", "data.val_size=60", "data.train_limit=120",
        f"model.backbone={backbone}", "model.weights=none", "model.resolution=48",
        "phases.0.precision=fp32", "phases.1.precision=fp32", "phases.1.freeze=from-layer:100",
        "phases.1.cache_frozen=true", "phases.1.epochs=2", "phases.1.batch_size=40",
        "run.threads=1", "run.compile_features=off", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def cached_run(cifar_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CIFAR_TRANSFER_CACHE", str(cache))
    out = tmp_path_factory.mktemp("cached") / "run"
    train_mod.train(cfg_for(cifar_dir), out, progress=False)
    yield out, cache
    mp.undo()


def test_a_cached_run_trains_the_top_on_stored_maps_and_evaluate_agrees(cached_run, capsys):
    out, cache = cached_run
    rows = rundir.read_metrics(out)
    tuned = [r for r in rows if r["phase"] == 1]
    assert len(tuned) == 2 and all(r.get("cached_maps") for r in tuned)
    assert "extract_seconds" in tuned[0]
    maps = sorted((cache / "maps").glob("*.safetensors"))
    assert len(maps) == 3  # train, mirrored train (augment has flip), val
    # the bundle's val_acc is what evaluate computes from the images through the whole model
    info = json.loads((out / rundir.META).read_text())
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    report = json.loads((out / "eval-val.json").read_text())
    assert report["accuracy"] == info["val_acc"]


def test_top_logits_on_maps_as_stored_equal_the_whole_models_on_images(cached_run):
    """fp32, trained weights: exactly, after the round trip the cache makes (stored contiguous,
    read back channels_last)."""
    out, _ = cached_run
    model = create_model("efficientnet_lite0", "none", "linear", num_classes=10)
    model.load_state_dict(load_file(out / rundir.WEIGHTS))
    model = model.to(memory_format=torch.channels_last).eval()
    apply_freeze(model, "from-layer:100")
    split = frozen_split(model)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    plan = type("P", (), {"resolution": 48, "precision": "fp32"})()
    maps = partial.extract_maps(split.bottom, images, plan, model.spec.mean, model.spec.std, 256,
                                True, "", False).contiguous(memory_format=torch.channels_last)
    from cifar_transfer.data.transforms import to_model_input

    x = to_model_input(images, 48, model.spec.mean, model.spec.std, True)
    with torch.no_grad():
        assert torch.equal(model(x), TopModel(split, model)(maps))


def test_the_map_cache_key_follows_the_frozen_weights_resolution_and_images():
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "until:layer2")
    split = frozen_split(model)
    fp = weights_fingerprint(split.bottom)
    key = partial.map_key("resnet18", fp, split, 64, "bf16", "data1")
    with torch.no_grad():
        model.backbone.layer4[0].conv1.weight.add_(1)  # the top changed: same maps
    assert weights_fingerprint(split.bottom) == fp
    with torch.no_grad():
        model.backbone.layer1[0].conv1.weight.add_(1)  # the bottom changed: new maps
    assert weights_fingerprint(split.bottom) != fp
    assert len({key, partial.map_key("resnet18", fp, split, 96, "bf16", "data1"),
                partial.map_key("resnet18", fp, split, 64, "fp32", "data1"),
                partial.map_key("resnet18", fp, split, 64, "bf16", "data2")}) == 4


def test_a_second_run_reads_the_maps_and_other_images_extract_again(cached_run, cifar_dir, tmp_path,
                                                                    monkeypatch):
    _, cache = cached_run
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(cache))
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "maps").glob("*")}
    train_mod.train(cfg_for(cifar_dir, "phases.1.epochs=1"), tmp_path / "again", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "maps").glob("*")} == before
    other = write_cifar_dir(tmp_path / "other", per_batch=100, seed=5)
    train_mod.train(cfg_for(other, "phases.1.epochs=1"), tmp_path / "other-run", progress=False)
    assert len(list((cache / "maps").glob("*"))) == len(before) + 3


def test_a_cached_run_resumes_bit_exactly(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    cfg = cfg_for(cifar_dir, "phases.1.epochs=3", "phases.1.mixup=0.2")
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 2)  # the probe's checkpoint, then the first cached epoch's
    shutil.rmtree(tmp_path / "cache")  # the maps are extracted again: the same bits
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    a, b = (load_file(tmp_path / d / rundir.WEIGHTS) for d in ("whole", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sets,says", [
    (["phases.1.freeze=none"], "needs a freeze that leaves the top training"),
    (["phases.1.freeze=until:blocks4", "phases.1.augment=rrc,flip"], "only flip and crop apply, not rrc"),
])  # fmt: skip
def test_bad_cache_frozen_settings_are_one_line(cifar_dir, tmp_path, capsys, sets, says):
    args = ["train", "--recipe", "fast-cpu", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "r"),
            "--set", "phases.1.cache_frozen=true", *(a for s in sets for a in ("--set", s))]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "r").exists()


def test_maps_that_do_not_fit_memory_are_refused_before_extracting(monkeypatch):
    monkeypatch.setattr(partial, "available_memory", lambda: 2**20)
    with pytest.raises(UserError, match="freeze more of the backbone"):
        partial.check_map_memory(10_000, (112, 10, 10), torch.bfloat16, "phase 'finetune'")
    partial.check_map_memory(10, (112, 10, 10), torch.bfloat16, "phase 'finetune'")  # fits


def test_bench_times_the_cached_step_and_the_extraction():
    for mode in ("train-maps", "infer-maps"):
        cell = measure("resnet18", 32, "fp32", mode, 4, 0.1, torch.device("cpu"), freeze="until:layer2")
        assert cell.img_per_s > 0 and cell.steps >= 2


def test_a_phase_built_in_code_with_an_image_op_is_refused():
    phase = PhaseConfig(freeze="until:layer2", cache_frozen=True, augment=["trivial"])
    plan = type("P", (), {"phase": phase})()
    with pytest.raises(UserError, match="only flip and crop"):
        partial.map_inputs(None, plan)  # type: ignore[arg-type]


def test_the_budget_planner_prices_cached_partial_plans_and_applies_them():
    from cifar_transfer.training import budget

    lite = budget.Candidate("efficientnet_lite0", (160,), kinds=("partial", "cached"),
                            precisions=("fp32",))
    tput = {budget.Cell("efficientnet_lite0", 160, "fp32", "infer", 64): 300.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "train", 32, "from-layer:100"): 100.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "infer-maps", 64, "until:blocks4"): 400.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "train-maps", 32, "until:blocks4"): 250.0}
    assert set(budget.cells_needed([lite])) == set(tput)
    plan = budget.plan_budget(tput, 3600, 45_000, 5_000, [lite], overhead_s=20)
    kinds = {plan.kind, *(a["kind"] for a in plan.alternatives)}
    assert {"probe", "partial", "cached"} <= kinds  # weighed side by side
    photo = load_recipe("small-folder")
    forced = budget.plan_budget(tput, 3600, 45_000, 5_000, [
        budget.Candidate("efficientnet_lite0", (160,), kinds=("cached",), precisions=("fp32",))],
        overhead_s=20)  # fmt: skip
    assert forced.kind == "cached"
    # the one extraction over train, mirror train and val is priced, then cheaper epochs
    assert forced.maps_seconds == pytest.approx((2 * 45_000 + 5_000) / 400.0)
    assert forced.predicted_seconds <= 3600 and forced.epochs > 1
    assert any("store the frozen part's output" in line for line in forced.lines())
    cfg = budget.apply_plan(photo, forced, [photo.phases[0], photo.phases[-1]])
    tune = cfg.phases[-1]
    assert tune.cache_frozen and tune.freeze == "until:blocks4"
    assert tune.augment == ["crop", "flip"]  # rrc -> translation on the maps; trivial needs pixels
    assert tune.layer_decay == photo.phases[-1].layer_decay


def test_the_planner_prices_the_pilot_before_the_fine_tune():
    from cifar_transfer.training import budget
    from cifar_transfer.training.pilot_cost import LR_FIND_STEPS, pilot_cost, pilot_steps

    lite = budget.Candidate("efficientnet_lite0", (160,), kinds=("cached",), precisions=("fp32",))
    tput = {budget.Cell("efficientnet_lite0", 160, "fp32", "infer", 64): 300.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "infer-maps", 64, "until:blocks4"): 400.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "train-maps", 32, "until:blocks4"): 50.0}
    tune = PhaseConfig(batchnorm="auto", lr="find", batch_size=32)
    steps, vals = pilot_cost(tune, 2_400)
    assert (steps, vals) == (2 * LR_FIND_STEPS + 2 * pilot_steps(2_400, 32), 2)
    assert pilot_cost(PhaseConfig(batchnorm="eval", lr=0.01), 2_400) == (0, 0)  # nothing to measure
    plain = budget.plan_budget(tput, 600, 2_400, 600, [lite], overhead_s=20)
    piloted = budget.plan_budget(tput, 600, 2_400, 600, [lite], overhead_s=20,
                                 pilot=lambda batch: pilot_cost(tune, 2_400))  # fmt: skip
    assert piloted.pilot_seconds == pytest.approx(steps * 32 / 50.0 + vals * 600 / (3.0 * 50.0))
    # the pilot's seconds come out of the fine-tune's epochs, not out of the deadline
    assert piloted.epochs == pytest.approx(plain.epochs - piloted.pilot_seconds / plain.epoch_seconds)
    assert piloted.predicted_seconds == pytest.approx(plain.predicted_seconds)
    assert any(line.strip().startswith("pilot:") for line in piloted.lines())


def test_cached_plans_whose_maps_do_not_fit_memory_are_not_planned(monkeypatch):
    from cifar_transfer.data import folder
    from cifar_transfer.training import budget, measure

    lite = budget.Candidate("efficientnet_lite0", (160,), kinds=("partial", "cached"), precisions=("fp32",))
    assert measure.maps_fit(lite, 160, "fp32", 45_000, 5_000)  # ~4.3 GB of 112x10x10 fp32 maps
    monkeypatch.setattr(folder, "available_memory", lambda: 2 * 2**30)
    assert not measure.maps_fit(lite, 160, "fp32", 45_000, 5_000)
    assert measure.maps_fit(lite, 160, "bf16", 4_500, 500)
    tput = {budget.Cell("efficientnet_lite0", 160, "fp32", "infer", 64): 300.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "train", 32, "from-layer:100"): 100.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "infer-maps", 64, "until:blocks4"): 400.0,
            budget.Cell("efficientnet_lite0", 160, "fp32", "train-maps", 32, "until:blocks4"): 250.0}
    plan = budget.plan_budget(tput, 3600, 45_000, 5_000, [lite], overhead_s=20,
                              maps_fit=lambda c, r, p: False)
    assert "cached" not in {plan.kind, *(a["kind"] for a in plan.alternatives)}


def test_a_recipes_predicted_time_prices_one_extraction_and_epochs_on_maps():
    from cifar_transfer.training import recipe_price

    cfg = apply_overrides(load_recipe("fast-cpu"), [
        "phases.0.epochs=0", "phases.1.freeze=until:blocks4", "phases.1.cache_frozen=true",
        "phases.1.epochs=2", "phases.1.augment=crop,flip"])  # fmt: skip
    speeds = {"infer": 100.0, "infer-maps": 500.0, "train-maps": 250.0, "train": 50.0}
    total = recipe_price.recipe_seconds(cfg, lambda cell: speeds[cell.mode], 224)
    n_train, n_val = 45_000, 5_000
    assert total == pytest.approx((2 * n_train + n_val) / 500 + 2 * (n_train + n_val / 3) / 250)


def test_a_probe_before_a_cached_phase_is_priced_as_the_top_over_its_maps():
    """`recipes` prices a probe that the later phase's maps feed as the top's forward over them
    (what the run does), not a second pass of the whole backbone; a probe at another precision,
    or one whose mirror images the maps lack, still pays its own extraction."""
    from cifar_transfer.training import budget, recipe_price

    tuned = ["phases.1.freeze=until:blocks4", "phases.1.cache_frozen=true", "phases.1.epochs=2",
             "phases.0.cached_flips=true", "phases.0.precision=fp32", "phases.1.precision=fp32"]
    speeds = {"infer": 100.0, "infer-maps": 125.0, "train-maps": 250.0, "train": 50.0}
    n_train, n_val = 45_000, 5_000
    probe_images = 2 * n_train + n_val  # each training image and its mirror image, then val
    fit = budget.PROBE_FIT_S * n_train

    def priced(augment: str, *extra: str) -> tuple[float, bool]:
        cfg = apply_overrides(load_recipe("fast-cpu"), [*tuned, f"phases.1.augment={augment}", *extra])
        maps = (n_train * (2 if "flip" in augment else 1) + n_val) / 125
        probe = recipe_price.recipe_seconds(cfg, lambda cell: speeds[cell.mode], 224) - fit - maps - (
            2 * (n_train + n_val / 3) / 250)
        return probe, recipe_price.maps_phase(cfg, 0, 224) is not None

    assert priced("crop,flip") == (pytest.approx(probe_images * (1 / 100 - 1 / 125)), True)
    assert priced("crop,flip", "phases.0.precision=bf16") == (pytest.approx(probe_images / 100), False)
    assert priced("crop") == (pytest.approx(probe_images / 100), False)  # no mirror maps


# ---- the probe takes its features from the stored maps


def test_split_as_cuts_where_a_freeze_would_and_leaves_the_model_as_it_was():
    model = create_model("resnet18", "none", "linear")
    apply_freeze(model, "all")  # the probe's freeze
    model.train()
    before = ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
              model.frozen_batchnorm)  # fmt: skip
    split = split_as(model, "until:layer3")
    assert (split.at, split.name) == (7, "layer4.0")  # stem, layer1-3's six blocks: then layer4
    assert ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            model.frozen_batchnorm) == before  # fmt: skip


def test_the_probe_takes_the_maps_of_the_next_phase_that_changes_the_backbone_when_they_match():
    probe = PhaseConfig(name="probe", freeze="all", optimizer="lbfgs", augment=[])
    tune = PhaseConfig(name="tune", freeze="until:blocks4", cache_frozen=True, augment=["crop", "flip"])

    def found(*rows, flips=False):  # rows: (phase, resolution, precision) after the probe at 48/fp32
        rows = ((dataclasses.replace(probe, cached_flips=flips), 48, "fp32"), *rows)
        plans = [PhasePlan(i, ph, res, prec, ph.uses_cache(True), ph.caches_maps(True))
                 for i, (ph, res, prec) in enumerate(rows)]  # fmt: skip
        later = partial.maps_phase_for(SimpleNamespace(plans=plans), plans[0])
        return None if later is None else later.phase.name

    assert found((tune, 48, "fp32")) == "tune"
    assert found((tune, 48, "bf16")) is None  # other numbers: the probe extracts its own
    assert found((tune, 64, "fp32")) is None
    head = PhaseConfig(name="head", freeze="all", augment=["flip"])  # trains the head only
    full = PhaseConfig(name="full", freeze="none")
    assert found((head, 48, "fp32"), (tune, 48, "fp32")) == "tune"
    assert found((full, 48, "fp32"), (tune, 48, "fp32")) is None  # the backbone moves between
    skipped = dataclasses.replace(full, epochs=0)
    assert found((skipped, 48, "fp32"), (tune, 48, "fp32")) == "tune"
    assert found((dataclasses.replace(tune, epochs=0), 48, "fp32")) is None
    assert found((tune, 48, "fp32"), flips=True) == "tune"  # its mirror maps give the mirror rows
    no_flip = dataclasses.replace(tune, augment=["crop"])
    assert found((no_flip, 48, "fp32"), flips=True) is None and found((no_flip, 48, "fp32")) == "tune"


def probe_then_cached(data_dir: Path, backbone: str, cut: str, *extra: str):
    return cfg_for(data_dir, f"phases.1.freeze={cut}", "phases.1.epochs=1", *extra, backbone=backbone)


@pytest.mark.parametrize("backbone,cut,flips", [
    ("efficientnet_lite0", "until:blocks4", True), ("resnet18", "until:layer3", False),
])  # fmt: skip
def test_the_probe_on_the_stored_maps_equals_the_probe_on_the_images_bit_for_bit(
    cifar_dir, tmp_path, monkeypatch, capsys, backbone, cut, flips
):
    """fp32: the same features (and cache entries), probe rows, bundle and evaluate's val_acc,
    while the whole backbone never runs for the probe and the bottom runs once per image."""
    cfg = functools.partial(probe_then_cached, cifar_dir, backbone, cut, f"phases.0.cached_flips={str(flips).lower()}")
    whole, bottoms = [], []
    real_extract, real_maps, real_frozen = phases.extract_features, partial.extract_maps, partial.frozen_maps
    monkeypatch.setattr(phases, "extract_features",
                        lambda model, images, **kw: whole.append(len(images)) or real_extract(model, images, **kw))
    monkeypatch.setattr(partial, "extract_maps",
                        lambda bottom, images, *a: bottoms.append(len(images)) or real_maps(bottom, images, *a))
    gets = []  # each time a phase gets its maps (from the map cache or extracting them)
    monkeypatch.setattr(partial, "frozen_maps", lambda *a: gets.append(1) or real_frozen(*a))
    runs = {}
    for how in ("maps", "images"):
        if how == "images":  # as before: the probe extracts its own features
            monkeypatch.setattr(partial, "probe_maps", lambda run, plan: None)
        monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / how / "cache"))
        whole.clear()
        bottoms.clear()
        gets.clear()
        capsys.readouterr()
        train_mod.train(cfg(), tmp_path / how / "run", progress=True)
        said = capsys.readouterr().out
        runs[how] = (len(whole), sorted(n for n in bottoms if n > 1), said, len(gets))
    n_train, n_val = 120, 60  # data.train_limit=120 training images, data.val_size=60
    # the whole backbone ran only for the probe on the images: train (+ mirror) and val
    assert runs["maps"][0] == 0 and runs["images"][0] == (3 if flips else 2)
    # the bottom ran once per image and mirror image in either run
    assert runs["maps"][1] == runs["images"][1] == sorted([n_train, n_train, n_val])
    # and got once: the probe's maps were handed to the cached phase, not read back from the cache
    assert runs["maps"][3] == runs["images"][3] == 1
    assert "features from the maps stored for phase 'finetune'" in runs["maps"][2]
    assert "features from the maps" not in runs["images"][2]

    feats = {how: {f.name: load_file(f)["features"] for f in (tmp_path / how / "cache" / "features").glob("*")}
             for how in runs}  # fmt: skip
    assert feats["maps"].keys() == feats["images"].keys() and len(feats["maps"]) == (3 if flips else 2)
    assert all(torch.equal(feats["maps"][k], feats["images"][k]) for k in feats["maps"])
    rows = {how: rundir.read_metrics(tmp_path / how / "run") for how in runs}
    probe = {how: [r for r in rows[how] if r["phase"] == 0] for how in runs}
    assert probe["maps"][0]["features_from_maps"] is True and "features_from_maps" not in probe["images"][0]
    assert [r["val_acc"] for r in probe["maps"]] == [r["val_acc"] for r in probe["images"]]
    assert [r["val_acc"] for r in rows["maps"]] == [r["val_acc"] for r in rows["images"]]
    a, b = (load_file(tmp_path / how / "run" / rundir.WEIGHTS) for how in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "maps" / "run" / rundir.META).read_text())
    assert main(["evaluate", str(tmp_path / "maps" / "run"), "--split", "val"]) == 0
    assert json.loads((tmp_path / "maps" / "run" / "eval-val.json").read_text())["accuracy"] == info["val_acc"]


def test_a_probe_at_another_precision_extracts_its_own_features(cifar_dir, tmp_path, monkeypatch):
    cfg = probe_then_cached(cifar_dir, "resnet18", "until:layer3", "phases.0.precision=bf16")
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    whole, real_extract = [], phases.extract_features
    monkeypatch.setattr(phases, "extract_features",
                        lambda model, images, **kw: whole.append(kw["precision"]) or real_extract(model, images, **kw))
    run = train_mod.Run(cfg, tmp_path / "run", progress=False)
    assert [p.precision for p in run.plans] == ["bf16", "fp32"] and run.plans[1].maps
    run.run_plan(run.plans[0])
    assert whole == ["bf16", "bf16"]  # train and val, through the whole backbone
    assert "features_from_maps" not in run.log.rows[0]
    assert not (tmp_path / "cache" / "maps").exists()  # the cached phase will store its own


def test_a_cached_phase_with_ema_keeps_the_better_of_the_average_and_the_raw_weights_and_resumes(
    cifar_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    cfg = cfg_for(cifar_dir, "phases.1.epochs=3", "run.ema=0.9")
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    rows = [r for r in rundir.read_metrics(tmp_path / "whole") if r["phase"] == 1]
    assert len(rows) == 3
    for r in rows:  # both validated; the row's figure is the better one, and says which
        assert r["val_acc"] == max(r["val_acc_raw"], r["val_acc_ema"])
        assert r["ema_kept"] == (r["val_acc_ema"] > r["val_acc_raw"])
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 2)  # the probe's checkpoint, then the first cached epoch's
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    a, b = (load_file(tmp_path / d / rundir.WEIGHTS) for d in ("whole", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = [r for r in rundir.read_metrics(tmp_path / "run") if r["phase"] == 1]
    assert [r["val_acc_ema"] for r in again] == [r["val_acc_ema"] for r in rows]
