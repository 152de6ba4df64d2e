"""The `cifar-transfer` command: parse, call one function, print. Errors are one line (--debug: traceback)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cifar_transfer.errors import UserError


def _cmd_recipes(args: argparse.Namespace) -> int:
    from cifar_transfer.config import load_recipe, recipe_names

    timer = None
    if not args.no_times:
        from cifar_transfer import budget, hardware, measure

        device = hardware.pick_device("auto")
        tput = measure.Throughputs(device, seconds=0.5)
        print(f"predicted wall time on {measure.describe_machine(device)} (CIFAR-10, measured "
              f"small batches: an estimate; --no-times to skip)", file=sys.stderr)

        def timer(cfg):
            return "~" + budget.format_seconds(measure.recipe_time(cfg, device, tput))
    for name in recipe_names():
        cfg = load_recipe(name)
        epochs = "+".join(str(p.epochs) for p in cfg.phases)
        wall = f"{timer(cfg):9s} " if timer else ""
        print(f"{name:22s} {cfg.model.backbone:18s} epochs {epochs:8s} {wall}{cfg.description}",
              flush=True)
    return 0


def _budgeted(args: argparse.Namespace, cfg, overrides: list[str], t_start: float, folder: bool):
    """--budget: measure, plan, print the plan; returns (config, deadline, plan.json writer).

    `folder`: cfg is the folder recipe (no --recipe, --data-dir holds class folders); its model
    and probe are kept, the plan only adds fine-tuning."""
    from cifar_transfer import budget, hardware, measure
    from cifar_transfer.checkpoint import atomic_write_json
    from cifar_transfer.config import apply_overrides, load_recipe
    from cifar_transfer.pacing import Deadline

    budget_s = budget.parse_duration(args.budget)
    phase_sets = [o for o in overrides if o.strip().startswith("phases.")]
    cfg = apply_overrides(cfg, [o for o in overrides if o not in phase_sets])
    if not any(o.strip().startswith("run.tta") for o in overrides):
        cfg.run.tta = "auto"  # the best model in the time: flip TTA when it validates better
    fixed = bool(args.recipe) or folder or any(
        o.strip().startswith(("model.backbone", "model.resolution")) for o in overrides)
    hardware.set_threads(cfg.run.threads)
    device = hardware.pick_device(cfg.run.device)
    plan, speeds = measure.plan_this_machine(cfg, budget_s, device, fixed, time.monotonic() - t_start)
    fast = load_recipe("fast-cpu").phases
    cfg = budget.apply_plan(cfg, plan, [cfg.phases[0] if folder else fast[0], fast[1]])
    cfg.recipe = f"{args.recipe}-budget" if args.recipe else "budget"
    cfg = apply_overrides(cfg, phase_sets)
    now = dt.datetime.now()
    finish = now + dt.timedelta(seconds=plan.predicted_seconds - (time.monotonic() - t_start))
    for line in plan.lines() + (plan.alternative_lines() if args.plan_only else []):
        print(line, flush=True)
    if args.plan_only:
        print(f"on {measure.describe_machine(device)}; --plan-only: nothing trained", flush=True)
        return cfg, None, None
    print(f"predicted finish {finish:%H:%M:%S}, budget ends "
          f"{now + dt.timedelta(seconds=budget_s - (time.monotonic() - t_start)):%H:%M:%S}", flush=True)
    doc = {
        "budget": args.budget, "budget_seconds": budget_s, "machine": measure.describe_machine(device),
        "started": (now - dt.timedelta(seconds=time.monotonic() - t_start)).isoformat(timespec="seconds"),
        "predicted_finish": finish.isoformat(timespec="seconds"), "plan": plan.to_dict(),
        "measured_img_per_s": speeds,
    }  # fmt: skip
    # After the deadline: loading the best weights, flip TTA's pass over the mirror images, the
    # temperature fit (on the logits the kept epoch's validation computed) and the bundle.
    reserve = 2.0 + 0.01 * budget_s + plan.tta_seconds
    deadline = Deadline(t_start + budget_s - reserve)
    return cfg, deadline, lambda out: atomic_write_json(out / "plan.json", doc)


def _cmd_train(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    from cifar_transfer import distributed, train
    from cifar_transfer.config import apply_overrides, load_recipe
    from cifar_transfer.datasets import default_recipe

    if args.resume:
        if args.recipe or args.overrides or args.weights or args.tensorboard or args.budget \
                or args.plan_only:
            raise UserError(
                "--resume continues a run with its saved config: drop "
                "--recipe/--set/--weights/--tensorboard/--budget/--plan-only (--data-dir is allowed: where "
                "the run's images are now)"
            )
        out = args.run_out = Path(args.resume)
        summary = train.resume(out, progress=not args.quiet, data_dir=args.data_dir)
    else:
        if args.plan_only and not args.budget:
            raise UserError("--plan-only prints a --budget run's plan: add --budget DURATION, e.g. 20m")
        # --budget without a recipe: fast-cpu's model and phases on CIFAR; on a folder, the folder
        # recipe's model, data settings and probe (a few hundred images: its probe is the model
        # to beat), then fast-cpu's fine-tuning phase if the budget leaves time for it.
        default = None if args.recipe else default_recipe(args.data_dir)
        folder = default not in (None, "default")
        cfg = load_recipe(args.recipe or ("fast-cpu" if args.budget and not folder else default))
        overrides = list(args.overrides)
        if args.data_dir:
            overrides.append(f"data.data_dir={args.data_dir}")
        if args.weights:
            overrides.append(f"model.weights={args.weights}")
        if args.tensorboard:
            overrides.append("run.tensorboard=true")
        deadline, write_plan = None, None
        if args.budget:
            if distributed.launched():
                raise UserError("--budget plans a run of one process: start it without torchrun")
            cfg, deadline, write_plan = _budgeted(args, cfg, overrides, t_start, folder)
            if args.plan_only:
                return 0
        else:
            cfg = apply_overrides(cfg, overrides)
        if cfg.data.data_dir:  # saved with the run: relative, it would name another folder elsewhere
            cfg.data.data_dir = os.path.abspath(os.path.expanduser(cfg.data.data_dir))
        if distributed.launched() and not args.out:
            raise UserError("under torchrun every process writes the same run dir: pass --out RUN_DIR")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.run_out = Path(args.out) if args.out else Path("runs") / f"{cfg.recipe}-{stamp}"
        def on_start(d: Path) -> None:  # once config, data and model are checked
            if write_plan is not None:
                write_plan(d)
            print(f"run dir: {d}", flush=True)

        # Printed once config, data and model are checked: a refused run prints only its error.
        summary = train.train(cfg, out, progress=not args.quiet, on_start=on_start, deadline=deadline)
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    acc = summary["val_acc"]
    score = "no validation split" if acc is None else f"val_acc {acc:.4f} (epoch {summary['best_epoch']})"
    if summary.get("tta") == "flip":
        score += f" with flip TTA ({summary['val_acc_single_view']:.4f} single view)"
    print(f"done: {score}, model in {out / 'model.safetensors'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cifar_transfer.runs import evaluate_run, evaluation_lines

    result = evaluate_run(
        Path(args.run_dir), args.split, args.data_dir, tta=args.tta, min_confidence=args.min_confidence
    )
    print("\n".join(evaluation_lines(result)) + f"\nwrote {result['path']}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from cifar_transfer.runs import calibrate_run, evaluation_lines

    result = calibrate_run(Path(args.run_dir), args.data_dir)
    print("\n".join(evaluation_lines(result)))
    print(f"wrote temperature {result['calibration']['temperature']:.4f} into {result['path']}")
    for path in result["stale_exports"]:
        print(f"note: {path} holds the old temperature: export it again", file=sys.stderr)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cifar_transfer.calibration import check_min_confidence
    from cifar_transfer.predict import iter_predictions, load_predictor

    check_min_confidence(args.min_confidence)
    predictor = load_predictor(args.model)
    batches = iter_predictions(predictor, args.images, top_k=args.top, batch_size=args.batch_size)
    failed, opening = 0, "[\n"
    for batch in batches:  # printed as each batch is done: a long run shows its progress
        for pred in batch:
            if pred.error:
                failed += 1
                print(f"error: {pred.path}: {pred.error}", file=sys.stderr)
            if args.json:  # one JSON array, written item by item
                entry = pred.to_json(args.min_confidence)
                print(opening + textwrap.indent(json.dumps(entry, indent=2), "  "), end="")
                opening = ",\n"
            elif not pred.error:
                unknown = "unknown: " if pred.label(args.min_confidence) is None else ""
                print(f"{pred.path}: {unknown}" + ", ".join(f"{name} {p:.3f}" for name, p in pred.top))
        sys.stdout.flush()
    if args.json:
        print("\n]")
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cifar_transfer.report import build_report

    result = build_report(Path(args.run_dir), args.data_dir)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {result['path']} and {len(result['figures'])} PNGs beside it")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cifar_transfer.export import export_run

    r = export_run(Path(args.run_dir), args.format, args.out, args.data_dir)
    print(
        f"parity on {r['n']} validation images: max |logit diff| {r['max_abs_diff']:.2e}, "
        f"top-1 agrees {r['top1_agree']}/{r['n']}; also checked {', '.join(r['also_checked'])}"
    )
    print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB, {args.format})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cifar_transfer import hardware
    from cifar_transfer.bench import INPUTS, run_bench
    from cifar_transfer.checkpoint import atomic_write_json

    choices = {
        "--precisions": (args.precisions, ("fp32", "bf16")), "--modes": (args.modes, ("train", "infer")),
        "--memory-formats": (args.memory_formats, ("channels_last", "nchw")),
        "--inputs": (args.inputs, INPUTS), "--compile": (args.compile, ("off", "on")),
    }  # fmt: skip
    for flag, (given, valid) in choices.items():
        bad = [v for v in given.split(",") if v not in valid]
        if bad:
            raise UserError(f"bad value for {flag}: {','.join(bad)}: use a comma list of {','.join(valid)}")
    hardware.set_threads(args.threads)
    rows = run_bench(
        args.backbones.split(","), [int(r) for r in args.resolutions.split(",")],
        args.precisions.split(","), args.modes.split(","), args.batch_size, args.seconds, args.device,
        tuple(args.memory_formats.split(",")), tuple(args.inputs.split(",")),
        tuple(v == "on" for v in args.compile.split(",")), args.weights,
    )
    if args.json:
        atomic_write_json(Path(args.json), rows)
        print(f"wrote {args.json}")
    return 0


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
    p.set_defaults(func=_cmd_recipes)

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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: the one the run trained on)")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    p.add_argument(
        "--min-confidence", type=float, metavar="P",
        help="also report coverage and accuracy when answering only above probability P",
    )  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit a finished run's temperature on its validation split")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: the one the run trained on)")
    p.set_defaults(func=_cmd_calibrate)

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
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("report", help="plots and a self-contained report.html in the run dir")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: the one the run trained on)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="ONNX or TorchScript file that takes raw 32x32 images")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", help="file to write (default: RUN_DIR/model.onnx or model.pt)")
    p.add_argument("--data-dir", help="CIFAR-10 folder for the parity check (default: the run's)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="throughput table (random-init weights, synthetic images)")
    p.add_argument("--backbones", default="resnet50", help="comma list (default resnet50)")
    p.add_argument("--resolutions", default="32,64,128,224", help="comma list of input sizes")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32,bf16")
    p.add_argument("--modes", default="train,infer", help="comma list: train,infer")
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
    p.set_defaults(func=_cmd_bench)

    from cifar_transfer.serving.cli import add_serve_parser, cmd_serve  # light: no FastAPI/torch

    add_serve_parser(sub).set_defaults(func=cmd_serve)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM raised in the main thread, so it unwinds exactly like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """For the command's life, SIGTERM (a scheduler's preemption, `docker stop`, torchrun stopping
    workers) ends it like Ctrl-C: the checkpoint stays whole, the lock is released, one line."""
    if threading.current_thread() is not threading.main_thread():  # signal() works there only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupted_line(args: argparse.Namespace) -> str:
    """What to do after an interrupt: train names its run dir once it holds a config to resume."""
    out = getattr(args, "run_out", None)
    if args.command == "train" and out is not None and (out / "config.toml").is_file():
        return f"interrupted: continue with `cifar-transfer train --resume {out}`"
    return "interrupted"


def _out_of_memory(e: BaseException) -> bool:
    """True for torch's and the allocators' out-of-memory errors, on any device."""
    torch = sys.modules.get("torch")  # never imported just for this check
    if isinstance(e, MemoryError) or (torch and isinstance(e, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "DefaultCPUAllocator" in str(e)
    )


# What to lower when memory runs out; evaluate, report and export use the run's own settings.
_MEMORY_FIX = {
    "train": "lower --set phases.N.batch_size, run.eval_batch_size or the resolution "
    "(model.resolution, phases.N.resolution) and start the run again",
    "predict": "lower --batch-size (default 64)",
}
_MEMORY_FIX_OTHERS = (
    "close what else uses the memory, or lower run.eval_batch_size in the run's config.toml"
)


def _memory_line(e: BaseException, command: str) -> str:
    """One line for an out-of-memory error: its first line and the setting to lower."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return f"out of memory ({first}): {_MEMORY_FIX.get(command, _MEMORY_FIX_OTHERS)}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cifar-transfer` console script."""
    args = build_parser().parse_args(argv)
    from cifar_transfer.allocator import keep_freed_memory

    keep_freed_memory()  # measured 1.1-1.7x on CPU steps (page faults); see its docstring
    for stream in (sys.stdout, sys.stderr):
        # File names that are not UTF-8 arrive as surrogate escapes (PEP 383): print them as
        # \udcXX, as Python's own stderr does, instead of failing with UnicodeEncodeError.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        with _sigterm_as_interrupt():
            code = args.func(args)
            sys.stdout.flush()  # a reader gone away shows up here, inside the handlers below
        return code
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(_interrupted_line(args), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    except BrokenPipeError:
        # `predict ... | head`: the reader left. Stop quietly, and point stdout at devnull so the
        # flush at exit cannot fail again (the recipe of Python's signal module docs).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a writer stopped by a closed pipe
    except Exception as e:
        if args.debug or not _out_of_memory(e):
            raise
        print(f"error: {_memory_line(e, args.command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
