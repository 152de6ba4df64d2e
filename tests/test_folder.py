"""Folder datasets (ROOT/<class>/*, ROOT/train|val|test/<class>/*) and CIFAR-100: layouts, kind
detection, decoding (EXIF, modes, aspect ratio), the decoded-set cache, every bad-input row of
the README's catalogue, and a folder run end to end (model.json, predict, evaluate, export)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer.cli import main
from cifar_transfer.data import datasets, folder, folder_scan, images, splits
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.results.export import torchscript_module
from cifar_transfer.system.errors import UserError

COLOURS = {"apple": (200, 30, 30), "kiwi": (40, 180, 40), "plum": (60, 40, 200), "train": (90, 90, 90)}
HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "hymenoptera"


def photo(path: Path, colour: tuple[int, int, int], size=(40, 28), seed=0, fmt=None) -> Path:
    """A small noisy photo of one colour (learnable by colour), any size and format."""
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(0, 12, (size[1], size[0], 3)) + colour, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, int], ext: str = ".png", start: int = 0) -> Path:
    for name, n in counts.items():
        for i in range(n):
            photo(root / name / f"{name}{start + i:03d}{ext}", COLOURS[name], seed=start + i)
    return root


def cfg_for(root: Path, *extra: str):
    return apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={root}", "data.storage_size=32", "data.decode_workers=2",
        "phases.0.epochs=3", "run.threads=1", "run.compile_features=off",
        # photo() gives image i of every class the same grain in another colour: re-coloured
        # copies, which the near-duplicate check would rightly group (test_neardup.py tests it)
        "data.near_duplicates=0", *extra,
    ])  # fmt: skip


# --------------------------------------------------------------------------- layouts, kinds


def test_class_folders_give_sorted_classes_and_a_proportional_seeded_val_split(tmp_path):
    root = make_folder(tmp_path / "fruit", {"plum": 6, "apple": 20, "kiwi": 10})
    s = datasets.load_train_val(cfg_for(root, "data.val_size=0.25"), progress=False)
    assert s.source.kind == "folder" and s.source.classes == ["apple", "kiwi", "plum"]
    assert s.train_x.shape[1:] == (3, 32, 32) and s.train_x.dtype == torch.uint8
    # 9 of 36 images, each class's share proportional to its size (imbalance kept): 5, 2.5, 1.5
    # rounded by largest remainder (the tie goes to the first class).
    assert torch.bincount(s.val_y).tolist() == [5, 3, 1]
    assert torch.bincount(s.train_y).tolist() == [15, 7, 5]
    again = datasets.load_train_val(cfg_for(root, "data.val_size=0.25"), progress=False)
    assert torch.equal(again.val_x, s.val_x) and again.fingerprint == s.fingerprint
    other = datasets.load_train_val(cfg_for(root, "data.val_size=0.25", "data.seed=1"), progress=False)
    assert not torch.equal(other.val_x, s.val_x)
    assert torch.allclose(datasets.class_weights(s.train_y, 3), torch.tensor([27 / 45, 27 / 21, 27 / 15]))
    # What --budget plans with, counted from the file list without decoding: the same sizes.
    assert datasets.split_counts(cfg_for(root, "data.val_size=0.25")) == (27, 9)
    assert datasets.split_counts(cfg_for(root, "data.val_size=4", "data.train_limit=10")) == (10, 4)
    assert splits.split_sizes(cfg_for(root, "data.val_size=0.25"), 36) == (27, 9)


def test_train_val_test_layout_uses_its_own_val_and_test(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", {"apple": 6, "kiwi": 6})
    make_folder(root / "val", {"apple": 2, "kiwi": 3}, ext=".jpg", start=50)
    make_folder(root / "test", {"apple": 4, "kiwi": 1}, start=80)
    s = datasets.load_train_val(cfg_for(root), progress=False)  # val_size 5000 is not used
    assert len(s.train_y) == 12 and torch.bincount(s.val_y).tolist() == [2, 3]
    assert datasets.split_counts(cfg_for(root)) == (12, 5)
    x, y, src = datasets.load_test(cfg_for(root))
    assert x.shape == (5, 3, 32, 32)
    assert torch.bincount(y).tolist() == [4, 1] and src.classes == ["apple", "kiwi"]


def write_cifar100(root: Path, n: int = 40) -> Path:
    folder_ = root / "cifar-100-python"
    folder_.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        fine = np.arange(n) % 100
        entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()}  # fmt: skip
        (folder_ / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)]}  # fmt: skip
    (folder_ / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder_


def test_data_dir_contents_tell_the_kinds_apart_and_cifar100_has_fine_and_coarse_labels(
    tmp_path, cifar_dir
):
    c100 = write_cifar100(tmp_path / "c100")
    fruit = make_folder(tmp_path / "fruit", {"apple": 2, "kiwi": 2})
    assert datasets.open_source(cfg_for(cifar_dir.parent)).kind == "cifar10"
    fine = datasets.open_source(cfg_for(c100.parent, "data.val_size=10"))
    assert fine.kind == "cifar100" and len(fine.classes) == 100 and fine.storage_size == 32
    s = datasets.load_train_val(cfg_for(c100, "data.val_size=10", "data.cifar100_labels=coarse"))
    assert s.source.classes[:2] == ["c0", "c1"] and int(s.train_y.max()) < 20
    assert datasets.open_source(cfg_for(fruit)).kind == "folder"
    with pytest.raises(UserError, match="no CIFAR-100 archive in"):
        datasets.open_source(cfg_for(fruit, "data.kind=cifar100"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CIFAR-10 batches, CIFAR-100 archive or class folders"):
        datasets.open_source(cfg_for(tmp_path / "empty"))
    with pytest.raises(UserError, match="data.val_size"):
        apply_overrides(load_recipe("cnn-baseline"), ["data.val_size=1.5"])


# --------------------------------------------------------------------------- decoding


def test_decoding_applies_exif_converts_every_mode_and_centre_crops(tmp_path):
    red = np.zeros((20, 60, 3), np.uint8)
    red[:, :, 0] = 255
    red[:, :30] = (0, 0, 255)  # left half blue, right half red: a wide image
    wide = Image.fromarray(red)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the tall displayed image is blue on top
    wide.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = images.decode_image(tmp_path / "rot.jpg", 16)
    assert out.shape == (16, 16, 3)
    assert out[1, 8, 2] > 200 and out[14, 8, 0] > 200  # blue top, red bottom: rotated, not squashed
    Image.new("P", (30, 30), 3).save(tmp_path / "p.png")
    Image.new("L", (30, 30), 100).save(tmp_path / "l.png")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(tmp_path / "a.png")  # transparent -> white
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(tmp_path / "16.png")
    got = {p.name: images.decode_image(p, 8)[4, 4].tolist() for p in tmp_path.glob("[plac1]*.*")}
    assert got["l.png"] == [100, 100, 100] and got["a.png"] == [255, 255, 255]
    assert got["16.png"] == [255, 255, 255] and got["c.jpg"][0] > 200 and got["c.jpg"][1] < 60
    assert len(got["p.png"]) == 3


def test_the_decoded_set_is_cached_keyed_by_files_and_storage_size(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "fruit", {"apple": 3, "kiwi": 3})
    first = datasets.load_train_val(cfg_for(root, "data.val_size=2"), progress=False)
    monkeypatch.setattr(folder, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    again = datasets.load_train_val(cfg_for(root, "data.val_size=2"), progress=False)
    assert torch.equal(again.train_x, first.train_x)
    with pytest.raises(pytest.fail.Exception):  # another storage size is another cache entry
        datasets.load_train_val(cfg_for(root, "data.val_size=2", "data.storage_size=24"))
    photo(root / "kiwi" / "new.png", COLOURS["kiwi"])  # another file list too
    with pytest.raises(pytest.fail.Exception):
        datasets.load_train_val(cfg_for(root, "data.val_size=2"))


# --------------------------------------------------------------------------- bad input rows


def test_an_empty_class_folder_is_one_line(tmp_path):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    (root / "plum").mkdir()
    (root / "plum" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"class folder .*plum holds no images \(1 non-image"):
        datasets.load_train_val(cfg_for(root))


def test_only_one_class_is_one_line(tmp_path):
    root = make_folder(tmp_path / "f", {"apple": 3})
    with pytest.raises(UserError, match="only one class folder"):
        datasets.load_train_val(cfg_for(root))


def test_val_or_test_classes_that_differ_from_train_are_one_line(tmp_path):
    root = tmp_path / "d"
    make_folder(root / "train", {"apple": 2, "kiwi": 2})
    make_folder(root / "val", {"apple": 1, "plum": 1})
    with pytest.raises(UserError, match=r"val has classes \['plum'\] .* and no folder for \['kiwi'\]"):
        datasets.load_train_val(cfg_for(root))
    shutil.rmtree(root / "val")
    make_folder(root / "test", {"apple": 1})
    with pytest.raises(UserError, match=r"test has no folder for \['kiwi'\]"):
        datasets.load_train_val(cfg_for(root))


def bad_files(root: Path) -> None:
    good = root / "apple" / "apple000.png"
    (root / "apple" / "broken.jpg").write_bytes(good.read_bytes()[:60])  # truncated
    (root / "kiwi" / "notes.png").write_text("not an image")  # a non-image with an image's name


def test_corrupt_or_non_image_files_are_skipped_with_a_listed_warning_or_refused(tmp_path, capsys):
    root = make_folder(tmp_path / "f", {"apple": 3, "kiwi": 3})
    bad_files(root)
    s = datasets.load_train_val(cfg_for(root, "data.val_size=0"), progress=False)
    err = capsys.readouterr().err
    assert len(s.train_y) == 6 and "skipped 2 file(s)" in err
    assert "broken.jpg: truncated or corrupt" in err and "notes.png: not an image" in err
    with pytest.raises(UserError, match=r"2 file\(s\) among the images do not decode .*broken.jpg"):
        datasets.load_train_val(cfg_for(root, "data.val_size=0", "data.bad_images=refuse"))


def test_hidden_files_and_non_image_extensions_are_ignored(tmp_path, capsys):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    for name in (".DS_Store", "Thumbs.db", "._apple000.png", "labels.csv"):
        (root / "apple" / name).write_bytes(b"\x00junk")
    (root / ".git").mkdir()
    s = datasets.load_train_val(cfg_for(root, "data.val_size=0"), progress=False)
    assert len(s.train_y) == 4 and s.source.classes == ["apple", "kiwi"]
    assert "warning" not in capsys.readouterr().err


def test_an_image_over_the_decompression_bomb_limit_is_skipped_with_its_reason(tmp_path, capsys):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    Image.new("1", (12000, 12000)).save(root / "kiwi" / "bomb.png")  # 144 Mpx in a few KB
    datasets.load_train_val(cfg_for(root, "data.val_size=0"), progress=False)
    assert "bomb.png: more than 134,217,728 pixels" in capsys.readouterr().err


def test_a_symlink_loop_is_skipped_with_a_warning(tmp_path, capsys):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    os.symlink(root / "apple", root / "apple" / "again")  # a folder link back to its parent
    os.symlink(root / "kiwi" / "self.jpg", root / "kiwi" / "self.jpg")  # a link to itself
    s = datasets.load_train_val(cfg_for(root, "data.val_size=0"), progress=False)
    err = capsys.readouterr().err
    assert len(s.train_y) == 4 and "a symlink back to a folder already read" in err
    assert "self.jpg is a symlink loop: skipped" in err


def test_the_same_file_in_train_and_val_warns_of_leakage(tmp_path, capsys):
    root = tmp_path / "d"
    make_folder(root / "train", {"apple": 3, "kiwi": 3})
    make_folder(root / "val", {"apple": 1, "kiwi": 1}, start=50)
    shutil.copy(root / "train" / "apple" / "apple001.png", root / "val" / "apple" / "copy.png")
    datasets.load_train_val(cfg_for(root), progress=False)
    assert "1 image(s) of" in capsys.readouterr().err and "leakage" in capsys.readouterr().err + "leakage"


def test_a_class_with_fewer_images_than_the_split_needs_is_one_line(tmp_path):
    root = make_folder(tmp_path / "f", {"apple": 5, "kiwi": 1})
    with pytest.raises(UserError, match="class 'kiwi' has 1 usable image.*at least 2 per class"):
        datasets.load_train_val(cfg_for(root, "data.val_size=0.2"))
    with pytest.raises(UserError, match="leaves no training images .* fraction such as 0.2"):
        datasets.load_train_val(cfg_for(root, "data.val_size=6"))


def test_a_set_too_big_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    monkeypatch.setattr(folder, "available_memory", lambda: 10_000)
    with pytest.raises(UserError, match=r"at 32 px takes 0.0 GiB, more than .*data.storage_size"):
        datasets.load_train_val(cfg_for(root))


# --------------------------------------------------------------------------- end to end


def test_a_folder_run_follows_the_dataset_downstream(tmp_path, capsys):
    root = tmp_path / "fruit"
    make_folder(root / "train", {"apple": 12, "kiwi": 12, "plum": 12})
    make_folder(root / "test", {"apple": 3, "kiwi": 3, "plum": 3}, start=70)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "cnn-baseline", "--data-dir", str(root), "--out", str(run),
                 "--quiet", "--set", "data.val_size=0.25", "--set", "data.storage_size=40",
                 "--set", "phases.0.epochs=4", "--set", "run.threads=1",
                 "--set", "data.class_weights=auto"]) == 0  # fmt: skip
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == ["apple", "kiwi", "plum"] and meta["storage_size"] == 40
    assert "(N, 3, 40, 40)" in meta["input"] and meta["data_kind"] == "folder"
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    result = json.loads((run / "eval-test.json").read_text())
    assert result["n"] == 9 and result["classes"] == meta["classes"]
    assert {"balanced_accuracy", "macro_f1"} <= set(result) and result["accuracy"] > 0.5
    big = photo(tmp_path / "big.jpg", COLOURS["plum"], size=(300, 200), fmt="JPEG")
    capsys.readouterr()
    assert main(["predict", str(run), str(big), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == "plum"
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    module = torchscript_module((run / "model.pt").read_bytes())
    assert module(torch.zeros(2, 3, 40, 40, dtype=torch.uint8)).shape == (2, 3)


def test_small_folder_is_the_recipe_train_uses_on_a_folder(tmp_path, cifar_dir):
    root = make_folder(tmp_path / "f", {"apple": 2, "kiwi": 2})
    assert datasets.default_recipe(str(root)) == "small-folder"
    assert datasets.default_recipe(str(cifar_dir)) == "default"
    assert datasets.default_recipe(None) == "default"
    cfg = load_recipe("small-folder")
    assert cfg.data.val_size == 0.2 and cfg.phases[0].optimizer == "lbfgs"


def test_real_hymenoptera_folder_decodes_and_trains_a_little(tmp_path):
    from cifar_transfer.training.run import train

    root = HYMENOPTERA / "train"
    if not (root / "ants").is_dir():
        pytest.skip(f"hymenoptera not found at {HYMENOPTERA}")
    cfg = cfg_for(root, "data.val_size=0.2", "data.storage_size=48", "phases.0.epochs=1")
    s = datasets.load_train_val(cfg, progress=False)
    assert s.source.classes == ["ants", "bees"] and len(s.train_y) + len(s.val_y) == 245
    assert torch.bincount(s.val_y).tolist() == [25, 24]
    assert s.train_x.float().std() > 20  # real photos (one a palette image), not blank decodes
    summary = train(cfg, tmp_path / "run", progress=False)  # decoded set read from the cache
    assert summary["classes"] == ["ants", "bees"] and summary["val_images"] == 49


def test_cifar100_download_is_md5_checked_and_extracted_once(tmp_path):
    import hashlib
    import tarfile

    from cifar_transfer.data import cifar100

    src = write_cifar100(tmp_path / "src")
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="CIFAR-100 archive from .* has MD5"):
        cifar100.download_cifar100(tmp_path / "bad", url=archive.as_uri(), md5="0" * 32)
    assert list((tmp_path / "bad").iterdir()) == []  # nothing of a bad download is kept
    got = cifar100.download_cifar100(tmp_path / "cache", url=archive.as_uri(), md5=md5)
    x, y = cifar100.load_split(got, "test")
    assert x.shape == (40, 3, 32, 32) and int(y.max()) == 39
    assert cifar100.MD5 == "eb9058c3a382ffc7106e4002c42a8d85" and cifar100.BYTES == 169_001_437


def test_a_100_class_report_lists_the_most_confused_pairs(tmp_path):
    from cifar_transfer.results.report import confused_pairs, render_html

    classes = [f"c{i}" for i in range(100)]
    cm = np.eye(100, dtype=np.int64) * 5
    cm[3, 7], cm[10, 2] = 4, 1
    pairs = confused_pairs(cm.tolist(), classes)
    assert pairs == [("c3", "c7", 4, 4 / 9), ("c10", "c2", 1, 1 / 6)]
    per_class = {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5} for c in classes}
    evaluation = {"accuracy": 0.99, "loss": 0.1, "balanced_accuracy": 0.98, "macro_f1": 0.97,
                  "classes": classes, "per_class": per_class, "confusion_matrix": cm.tolist(),
                  "n": 505, "split": "val"}  # fmt: skip
    page = render_html(tmp_path, {"resolution": 32}, "", [], evaluation, {}, [])
    assert "Most-confused pairs" in page and "<td>c3</td><td>c7</td><td class=num>4</td>" in page
    assert "val balanced accuracy" in page and "98.00%" in page


def test_split_folders_may_have_the_names_fastai_keras_and_hugging_face_use(tmp_path, capsys):
    root = tmp_path / "clothes"
    make_folder(root / "Training", {"apple": 6, "kiwi": 6})
    make_folder(root / "validation", {"apple": 2, "kiwi": 3}, start=50)
    make_folder(root / "eval", {"apple": 4, "kiwi": 1}, start=80)
    (root / "extras" / "misc").mkdir(parents=True)
    shutil.copy(root / "Training" / "kiwi" / "kiwi000.png", root / "validation" / "kiwi" / "copy.png")
    s = datasets.load_train_val(cfg_for(root), progress=False)
    assert len(s.train_y) == 12 and torch.bincount(s.val_y).tolist() == [2, 4]  # nothing carved
    assert torch.bincount(datasets.load_test(cfg_for(root))[1]).tolist() == [4, 1]
    err = capsys.readouterr().err
    assert "extras" in err  # a folder beside the splits is named, not read
    assert f"1 image(s) of {root / 'validation'} are byte-identical" in err  # named as it is
    make_folder(root / "valid", {"apple": 1, "kiwi": 1}, start=95)
    with pytest.raises(UserError, match=r"valid/ and validation/: both name the val split") as e:
        folder_scan.scan(root)
    assert "\n" not in str(e.value)


def test_a_class_called_train_in_a_class_folder_tree_is_a_class(tmp_path):
    root = make_folder(tmp_path / "vehicles", {"apple": 4, "train": 4})  # images, no subfolders
    assert folder_scan.scan(root).classes == ["apple", "train"]


def test_a_folder_run_without_a_budget_says_how_to_get_a_fine_tuned_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "fruit", {"apple": 8, "kiwi": 8})
    assert main(["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "model.backbone=resnet18", "--set", "model.weights=none",
                 "--set", "model.resolution=32", "--set", "data.storage_size=32",
                 "--set", "run.threads=1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"next: a fine-tuned model: cifar-transfer train --data-dir {root} --budget 10m" in out
    capsys.readouterr()
    assert main(["train", "--recipe", "small-folder", "--data-dir", str(root), "--out", str(tmp_path / "r2"),
                 "--quiet", "--set", "model.backbone=resnet18", "--set", "model.weights=none",
                 "--set", "model.resolution=32", "--set", "data.storage_size=32",
                 "--set", "run.threads=1"]) == 0  # fmt: skip
    assert "next:" not in capsys.readouterr().out  # a recipe named on purpose: no advice
