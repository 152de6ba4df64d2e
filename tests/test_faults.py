"""Faults a long run meets: SIGKILL at any instant, NaN/inf loss, a second run on the same run dir."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import signal
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import load_checkpoint
from cifar_transfer.cli import main
from cifar_transfer.recipes import load_recipe
from cifar_transfer.system import runlock
from cifar_transfer.system.atomic import SLOW_WRITE_ENV, is_temp_file
from cifar_transfer.system.errors import UserError
from cifar_transfer.training import loop
from cifar_transfer.training import run as train_mod

TIMING = rundir.TIMING_KEYS


def write_recipe(path: Path, cifar_dir: Path, epochs: tuple[int, int] = (4, 4)) -> Path:
    """Two short cnn phases (Adam + crop-flip, then SGD + flip, EMA on): a few seconds per run."""
    doc = {
        "recipe": "faults",
        "data": {"data_dir": str(cifar_dir), "val_size": 50, "train_limit": 100},
        "model": {"backbone": "cnn", "weights": "none", "resolution": 32},
        "run": {"threads": 1, "compile_features": "off", "eval_batch_size": 50, "ema": 0.9},
        "phases": [
            {"name": "a", "epochs": epochs[0], "optimizer": "adam", "lr": 1e-3,
             "schedule": "constant", "augment": "crop-flip", "batch_size": 20},
            {"name": "b", "epochs": epochs[1], "optimizer": "sgd", "lr": 0.01,
             "schedule": "cosine", "augment": "flip", "batch_size": 20},
        ],
    }  # fmt: skip
    path.write_text(tomli_w.dumps(doc))
    return path


# Training processes are forked from a server that has imported torch and the package once (and
# run no torch op, so forking is safe): each starts in a fraction of a second instead of paying
# ~5-15 s of imports on a busy 2-core machine. They are ordinary processes running the CLI's
# main(), and SIGKILL ends them like any other.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["cifar_transfer.cli", "cifar_transfer.training.run"])


def _cli(argv: list[str], slow_write: str) -> None:
    os.environ.pop(SLOW_WRITE_ENV, None)
    if slow_write:
        os.environ[SLOW_WRITE_ENV] = slow_write
    raise SystemExit(main(argv))


def start(argv: list[str], slow_write: str = "") -> multiprocessing.Process:
    """`cifar-transfer ARGV` in a process of its own."""
    proc = FORKS.Process(target=_cli, args=(argv, slow_write))
    proc.start()
    return proc


def finish(proc: multiprocessing.Process, timeout: float = 300) -> int:
    proc.join(timeout)
    assert proc.exitcode is not None, "the training process did not end"
    return proc.exitcode


def metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(condition, proc: multiprocessing.Process, timeout: float = 120.0) -> bool:
    """Poll until condition() holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not proc.is_alive():
            return False
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the training process")


def check_every_file_is_whole(run: Path) -> list[Path]:
    """Every file a reader would open parses; returns the temp files of interrupted writes."""
    temps = []
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        if is_temp_file(path):
            temps.append(path)
        elif rel == runlock.LOCK_NAME:
            text = path.read_text()
            assert text == "" or text.startswith("pid "), text
            with path.open("rb") as f:  # a dead holder's flock is gone: taking it must succeed
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif rel == "config.toml":
            tomllib.loads(path.read_text())
        elif rel == "metrics.jsonl":
            text = path.read_text()
            assert text.endswith("\n")
            for line in text.splitlines():
                json.loads(line)
        elif rel == "checkpoints/last.pt":
            load_checkpoint(path)
        elif rel.endswith(".safetensors"):
            load_file(path)
        elif rel == "model.json":
            json.loads(path.read_text())
        else:
            raise AssertionError(f"unexpected file in the run dir: {rel}")
    return temps


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(cifar_dir, tmp_path):
    recipe = write_recipe(tmp_path / "faults.toml", cifar_dir)
    train_mod.train(load_recipe(str(recipe)), tmp_path / "whole", progress=False)
    epoch_s = sorted(r["seconds"] for r in read_rows(tmp_path / "whole"))[4]

    rng = random.Random(20240601)
    # One kill soon after the run dir exists (data load, first epoch), one inside a checkpoint
    # write that replaces an earlier checkpoint (the test-only pause between the two halves of
    # last.pt's temp file), the rest at random instants after the segment finished an epoch.
    plan = ["startup", "random", "random", "random"]
    plan.insert(rng.randint(2, len(plan)), "write")
    run = tmp_path / "killed"
    kills = []
    for i, kind in enumerate(plan):
        args = ["train", "--resume", str(run), "--quiet"] if i else [
            "train", "--recipe", str(recipe), "--out", str(run), "--quiet"]
        lines_before = metric_lines(run)
        proc = start(args, slow_write="2:last.pt" if kind == "write" else "")
        if kind == "startup":
            alive = wait_for(lambda: (run / "config.toml").is_file(), proc)
            time.sleep(rng.uniform(0, epoch_s))
        elif kind == "write":
            alive = wait_for(lambda: (run / rundir.LAST).is_file()
                             and any((run / "checkpoints").glob(".last.pt.*.tmp")), proc)
        else:
            alive = wait_for(lambda n=lines_before: metric_lines(run) > n, proc)
            time.sleep(rng.uniform(0, epoch_s))
        assert alive, f"run ended before kill {i} ({kind}) with exit code {proc.exitcode}"
        proc.kill()
        assert finish(proc) == -signal.SIGKILL
        temps = check_every_file_is_whole(run)
        last = run / rundir.LAST
        kills.append((kind, metric_lines(run), load_checkpoint(last)["global_epoch"] if last.is_file()
                      else None, len(temps)))  # fmt: skip
        if kind == "write":
            assert any(t.name.startswith(".last.pt.") for t in temps), "kill missed the write"
            # The previous checkpoint survived the torn write of the newer epoch's.
            assert load_checkpoint(run / rundir.LAST)["global_epoch"] < metric_lines(run)

    assert finish(start(["train", "--resume", str(run), "--quiet"])) == 0
    print("kills (kind, metric lines, checkpoint epoch, temp files):", kills)
    assert len(kills) >= 5 and "write" in [k[0] for k in kills]
    assert check_every_file_is_whole(run) == [], "temp files of killed writes were not cleaned"
    assert not (run / runlock.LOCK_NAME).exists()
    best = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("best-epoch*"))
    assert best == sorted(p.name for p in (run / "checkpoints").glob("best-epoch*")) and len(best) == 1
    for name in ("model.safetensors", f"checkpoints/{best[0]}"):
        whole, resumed = load_file(tmp_path / "whole" / name), load_file(run / name)
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"{name} differs"
    assert without_timing(read_rows(run)) == without_timing(read_rows(tmp_path / "whole"))


class PoisonedLoss:
    """torch.nn.functional with a cross_entropy that turns non-finite after `after` training steps."""

    def __init__(self, value: float, after: int) -> None:
        self.value, self.after, self.steps = value, after, 0

    def __getattr__(self, name: str):
        return getattr(F, name)

    def cross_entropy(self, logits, *args, **kwargs):
        loss = F.cross_entropy(logits, *args, **kwargs)
        if not logits.requires_grad:  # validation
            return loss
        self.steps += 1
        return loss * self.value if self.steps > self.after else loss


@pytest.mark.parametrize("check_every", [1, 4], ids=["every-step", "every-4-steps-as-on-a-gpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(
    value, check_every, cifar_dir, tmp_path, monkeypatch, capsys
):
    # On a GPU the loss is read back every CHECK_EVERY steps (and at each epoch's end), not every
    # step: the run must still stop in the same epoch, name the first bad value, keep the checkpoint.
    monkeypatch.setitem(loop.CHECK_EVERY, "cpu", check_every)
    recipe = write_recipe(tmp_path / "faults.toml", cifar_dir, epochs=(2, 1))
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "F", PoisonedLoss(value, after=7))  # 5 steps an epoch: in epoch 2
    rc = main(["train", "--recipe", str(recipe), "--out", str(run), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: loss became {value}"), err
    assert "lower the lr" in err[0] and str(run / rundir.LAST) in err[0]
    ckpt = load_checkpoint(run / rundir.LAST)
    assert (ckpt["global_epoch"], ckpt["phase"], ckpt["phase_epoch"]) == (1, 0, 1)
    assert not (run / "model.safetensors").exists()
    assert check_every_file_is_whole(run) == [] and not (run / runlock.LOCK_NAME).exists()

    monkeypatch.setattr(loop, "F", F)  # the run goes on from the kept checkpoint
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in read_rows(run)] == [1, 2, 3]


def test_a_second_run_on_a_live_run_dir_is_refused_and_a_dead_one_is_taken_over(
    cifar_dir, tmp_path, capsys
):
    recipe = write_recipe(tmp_path / "faults.toml", cifar_dir, epochs=(1, 1))
    run = tmp_path / "run"
    # The holder finishes its first epoch, then sits 60 s inside its first checkpoint write.
    holder = start(["train", "--recipe", str(recipe), "--out", str(run), "--quiet"],
                   slow_write="60:last.pt")
    try:
        assert wait_for(lambda: any((run / "checkpoints").glob(".last.pt.*.tmp")), holder)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not is_temp_file(p)}
        for argv in (
            ["train", "--recipe", str(recipe), "--out", str(run), "--quiet"],
            ["train", "--resume", str(run), "--quiet"],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert f"in use by pid {holder.pid} on host " in err[0] and f"--resume {run}" in err[0]
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not is_temp_file(p)}
        assert after == before, "a refused run touched the live run's files"
    finally:
        holder.kill()
        finish(holder)

    # Dead holder: a new run still may not overwrite its files, but --resume takes the dir over.
    assert main(["train", "--recipe", str(recipe), "--out", str(run), "--quiet"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]
    assert check_every_file_is_whole(run) == [] and not (run / runlock.LOCK_NAME).exists()


def test_the_lock_refuses_a_second_holder_and_frees_with_its_process(tmp_path):
    first = runlock.acquire(tmp_path)
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on host"):
        runlock.acquire(tmp_path)  # flock conflicts between open files, even in one process
    first.release()
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    # A lock file left by a killed run (its pid in it, no flock held) is simply taken over.
    (tmp_path / runlock.LOCK_NAME).write_text("pid 999999 on host elsewhere\n")
    again = runlock.acquire(tmp_path)
    assert (tmp_path / runlock.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    again.release()
    assert not (tmp_path / runlock.LOCK_NAME).exists()
