"""Cached partial fine-tuning against the same phase uncached, in one invocation (issue 24).

Two runs of `fast-cpu` that differ only in `phases.1.cache_frozen`: the probe (shared: its
features come from the cache the first run fills), then E epochs of partial fine-tuning with the
same freeze, augmentation, schedule and seed. Prints and writes (--json) each run's epoch
seconds, its extraction seconds, its val_acc per epoch, and the ratios: a cached epoch's time
over an uncached one's (the issue's <= 0.4x), and with the one-off extraction spread over E.

    python benchmarks/cached_partial.py --data-dir ../shared/cifar10 --train-limit 10000 \
        --epochs 3 --backbone efficientnet_lite0 --resolution 160 --freeze until:blocks4 \
        --out runs/cached-partial --json runs/cached-partial.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cifar_transfer.artifacts import rundir
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.system.allocator import keep_freed_memory
from cifar_transfer.training.run import train


def one_run(args: argparse.Namespace, cached: bool) -> dict:
    """Train fast-cpu's probe + E partial epochs, cached or not; its figures from metrics.jsonl."""
    out = Path(args.out) / ("cached" if cached else "uncached")
    cfg = apply_overrides(load_recipe("fast-cpu"), [
        f"data.data_dir={args.data_dir}", f"data.train_limit={args.train_limit}",
        f"model.backbone={args.backbone}", f"model.resolution={args.resolution}",
        f"phases.1.freeze={args.freeze}", f"phases.1.epochs={args.epochs}",
        f"phases.1.precision={args.precision}", f"phases.1.batch_size={args.batch_size}",
        f"phases.1.augment={args.augment}", f"phases.1.cache_frozen={str(cached).lower()}",
        f"run.tta={args.tta}", *args.set,
    ])  # fmt: skip
    t0 = time.perf_counter()
    summary = train(cfg, out, progress=not args.quiet)
    wall = time.perf_counter() - t0
    rows = [r for r in rundir.read_metrics(out) if r["phase"] == 1]
    return {
        "cached": cached, "wall_seconds": round(wall, 1), "val_acc": summary["val_acc"],
        "epoch_seconds": [round(r["seconds"], 1) for r in rows],
        "extract_seconds": round(rows[0].get("extract_seconds", 0.0), 1) if rows else 0.0,
        "val_acc_by_epoch": [r["val_acc"] for r in rows],
        "img_per_s": [round(r["img_per_s"], 1) for r in rows],
    }


def main() -> None:
    """Both runs, then the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="runs/cached-partial")
    p.add_argument("--json")
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=160)
    p.add_argument("--freeze", default="until:blocks4")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", default="crop,flip")
    p.add_argument("--tta", default="off")
    p.add_argument("--only", choices=("cached", "uncached"), help="one of the two runs")
    p.add_argument("--set", action="append", default=[], help="more KEY=VALUE for both runs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    keep_freed_memory()  # as the cifar-transfer command does
    runs = [one_run(args, cached) for cached in (False, True)
            if args.only is None or args.only == ("cached" if cached else "uncached")]
    result = {"args": vars(args), "runs": runs}
    if len(runs) == 2:
        plain, cached = runs
        per = sum(cached["epoch_seconds"]) / max(1e-9, sum(plain["epoch_seconds"]))
        whole = (sum(cached["epoch_seconds"]) + cached["extract_seconds"]) / max(1e-9, sum(plain["epoch_seconds"]))
        result.update(epoch_ratio=round(per, 3), ratio_with_extraction=round(whole, 3))
        print(f"cached epoch / uncached epoch: {per:.3f}x; with the extraction: {whole:.3f}x")
    for r in runs:
        print(f"{'cached' if r['cached'] else 'uncached'}: val_acc {r['val_acc']:.4f} by epoch "
              f"{r['val_acc_by_epoch']}, epochs {r['epoch_seconds']} s, extraction {r['extract_seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
