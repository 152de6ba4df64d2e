"""Atomic file writes: a kill at any instant leaves the old file or the new one, never a mix."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from cifar_transfer.system.errors import UserError

# Test-only: "SECONDS" or "SECONDS:NAME" makes atomic writes (of files named NAME) pause halfway
# through writing the temp file, so a test can SIGKILL a run inside a checkpoint write.
SLOW_WRITE_ENV = "CIFAR_TRANSFER_TEST_SLOW_WRITE"
TEMP_SUFFIX = ".tmp"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _file_mode() -> int:
    """0o666 less the process umask: what open() would give (mkstemp's temp files are 0o600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _test_pause(path: Path) -> None:
    spec = os.environ.get(SLOW_WRITE_ENV)
    if spec:
        seconds, _, name = spec.partition(":")
        if not name or name == path.name:
            time.sleep(float(seconds))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A kill at any instant leaves either the old file or the new one, never a mix; a full disk
    raises a UserError and leaves the old file as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            view = memoryview(data)
            f.write(view[: len(view) // 2])
            if os.environ.get(SLOW_WRITE_ENV):
                f.flush()
                _test_pause(path)
            f.write(view[len(view) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise UserError(
                f"no space left on the device while writing {path} (the previous version of the "
                f"file is intact): free some space, then run the command again (an interrupted "
                f"train continues with --resume RUN_DIR)"
            ) from e
        raise
    # The rename is durable only once the folder entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_temp_file(path: Path) -> bool:
    """True for the temp file of an atomic write (`.NAME.XXXXXXXX.tmp`)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that a killed writer left in `folder` and its subfolders; return them.

    Only call this while holding the folder's run lock: a live writer's temp file looks the same.
    """
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file() and is_temp_file(p)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file (contiguous CPU copies, shared storage broken)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(clean, metadata=metadata))
