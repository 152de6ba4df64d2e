"""Images in, top-k CIFAR-10 classes out: files, folders and globs, batched, PyTorch or ONNX."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cifar_transfer.errors import UserError
from cifar_transfer.evaluate import predict_logits

if TYPE_CHECKING:
    import onnxruntime as ort

GLOB_CHARS = frozenset("*?[")
IMAGE_FIX = "pass PNG/JPEG/BMP/GIF/TIFF/WebP image files"
NO_IMAGES = "folder holds no images: pass a folder of images or a glob such as 'photos/*.jpg'"


@dataclass
class Prediction:
    """Top-k classes of one image, or the reason it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict:
        """{path, top: [{class, prob}], error (null when fine)} for --json."""
        return {
            "path": self.path,
            "top": [{"class": name, "prob": prob} for name, prob in self.top],
            "error": self.error or None,
        }


class Predictor(Protocol):
    """Anything that turns uint8 (N, 3, 32, 32) images into (N, classes) logits."""

    classes: list[str]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 logits on the CPU."""
        ...


class TorchPredictor:
    """A model bundle (run dir or model.safetensors) run by PyTorch in fp32."""

    def __init__(self, model: torch.nn.Module, meta: dict) -> None:
        # channels_last: measured 1.1-1.5x faster on this project's CPU (cnn, resnet18, lite0).
        self.model, self.meta = model.to(memory_format=torch.channels_last), meta
        self.classes = list(meta["classes"])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 logits, resized and normalized the way training did."""
        device = next(self.model.parameters()).device
        return predict_logits(
            self.model, images.to(device), self.meta["resolution"], self.meta["mean"],
            self.meta["std"], max(1, len(images)), "fp32", channels_last=True,
        )


class OnnxPredictor:
    """An exported .onnx file run by onnxruntime; it carries its own resize and normalization."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        from cifar_transfer.export import onnx_session

        try:
            self.session = onnx_session(path, threads=threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"{path} is not a loadable ONNX model ({first}): export it again with "
                f"`cifar-transfer export RUN_DIR --format onnx`"
            ) from None
        self.classes = onnx_classes(path, self.session)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 logits through onnxruntime."""
        from cifar_transfer.export import onnx_logits

        return onnx_logits(self.session, images, batch_size=max(1, len(images)))


def onnx_classes(path: Path, session: ort.InferenceSession) -> list[str]:
    """Class names from the file's own metadata, else from a cifar-transfer model.json beside it."""
    props = session.get_modelmeta().custom_metadata_map
    if "classes" in props:
        return list(json.loads(props["classes"]))
    from cifar_transfer.bundle import read_meta

    try:
        return list(read_meta(path)["classes"])
    except UserError:
        raise UserError(
            f"{path} names no classes (no metadata, no model.json beside it): export it with "
            f"`cifar-transfer export RUN_DIR --format onnx`, which embeds them"
        ) from None


def load_predictor(model: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A run dir or model.safetensors (PyTorch), or an exported .onnx file (onnxruntime)."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise UserError(f"no ONNX file at {path}: export one with `cifar-transfer export`")
        return OnnxPredictor(path, threads=torch.get_num_threads())
    if path.suffix.lower() in {".pt", ".pth"} and path.is_file():
        raise UserError(
            f"{path} looks like a TorchScript export or a checkpoint: predict takes a run dir, its "
            f"model.safetensors, or an exported .onnx file (load TorchScript with torch.jit.load)"
        )
    from cifar_transfer.bundle import load_model

    return TorchPredictor(*load_model(path, device))


def _image_suffixes() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def expand_inputs(args: Sequence[str]) -> list[Prediction]:
    """Files as given, folders as their images (sorted, not recursive), globs expanded (sorted).

    A folder without images or a glob matching nothing becomes one entry with an error.
    """
    out: list[Prediction] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            suffixes = _image_suffixes()
            found = sorted(
                str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
            )
            out += [Prediction(p) for p in found] or [Prediction(arg, error=NO_IMAGES)]
        elif not path.exists() and GLOB_CHARS & set(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            out += [Prediction(p) for p in found] or [Prediction(arg, error="matches no files")]
        else:
            out.append(Prediction(arg))
    return out


def read_image(path: Path) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32), downscaled the way CIFAR-10 images were made."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _read(pred: Prediction) -> torch.Tensor | None:
    """The image of one entry, or None with the entry's error set."""
    try:
        return read_image(Path(pred.path))
    except FileNotFoundError:
        pred.error = "no such file"
    except IsADirectoryError:
        pred.error = "is a folder, not an image"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        pred.error = f"not a readable image (PIL: {type(e).__name__}): {IMAGE_FIX}"
    return None


def _chunks(items: list[Prediction], size: int) -> Iterator[list[Prediction]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_paths(
    predictor: Predictor, inputs: Sequence[str], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Predict every readable image, `batch_size` at a time (so a big folder never sits in memory)."""
    if top_k < 1:
        raise UserError(f"--top {top_k} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    results = expand_inputs(inputs)
    todo = [r for r in results if not r.error]
    k = min(top_k, len(predictor.classes))
    for chunk in _chunks(todo, batch_size):
        read = [(pred, _read(pred)) for pred in chunk]
        ok = [(pred, img) for pred, img in read if img is not None]
        if not ok:
            continue
        probs = predictor.logits(torch.stack([img for _, img in ok])).softmax(1)
        values, indices = probs.topk(k, dim=1)
        for row, (pred, _) in enumerate(ok):
            pred.top = [
                (predictor.classes[int(c)], float(v)) for v, c in zip(values[row], indices[row])
            ]
    return results


def predict_images(
    model: torch.nn.Module, meta: dict, paths: list[str], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Predict image files with a loaded bundle; unreadable ones get their own error."""
    return predict_paths(TorchPredictor(model, meta), paths, top_k, batch_size)
