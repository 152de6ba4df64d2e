"""A model's accuracy on its own validation split, lossless and as JPEG copies, side by side
(issue 23: users' photos are JPEGs; CIFAR-10's images are not).

    .venv/bin/python benchmarks/jpeg_robustness.py RUN_DIR [RUN_DIR ...] [--quality 75] \
        [--data-dir ../shared/cifar10] [--json out.json]

For each run dir: the run's validation split re-created from its config (rundir.run_split),
each image encoded as a JPEG at `--quality` with PIL (4:2:0 chroma subsampling, PIL's default,
as cameras and most photo tools write) and decoded again, then both sets scored by the bundle
through `results.runs.predict_split` (the bundle's resolution, precision, temperature and flip
TTA: what `evaluate` prints). Prints overall and per-class accuracy, lossless vs JPEG, and the
drop. Not run by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_transfer.artifacts.bundle import read_meta
from cifar_transfer.artifacts.rundir import WEIGHTS, run_split
from cifar_transfer.results.runs import predict_split
from cifar_transfer.training.measure import describe_machine


def jpeg_copies(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the same images after a JPEG round trip at `quality`."""
    out = torch.empty_like(images)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out


def per_class(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    right = logits.argmax(1) == labels
    return {c: float(right[labels == k].float().mean()) for k, c in enumerate(classes)}


def score(run_dir: Path, quality: int, data_dir: str | None) -> dict:
    meta = read_meta(run_dir / WEIGHTS)
    split = run_split(run_dir, data_dir, "val", purpose="scoring")
    t0 = time.perf_counter()
    jpeg = dataclasses.replace(split, images=jpeg_copies(split.images, quality))
    encode_s = time.perf_counter() - t0
    tta = meta.get("tta") == "flip"
    out = {"run": str(run_dir), "n": len(split.labels), "quality": quality, "tta": tta,
           "jpeg_seconds": round(encode_s, 1)}
    for name, s in (("lossless", split), ("jpeg", jpeg)):
        preds = predict_split(run_dir, s, tta=tta)
        out[name] = {
            "accuracy": float((preds.logits.argmax(1) == s.labels).float().mean()),
            "per_class": per_class(preds.logits, s.labels, s.classes),
        }
    out["drop"] = out["lossless"]["accuracy"] - out["jpeg"]["accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--data-dir")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        r = score(run, args.quality, args.data_dir)
        results.append(r)
        print(f"{run}: lossless {r['lossless']['accuracy']:.4f}, JPEG q{args.quality} "
              f"{r['jpeg']['accuracy']:.4f} (drop {r['drop'] * 100:.2f} points, n={r['n']}, "
              f"flip TTA {'on' if r['tta'] else 'off'})")
        for c in r["lossless"]["per_class"]:
            a, b = r["lossless"]["per_class"][c], r["jpeg"]["per_class"][c]
            print(f"  {c:>12}: {a:.4f} -> {b:.4f} ({(b - a) * 100:+.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": describe_machine(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"), "results": results},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
