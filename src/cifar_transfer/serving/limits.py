"""The serve options' defaults, importable without FastAPI or torch (the CLI parser uses them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """How much one request, and all of them together, may ask of the server."""

    max_batch: int = 32  # images in one forward pass
    max_wait_ms: float = 5.0  # how long a batch's first image waits for more
    max_queue: int = 256  # images accepted and not yet answered (503 beyond)
    max_body: int = 20 * 1024 * 1024  # bytes of one request body (413 beyond)
    max_files: int = 64  # images in one multipart request
    timeout: float = 30.0  # seconds for one request, body to answer (408 / 504)
    decode_threads: int = 2  # threads decoding uploads (each holds at most one decoded image)
    min_confidence: float | None = None  # class null unless the top probability is above it
