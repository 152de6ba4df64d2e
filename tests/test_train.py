"""Training behaviour a user would notice: it learns, phases hand over, resume is exact, caches agree."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupted_run
from safetensors.torch import load_file

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.bundle import load_model
from cifar_transfer.artifacts.rundir import run_split
from cifar_transfer.models.temperature import fit_temperature
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.results.runs import evaluate_run, predict_split
from cifar_transfer.system import hardware
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import core, finish, loop, phases
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.features import extract_features

METRIC_KEYS = {
    "phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "seconds",
    "elapsed_seconds",
}  # fmt: skip


def tiny(recipe: str, cifar_dir, *extra: str):
    """A recipe shrunk to a seconds-long CPU run on the synthetic folder."""
    cfg = load_recipe(recipe)
    return apply_overrides(cfg, [
        f"data.data_dir={cifar_dir}", "data.val_size=100", "run.threads=2",
        "run.compile_features=off", "run.eval_batch_size=100", *extra,
    ])  # fmt: skip


def two_phase(cifar_dir, *extra: str):
    """Head on cached features, then everything unfrozen with augmentation: resnet18 at 32 px."""
    return tiny(
        "seed-native-32", cifar_dir, "model.backbone=resnet18", "model.weights=none",
        "phases.0.epochs=2", "phases.1.epochs=2", "phases.*.batch_size=50",
        "phases.1.lr=0.001", "phases.1.augment=crop-flip", *extra,
    )


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cnn_learns_above_chance_and_writes_the_run_dir(cifar_dir, tmp_path):
    cfg = tiny("cnn-baseline", cifar_dir, "phases.0.epochs=4", "phases.0.batch_size=32")
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert summary["val_acc"] > 0.5, "10 easy classes: far above 10% chance after 4 epochs"
    for name in ("config.toml", "metrics.jsonl", "model.safetensors", "model.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert len(rows) == 4 and all(METRIC_KEYS <= set(r) for r in rows)
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"][0] == "airplane" and meta["resolution"] == 32 and meta["backbone"] == "cnn"


def test_phases_hand_over_frozen_then_unfrozen(cifar_dir, tmp_path):
    cfg = two_phase(cifar_dir)
    run = train_mod.Run(cfg, tmp_path, progress=False)
    before = {k: v.clone() for k, v in run.model.backbone.state_dict().items()}
    run.run_plan(run.plans[0])
    after_head = run.model.backbone.state_dict()
    assert all(torch.equal(before[k], after_head[k]) for k in before), "frozen phase moved the backbone"
    run.run_plan(run.plans[1])
    after_ft = run.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after_ft[k]) for k in before if "weight" in k)
    rows = run.log.rows
    assert [r["phase"] for r in rows] == [0, 0, 1, 1]
    assert [r["cached_features"] for r in rows] == [True, True, False, False]
    assert "extract_seconds" in rows[0]


def test_a_phase_runs_at_its_own_precision(cifar_dir, tmp_path, monkeypatch):
    # bf16 features for the frozen phase, fp32 training after it: what each step actually ran at.
    cfg = two_phase(cifar_dir, "run.precision=fp32", "phases.0.precision=bf16", "phases.1.epochs=1")
    extracted, trained = [], []
    real_extract, real_autocast = phases.extract_features, hardware.autocast

    def spy_extract(model, images, **kwargs):
        extracted.append(kwargs["precision"])
        return real_extract(model, images, **kwargs)

    def spy_autocast(device, precision):
        trained.append(precision)
        return real_autocast(device, precision)

    monkeypatch.setattr(phases, "extract_features", spy_extract)
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))  # extract, not reuse
    monkeypatch.setattr(hardware, "autocast", spy_autocast)
    train_mod.train(cfg, tmp_path / "run", progress=False)
    assert extracted == ["bf16", "bf16"]  # train and val features of phase 0
    # Forward passes in order: each epoch's steps then its validation (one batch of 100): phase
    # 0's head in bf16, then every step and the validation of phase 1 in fp32.
    n_steps = -(-len(core.load_data(cfg, torch.device("cpu")).train_y) // 50)
    # Nothing after: the temperature is fitted on the kept epoch's validation logits.
    assert trained == ["bf16"] * (2 * (n_steps + 1)) + ["fp32"] * (n_steps + 1)


def test_a_phase_precision_must_be_a_known_one(cifar_dir):
    with pytest.raises(UserError, match=r"phases.0.precision: 'fp8'"):
        two_phase(cifar_dir, "phases.0.precision=fp8")


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-5), ("bf16", 0.1)])
def test_cached_features_equal_live_features(cifar_dir, tmp_path, precision, atol):
    """The cache holds what a live forward pass computes: to fp32 rounding, or within bf16's
    8-bit mantissa (features here are O(1); the fp32 run is the reference for both)."""
    cfg = two_phase(cifar_dir, f"run.precision={precision}")
    run = train_mod.Run(cfg, tmp_path, progress=False)
    assert run.plans[0].precision == precision and run.plans[0].resolution == 32
    train_feats, train_y, val_feats, _ = phases.frozen_features(run, run.plans[0])
    assert torch.equal(train_y, run.data.train_y)
    model = run.model.eval()
    live = extract_features(model, run.data.val_x, 32, 64, "fp32", True, "live")
    assert torch.allclose(val_feats.float(), live, atol=atol)
    assert (val_feats.float() - live).abs().mean() < atol / 10
    again, _, _, _ = phases.frozen_features(run, run.plans[0])  # served from the cache
    assert torch.equal(again, train_feats)


def test_cached_flips_add_each_training_images_mirror_and_leave_val_plain(cifar_dir, tmp_path):
    cfg = two_phase(cifar_dir, "run.precision=fp32")
    run = train_mod.Run(cfg, tmp_path, progress=False)
    plain, _, val_plain, _ = phases.frozen_features(run, run.plans[0])
    run.cfg.phases[0].cached_flips = True  # the run holds its own copy of the config
    feats, y, val_feats, _ = phases.frozen_features(run, run.plans[0])
    n = len(run.data.train_y)
    assert feats.shape == (2 * n, plain.shape[1])
    assert torch.equal(y, torch.cat([run.data.train_y, run.data.train_y]))
    assert torch.equal(feats[:n], plain) and torch.equal(val_feats, val_plain)
    mirrored = run.data.train_x.flip(-1)  # (N, 3, H, W): -1 is the width, a horizontal flip
    live = extract_features(run.model.eval(), mirrored, 32, 64, "fp32", True, "live")
    assert torch.allclose(feats[n:], live, atol=1e-5)
    assert not torch.allclose(feats[n:], plain, atol=1e-2), "the mirror images' features are the originals'"


@pytest.mark.parametrize("extra", [[], ["run.ema=0.9"]], ids=["plain", "ema"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(extra, cifar_dir, tmp_path, monkeypatch):
    cfg = two_phase(cifar_dir, *extra)
    train_mod.train(cfg, tmp_path / "whole", progress=False)

    interrupted_run(monkeypatch, cfg, tmp_path / "broken", 3)  # mid phase 1, after its first epoch's checkpoint
    train_mod.resume(tmp_path / "broken", progress=False)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "broken" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "resume changed the result"
    drop = rundir.TIMING_KEYS
    clean = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "whole")]
    again = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "broken")]
    elapsed = [r["elapsed_seconds"] for r in read_metrics(tmp_path / "broken")]
    assert elapsed == sorted(elapsed), "a resumed run's elapsed_seconds must go on from the last row"
    assert clean == again


def test_keep_best_and_evaluate_reproduce_the_best_val_acc(cifar_dir, tmp_path):
    cfg = tiny("cnn-baseline", cifar_dir, "phases.0.epochs=3", "phases.0.batch_size=32")
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert summary["val_acc"] == max(r["val_acc"] for r in rows)
    result = evaluate_run(tmp_path / "run", "val", None)
    assert result["accuracy"] == pytest.approx(summary["val_acc"], abs=1e-6)
    assert sum(map(sum, result["confusion_matrix"])) == result["n"] == 100
    saved = json.loads((tmp_path / "run" / "eval-val.json").read_text())
    assert set(saved["per_class"]["cat"]) >= {"precision", "recall"}
    model, meta = load_model(tmp_path / "run")
    assert not model.training and meta["recipe"] == "cnn-baseline"


def test_the_temperature_is_fitted_on_the_kept_epochs_logits_with_no_second_pass(
    cifar_dir, tmp_path, monkeypatch
):
    # Fine-tuning's best epoch already scored every validation image: the temperature fit reads
    # those logits (a pass at 224 px costs a CPU about 45 s), and they are what evaluate computes.
    def no_second_pass(*args, **kwargs):
        raise AssertionError("the run scored the validation images again after training")

    monkeypatch.setattr(finish, "predict_logits", no_second_pass)
    cfg = tiny("cnn-baseline", cifar_dir, "phases.0.epochs=3", "phases.0.batch_size=32")
    train_mod.train(cfg, tmp_path / "run", progress=False)
    t = json.loads((tmp_path / "run" / "model.json").read_text())["temperature"]
    preds = predict_split(tmp_path / "run", run_split(tmp_path / "run", split="val"))
    assert preds.temperature == t != 1.0
    assert t == pytest.approx(fit_temperature(preds.logits, preds.split.labels), rel=1e-4)


def test_early_stopping_ends_a_phase_and_resume_does_not_reopen_it(cifar_dir, tmp_path):
    cfg = tiny(
        "cnn-baseline", cifar_dir, "phases.0.epochs=30", "phases.0.early_stop_patience=1",
        "phases.0.lr=1e-9",  # nothing improves, so the phase stops after patience + 1 epochs
    )
    train_mod.train(cfg, tmp_path / "run", progress=False)
    stopped = len(read_metrics(tmp_path / "run"))
    assert stopped < 30
    train_mod.resume(tmp_path / "run", progress=False)
    assert len(read_metrics(tmp_path / "run")) == stopped


def test_a_used_run_dir_is_never_overwritten(cifar_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    cfg = tiny("cnn-baseline", cifar_dir, "phases.0.epochs=1")
    with pytest.raises(UserError, match="--resume"):
        train_mod.train(cfg, run, progress=False)
    assert (run / "notes.txt").read_text() == "mine" and len(list(run.iterdir())) == 1


def test_resume_needs_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="not a run dir"):
        train_mod.resume(tmp_path, progress=False)


def test_nan_loss_stops_with_a_clear_message(cifar_dir, tmp_path):
    cfg = tiny("cnn-baseline", cifar_dir, "phases.0.epochs=1", "phases.0.lr=1e30",
               "phases.0.optimizer=sgd")
    with pytest.raises(UserError, match="lower the lr"):
        train_mod.train(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("recipe", sorted(__import__("cifar_transfer.recipes").recipes.recipe_names()))
def test_every_shipped_recipe_runs_one_tiny_step(recipe, cifar_dir, tmp_path):
    """The recipe's own backbone, head and freezing, random init, 32 px, one epoch per phase."""
    cfg = load_recipe(recipe)
    overrides = ["model.weights=none", "model.resolution=32", "phases.*.resolution=32",
                 "phases.*.epochs=1", "data.train_limit=40", "phases.*.batch_size=20"]
    cfg = tiny(recipe, cifar_dir, *overrides)
    summary = train_mod.train(cfg, tmp_path / recipe, progress=False)
    rows = read_metrics(tmp_path / recipe)
    assert summary["epochs_run"] == len(rows)
    assert sorted({r["phase"] for r in rows}) == list(range(len(cfg.phases))), "every phase ran"
    assert (tmp_path / recipe / "model.safetensors").is_file()


def test_progressive_resizing_changes_only_the_resolution(cifar_dir, tmp_path, monkeypatch):
    """Two fine-tuning phases at 32 then 48 px see the same batches, labels and augmentation
    draws as a run at 32 px throughout: only the size the images are resized to differs."""
    seen: list[tuple[int, tuple[int, ...], int]] = []
    real = loop.to_model_input

    def spy(images, resolution, mean, std, channels_last=True):
        seen.append((resolution, tuple(images.shape[-2:]), int(images.long().sum())))
        return real(images, resolution, mean, std, channels_last)

    monkeypatch.setattr(loop, "to_model_input", spy)
    runs = {}
    for second in (32, 48):
        seen.clear()
        cfg = tiny(
            "seed-native-32", cifar_dir, "model.backbone=resnet18", "model.weights=none",
            "phases.*.freeze=none", "phases.*.augment=crop-flip", "phases.*.epochs=1",
            "phases.*.batch_size=50", "data.train_limit=100", "phases.0.resolution=32",
            f"phases.1.resolution={second}", "data.val_size=0",
        )  # fmt: skip
        train_mod.train(cfg, tmp_path / f"run{second}", progress=False)
        runs[second] = list(seen)
    assert [r for r, _, _ in runs[48]] == [32, 32, 48, 48]
    assert [r for r, _, _ in runs[32]] == [32, 32, 32, 32]
    # the same 32x32 source batches, augmented the same way, in both runs
    assert [(s, h) for _, s, h in runs[48]] == [(s, h) for _, s, h in runs[32]]
    rows = read_metrics(tmp_path / "run48")
    assert [r["resolution"] for r in rows] == [32, 48]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_bundle_names_the_resolution_its_best_weights_were_validated_at(
    precision, cifar_dir, tmp_path
):
    """The best epoch is in a 64 px phase, a later 32 px phase scores lower: model.json must say
    64 px (and the precision it ran at), and `evaluate --split val` must print its val_acc exactly."""
    cfg = tiny(
        "seed-native-32", cifar_dir, "model.backbone=resnet18", "model.weights=none",
        "phases.*.freeze=all", "phases.*.augment=none", "phases.*.batch_size=50",
        "phases.0.epochs=3", "phases.0.resolution=64", "phases.0.lr=0.01",
        "phases.1.epochs=1", "phases.1.resolution=32", "phases.1.lr=0.01",
        f"run.precision={precision}", "phases.1.precision=fp32",
    )  # fmt: skip
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    best = max(rows, key=lambda r: r["val_acc"])
    assert best["phase"] == 0 and rows[-1]["val_acc"] < best["val_acc"], "the setup this test needs"
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["resolution"] == 64 and meta["val_acc"] == best["val_acc"] == summary["val_acc"]
    # "auto": what measured fastest for phase 0's step on this machine (cached per machine)
    assert meta["precision"] == core.plan_phases(cfg, 32, torch.device("cpu"))[0].precision
    assert evaluate_run(tmp_path / "run", "val", None)["accuracy"] == meta["val_acc"]


def test_a_frozen_phase_after_fine_tuning_never_reads_features_of_other_weights(cifar_dir, tmp_path):
    """The cache is keyed by the backbone's weights as they are, not by their source: after a
    fine-tuning phase (write-up 2's order) the features must be the fine-tuned backbone's."""
    cfg = two_phase(cifar_dir, "run.precision=fp32")
    run = train_mod.Run(cfg, tmp_path, progress=False)
    before, _, _, _ = phases.frozen_features(run, run.plans[0])
    with torch.no_grad():  # what a fine-tuning phase does to the backbone
        for p in run.model.backbone.parameters():
            p.mul_(1.1)
    after, _, val_after, _ = phases.frozen_features(run, run.plans[0])
    assert not torch.allclose(before, after, atol=1e-3), "served the old weights' features"
    live = extract_features(run.model.eval(), run.data.val_x, 32, 100, "fp32", True, "live")
    assert torch.allclose(val_after, live, atol=1e-5)
