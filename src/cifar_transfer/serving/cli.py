"""The `serve` subcommand: its options and its handler (cli/parser.py registers both)."""

from __future__ import annotations

import argparse
import sys


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers."""
    from cifar_transfer.serving.limits import Limits

    d = Limits()
    p = sub.add_parser("serve", help="serve a trained model over HTTP (POST /predict, a page at /)")
    p.add_argument("model", metavar="RUN_DIR|MODEL",
                   help="run dir, model.safetensors, or an exported .onnx")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free one)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None,
                   help="torch (default for a run dir) or onnx (the run dir's model.onnx)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"most images in one forward pass (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long the first image of a batch waits for others (default "
                   f"{d.max_wait_ms:g} ms)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"images accepted and unanswered before 503s (default {d.max_queue})")
    p.add_argument("--max-body", type=int, default=d.max_body >> 20, metavar="MB",
                   help=f"largest request body in MiB (default {d.max_body >> 20}; 413 beyond)")
    p.add_argument("--max-files", type=int, default=d.max_files,
                   help=f"most images in one multipart request (default {d.max_files})")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds one request may take, body to answer (default {d.timeout:g})")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections beyond which uvicorn answers 503 (default 512)")
    p.add_argument("--threads", type=int, default=0,
                   help="the model's CPU threads (default 0: one per core)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="answer class null unless the top probability is above P (0 to 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    return p


def check_limits(args: argparse.Namespace):
    """The Limits of the parsed options, or UserError naming the bad one."""
    from cifar_transfer.serving.limits import Limits
    from cifar_transfer.serving.model import UserError, check_min_confidence

    check_min_confidence(args.min_confidence)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-body", args.max_body, 1), ("--max-files", args.max_files, 1),
                             ("--max-connections", args.max_connections, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"{flag} {value} must be at least {low}")
    if not 0 <= args.max_wait_ms <= 10_000:
        raise UserError(f"--max-wait-ms {args.max_wait_ms} must be from 0 to 10000")
    if not 0 < args.timeout <= 3600:
        raise UserError(f"--timeout {args.timeout} must be above 0 and at most 3600 seconds")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port (0 to 65535)")
    if args.max_queue < args.max_batch:
        raise UserError(f"--max-queue {args.max_queue} is below --max-batch {args.max_batch}: "
                        f"raise --max-queue")
    return Limits(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body=args.max_body << 20, max_files=args.max_files, timeout=args.timeout,
        min_confidence=args.min_confidence,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then run uvicorn until SIGTERM/Ctrl-C (graceful: accepted requests finish)."""
    from cifar_transfer.serving.model import UserError, load_served_model, set_threads

    limits = check_limits(args)
    if args.threads < 0:
        raise UserError(f"--threads {args.threads} must be 0 (one per core) or more")
    set_threads(args.threads)
    try:
        import uvicorn

        from cifar_transfer.serving.app import create_app
    except ImportError as e:
        raise UserError(
            f"serve needs {e.name}: pip install 'cifar-transfer[serve]' (fastapi, uvicorn, "
            f"python-multipart)"
        ) from None
    served = load_served_model(args.model, args.backend or "auto")
    app = create_app(served, limits)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
        limit_concurrency=args.max_connections, timeout_graceful_shutdown=limits.timeout + 5,
        server_header=False, access_log=args.log_level in ("info", "debug"),
    )  # fmt: skip
    server = uvicorn.Server(config)
    info = served.info
    acc = f", val_acc {info['val_acc']:.4f}" if isinstance(info.get("val_acc"), float) else ""
    print(f"serving {info['model']} ({served.backend}, {len(served.classes)} classes{acc}, "
          f"tta {info['tta']}, T = {info['temperature']:.3f}); max batch {limits.max_batch}, "
          f"max wait {limits.max_wait_ms:g} ms", file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {args.host}: reachable from other machines, with no "
              f"authentication", file=sys.stderr, flush=True)
    server.run()
    return 0
