"""One factor at a time: a photo folder's fine-tuning phase from the same probe, fixed epochs
(issue 31: does the fine-tune start below the probe it is initialised from, and why).

    .venv/bin/python benchmarks/finetune_ablation.py RUN_DIR --data-dir ROOT --out OUT \
        [--epochs 3] [--only "NAME;NAME"] [--variant 'NAME=KEY=VALUE;KEY=VALUE' ...]

RUN_DIR is a `train --data-dir ROOT --budget ...` run: its config.toml is the recipe (probe,
then the planned cached fine-tune), so every variant reads the same cached maps and probe
features and fits the same probe. Each variant is that recipe with `--set` overrides only, its
fine-tuning phase cut to `--epochs` full epochs (no deadline, no TTA), run one after the other
into OUT/NAME. Prints and writes (OUT/ablation.json) a table: the probe's val_acc, then each
fine-tuning epoch's val_acc and train_acc. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cifar_transfer.artifacts.rundir import read_metrics
from cifar_transfer.recipes import load_recipe

# The factors, on the planned fine-tune (phase 1). The planned lr is the run's own.
VARIANTS: dict[str, list[str]] = {
    "as planned (BN train)": [],
    "BN eval, lr x1/10": ["phases.1.batchnorm=eval", "LR*0.1"],
    "BN eval, lr x1/3": ["phases.1.batchnorm=eval", "LR*0.333"],
    "BN eval, lr x1/30": ["phases.1.batchnorm=eval", "LR*0.0333"],
    "BN eval, lr x1/10, no warmup": ["phases.1.batchnorm=eval", "LR*0.1", "phases.1.warmup_epochs=0"],
    "BN eval, lr x1/10, warmup 0.5": ["phases.1.batchnorm=eval", "LR*0.1", "phases.1.warmup_epochs=0.5"],
    "BN eval, lr x1/10, no map aug": ["phases.1.batchnorm=eval", "LR*0.1", "phases.1.augment=none"],
    "BN eval, lr x1/10, smoothing 0": ["phases.1.batchnorm=eval", "LR*0.1", "phases.1.label_smoothing=0"],
    "BN eval, lr x1/10, no layer decay": ["phases.1.batchnorm=eval", "LR*0.1", "phases.1.layer_decay=1"],
    "BN eval, lr x1/10, EMA 0.99": ["phases.1.batchnorm=eval", "LR*0.1", "run.ema=0.99"],
    "BN train, lr find": ["phases.1.batchnorm=train", "phases.1.lr=find"],
    "BN eval, lr find": ["phases.1.batchnorm=eval", "phases.1.lr=find"],
    "BN auto, lr find": ["phases.1.batchnorm=auto", "phases.1.lr=find"],
    "BN auto, lr find, EMA 0.99": ["phases.1.batchnorm=auto", "phases.1.lr=find", "run.ema=0.99"],
}


def sets_for(items: list[str], lr: float) -> list[str]:
    """`LR*f` items become phases.1.lr = the planned lr times f."""
    return [f"phases.1.lr={lr * float(i[3:]):.3g}" if i.startswith("LR*") else i for i in items]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", default="", help="variant names separated by ; (default: all)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE")
    args = ap.parse_args()
    recipe = args.run_dir / "config.toml"
    lr = load_recipe(str(recipe)).phases[1].lr
    variants = dict(VARIANTS)
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[name] = [s for s in sets.split(";") if s]
    if args.only:
        wanted = [n.strip() for n in args.only.split(";")]
        variants = {n: variants[n] for n in wanted}
    rows = []
    for name, items in variants.items():
        out = args.out / name.replace(" ", "_").replace(",", "").replace("/", "-")
        sets = [f"phases.1.epochs={args.epochs}", f"phases.1.schedule_epochs={args.epochs}", "run.tta=off",
                *sets_for(items, lr)]
        cmd = [sys.executable, "-m", "cifar_transfer", "train", "--recipe", str(recipe), "--data-dir",
               args.data_dir, "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
        t0 = time.time()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        metrics = read_metrics(out)
        probe = max(r["val_acc"] for r in metrics if r["phase"] == 0)
        tune = [r for r in metrics if r["phase"] == 1]
        row = {"variant": name, "sets": sets, "probe_val": probe,
               "val": [r["val_acc"] for r in tune], "train": [r["train_acc"] for r in tune],
               "lr": tune[0]["lr"] if tune else None, "wall_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name:38s} probe {probe:.4f} | val " + " ".join(f"{v:.4f}" for v in row["val"])
              + " | train " + " ".join(f"{v:.3f}" for v in row["train"]) + f" | {row['wall_s']:.0f}s",
              flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
