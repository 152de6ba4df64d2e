"""Folder decoding throughput (issue 12): img/s serial vs parallel, with and without JPEG draft.

    .venv/bin/python benchmarks/decode_throughput.py [--images 10000] [--size 260] \
        [--workers 1,0] [--json FILE]

Generates `--images` JPEG files at typical photo sizes (a seeded mix of 640x480, 1024x768,
1600x1200, 2048x1536, 3024x4032 and 4032x3024, smooth gradients plus noise so they compress like
photos, quality 90) into a temporary folder, once: `--distinct` (48) encoded photos, the other
files hard links to them (decoding costs the same; 10,000 photos would take ~15 GB and an hour to
encode otherwise). Then it times `folder.decode_files` (read, decode,
EXIF, RGB, shorter side to `--size`, centre crop, into one uint8 tensor) over all of them for
each workers setting (1 = serial, 0 = one thread per core) x draft on/off. Nothing is cached;
the files are read once untimed first so every cell sees a warm page cache. Not run by the tests.
`--images 12 --distinct 6` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_transfer.data.folder import decode_files

SIZES = ((640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3024, 4032), (4032, 3024))


def write_photos(folder: Path, n: int, distinct: int, seed: int = 0) -> list[Path]:
    """n photo-like JPEG files of the SIZES mix (`distinct` encoded, the rest hard links)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if i >= distinct:
            try:
                os.link(paths[i % distinct], path)
            except OSError:  # a filesystem without hard links
                path.write_bytes(paths[i % distinct].read_bytes())
            paths.append(path)
            continue
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        # A small random image upsampled (smooth, photo-like) plus fine noise: JPEG sizes of real
        # photos, not of flat colour or of pure noise.
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        img = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-8, 9, (h, w, 1), dtype=np.int16), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--distinct", type=int, default=48, help="photos encoded; the rest are links")
    ap.add_argument("--size", type=int, default=260, help="storage size (px)")
    ap.add_argument("--workers", default="1,0", help="comma list: 1 = serial, 0 = one per core")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_photos(Path(tmp), args.images, max(1, args.distinct))
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"wrote {len(paths)} JPEG files ({mb:.2f} MB each on average) in "
              f"{time.perf_counter() - t0:.0f} s")
        for p in paths:  # warm the page cache: the cells time decoding, not the disk
            p.read_bytes()
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            for draft in (False, True):
                t0 = time.perf_counter()
                images, _, problems = decode_files(paths, args.size, workers, draft, progress=False)
                seconds = time.perf_counter() - t0
                assert not problems and len(images) == len(paths)
                row = {
                    "images": len(paths), "size": args.size, "draft": draft, "seconds": seconds,
                    "workers": workers or os.cpu_count(), "img_per_s": len(paths) / seconds,
                }  # fmt: skip
                rows.append(row)
                print(f"workers {row['workers']:2d} draft {'on ' if draft else 'off'} "
                      f"{row['img_per_s']:8.1f} img/s ({seconds:.1f} s)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
