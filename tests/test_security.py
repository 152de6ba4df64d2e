"""What a hostile or unlucky user finds: pickled data files, planted lock links, image bombs,
signals, closed pipes, odd file names, unwritable caches and memory running out. Each ends in one
line (or one `error:` line per bad file) and leaves nothing behind that the next command trips on."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer.artifacts.checkpoint import load_checkpoint
from cifar_transfer.cli import main
from cifar_transfer.data.cifar10 import load_split
from cifar_transfer.results import predict as predict_mod
from cifar_transfer.system.atomic import SLOW_WRITE_ENV, is_temp_file
from cifar_transfer.system.errors import UserError

SMALL = ["--set", "phases.0.epochs=1", "--set", "data.val_size=20", "--set", "data.train_limit=20",
         "--set", "run.threads=1", "--set", "run.compile_features=off", "--quiet"]  # fmt: skip
LAST = Path("checkpoints") / "last.pt"


def one_line(text: str) -> str:
    """The single line of `text`, with no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def cli(argv: list[str], *, stdout=subprocess.PIPE, env: dict | None = None) -> subprocess.Popen:
    """`cifar-transfer ARGV` as a process of its own, as a shell or a scheduler starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_transfer", *argv], stdout=stdout, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def photo(path: Path, value: int = 120, size: int = 48) -> Path:
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


# -- data pickles ----------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls func(arg): what a hostile data_batch_1 does with os.system."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, exec], ids=["os.system", "builtins.exec"])
def test_a_data_batch_whose_pickle_runs_a_command_is_refused_and_never_run(
    func, cifar_dir, tmp_path, capsys
):
    folder = Path(shutil.copytree(cifar_dir, tmp_path / "data" / cifar_dir.name))
    marker = tmp_path / "MARKER"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    batch = folder / "data_batch_1"
    batch.write_bytes(pickle.dumps({"labels": [0], "data": Payload(func, command)}, protocol=2))
    with batch.open("rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists(), "the control: plain unpickling runs the command"
    marker.unlink()

    rc = main(["train", "--recipe", "cnn-baseline", "--out", str(tmp_path / "run"),
               "--data-dir", str(folder), *SMALL])  # fmt: skip
    assert not marker.exists(), "the pickled command ran"
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: {batch} ")
    assert func.__name__ in line and "re-download CIFAR-10" in line
    assert not (tmp_path / "run").exists()


def test_a_batch_that_rebuilds_anything_but_arrays_is_refused(cifar_dir, tmp_path):
    folder = Path(shutil.copytree(cifar_dir, tmp_path / "data" / cifar_dir.name))
    keep = tmp_path / "keep"
    keep.mkdir()
    batch = folder / "data_batch_4"
    batch.write_bytes(pickle.dumps(
        {"data": np.zeros((1, 3072), np.uint8), "labels": Payload(shutil.rmtree, str(keep))},
        protocol=4,
    ))  # fmt: skip
    with pytest.raises(UserError) as err:
        load_split(folder, "train")
    message = str(err.value)
    assert message.startswith(f"{batch} holds shutil.rmtree")
    assert "refused without running it" in message and "re-download CIFAR-10" in message
    assert keep.is_dir()


# -- run lock --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_lock_that_is_not_a_plain_file_is_refused_and_its_target_untouched(
    kind, cifar_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("a file the attacker wants truncated\n")
    lock = run / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    else:
        os.mkfifo(lock)
    rc = main(["train", "--recipe", "cnn-baseline", "--out", str(run), "--data-dir",
               str(cifar_dir), *SMALL])  # fmt: skip
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: {lock} is ")
    assert ("symbolic link" if kind == "symlink" else "not a regular file") in line
    assert "delete it" in line
    assert victim.read_text() == "a file the attacker wants truncated\n"
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "the refused run wrote files"


# -- images ----------------------------------------------------------------------------------------
def test_an_image_bomb_gets_its_own_error_line_and_the_other_images_are_predicted(
    tiny_run, tmp_path, capsys
):
    folder = tmp_path / "photos"
    folder.mkdir()
    bomb = folder / "bomb.png"
    Image.new("1", (14000, 13000)).save(bomb, optimize=True)  # 182 million pixels in ~22 KB
    assert bomb.stat().st_size < 100_000
    good = photo(folder / "cat.png")
    rc = main(["predict", str(tiny_run), str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert one_line(out).startswith(f"{good}: ")
    line = one_line(err)
    assert line.startswith(f"error: {bomb}: more than ") and "pixels" in line
    assert "decompression bomb" in line and "downscale" in line


def test_a_non_utf8_file_name_is_predicted_and_printed(tiny_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")))
    Path(os.fsdecode(os.fsencode(folder) + b"/bad\xff.jpg")).write_text("not an image")
    rc = main(["predict", str(tiny_run), str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert one_line(out).startswith(f"{folder}/caf\\udce9.png: ")
    assert one_line(err).startswith(f"error: {folder}/bad\\udcff.jpg: not an image PIL can read")
    assert main(["predict", str(tiny_run), str(folder), "--json"]) == 1
    paths = [p["path"] for p in json.loads(capsys.readouterr().out)]
    assert [os.fsencode(p) for p in paths] == [os.fsencode(folder) + b"/bad\xff.jpg",
                                                os.fsencode(folder) + b"/caf\xe9.png"]


def test_predict_into_a_pipe_that_closes_exits_quietly(tiny_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        photo(folder / f"img{i}.png", value=60 * i)
    proc = cli(["predict", str(tiny_run), str(folder)])
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


# -- signals ---------------------------------------------------------------------------------------
def test_sigterm_ends_a_train_like_ctrl_c_and_resume_finishes(cifar_dir, tmp_path):
    run = tmp_path / "run"
    # Each last.pt write pauses 1 s half-written: the signal likely lands inside one.
    proc = cli(["train", "--recipe", "cnn-baseline", "--out", str(run), "--data-dir", str(cifar_dir),
                "--set", "phases.0.epochs=4", "--set", "data.val_size=20",
                "--set", "data.train_limit=40", "--set", "run.threads=1", "--quiet"],
               env={SLOW_WRITE_ENV: "1:last.pt"})  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / LAST).is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert one_line(err.decode()) == f"interrupted: continue with `cifar-transfer train --resume {run}`"
    assert not (run / ".lock").exists(), "the lock outlived the run"
    assert not [p for p in run.rglob("*") if is_temp_file(p)], "a half-written file was left"
    assert load_checkpoint(run / LAST)["global_epoch"] in (1, 2, 3)

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


# -- environment -----------------------------------------------------------------------------------
def test_an_unwritable_feature_cache_warns_once_and_the_run_goes_on(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would have to live under this file")
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(blocker / "cache"))
    run = tmp_path / "run"
    rc = main(["train", "--recipe", "cnn-baseline", "--out", str(run), "--data-dir", str(cifar_dir),
               "--set", "phases.0.freeze=all", "--set", "phases.0.augment=none", *SMALL])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0 and "done:" in out
    line = one_line(err)  # train and val features both failed to save: said once
    assert line.startswith(f"warning: cannot write the feature cache in {blocker / 'cache'}")
    assert "going on without it" in line and "CIFAR_TRANSFER_CACHE" in line
    assert (run / "model.safetensors").is_file()


def test_a_damaged_feature_cache_is_rebuilt_and_said_on_stderr_not_stdout(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    cached = ["--data-dir", str(cifar_dir), "--set", "phases.0.freeze=all",
              "--set", "phases.0.augment=none", *SMALL]  # fmt: skip
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(tmp_path / "r1"), *cached]) == 0
    entries = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(entries) == 2  # train and val features
    for entry in entries:
        entry.write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(tmp_path / "r2"), *cached]) == 0
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == ["run dir", "done"]
    assert sorted(line.split(" (")[0] for line in err.splitlines()) == [
        f"note: feature cache {entry} unreadable" for entry in entries
    ]  # fmt: skip


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore lines"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                     "memory: you tried to allocate 96636764160 bytes."),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
def test_out_of_memory_is_one_line_naming_what_to_lower(
    error, tiny_run, tmp_path, monkeypatch, capsys
):
    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(predict_mod.TorchPredictor, "logits", no_memory)
    assert main(["predict", str(tiny_run), str(photo(tmp_path / "a.png"))]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory") and "--batch-size" in line

    import cifar_transfer.training.run

    monkeypatch.setattr(cifar_transfer.training.run, "train", no_memory)
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory")
    for key in ("phases.N.batch_size", "run.eval_batch_size", "resolution"):
        assert key in line
