"""Honest validation on photo folders (issue 23): near-duplicate groups (perceptual hash),
never straddling a carved validation split, listed across a user's own val/ and test/; and the
report of a probe run (its L2 sweep on an L2 axis, validation beside the held-out test)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import CHROMIUM_FLAGS, images_decoded

from cifar_transfer.artifacts.rundir import CONFIG, load_run_config, read_metrics
from cifar_transfer.cli import main
from cifar_transfer.data import datasets, neardup
from cifar_transfer.data.splits import grouped_pick
from cifar_transfer.recipes import apply_overrides, load_recipe, to_toml
from cifar_transfer.results.figures import probe_figure

TINTS = {"apple": (60, -20, -20), "kiwi": (-20, 50, -20), "plum": (-10, -30, 60)}


def scene(path: Path, seed: int, tint=(0, 0, 0), size=(96, 72)) -> Path:
    """A small synthetic photo with structure (a smooth random layout, a class tint, grain)."""
    rng = np.random.default_rng(seed)
    layout = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(layout).astype(float) + tint + rng.normal(0, 4, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


def near_copy(src: Path, dst: Path) -> Path:
    """The same shot again: resized to 90% and re-encoded as JPEG (a re-saved or re-sent copy)."""
    img = Image.open(src).convert("RGB")
    img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.BILINEAR).save(dst, quality=90)
    return dst


def photo_folder(root: Path, n: int = 10, copies: int = 1, seed: int = 0) -> Path:
    """Three classes of n distinct scenes each, plus `copies` near-duplicates per class."""
    for c, (name, tint) in enumerate(TINTS.items()):
        for i in range(n):
            shot = scene(root / name / f"{name}{i:02d}.png", seed + 100 * c + i, tint)
            if i < copies:
                near_copy(shot, root / name / f"{name}{i:02d}-copy.jpg")
    return root


def cfg_for(root: Path, *extra: str):
    return apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={root}", "data.storage_size=48", "data.decode_workers=2",
        "data.val_size=0.25", "run.threads=1", "run.compile_features=off", *extra,
    ])  # fmt: skip


def leaks(train_x: torch.Tensor, val_x: torch.Tensor, similarity: float = 0.9) -> int:
    """Validation images with a near-duplicate among the training images."""
    return len({j for _, j, _ in neardup.cross_pairs(train_x, val_x, similarity)})


# --------------------------------------------------------------------------- the hash, the groups


def test_a_resized_reencoded_copy_is_grouped_and_distinct_photos_are_not(tmp_path):
    root = photo_folder(tmp_path / "f", n=8, copies=2)
    x, _, _ = datasets.open_source(cfg_for(root), progress=False).read("train")
    files = [p.name for p in datasets.open_source(cfg_for(root), progress=False).scan.kept("train")]
    found = neardup.find_groups(x, 0.9)
    assert found.groups == 6 and found.images == 12 and len(found.pairs) == 6
    for a, b, bits in found.pairs:  # each pair is a shot and its own copy, a few bits apart
        shot, copy = sorted((files[a], files[b]), key=len)
        assert copy == shot.replace(".png", "-copy.jpg") and bits <= 6
    # distinct scenes are far apart: about half the 64 bits differ, never as few as 6
    hashes = neardup.phash(x)
    distinct = [i for i, f in enumerate(files) if "copy" not in f]
    bits = (hashes[distinct, None] != hashes[None, distinct]).sum(-1).float()
    apart = bits[~torch.eye(len(distinct), dtype=torch.bool)]
    assert apart.min() > 6 and 24 <= apart.mean() <= 40
    assert neardup.find_groups(x, 1.0).groups <= 6  # identical hashes only: a stricter setting
    assert neardup.find_groups(x, 0.0).groups == 1  # everything alike: one group


def test_union_find_joins_chains_into_one_group():
    group = neardup.union_find(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert group.tolist() == [0, 0, 0, 3, 4, 4]
    found = neardup.NearDuplicates(group, [])
    assert found.groups == 2 and found.images == 5


# --------------------------------------------------------------------------- the carved split


def test_grouped_split_keeps_groups_whole_seeded_and_stratified():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    # Without groups it is the plain proportional split, image for image.
    plain = datasets.proportional_split(torch.from_numpy(labels), 25, seed=3)[1].numpy()
    assert np.array_equal(grouped_pick(labels, np.arange(100), 25, seed=3), plain)
    # With series of 1-4 shots (each within one class), no series straddles.
    group = np.arange(100)
    for start in rng.choice(95, 20, replace=False):
        group[start:start + rng.integers(2, 5)] = start
    group = np.array([g if labels[g] == labels[i] else i for i, g in enumerate(group)])
    val = grouped_pick(labels, group, 25, seed=3)
    in_val = np.zeros(100, dtype=bool)
    in_val[val] = True
    for g in np.unique(group):
        assert len(set(in_val[group == g])) == 1, g
    # the plain split's class shares (25 * 0.6, 0.3, 0.1: 15, 7.5, 2.5; the tie to the first)
    assert np.bincount(labels[val], minlength=3).tolist() == [15, 8, 2]
    assert np.array_equal(grouped_pick(labels, group, 25, seed=3), val)
    assert not np.array_equal(grouped_pick(labels, group, 25, seed=4), val)
    # One file filed under two classes (a copy in each folder): whole, and no class over its share.
    labels = np.repeat([0, 1], 10)
    group = np.arange(20)
    group[[10, 11, 12]] = [0, 1, 2]
    for seed in range(10):
        val = grouped_pick(labels, group, 6, seed)
        assert np.bincount(labels[val], minlength=2).tolist() in ([3, 3], [3, 2], [2, 3])
        assert all((a in val) == (b in val) for a, b in ((0, 10), (1, 11), (2, 12)))


def test_carved_split_never_puts_a_near_duplicate_on_both_sides(tmp_path):
    root = photo_folder(tmp_path / "f", n=10, copies=3)  # 39 images, 9 of them in 9 pairs
    plain = [datasets.load_train_val(cfg_for(root, "data.near_duplicates=0", f"data.seed={s}"),
                                     progress=False) for s in range(4)]  # fmt: skip
    assert any(leaks(p.train_x, p.val_x) for p in plain), "a plain split lets some pair straddle"
    assert all(p.near_duplicates is None for p in plain)
    for seed in range(4):
        s = datasets.load_train_val(cfg_for(root, f"data.seed={seed}"), progress=False)
        assert leaks(s.train_x, s.val_x) == 0
        # class-stratified as before: 10 of 39, each class's share proportional to its size
        assert torch.bincount(s.val_y).tolist() == torch.bincount(plain[seed].val_y).tolist()
        assert s.near_duplicates["groups"] == 9 and s.near_duplicates["images"] == 18
        assert s.near_duplicates["total_images"] == 39 and s.near_duplicates["similarity"] == 0.9
        example = s.near_duplicates["examples"][0]  # the pair, named by file
        assert re.fullmatch(r"(\w+)/(\1\d\d)-copy\.jpg ~ \1/\2\.png", example), example
    again = datasets.load_train_val(cfg_for(root, "data.seed=3"), progress=False)
    assert torch.equal(again.val_x, s.val_x)
    # An old run dir (no near_duplicates key in its config.toml) re-creates its plain split.
    text = to_toml(cfg_for(root))
    assert "near_duplicates = 0.9" in text
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CONFIG).write_text(text.replace("near_duplicates = 0.9\n", ""))
    assert load_run_config(tmp_path / "old").data.near_duplicates == 0.0


def test_a_users_own_val_and_test_are_kept_and_their_near_duplicates_listed(tmp_path, capsys):
    root = tmp_path / "data"
    photo_folder(root / "train", n=6, copies=0)
    photo_folder(root / "val", n=3, copies=0, seed=50)
    photo_folder(root / "test", n=2, copies=0, seed=70)
    near_copy(root / "train" / "kiwi" / "kiwi02.png", root / "val" / "kiwi" / "again.jpg")
    near_copy(root / "train" / "plum" / "plum04.png", root / "test" / "plum" / "sent.jpg")
    s = datasets.load_train_val(cfg_for(root), progress=False)
    assert len(s.train_y) == 18 and len(s.val_y) == 10 and s.near_duplicates is None  # untouched
    err = capsys.readouterr().err
    assert "warning: 1 image(s) of" in err and "are near-duplicates of training images" in err
    assert "train/kiwi/kiwi02.png ~ val/kiwi/again.jpg" in err
    x, _, _ = datasets.load_test(cfg_for(root))
    assert len(x) == 7
    assert "train/plum/plum04.png ~ test/plum/sent.jpg" in capsys.readouterr().err
    datasets.load_train_val(cfg_for(root, "data.near_duplicates=0"), progress=False)
    assert "near-duplicates" not in capsys.readouterr().err  # off: no listing


# --------------------------------------------------------------------------- the probe's report


def probe_rows() -> list[dict]:
    return [
        {"phase": 0, "phase_name": "probe", "epoch": e, "phase_epoch": e, "l2": l2,
         "train_loss": 0.1 + l2, "train_acc": 0.99 - l2 / 10, "val_loss": 0.3 + abs(l2 - 0.1),
         "val_acc": va, "lr": 0.0, "seconds": 1.0, "resolution": 260}
        for e, (l2, va) in enumerate([(1.0, 0.90), (0.3, 0.93), (0.1, 0.95), (0.03, 0.94),
                                      (0.01, 0.92)], start=1)
    ]


def test_probe_curves_are_drawn_against_the_l2_penalty_on_a_log_axis():
    rows = probe_rows()
    fig = probe_figure(rows)
    assert len(fig.axes) == 2  # loss and accuracy: no learning-rate panel for a probe
    for ax, key in zip(fig.axes, ("loss", "acc")):
        assert ax.get_xlabel().startswith("L2 penalty") and ax.get_xscale() == "log"
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert set(lines) == {"train", "val"}
        assert list(lines["val"].get_xdata()) == [0.01, 0.03, 0.1, 0.3, 1.0]
        want = {r["l2"]: r[f"val_{key}"] for r in rows}
        assert list(lines["val"].get_ydata()) == [want[v] for v in (0.01, 0.03, 0.1, 0.3, 1.0)]
    assert [t.get_text() for t in fig.axes[1].texts] == ["kept l2 0.1: val 95.0%"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    """A probe-only run (random-init resnet18 frozen, L-BFGS sweep) on a photo folder with
    near-duplicates in train/ and a test/ folder; evaluated on test, then reported."""
    from cifar_transfer.training.run import train

    root = tmp_path_factory.mktemp("photos")
    photo_folder(root / "train", n=12, copies=3)
    photo_folder(root / "test", n=4, copies=0, seed=500)
    cfg = apply_overrides(load_recipe("small-folder"), [
        f"data.data_dir={root}", "data.storage_size=32", "data.decode_workers=2",
        "model.backbone=resnet18", "model.weights=none", "model.resolution=32",
        "phases.0.l2_values=1,0.1,0.01", "phases.0.cached_flips=false", "run.threads=2",
        "run.compile_features=off",
    ])  # fmt: skip
    out = tmp_path_factory.mktemp("probe-run") / "run"
    train(cfg, out, progress=False)
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    assert main(["report", str(out)]) == 0
    return out


def test_probe_report_shows_the_sweep_the_groups_and_val_beside_test(probe_run):
    meta = json.loads((probe_run / "model.json").read_text())
    assert meta["near_duplicates"]["groups"] == 9 and meta["near_duplicates"]["images"] == 18
    html = (probe_run / "report.html").read_text()
    assert "Validation and held-out test" in html and 'alt="probe L2 sweep"' in html
    assert "<b>3</b><span>L2 penalties swept (probe)" in html and "epochs run" not in html
    test = json.loads((probe_run / "eval-test.json").read_text())
    assert f"{test['accuracy']:.2%}</b><span>held-out test (eval-test.json)" in html
    assert f"{meta['val_acc']:.2%}</b><span>validation, training" in html
    assert "found <b>9</b> group(s)" in html and "<b>18</b> of the 45 images" in html
    fig = probe_figure(read_metrics(probe_run))  # what curves.png shows
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes) == 2
    # Without eval-test.json the report says how to get the held-out figure.
    (probe_run / "eval-test.json").unlink()
    assert main(["report", str(probe_run)]) == 0
    assert "--split test</code> scores the model" in (probe_run / "report.html").read_text()


def test_probe_report_renders_in_headless_chromium(probe_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium when it can)")
    url = (probe_run / "report.html").resolve().as_uri()
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    loaded, total, dom = images_decoded(common, url)
    assert loaded == total >= 5
    assert "Validation and held-out test" in dom


def test_the_run_log_says_what_the_check_found():
    from cifar_transfer.training.core import near_duplicates_line

    found = {"similarity": 0.9, "groups": 2, "images": 5, "total_images": 40, "pairs": 3,
             "examples": ["a/1.jpg ~ a/2.jpg"]}  # fmt: skip
    assert near_duplicates_line(found) == (
        "near-duplicates (perceptual hash, data.near_duplicates=0.9): 2 group(s) holding 5 of the "
        "40 images, each kept on one side of the validation split (e.g. a/1.jpg ~ a/2.jpg)"
    )
    none = {**found, "groups": 0, "images": 0, "pairs": 0, "examples": []}
    assert near_duplicates_line(none).endswith("): none among the 40 images")
