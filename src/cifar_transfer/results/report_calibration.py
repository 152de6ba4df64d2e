"""The report's calibration sections: reliability diagrams before/after temperature scaling,
the coverage-accuracy curve, suspected label errors, and the 95% intervals on its accuracies.

Built from eval-<split>.json's "calibration", "accuracy_ci95", "coverage_curve" and
"suspected_label_errors" (runs.evaluation, calibration.py) and, for the image grid, the split's
predictions. Values from the JSON are checked before use (an edited file never reaches the page
as markup or breaks a plot). report.py calls `calibration_figures` and `calibration_sections`.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_transfer.results.calibration import separable_difference, wilson_interval
from cifar_transfer.results.figures import image_grid_figure, new_figure, png_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cifar_transfer.results.runs import Predictions

SUSPECT_GRID = 32  # images in the suspected-label-error grid (8 x 4)
TOO_SMALL = 0.01  # a val split that cannot separate accuracies 1 point apart is called too small
BEFORE_COLOUR, AFTER_COLOUR = "#fb8f44", "#0969da"


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _bins_ok(bins: object) -> bool:
    return isinstance(bins, list) and bool(bins) and all(
        isinstance(b, dict) and isinstance(b.get("n"), int) and _number(b.get("lo"))
        and _number(b.get("hi")) and all(b.get(k) is None or _number(b.get(k))
                                         for k in ("confidence", "accuracy"))
        for b in bins
    )  # fmt: skip


def usable_calibration(ev: dict) -> bool:
    """True when eval JSON's calibration parts have the types `evaluate` writes."""
    c = ev.get("calibration")
    if not isinstance(c, dict) or not _number(c.get("temperature")):
        return False
    for side in ("before", "after"):
        m = c.get(side)
        if not isinstance(m, dict) or not all(_number(m.get(k)) for k in ("nll", "brier", "ece")):
            return False
        if not _bins_ok(m.get("bins")):
            return False
    f = c.get("twofold")
    if f is not None and not (isinstance(f, dict) and _number(f.get("ece_before"))
                              and _number(f.get("ece_after"))):  # fmt: skip
        return False
    ci = ev.get("accuracy_ci95")
    curve = ev.get("coverage_curve")
    suspects = ev.get("suspected_label_errors")
    n_classes = len(ev.get("classes", []))
    return (
        isinstance(ci, list) and len(ci) == 2 and all(_number(x) for x in ci)
        and isinstance(curve, list)
        and all(isinstance(p, dict) and _number(p.get("coverage")) and _number(p.get("accuracy"))
                for p in curve)
        and isinstance(suspects, list)
        and all(isinstance(e, dict) and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool)
                                            for k in ("index", "given", "suggested"))
                and 0 <= e["given"] < n_classes and 0 <= e["suggested"] < n_classes
                and _number(e.get("p_given")) and _number(e.get("p_suggested")) for e in suspects)
    )  # fmt: skip


# --------------------------------------------------------------------------- figures


def reliability_figure(calibration: dict) -> Figure:
    """Accuracy vs confidence per bin, before and after temperature scaling; counts on the bars."""
    fig = new_figure(11.0, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    t = calibration["temperature"]
    for ax, side, colour, title in (
        (axes[0], "before", BEFORE_COLOUR, "before scaling (T = 1)"),
        (axes[1], "after", AFTER_COLOUR, f"after scaling (T = {t:.3f})"),
    ):
        m = calibration[side]
        bins = [b for b in m["bins"] if b["n"] and b["accuracy"] is not None]
        width = bins[0]["hi"] - bins[0]["lo"] if bins else 1 / 15
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width * 0.92, color=colour, alpha=0.85,
               label="accuracy in the bin")  # fmt: skip
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3.5,
                color="#24292f", label="(mean confidence, accuracy)")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="#57606a", lw=1, label="perfect calibration")
        for x, b in zip(centres, bins):
            ax.text(x, b["accuracy"] + 0.015, str(b["n"]), ha="center", va="bottom", fontsize=7,
                    rotation=90 if b["n"] >= 1000 else 0)  # fmt: skip
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("confidence (top probability)")
        ax.set_title(f"{title}: ECE {m['ece']:.2%}, NLL {m['nll']:.3f}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=3, frameon=False, fontsize=8.5)
    return fig


def coverage_figure(curve: list[dict], accuracy: float) -> Figure:
    """Selective accuracy against coverage: answer only the most confident share of images."""
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], color=AFTER_COLOUR,
            lw=2, marker="o", ms=2.5)  # fmt: skip
    ax.axhline(accuracy, color="#57606a", ls="--", lw=1, label=f"answering all: {accuracy:.2%}")
    for p in curve:
        if p.get("min_confidence") is not None and round(p["coverage"] * 100) in (50, 80, 90):
            ax.annotate(f"p > {p['min_confidence']:.2f}", (p["coverage"], p["accuracy"]),
                        xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
    ax.set_xlim(0, 1.02)
    ax.margins(y=0.1)  # room for the P labels above the curve
    ax.set_xlabel("coverage (share of images answered, most confident first)")
    ax.set_ylabel("accuracy on the answered images")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", frameon=False, fontsize=8.5)
    return fig


def calibration_figures(ev: dict | None, preds: Predictions | None, classes: list[str]) -> dict[str, bytes]:
    """PNG bytes of the reliability diagram, coverage curve and suspected-label-error grid."""
    if not ev or not usable_calibration(ev):
        return {}
    figures = {"reliability": png_bytes(reliability_figure(ev["calibration"]))}
    if ev["coverage_curve"]:
        figures["coverage"] = png_bytes(coverage_figure(ev["coverage_curve"], ev["accuracy"]))
    n = len(preds.split.labels) if preds is not None else 0
    suspects = [e for e in ev["suspected_label_errors"][:SUSPECT_GRID] if 0 <= e["index"] < n]
    if preds is not None and suspects and preds.split.name == ev.get("split"):
        idx = [e["index"] for e in suspects]
        figures["suspects"] = png_bytes(image_grid_figure(
            preds.split.images[idx], [e["given"] for e in suspects],
            [e["suggested"] for e in suspects], [e["p_suggested"] for e in suspects], classes,
            "Suspected label errors ('true' is the given label)", cols=8,
        ))  # fmt: skip
    return figures


# --------------------------------------------------------------------------- HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _measured(accuracy: object, n: object) -> bool:
    return _number(accuracy) and isinstance(n, int) and not isinstance(n, bool) and n > 0


def interval_text(accuracy: float, n: int) -> str:
    """'95% CI a-b%, n images' for an accuracy measured on n images ("" without both)."""
    if not _measured(accuracy, n):
        return ""
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"95% CI {lo:.2%}-{hi:.2%}, {n} images"


def size_notes(ev: dict | None) -> list[str]:
    """What differences the evaluated split can tell apart; a warning when it cannot separate
    accuracies 1 point apart."""
    if not ev or not _measured(ev.get("accuracy"), ev.get("n")):
        return []
    accuracy, n, split = ev["accuracy"], ev["n"], ev.get("split", "val")
    d = separable_difference(accuracy, n)
    text = (f"On {n} {split} images, two accuracies near {accuracy:.1%} must differ by more than "
            f"{d:.2%} (points) to be told apart at 95%.")  # fmt: skip
    if d > TOO_SMALL:
        text += (f" This {split} split is too small to separate figures closer than that: use a "
                 f"larger data.val_size, or compare on the test split.")  # fmt: skip
    return [text]


def calibration_sections(ev: dict | None, figures: dict[str, bytes], img) -> list[str]:
    """The report's Calibration, Abstaining and Suspected label errors sections (HTML parts).

    `img(png, alt, caption)` is report.py's figure embedder.
    """
    parts = ["<h2 id=calibration>Calibration</h2>"]
    if not ev or not usable_calibration(ev):
        parts.append("<p>No calibration figures in the evaluation: run <code>cifar-transfer "
                     "evaluate RUN_DIR</code> (and <code>calibrate</code> for a run trained "
                     "before temperature scaling existed).</p>")  # fmt: skip
        return parts
    c, split, n = ev["calibration"], _esc(ev.get("split", "val")), ev.get("n", "?")
    b, a = c["before"], c["after"]
    rows = "".join(
        f"<tr><th>{name}</th><td class=num>{fmt(b[k])}</td><td class=num>{fmt(a[k])}</td></tr>"
        for name, k, fmt in (
            ("ECE (15 bins)", "ece", lambda v: f"{v:.2%}"), ("NLL", "nll", lambda v: f"{v:.4f}"),
            ("Brier", "brier", lambda v: f"{v:.4f}"),
        )
    )  # fmt: skip
    parts.append(f"<table><tr><th></th><th>before (T = 1)</th><th>after (T = "
                 f"{c['temperature']:.3f})</th></tr>{rows}</table>")  # fmt: skip
    f = c.get("twofold")
    if f:
        parts.append(f"<p>2-fold check on these {n} {split} images (T fitted on one half, ECE "
                     f"measured on the other, both ways): ECE {f['ece_before']:.2%} &rarr; "
                     f"{f['ece_after']:.2%}.</p>")  # fmt: skip
    if c["temperature"] == 1.0:
        parts.append("<p class=note>The bundle has no fitted temperature (a run from before "
                     "calibration): <code>cifar-transfer calibrate RUN_DIR</code> fits one.</p>")
    if "reliability" in figures:
        parts.append(img(figures["reliability"], "reliability diagram",
                         f"{split} split, {n} images: accuracy per confidence bin (numbers are "
                         f"the images in each bin) before and after temperature scaling; bars on "
                         f"the dashed diagonal are perfectly calibrated."))  # fmt: skip
    parts.append("<h2 id=coverage>Abstaining: coverage vs accuracy</h2>")
    if "coverage" in figures:
        parts.append(img(figures["coverage"], "coverage-accuracy curve",
                         "Accuracy on the images the model answers when it abstains below a "
                         "confidence (predict/evaluate --min-confidence P); labels give P."))  # fmt: skip
    sel = ev.get("selective")
    if isinstance(sel, dict) and _number(sel.get("coverage")) and _number(sel.get("min_confidence")):
        acc = sel.get("accuracy")
        parts.append(f"<p>evaluate --min-confidence {sel['min_confidence']:g}: coverage "
                     f"{sel['coverage']:.2%}, selective accuracy "
                     f"{f'{acc:.2%}' if _number(acc) else 'n/a'}.</p>")  # fmt: skip
    suspects = ev["suspected_label_errors"]
    parts.append("<h2 id=label-errors>Suspected label errors</h2>")
    found = ev.get("suspected_label_errors_found", len(suspects))
    parts.append(f"<p>{_esc(found)} {split} images whose given label the model contradicts most "
                 f"strongly (confident learning: another class above its per-class threshold "
                 f"and above the given label). Check them and fix the labels that are wrong.</p>")
    if "suspects" in figures:
        parts.append(img(figures["suspects"], "suspected label errors",
                         f"The {min(SUSPECT_GRID, len(suspects))} strongest: 'true' is the given "
                         f"label, 'pred' the model's class and its probability."))  # fmt: skip
    if suspects:
        classes = ev["classes"]
        head = "<tr><th>image (position in split)</th><th>given label</th><th>model says</th></tr>"
        body = "".join(
            f"<tr><td class=num>{e['index']}</td><td>{_esc(classes[e['given']])} "
            f"({e['p_given']:.3f})</td><td>{_esc(classes[e['suggested']])} "
            f"({e['p_suggested']:.3f})</td></tr>"
            for e in suspects[:SUSPECT_GRID]
        )
        parts.append(f"<table>{head}{body}</table>")
    return parts
