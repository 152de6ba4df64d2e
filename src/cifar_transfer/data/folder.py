"""A folder dataset's split as one uint8 tensor: decode every image once, cache the decoded set.

What a folder holds (classes, splits, files) is data/folder_scan.py's.
Decoding: every image once, in threads (PIL releases the GIL while it decodes and resizes).
EXIF orientation applied; palette, greyscale, RGBA (over white), CMYK and 16-bit images become
8-bit RGB. Aspect ratio: the shorter side is resized to the storage size S and the centre S x S
square kept (torchvision's Resize(S) + CenterCrop(S)), so nothing is stretched; a JPEG is decoded
at 1/2, 1/4 or 1/8 size in the DCT (PIL's draft) when that still leaves both sides >= S.
The decoded set is cached as safetensors keyed by the file list (paths, sizes, mtimes, labels)
and S, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from cifar_transfer.data.folder_scan import FolderScan
from cifar_transfer.data.images import ImageError, decode_image, read_bytes
from cifar_transfer.system.atomic import save_safetensors
from cifar_transfer.system.errors import UserError

CACHE_VERSION = "folder-1"
MEMORY_SHARE = 0.8  # of the available memory a decoded set may take
WARN_LIST = 10  # problem files named one by one; the rest are counted


def _decode_one(path: Path, size: int, draft: bool) -> tuple[np.ndarray | None, int, str]:
    """(image or None, 8-byte content hash, problem) of one file; never raises. The problem is
    the ImageError's reason alone: the one warning that lists the files says what to do."""
    try:
        raw = read_bytes(path)
    except ImageError as e:
        return None, 0, e.reason
    digest = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)
    try:
        return decode_image(raw, size, draft), digest, ""
    except ImageError as e:
        return None, digest, e.reason


def decode_files(
    files: list[Path], size: int, workers: int = 0, draft: bool = True, progress: bool = True,
    desc: str = "decoding",
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[Path, str]]]:
    """Decode files in threads: (uint8 (N,3,S,S) of the good ones, their int64 hashes, problems)."""
    workers = workers or os.cpu_count() or 1
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    digests = torch.zeros(len(files), dtype=torch.int64)
    keep = np.zeros(len(files), dtype=bool)
    problems: list[tuple[Path, str]] = []
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=None if progress else True,
               mininterval=1.0, dynamic_ncols=True)  # fmt: skip
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda f: _decode_one(f, size, draft), files)
        for i, (path, (img, digest, problem)) in enumerate(zip(files, results)):
            digests[i] = digest
            if img is None:
                problems.append((path, problem))
            else:
                out[i] = torch.from_numpy(img).permute(2, 0, 1)
                keep[i] = True
            bar.update(1)
    bar.close()
    if keep.all():
        return out, digests, problems
    idx = torch.from_numpy(np.flatnonzero(keep))
    return out[idx], digests[idx], problems


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def fits_memory(need: int, have: int | None = None) -> bool:
    """Whether `need` bytes fit the share of the available memory (`have`, else measured now) a
    resident tensor may take: decoded sets here, stored maps (training/partial.py), and the
    budget's cached plans. Unknown memory: assumed to fit."""
    have = available_memory() if have is None else have
    return not have or need <= MEMORY_SHARE * have


def check_memory(n: int, size: int, where: str) -> None:
    """Refuse, before decoding, a set whose uint8 tensor would not fit the memory available."""
    need = n * 3 * size * size
    have = available_memory()
    if not fits_memory(need, have):
        smaller = max(32, int(size * (MEMORY_SHARE * have / need) ** 0.5) // 16 * 16)
        raise UserError(
            f"decoding the {n:,} images of {where} at {size} px takes {need / 2**30:.1f} GiB, more "
            f"than the {have / 2**30:.1f} GiB of memory available: set a smaller "
            f"--set data.storage_size (e.g. {smaller})"
        )


def _cache_key(entries: list[tuple[Path, int]], size: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{CACHE_VERSION}|{size}".encode())
    for path, label in entries:
        st = path.stat()
        h.update(f"|{os.path.abspath(path)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _describe(problems: list[tuple[Path, str]]) -> str:
    shown = "; ".join(f"{p}: {why}" for p, why in problems[:WARN_LIST])
    more = f"; and {len(problems) - WARN_LIST} more" if len(problems) > WARN_LIST else ""
    return shown + more


def load_split(
    found: FolderScan, split: str, size: int, cache_dir: Path | None, workers: int = 0,
    bad_images: str = "skip", progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One split decoded (or read from the cache): uint8 (N,3,S,S), int64 labels, int64 hashes."""
    if split not in found.splits:
        folder = found.root / split
        raise UserError(
            f"{found.root} has no {split}/ folder: "
            + ("evaluate with --split val, or add ROOT/test/<class>/..." if split == "test"
               else f"add {folder}/<class>/...")
        )
    entries = found.splits[split]
    where = str(found.dirs[split])  # every split listed has its folder
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "decoded" / f"{_cache_key(entries, size)}.safetensors"
        cached = _read_cache(path)
        if cached is not None:
            problems = json.loads(cached[3])
            found.skipped[split] = {p for p, _ in problems}
            if problems and bad_images == "refuse":
                _refuse(problems)
            _warn_skipped(problems)
            return cached[:3]
    check_memory(len(entries), size, where)
    images, digests, problems = decode_files(
        [p for p, _ in entries], size, workers, progress=progress, desc=f"decoding {split}"
    )
    listed = [(str(p), why) for p, why in problems]
    found.skipped[split] = {p for p, _ in listed}
    if listed and bad_images == "refuse":
        _refuse(listed)
    bad = {p for p, _ in problems}
    labels = torch.tensor([label for p, label in entries if p not in bad], dtype=torch.int64)
    _warn_skipped(listed)
    if path is not None:
        _write_cache(path, images, labels, digests, json.dumps(listed))
    return images, labels, digests


def _refuse(problems: list) -> None:
    raise UserError(
        f"{len(problems)} file(s) among the images do not decode ({_describe(problems)}): remove "
        f"or replace them, or --set data.bad_images=skip to train without them"
    )


def _warn_skipped(problems: list) -> None:
    if problems:
        print(f"warning: skipped {len(problems)} file(s) that do not decode: {_describe(problems)} "
              f"(--set data.bad_images=refuse stops instead)", file=sys.stderr)  # fmt: skip


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
    if not path.is_file():
        return None
    try:
        t = load_file(path)
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            problems = (f.metadata() or {}).get("skipped", "[]")
        return t["images"], t["labels"], t["digests"], problems
    except Exception:  # noqa: BLE001 - a bad cache file is re-made, never trusted
        return None


def _write_cache(path: Path, images, labels, digests, problems: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, {"images": images, "labels": labels, "digests": digests},
                         {"skipped": problems})  # fmt: skip
    except (OSError, UserError) as e:
        print(f"warning: cannot write the decoded-image cache {path} ({e}): going on without it",
              file=sys.stderr)  # fmt: skip
