"""The run dir's format: its file names, claiming it (lock + emptiness), reading its config and
metrics, and re-creating the images it was validated on.

Everything that reads or writes a run dir by name goes through here, so the layout has one owner:

    RUN_DIR/config.toml            the resolved Config the run started with
    RUN_DIR/metrics.jsonl          one JSON row per epoch (or per probe penalty)
    RUN_DIR/checkpoints/last.pt    TrainState of the last finished epoch (checkpoint.py)
    RUN_DIR/checkpoints/best.safetensors   weights of the best epoch so far (keep_best)
    RUN_DIR/model.safetensors + model.json the bundle (bundle.py)
    RUN_DIR/eval-<split>.json, report.html, *.png, model.onnx / model.pt

No training code is imported: evaluate, report, export and predict use this module.
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_transfer.config import Config, config_from_dict
from cifar_transfer.data.cifar10 import CLASSES
from cifar_transfer.system import runlock
from cifar_transfer.system.atomic import is_temp_file, remove_stale_temp_files
from cifar_transfer.system.errors import UserError

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.safetensors"
WEIGHTS = "model.safetensors"
META = "model.json"
PILOT = "pilot.json"  # a fine-tune's measured BatchNorm mode and LR (training/pilot.py)

# metrics.jsonl fields that measure time, not the computation: they differ between two runs.
TIMING_KEYS = frozenset({"seconds", "img_per_s", "extract_seconds", "elapsed_seconds"})


def eval_file(split: str) -> str:
    """Name of the evaluation JSON of a split."""
    return f"eval-{split}.json"


def run_dir_of(path: str | Path) -> Path:
    """A run dir given as itself or as a file in it (model.safetensors, model.json, ...)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def parse_file(path: Path, parse: Callable[[str], Any], missing: str, fix: str) -> Any:
    """A run-dir file's text parsed (json.loads, tomllib.loads), or one UserError line: the
    `missing` message when it is not there, else what is wrong with it and `fix`."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return parse(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSON and TOML decode errors are ValueErrors
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserError(f"{path} is not valid {kind} ({e}): {fix}") from None


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run dir was started with."""
    raw = parse_file(
        run_dir_of(run_dir) / CONFIG, tomllib.loads,
        f"{run_dir} is not a run dir (no {CONFIG}): pass the --out of an earlier train",
        "restore the file from the run",
    )  # fmt: skip
    data = raw.get("data")
    if isinstance(data, dict) and "near_duplicates" not in data:
        # Written before the key existed: its split was carved without near-duplicate groups,
        # and re-creating it (evaluate, report) must give the same images.
        raw["data"] = {**data, "near_duplicates": 0.0}
    return config_from_dict(raw)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl as a list of epoch rows (empty when the run logged none)."""
    path = run_dir_of(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not JSON ({e}): restore the file or re-run") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n} is not a metrics row: restore the file or re-run")
        rows.append(row)
    return rows


def _run_files(out: Path) -> list[Path]:
    """What a run dir holds besides its lock and temp files that a killed writer left."""
    return [p for p in out.iterdir() if p.name != runlock.LOCK_NAME and not is_temp_file(p)]


def claim(out: Path, new: bool) -> runlock.RunLock:
    """Lock the run dir for this process; a new run also needs it empty. Cleans killed writes."""
    out = Path(out)
    created = False
    if new:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a folder path for the run")
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create run dir {out} ({e.strerror}): choose an --out in a writable folder"
            ) from None
    elif not out.is_dir():
        raise UserError(f"{out} is not a run dir: pass the --out of an earlier train")
    try:
        lock = runlock.acquire(out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if new and _run_files(out):
        lock.release()
        raise UserError(
            f"run dir {out} is not empty: choose a new --out, or continue it with --resume {out}"
        )
    remove_stale_temp_files(out)  # safe now: nobody else writes here
    return lock


@dataclass
class RunSplit:
    """The images a run is judged on: its own validation split (or test_batch without one)."""

    name: str
    images: torch.Tensor  # uint8 (N, 3, S, S): S = 32 for CIFAR, the storage size for folders
    labels: torch.Tensor  # int64 (N,)
    data_dir: Path
    classes: list[str] = field(default_factory=lambda: list(CLASSES))


def run_split(
    run_dir: str | Path, data_dir: str | None = None, split: str = "",
    purpose: str = "this needs",
) -> RunSplit:
    """Re-create a run's images: `split` "val", "test", or "" for val (test when val_size=0)."""
    from cifar_transfer.data.datasets import load_test, load_train_val

    cfg = load_run_config(run_dir)
    try:
        if split != "test":
            s = load_train_val(cfg, data_dir, progress=False, with_fingerprint=False)
            if len(s.val_y) or split == "val":
                if not len(s.val_y):
                    raise UserError(
                        f"run {run_dir} trained with data.val_size=0: evaluate it with --split test"
                    )
                return RunSplit("val", s.val_x, s.val_y, s.source.root, s.source.classes)
        x, y, src = load_test(cfg, data_dir)
        return RunSplit("test", x, y, src.root, src.classes)
    except UserError as e:
        if "val_size=0" in str(e):
            raise
        fix = "" if "--data-dir" in str(e) else (
            "; pass --data-dir pointing at the data folder the run trained on")
        kind = "CIFAR-10 " if cfg.data.kind in ("auto", "cifar10") and not cfg.data.data_dir else ""
        raise UserError(f"{purpose} the run's {kind}images: {e}{fix}") from None
