"""Frozen-backbone feature cache: extract once per (backbone, weights, resolution, data), reuse."""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from cifar_transfer.data.transforms import to_model_input
from cifar_transfer.system.atomic import save_safetensors
from cifar_transfer.system.errors import UserError
from cifar_transfer.system.hardware import autocast

# Cache folders a write failed in (read-only, under a file, full): said once per process, not retried.
_UNWRITABLE: set[Path] = set()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights and buffers as they are now.

    The cache must key on the backbone's current weights, not on where they came from: a frozen
    phase after a fine-tuning phase (write-up 2's recipe) sees a backbone no file names.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(backbone: str, weights_fp: str, head: str, resolution: int, precision: str, data_fp: str) -> str:
    """File stem of a feature cache entry; every input that changes the features is part of it."""
    kind = "top1000" if head == "imagenet-top" else "pooled"
    safe = backbone.replace("/", "_")
    return f"{safe}-w{weights_fp}-{kind}-r{resolution}-{precision}-{data_fp}"


def should_compile(setting: str, n_images: int) -> bool:
    """'auto' compiles when the images repay inductor's ~45 s compile (measured 2x on CPU, BENCHMARKS.md)."""
    if setting == "auto":
        return n_images >= 4096
    return setting == "on"


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    resolution: int,
    batch_size: int,
    precision: str,
    channels_last: bool = True,
    desc: str = "features",
    compile_model: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """forward_features over uint8 images (on the model's device) in eval mode; float32 on the device.

    `progress` shows a tqdm bar on stderr (off under `--quiet`).
    """
    model.eval()
    spec = model.spec
    forward = model.forward_features
    patch = contextlib.nullcontext()
    if compile_model:
        # Freezing folds BatchNorm into the convs and treats weights as constants: inference only.
        forward = torch.compile(model.forward_features)
        patch = torch._inductor.config.patch(freezing=True)
    out = []
    bar = tqdm(
        total=len(images), desc=desc, unit="img", mininterval=2, dynamic_ncols=True,
        disable=not progress,
    )  # fmt: skip
    with patch:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            n = len(chunk)
            if compile_model and n < batch_size:  # one shape only: a short batch would recompile
                chunk = torch.cat([chunk, chunk[:1].expand(batch_size - n, *chunk.shape[1:])])
            x = to_model_input(chunk, resolution, spec.mean, spec.std, channels_last)
            with autocast(images.device, precision):
                out.append(forward(x).float()[:n].clone())
            bar.update(n)
    bar.close()
    return torch.cat(out) if out else torch.empty(0, spec.feature_dim, device=images.device)


def cached_features(
    cache_dir: Path, key: str, images: torch.Tensor,
    extract: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, float]:
    """Load features from the cache or `extract(images)` and store them; (features, seconds).
    `shape`: what one row must be (a stored map's), else any."""
    path = Path(cache_dir) / f"{key}.safetensors"
    t0 = time.perf_counter()
    feats = load_cached(path, len(images), images.device, shape)
    if feats is not None:
        return feats, time.perf_counter() - t0
    feats = extract(images)
    _store(path, feats, key)
    return feats, time.perf_counter() - t0


def load_cached(path: Path, n: int, device: torch.device,
                shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The cached features at `path` when it holds n of them (each of `shape` when given); None
    when it is missing, short, of another shape or unreadable (a bad cache file is re-made, never
    trusted)."""
    if not path.is_file():
        return None
    try:
        feats = load_file(path)["features"]
    except Exception as e:  # noqa: BLE001 - anything a damaged or foreign file raises
        print(f"note: feature cache {path} unreadable ({type(e).__name__}): extracting again",
              file=sys.stderr)  # fmt: skip
        return None
    if len(feats) != n or (shape is not None and tuple(feats.shape[1:]) != tuple(shape)):
        return None
    return feats.to(device)


def _store(path: Path, feats: torch.Tensor, key: str) -> None:
    """Save features to the cache; a cache that cannot be written is a warning, not a failed run."""
    if path.parent in _UNWRITABLE:
        return
    try:
        save_safetensors(path, {"features": feats}, {"key": key})
    except (OSError, UserError) as e:  # UserError: atomic_write's "disk full", cause attached
        cause = e.__cause__ if isinstance(e, UserError) and e.__cause__ else e
        _UNWRITABLE.add(path.parent)
        print(
            f"warning: cannot write the feature cache in {path.parent} "
            f"({getattr(cause, 'strerror', None) or cause}): going on without it; set "
            f"CIFAR_TRANSFER_CACHE to a writable folder to reuse features across runs",
            file=sys.stderr,
        )
