"""A folder of class subfolders as one uint8 tensor: scan, decode once, cache the decoded set.

Layouts (class index = sorted folder names, as torchvision's ImageFolder and Keras do):
  ROOT/<class>/*                       the validation split is carved out (data.val_size)
  ROOT/train/<class>/* [+ ROOT/val/<class>/*] [+ ROOT/test/<class>/*]
Subfolders of a class folder are read too; hidden files (.DS_Store, Thumbs.db, names starting
with '.') and files whose extension is not an image's are ignored; a symlink loop is skipped
with a warning.

Decoding: every image once, in threads (PIL releases the GIL while it decodes and resizes).
EXIF orientation applied; palette, greyscale, RGBA (over white), CMYK and 16-bit images become
8-bit RGB. Aspect ratio: the shorter side is resized to the storage size S and the centre S x S
square kept (torchvision's Resize(S) + CenterCrop(S)), so nothing is stretched; a JPEG is decoded
at 1/2, 1/4 or 1/8 size in the DCT (PIL's draft) when that still leaves both sides >= S.
The decoded set is cached as safetensors keyed by the file list (paths, sizes, mtimes, labels)
and S, so a second run starts in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from cifar_transfer.data.images import ImageError, decode_image, read_bytes
from cifar_transfer.system.atomic import save_safetensors
from cifar_transfer.system.errors import UserError

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
    ".pgm", ".pbm", ".pnm", ".tga",
})  # fmt: skip
HIDDEN_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db"})
SPLITS = ("train", "val", "test")
# What a split folder may be called (any case): Hugging Face datasets' split keywords, which
# take in fastai's `valid`, Keras tutorials' `validation` and torchvision's `val`.
SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
CACHE_VERSION = "folder-1"
MEMORY_SHARE = 0.8  # of the available memory a decoded set may take
WARN_LIST = 10  # problem files named one by one; the rest are counted
LAYOUT_FIX = "arrange the images as ROOT/<class>/*.jpg, or ROOT/train/<class>/... (+ val/, test/)"


@dataclass
class FolderScan:
    """What a folder holds: class names and, per split present, its (file, label) list."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    warnings: list[str] = field(default_factory=list)
    # The folder each split was read from (ROOT itself for a class-folder tree's train)
    dirs: dict[str, Path] = field(default_factory=dict)
    # Per split read (load_split): the files that did not decode, so kept() lines up with its tensors
    skipped: dict[str, set[str]] = field(default_factory=dict)

    @property
    def has_val(self) -> bool:
        return "val" in self.splits

    def kept(self, split: str) -> list[Path]:
        """The files of a split that decoded, in the order of load_split's tensors."""
        bad = self.skipped.get(split, set())
        return [p for p, _ in self.splits[split] if str(p) not in bad]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


def is_folder_dataset(path: Path) -> bool:
    """True when `path` has visible subfolders (a class-folder tree, or train/ of one)."""
    try:
        return any(p.is_dir() and not _hidden(p.name) for p in path.iterdir())
    except OSError:
        return False


def _class_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not _hidden(p.name))


def _list_images(class_dir: Path, notes: list[str]) -> tuple[list[Path], int]:
    """Image files under a class folder (recursive, sorted) and how many other files were ignored."""
    found: list[Path] = []
    ignored = 0
    seen_dirs: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(class_dir, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen_dirs:
            notes.append(f"{top} is a symlink back to a folder already read (a loop): skipped")
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            path = Path(top) / name
            if _hidden(name):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    notes.append(f"{path} is a symlink loop: skipped")
                else:
                    notes.append(f"{path} cannot be read ({e.strerror}): skipped")
                continue
            found.append(path)
    return found, ignored


def _split_dirs(root: Path, notes: list[str]) -> dict[str, Path]:
    """ROOT's split folders by split (SPLIT_NAMES, any case), or {"train": ROOT} for a class tree.

    A train folder counts only when it holds folders itself: a class-folder tree may have a
    class called "train" (CIFAR-100 does). Two folders for one split are one UserError line;
    other folders beside the splits are named in a warning, never read.
    """
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    except OSError as e:
        raise UserError(f"{root} cannot be read ({e.strerror}): {LAYOUT_FIX}") from None
    named = {split: [p for p in subdirs if p.name.lower() in names]
             for split, names in SPLIT_NAMES.items()}  # fmt: skip
    if not (named["train"] and any(is_folder_dataset(p) for p in named["train"])):
        return {"train": root}
    found: dict[str, Path] = {}
    for split, paths in named.items():
        if len(paths) > 1:
            both = " and ".join(f"{p.name}/" for p in paths)
            raise UserError(
                f"{root} has {both}: both name the {split} split; keep one (rename or move the other)"
            )
        if paths:
            found[split] = paths[0]
    if others := [p.name for p in subdirs if p not in found.values()]:
        notes.append(
            f"{root} has folders that are not splits ({', '.join(others)}): ignored; split folders "
            f"are {', '.join('/'.join(names) for names in SPLIT_NAMES.values())}"
        )
    return found


def scan(root: Path) -> FolderScan:
    """List a folder dataset's classes and files; one UserError line for a layout it cannot use."""
    root = Path(root)
    notes: list[str] = []
    split_dirs = _split_dirs(root, notes)
    classes = _class_dirs(split_dirs["train"])
    where = split_dirs["train"]
    if not classes:
        raise UserError(f"{where} holds no class folders: {LAYOUT_FIX}")
    if len(classes) == 1:
        raise UserError(
            f"{where} has only one class folder ({classes[0]}): a classifier needs at least two "
            f"classes; add one folder per class"
        )
    splits: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in split_dirs.items():
        found = _class_dirs(folder)
        if found != classes:
            extra = sorted(set(found) - set(classes))
            missing = sorted(set(classes) - set(found))
            said = (f"classes {extra} that {where} lacks" if extra else "") + (
                " and " if extra and missing else "") + (f"no folder for {missing}" if missing else "")
            raise UserError(
                f"{folder} has {said}: {split}/ must hold the same class folders as {where.name}/ "
                f"(the class index is the sorted folder names); rename or add folders"
            )
        entries: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            files, ignored = _list_images(folder / name, notes)
            if not files:
                other = f" ({ignored} non-image files ignored)" if ignored else ""
                raise UserError(
                    f"class folder {folder / name} holds no images{other}: add images "
                    f"(JPEG, PNG, ...) or remove the folder"
                )
            entries += [(f, label) for f in files]
        splits[split] = entries
    return FolderScan(root, classes, splits, notes, split_dirs)


# --------------------------------------------------------------------------- decoding


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
    where = str(found.dirs.get(split, found.root / split))
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
