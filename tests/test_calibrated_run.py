"""Calibration through the commands a user runs: train fits the temperature, load_model, evaluate,
predict and both exports apply it, `--min-confidence` abstains, old bundles still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_transfer.artifacts.bundle import load_model
from cifar_transfer.cli import main
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.system.errors import UserError


def logits_of(model: torch.nn.Module, meta: dict, images: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, images, meta["resolution"], meta["mean"], meta["std"], 64, "fp32")


def set_temperature(src: Path, dst: Path, temperature: float | None) -> Path:
    """A copy of the run whose model.json holds `temperature` (None: no key, an older bundle)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    meta.pop("temperature", None)
    if temperature is not None:
        meta["temperature"] = temperature
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def test_train_fits_a_temperature_that_load_model_folds_into_the_logits(run, images):
    t = json.loads((run / "model.json").read_text())["temperature"]
    assert t > 0 and t != 1.0
    model, meta = load_model(run)
    calibrated = logits_of(model, meta, images)
    model.temperature = 1.0
    raw = logits_of(model, meta, images)
    assert torch.allclose(calibrated, raw / t, atol=1e-5)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))


def test_evaluate_prints_the_interval_calibration_and_abstention(run, capsys):
    assert main(["evaluate", str(run), "--min-confidence", "1.0"]) == 0
    out = capsys.readouterr().out
    for text in ("95% CI", "on 100 images", "ECE", "2-fold check", "coverage 0.00%",
                 "suspected label errors"):  # fmt: skip
        assert text in out, text
    ev = json.loads((run / "eval-val.json").read_text())
    lo, hi = ev["accuracy_ci95"]
    assert lo < ev["accuracy"] < hi and ev["selective"]["answered"] == 0
    c = ev["calibration"]
    assert c["after"]["nll"] <= c["before"]["nll"] + 1e-9  # T was fitted on these images
    assert sum(b["n"] for b in c["after"]["bins"]) == 100 and len(c["after"]["bins"]) == 15
    assert main(["evaluate", str(run), "--min-confidence", "0"]) == 0
    assert "coverage 100.00% (100 of 100 images)" in capsys.readouterr().out


def test_predict_min_confidence_1_abstains_on_everything_and_0_on_nothing(run, images, tmp_path, capsys):
    for i, img in enumerate(images[:5]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    assert main(["predict", str(run), str(tmp_path), "--json", "--min-confidence", "1.0"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 5 and all(e["class"] is None and len(e["top"]) == 3 for e in entries)
    assert main(["predict", str(run), str(tmp_path), "--json", "--min-confidence", "0"]) == 0
    assert all(e["class"] == e["top"][0]["class"] for e in json.loads(capsys.readouterr().out))
    assert main(["predict", str(run), str(tmp_path), "--min-confidence", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(": unknown: " in line for line in lines)
    assert main(["predict", str(run), str(tmp_path), "--min-confidence", "1.5"]) == 2
    assert "--min-confidence 1.5 is not a probability" in capsys.readouterr().err


def test_an_old_bundle_without_temperature_loads_and_calibrate_fits_one(run, tmp_path, capsys):
    fitted = json.loads((run / "model.json").read_text())["temperature"]
    old = set_temperature(run, tmp_path / "old", None)
    model, _ = load_model(old)
    assert model.temperature == 1.0
    assert main(["evaluate", str(old)]) == 0
    assert "cifar-transfer calibrate RUN_DIR" in capsys.readouterr().out
    assert main(["calibrate", str(old)]) == 0
    out = capsys.readouterr().out
    assert "2-fold check" in out and "wrote temperature" in out
    t = json.loads((old / "model.json").read_text())["temperature"]
    assert t == pytest.approx(fitted, rel=1e-3)  # the same fit on the same validation logits
    ev = json.loads((old / "eval-val.json").read_text())
    assert ev["calibration"]["temperature"] == t
    bad = set_temperature(run, tmp_path / "bad", -1)
    with pytest.raises(UserError, match="temperature -1"):
        load_model(bad)


def exported_logits(run_dir: Path, images: torch.Tensor, tmp_path: Path):
    """(format, the exported file's logits on images, its metadata) for each export format, each
    export having passed its own parity check against the bundle."""
    from cifar_transfer.results import export

    for fmt in export.FORMATS:
        out = tmp_path / f"model{export.SUFFIX[fmt]}"
        result = export.export_run(run_dir, fmt, out, parity_images=images)
        assert result["ok"] and result["max_abs_diff"] < export.PARITY_TOLERANCE
        if fmt == "onnx":
            session = export.onnx_session(out)
            yield fmt, export.onnx_logits(session, images), session.get_modelmeta().custom_metadata_map
        else:
            module = export.torchscript_module(out.read_bytes())
            yield fmt, export.torchscript_logits(module, images), None


def test_exports_output_calibrated_logits_and_keep_parity(run, images, tmp_path):
    pytest.importorskip("onnxruntime")
    hot = set_temperature(run, tmp_path / "hot", 2.5)
    model, meta = load_model(hot)
    model.temperature = 1.0
    expected = logits_of(model, meta, images) / 2.5
    for fmt, got, onnx_meta in exported_logits(hot, images, tmp_path):
        if fmt == "onnx":
            assert json.loads(onnx_meta["temperature"]) == 2.5
        assert torch.allclose(got, expected, atol=1e-3)
