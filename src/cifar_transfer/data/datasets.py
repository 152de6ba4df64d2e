"""Which dataset a config names, and its images as train / val / test tensors.

Three kinds behind one interface (`Source.read(split)` -> uint8 (N,3,S,S), int64 labels):
  cifar10   data_batch_1..5 (+ test_batch) in --data-dir or its cifar-10-batches-py child, or
            the official download when there is no --data-dir (the default)
  cifar100  train + meta (+ test) in --data-dir or its cifar-100-python child, or the download
            with data.kind=cifar100 and no --data-dir; data.cifar100_labels = fine | coarse
  folder    class subfolders (listed by folder_scan.py, decoded by folder.py): anything else
            with visible subfolders
data.kind = auto tells them apart in that order by what --data-dir holds; cifar10 | cifar100 |
folder names the kind outright (and refuses a folder that does not hold it).

Validation: CIFAR keeps its equal-share stratified split (data.stratified_split); a folder's
split is proportional to each class's size (imbalanced classes keep their ratio), and a folder
with its own val/ uses that instead of carving.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_transfer.config import Config, val_count
from cifar_transfer.data import cifar100, folder, folder_scan, neardup
from cifar_transfer.data.cifar10 import (
    CLASSES,
    _looks_like_batches_dir,
    default_cache_dir,
    load_split,
    resolve_data_dir,
)
from cifar_transfer.data.splits import (
    grouped_pick,
    proportional_quota,
    seeded_pick,
    split_sizes,
    stratified_split,
    stratified_subset,
)
from cifar_transfer.system.errors import UserError

DEFAULT_FOLDER_STORAGE = 256
LEAK_LIST = 3


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short content hash of the images and labels, so a cache never serves other data."""
    h = hashlib.blake2b(digest_size=8)
    h.update(images.cpu().numpy().tobytes())
    h.update(labels.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Source:
    """A dataset found on disk: its kind, where, its classes and the size its images are stored at."""

    kind: str
    root: Path
    classes: list[str]
    storage_size: int
    cfg: Config
    scan: folder_scan.FolderScan | None = None
    progress: bool = True

    @property
    def has_val(self) -> bool:
        return self.scan is not None and self.scan.has_val

    def where(self, split: str) -> Path:
        """The folder a split is read from (a folder's val/ may be called validation/, ...)."""
        return self.scan.dirs.get(split, self.root / split) if self.scan else self.root / split

    def read(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """uint8 (N,3,S,S) images, int64 labels and (folders) int64 content hashes of a split."""
        d = self.cfg.data
        if self.kind == "cifar10":
            return (*load_split(self.root, split), None)
        if self.kind == "cifar100":
            return (*cifar100.load_split(self.root, split, d.cifar100_labels), None)
        assert self.scan is not None
        return folder.load_split(
            self.scan, split, self.storage_size, default_cache_dir(), d.decode_workers,
            d.bad_images, self.progress,
        )  # fmt: skip


def folder_storage_size(cfg: Config) -> int:
    """data.storage_size, else the largest resolution the config names, else 256."""
    named = [cfg.model.resolution] + [p.resolution for p in cfg.phases]
    return cfg.data.storage_size or max(named) or DEFAULT_FOLDER_STORAGE


FOLDER_RECIPE = "small-folder"


def default_recipe(data_dir: str | None) -> str:
    """The recipe `train` uses when none is named: small-folder for a folder of class folders."""
    if data_dir and Path(data_dir).expanduser().is_dir():
        try:
            if _kind_of(Path(data_dir).expanduser()) == "folder":
                return FOLDER_RECIPE
        except UserError:
            pass  # the run itself will say what is wrong with the folder
    return "default"


def _kind_of(path: Path) -> str:
    if _looks_like_batches_dir(path) or _looks_like_batches_dir(path / "cifar-10-batches-py"):
        return "cifar10"
    if cifar100.find_dir(path) is not None:
        return "cifar100"
    if folder_scan.is_folder_dataset(path):
        return "folder"
    raise UserError(
        f"no CIFAR-10 batches, CIFAR-100 archive or class folders in {path}: pass --data-dir "
        f"pointing at a cifar-10-batches-py or cifar-100-python folder, or {folder_scan.LAYOUT_FIX}"
    )


def open_source(cfg: Config, data_dir: str | None = None, progress: bool = True) -> Source:
    """The dataset `cfg` names (data_dir overrides data.data_dir), found and checked, not read."""
    d = cfg.data
    where = data_dir or d.data_dir or None
    kind = d.kind
    if where is None:
        if kind in ("auto", "cifar10"):
            return Source("cifar10", resolve_data_dir(None), list(CLASSES), 32, cfg)
        if kind == "cifar100":
            root = cifar100.download_cifar100(default_cache_dir())
            return Source("cifar100", root, cifar100.class_names(root, d.cifar100_labels), 32, cfg)
        raise UserError("data.kind=folder needs --data-dir FOLDER (a folder of class subfolders)")
    path = Path(where).expanduser()
    if not path.is_dir():
        resolve_data_dir(path)  # its one line for a missing path or a file
    if kind == "auto":
        kind = _kind_of(path)
    if kind == "cifar10":
        return Source("cifar10", resolve_data_dir(path), list(CLASSES), 32, cfg)
    if kind == "cifar100":
        root = cifar100.find_dir(path)
        if root is None:
            raise UserError(
                f"no CIFAR-100 archive in {path}: expected train and meta "
                f"({cifar100.DIRNAME}); pass --data-dir pointing at that folder or its parent"
            )
        return Source("cifar100", root, cifar100.class_names(root, d.cifar100_labels), 32, cfg)
    found = folder_scan.scan(path)
    for note in found.warnings:
        print(f"warning: {note}", flush=True, file=sys.stderr)
    return Source("folder", path, found.classes, folder_storage_size(cfg), cfg, found, progress)


def split_counts(cfg: Config) -> tuple[int, int]:
    """(training, validation) image counts `load_train_val` gives, without decoding a folder's
    images (a budget plans with them before the run reads anything)."""
    src = open_source(cfg, progress=False)
    if src.has_val:  # the folder's own val/: nothing is carved from train/
        n_train, n_val = len(src.scan.splits["train"]), len(src.scan.splits["val"])
        limit = cfg.data.train_limit
        return (min(n_train, limit) if limit else n_train), n_val
    n = len(src.scan.splits["train"]) if src.scan is not None else len(src.read("train")[1])
    return split_sizes(cfg, n)


def proportional_split(labels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split with each class's share of the k validation images proportional to its size
    (largest remainders; at least one per class, never all of a class); (train_idx, val_idx)."""
    y = labels.numpy()
    classes, _, quota = proportional_quota(y, k)
    in_val = np.zeros(len(y), dtype=bool)
    in_val[seeded_pick(y, classes, quota, seed)] = True
    return torch.from_numpy(np.flatnonzero(~in_val)), torch.from_numpy(np.flatnonzero(in_val))


def grouped_split(
    labels: torch.Tensor, k: int, seed: int, groups: neardup.NearDuplicates
) -> tuple[torch.Tensor, torch.Tensor]:
    """proportional_split with each near-duplicate group wholly on one side; (train_idx, val_idx)."""
    in_val = np.zeros(len(labels), dtype=bool)
    in_val[grouped_pick(labels.numpy(), groups.group, k, seed)] = True
    return torch.from_numpy(np.flatnonzero(~in_val)), torch.from_numpy(np.flatnonzero(in_val))


def _check_class_sizes(src: Source, labels: torch.Tensor, carving: bool) -> None:
    counts = torch.bincount(labels, minlength=len(src.classes))
    need = 2 if carving else 1
    for c, n in enumerate(counts.tolist()):
        if n < need:
            raise UserError(
                f"class {src.classes[c]!r} has {n} usable image(s) in {src.root}: too few for a "
                f"training and a validation share; add images (at least 2 per class) or "
                f"--set data.val_size=0"
                if carving else
                f"class {src.classes[c]!r} has no usable image in {src.root}: add images"
            )


def warn_leakage(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> int:
    """Warn when byte-identical files sit in two splits (validation figures would be optimistic)."""
    if a is None or b is None or not len(a) or not len(b):
        return 0
    shared = np.intersect1d(a.numpy(), b.numpy())
    if len(shared):
        print(
            f"warning: {len(shared)} image(s) of {what} are byte-identical copies of training "
            f"images (leakage: the figures will be optimistic); remove the copies from one side",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return len(shared)


def _named_pairs(src: Source, a: str, b: str, pairs: list, k: int = LEAK_LIST) -> list[str]:
    """The first k pairs (index in split a, index in split b, bits) as 'a-file ~ b-file' text."""
    if src.scan is None:
        return []
    files_a, files_b = src.scan.kept(a), src.scan.kept(b)

    def name(path: Path) -> str:
        return str(path.relative_to(src.root)) if path.is_relative_to(src.root) else str(path)

    return [f"{name(files_a[i])} ~ {name(files_b[j])}" for i, j, _ in pairs[:k]]


def warn_near_duplicates(src: Source, split: str, train_x: torch.Tensor, other_x: torch.Tensor) -> int:
    """Warn when images of a folder's own val/ or test/ are near-duplicates of training images
    (data.near_duplicates): those splits are the user's and stay as they are; the line names a
    few pairs and counts the images."""
    similarity = src.cfg.data.near_duplicates
    if src.kind != "folder" or not similarity or not len(train_x) or not len(other_x):
        return 0
    pairs = neardup.cross_pairs(train_x, other_x, similarity)
    hit = len({j for _, j, _ in pairs})
    if hit:
        shown = "; ".join(_named_pairs(src, "train", split, pairs))
        print(
            f"warning: {hit} image(s) of {src.where(split)} are near-duplicates of training images "
            f"(perceptual hash, data.near_duplicates={similarity:g}; {len(pairs)} pair(s), e.g. "
            f"{shown}): the {split} figures will be optimistic; move a series to one side",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return hit


@dataclass
class Splits:
    """A run's training and validation images (CPU) and what describes them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    fingerprint: str
    source: Source
    # Folders with a carved split and data.near_duplicates on: what the hash found (and kept
    # together) among the training folder's images; None otherwise.
    near_duplicates: dict | None = None


def load_train_val(
    cfg: Config, data_dir: str | None = None, progress: bool = True, with_fingerprint: bool = True
) -> Splits:
    """Read the dataset's training images, split off validation (or read val/), cap training."""
    src = open_source(cfg, data_dir, progress)
    x, y, digests = src.read("train")
    d = cfg.data
    found = None  # near-duplicate groups kept together by a carved folder split
    if src.has_val:
        vx, vy, vdig = src.read("val")
        _check_class_sizes(src, y, carving=False)
        warn_leakage(digests, vdig, f"{src.where('val')}")
        warn_near_duplicates(src, "val", x, vx)
        data_fp = fingerprint(torch.cat([x, vx]), torch.cat([y, vy])) if with_fingerprint else ""
        train_idx = torch.arange(len(y))
    else:
        data_fp = fingerprint(x, y) if with_fingerprint else ""
        k = val_count(d.val_size, len(y))
        if k >= len(y):
            raise UserError(
                f"bad value for data.val_size: {d.val_size} leaves no training images "
                f"(the split has {len(y)}): use a smaller value"
                + (" or a fraction such as 0.2" if src.kind == "folder" else "")
            )
        if src.kind == "folder":
            _check_class_sizes(src, y, carving=k > 0)
            if d.near_duplicates and k > 0:
                groups = neardup.find_groups(x, d.near_duplicates)
                found = {**groups.summary(d.near_duplicates), "total_images": len(y),
                         "examples": _named_pairs(src, "train", "train", groups.pairs)}  # fmt: skip
                train_idx, val_idx = grouped_split(y, k, d.seed, groups)
            else:
                train_idx, val_idx = proportional_split(y, k, d.seed)
            if digests is not None:
                warn_leakage(digests[train_idx], digests[val_idx], "the validation split")
        else:
            train_idx, val_idx = stratified_split(y, k, d.seed)
        vx, vy = x[val_idx], y[val_idx]
    if d.train_limit:
        train_idx = stratified_subset(train_idx, y, d.train_limit, d.seed)
    return Splits(x[train_idx], y[train_idx], vx, vy, data_fp, src, found)


def load_test(cfg: Config, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, Source]:
    """The dataset's test split (test_batch, CIFAR-100's test, or a folder's test/)."""
    src = open_source(cfg, data_dir, progress=False)
    x, y, digests = src.read("test")
    if digests is not None:
        train_x, _, train_digests = src.read("train")
        warn_leakage(train_digests, digests, f"{src.where('test')}")
        warn_near_duplicates(src, "test", train_x, x)
    return x, y, src


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalized so a balanced set weighs every class 1."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float().clamp_min(1.0)
    return (len(labels) / (num_classes * counts)).to(labels.device)
