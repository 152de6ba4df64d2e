"""The run's record: metrics.jsonl rows, TensorBoard scalars, console lines and the best epoch.

Training code talks to a RunLog instead of printing: under torchrun only rank 0 writes or
prints, and `--quiet` silences the console without changing what is recorded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cifar_transfer.artifacts.checkpoint import Best
from cifar_transfer.artifacts.rundir import METRICS
from cifar_transfer.system.atomic import atomic_write_text
from cifar_transfer.system.errors import UserError
from cifar_transfer.training.plan import PhasePlan

# metrics.jsonl row fields -> TensorBoard tags
TENSORBOARD_TAGS = (
    ("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "accuracy/train"),
    ("val_acc", "accuracy/val"), ("val_balanced_acc", "balanced_accuracy/val"), ("lr", "lr"), ("img_per_s", "speed/img_per_s"),
    ("resolution", "resolution"), ("l2", "probe/l2"),
)  # fmt: skip


class RunLog:
    """Append-only epoch rows (rewritten atomically), the best epoch, and what the user sees."""

    def __init__(
        self, out: Path, writes: bool, console: bool, tensorboard: bool,
        rows: list[dict] | None = None, best: Best | None = None,
    ) -> None:
        self.out, self.writes, self.console = Path(out), writes, console
        self.rows: list[dict] = list(rows or [])
        self.best = best or Best()
        self.select_key = "val_acc"  # "val_balanced_acc" with run.select_by = "balanced_accuracy"
        self.t_start = time.perf_counter()  # elapsed_seconds counts from here: data load included
        # Earlier sessions' wall time up to their last logged epoch (work lost to a kill is not).
        self.elapsed_before = self.rows[-1].get("elapsed_seconds", 0.0) if self.rows else 0.0
        self._tensorboard = _LazyWriter(self.out / "tensorboard") if tensorboard and writes else None

    @property
    def epochs(self) -> int:
        """Rows logged so far: the run-wide epoch count."""
        return len(self.rows)

    def row(self, plan: PhasePlan, phase_epoch: int, **fields: object) -> dict:
        """A metrics row with the fields every phase kind shares, then the phase's own."""
        return {
            "phase": plan.index, "phase_name": plan.phase.name, "epoch": self.epochs + 1,
            "phase_epoch": phase_epoch, **fields, "resolution": plan.resolution,
            "cached_features": plan.cached, **({"cached_maps": True} if plan.maps else {}),
        }  # fmt: skip

    def log(self, row: dict, of: int, extra: str = "") -> None:
        """Record one row (metrics.jsonl, TensorBoard) and print its console line."""
        row["elapsed_seconds"] = self.elapsed_before + time.perf_counter() - self.t_start
        self.rows.append(row)
        if self.writes:
            text = "".join(json.dumps(r) + "\n" for r in self.rows)
            atomic_write_text(self.out / METRICS, text)
        if self._tensorboard is not None:
            self._tensorboard.add_row(row)
        if "extract_seconds" in row:
            how = ", from the stored maps" if row.get("features_from_maps") else ""
            extra += f" (features {row['extract_seconds']:.0f}s{how})"
        val = "" if row["val_acc"] is None else (
            f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}")
        self.say(
            f"[{row['phase_name']} {row['phase_epoch']}/{of}] train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.4f}{val} lr {row['lr']:.2e} {row['img_per_s']:.0f} img/s "
            f"{row['seconds']:.1f}s{extra}"
        )

    def score(self, row: dict) -> float | None:
        """What "best" compares for a row: its val_acc, or its val_balanced_acc with
        run.select_by = "balanced_accuracy" (None when the row was not validated)."""
        if row.get("val_acc") is None:
            return None
        return row.get(self.select_key, row["val_acc"])

    def score_of(self, epoch: int) -> float:
        """The score of the row of run-wide `epoch` (-1 when there is none)."""
        scores = [self.score(r) for r in self.rows if r["epoch"] == epoch]
        return scores[-1] if scores and scores[-1] is not None else -1.0

    def improved(self, row: dict, plan: PhasePlan) -> bool:
        """True (and the row becomes the best) when its score beats every earlier one."""
        score = self.score(row)
        if score is None or score <= self.score_of(self.best.epoch):
            return False
        self.best = Best(row["val_acc"], row["epoch"], plan.resolution, plan.precision)
        return True

    def phase_best(self, index: int) -> float:
        """The best score logged in phase `index` so far (-1 when none)."""
        scores = [self.score(r) for r in self.rows if r["phase"] == index]
        return max((s for s in scores if s is not None), default=-1.0)

    def say(self, text: str) -> None:
        """A console line (stdout) unless --quiet or not rank 0."""
        if self.console:
            print(text, flush=True)

    def warning(self, text: str) -> None:
        """A warning line on stderr from rank 0, shown under --quiet too."""
        if self.writes:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if one was opened."""
        if self._tensorboard is not None:
            self._tensorboard.close()


class _LazyWriter:
    """A SummaryWriter on RUN_DIR/tensorboard, opened at the first row.

    Lazily, so a run refused before its first epoch leaves no event file; on resume, events from
    epochs after the checkpoint are purged (purge_step).
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "run.tensorboard needs the tensorboard package: pip install "
                "'cifar-transfer[tensorboard]' (or pip install tensorboard), or drop --tensorboard"
            ) from None
        self.factory, self.log_dir, self.writer = SummaryWriter, log_dir, None

    def add_row(self, row: dict) -> None:
        """One metrics row as scalars at step = the run's epoch."""
        step = row["epoch"]
        if self.writer is None:
            self.writer = self.factory(log_dir=str(self.log_dir), purge_step=step)
        for key, tag in TENSORBOARD_TAGS:
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        self.writer.add_text("phase", f"{row['phase_name']} (phase {row['phase']})", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
