"""Seeded, class-stratified splits: the validation share carved from the training images, and
the training subset a train_limit keeps. The same seed gives the same split on every machine."""

from __future__ import annotations

import numpy as np
import torch

from cifar_transfer.config import Config, val_count
from cifar_transfer.system.errors import UserError


def split_sizes(cfg: Config, total: int = 50_000) -> tuple[int, int]:
    """(training images, validation images) a config trains on, of `total` (CIFAR-10's 50,000)."""
    n_val = min(val_count(cfg.data.val_size, total), total)  # a count, or a fraction (0.2)
    n_train = total - n_val
    return (min(cfg.data.train_limit, n_train) if cfg.data.train_limit else n_train), n_val


def _stratified_pick(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted positions of k labels, an equal share per class (capped by class size), seeded."""
    # Bookkeeping in numpy: on a busy 2-core CPU torch's threaded unique/nonzero on 50k ints take
    # ~0.2 s each, numpy ~1 ms. The seeded permutations stay torch.randperm.
    labels_np = labels.reshape(-1).cpu().numpy()
    classes, counts = np.unique(labels_np, return_counts=True)
    # Water-filling: classes smaller than their equal share give all they have, the rest share
    # what is left; the remainder goes to the first classes (in label order), deterministically.
    quota = [0] * len(classes)
    active = list(range(len(classes)))
    remaining = k
    while active:
        share = remaining // len(active)
        small = [c for c in active if counts[c] <= share]
        if not small:
            extra = remaining - share * len(active)
            for rank, c in enumerate(active):
                quota[c] = share + (1 if rank < extra else 0)  # counts[c] > share, so it fits
            break
        for c in small:
            quota[c] = int(counts[c])
            remaining -= quota[c]
            active.remove(c)
    return torch.from_numpy(seeded_pick(labels_np, classes, quota, seed))


def seeded_pick(labels: np.ndarray, classes: np.ndarray, quota, seed: int) -> np.ndarray:
    """Sorted positions of quota[c] labels of each class c, drawn by seeded permutations."""
    generator = torch.Generator().manual_seed(seed)
    picked = [np.empty(0, dtype=np.int64)]
    for c, cls in enumerate(classes):
        members = np.flatnonzero(labels == cls)
        order = torch.randperm(len(members), generator=generator).numpy()
        picked.append(members[order[: quota[c]]])
    return np.sort(np.concatenate(picked))


def stratified_split(
    labels: torch.Tensor, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-stratified split into (train_idx, val_idx); val_size=0 gives an empty val."""
    n = len(labels)
    if not 0 <= val_size <= n:
        raise UserError(
            f"val_size {val_size} is outside 0..{n}: choose a validation size that fits "
            f"the {n} images"
        )
    val_idx = _stratified_pick(labels, val_size, seed)
    in_val = np.zeros(n, dtype=bool)
    in_val[val_idx.numpy()] = True
    return torch.from_numpy(np.flatnonzero(~in_val)), val_idx


def stratified_subset(
    indices: torch.Tensor, labels: torch.Tensor, limit: int, seed: int
) -> torch.Tensor:
    """Seeded class-stratified `limit`-sized subset of `indices`; limit >= len returns them all."""
    if limit < 0:
        raise UserError(
            f"train_limit {limit} is negative: use a positive number of training images"
        )
    if limit >= len(indices):
        return indices
    # Picks positions within `indices`, kept in their order, so sorted input gives sorted output.
    chosen = _stratified_pick(labels[indices], limit, seed)
    return indices[chosen.to(indices.device)]


def proportional_quota(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, counts, quota): each class's share of k validation images proportional to its
    size (largest remainders; at least one per class, never all of a class)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (k / len(labels))
    quota = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - quota), kind="stable")[: k - quota.sum()]:
        quota[c] += 1
    return classes, counts, np.clip(quota, 1 if k else 0, counts - 1)


def grouped_pick(labels: np.ndarray, group: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted positions of about k validation images, whole groups at a time, class-stratified.

    A group (same id in `group`) is one unit that goes to one side; it counts for the class most
    of its images have. Per class, its units are visited in a seeded order and each is taken
    while it fits the proportional quotas of every class it holds images of (a group too big is
    passed over for the next), so no class ever gives all its images. With every group a single image this is the
    ungrouped split exactly (the same seeded permutations, the same first quota images).
    """
    classes, _, quota = proportional_quota(labels, k)
    pos = {c: n for n, c in enumerate(classes.tolist())}
    lab = np.array([pos[c] for c in labels.tolist()], dtype=np.int64)
    units: dict[int, list[int]] = {}
    for n, g in enumerate(group.tolist()):
        units.setdefault(g, []).append(n)
    by_class: list[list[list[int]]] = [[] for _ in classes]
    for members in units.values():  # in order of first member: a deterministic listing
        by_class[int(np.bincount(lab[members], minlength=len(classes)).argmax())].append(members)
    taken = np.zeros(len(classes), dtype=np.int64)
    picked: list[int] = []
    generator = torch.Generator().manual_seed(seed)
    for c in range(len(classes)):
        order = torch.randperm(len(by_class[c]), generator=generator).tolist()
        for u in order:
            if taken[c] >= quota[c]:
                break
            share = np.bincount(lab[by_class[c][u]], minlength=len(classes))
            if np.all(taken + share <= quota):  # no class over its share (quota < its size)
                taken += share
                picked += by_class[c][u]
    return np.sort(np.array(picked, dtype=np.int64))
