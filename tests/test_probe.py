"""The L-BFGS linear probe: the same optimum as scikit-learn's logistic regression, and as a
training phase it keeps the penalty with the best validation accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import interrupted_run
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.results.runs import calibrate_run
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import core, finish, phases, probe
from cifar_transfer.training import run as train_mod


def blobs(n: int = 600, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping class clusters with unequal feature scales (so standardization matters)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    centers = torch.randn(10, d, generator=g)
    x = centers[y] + 1.5 * torch.randn(n, d, generator=g)
    return x * torch.linspace(0.1, 20, d) + 5.0, y


def test_probe_matches_scikit_learn_logistic_regression():
    x, y = blobs()
    l2 = 1e-2
    fit = next(probe.sweep(x, y, [l2]))
    mean, std = x.mean(0), x.std(0)
    z = ((x - mean) / std).numpy().astype(np.float64)
    ref = LogisticRegression(C=1.0 / (len(y) * l2), max_iter=5000, tol=1e-10).fit(z, y.numpy())
    ours = (x @ fit.weight.T + fit.bias).double()
    theirs = torch.from_numpy(ref.decision_function(z))
    # Softmax is shift-invariant per row: compare centred logits.
    ours, theirs = ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert 0.5 < fit.train_acc < 1.0 and fit.iterations > 0


def test_weaker_penalties_fit_the_training_set_tighter():
    x, y = blobs()
    fits = list(probe.sweep(x, y, [1e-4, 1e-1, 1e-2]))
    assert [f.l2 for f in fits] == [1e-1, 1e-2, 1e-4], "strongest first (warm starts)"
    losses = [f.train_loss for f in fits]
    assert losses[0] > losses[1] > losses[2]


def tiny_probe(cifar_dir, *extra: str):
    cfg = load_recipe("seed-frozen-224")
    return apply_overrides(cfg, [
        f"data.data_dir={cifar_dir}", "data.val_size=100", "run.threads=2",
        "run.compile_features=off", "run.eval_batch_size=100", "model.backbone=resnet18",
        "model.weights=none", "model.resolution=32", "phases.0.optimizer=lbfgs",
        "phases.0.l2_values=1e-1,1e-3,1e-5", *extra,
    ])  # fmt: skip


def test_lbfgs_phase_writes_a_row_per_penalty_and_keeps_the_best(cifar_dir, tmp_path, monkeypatch):
    cfg = tiny_probe(cifar_dir)
    with monkeypatch.context() as m:  # the temperature is fitted on the cached val features
        m.setattr(finish, "predict_logits", lambda *a, **k: pytest.fail("a second val pass"))
        summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["l2"] for r in rows] == [1e-1, 1e-3, 1e-5]
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert summary["val_acc"] == pytest.approx(best["val_acc"])
    assert best["val_acc"] > 0.3, "a linear probe on random resnet18 features is far above chance"
    assert "extract_seconds" in rows[0]
    # ... to what `calibrate` fits from a fresh pass of the bundle over the images
    fresh = calibrate_run(tmp_path / "run")["calibration"]["temperature"]
    assert fresh == pytest.approx(summary["temperature"], rel=1e-3)


def test_cached_flips_fit_the_probe_on_each_image_and_its_mirror(cifar_dir, tmp_path, monkeypatch):
    fitted = []
    real = probe.sweep

    def spy(x, y, *args, **kwargs):
        fitted.append((len(x), y.bincount(minlength=10)))
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(phases, "sweep", spy)
    cfg = tiny_probe(cifar_dir, "phases.0.cached_flips=true", "phases.0.l2_values=1e-3")
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    n = len(core.load_data(cfg, torch.device("cpu")).train_y)
    assert fitted[0][0] == 2 * n and (fitted[0][1] % 2 == 0).all()
    assert summary["val_acc"] > 0.3


def test_cached_flips_need_a_phase_on_cached_features(cifar_dir):
    with pytest.raises(UserError, match="cached_flips"):
        tiny_probe(cifar_dir, "phases.0.optimizer=sgd", "phases.0.augment=flip", "phases.0.cached_flips=true")


def test_lbfgs_needs_a_linear_head_on_cached_features(cifar_dir):
    with pytest.raises(UserError, match="lbfgs fits a linear probe"):
        tiny_probe(cifar_dir, "model.head=mlp")
    with pytest.raises(UserError, match="lbfgs fits a linear probe"):
        tiny_probe(cifar_dir, "phases.0.augment=flip")
    with pytest.raises(UserError, match="list of numbers"):
        tiny_probe(cifar_dir, "phases.0.l2_values=,")


def test_a_resumed_run_reports_the_probe_penalty_it_kept_not_the_last_one_swept(
    cifar_dir, tmp_path, monkeypatch
):
    """keep_best off: after a probe phase the head holds the best penalty's weights, and a run
    killed right after the probe's checkpoint reports (and bundles) that penalty when resumed."""
    cfg = tiny_probe(cifar_dir, "run.keep_best=false")
    whole = train_mod.train(cfg, tmp_path / "whole", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert whole["val_acc"] == max(r["val_acc"] for r in rows) and len(rows) == 3
    interrupted_run(monkeypatch, cfg, tmp_path / "broken", 1)
    resumed = train_mod.resume(tmp_path / "broken", progress=False)
    assert resumed["val_acc"] == whole["val_acc"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_probe_that_diverges_is_one_line_not_a_nan_model(cifar_dir, tmp_path, monkeypatch, capsys):
    real = probe.sweep

    def nan_sweep(*args, **kwargs):
        for fit in real(*args, **kwargs):
            fit.weight[0, 0] = float("nan")
            yield fit

    monkeypatch.setattr(phases, "sweep", nan_sweep)
    cfg = tiny_probe(cifar_dir)
    with pytest.raises(UserError, match=r"probe of phase .* diverged at l2 0.1 \(non-finite weights\)"):
        train_mod.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()
