"""Untrusted image bytes or files -> uint8 RGB pixels: the one place the project decodes a user's
image (folder datasets, `predict`, `serve`), and the one place that says why one does not decode.

Every failure is an ImageError with its `kind`, a short `reason` and a `fix`; each caller shows it
its own way (a folder run skips the file and lists it in one warning, predict prints an `error:`
line per file and goes on, serve answers 422). The pixel limit is set here for every PIL decode
in the process, and checked here on the header before anything is decoded.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# A 22 KB PNG can declare 14000x13000 pixels; decoding it (x3 for RGB) could take the machine's
# memory. PIL only warns above its limit and refuses above twice that, so we set the limit and
# refuse anything over it ourselves, from the header. 2**27 (134 Mpx) is above the largest common
# camera photos (~100 Mpx medium format, 108 Mpx phones); a 32x32 prediction needs nothing bigger.
MAX_IMAGE_PIXELS = 2**27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# PIL's warning between the limit and twice it would be a second, stray line beside our own
# refusal. Silenced once here rather than turned into an error per decode: catch_warnings swaps
# process-wide state and is not thread-safe (folders and serve decode in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A damaged EXIF block is read as far as it goes (the image keeps its pixels, see _upright); PIL's
# warning about it would be a traceback-like line in the middle of predict's output.
warnings.filterwarnings("ignore", r"(Possibly )?[Cc]orrupt EXIF", UserWarning, r"PIL\.")

IMAGE_FIX = "pass PNG/JPEG/BMP/GIF/TIFF/WebP image files"
# kind -> (reason, fix) of the failures whose words are always the same; "corrupt" (PIL's own
# words inside) and "unreadable" (the file system's) are made where they happen.
REASONS = {
    "empty": ("empty file (0 bytes)", "copy or download it again"),
    "not-an-image": (
        "not an image PIL can read (a text or other file, or a format such as HEIC?)",
        f"{IMAGE_FIX} (convert others to JPEG)",
    ),
    "too-many-pixels": (
        f"more than {MAX_IMAGE_PIXELS:,} pixels, too many to decode (a decompression bomb?)",
        "downscale it first",
    ),
    "out-of-memory": ("too large to decode in the memory left", "downscale it first"),
}
KINDS = (*REASONS, "corrupt", "unreadable")


class ImageError(Exception):
    """An image that does not decode: `kind` (one of KINDS), `reason` (what is wrong with the file)
    and `fix` (what to do; empty where the reason says it). str() is "reason: fix"."""

    def __init__(self, kind: str, reason: str, fix: str = "") -> None:
        super().__init__(f"{reason}: {fix}" if fix else reason)
        self.kind, self.reason, self.fix = kind, reason, fix

    @classmethod
    def of(cls, kind: str) -> ImageError:
        """The error of a kind whose words are always the same (REASONS)."""
        return cls(kind, *REASONS[kind])


def _classify(e: BaseException) -> ImageError:
    """The ImageError for whatever PIL (or its decoders) raised on a file's bytes."""
    if isinstance(e, ImageError):
        return e
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError.of("too-many-pixels")
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageError.of("not-an-image")
    if isinstance(e, MemoryError):
        return ImageError.of("out-of-memory")
    # Damaged files raise OSError ("image file is truncated"), SyntaxError, struct.error, ...
    said = (str(e).strip().splitlines() or [""])[0][:80] or type(e).__name__
    return ImageError(
        "corrupt", f"truncated or corrupt (PIL: {said})",
        "copy it again, or re-save it with an image editor",
    )  # fmt: skip


def _file_error(e: OSError) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError("unreadable", "no such file")
    if isinstance(e, IsADirectoryError):
        return ImageError("unreadable", "is a folder, not an image")
    return ImageError("unreadable", f"cannot be read ({e.strerror or type(e).__name__})")


def read_bytes(path: Path) -> bytes:
    """A file's bytes; ImageError ("unreadable") when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise _file_error(e) from None


@contextlib.contextmanager
def _binary(source: bytes | Path) -> Iterator[BinaryIO]:
    """The bytes, or the open file, to decode; an empty or unreadable one is an ImageError."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError.of("empty")
        yield io.BytesIO(source)
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below, after the yield
    except OSError as e:
        raise _file_error(e) from None
    with f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ImageError.of("empty")
        yield f


def _upright(img: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation; a malformed EXIF block leaves it as stored (its
    pixels decoded: a bad tag is no reason to lose the image)."""
    try:
        return ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a malformed EXIF block: SyntaxError, struct.error, ...
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled down, transparency composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def load_rgb(source: bytes | Path, draft: int = 0) -> Image.Image:
    """Image bytes or a file -> the decoded image, upright (EXIF), in 8-bit RGB.

    `draft`: a JPEG is decoded at 1/2, 1/4 or 1/8 size in the DCT (nearly free) while both its
    sides stay >= draft; 0 decodes at full size. Raises ImageError for anything that does not
    decode, its pixel count checked on the header first.
    """
    try:
        with _binary(source) as f, Image.open(f) as img:  # reads the header only
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError.of("too-many-pixels")
            if draft:
                img.draft("RGB", (draft, draft))  # JPEG only; others decode as they are
            img.load()  # the pixels: a truncated or corrupt file fails here
            return to_rgb(_upright(img))  # always a new image: the file may close
    except Exception as e:  # noqa: BLE001 - every failure becomes one ImageError with its reason
        raise _classify(e) from None


def decode_image(
    source: bytes | Path, size: int, draft: bool = True, crop: bool = True
) -> np.ndarray:
    """One image -> uint8 (size, size, 3), upright, RGB.

    crop: shorter side to `size`, centre square (how a folder's images are decoded; nothing is
    stretched). Otherwise the whole image shrunk to size x size, as the CIFAR images were made
    (how a CIFAR model sees a photo). Raises ImageError with the reason for a file that does not
    decode.
    """
    # reducing_gap=3 box-reduces to 3x the output before the bicubic step, so the whole image
    # needs no more than 3x from the JPEG decoder; a crop keeps its draft at the output size.
    img = load_rgb(source, (size if crop else 3 * size) if draft else 0)
    box = None
    if crop:
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    try:
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    except MemoryError as e:
        raise _classify(e) from None
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy shares it)
