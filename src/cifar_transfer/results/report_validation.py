"""The report's "Validation and held-out test" section: the validation figure next to the test
figure (when `evaluate --split test` has run, else how to get it), and what the near-duplicate
check found when the validation split was carved (issue 23: an honest validation figure)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from cifar_transfer.artifacts.rundir import eval_file
from cifar_transfer.results.report_calibration import interval_text


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def usable_eval(result: object) -> bool:
    """True when an eval JSON has the types `evaluate` writes (the report formats them)."""
    if not isinstance(result, dict) or not all(_number(result.get(k)) for k in ("accuracy", "loss")):
        return False
    classes, per_class = result.get("classes"), result.get("per_class")
    if not isinstance(classes, list) or not isinstance(per_class, dict):
        return False
    keys = ("precision", "recall", "f1", "support")
    return all(
        isinstance(per_class.get(c), dict) and all(_number(per_class[c].get(k)) for k in keys)
        for c in classes
    ) and isinstance(result.get("confusion_matrix"), list)


def test_results(run_dir: Path) -> dict | None:
    """eval-test.json when `evaluate --split test` wrote a usable one, else None."""
    path = Path(run_dir) / eval_file("test")
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found if usable_eval(found) and _number(found.get("n")) else None


def _card(value: str, label: str) -> str:
    return f"<div class=card><b>{_esc(value)}</b><span>{_esc(label)}</span></div>"


def near_duplicate_text(meta: dict) -> str:
    """One paragraph on the near-duplicate groups model.json records ("" for CIFAR runs)."""
    if meta.get("data_kind") != "folder":
        return ""
    found = meta.get("near_duplicates")
    keys = ("similarity", "groups", "images", "total_images")
    if not isinstance(found, dict) or not all(_number(found.get(k)) for k in keys):
        return (
            "<p>No near-duplicate groups are recorded for this run: its validation images were "
            "the folder's own <code>val/</code>, or the split was carved with "
            "<code>data.near_duplicates = 0</code> (or before the check existed), so photos of "
            "one series may sit on both sides and the validation figure may be optimistic.</p>"
        )
    if not found["groups"]:
        return (f"<p><b>Near-duplicates:</b> the perceptual hash (<code>data.near_duplicates = "
                f"{found['similarity']:g}</code>) found none among the {found['total_images']:g} "
                f"images: the carved split is the plain seeded one.</p>")  # fmt: skip
    examples = [e for e in found.get("examples", []) if isinstance(e, str)][:3]
    shown = "".join(f"<li><code>{_esc(e)}</code></li>" for e in examples)
    return (
        f"<p><b>Near-duplicates:</b> the perceptual hash (<code>data.near_duplicates = "
        f"{found['similarity']:g}</code>) found <b>{found['groups']:g}</b> group(s) of two or more "
        f"images, <b>{found['images']:g}</b> of the {found['total_images']:g} images; each group "
        f"was kept wholly in training or wholly in validation, so no image is validated against "
        f"its own twin.</p>" + (f"<p>Closest pairs:</p><ul>{shown}</ul>" if shown else "")
    )


def validation_section(run_dir: Path, meta: dict, evaluation: dict | None) -> str:
    """The section's HTML: validation (model.json, eval-val.json) beside test (eval-test.json)."""
    test = test_results(run_dir)
    val_acc, val_n = meta.get("val_acc"), meta.get("val_images")
    cards = []
    if _number(val_acc) and _number(val_n) and val_n:
        cards.append(_card(f"{val_acc:.2%}", f"validation, training's figure (model.json) "
                                             f"{interval_text(val_acc, val_n)}"))  # fmt: skip
    if evaluation and evaluation.get("split", "val") == "val":
        cards.append(_card(f"{evaluation['accuracy']:.2%}", "validation, evaluate (eval-val.json) "
                           + interval_text(evaluation["accuracy"], evaluation.get("n"))))
    if test is not None:
        cards.append(_card(f"{test['accuracy']:.2%}", "held-out test (eval-test.json) "
                           + interval_text(test["accuracy"], test["n"])))
    parts = ["<h2 id=validation>Validation and held-out test</h2>"]
    parts.append("<div class=cards>" + "".join(cards) + "</div>")
    if test is not None and _number(val_acc):
        gap = (val_acc - test["accuracy"]) * 100
        parts.append(
            f"<p>Validation is {abs(gap):.1f} points {'above' if gap >= 0 else 'below'} the "
            f"held-out test figure. The penalty or epoch was chosen on validation, so it reads a "
            f"little high; a gap well outside both intervals points at validation images that "
            f"resemble training images more than new photos do.</p>"
        )
    elif test is None:
        parts.append(
            f"<p>No held-out test figure yet: <code>cifar-transfer evaluate "
            f"{_esc(Path(run_dir).resolve())} --split test</code> scores the model on the data's "
            f"test split (a folder's <code>test/</code>, CIFAR's test batch) and writes "
            f"eval-test.json; the next report shows it here.</p>"
        )
    parts.append(near_duplicate_text(meta))
    return "\n".join(p for p in parts if p)
