"""predict as a user meets it: files, folders, globs, --top, --json, batches, an ONNX model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_transfer.cli import main
from cifar_transfer.data.cifar10 import load_split
from cifar_transfer.results import predict as predict_mod
from cifar_transfer.results.predict import load_predictor, predict_paths, read_image


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
        f"error: {folder / 'notes.txt'}: not an image PIL can read (a text or other file, or a "
        "format such as HEIC?): pass PNG/JPEG/BMP/GIF/TIFF/WebP image files (convert others to JPEG)"
    ) in err
    assert main(["predict", str(run), str(empty), "--json"]) == 1
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry == {"path": str(empty), "class": None, "top": [], "error": no_images}


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


def test_results_are_printed_batch_by_batch_while_later_files_are_unread(
    run, folder, monkeypatch, capsys
):
    monkeypatch.setattr(predict_mod, "READ_BATCH", 2)
    printed: list[str] = []
    lines_at_read: list[int] = []  # how many results the user had seen when each file was opened
    real_read = predict_mod.read_image

    def spy(path: Path):
        printed.extend(capsys.readouterr().out.splitlines())
        lines_at_read.append(len(printed))
        return real_read(path)

    monkeypatch.setattr(predict_mod, "read_image", spy)
    assert main(["predict", str(run), str(folder), "--batch-size", "1"]) == 0
    printed.extend(capsys.readouterr().out.splitlines())
    assert len(printed) == 7
    assert lines_at_read == [0, 0, 2, 2, 4, 4, 6]


def test_forward_batches_keep_to_batch_size_whatever_the_read_batch(run, folder, monkeypatch):
    predictor = load_predictor(run)
    sizes: list[int] = []
    real_logits = predictor.logits
    monkeypatch.setattr(predictor, "logits", lambda x: sizes.append(len(x)) or real_logits(x))
    monkeypatch.setattr(predict_mod, "READ_BATCH", 5)
    preds = predict_paths(predictor, [str(folder)], batch_size=2)
    assert len(preds) == 7 and all(p.top and not p.error for p in preds)
    assert sizes == [2, 2, 1, 2]  # files read 5, then 2; each read batch forwarded 2 at a time


def test_a_glob_through_a_symlink_loop_finishes_and_lists_each_image_once(
    run, folder, tmp_path, capsys
):
    root = Path(shutil.copytree(folder, tmp_path / "photos"))
    (root / "sub" / "loop").symlink_to(root)  # photos/sub/loop/sub/loop/... never ends
    (root / "self").symlink_to(".")
    (root / "itself.png").symlink_to("itself.png")  # a link to itself: no file behind it
    assert main(["predict", str(run), str(root / "**" / "*.png"), "--json"]) == 0
    found = sorted(Path(p["path"]).relative_to(root).as_posix()
                   for p in json.loads(capsys.readouterr().out))  # fmt: skip
    assert found == ["img1.png", "img3.png", "img5.png", "sub/deep.png"]
    assert main(["predict", str(run), str(root)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 7


def test_a_large_jpeg_is_decoded_at_reduced_size_to_the_same_image(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    x, y = np.linspace(0, 255, 2400)[None, :], np.linspace(0, 255, 1600)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    opened: list[Image.Image] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p: opened.append(real_open(p)) or opened[-1])
    small = read_image(path)
    assert opened[0].size == (300, 200), "the JPEG was decoded at full size"
    with real_open(path) as full:
        ref = full.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
    diff = np.abs(small.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref, dtype=int))
    assert diff.mean() < 2.0
