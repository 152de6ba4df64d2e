"""Frozen-feature extraction: eager vs torch.compile (inductor, weight freezing), one run, as a ratio.

    .venv/bin/python benchmarks/compile_features.py [--backbone efficientnet_lite2] [--resolution 224] \
        [--precision fp32|bf16]

Random-init weights (speed does not depend on their values), synthetic uint8 images, the same
resize + normalize path as training (transforms.to_model_input). Not run by the tests.
"""

from __future__ import annotations

import argparse
import time

import torch

from cifar_transfer.models.transfer import create_model
from cifar_transfer.training.features import extract_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()
    model = create_model(args.backbone, "none", "linear").to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    rates = {}
    for compiled in (False, True):
        if compiled:  # one batch to compile, untimed (the cost is reported separately)
            t0 = time.perf_counter()
            extract_features(model, images[: args.batch_size], args.resolution, args.batch_size,
                             args.precision, True, "compile", compile_model=True)
            print(f"compile + first batch: {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        extract_features(model, images, args.resolution, args.batch_size, args.precision, True,
                         "compiled" if compiled else "eager", compile_model=compiled)
        rates[compiled] = args.images / (time.perf_counter() - t0)
        print(f"{'compiled' if compiled else 'eager':8s}: {rates[compiled]:.1f} img/s", flush=True)
    print(f"{args.backbone} at {args.resolution}px, {args.precision}, {torch.get_num_threads()} threads: "
          f"compiled/eager = {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
