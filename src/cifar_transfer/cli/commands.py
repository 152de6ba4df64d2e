"""What each subcommand does: read its arguments, call one library function, print."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from cifar_transfer.system.errors import UserError


def cmd_recipes(args: argparse.Namespace) -> int:
    from cifar_transfer.recipes import load_recipe, recipe_names

    timer = None
    if not args.no_times:
        from cifar_transfer.system import hardware
        from cifar_transfer.training import budget, measure

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
    from cifar_transfer.recipes import apply_overrides, load_recipe
    from cifar_transfer.system import hardware
    from cifar_transfer.system.atomic import atomic_write_json
    from cifar_transfer.training import budget, measure
    from cifar_transfer.training.pacing import Deadline
    from cifar_transfer.training.priors import PHOTO_PREDICTION

    budget_s = budget.parse_duration(args.budget)
    phase_sets = [o for o in overrides if o.strip().startswith("phases.")]
    cfg = apply_overrides(cfg, [o for o in overrides if o not in phase_sets])
    if not any(o.strip().startswith("run.tta") for o in overrides):
        cfg.run.tta = "auto"  # the best model in the time: flip TTA when it validates better
    fixed = bool(args.recipe) or folder or any(
        o.strip().startswith(("model.backbone", "model.resolution")) for o in overrides)
    hardware.set_threads(cfg.run.threads)
    device = hardware.pick_device(cfg.run.device)
    fast = load_recipe("fast-cpu").phases
    probe_t = cfg.phases[0] if folder else fast[0]  # the probe the plan starts with
    # A folder's recipe brings its own fine-tuning settings, made for photos (small-folder's
    # skipped "finetune" phase); CIFAR runs take fast-cpu's.
    tune = cfg.phases[1] if folder and len(cfg.phases) > 1 else fast[1]
    plan, speeds = measure.plan_this_machine(cfg, budget_s, device, fixed, time.monotonic() - t_start,
                                             probe_flips=probe_t.cached_flips, tune=tune)  # fmt: skip
    recipe = cfg.recipe
    cfg = budget.apply_plan(cfg, plan, [probe_t, tune])
    cfg.recipe = f"{args.recipe}-budget" if args.recipe else "budget"
    cfg = apply_overrides(cfg, phase_sets)
    now = dt.datetime.now()
    finish = now + dt.timedelta(seconds=plan.predicted_seconds - (time.monotonic() - t_start))
    # A photo folder's prediction is relative to its probe (priors.photo_accuracy): the
    # CIFAR-10 curves over-predicted folder runs by 2.7-7.8 points.
    lines = plan.lines(f"= {PHOTO_PREDICTION}" if folder and plan.kind != "probe" else "")
    if folder and plan.kind != "probe":
        tuned = cfg.phases[-1]  # a cached plan keeps the ops that work on stored maps
        lines.insert(2, f"  fine-tuning for photos ({recipe}'s {tune.name!r} phase): augment "
                        f"{','.join(tuned.augment)}, layer_decay {tuned.layer_decay:g}, label "
                        f"smoothing {tuned.label_smoothing:g}; the probe's bundle stays unless it "
                        f"validates better")
    if folder and plan.kind != "probe":
        lines.insert(1, "  (the plans are ranked by curves fitted to CIFAR-10 runs; the figure is "
                        "printed once the probe has validated, BENCHMARKS.md)")
    for line in lines + (plan.alternative_lines() if args.plan_only else []):
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


def cmd_train(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    from cifar_transfer.data.datasets import default_recipe
    from cifar_transfer.recipes import apply_overrides, load_recipe
    from cifar_transfer.training import distributed
    from cifar_transfer.training import run as train

    if args.resume:
        if args.recipe or args.overrides or args.weights or args.tensorboard or args.budget \
                or args.plan_only:
            raise UserError(
                "--resume continues a run with its saved config: drop "
                "--recipe/--set/--weights/--tensorboard/--budget/--plan-only (--data-dir is allowed: where "
                "the run's images are now)"
            )
        out = args.run_out = Path(args.resume)
        folder = False
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
    if not args.resume and folder and not args.budget and not args.recipe:
        # The folder recipe alone is the probe: minutes. Fine-tuning pays on photo sets
        # (BENCHMARKS.md, "Fine-tuning on photo folders"), and a budgeted run reuses this run's
        # decoded images and the probe's stored features.
        print(f"next: a fine-tuned model: cifar-transfer train --data-dir {args.data_dir} --budget 10m "
              f"(the probe, then fine-tuning with BatchNorm and the learning rate measured on these "
              f"photos; docs: guides/photo-finetune.md)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifar_transfer.results.runs import evaluate_run, evaluation_lines

    result = evaluate_run(
        Path(args.run_dir), args.split, args.data_dir, tta=args.tta, min_confidence=args.min_confidence
    )
    print("\n".join(evaluation_lines(result)) + f"\nwrote {result['path']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cifar_transfer.results.runs import calibrate_run, evaluation_lines

    result = calibrate_run(Path(args.run_dir), args.data_dir)
    print("\n".join(evaluation_lines(result)))
    print(f"wrote temperature {result['calibration']['temperature']:.4f} into {result['path']}")
    for path in result["stale_exports"]:
        print(f"note: {path} holds the old temperature: export it again", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cifar_transfer.results.calibration import check_min_confidence
    from cifar_transfer.results.predict import iter_predictions, load_predictor

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


def cmd_report(args: argparse.Namespace) -> int:
    from cifar_transfer.results.report import build_report

    result = build_report(Path(args.run_dir), args.data_dir)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {result['path']} and {len(result['figures'])} PNGs beside it")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cifar_transfer.results.export import export_run

    r = export_run(Path(args.run_dir), args.format, args.out, args.data_dir)
    print(
        f"parity on {r['n']} validation images: max |logit diff| {r['max_abs_diff']:.2e}, "
        f"top-1 agrees {r['top1_agree']}/{r['n']}; also checked {', '.join(r['also_checked'])}"
    )
    print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB, {args.format})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cifar_transfer.system import hardware
    from cifar_transfer.system.atomic import atomic_write_json
    from cifar_transfer.training.bench import INPUTS, MODES, run_bench

    choices = {
        "--precisions": (args.precisions, ("fp32", "bf16")), "--modes": (args.modes, MODES),
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
        tuple(v == "on" for v in args.compile.split(",")), args.weights, args.freeze,
    )
    if args.json:
        atomic_write_json(Path(args.json), rows)
        print(f"wrote {args.json}")
    return 0
