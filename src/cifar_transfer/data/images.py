"""One image file -> uint8 RGB pixels, safely: a decompression bomb, a truncated file or a
non-image is a BadImage with its reason (one bad file never stops the work on the good ones).
The pixel limit is set here for every PIL decode in the process."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A 22 KB PNG can declare 14000x13000 pixels; decoding it (x3 for RGB) could take the machine's
# memory. PIL only warns above its default limit (89 Mpx) and refuses above twice that, so we set
# the limit and refuse anything over it. 2**27 (134 Mpx) is above the largest common camera
# photos (~100 Mpx medium format, 108 Mpx phones); a 32x32 prediction needs nothing bigger.
MAX_IMAGE_PIXELS = 2**27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
TOO_BIG = (
    f"more than {MAX_IMAGE_PIXELS:,} pixels, too many to decode (a decompression bomb?): "
    f"downscale it first"
)


class BadImage(Exception):
    """A file among the images that does not decode; the message says why."""


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


def decode_image(source: bytes | Path, size: int, draft: bool = True) -> np.ndarray:
    """One image -> uint8 (size, size, 3): orientation, RGB, shorter side to `size`, centre crop.

    Raises BadImage with the reason for a file that does not decode.
    """
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                if draft:
                    img.draft("RGB", (size, size))  # JPEG only: both sides stay >= size
                img = to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(TOO_BIG) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can read (a non-image file with an image's name?)") from None
    except MemoryError:
        raise BadImage("too large to decode in the memory left: downscale it") from None
    except Exception as e:  # noqa: BLE001 - damaged files raise OSError, SyntaxError, struct.error ...
        raise BadImage(f"truncated or corrupt ({type(e).__name__}: {str(e)[:80]})") from None
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy shares it)
