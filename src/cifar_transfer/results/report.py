"""Plots and a one-file HTML report of a finished run, built from the run dir alone.

`build_report(run_dir)` reads config.toml, metrics.jsonl, model.json/.safetensors and the eval
JSON (computing and writing eval-<split>.json when it is missing), re-creates the run's
validation split for the sample grids, and writes report.html (every image embedded as a data
URI: it opens offline, anywhere) plus the same figures as PNGs beside it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_transfer.artifacts.bundle import read_meta
from cifar_transfer.artifacts.rundir import (
    CONFIG,
    eval_file,
    load_run_config,
    read_metrics,
    run_split,
)
from cifar_transfer.results.figures import (
    confusion_figure,
    curves_figure,
    image_grid_figure,
    per_class_figure,
    png_bytes,
    probe_figure,
    probe_only,
)
from cifar_transfer.results.report_calibration import (
    calibration_figures,
    calibration_sections,
    interval_text,
    size_notes,
    usable_calibration,
)
from cifar_transfer.results.report_pilot import pilot_section
from cifar_transfer.results.report_validation import usable_eval, validation_section
from cifar_transfer.results.runs import Predictions, evaluation, predict_split
from cifar_transfer.system.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from cifar_transfer.system.errors import UserError

GRID = 16  # images per sample grid (4 x 4)
MATRIX_CLASSES = 20  # above this a confusion heatmap is unreadable: the most-confused pairs stay
PAIRS = 20  # rows of the most-confused pairs table
SAMPLE_SEED = 0


# --------------------------------------------------------------------------- reading the run


def eval_results(run_dir: Path, preds: Predictions | None) -> dict | None:
    """eval-<split>.json, computed from `preds` and written when it is not there yet."""
    names = [preds.split.name] if preds is not None else ["val", "test"]
    for name in names:
        path = run_dir / eval_file(name)
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # a damaged file is re-made below when we can
            if usable_eval(found) and (preds is None or usable_calibration(found)):
                return found  # one from before calibration is re-made when the images are here
            break  # so is one whose values are not what evaluate writes (edited, or another tool's)
    if preds is None:
        return None
    result = evaluation(preds)
    atomic_write_json(run_dir / eval_file(preds.split.name), result)
    return result


def sample_indices(n: int, k: int = GRID, seed: int = SAMPLE_SEED) -> list[int]:
    """k seeded random positions out of n (the same every time the report is built)."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def confident_mistakes(probs: torch.Tensor, labels: torch.Tensor, k: int = GRID) -> list[int]:
    """Positions of the k wrong predictions made with the highest probability."""
    conf, pred = probs.max(1)
    wrong = torch.nonzero(pred != labels).flatten()
    order = torch.argsort(conf[wrong], descending=True, stable=True)
    return wrong[order][:k].tolist()


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:#24292f;background:#f6f8fa;margin:0;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.7em;margin:0 0 4px}h2{font-size:1.25em;margin:34px 0 10px;
 border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 18px}
figure{margin:8px 0 0}figure img{max-width:100%;height:auto;border:1px solid #d0d7de;
 border-radius:6px;background:#fff}figcaption{color:#57606a;font-size:.9em;margin-top:4px}
table{border-collapse:collapse;font-size:.93em;margin:6px 0}
td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:left}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:1.45em}.card span{color:#57606a;font-size:.85em}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:12px;
 overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-word}
.note{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:20px;align-items:start}
@media (max-width:900px){.two{grid-template-columns:1fr}}
"""

# Counts the images that decoded, so a headless browser (or a person) can check none is broken.
IMAGE_CHECK_JS = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">{cap}</figure>'


def _table(pairs: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>{body}</table>"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def confused_pairs(matrix: list[list[int]], classes: list[str], k: int = PAIRS) -> list[tuple]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    cm = np.asarray(matrix, dtype=np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    rows = cm.sum(1)
    return [
        (classes[i], classes[j], int(off[i, j]), off[i, j] / rows[i] if rows[i] else 0.0)
        for i, j in zip(*np.unravel_index(order, cm.shape)) if off[i, j] > 0
    ]


def _pairs_table(pairs: list[tuple]) -> str:
    if not pairs:
        return "<p>No confusions: every image was predicted correctly.</p>"
    head = "<tr><th>true class</th><th>predicted as</th><th>images</th><th>share of true class</th></tr>"
    body = "".join(
        f"<tr><td>{_esc(t)}</td><td>{_esc(p)}</td><td class=num>{n}</td><td class=num>{s:.1%}</td></tr>"
        for t, p, n, s in pairs
    )
    return f"<table>{head}{body}</table>"


def _per_class_table(per_class: dict[str, dict], classes: list[str]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    body = "".join(
        f"<tr><td>{_esc(c)}</td><td class=num>{per_class[c]['precision']:.3f}</td>"
        f"<td class=num>{per_class[c]['recall']:.3f}</td><td class=num>{per_class[c]['f1']:.3f}"
        f"</td><td class=num>{_esc(per_class[c]['support'])}</td></tr>"
        for c in classes
    )
    return f"<table>{head}{body}</table>"


def render_html(
    run_dir: Path, meta: dict, cfg_text: str, rows: list[dict], evaluation: dict | None,
    figures: dict[str, bytes], notes: list[str],
) -> str:
    """The whole report as one HTML string (figures inlined as data URIs, no external files)."""
    title = f"cifar-transfer run {run_dir.resolve().name}"
    split = evaluation.get("split", "val") if evaluation else "val"
    train_acc, val_n = meta.get("val_acc"), meta.get("val_images")
    ev_acc = (evaluation["accuracy"], evaluation.get("n")) if evaluation else (None, None)
    cards = [
        (f"best val accuracy (training) {interval_text(train_acc, val_n)}", _pct(train_acc)),
        (f"{split} accuracy (evaluate) {interval_text(*ev_acc)}",
         _pct(evaluation["accuracy"]) if evaluation else "n/a"),
        (f"{split} loss", f"{evaluation['loss']:.4f}" if evaluation else "n/a"),
        *([(f"{split} balanced accuracy", _pct(evaluation["balanced_accuracy"])),
           (f"{split} macro-F1", f"{evaluation['macro_f1']:.4f}")]
          if evaluation and "balanced_accuracy" in evaluation and "macro_f1" in evaluation else []),
        (("L2 penalties swept (probe)", str(len(rows))) if probe_only(rows)
         else ("epochs run", str(meta.get("epochs_run", len(rows))))),
        ("training time", _duration(sum(r.get("seconds", 0.0) + r.get("extract_seconds", 0.0)
                                        for r in rows))),
    ]
    parts = [
        f"<h1>{_esc(title)}</h1>",
        (
            f"<p class=sub>recipe <b>{_esc(meta.get('recipe'))}</b> &middot; backbone "
            f"<b>{_esc(meta.get('backbone'))}</b> ({_esc(meta.get('head'))} head, weights "
            f"{_esc(meta.get('pretrained_from'))}) at {_esc(meta.get('resolution'))} px "
            f"&middot; trained {_esc(meta.get('created', '?'))}</p>"
        ),
        "<div class=cards>"
        + "".join(f"<div class=card><b>{_esc(v)}</b><span>{_esc(k)}</span></div>" for k, v in cards)
        + "</div>",
    ]
    parts += [f"<p class=note>{_esc(n)}</p>" for n in notes]
    parts.append(validation_section(run_dir, meta, evaluation))
    parts.append("<h2 id=curves>Training curves</h2>")
    probe_caption = (
        "The linear probe's L2 sweep (one L-BFGS fit per penalty, no epochs and no learning "
        "rate): train and validation loss and accuracy against the penalty, log axis; the dotted "
        "line marks the penalty kept (best validation accuracy)."
    )
    if "curves" in figures and probe_only(rows):
        parts.append(_img(figures["curves"], "probe L2 sweep", probe_caption))
    elif "curves" in figures:
        parts.append(_img(
            figures["curves"], "training curves",
            "Per epoch: train and validation loss and accuracy, learning rate; shaded bands and "
            "dashed lines separate the phases (name and input resolution on top).",
        ))
        if "probe" in figures:
            parts.append(_img(figures["probe"], "probe L2 sweep", probe_caption))
    else:
        parts.append("<p>metrics.jsonl has no epochs.</p>")
    parts.append(pilot_section(run_dir, _img, _esc))
    parts.append("<h2 id=confusion>Confusion matrix</h2>")
    if evaluation:
        n = evaluation.get("n", "?")
        tta = ", flip TTA" if evaluation.get("tta") else ""
        if "confusion" in figures:
            parts.append(_img(
                figures["confusion"], "confusion matrix",
                f"{split} split, {n} images{tta}. Numbers are counts; colour is the share of the "
                f"true class's images (each row sums to 100%).",
            ))
        classes = evaluation["classes"]
        parts.append(f"<h3>Most-confused pairs ({split} split, {n} images{tta})</h3>")
        parts.append(_pairs_table(confused_pairs(evaluation["confusion_matrix"], classes)))
        parts.append("<h2 id=per-class>Per-class precision and recall</h2>")
        bars = _img(figures["per_class"], "per-class precision and recall") if "per_class" in figures else ""
        parts.append("<div class=two>" + bars + _per_class_table(evaluation["per_class"], classes) + "</div>")
    else:
        parts.append("<p>No evaluation available (see the note above).</p>")
    no_images = "<p>Not available without the images (see the note above).</p>"
    grids = (
        ("samples", "Sample predictions", no_images,
         (f"{GRID} {split} images picked at random (seed {SAMPLE_SEED}): a red frame and a cross "
          f"mark the wrong predictions; percentages are the predicted class's probability.")),
        ("mistakes", "Most confident mistakes",
         "<p>None: every image was predicted correctly.</p>" if "samples" in figures else no_images,
         f"The wrong predictions on the {split} split made with the highest probability."),
    )  # fmt: skip
    for key, title, missing, caption in grids:
        parts.append(f"<h2 id={key}>{title}</h2>")
        parts.append(_img(figures[key], title.lower(), caption) if key in figures else missing)
    parts += calibration_sections(evaluation, figures, _img)
    env_keys = ("device", "gpu", "precision", "torch", "cpu_threads", "cpu_capability")
    env = [(f"training {k}", meta[k]) for k in env_keys if k in meta]
    env += [
        ("training images", meta.get("train_images", "?")),
        ("validation images", meta.get("val_images", "?")),
        ("report built", dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
        ("report torch", torch.__version__),
        ("report python", platform.python_version()),
    ]
    parts += [
        "<h2 id=environment>Environment</h2>", _table(env),
        "<h2 id=config>Resolved config (config.toml)</h2>", f"<pre>{_esc(cfg_text)}</pre>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(parts)
        + f"\n</main><script>{IMAGE_CHECK_JS}</script></body></html>\n"
    )


def build_report(run_dir: str | Path, data_dir: str | None = None) -> dict:
    """Write report.html and the figure PNGs into the run dir; return their paths and notes."""
    run_dir = Path(run_dir)
    load_run_config(run_dir)  # a clear error for a path that is not a run dir
    meta = read_meta(run_dir)
    cfg_text = (run_dir / CONFIG).read_text()
    rows = read_metrics(run_dir)
    notes: list[str] = []
    preds = None
    try:
        preds = predict_split(run_dir, run_split(run_dir, data_dir, purpose="the sample grids need"))
    except UserError as e:
        notes.append(str(e))
    evaluation = eval_results(run_dir, preds)
    classes = list(evaluation["classes"]) if evaluation else list(meta["classes"])

    figures: dict[str, bytes] = {}
    if rows:  # a run that only probes has no epochs: its sweep against the L2 penalty instead
        figures["curves"] = png_bytes(probe_figure(rows) if probe_only(rows) else curves_figure(rows))
        if not probe_only(rows) and any(r.get("l2") is not None for r in rows):
            figures["probe"] = png_bytes(probe_figure(rows))
    if evaluation and len(classes) <= MATRIX_CLASSES:  # beyond, the pairs table and class table
        figures["confusion"] = png_bytes(confusion_figure(evaluation["confusion_matrix"], classes))
        figures["per_class"] = png_bytes(per_class_figure(evaluation["per_class"], classes))
        notes += size_notes(evaluation)
    if preds is not None and len(preds.split.labels):
        conf, pred = preds.probs.max(1)
        labels = preds.split.labels
        for key, idx, title in (
            ("samples", sample_indices(len(labels)), f"Random {preds.split.name} images"),
            ("mistakes", confident_mistakes(preds.probs, labels), "Most confident mistakes"),
        ):
            if idx:
                figures[key] = png_bytes(image_grid_figure(
                    preds.split.images[idx], labels[idx].tolist(), pred[idx].tolist(),
                    conf[idx].tolist(), classes, title,
                ))
    figures.update(calibration_figures(evaluation, preds, classes))
    written = {}
    for key, png in figures.items():
        path = run_dir / f"{key.replace('_', '-')}.png"
        atomic_write_bytes(path, png)
        written[key] = str(path)
    report = run_dir / "report.html"
    atomic_write_text(report, render_html(run_dir, meta, cfg_text, rows, evaluation, figures, notes))
    return {"path": str(report), "figures": written, "notes": notes}
