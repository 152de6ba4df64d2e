"""The report's figures (matplotlib, Agg; no pyplot, so no global state and no display): the
training curves (or, for a probe, the L2 sweep), the confusion matrix, per-class bars and image
grids, each rendered to PNG."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
OK_COLOUR, BAD_COLOUR = "#1a7f37", "#cf222e"
TRAIN_COLOUR, VAL_COLOUR = "#0969da", "#d1242f"


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.patch.set_facecolor("white")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def curves_figure(rows: list[dict]) -> Figure:
    """Loss, accuracy and learning rate per epoch, train vs val, phases shaded and named."""
    fig = new_figure(12.5, 4.1)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    marker = "o" if len(rows) <= 30 else None
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
            x, y = series(f"{split}_{key}")
            if x:
                ax.plot(x, y, color=colour, marker=marker, markersize=3.5, lw=1.8, label=split)
        ax.set_title(title)
    handles, labels = ax_loss.get_legend_handles_labels()
    if handles:  # one legend for both panels, above them, clear of the curves and phase names
        fig.legend(handles, labels, loc="outside upper center", ncols=2, frameon=False)
    best = [(r["val_acc"], r["epoch"]) for r in rows if r.get("val_acc") is not None]
    if best:
        acc, epoch = max(best)
        train_acc = next((r.get("train_acc") for r in rows if r["epoch"] == epoch), None)
        below = train_acc is not None and train_acc > acc  # keep the label off the train curve
        ax_acc.annotate(
            f"best val {acc:.1%}", (epoch, acc), xytext=(0, -9 if below else 7),
            textcoords="offset points", ha="center", va="top" if below else "bottom",
            fontsize=8.5, color=VAL_COLOUR,
        )
    x, y = series("lr")
    ax_lr.plot(x, y, color="#6e40c9", marker=marker, markersize=3.5, lw=1.8)
    ax_lr.set_title("Learning rate")
    if y and min(y) > 0 and max(y) / min(y) > 20:
        ax_lr.set_yscale("log")
    elif y:
        ax_lr.set_ylim(0, max(y) * 1.1 or 1.0)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _mark_phases([ax_loss, ax_acc, ax_lr], rows)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.6, max(epochs) + 0.6)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    return fig


def is_probe_row(row: dict) -> bool:
    """A metrics row of the L-BFGS probe: one L2 penalty of its sweep, not an epoch."""
    return row.get("l2") is not None


def probe_only(rows: list[dict]) -> bool:
    """True when every row is a probe penalty: the run has no epochs and no learning rate."""
    return bool(rows) and all(is_probe_row(r) for r in rows)


def probe_figure(rows: list[dict]) -> Figure:
    """The probe's L2 sweep: loss and accuracy, train vs val, against the penalty (log axis);
    one line per split and probe phase, the kept penalty (best val accuracy) marked."""
    fig = new_figure(10.0, 4.1)
    ax_loss, ax_acc = fig.subplots(1, 2)
    probes = [r for r in rows if is_probe_row(r)]
    phases = list(dict.fromkeys(r.get("phase", 0) for r in probes))
    for n, phase in enumerate(phases):
        mine = sorted((r for r in probes if r.get("phase", 0) == phase), key=lambda r: r["l2"])
        name = str(mine[0].get("phase_name", phase)) if len(phases) > 1 else ""
        style = ("-", "--", ":")[n % 3]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
                pts = [(r["l2"], r[f"{split}_{key}"]) for r in mine if r.get(f"{split}_{key}") is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colour, ls=style, marker="o", markersize=4, lw=1.8,
                            label=f"{split} {name}".strip())  # fmt: skip
        # The probe keeps the best val_acc, then the lowest val_loss, then the first (strongest) L2.
        best = [(r["val_acc"], -(r.get("val_loss") or 0.0), r["l2"]) for r in mine
                if r.get("val_acc") is not None]  # fmt: skip
        if best:
            acc, _, l2 = max(best)
            ax_acc.annotate(f"kept l2 {l2:g}: val {acc:.1%}", (l2, acc), xytext=(0, -10),
                            textcoords="offset points", ha="center", va="top", fontsize=8.5,
                            color=VAL_COLOUR, bbox={"fc": "white", "ec": "none", "pad": 1.0})  # fmt: skip
            ax_acc.axvline(l2, color=VAL_COLOUR, ls=":", lw=0.9)
    values = sorted({r["l2"] for r in probes})
    for ax, title in ((ax_loss, "Loss"), (ax_acc, "Accuracy")):
        ax.set_title(title)
        ax.set_xlabel("L2 penalty (probe sweep)")
        ax.grid(alpha=0.3)
        if values and min(values) > 0:
            ax.set_xscale("log")
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
    handles, labels = ax_loss.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(4, len(handles)),
                   frameon=False)  # fmt: skip
    return fig


def _mark_phases(axes: list, rows: list[dict]) -> None:
    """Shade alternate phases and name each one (with its resolution) at the top of the plot."""
    spans: list[tuple[str, int, int, int]] = []  # (name, first epoch, last epoch, resolution)
    previous = None
    for r in rows:
        name = str(r.get("phase_name", r.get("phase", "")))
        if spans and r.get("phase") == previous:
            spans[-1] = (name, spans[-1][1], r["epoch"], r.get("resolution", 0))
        else:
            spans.append((name, r["epoch"], r["epoch"], r.get("resolution", 0)))
        previous = r.get("phase")
    for ax in axes:  # headroom on top so the phase names never sit on a curve
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(lo, hi * (hi / lo) ** 0.25)
        else:
            ax.set_ylim(lo, hi + 0.22 * (hi - lo))
    for i, (name, first, last, res) in enumerate(spans):
        for ax in axes:
            if i % 2 == 1:
                ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.05, lw=0)
            if i > 0:
                ax.axvline(first - 0.5, color="#57606a", ls="--", lw=0.9)
            label = f"{name}" + (f"\n{res} px" if res else "")
            ax.text(
                (first + last) / 2, 0.97, label, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=8.5, color="#57606a",
            )


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> Figure:
    """Counts in each cell, colour by row share (recall per true class)."""
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig = new_figure(7.2, 6.2)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                colour = "white" if share[i, j] > 0.55 else "#24292f"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class (row)")
    ax.set_title("Confusion matrix (rows = true class)")
    return fig


def per_class_figure(per_class: dict[str, dict], classes: list[str]) -> Figure:
    """Precision and recall per class as grouped bars."""
    fig = new_figure(5.8, 3.9)
    ax = fig.subplots()
    x = np.arange(len(classes))
    prec = [per_class[c]["precision"] for c in classes]
    rec = [per_class[c]["recall"] for c in classes]
    ax.bar(x - 0.2, prec, 0.4, label="precision", color=TRAIN_COLOUR)
    ax.bar(x + 0.2, rec, 0.4, label="recall", color="#fb8f44")
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=2, frameon=False)
    return fig


def image_grid_figure(
    images: torch.Tensor, true: list[int], pred: list[int], prob: list[float], classes: list[str],
    title: str, cols: int = 4,
) -> Figure:
    """Images, `cols` per row, each titled true / predicted; wrong ones framed red with a cross."""
    rows = max(1, -(-len(images) // cols))
    fig = new_figure(2.0 * cols, 2.35 * rows + 0.5)
    fig.get_layout_engine().set(h_pad=0.14, hspace=0.02)  # a clear gap: each title sits on its image
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[k].permute(1, 2, 0).numpy(), interpolation="nearest")
        right = true[k] == pred[k]
        colour = OK_COLOUR if right else BAD_COLOUR
        mark = "\u2713" if right else "\u2717"
        ax.set_title(
            f"{mark} pred {classes[pred[k]]} {prob[k]:.0%}\ntrue {classes[true[k]]}",
            fontsize=9, color=colour, linespacing=1.25,
        )
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(1.0 if right else 3.0)
    fig.suptitle(title, fontsize=11)
    return fig
