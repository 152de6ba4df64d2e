"""--tensorboard: every metrics row also lands in RUN_DIR/tensorboard as scalars a person can plot."""

from __future__ import annotations

import json

import pytest

from cifar_transfer.cli import main

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is a dev extra; `make test` installs it",
)


def test_tensorboard_logs_the_same_curves_as_metrics_jsonl(cifar_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main([
        "train", "--recipe", "cnn-baseline", "--data-dir", str(cifar_dir), "--out", str(run),
        "--quiet", "--tensorboard", "--set", "data.val_size=100", "--set", "phases.0.epochs=3",
        "--set", "phases.0.batch_size=50", "--set", "run.threads=2",
    ])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= tags
    val = acc.Scalars("accuracy/val")
    assert [e.step for e in val] == [r["epoch"] for r in rows] == [1, 2, 3]
    assert [e.value for e in val] == pytest.approx([r["val_acc"] for r in rows])
    assert "tensorboard = true" in (run / "config.toml").read_text(), "kept for --resume"


def test_resume_rejects_tensorboard_flag(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--tensorboard"]) == 2
    assert "--resume continues a run with its saved config" in capsys.readouterr().err
