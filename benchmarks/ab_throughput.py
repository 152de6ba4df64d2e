"""Training throughput of two checkouts of this package, interleaved in one run (A B A B ...).

    python benchmarks/ab_throughput.py --a /tmp/before/src --b src --rounds 3 \
        --data-dir ../shared/cifar10/cifar-10-batches-py

Each round trains the same short run with each checkout's `cifar-transfer train` (fresh process,
same venv, PYTHONPATH pointing at that checkout's src/) and reads img/s of the fine-tuning epoch
(every layer trained: the full input path, forward, backward, optimizer), of the head epoch on
cached features, and of the feature extraction, from metrics.jsonl. Interleaving spreads a drifting machine over both sides; the
ratio B/A of the medians is the figure to report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [
    "model.backbone=efficientnet_lite0", "model.weights=none", "model.head=linear",
    "data.train_limit=2000", "data.val_size=500", "phases.0.epochs=1", "phases.1.epochs=1",
    "phases.*.batch_size=32", "phases.1.augment=crop-flip", "phases.*.resolution=64",
    "run.precision=fp32", "run.compile_features=off",
]  # fmt: skip


def one_run(src: Path, data_dir: str, out: Path) -> dict[str, float]:
    """img/s per phase of one short seed-native-32-shaped run with the package at `src`."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "CIFAR_TRANSFER_CACHE": str(out / "cache")}
    cmd = [sys.executable, "-m", "cifar_transfer.cli", "train", "--recipe", "seed-native-32",
           "--data-dir", data_dir, "--out", str(out / "run"), "--quiet"]
    for s in SETTINGS:
        cmd += ["--set", s]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {f"{r['phase_name']} img/s": r["img_per_s"] for r in rows}
    got["extraction img/s"] = 2500 / rows[0]["extract_seconds"]  # 2,000 train + 500 val images
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="src/ folder of checkout A (the baseline)")
    parser.add_argument("--b", required=True, help="src/ folder of checkout B")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b"):
            with tempfile.TemporaryDirectory() as tmp:
                got = one_run(Path(getattr(args, side)), args.data_dir, Path(tmp))
            results[side].append(got)
            print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
    for phase in results["a"][0]:
        a = statistics.median(x[phase] for x in results["a"])
        b = statistics.median(x[phase] for x in results["b"])
        print(f"{phase}: A {a:.1f}, B {b:.1f}, B/A {b / a:.3f} (medians of {args.rounds})")


if __name__ == "__main__":
    main()
