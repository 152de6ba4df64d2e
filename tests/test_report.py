"""The run report as a person sees it: one self-contained HTML file, real figures, a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer.cli import main
from cifar_transfer.results.figures import curves_figure
from cifar_transfer.results.report import confident_mistakes, sample_indices

SECTIONS = (
    "Training curves", "Confusion matrix", "Per-class precision and recall", "Sample predictions",
    "Most confident mistakes", "Calibration", "Abstaining: coverage vs accuracy",
    "Suspected label errors", "Environment", "Resolved config",
)  # fmt: skip
FIGURES = (
    "curves", "confusion", "per-class", "samples", "mistakes", "reliability", "coverage", "suspects",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the finished, never-evaluated two-epoch cnn-baseline run, with its report built."""
    out = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("report") / "run"))
    # Text that must be shown, not run: the report escapes everything it copies from the run.
    with (out / "config.toml").open("a") as f:
        f.write('\n# a note with markup: <script>alert("x")</script> & <b>bold</b>\n')
    assert not (out / "eval-val.json").exists()
    assert main(["report", str(out)]) == 0
    return out


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def distinct_colours(pixels: np.ndarray) -> int:
    """How many different RGB values an (N, 3) uint8 array holds."""
    packed = (pixels[:, 0].astype(np.int32) << 16) | (pixels[:, 1].astype(np.int32) << 8) | pixels[:, 2]
    return len(np.unique(packed))


def parse(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


def test_report_is_one_self_contained_file_with_every_section(run):
    html = (run / "report.html").read_text()
    tags = parse(html)
    imgs = [attrs for tag, attrs in tags if tag == "img"]
    assert len(imgs) == len(FIGURES)
    assert all(a["src"].startswith("data:image/png;base64,") and a.get("alt") for a in imgs)
    for tag, attrs in tags:  # nothing fetched from anywhere: no src/href outside data: URIs
        for key in ("src", "href", "srcset", "data"):
            assert not attrs.get(key) or attrs[key].startswith("data:"), (tag, attrs)
    assert not any(tag in {"link", "iframe", "object", "embed"} for tag, _ in tags)
    assert not re.search(r"url\(|@import|https?://|file:", html)
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", html)
    assert all(any(h.startswith(s) for h in headings) for s in SECTIONS), headings
    # The config is there, escaped: its markup shows as text and never runs.
    assert 'recipe = &quot;cnn-baseline&quot;' in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold" in html
    assert "<script>alert" not in html and html.count("<script>") == 1  # the image check only
    # The environment, with the precision the model was validated at: bf16 or fp32 depending on
    # the CPU (precision "auto"), so read it from model.json instead of assuming one.
    precision = json.loads((run / "model.json").read_text())["precision"]
    assert precision in ("bf16", "fp32") and f"<td>{precision}</td>" in html
    assert "torch" in html and "cpu" in html


def test_figures_are_real_pngs_beside_the_report_and_the_same_as_embedded(run):
    html = (run / "report.html").read_text()
    embedded = [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    for name in FIGURES:
        data = (run / f"{name}.png").read_bytes()
        assert data in embedded, name
        img = Image.open(io.BytesIO(data)).convert("RGB")
        assert 450 <= img.width <= 2000 and 300 <= img.height <= 2500, (name, img.size)
        pixels = np.asarray(img).reshape(-1, 3)
        assert distinct_colours(pixels) > 50, name  # drawn, not a blank canvas
        assert (pixels.min(1) < 200).mean() > 0.02, name


def test_missing_eval_is_computed_and_written(run):
    saved = json.loads((run / "eval-val.json").read_text())
    assert saved["n"] == 100 and saved["split"] == "val" and len(saved["confusion_matrix"]) == 10
    assert sum(map(sum, saved["confusion_matrix"])) == 100
    html = (run / "report.html").read_text()
    assert f"{saved['accuracy']:.2%}" in html


def test_grids_pick_fixed_samples_and_the_most_confident_mistakes():
    assert sample_indices(100) == sample_indices(100) and len(set(sample_indices(100))) == 16
    assert sample_indices(5) == [0, 1, 2, 3, 4]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 1, 0])  # wrong: 1 (p .8), 2 (p .6), 3 (p .7)
    assert confident_mistakes(probs, labels) == [1, 3, 2]


def test_curves_name_every_phase_with_its_resolution():
    rows = [
        {"phase": p, "phase_name": name, "epoch": e, "train_loss": 1.0 / e, "train_acc": 0.1 * e,
         "val_loss": None if e == 1 else 1.2 / e, "val_acc": None if e == 1 else 0.09 * e,
         "lr": lr, "resolution": res, "seconds": 1.0}
        for e, (p, name, lr, res) in enumerate(
            [(0, "head", 0.1, 128)] * 2 + [(1, "full", 0.01, 128)] * 3 + [(2, "full-224", 1e-3, 224)],
            start=1,
        )
    ]
    fig = curves_figure(rows)
    loss_ax = fig.axes[0]
    labels = [t.get_text() for t in loss_ax.texts]
    assert labels == ["head\n128 px", "full\n128 px", "full-224\n224 px"]
    assert fig.axes[2].get_yscale() == "log"  # LR over two decades


def test_report_without_the_images_still_shows_curves_and_metrics(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in FIGURES:
        (copy / f"{name}.png").unlink()
    assert main(["report", str(copy), "--data-dir", str(tmp_path / "gone")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: the sample grids need") and "--data-dir" in captured.err
    html = (copy / "report.html").read_text()
    # curves, confusion, per-class, and from eval-val.json the reliability and coverage plots
    assert html.count("<img ") == 5 and "Not available without the images" in html
    assert not (copy / "samples.png").exists()


def test_report_of_a_non_run_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a run dir" in err[0]


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--disable-dev-shm-usage",
)  # fmt: skip


def test_report_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium when it can)")
    url = (run / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True, timeout=120, check=True,
    )
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    non_white = (img.min(2) < 235).mean()
    colours = distinct_colours(img.reshape(-1, 3))
    assert non_white > 0.10 and colours > 500, (non_white, colours)
    loaded, total, dom = images_decoded(common, url)
    assert loaded == total == len(FIGURES), dom[:300]


def images_decoded(chromium: list[str], url: str) -> tuple[int, int, str]:
    """(images decoded, images in the page, the DOM) of a report in headless Chromium: the
    report's own script counts the images that decoded; --dump-dom shows the result."""
    dom = subprocess.run(
        [*chromium, "--dump-dom", "--virtual-time-budget=5000", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    return (int(loaded.group(1)) if loaded else -1), (int(total.group(1)) if total else -2), dom


def test_an_edited_eval_json_never_reaches_the_report_as_markup(run, tmp_path):
    """A run dir someone sent: its eval-val.json holds markup where numbers belong. The report
    re-computes the evaluation instead of copying those values into the page."""
    sent = Path(shutil.copytree(run, tmp_path / "sent"))
    evil = json.loads((sent / "eval-val.json").read_text())
    first = evil["classes"][0]
    evil["per_class"][first]["support"] = "<img src=x onerror=alert(1)>"
    (sent / "eval-val.json").write_text(json.dumps(evil))
    assert main(["report", str(sent)]) == 0
    html = (sent / "report.html").read_text()
    assert "onerror" not in html and "<img src=x" not in html
    assert json.loads((sent / "eval-val.json").read_text())["per_class"][first]["support"] == 10


def test_report_gives_intervals_calibration_and_says_when_val_is_too_small(run, tmp_path):
    html = (run / "report.html").read_text()
    saved = json.loads((run / "eval-val.json").read_text())
    lo, hi = saved["accuracy_ci95"]
    assert f"95% CI {lo:.2%}-{hi:.2%}, 100 images" in html  # on the accuracy cards
    assert "too small to separate figures" in html  # 100 val images: +-11 points
    t = json.loads((run / "model.json").read_text())["temperature"]
    assert f"after (T = {t:.3f})" in html and "2-fold check" in html
    # An edited calibration part is never drawn or copied: the report evaluates again.
    sent = Path(shutil.copytree(run, tmp_path / "sent"))
    evil = json.loads((sent / "eval-val.json").read_text())
    evil["calibration"]["after"]["ece"] = "<b>0</b>"
    evil["suspected_label_errors"] = [{"index": 0, "given": 99, "suggested": 0}]
    (sent / "eval-val.json").write_text(json.dumps(evil))
    assert main(["report", str(sent)]) == 0
    assert "<b>0</b>" not in (sent / "report.html").read_text()
    assert json.loads((sent / "eval-val.json").read_text())["calibration"]["after"]["ece"] >= 0
