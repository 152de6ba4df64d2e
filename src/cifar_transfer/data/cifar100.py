"""CIFAR-100 as tensors: the official python archive (MD5-checked download, or a local folder),
read through cifar10.py's restricted unpickler; fine labels (100 classes) or coarse (20).

The archive extracts to cifar-100-python/{train, test, meta}: `train` and `test` are one pickle
each with 'data' (N, 3072) and 'fine_labels'/'coarse_labels'; `meta` names the classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cifar_transfer.data.cifar10 import Archive, _read_batch, download_archive, read_pickle
from cifar_transfer.system.errors import UserError

DIRNAME = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # of the official archive (as torchvision checks it)
BYTES = 169_001_437
LABELS = {"fine": ("fine_labels", "fine_label_names", 100), "coarse": ("coarse_labels", "coarse_label_names", 20)}


def is_cifar100_dir(path: Path) -> bool:
    """True when `path` holds the extracted archive's `train` and `meta` files."""
    return (path / "train").is_file() and (path / "meta").is_file()


ARCHIVE = Archive("CIFAR-100", DIRNAME, is_cifar100_dir)
FIX = f"re-download CIFAR-100 or pass --data-dir with an intact {DIRNAME} folder"


def download_cifar100(cache_dir: Path, url: str = URL, md5: str = MD5, size: int = BYTES) -> Path:
    """Download and check the official archive into the cache (once); return its folder."""
    return download_archive(ARCHIVE, cache_dir, url, md5, size)


def find_dir(path: Path) -> Path | None:
    """`path` or its cifar-100-python child when it holds the archive's files, else None."""
    for candidate in (path, path / DIRNAME):
        if is_cifar100_dir(candidate):
            return candidate
    return None


def class_names(folder: Path, labels: str = "fine") -> list[str]:
    """The 100 fine (or 20 coarse) class names from the archive's `meta` file."""
    _, key, count = LABELS[labels]
    meta = read_pickle(folder / "meta", FIX)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise UserError(f"{folder / 'meta'} has no list of {count} '{key}': {FIX}")
    return list(names)


def load_split(folder: Path, split: str, labels: str = "fine") -> tuple[torch.Tensor, torch.Tensor]:
    """Read 'train' or 'test': uint8 (N,3,32,32) images and int64 (N,) fine or coarse labels."""
    if split not in ("train", "test"):
        raise UserError(f"unknown CIFAR-100 split {split!r}: use 'train' or 'test'")
    path = Path(folder) / split
    if not path.is_file():
        raise UserError(
            f"{split} not found in {folder}: the {split} split is not there; "
            + ("evaluate with --split val or add it" if split == "test" else FIX)
        )
    key, _, count = LABELS[labels]
    data, y = _read_batch(path, key, count, "CIFAR-100", DIRNAME)
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), torch.from_numpy(y)
