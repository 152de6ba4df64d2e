"""One decoder, one set of reasons: every kind of bad image file (empty, text, truncated JPEG, PNG
bomb header, unknown format) through each of the three places a user's image is decoded (a
folder dataset, `predict`, `serve`), asserting what the user sees there. No model is trained:
predict and serve run a stub predictor."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bomb
from PIL import Image

from cifar_transfer.cli import main
from cifar_transfer.data import folder, folder_scan, images
from cifar_transfer.results import predict as predict_mod
from cifar_transfer.system.errors import UserError

NOT_AN_IMAGE = "not an image PIL can read (a text or other file, or a format such as HEIC?)"
IMAGE_FIX = "pass PNG/JPEG/BMP/GIF/TIFF/WebP image files"
BOMB = "more than 134,217,728 pixels, too many to decode (a decompression bomb?)"
EMPTY = "empty file (0 bytes)"
CORRUPT = r"truncated or corrupt \(PIL: .+\)"  # PIL's own words inside: they vary by format


def jpeg_bytes(size=(96, 80), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad() -> dict[str, tuple[str, bytes, str, str, str]]:
    """name -> (file name, bytes, ImageError kind, reason (a regex), fix): what a user reads."""
    jpeg = jpeg_bytes()
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)  # an iPhone photo's first bytes
    not_an_image = ("not-an-image", re.escape(NOT_AN_IMAGE), f"{IMAGE_FIX} (convert others to JPEG)")
    bomb = ("too-many-pixels", re.escape(BOMB), "downscale it first")
    return {
        "empty": ("empty.jpg", b"", "empty", re.escape(EMPTY), "copy or download it again"),
        "text": ("notes.png", b"just some notes, not an image\n" * 20, *not_an_image),
        "truncated JPEG": ("cut.jpg", jpeg[: len(jpeg) // 2], "corrupt", CORRUPT,
                           "copy it again, or re-save it with an image editor"),
        "PNG bomb (PIL only warns)": ("bomb.png", png_bomb(12000, 12000), *bomb),
        "PNG bomb (PIL refuses)": ("huge.png", png_bomb(20000, 20000), *bomb),
        "unknown format": ("photo.jpg", heic, *not_an_image),
    }  # fmt: skip


CASES = ["empty", "text", "truncated JPEG", "PNG bomb (PIL only warns)", "PNG bomb (PIL refuses)",
         "unknown format"]  # fmt: skip


def says(text: str, reason: str, fix: str = "") -> bool:
    """Whether `text` is the reason (a regex), followed by ": fix" when a fix is given."""
    return re.fullmatch(reason + (re.escape(f": {fix}") if fix else ""), text) is not None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("crop", [False, True], ids=["whole", "crop"])
def test_each_bad_file_is_one_image_error_with_its_kind_reason_and_fix(bad, case, crop, tmp_path):
    name, raw, kind, reason, fix = bad[case]
    (tmp_path / name).write_bytes(raw)
    for source in (raw, tmp_path / name):  # bytes (folders, serve) and a path (predict)
        with pytest.raises(images.ImageError) as err:
            images.decode_image(source, 32, crop=crop)
        e = err.value
        assert (e.kind, e.fix) == (kind, fix) and says(e.reason, reason)
        assert str(e) == f"{e.reason}: {e.fix}"


# ------------------------------------------------------------------------------ folder datasets


def photo(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.mark.parametrize("case", CASES)
def test_a_folder_skips_and_lists_each_bad_file_or_refuses_it(bad, case, tmp_path, capsys):
    name, raw, _, reason, _ = bad[case]
    root = tmp_path / "fruit"
    for i in range(2):
        photo(root / "apple" / f"a{i}.png", (200, 30, 30))
        photo(root / "kiwi" / f"k{i}.png", (40, 180, 40))
    (root / "kiwi" / name).write_bytes(raw)
    found = folder_scan.scan(root)
    x, y, _ = folder.load_split(found, "train", 16, None, workers=1, progress=False)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    line = capsys.readouterr().err.strip()
    head = f"warning: skipped 1 file(s) that do not decode: {root / 'kiwi' / name}: "
    tail = " (--set data.bad_images=refuse stops instead)"
    assert line.startswith(head) and line.endswith(tail) and "\n" not in line
    listed = line[len(head) : -len(tail)]
    assert says(listed, reason)  # the reason alone: the one warning line lists the files
    refused = r"1 file\(s\) among the images do not decode \(.*" + re.escape(f"{name}: {listed})")
    with pytest.raises(UserError, match=refused):
        folder.load_split(found, "train", 16, None, workers=1, bad_images="refuse", progress=False)


# ------------------------------------------------------------------------------------- predict


class StubPredictor:
    """Two classes, the image's mean brightness as the logit of "bright": no model needed."""

    def __init__(self, geometry: tuple[int, bool]) -> None:
        self.classes, self.geometry = ["dark", "bright"], geometry

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(1, 2, 3)) / 255
        return torch.stack([1 - mean, mean], dim=1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("geometry", [(32, False), (24, True)], ids=["cifar-model", "folder-model"])
def test_predict_prints_one_error_line_per_bad_file_and_predicts_the_rest(
    bad, case, geometry, tmp_path, monkeypatch, capsys
):
    name, raw, _, reason, fix = bad[case]
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (250, 250, 250)).save(good)
    (tmp_path / name).write_bytes(raw)
    monkeypatch.setattr(predict_mod, "load_predictor", lambda model: StubPredictor(geometry))
    assert main(["predict", "stub-model", str(good), str(tmp_path / name), "--top", "1"]) == 1
    out, err = capsys.readouterr()
    (result,) = out.splitlines()
    assert result.startswith(f"{good}: bright ")
    (line,) = err.splitlines()
    prefix = f"error: {tmp_path / name}: "
    assert line.startswith(prefix) and says(line[len(prefix) :], reason, fix)


def test_predict_on_a_missing_file_is_its_own_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict_mod, "load_predictor", lambda model: StubPredictor((32, False)))
    assert main(["predict", "stub-model", str(tmp_path / "nope.jpg")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.jpg'}: no such file\n"


def test_a_bomb_that_pil_only_warns_about_prints_no_stray_warning(tmp_path):
    """Between the limit and twice it PIL warns; our refusal is the only line (in any thread)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(12000, 12000))
    code = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from cifar_transfer.data.images import ImageError, decode_image\n"
        "kinds = []\n"
        "def one():\n"
        "    try:\n"
        f"        decode_image(Path({str(bomb)!r}), 32)\n"
        "    except ImageError as e:\n"
        "        kinds.append(e.kind)\n"
        "threads = [threading.Thread(target=one) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(*kinds)\n"  # once, after the joins: threads printing at once interleave
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["too-many-pixels"] * 4 and out.stderr == ""


def test_the_cifar_path_is_upright_and_composites_transparency_like_the_folder_path(tmp_path):
    """One decoder: a CIFAR model now sees a phone photo the way it is shown (EXIF orientation)
    and a transparent PNG over white, as a folder model always did."""
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :30] = (0, 0, 255)  # left half blue
    arr[:, 30:] = (255, 0, 0)  # right half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": blue on top
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = predict_mod.read_image(tmp_path / "rot.jpg")  # (3, 32, 32), the whole photo
    assert out[2, 2, 16] > 200 and out[0, 29, 16] > 200  # blue top, red bottom
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert predict_mod.read_image(tmp_path / "clear.png").min() == 255


# --------------------------------------------------------------------------------------- serve


@pytest.mark.parametrize("geometry", [(32, False), (24, True)], ids=["cifar-model", "folder-model"])
def test_serve_answers_422_with_the_reason_for_each_bad_upload(bad, geometry):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cifar_transfer.serving.app import create_app
    from cifar_transfer.serving.limits import Limits
    from cifar_transfer.serving.model import ServedModel

    served = ServedModel(StubPredictor(geometry), "torch", "stub@000000000000", {"model": "stub"})
    good = jpeg_bytes(seed=1)
    with TestClient(create_app(served, Limits(max_body=8 * 1024 * 1024))) as client:
        ok = client.post("/predict", content=good, headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["top"]
        for case in CASES:
            name, raw, kind, reason, fix = bad[case]
            r = client.post("/predict", content=raw, headers={"content-type": "image/png"})
            assert r.status_code == 422 and r.text.count("\n") == 1, (case, r.text)
            message = r.json()["error"]
            if kind == "empty":  # the request's problem: named as the upload's
                assert message == f"empty upload (0 bytes): {IMAGE_FIX}"
            else:
                assert says(message, reason, fix), (case, message)
            form = [("image", (name, raw, "image/png")), ("image", ("ok.jpg", good, "image/jpeg"))]
            r = client.post("/predict", files=form)
            assert r.status_code == 422, (case, r.text)
            assert r.json()["error"].startswith(f"{name}: "), (case, r.text)
