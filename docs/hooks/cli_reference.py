"""MkDocs hook: the page reference/cli.md, generated from the argparse parser at build time.

Nothing of the page is written by hand and nothing is stored in docs/: on every build (and every
`mkdocs serve` reload) `on_files` renders `cifar_transfer.cli.build_parser()`'s help, top level
and every subcommand it has (iterated, not listed), at a fixed width, and adds the page to the
site. tests/test_docs.py checks the page against what `cifar-transfer CMD --help` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

PAGE = "reference/cli.md"
WIDTH = 100  # the terminal width the help is formatted at: the page is the same on any machine

INTRO = """\
# Command line reference

This page is generated from the command's own argument parser
(`cifar_transfer.cli.build_parser()`) each time the site is built, by the MkDocs hook
`docs/hooks/cli_reference.py`: it is exactly what `cifar-transfer --help` and
`cifar-transfer COMMAND --help` print in a terminal {width} columns wide. Do not edit it; change
the parser's help texts instead (`tests/test_docs.py` fails when the two disagree).

What each command writes, and the rules every command follows (one `error:` line per problem,
exit codes, `--debug`), are in [Commands and run dirs](commands.md).
"""


@contextlib.contextmanager
def fixed_width(width: int = WIDTH) -> Iterator[None]:
    """argparse sizes its help from $COLUMNS (shutil.get_terminal_size): pin it while formatting."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, in the order the parser defines them (aliases once)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps its subparsers here; there is no public API
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    found[name] = sub
    return found


def summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help, as the top-level help lists it."""
    out: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out[choice.dest] = choice.help or ""
    return out


def help_texts() -> dict[str, str]:
    """{"": top-level help, "train": `cifar-transfer train --help`, ...} at WIDTH columns."""
    from cifar_transfer.cli import build_parser

    with fixed_width():
        parser = build_parser()
        texts = {"": parser.format_help()}
        for name, sub in subcommands(parser).items():
            texts[name] = sub.format_help()
    return texts


def render() -> str:
    """The Markdown of the page."""
    from cifar_transfer.cli import build_parser

    summary = summaries(build_parser())
    parts = [INTRO.format(width=WIDTH)]
    for name, text in help_texts().items():
        command = f"cifar-transfer {name}".strip()
        line = f"{summary[name][:1].upper()}{summary[name][1:]}.\n\n" if summary.get(name) else ""
        parts.append(f"## `{command}`\n\n{line}```text\n$ {command} --help\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def on_config(config):  # MkDocs' hook signature
    """Document the checkout being built: its src/ goes first on the import path."""
    src = str(Path(config.config_file_path).resolve().parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_files(files, config):  # MkDocs' hook signature
    """Add the generated page to the site's files (before the nav is built from them)."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    if files.get_file_from_path(PAGE) is not None:
        raise PluginError(
            f"docs/{PAGE} exists, but that page is generated from the parser by "
            f"docs/hooks/{Path(__file__).name}: delete the file and change the parser's help "
            "texts instead"
        )
    files.append(File.generated(config, PAGE, content=render()))
    return files
