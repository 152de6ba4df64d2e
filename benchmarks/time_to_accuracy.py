"""Time to a validation accuracy: run a recipe end to end, then read when each target was reached.

    .venv/bin/python benchmarks/time_to_accuracy.py --recipe fast-cpu --data-dir ../shared/cifar10 \
        --out runs/tta-fast-cpu [--set phases.finetune.epochs=4] [--targets 0.90 0.95] \
        [--fresh-cache] [--json runs/tta-fast-cpu.json]
    .venv/bin/python benchmarks/time_to_accuracy.py --run-dir runs/fast-cpu-1 --targets 0.90 0.95

The first form times `cifar-transfer train` as a child process (interpreter start, imports, data
load, feature extraction, every epoch, the final save) and then reads the run's metrics.jsonl.
`--fresh-cache` gives it an empty feature cache, so extraction is paid as a new user pays it.
The second form only reads an existing run dir. Each metrics row carries `elapsed_seconds`
(wall time since the trainer started building, over resumed sessions); rows from runs older
than that field fall back to the sum of epoch and extraction times, which leaves out data load.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows with an `elapsed` (seconds) and whether it was measured or summed."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a run dir that has trained at least one epoch")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    total = 0.0
    for r in rows:
        total += r.get("seconds", 0.0) + r.get("extract_seconds", 0.0)
        r["elapsed"], r["measured"] = (
            (r["elapsed_seconds"], True) if "elapsed_seconds" in r else (total, False)
        )
    return rows


def reached(rows: list[dict], targets: list[float]) -> list[dict]:
    """For each target, the first epoch whose val_acc reached it (None where none did)."""
    out = []
    for t in targets:
        hit = next((r for r in rows if r.get("val_acc") is not None and r["val_acc"] >= t), None)
        out.append({
            "target": t,
            "epoch": hit["epoch"] if hit else None,
            "phase": hit.get("phase_name", hit["phase"]) if hit else None,
            "phase_epoch": hit.get("phase_epoch") if hit else None,
            "elapsed_seconds": hit["elapsed"] if hit else None,
            "val_acc": hit["val_acc"] if hit else None,
        })  # fmt: skip
    return out


def minutes(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)} min {s % 60:04.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", help="train this recipe (with --out)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--data-dir", help="CIFAR-10 folder, as for cifar-transfer train")
    ap.add_argument("--out", type=Path, help="the new run dir")
    ap.add_argument("--run-dir", type=Path, help="only read this existing run dir")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.95, 0.97])
    ap.add_argument("--fresh-cache", action="store_true", help="an empty feature cache for the run")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    if bool(args.run_dir) == bool(args.recipe):
        ap.error("give either --recipe (with --out) or --run-dir")

    wall = None
    run_dir = args.run_dir
    if args.recipe:
        if args.out is None:
            ap.error("--recipe needs --out")
        cmd = [sys.executable, "-m", "cifar_transfer", "train", "--recipe", args.recipe,
               "--out", str(args.out)]  # fmt: skip
        for kv in args.set:
            cmd += ["--set", kv]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        env = dict(os.environ)
        with tempfile.TemporaryDirectory(prefix="tta-cache-") as cache:
            if args.fresh_cache:
                env["CIFAR_TRANSFER_CACHE"] = cache
            t0 = time.perf_counter()
            code = subprocess.run(cmd, env=env, check=False).returncode
            wall = time.perf_counter() - t0
        if code != 0:
            print(f"error: training exited with {code} after {minutes(wall)}", file=sys.stderr)
            return code
        run_dir = args.out

    rows = read_rows(run_dir)
    hits = reached(rows, args.targets)
    print(f"\nrun dir: {run_dir}")
    if not all(r["measured"] for r in rows):
        print("(an older run without elapsed_seconds: times are sums of epoch times, data load left out)")
    print(f"{'epoch':>5}  {'phase':<10} {'px':>4}  {'val_acc':>8}  elapsed")
    for r in rows:
        acc = "-" if r.get("val_acc") is None else f"{100 * r['val_acc']:.2f}%"
        name = str(r.get("phase_name", r["phase"]))
        print(f"{r['epoch']:>5}  {name:<10} {r.get('resolution', ''):>4}  {acc:>8}  {minutes(r['elapsed'])}")
    print()
    for h in hits:
        where = f"epoch {h['epoch']} ({h['phase']} {h['phase_epoch']})" if h["epoch"] else "not reached"
        print(f"time to {100 * h['target']:.0f}%: {minutes(h['elapsed_seconds'])}  {where}")
    if wall is not None:
        print(f"wall time, end to end (process start to exit): {minutes(wall)}")
    if args.json:
        result = {
            "run_dir": str(run_dir), "recipe": args.recipe, "overrides": args.set,
            "fresh_cache": args.fresh_cache, "wall_seconds": wall, "targets": hits,
            "final_val_acc": rows[-1].get("val_acc"), "epochs": len(rows),
            "elapsed_measured": all(r["measured"] for r in rows),
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
