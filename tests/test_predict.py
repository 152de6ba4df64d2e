"""predict as a user meets it: files, folders, globs, --top, --json, batches, an ONNX model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cifar_transfer.cli import main
from cifar_transfer.data import load_split
from cifar_transfer.predict import load_predictor, predict_paths


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """This module's copy of the finished two-epoch cnn-baseline run."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("predict") / "run"))


@pytest.fixture(scope="module")
def folder(cifar_dir, tmp_path_factory) -> Path:
    """img0..img6 (PNG/JPEG, upscaled as photos would be), a sub folder, and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    x, _ = load_split(cifar_dir, "train")
    for i in range(7):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((96, 96))
        img.save(root / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    (root / "sub").mkdir()
    Image.fromarray(x[9].permute(1, 2, 0).numpy()).save(root / "sub" / "deep.png")
    (root / "notes.txt").write_text("not an image, and not in an image folder listing")
    return root


def test_folder_glob_and_json(run, folder, capsys):
    rc = main(["predict", str(run), str(folder), str(folder / "sub" / "*.png"), "--top", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    preds = json.loads(captured.out)  # one JSON document, nothing else on stdout
    paths = [Path(p["path"]).name for p in preds]
    assert paths == [f"img{i}.{'png' if i % 2 else 'jpg'}" for i in range(7)] + ["deep.png"]
    for p in preds:
        assert p["error"] is None and len(p["top"]) == 2
        probs = [t["prob"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["class"] for t in p["top"]} <= {"airplane", "automobile", "bird", "cat",
                                                   "deer", "dog", "frog", "horse", "ship", "truck"}


def test_empty_folder_and_unmatched_glob_are_reported_and_the_rest_predicted(run, folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(folder / "img1.png"), str(empty), str(tmp_path / "*.jpeg"), str(folder / "notes.txt")]
    assert main(["predict", str(run), *args]) == 1
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()
    assert line.startswith(f"{folder / 'img1.png'}: ") and line.count(",") == 2  # --top 3 default
    err = captured.err.strip().splitlines()
    no_images = "folder holds no images: pass a folder of images or a glob such as 'photos/*.jpg'"
    assert f"error: {empty}: {no_images}" in err
    assert f"error: {tmp_path / '*.jpeg'}: matches no files" in err
    assert (
        f"error: {folder / 'notes.txt'}: not a readable image (PIL: UnidentifiedImageError): "
        "pass PNG/JPEG/BMP/GIF/TIFF/WebP image files"
    ) in err
    assert main(["predict", str(run), str(empty), "--json"]) == 1
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry == {"path": str(empty), "top": [], "error": no_images}


def test_batches_give_the_same_answer_as_one_pass(run, folder):
    predictor = load_predictor(run)
    one = predict_paths(predictor, [str(folder)], top_k=10, batch_size=64)
    small = predict_paths(predictor, [str(folder)], top_k=99, batch_size=3)  # K clamps to 10
    assert [p.path for p in one] == [p.path for p in small] and len(one) == 7
    for a, b in zip(one, small):
        assert [c for c, _ in a.top] == [c for c, _ in b.top] and len(a.top) == 10
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-5


def test_onnx_model_predicts_like_pytorch_even_alone(run, folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    lone = tmp_path / "lone" / "cifar.onnx"  # no model.json beside it: classes come from the file
    lone.parent.mkdir()
    shutil.copy(onnx_path, lone)
    outputs = []
    for model in (run, lone):
        assert main(["predict", str(model), str(folder), "--json", "--top", "3"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    torch_preds, onnx_preds = outputs
    assert [p["path"] for p in torch_preds] == [p["path"] for p in onnx_preds]
    for a, b in zip(torch_preds, onnx_preds):
        assert a["top"][0]["class"] == b["top"][0]["class"]
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--top", "0"], "--top 0"), (["--batch-size", "0"], "--batch-size 0")],
)
def test_bad_options_are_one_error_line(run, folder, extra, fragment, capsys):
    assert main(["predict", str(run), str(folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def test_a_missing_onnx_file_is_one_error_line(folder, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.onnx"), str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no ONNX file at {tmp_path / 'nope.onnx'}")
