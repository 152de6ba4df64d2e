"""The argument parser of every subcommand (docs/reference/cli.md is generated from it)."""

from __future__ import annotations

import argparse

from cifar_transfer.cli.commands import (
    cmd_bench,
    cmd_calibrate,
    cmd_evaluate,
    cmd_export,
    cmd_predict,
    cmd_recipes,
    cmd_report,
    cmd_train,
)
from cifar_transfer.serving.cli import add_serve_parser, cmd_serve  # light: no FastAPI/torch


def _run_dir_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on a finished run: RUN_DIR, and --data-dir for where its images are now."""
    p = sub.add_parser(name, help=help)
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: the one the run trained on)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cifar-transfer",
        description="Transfer ImageNet CNNs to CIFAR-10: train, evaluate, report, predict, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list the shipped recipes, with their predicted wall time here")
    p.add_argument("--no-times", action="store_true",
                   help="skip the predicted wall times (no measurement of this machine)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a recipe into a run dir")
    p.add_argument(
        "--recipe",
        help="shipped recipe name or a .toml path (default: default; small-folder on a folder of "
        "class subfolders)",
    )
    p.add_argument(
        "--data-dir",
        help="cifar-10-batches-py or cifar-100-python folder (or its parent), or a folder of "
        "class subfolders (ROOT/<class>/*.jpg or ROOT/train/<class>/...)",
    )
    p.add_argument("--weights", help="imagenet | imagenet-v1 | none | PATH to .pth/.safetensors")
    p.add_argument("--out", help="run dir to create (default: runs/<recipe>-<time>)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. model.backbone=efficientnet_lite0 or phases.0.epochs=2",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument(
        "--budget", metavar="DURATION",
        help="train to a time budget (e.g. 20m, 1h): measure this machine, plan backbone, "
        "resolution, precision and epochs, stop cleanly at the deadline (plan in RUN_DIR/plan.json)",
    )  # fmt: skip
    p.add_argument(
        "--plan-only", action="store_true",
        help="with --budget: measure this machine, print the plan and the alternatives weighed, "
        "and stop (nothing trained, no run dir)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument(
        "--tensorboard", action="store_true",
        help="also log metrics to RUN_DIR/tensorboard (same as --set run.tensorboard=true)",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = _run_dir_command(sub, "evaluate", "accuracy, per-class metrics, confusion matrix")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    p.add_argument(
        "--min-confidence", type=float, metavar="P",
        help="also report coverage and accuracy when answering only above probability P",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = _run_dir_command(sub, "calibrate", "fit a finished run's temperature on its validation split")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="top classes of image files, folders or globs")
    p.add_argument("model", metavar="MODEL", help="run dir, model.safetensors, or an exported .onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders, or globs")
    p.add_argument("--top", type=int, default=3, help="how many classes to show (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument(
        "--min-confidence", type=float, metavar="P",
        help="label an image unknown unless its top probability is above P (0 to 1)",
    )  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = _run_dir_command(sub, "report", "plots and a self-contained report.html in the run dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="ONNX or TorchScript file that takes raw 32x32 images")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", help="file to write (default: RUN_DIR/model.onnx or model.pt)")
    p.add_argument("--data-dir", help="CIFAR-10 folder for the parity check (default: the run's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="throughput table (random-init weights, synthetic images)")
    p.add_argument("--backbones", default="resnet50", help="comma list (default resnet50)")
    p.add_argument("--resolutions", default="32,64,128,224", help="comma list of input sizes")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32,bf16")
    p.add_argument(
        "--modes", default="train,infer",
        help="comma list: train,infer,train-maps,infer-maps (the -maps modes: a cached partial "
        "phase's step on stored maps, and the frozen part alone; they need --freeze)",
    )
    p.add_argument("--freeze", default="none", help="as phases.N.freeze (default none), e.g. until:blocks4")
    p.add_argument("--memory-formats", default="channels_last", help="channels_last,nchw")
    p.add_argument(
        "--inputs", default="pipeline",
        help="pipeline,model: the training input path (index, crop+flip, resize, normalize) or "
        "a ready tensor (the model alone)",
    )
    p.add_argument("--compile", default="off", help="off,on: torch.compile the model (compiled untimed)")
    p.add_argument("--weights", default="none", help="none (random init) or as model.weights, e.g. imagenet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="time per cell (at least 2 steps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench)

    add_serve_parser(sub).set_defaults(func=cmd_serve)
    return parser
