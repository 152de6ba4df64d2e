"""Atomic run-dir writes and training checkpoints (a kill at any instant leaves the last good one)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (tensors and plain Python data only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: the run dir has nothing to resume; start it anew")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} is unreadable or unsafe ({first[:160]}): delete it to restart the run"
        ) from None


# --------------------------------------------------------------------------- TrainState

# Bump when TrainState's fields change: an older or newer last.pt is refused with one line.
STATE_FORMAT = 2


@dataclass
class Best:
    """The best validation epoch so far and how its weights were validated."""

    acc: float = -1.0
    epoch: int = -1  # run-wide epoch number (metrics.jsonl "epoch"); -1 = none yet
    resolution: int = 0
    precision: str = ""
    file: str = ""  # run-dir-relative weights file of that epoch (keep_best), "" = none


@dataclass
class TrainState:
    """What last.pt holds: everything a run needs to go on bit-exactly after its last epoch."""

    model: dict[str, torch.Tensor]
    data: str  # fingerprint of the training split's images and labels (train.Data)
    generator: torch.Tensor  # the shuffling/augmentation generator
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]  # one state per visible GPU; [] on a CPU
    phase: int  # index of the phase the checkpoint was taken in
    phase_epoch: int  # epochs of that phase finished
    phase_done: bool  # that phase ended (last epoch, early stop, probe sweep)
    stale: int  # epochs without val_acc gain (early stopping)
    global_epoch: int  # metrics.jsonl rows that belong to this state
    best: Best = field(default_factory=Best)
    last: Best = field(default_factory=Best)  # validation of the weights `model` holds
    optimizer: dict | None = None
    scheduler: dict | None = None
    ema: dict | None = None
    signature: dict = field(default_factory=dict)  # backbone, head, phases: what it fits

    def save(self, path: Path) -> None:
        """Atomically write last.pt (tensors and plain data only: loads with weights_only)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["best"], state["last"] = asdict(self.best), asdict(self.last)
        state["format"] = STATE_FORMAT
        save_checkpoint(path, state)

    @classmethod
    def load(cls, path: Path, signature: dict) -> TrainState:
        """Read last.pt; refuse one from another version or another config with one line."""
        raw = load_checkpoint(path)
        fix = "start a new run (or restore the run dir's own config.toml)"
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            got = raw.get("format", "none") if isinstance(raw, dict) else type(raw).__name__
            raise UserError(
                f"checkpoint {path} has format {got}, this version reads {STATE_FORMAT}: "
                f"finish it with the version that wrote it, or {fix}"
            )
        if raw.get("signature") != signature:
            raise UserError(
                f"checkpoint {path} was written for {raw.get('signature')}, but the run's config "
                f"says {signature}: {fix}"
            )
        names = {f.name for f in fields(cls)}
        try:
            kwargs = {k: v for k, v in raw.items() if k in names}
            kwargs["best"], kwargs["last"] = Best(**raw["best"]), Best(**raw["last"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:
            raise UserError(f"checkpoint {path} is incomplete ({e}): {fix}") from None
