"""Images in, top-k classes out: files, folders and globs, batched, PyTorch or ONNX.

A photo becomes what the model trained on: a CIFAR model's 32x32 (the whole photo shrunk, as the
CIFAR images were made), a folder model's storage size (shorter side resized, centre square, as
folder.py decoded its training images; model.json's `storage_size` and `data_kind`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from cifar_transfer.data.images import ImageError, decode_image
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.system.errors import UserError

if TYPE_CHECKING:
    import onnxruntime as ort

GLOB_CHARS = frozenset("*?[")
NO_IMAGES = "folder holds no images: pass a folder of images or a glob such as 'photos/*.jpg'"
# Files decoded before their results are printed: a huge glob shows progress, and memory stays
# bounded (a decoded image is 3 KB). The forward batch is --batch-size, within each read batch.
READ_BATCH = 256


@dataclass
class Prediction:
    """Top-k classes of one image, or the reason it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def label(self, min_confidence: float | None = None) -> str | None:
        """The top class, or None (unknown) when its probability is not above `min_confidence`
        (so 0 labels every image and 1.0 none) or the image could not be read."""
        if not self.top or (min_confidence is not None and self.top[0][1] <= min_confidence):
            return None
        return self.top[0][0]

    def to_json(self, min_confidence: float | None = None) -> dict:
        """{path, class (null: unknown or unread), top: [{class, prob}], error (null when fine)}."""
        return {
            "path": self.path,
            "class": self.label(min_confidence),
            "top": [{"class": name, "prob": prob} for name, prob in self.top],
            "error": self.error or None,
        }


class Predictor(Protocol):
    """Anything that turns uint8 (N, 3, S, S) images into (N, classes) logits."""

    classes: list[str]
    geometry: tuple[int, bool]  # (S, centre-crop): how a photo becomes the model's input

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 logits on the CPU."""
        ...


class TorchPredictor:
    """A model bundle (run dir or model.safetensors) run by PyTorch in fp32."""

    def __init__(self, model: torch.nn.Module, meta: dict) -> None:
        # channels_last: measured 1.1-1.5x faster on this project's CPU (cnn, resnet18, lite0).
        self.model, self.meta = model.to(memory_format=torch.channels_last), meta
        self.classes = list(meta["classes"])
        self.geometry = image_geometry(meta)

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
        from cifar_transfer.results.export import onnx_session

        try:
            self.session = onnx_session(path, threads=threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"{path} is not a loadable ONNX model ({first}): export it again with "
                f"`cifar-transfer export RUN_DIR --format onnx`"
            ) from None
        self.classes = onnx_classes(path, self.session)
        props = self.session.get_modelmeta().custom_metadata_map
        size = props.get("storage_size", "32")
        self.geometry = image_geometry({
            "storage_size": int(size) if size.isdigit() else 32, "data_kind": props.get("data_kind"),
        })  # fmt: skip

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 logits through onnxruntime."""
        from cifar_transfer.results.export import onnx_logits

        return onnx_logits(self.session, images, batch_size=max(1, len(images)))


def image_geometry(meta: dict) -> tuple[int, bool]:
    """(input size, centre-crop) of a model: CIFAR models take the whole photo at 32x32."""
    size = meta.get("storage_size", 32)
    size = size if isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096 else 32
    return size, meta.get("data_kind") == "folder"


def onnx_classes(path: Path, session: ort.InferenceSession) -> list[str]:
    """Class names from the file's own metadata, else from a cifar-transfer model.json beside it."""
    props = session.get_modelmeta().custom_metadata_map
    if "classes" in props:
        return list(json.loads(props["classes"]))
    from cifar_transfer.artifacts.bundle import read_meta

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
    from cifar_transfer.artifacts.bundle import load_model

    return TorchPredictor(*load_model(path, device))


def _image_suffixes() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _glob(pattern: str) -> Iterator[str]:
    """Files matching `pattern` as they are found; '**' spans folders but never symlinked ones.

    glob.iglob follows symlinks under '**': a link to a parent folder repeats the tree until
    the paths grow too long (and two such links never end). pathlib's '**' does not follow them.
    """
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    for path in Path(*parts[:first]).glob(str(Path(*parts[first:]))):
        if path.is_file():
            yield str(path)


def expand_inputs(args: Sequence[str]) -> Iterator[Prediction]:
    """Files as given, folders as their images (sorted, not recursive), globs in the order found.

    Lazy, so predictions start before a huge glob is listed. A folder without images or a glob
    matching nothing becomes one entry with an error.
    """
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            suffixes = _image_suffixes()
            found = sorted(
                str(p) for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file()
            )
            yield from [Prediction(p) for p in found] or [Prediction(arg, error=NO_IMAGES)]
        elif not path.exists() and GLOB_CHARS & set(arg):
            matched = False
            for found_path in _glob(arg):
                matched = True
                yield Prediction(found_path)
            if not matched:
                yield Prediction(arg, error="matches no files")
        else:
            yield Prediction(arg)


def read_image(path: Path, size: int = 32, crop: bool = False) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32), downscaled the way CIFAR-10 images were made;
    with `crop`, (3, size, size) the way folder.py decoded a folder model's training images.
    Raises images.ImageError (reason and fix) for a file that does not decode."""
    return torch.from_numpy(decode_image(Path(path), size, crop=crop)).permute(2, 0, 1)


def _read(pred: Prediction, geometry: tuple[int, bool] = (32, False)) -> torch.Tensor | None:
    """The image of one entry, or None with the entry's error set: one bad file stops nothing."""
    try:
        return read_image(Path(pred.path), *geometry) if geometry != (32, False) else read_image(Path(pred.path))
    except ImageError as e:
        pred.error = str(e)
    return None


def _predict_batches(
    predictor: Predictor, entries: Iterator[Prediction], k: int, batch_size: int
) -> Iterator[list[Prediction]]:
    read_batch = max(READ_BATCH, batch_size)
    while chunk := list(islice(entries, read_batch)):
        geometry = getattr(predictor, "geometry", (32, False))
        ok = [(p, img) for p in chunk if not p.error and (img := _read(p, geometry)) is not None]
        for start in range(0, len(ok), batch_size):
            part = ok[start : start + batch_size]
            probs = predictor.logits(torch.stack([img for _, img in part])).softmax(1)
            values, indices = probs.topk(k, dim=1)
            for row, (pred, _) in enumerate(part):
                pred.top = [
                    (predictor.classes[int(c)], float(v)) for v, c in zip(values[row], indices[row])
                ]
        yield chunk


def iter_predictions(
    predictor: Predictor, inputs: Sequence[str], top_k: int = 3, batch_size: int = 64
) -> Iterator[list[Prediction]]:
    """Predictions in input order, READ_BATCH files at a time, each list as soon as it is done.

    Files are decoded a read batch at a time and forwarded `batch_size` at a time, so neither a
    huge folder nor a huge glob ever sits in memory. Unreadable files carry their own error.
    """
    if top_k < 1:
        raise UserError(f"--top {top_k} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    k = min(top_k, len(predictor.classes))
    return _predict_batches(predictor, expand_inputs(inputs), k, batch_size)


def predict_paths(
    predictor: Predictor, inputs: Sequence[str], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Every prediction of iter_predictions in one list."""
    return [pred for batch in iter_predictions(predictor, inputs, top_k, batch_size) for pred in batch]
