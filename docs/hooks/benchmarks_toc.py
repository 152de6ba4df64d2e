"""MkDocs hook: the Benchmarks page lists BENCHMARKS.md's sections, read from the file at build time.

BENCHMARKS.md stays where it is (the repository root, outside docs/, so the site cannot link
to it in strict mode) and is never copied: the page's marker is replaced by the file's `##` and
`###` headings, which carry each section's headline figure, so the list cannot go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- BENCHMARKS.md sections -->"
PAGE = "benchmarks.md"


def sections(text: str) -> str:
    """A Markdown list of the `##`/`###` headings, outside fenced code blocks, in order."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{2,3}) (.+)", line)):
            out.append(("    " if m.group(1) == "###" else "") + "- " + m.group(2).strip())
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):  # MkDocs' hook signature
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    path = Path(config.config_file_path).resolve().parent / "BENCHMARKS.md"
    if MARKER not in markdown or not path.is_file():
        raise PluginError(f"{PAGE} needs the marker {MARKER!r} and {path} to list its sections")
    return markdown.replace(MARKER, sections(path.read_text(encoding="utf-8")))
