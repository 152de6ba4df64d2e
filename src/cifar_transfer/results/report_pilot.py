"""The report's section on a fine-tune's pilot (RUN/pilot.json, training/pilot.py): the LR range
test's curve per BatchNorm mode with its pick, and what the pilot measured and chose. The file
comes from a run dir someone may have sent: it is read as data, and a malformed one is skipped."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from cifar_transfer.artifacts.rundir import PILOT
from cifar_transfer.results.figures import TRAIN_COLOUR, VAL_COLOUR, new_figure, png_bytes

COLOURS = {"eval": TRAIN_COLOUR, "train": VAL_COLOUR}


def read_pilot(run_dir: Path) -> dict | None:
    """pilot.json when it is there and well-formed, else None."""
    try:
        doc = json.loads((run_dir / PILOT).read_text())
        trials = doc["trials"]
        assert isinstance(trials, list) and all(isinstance(t, dict) for t in trials)
        for t in trials:
            found = t.get("lr_find")
            if found is not None:
                assert len(found["lrs"]) == len(found["losses"])
                assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in found["lrs"] + found["losses"])
        return doc
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None


def lr_find_png(doc: dict) -> bytes | None:
    """Loss against LR (log axis) per mode, the pick marked; None without a range test."""
    tests = [(t["batchnorm"], t["lr_find"]) for t in doc["trials"] if t.get("lr_find")]
    if not tests:
        return None
    fig = new_figure(6.0, 3.2)
    ax = fig.add_subplot()
    for mode, found in tests:
        colour = COLOURS.get(mode, "#555555")
        ax.plot(found["lrs"], found["losses"], color=colour, label=f"BatchNorm {mode}")
        pick = found.get("pick") or found.get("valley")
        if isinstance(pick, (int, float)) and pick > 0:
            ax.axvline(pick, color=colour, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head; deeper stages at their layer-decay share)")
    ax.set_ylabel("training loss (smoothed)")
    ax.legend(frameon=False)
    return png_bytes(fig)


def pilot_section(run_dir: Path, img: Callable[..., str], esc: Callable[[object], str]) -> str:
    """The section's HTML ("" when the run had no pilot)."""
    doc = read_pilot(run_dir)
    if doc is None:
        return ""
    lines = [f"BatchNorm <b>{esc(doc.get('batchnorm'))}</b>, learning rate <b>{float(doc.get('lr', 0)):.2e}</b>"
             + (" (the switch: both pilots validated below the probe)" if doc.get("switched") else "")]
    probe = doc.get("probe_val_acc")
    for t in doc["trials"]:
        if t.get("val_acc") is not None:
            lines.append(f"pilot with BatchNorm {esc(t.get('batchnorm'))} at lr {float(t.get('lr', 0)):.2e}: "
                         f"val_acc {float(t['val_acc']):.4f} after {esc(doc.get('pilot_steps'))} steps"
                         + (f" (the probe: {float(probe):.4f})" if isinstance(probe, (int, float)) else ""))
    parts = ["<h2 id=pilot>Fine-tuning pilot</h2>", "<ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>"]
    png = lr_find_png(doc)
    if png is not None:
        parts.append(img(png, "LR range test", "The LR range test (fastai's lr_find) per BatchNorm "
                         "mode: the learning rate grows each step while the smoothed training loss is "
                         "recorded; the dotted line is the pick: halfway down the longest fall (fastai's valley), or a "
                         "decade below where the loss turns up when the curve has no real fall."))
    return "\n".join(parts)
