"""Shared fixtures: a small learnable CIFAR-format folder, a tiny trained run, offline settings,
the real data path."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_transfer.system import hardware

# Tests never touch the network: hubs fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "cifar10" / "cifar-10-batches-py"


def write_cifar_dir(root: Path, per_batch: int = 100, seed: int = 0, test: bool = False) -> Path:
    """Write data_batch_1..5 (and test_batch) in the original pickle format, with learnable classes.

    Class c is a colour-coded image (its own mean colour and a stripe at row 3c) plus noise,
    so a small model separates the classes within a few epochs.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 225, size=(10, 3))
    names = [f"data_batch_{i}" for i in range(1, 6)] + (["test_batch"] if test else [])
    for name in names:
        labels = np.arange(per_batch) % 10
        rng.shuffle(labels)
        imgs = rng.normal(0, 25, size=(per_batch, 3, 32, 32)) + palette[labels][:, :, None, None]
        for i, c in enumerate(labels):
            imgs[i, :, 3 * c : 3 * c + 2, :] = 255
        data = np.clip(imgs, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"batch_label": name, "labels": labels.tolist(), "data": data}, f, protocol=2
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["c"] * 10, "num_vis": 3072}, f, protocol=2)
    return folder


def interrupted_run(monkeypatch, cfg, out: Path, checkpoints: int) -> None:
    """Train `cfg` into `out` and stop it (KeyboardInterrupt) right after its `checkpoints`-th
    checkpoint was written, as a kill there would; `train --resume out` then goes on from it."""
    from cifar_transfer.training import run as train_mod

    real, calls = train_mod.Run.checkpoint, {"n": 0}

    def stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == checkpoints:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_mod.Run, "checkpoint", stop)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg, out, progress=False)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG declaring width x height pixels: a few KB that would decode to
    gigabytes of RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\0" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A 500-image learnable CIFAR-format folder with a test_batch."""
    return write_cifar_dir(tmp_path_factory.mktemp("cifar"), test=True)


@pytest.fixture(scope="session")
def tiny_run(cifar_dir, tmp_path_factory) -> Path:
    """A finished two-epoch cnn-baseline run on the synthetic CIFAR folder, trained once per session.

    Shared by several modules: never write into it; a module copies it (shutil.copytree) first.
    """
    from cifar_transfer.recipes import apply_overrides, load_recipe
    from cifar_transfer.training.run import train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    cfg = apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={cifar_dir}", "data.val_size=100", "phases.0.epochs=2",
        "run.threads=1", "run.compile_features=off",
    ])  # fmt: skip
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """This module's own copy of the finished two-epoch cnn-baseline run (it may write into it)."""
    import shutil

    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("run-copy") / "run"))


@pytest.fixture(scope="module")
def images(cifar_dir) -> torch.Tensor:
    """Twenty raw uint8 CIFAR-format images."""
    from cifar_transfer.data.cifar10 import load_split

    return load_split(cifar_dir, "train")[0][:20]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Feature caches and downloads go to a per-session temp folder, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(cache))
    # The machine counts as quiet, so whether a measured speed is cached never depends on what
    # else runs beside the tests (tests/test_budget.py checks the busy case itself).
    monkeypatch.setattr(hardware, "others_cpu_use", lambda seconds=0.3: 0.0)
    return cache


@pytest.fixture
def real_data() -> Path:
    """The shared real CIFAR-10 training split, or a clean skip."""
    if not (REAL_DATA / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 not found at {REAL_DATA}")
    return REAL_DATA
