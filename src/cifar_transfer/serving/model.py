"""The served model: loading, decoding uploads as `predict` decodes files, top-k as `predict --json`.

Every import of the rest of cifar_transfer goes through this module, so a move of those modules
is fixed here alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_transfer.artifacts.bundle import read_meta, temperature_of
from cifar_transfer.data.images import IMAGE_FIX, ImageError, decode_image
from cifar_transfer.results.calibration import check_min_confidence
from cifar_transfer.results.predict import Predictor, load_predictor
from cifar_transfer.system.errors import UserError
from cifar_transfer.system.hardware import set_threads

__all__ = [
    "BadUpload", "ServedModel", "UserError", "check_min_confidence",
    "decode_upload", "load_served_model", "set_threads",
]  # fmt: skip


class BadUpload(Exception):
    """An upload that is not a decodable image; the message names the problem and the fix."""


def decode_upload(raw: bytes, geometry: tuple[int, bool]) -> torch.Tensor:
    """Image bytes -> uint8 (3, S, S), pixel for pixel what `predict` makes of the same file.

    The one decoder of predict and folders (data/images.py: pixel limit checked on the header,
    thread-safe), and its reasons, but for an empty body, which is the request's problem.
    """
    size, crop = geometry
    try:
        return torch.from_numpy(decode_image(raw, size, crop=crop)).permute(2, 0, 1).contiguous()
    except ImageError as e:
        message = f"empty upload (0 bytes): {IMAGE_FIX}" if e.kind == "empty" else str(e)
        raise BadUpload(message) from None


def _file_id(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256: which weights answered, across restarts."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass
class ServedModel:
    """A predictor with what /info reports; `top_k` is predict's softmax + topk on a batch."""

    predictor: Predictor
    backend: str
    model_id: str
    info: dict

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def geometry(self) -> tuple[int, bool]:
        return getattr(self.predictor, "geometry", (32, False))

    def top_k(self, images: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """uint8 (N, 3, S, S) -> each image's k most likely (class, probability), best first.

        The same operations as predict's _predict_batches: logits (temperature and flip TTA
        applied by the model), softmax over classes, topk, float().
        """
        probs = self.predictor.logits(images).softmax(1)
        values, indices = probs.topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[int(c)], float(v)) for v, c in zip(values[row], indices[row])]
            for row in range(len(images))
        ]


def _onnx_path(model: Path) -> Path:
    if model.suffix.lower() == ".onnx":
        return model
    candidate = (model if model.is_dir() else model.parent) / "model.onnx"
    if not candidate.is_file():
        raise UserError(
            f"--backend onnx needs an exported model and there is no {candidate}: export it with "
            f"`cifar-transfer export {model if model.is_dir() else model.parent} --format onnx`, "
            f"or pass the .onnx file"
        )
    return candidate


def load_served_model(model: str | Path, backend: str = "auto") -> ServedModel:
    """A run dir / model.safetensors (torch, or its exported model.onnx with backend="onnx"), or
    an .onnx file; raises UserError with the fix when it cannot be served."""
    path = Path(model)
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"--backend {backend}: use torch or onnx")
    is_onnx = path.suffix.lower() == ".onnx"
    if backend == "torch" and is_onnx:
        raise UserError(f"{path} is an ONNX file: serve it with --backend onnx (or the run dir)")
    if backend == "onnx" or is_onnx:
        path = _onnx_path(path)
        backend = "onnx"
    else:
        backend = "torch"
    predictor = load_predictor(path)
    if backend == "onnx":
        props = predictor.session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
        meta = {k: _json_or_str(v) for k, v in props.items()}
        try:
            meta = {**meta, **read_meta(path)}  # model.json beside it knows val_acc too
        except UserError:
            pass
        weights = path
    else:
        meta = predictor.meta  # type: ignore[attr-defined]
        weights = path / "model.safetensors" if path.is_dir() else path
    size, crop = getattr(predictor, "geometry", (32, False))
    info = {
        "model": f"{path.parent.name if path.is_file() else path.name}@{_file_id(weights)}",
        "backend": backend,
        "classes": list(predictor.classes),
        "resolution": meta.get("resolution"),
        "input_size": size,
        "centre_crop": crop,
        # predict (and so serve) runs the torch model in fp32; the bundle's was its validation's.
        "precision": "fp32",
        "validated_precision": meta.get("precision"),
        "val_acc": meta.get("val_acc"),
        "temperature": temperature_of(meta) if "temperature" in meta else 1.0,
        "tta": meta.get("tta", "none"),
        "backbone": meta.get("backbone"),
    }
    return ServedModel(predictor, backend, info["model"], info)


def _json_or_str(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value
