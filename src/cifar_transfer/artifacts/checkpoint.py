"""Training checkpoints (last.pt) and TrainState, written atomically: a kill at any instant
leaves the last good one."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cifar_transfer.system.atomic import atomic_write_bytes
from cifar_transfer.system.errors import UserError


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
    data: str  # fingerprint of the training split's images and labels (training/core.Data)
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
