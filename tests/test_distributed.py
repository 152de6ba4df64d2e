"""torchrun DDP on the CPU (gloo): 2 ranks follow 1 rank's loss curve, only rank 0 writes, and a
2-rank checkpoint resumes under 1 rank. (No GPU in the test environment: the nccl path is not run.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import load_checkpoint
from cifar_transfer.cli import main
from cifar_transfer.models.transfer import create_model
from cifar_transfer.recipes import load_recipe
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import core, distributed
from cifar_transfer.training import run as train_mod

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CIFAR_TRANSFER_CACHE": str(cache)}


def write_recipe(path: Path, cifar_dir: Path) -> Path:
    """resnet18 at 32 px: head on cached features, head on live augmented images, everything.

    195 training images in global batches of 20 end each epoch with a batch of 15, split 8 + 7.
    The last phase trains BatchNorm with batch statistics at a small lr (see the tolerance below).
    """
    common = {"optimizer": "sgd", "batch_size": 20}
    doc = {
        "recipe": "ddp",
        "data": {"data_dir": str(cifar_dir), "val_size": 100, "train_limit": 195},
        "model": {"backbone": "resnet18", "weights": "none", "resolution": 32},
        "run": {"threads": 1, "compile_features": "off", "eval_batch_size": 100,
                "precision": "fp32"},  # the tolerances below are fp32 rounding
        "phases": [
            {"name": "head", "epochs": 2, "freeze": "all", "augment": "none", "lr": 0.05, **common},
            {"name": "head-aug", "epochs": 2, "freeze": "all", "augment": "crop-flip", "lr": 0.05,
             **common},
            {"name": "full", "epochs": 2, "freeze": "none", "augment": "crop-flip", "lr": 1e-5,
             **common},
        ],
    }  # fmt: skip
    path.write_text(tomli_w.dumps(doc))
    return path


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def check_curves(rows: list[dict], reference: list[dict], label: str) -> None:
    """Relative tolerances: rounding alone where BatchNorm is frozen, looser where it trains.

    With a frozen backbone both runs compute the same sums in another order: observed <= 1e-7.
    Training BatchNorm on 20 images, whose last stage is 1x1 px at 32 px input, rounding
    differences of ~1e-6 (a 1-rank run on the reversed batch differs that much) flip ReLUs and
    max-pools and the curves drift apart: observed 6e-6 in the first epoch and up to 1.2e-3 in the
    second. Per-rank BatchNorm statistics (no sync) measured 8e-4 and 4e-2.
    """
    assert len(rows) == len(reference) == 6, label
    for row, ref in zip(rows, reference):
        tol = 1e-2 if row["phase_name"] == "full" else 1e-5
        assert row["epoch"] == ref["epoch"] and row["phase_name"] == ref["phase_name"]
        assert rel(row["train_loss"], ref["train_loss"]) < tol, (label, row, ref)
        assert rel(row["val_loss"], ref["val_loss"]) < 10 * tol, (label, row, ref)
        if row["phase_name"] != "full":
            assert row["train_acc"] == ref["train_acc"] and row["val_acc"] == ref["val_acc"]


def test_two_ranks_follow_one_rank_and_a_two_rank_checkpoint_resumes_under_one(
    cifar_dir, tmp_path
):
    recipe = write_recipe(tmp_path / "ddp.toml", cifar_dir)
    two = tmp_path / "two"
    # Its own feature cache, so rank 0 extracts while rank 1 waits, then reads rank 0's file.
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "cifar_transfer", "train", "--recipe", str(recipe), "--out", str(two),
         "--quiet"],
        env=torchrun_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    # While it runs, copy its run dir as a kill in phase 1 would leave it (checkpoint first: the
    # metrics of an epoch are written before its checkpoint).
    snap = tmp_path / "snap"
    (snap / "checkpoints").mkdir(parents=True)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        if (two / rundir.LAST).is_file():
            shutil.copy(two / rundir.LAST, snap / rundir.LAST)
            ckpt = load_checkpoint(snap / rundir.LAST)
            try:  # and the best epoch's weights it names (a newer checkpoint may drop them)
                if ckpt["best"]["file"]:
                    shutil.copy(two / ckpt["best"]["file"], snap / ckpt["best"]["file"])
            except FileNotFoundError:
                continue
            if ckpt["global_epoch"] >= 3:
                break
        time.sleep(0.05)
    for name in ("metrics.jsonl", "config.toml"):
        shutil.copy(two / name, snap / name)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    # Only rank 0 printed and wrote: one report, one metrics row per epoch, no stray files.
    assert out.count("done: ") == 1 and out.count("run dir: ") == 1, out
    names = sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    best = load_checkpoint(two / rundir.LAST)["best"]["file"]
    assert names == sorted([best, "checkpoints/last.pt", "config.toml", "metrics.jsonl",
                            "model.json", "model.safetensors"])  # fmt: skip
    assert "extract_seconds" in read_rows(two)[0]

    one = tmp_path / "one"
    train_mod.train(load_recipe(str(recipe)), one, progress=False)
    check_curves(read_rows(two), read_rows(one), "2 ranks vs 1 rank")

    # The 2-rank checkpoint holds nothing per rank: one process carries the run to its end.
    start = load_checkpoint(snap / rundir.LAST)["global_epoch"]
    assert 3 <= start < 6
    train_mod.resume(snap, progress=False)
    rows = read_rows(snap)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    check_curves(rows, read_rows(two), "resumed under 1 rank vs 2 ranks")
    assert (snap / "model.safetensors").is_file()


SYNC_BN_WORKER = textwrap.dedent('''
    """One training step of a small BatchNorm net on 2 ranks vs. one process on the whole batch."""
    import copy, json, sys
    import torch
    from timm.layers import BatchNormAct2d
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from cifar_transfer.training import distributed

    torch.manual_seed(0)
    # No bias before a BatchNorm: its gradient is zero, so its relative error means nothing.
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16),
        nn.ReLU(), nn.Linear(16, 10),
    )
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y = torch.arange(16) % 10
    ref = copy.deepcopy(net)
    ref_out = ref(x)
    nn.functional.cross_entropy(ref_out, y).backward()
    with distributed.process_group(torch.device("cpu")):
        part = distributed.shard(len(x))
        model = distributed.convert_sync_batchnorm(net, torch.device("cpu"))
        ddp = DistributedDataParallel(model)
        out = ddp(x[part])
        nn.functional.cross_entropy(out, y[part]).backward()
        report = {
            "kinds": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}),
            "out": (out - ref_out[part]).abs().max().item(),
            "grad": max(((p.grad - q.grad).norm() / q.grad.norm()).item()
                        for p, q in zip(model.parameters(), ref.parameters())),
            "running": max((a - b).abs().max().item() for (k, a), b in
                           zip(model.state_dict().items(), ref.state_dict().values())
                           if "running" in k),
        }
        del ddp, model, out  # a DDP model alive when the group is destroyed can abort the rank
        if distributed.is_main():
            json.dump(report, open(sys.argv[1], "w"))
''')


def test_cpu_sync_batchnorm_matches_one_process_batchnorm_in_one_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SYNC_BN_WORKER)
    result = tmp_path / "report.json"
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(result)], env=torchrun_env(tmp_path / "cache"),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["kinds"] == ["CpuSyncBatchNorm", "CpuSyncBatchNormAct"]
    # Observed 4e-7, 1.2e-6, 7e-9; per-rank statistics (plain BatchNorm, 8 of the 16 images
    # each) are off by 0.36 in the outputs, 0.98 in the gradients and 0.02 in running stats.
    assert report["out"] < 1e-5 and report["grad"] < 1e-4 and report["running"] < 1e-6, report


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_batchnorm_conversion_keeps_every_layer_and_eval_output(device):
    """timm's BatchNormAct2d carries its activation: a plain converter would drop it."""
    model = create_model("efficientnet_lite0", "none", "linear").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        converted = distributed.convert_sync_batchnorm(model, torch.device(device)).eval()
        after = converted(x)  # eval mode never synchronizes, so this runs on the CPU too
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "BatchNormAct2d" not in kinds and "BatchNorm2d" not in kinds
    assert torch.equal(before, after)


def test_shards_cover_every_item_once(monkeypatch):
    for world in (1, 2, 3, 8):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        for n in (0, 1, 15, 20, 128):
            parts = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                parts.append(distributed.shard(n))
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            assert max(len(range(n)[s]) for s in parts) - min(len(range(n)[s]) for s in parts) <= 1


def test_the_global_batch_must_split_over_the_ranks(cifar_dir):
    cfg = load_recipe("cnn-baseline")
    core.check_batch_sizes(cfg, 4)  # 64
    with pytest.raises(UserError, match=r"phases.0.batch_size 64 .* over 3 processes"):
        core.check_batch_sizes(cfg, 3)


def test_torchrun_without_out_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--recipe", "cnn-baseline"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: under torchrun every process writes the same run dir: pass --out RUN_DIR"
    )
