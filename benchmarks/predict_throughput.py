"""`predict` throughput, PyTorch vs onnxruntime, on the same PNG files, in one run (issue 4).

    .venv/bin/python benchmarks/predict_throughput.py RUN_DIR MODEL.onnx \
        [--data-dir ../shared/cifar10] [--images 512] [--batch-size 64]

Writes `--images` CIFAR-10 training images as PNG files into a temporary folder, then times
`predict_paths` end to end (file decoding, batching, resize + normalize, model, softmax, top-3)
with the run's PyTorch bundle (fp32, channels_last) and with its exported ONNX file
(`cifar-transfer export RUN_DIR --format onnx`), one warm-up pass each. Not run by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cifar_transfer.data.cifar10 import load_split, resolve_data_dir
from cifar_transfer.results.predict import load_predictor, predict_paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("onnx")
    ap.add_argument("--data-dir", default="../shared/cifar10")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    images, _ = load_split(resolve_data_dir(args.data_dir), "train")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.images):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(Path(tmp) / f"{i:05d}.png")
        rates, tops = {}, {}
        for name, model in (("pytorch", args.run_dir), ("onnxruntime", args.onnx)):
            predictor = load_predictor(model)
            predict_paths(predictor, [tmp], 3, args.batch_size)  # warm-up
            t0 = time.perf_counter()
            preds = predict_paths(predictor, [tmp], 3, args.batch_size)
            rates[name] = args.images / (time.perf_counter() - t0)
            tops[name] = [p.top[0][0] for p in preds]
            print(f"{name:12s}: {rates[name]:8.1f} img/s", flush=True)
    agree = sum(a == b for a, b in zip(tops["pytorch"], tops["onnxruntime"]))
    print(
        f"{args.images} PNG files, batch {args.batch_size}, {torch.get_num_threads()} threads: "
        f"onnxruntime/pytorch = {rates['onnxruntime'] / rates['pytorch']:.2f}x; "
        f"top-1 agrees on {agree}/{args.images}"
    )


if __name__ == "__main__":
    main()
