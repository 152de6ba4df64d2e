"""A short offline smoke run on the real CIFAR-10 images (skipped where ../shared/cifar10 is absent)."""

from __future__ import annotations

from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.training import run as train_mod


def test_cnn_on_real_cifar10_beats_chance(real_data, tmp_path):
    cfg = apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={real_data}", "data.val_size=1000", "data.train_limit=3000",
        "phases.0.epochs=2", "phases.0.batch_size=64", "run.threads=2",
    ])  # fmt: skip
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    assert summary["val_images"] == 1000 and summary["train_images"] == 3000
    assert summary["val_acc"] > 0.25, "ten classes: chance is 10%"
