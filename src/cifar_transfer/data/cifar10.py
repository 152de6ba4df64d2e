"""CIFAR-10 as tensors: download + checksum, read the python batches safely, seeded splits.

The whole dataset is 60k x 3 KiB, so it lives in memory as one uint8 tensor (N,3,32,32);
augmentation and resizing run batched on whatever device that tensor sits on (transforms.py).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from cifar_transfer.system.errors import UserError

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official archive, never of a local dir
# Its size in bytes: a download that runs past it is not that archive (a wrong URL, a server that
# streams forever), so it stops there instead of filling the disk before the MD5 check.
CIFAR10_BYTES = 170_498_071
# Per-channel statistics of the 50k training images (0..1 scale), for models trained from scratch;
# pretrained backbones bring their own mean/std.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

BATCHES_DIRNAME = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_IMAGE_VALUES = 3 * 32 * 32
_DOWNLOAD_TIMEOUT_S = 30.0


def default_cache_dir() -> Path:
    """Where downloads and feature caches go: $CIFAR_TRANSFER_CACHE, else ~/.cache/cifar-transfer."""
    env = os.environ.get("CIFAR_TRANSFER_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        # No $HOME and no passwd entry (some containers): never a "~" folder in the current
        # directory. Nothing can be created under /dev/null, so the feature cache warns and goes
        # on without itself, and a download stops with a line naming CIFAR_TRANSFER_CACHE.
        return Path(os.devnull) / "cifar-transfer"
    return Path(home) / ".cache" / "cifar-transfer"


def _has_train_batches(path: Path) -> bool:
    """True when `path` holds all five training batches (test_batch is optional)."""
    return all((path / name).is_file() for name in _TRAIN_FILES)


def _looks_like_batches_dir(path: Path) -> bool:
    """True when `path` holds any CIFAR-10 batch; load_split names whatever file is missing."""
    return any((path / name).is_file() for name in (*_TRAIN_FILES, _TEST_FILE))


@dataclass(frozen=True)
class Archive:
    """An official python-version archive: its name in messages, the folder it extracts to, and
    the test that a folder holds it completely."""

    label: str
    dirname: str
    complete: Callable[[Path], bool]

    @property
    def fix(self) -> str:
        return f"pass --data-dir DIR with an extracted {self.dirname} folder"


CIFAR10 = Archive("CIFAR-10", BATCHES_DIRNAME, _has_train_batches)


def _download_error(url: str, what: str, archive: Archive = CIFAR10) -> UserError:
    """One line for a download that cannot go on: what happened, and the offline fix."""
    return UserError(f"cannot download {archive.label} from {url} ({what}); {archive.fix}")


def _offline_error(url: str, reason: object, archive: Archive) -> UserError:
    return _download_error(url, f"{reason}: you seem to be offline", archive)


def _bad_url_error(url: str, reason: object, archive: Archive) -> UserError:
    return _download_error(url, f"{reason}: not a valid URL", archive)


def _too_big_error(url: str, size: int, archive: Archive) -> UserError:
    return _download_error(
        url, f"more than the {size:,} bytes of the official archive, so not that file: stopped; "
        "check the URL", archive,
    )  # fmt: skip


def _fetch(url: str, dest: BinaryIO, size: int, archive: Archive = CIFAR10) -> str:
    """Stream `url` into `dest` (at most `size` bytes) and return the MD5 hex digest written."""
    try:
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as err:  # the server answered, so "offline" would mislead
        raise UserError(
            f"cannot download {archive.label} from {url} (HTTP {err.code} {err.reason}): "
            f"the archive is not there; {archive.fix}"
        ) from err
    except urllib.error.URLError as err:
        if "unknown url type" in str(err.reason):  # a typo, not a network problem
            raise _bad_url_error(url, err.reason, archive) from err
        raise _offline_error(url, err.reason, archive) from err
    except (OSError, http.client.HTTPException) as err:
        raise _offline_error(url, err, archive) from err
    except ValueError as err:  # urllib's "unknown url type" for strings without a scheme
        raise _bad_url_error(url, err, archive) from err
    digest = hashlib.md5()
    length = response.headers.get("Content-Length") if response.headers else None
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > size:
        raise _too_big_error(url, size, archive)
    received = 0
    # disable=None: a progress bar on a terminal, silence in logs and tests.
    with (
        response,
        tqdm(total=total, unit="B", unit_scale=True, desc=archive.label, disable=None) as bar,
    ):
        while True:
            try:
                # One byte past `size` at most: enough to tell the file is not the archive.
                chunk = response.read(min(1 << 20, size + 1 - received))
            except (OSError, http.client.HTTPException) as err:  # dropped connection, timeout
                raise _offline_error(url, err, archive) from err
            if not chunk:
                break
            received += len(chunk)
            if received > size:
                raise _too_big_error(url, size, archive)
            digest.update(chunk)
            dest.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download_cifar10(
    cache_dir: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, size: int = CIFAR10_BYTES
) -> Path:
    """Download the official archive, check its MD5, extract atomically; return its batches dir."""
    return download_archive(CIFAR10, cache_dir, url, md5, size)


def download_archive(archive: Archive, cache_dir: Path, url: str, md5: str, size: int) -> Path:
    """Download an official archive, check its MD5, extract atomically; return its folder."""
    cache_dir = Path(cache_dir).expanduser()
    label, dirname, fix = archive.label, archive.dirname, archive.fix
    target = cache_dir / dirname
    if archive.complete(target):
        return target  # already there: no network, no checksum of local files (they may differ)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Temp file and temp dir live in cache_dir so os.replace() stays on one filesystem.
        prefix = "." + label.lower()
        fd, archive_name = tempfile.mkstemp(dir=cache_dir, prefix=prefix + "-", suffix=".tar.gz.part")
    except OSError as err:
        raise UserError(
            f"cannot write to the cache dir {cache_dir} ({err}): set CIFAR_TRANSFER_CACHE to a "
            f"writable folder or {fix}"
        ) from err
    part = Path(archive_name)
    extract_dir: Path | None = None
    try:  # finally below removes the temp file/dir on every exit, Ctrl-C included
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _fetch(url, out, size, archive)
        except OSError as err:  # only writes remain uncaught by _fetch: disk full, permissions
            raise UserError(
                f"cannot write the {label} download into {cache_dir} ({err}): free some space, "
                f"set CIFAR_TRANSFER_CACHE elsewhere or pass --data-dir DIR"
            ) from err
        if actual != md5.lower():
            raise UserError(
                f"{label} archive from {url} has MD5 {actual}, expected {md5}: the download is "
                f"corrupt or not the official archive; retry, or {fix}"
            )
        extract_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=prefix + "-extract-"))
        try:
            with tarfile.open(part, "r:gz") as tar:
                # filter="data" refuses absolute paths, "..", links out of the tree, devices.
                tar.extractall(extract_dir, filter="data")
        except (OSError, EOFError, tarfile.TarError) as err:  # TarError covers FilterError
            raise UserError(
                f"cannot extract the {label} archive from {url} ({err}): it is not a readable, "
                f"safe tar.gz; {fix}"
            ) from err
        extracted = extract_dir / dirname
        if not archive.complete(extracted):
            raise UserError(
                f"the archive from {url} has no {dirname} folder with all its files: it is not the "
                f"{label} python version; {fix}"
            )
        if archive.complete(target):
            return target  # a concurrent run finished first; keep its copy
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover inside our own cache
        os.replace(extracted, target)
        return target
    finally:
        part.unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)


def resolve_data_dir(data_dir: str | Path | None, cache_dir: Path | None = None) -> Path:
    """Folder holding data_batch_*: data_dir or its cifar-10-batches-py child; download if None."""
    if data_dir is None:
        return download_cifar10(cache_dir if cache_dir is not None else default_cache_dir())
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(
            f"data dir {path} does not exist: pass --data-dir pointing at an extracted "
            f"{BATCHES_DIRNAME} folder (or its parent), or leave --data-dir out to download"
        )
    if not path.is_dir():
        raise UserError(
            f"data dir {path} is a file, not a folder: pass --data-dir pointing at an extracted "
            f"{BATCHES_DIRNAME} folder (or its parent); extract a .tar.gz first"
        )
    for candidate in (path, path / BATCHES_DIRNAME):
        if _looks_like_batches_dir(candidate):
            return candidate
    raise UserError(
        f"no CIFAR-10 batches in {path}: expected data_batch_1..5 ({BATCHES_DIRNAME}); "
        f"pass --data-dir pointing at that folder or its parent"
    )


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What `_codecs.encode` does in a pickle: Python 3 stores bytes at protocol <= 2 as latin1."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"bytes stored as {encoding!r}, not latin1")
    return text.encode("latin1")


def _batch_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle names: numpy's array, dtype and scalar rebuilders."""
    array = np.zeros(1, np.uint8)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }  # fmt: skip
    # Asked of numpy itself, not hard-coded, so any numpy version's names are right; the official
    # files (numpy 1) say numpy.core.multiarray, numpy 2 writes numpy._core.multiarray.
    rebuilders = (array.__reduce__()[0], array.__reduce_ex__(5)[0], np.int64(0).__reduce__()[0])
    for func in rebuilders:
        for module in (func.__module__.replace("numpy._core", "numpy.core"),
                       func.__module__.replace("numpy.core", "numpy._core")):  # fmt: skip
            allowed[(module, func.__name__)] = func
    return allowed


_BATCH_GLOBALS = _batch_globals()


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: arrays, lists, dicts, strings, numbers; any other global refused.

    A plain pickle.load runs whatever the file names (os.system, exec ...) before any check could
    look at the result, and a data folder or a run dir's data_dir may come from anyone.
    """

    def __init__(self, file: BinaryIO, path: Path, fix: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 byte-string keys -> str
        self.path, self.fix = path, fix

    def find_class(self, module: str, name: str) -> Any:
        found = _BATCH_GLOBALS.get((module, name))
        if found is None:
            raise UserError(
                f"{self.path} holds {module}.{name}, which a CIFAR-10 batch never does (only numpy "
                f"arrays, lists, dicts, strings, numbers): refused without running it; {self.fix}"
            )
        return found


def read_pickle(path: Path, fix: str) -> Any:
    """A CIFAR pickle (batch or meta) through the restricted unpickler; one line when unreadable."""
    try:
        with path.open("rb") as f:
            entry = _BatchUnpickler(f, path, fix).load()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err}): check its permissions, or {fix}") from err
    except UserError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways; all of them mean "corrupt"
        raise UserError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}): {fix}"
        ) from err
    if not isinstance(entry, dict):
        raise UserError(
            f"{path} is not a CIFAR batch (a {type(entry).__name__}, not a dict): {fix}"
        )
    # Batches re-pickled under Python 3 with bytes keys are common; accept them too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_batch(
    path: Path, label_key: str = "labels", num_classes: int = len(CLASSES), label: str = "CIFAR-10",
    dirname: str = BATCHES_DIRNAME,
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one batch file: (data uint8 (N,3072), labels int64 (N,))."""
    fix = f"re-download {label} or pass --data-dir with an intact {dirname} folder"
    entry = read_pickle(path, fix)
    if "data" not in entry or label_key not in entry:
        raise UserError(
            f"{path} lacks the 'data'/'{label_key}' keys of a {label} batch "
            f"(has {sorted(map(str, entry))}): {fix}"
        )
    data = entry["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _IMAGE_VALUES
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' is {desc}, expected uint8 (N, {_IMAGE_VALUES}): {fix}")
    labels = np.asarray(entry[label_key])
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise UserError(
            f"{path}: '{label_key}' is {labels.dtype} {labels.shape}, expected N integers: {fix}"
        )
    if len(labels) != len(data):
        raise UserError(
            f"{path}: {len(labels)} labels for {len(data)} images, expected one each: {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{path}: labels outside 0..{num_classes - 1} (found {labels.min()}..{labels.max()}): "
            f"this is not {label} (CIFAR-100 uses 'fine_labels'); {fix}"
        )
    return data, labels.astype(np.int64, copy=False)


def load_split(batches_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read 'train' (data_batch_1..5) or 'test' (test_batch): uint8 (N,3,32,32), int64 (N,)."""
    batches_dir = Path(batches_dir)
    if split == "train":
        names = _TRAIN_FILES
    elif split == "test":
        names = (_TEST_FILE,)
    else:
        raise UserError(f"unknown CIFAR-10 split {split!r}: use 'train' or 'test'")
    for name in names:  # check all up front so the user learns before any slow read
        if not (batches_dir / name).is_file():
            if split == "test":
                raise UserError(
                    f"test_batch not found in {batches_dir}: the test split is not there; "
                    f"evaluate with --split val or add test_batch"
                )
            raise UserError(
                f"{name} not found in {batches_dir}: the training batches are incomplete; pass "
                f"--data-dir pointing at a {BATCHES_DIRNAME} folder with data_batch_1..5"
            )
    parts = [_read_batch(batches_dir / name) for name in names]
    data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else np.array(parts[0][0])
    labels = np.concatenate([lab for _, lab in parts])
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: exactly (3,32,32).
    images = torch.from_numpy(data).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels)
