"""Flip TTA built into the bundle (run.tta): what a run decides, what load_model, evaluate and
the exports then output, and what a bad model.json says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_calibrated_run import exported_logits, logits_of
from test_train import tiny

from cifar_transfer.artifacts.bundle import load_model
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.results.runs import evaluate_run
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import finish
from cifar_transfer.training import run as train_mod


def cnn(cifar_dir, tta: str, *extra: str):
    return tiny("cnn-baseline", cifar_dir, "phases.0.epochs=2", "phases.0.batch_size=32", f"run.tta={tta}",
                *extra)


def test_a_flip_bundle_outputs_the_mean_of_both_views_and_evaluate_reproduces_its_val_acc(
    cifar_dir, images, tmp_path
):
    summary = train_mod.train(cnn(cifar_dir, "flip"), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["tta"] == "flip" and meta["val_acc"] == summary["val_acc"]
    assert 0 <= meta["val_acc_single_view"] <= 1
    best_row = max(json.loads(line)["val_acc"] for line in (tmp_path / "run" / "metrics.jsonl").open())
    assert meta["val_acc_single_view"] == best_row  # the epochs were validated on one view
    model, meta = load_model(tmp_path / "run")
    assert model.flip_tta
    both = logits_of(model, meta, images)
    model.flip_tta = False
    plain = logits_of(model, meta, images)
    mirror = logits_of(model, meta, images.flip(3))
    assert torch.allclose(both, (plain + mirror) / 2, atol=1e-5)
    assert evaluate_run(tmp_path / "run", "val", None)["accuracy"] == pytest.approx(summary["val_acc"], abs=1e-6)


@pytest.mark.parametrize("mirror_is_right", [True, False])
def test_auto_bundles_flip_only_when_the_mirror_view_validates_better(
    mirror_is_right, cifar_dir, tmp_path, monkeypatch
):
    # An untrained model (lr ~0: near chance on one view) whose mirror pass returns confident
    # right (or wrong) answers: the mean of both views then scores above (or not above) the
    # single view, and auto keeps (or drops) the flip.
    real = predict_logits

    def mirror(model, images, *args, mirrored=False, **kwargs):
        logits = real(model, images, *args, mirrored=mirrored, **kwargs)
        if not mirrored:
            return logits
        labels = run_labels[0]
        target = labels if mirror_is_right else (labels + 1) % logits.shape[1]
        return torch.nn.functional.one_hot(target, logits.shape[1]).float() * 1e3

    run_labels = []
    real_init = train_mod.Run.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        run_labels.append(self.data.val_y.cpu())

    monkeypatch.setattr(train_mod.Run, "__init__", spy_init)
    monkeypatch.setattr(finish, "predict_logits", mirror)
    summary = train_mod.train(cnn(cifar_dir, "auto", "phases.0.lr=1e-9"), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    if mirror_is_right:
        assert meta["tta"] == "flip" and summary["val_acc"] == 1.0 > meta["val_acc_single_view"]
        # A --resume of the finished run re-bundles the same weights: it decides the same way
        # (scoring both views again: the logits of the run's own validation are gone).
        assert train_mod.resume(tmp_path / "run", progress=False)["tta"] == "flip"
    else:
        assert meta["tta"] == "none" and "val_acc_single_view" not in meta
        best_row = max(json.loads(line)["val_acc"] for line in (tmp_path / "run" / "metrics.jsonl").open())
        assert summary["val_acc"] == best_row


def test_off_never_scores_the_mirror_images(cifar_dir, tmp_path, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("run.tta=off scored the validation images again")

    monkeypatch.setattr(finish, "predict_logits", no_pass)
    train_mod.train(cnn(cifar_dir, "off"), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["tta"] == "none"


def test_a_bad_tta_is_one_clear_line(run, tmp_path, cifar_dir):
    bad = shutil.copytree(run, tmp_path / "bad")
    meta = json.loads((bad / "model.json").read_text())
    meta["tta"] = "__import__('os')"
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has tta"):
        load_model(bad)
    with pytest.raises(UserError, match="run.tta"):
        cnn(cifar_dir, "rotate")


def test_exports_of_a_flip_bundle_match_its_logits(run, images, tmp_path):
    pytest.importorskip("onnxruntime")
    flip = shutil.copytree(run, tmp_path / "flip")
    meta = json.loads((flip / "model.json").read_text())
    meta["tta"] = "flip"
    (flip / "model.json").write_text(json.dumps(meta))
    model, meta = load_model(flip)
    expected = logits_of(model, meta, images)
    model.flip_tta = False
    assert not torch.allclose(logits_of(model, meta, images), expected, atol=1e-3)  # flip matters
    for fmt, got, onnx_meta in exported_logits(flip, images, tmp_path):
        if fmt == "onnx":
            assert onnx_meta["tta"] == "flip"
        assert torch.allclose(got, expected, atol=1e-3)
