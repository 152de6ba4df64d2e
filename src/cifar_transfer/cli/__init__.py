"""The `cifar-transfer` command: parse, call one function, print. Errors are one line (--debug: traceback)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Iterator

from cifar_transfer.cli.parser import build_parser
from cifar_transfer.system.errors import UserError

__all__ = ["build_parser", "main"]


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
    from cifar_transfer.system.allocator import keep_freed_memory

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

