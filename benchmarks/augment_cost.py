"""What each augmentation op costs on this machine: batches of 64 uint8 images at 32 and 224 px,
the op alone (data/augment.py, data/mixing.py), ms per batch and images per second.

    PYTHONPATH=src python benchmarks/augment_cost.py [--device cpu|cuda] [--threads N] [--batch 64]

Prints the machine (lscpu model name, whether avx512_bf16 is in its flags, torch threads), the
date, and a Markdown table (the one in BENCHMARKS.md and docs/guides/augmentation.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time

import torch

from cifar_transfer.data.augment import augment
from cifar_transfer.data.mixing import mix
from cifar_transfer.data.transforms import to_model_input

OPS = ["flip", "crop", "crop,flip", "rrc", "trivial", "randaugment", "jpeg:50-95",
       "rrc,flip,trivial", "mixup", "cutmix"]  # fmt: skip
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def machine() -> dict:
    """CPU model, avx512_bf16, threads, GPU (if any), date."""
    info = {"cpu": platform.processor() or "?", "avx512_bf16": False}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            if key.strip() == "Flags":
                info["avx512_bf16"] = "avx512_bf16" in value.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    info["threads"] = torch.get_num_threads()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info["torch"] = torch.__version__
    return info


def time_op(op: str, x: torch.Tensor, seconds: float) -> float:
    """Median ms per batch of `op` on x (at least 5 runs, about `seconds` in all)."""
    gen = torch.Generator().manual_seed(0)
    if op in ("mixup", "cutmix"):  # mixing runs on the float model inputs
        inputs = to_model_input(x, x.shape[-1], MEAN, STD)
        labels = torch.arange(len(x), device=x.device) % 10
        alphas = (0.2, 0.0) if op == "mixup" else (0.0, 1.0)

        def step() -> None:
            mix(inputs, labels, gen, *alphas).targets(10)
    else:

        def step() -> None:
            augment(x, op, gen)

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):  # warm-up (first calls build caches)
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per cell (at least 5 runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"# {info['cpu']} | avx512_bf16: {info['avx512_bf16']} | torch threads: {info['threads']}"
          f" | gpu: {info['gpu']} | torch {info['torch']} | {info['date']}")  # fmt: skip
    sizes = [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    batches = {
        s: torch.randint(0, 256, (args.batch, 3, s, s), generator=g, dtype=torch.uint8).to(args.device)
        for s in sizes
    }
    header = " | ".join(f"{s} px: ms/batch | {s} px: img/s" for s in sizes)
    print(f"| op | {header} |")
    print("|---|" + "---:|" * (2 * len(sizes)))
    rows = []
    for op in OPS:
        cells = []
        for s in sizes:
            ms = time_op(op, batches[s], args.seconds)
            cells.append((s, ms, args.batch / ms * 1000))
        rows.append({"op": op, "cells": cells})
        text = " | ".join(f"{ms:.2f} | {ips:,.0f}" for _, ms, ips in cells)
        print(f"| `{op}` | {text} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
