"""The model leaves the project: self-describing bundle, ONNX and TorchScript with parity checks."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cifar_transfer
from cifar_transfer.artifacts.bundle import load_model
from cifar_transfer.cli import main
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.results import export
from cifar_transfer.system.errors import UserError

ort = pytest.importorskip("onnxruntime")


def reference_logits(run: Path, images: torch.Tensor) -> torch.Tensor:
    model, meta = load_model(run)
    return predict_logits(
        model, images, meta["resolution"], meta["mean"], meta["std"], 64, "fp32",
        channels_last=False,
    )


def test_bundle_alone_rebuilds_the_model_without_recipe_or_config(run, images, tmp_path):
    for name in ("model.safetensors", "model.json"):
        shutil.copy(run / name, tmp_path / name)
    model, meta = cifar_transfer.load_model(tmp_path)  # the top-level, lazily imported API
    assert not model.training and meta["classes"][0] == "airplane"
    got = predict_logits(model, images, meta["resolution"], meta["mean"], meta["std"], 64, "fp32")
    assert torch.allclose(got, reference_logits(run, images), atol=1e-5)


def test_load_model_gives_an_eval_mode_channels_last_model(run, images):
    model, meta = cifar_transfer.load_model(run)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert not model.training and convs
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    got = predict_logits(model, images, meta["resolution"], meta["mean"], meta["std"], 64, "fp32")
    assert torch.allclose(got, reference_logits(run, images), atol=1e-5)  # either input layout


def test_bundle_refuses_a_pickle_posing_as_safetensors(run, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("unpickled",))

    shutil.copy(run / "model.json", tmp_path / "model.json")
    buf = io.BytesIO()
    torch.save({"state_dict": Payload()}, buf)  # a .pth-style pickle under the bundle's name
    (tmp_path / "model.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="safetensors"):
        cifar_transfer.load_model(tmp_path / "model.safetensors")
    assert not marker.exists()


def test_onnx_export_takes_raw_images_at_any_batch_size(run, images, capsys):
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "parity on 64 validation images" in out and "top-1 agrees 64/64" in out
    path = run / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(float)" and list(inp.shape[1:]) == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # a symbolic (dynamic) batch axis
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"])[9] == "truck" and meta["resolution"] == "32"
    want = reference_logits(run, images)
    for n in (1, 7):
        raw = images[:n].numpy().astype(np.float32)  # 0..255, no resize or normalization here
        got = session.run(None, {inp.name: raw})[0]
        assert got.shape == (n, 10)
        assert np.abs(got - want[:n].numpy()).max() < 1e-3
        assert (got.argmax(1) == want[:n].numpy().argmax(1)).all()


def test_torchscript_export_takes_uint8_or_float(run, images, tmp_path):
    path = tmp_path / "sub" / "model.pt"
    result = export.export_run(run, "torchscript", out=path)
    assert result["ok"] and result["max_abs_diff"] < 1e-3 and result["top1_agree"] == 64
    extra = {"model.json": ""}
    with warnings.catch_warnings(action="ignore", category=FutureWarning):  # torch.jit: deprecated
        module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["model.json"])["classes"][3] == "cat"
    want = reference_logits(run, images)
    with torch.no_grad():
        assert torch.allclose(module(images[:7]), want[:7], atol=1e-3)
        assert torch.allclose(module(images[:1].float()), want[:1], atol=1e-3)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_that_breaks_parity_fails_loudly_and_writes_nothing(run, fmt, tmp_path, monkeypatch):
    real = export.exportable_model

    def corrupted(model, meta):
        wrapper = real(model, meta)
        with torch.no_grad():
            wrapper.model.head.bias[0] += 50.0  # the exported graph now favours class 0
        return wrapper

    monkeypatch.setattr(export, "exportable_model", corrupted)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="parity check") as err:
        export.export_run(run, fmt, out=out / f"model{export.SUFFIX[fmt]}")
    assert "top-1 agrees on" in str(err.value) and "nothing written" in str(err.value)
    assert list(out.iterdir()) == []


def test_export_without_the_data_names_data_dir(run, capsys):
    assert main(["export", str(run), "--format", "onnx", "--data-dir", "/no/such/dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--data-dir" in err[0]
