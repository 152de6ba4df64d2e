"""Near-duplicate groups among a folder's decoded images: a perceptual hash, pairs, union-find.

A photo folder often holds series of one subject (a burst, the same flower from a step to the
left, a re-saved or re-sized copy). Split at random, one shot of a series lands in validation
while its twin trains, and the validation figure is optimistic. The hash finds such images:

  pHash (the DCT hash of imagehash and of Zauner's thesis): greyscale, area-resize to 32x32,
  2-D DCT, keep the 8x8 lowest frequencies, one bit per coefficient: above the median of the
  63 AC ones or not. 64 bits that survive resizing, re-encoding, small crops and colour shifts.

Computed batched in torch on the decoded uint8 tensor (a few hundred ms for thousands of images
on a CPU: no backbone pass, so the split is known before any feature is extracted). Two images
are near-duplicates when at least `similarity` of their 64 bits agree (data.near_duplicates;
the default 0.9 = at most 6 bits differ: on flower_photos every pair that close was the same
shot, re-coloured, re-sized or re-cropped, while at 8-12 bits centred flowers on dark grounds
start to pair across classes); groups are the connected components of that relation
(union-find), so a series A~B~C is one group even when A and C are further apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HASH_GRID = 32  # the greyscale thumbnail the DCT is taken of
LOW = 8  # its LOW x LOW lowest frequencies make the hash: 64 bits
BITS = LOW * LOW
BATCH = 32  # images converted to float at a time (measured fastest: the batch stays in cache)
CHUNK = 2048  # rows of the pairwise distance matrix at a time


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: D @ x is the DCT of the column x."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def phash(images: torch.Tensor) -> torch.Tensor:
    """64-bit DCT perceptual hashes of uint8 (N,3,S,S) images, as a bool (N, 64) tensor."""
    d = _dct_matrix(HASH_GRID)[:LOW]  # only the low rows are ever kept
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = torch.empty((len(images), BITS), dtype=torch.bool)
    for start in range(0, len(images), BATCH):
        # Area-average each channel down to the grid first (the float copy is the cost), then grey.
        rgb = F.adaptive_avg_pool2d(images[start:start + BATCH].cpu().float(), HASH_GRID)
        small = (rgb * weights).sum(1)
        low = (d @ small @ d.T).flatten(1)  # (n, 64), [0] is the DC term (mean brightness)
        median = low[:, 1:].median(1, keepdim=True).values
        out[start:start + BATCH] = low > median
    return out


def similar_pairs(
    a: torch.Tensor, b: torch.Tensor | None, similarity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, differing bits) of hash pairs with at least `similarity` of their bits equal;
    within one set (b None) each pair once, i < j."""
    max_bits = math.floor(BITS * (1.0 - similarity) + 1e-9)
    same = b is None
    b = a if b is None else b
    fa, fb = a.float(), b.float()
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(fa), CHUNK):
        rows = fa[start:start + CHUNK]
        # Hamming distance of 0/1 vectors as two matrix products: x(1-y) + (1-x)y.
        dist = rows @ (1 - fb).T + (1 - rows) @ fb.T
        hit = dist <= max_bits + 0.5
        if same:  # upper triangle only: no self-pairs, each pair once
            idx = torch.arange(start, start + len(rows))
            hit &= torch.arange(len(fb))[None, :] > idx[:, None]
        i, j = torch.nonzero(hit, as_tuple=True)
        found_i.append((i + start).numpy())
        found_j.append(j.numpy())
        found_d.append(dist[i, j].round().to(torch.int64).numpy())
    if not found_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def union_find(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group id of each of n items, joined by the pairs (i, j): the smallest member's index."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(x) for x in range(n)], dtype=np.int64)


@dataclass
class NearDuplicates:
    """What the hash found in one set of images: a group id per image and example pairs."""

    group: np.ndarray  # (N,) int64: images with the same id are one group
    pairs: list[tuple[int, int, int]]  # (i, j, differing bits), closest first

    @property
    def groups(self) -> int:
        """Groups of two or more images."""
        _, counts = np.unique(self.group, return_counts=True)
        return int((counts >= 2).sum())

    @property
    def images(self) -> int:
        """Images that belong to a group of two or more."""
        _, inverse, counts = np.unique(self.group, return_inverse=True, return_counts=True)
        return int((counts[inverse] >= 2).sum())

    def summary(self, similarity: float) -> dict:
        """What a run records (model.json) and says (the log)."""
        return {"similarity": similarity, "groups": self.groups, "images": self.images,
                "pairs": len(self.pairs)}  # fmt: skip


def find_groups(images: torch.Tensor, similarity: float) -> NearDuplicates:
    """Near-duplicate groups among one set of uint8 (N,3,S,S) images."""
    i, j, d = similar_pairs(phash(images), None, similarity)
    order = np.lexsort((j, i, d))
    return NearDuplicates(union_find(len(images), i, j),
                          [(int(i[k]), int(j[k]), int(d[k])) for k in order])  # fmt: skip


def cross_pairs(
    a: torch.Tensor, b: torch.Tensor, similarity: float
) -> list[tuple[int, int, int]]:
    """(index in a, index in b, differing bits) of near-duplicates across two sets, closest first."""
    i, j, d = similar_pairs(phash(a), phash(b), similarity)
    order = np.lexsort((j, i, d))
    return [(int(i[k]), int(j[k]), int(d[k])) for k in order]
