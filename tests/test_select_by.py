"""run.select_by = "balanced_accuracy": the best epoch of an imbalanced dataset (issue 12)."""

from __future__ import annotations

import json

import torch
from test_train import read_metrics, two_phase

from cifar_transfer.config import PhaseConfig
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.loop import PhaseInputs, validate
from cifar_transfer.training.plan import PhasePlan
from cifar_transfer.training.runlog import RunLog


def test_validate_reports_the_mean_recall_over_classes_next_to_accuracy():
    # Features are the logits themselves: class 0's three images right, class 1's one image wrong.
    x = torch.tensor([[2.0, 0.0], [3.0, 1.0], [1.0, 0.0], [5.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1])
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
        net.bias.zero_()
    inputs = PhaseInputs(x, y, x, y, cached=True, resolution=32, mean=(0, 0, 0), std=(1, 1, 1))
    _, acc, balanced, logits = validate(net, inputs, batch_size=3, precision="fp32")
    assert acc == 0.75 and balanced == 0.5  # a majority guesser looks good on accuracy only
    assert torch.equal(logits, x)  # every image's logits, in order, across batches


def test_the_best_epoch_follows_select_by_and_model_json_keeps_the_accuracy(tmp_path):
    plan = PhasePlan(0, PhaseConfig(name="p"), 32, "fp32", False)
    rows = [(0.80, 0.50), (0.70, 0.70), (0.75, 0.60)]  # (val_acc, val_balanced_acc) per epoch
    for key, want in (("val_acc", (1, 0.80)), ("val_balanced_acc", (2, 0.70))):
        log = RunLog(tmp_path, writes=False, console=False, tensorboard=False)
        log.select_key = key
        for acc, balanced in rows:
            row = log.row(plan, 1, val_acc=acc, val_balanced_acc=balanced)
            log.rows.append(row)
            log.improved(row, plan)
        assert (log.best.epoch, log.best.acc) == want  # Best.acc: the accuracy, what model.json says
        assert log.phase_best(0) == max(r[key == "val_balanced_acc"] for r in rows)


def test_a_run_selected_by_balanced_accuracy_bundles_that_epoch(cifar_dir, tmp_path):
    cfg = two_phase(cifar_dir, "run.select_by=balanced_accuracy", "run.precision=fp32")
    summary = train_mod.train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert all(0.0 <= r["val_balanced_acc"] <= 1.0 for r in rows)
    best = max(rows, key=lambda r: (r["val_balanced_acc"], -r["epoch"]))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["best_epoch"] == summary["best_epoch"] == best["epoch"]
    assert meta["val_acc"] == best["val_acc"]
