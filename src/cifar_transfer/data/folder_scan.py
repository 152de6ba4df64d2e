"""What a folder of class subfolders holds: its classes and, per split, its (file, label) list.

Layouts (class index = sorted folder names, as torchvision's ImageFolder and Keras do):
  ROOT/<class>/*                       the validation split is carved out (data.val_size)
  ROOT/train/<class>/* [+ ROOT/val/<class>/*] [+ ROOT/test/<class>/*]
Split folders may have the names Hugging Face datasets gives them, in any case (SPLIT_NAMES:
validation/, valid/, dev/, eval/, ...). Subfolders of a class folder are read too; hidden files
(.DS_Store, Thumbs.db, names starting with '.') and files whose extension is not an image's are
ignored; a symlink loop is skipped with a warning. Nothing is decoded here (data/folder.py does).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

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
