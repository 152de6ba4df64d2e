"""Resuming a run a user moved, edited or half-lost: the checkpoint alone carries it, and every
mismatch is one line that names the fix."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import interrupted_run, write_cifar_dir
from safetensors.torch import load_file

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import STATE_FORMAT, load_checkpoint, save_checkpoint
from cifar_transfer.cli import main
from cifar_transfer.models.transfer import create_model
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.training import run as train_mod


def one_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def cnn_cfg(data_dir: Path, *extra: str):
    return apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={data_dir}", "data.val_size=50", "data.train_limit=100",
        "phases.0.epochs=3", "phases.0.batch_size=25", "run.threads=1", *extra,
    ])  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / rundir.WEIGHTS), load_file(b / rundir.WEIGHTS)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_needs_no_weights_source_the_checkpoint_holds_them(cifar_dir, tmp_path, monkeypatch):
    """--weights FILE deleted after the first epoch (or hub weights unreachable offline)."""
    weights = tmp_path / "start.pt"
    torch.save(create_model("resnet18", "none", "linear").backbone.state_dict(), weights)
    cfg = apply_overrides(load_recipe("seed-native-32"), [
        f"data.data_dir={cifar_dir}", "data.val_size=50", "data.train_limit=100",
        "model.backbone=resnet18", f"model.weights={weights}", "phases.*.epochs=1",
        "phases.*.batch_size=50", "run.threads=1", "run.compile_features=off",
    ])  # fmt: skip
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 1)
    weights.unlink()
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert same_weights(tmp_path / "whole", tmp_path / "run")


def test_resume_with_moved_data_takes_data_dir_and_checks_it_is_the_same(
    tmp_path, monkeypatch, capsys
):
    data = write_cifar_dir(tmp_path / "a")
    cfg = cnn_cfg(data)
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 1)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "a", moved)
    # Other images under the same names: refused, nothing changed.
    other = write_cifar_dir(tmp_path / "other", seed=1)
    before = (tmp_path / "run" / rundir.CONFIG).read_text()
    assert main(["train", "--resume", str(tmp_path / "run"), "--data-dir", str(other)]) == 2
    one_line(capsys, "not the images", str(other))
    assert (tmp_path / "run" / rundir.CONFIG).read_text() == before
    # The same images in their new place: the run goes on and remembers where they are now.
    assert main(["train", "--resume", str(tmp_path / "run"), "--data-dir", str(moved), "--quiet"]) == 0
    assert same_weights(tmp_path / "whole", tmp_path / "run")
    saved = tomllib.loads((tmp_path / "run" / rundir.CONFIG).read_text())
    assert Path(saved["data"]["data_dir"]) == moved.resolve()


def test_a_checkpoint_from_another_version_is_one_line(cifar_dir, tmp_path, monkeypatch, capsys):
    interrupted_run(monkeypatch, cnn_cfg(cifar_dir), tmp_path / "run", 1)
    last = tmp_path / "run" / rundir.LAST
    state = load_checkpoint(last)
    save_checkpoint(last, {**state, "format": STATE_FORMAT + 1})
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    one_line(capsys, "format", str(STATE_FORMAT + 1), "start a new run")


def test_a_config_edited_to_another_backbone_is_refused_on_resume(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    interrupted_run(monkeypatch, cnn_cfg(cifar_dir), tmp_path / "run", 1)
    path = tmp_path / "run" / rundir.CONFIG
    doc = tomllib.loads(path.read_text())
    doc["model"]["backbone"] = "resnet18"
    path.write_text(tomli_w.dumps(doc))
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    one_line(capsys, "resnet18", "cnn", "config.toml")


def test_a_corrupt_metrics_log_before_resume_is_one_line(cifar_dir, tmp_path, monkeypatch, capsys):
    interrupted_run(monkeypatch, cnn_cfg(cifar_dir), tmp_path / "run", 1)
    (tmp_path / "run" / rundir.METRICS).write_bytes(b'{"epoch": 1, "val_a\xff\n')
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    one_line(capsys, "metrics.jsonl line 1 is not JSON")


def test_a_best_file_from_lost_work_is_not_the_one_bundled(cifar_dir, tmp_path, monkeypatch):
    """A kill between writing a new best epoch's weights and the checkpoint that names them: the
    resumed run keeps the checkpoint's own best file and ends as an unbroken run does."""
    cfg = cnn_cfg(cifar_dir)
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 1)
    named = load_checkpoint(tmp_path / "run" / rundir.LAST)["best"]["file"]
    stray = tmp_path / "run" / "checkpoints" / "best-epoch2.safetensors"
    shutil.copy(tmp_path / "run" / named, stray)  # what the lost epoch 2 would have left
    train_mod.resume(tmp_path / "run", progress=False)
    assert same_weights(tmp_path / "whole", tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("best-epoch*"))
    assert kept == sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("best-epoch*"))


@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_an_out_that_cannot_be_created_is_one_line(where, cifar_dir, tmp_path, capsys):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:  # /proc takes no new folders, even from root (a chmod'ed folder would not stop root)
        out = Path("/proc/cifar-transfer-test/run")
    argv = ["train", "--recipe", "cnn-baseline", "--data-dir", str(cifar_dir), "--out", str(out)]
    assert main(argv) == 2
    one_line(capsys, str(out))
