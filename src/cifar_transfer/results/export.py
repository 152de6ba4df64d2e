"""ONNX and TorchScript export of a run's model, with resize + normalization inside the graph.

An exported file takes raw images (N, 3, S, S) with values 0..255 (S: 32 for CIFAR models, the
storage size, model.json's `storage_size`, for models trained on a folder) and returns (N, classes)
logits, calibrated (divided by the bundle's temperature inside the graph), so a consumer
needs nothing from this package. Every export is checked against the
PyTorch bundle on validation images before a single byte is written: a file that disagrees is
never left behind.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_transfer.artifacts.bundle import FORMAT, load_model, temperature_of
from cifar_transfer.artifacts.rundir import run_dir_of, run_split
from cifar_transfer.models.inference import predict_logits
from cifar_transfer.system.atomic import atomic_write_bytes
from cifar_transfer.system.errors import UserError

if TYPE_CHECKING:
    import onnxruntime as ort

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_IMAGES = 64
PARITY_TOLERANCE = 1e-3  # max |logit difference| in fp32
ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
ONNX_OPSET = 18


class RawImageModel(nn.Module):
    """(N, 3, S, S) images in 0..255 (uint8 or float) -> logits: the bundle's preprocessing inside."""

    def __init__(
        self, model: nn.Module, resolution: int, mean: Sequence[float], std: Sequence[float],
        storage_size: int = 32,
    ) -> None:
        super().__init__()
        self.model = model
        self.resolution = int(resolution)
        self.resize = self.resolution != storage_size  # the input is storage-sized by contract
        # Same arithmetic and order as transforms.to_model_input (normalize, then bilinear resize), so
        # the exported graph reproduces the training-time input bit for bit where it can.
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw 0..255 images -> (N, classes) float32 logits."""
        x = (images.float() - self.shift) / self.scale
        if self.resize:
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear",
                align_corners=False, antialias=False,
            )
        return self.model(x)


def exportable_model(model: nn.Module, meta: dict) -> RawImageModel:
    """Wrap a loaded bundle so it takes raw images; fp32, eval mode, on the CPU."""
    return RawImageModel(
        model, meta["resolution"], meta["mean"], meta["std"], meta.get("storage_size", 32)
    ).float().cpu().eval()


def export_metadata(meta: dict) -> dict:
    """What a lone exported file carries about itself (ONNX metadata_props, TorchScript model.json)."""
    size = meta.get("storage_size", 32)
    return {
        "format": meta.get("format", FORMAT),
        "classes": list(meta["classes"]),
        "backbone": meta["backbone"],
        "head": meta["head"],
        "resolution": meta["resolution"],
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "input": f"images: (N, 3, {size}, {size}) RGB, values 0..255; resize and normalization are inside",
        "storage_size": size,
        "data_kind": meta.get("data_kind", "cifar10"),
        "output": "logits: (N, classes), calibrated (divided by `temperature` inside); "
        "softmax gives probabilities",
        "temperature": temperature_of(meta),
        "tta": meta.get("tta", "none"),  # "flip": the graph averages each image with its mirror
    }


# --------------------------------------------------------------------------- ONNX


def onnx_bytes(wrapper: RawImageModel, example: torch.Tensor) -> bytes:
    """Serialize the wrapper with torch.onnx's dynamo exporter: float32 input, dynamic batch."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example.float(),), dynamo=True, input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT], dynamic_shapes={"images": {0: batch}},
            opset_version=ONNX_OPSET, optimize=True, verbose=False, report=False,
        )
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def with_onnx_metadata(data: bytes, metadata: dict) -> bytes:
    """The ONNX model with `metadata` as its metadata_props (strings; lists and numbers as JSON)."""
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return proto.SerializeToString()


def onnx_session(model: bytes | str | Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session over a serialized model or a file path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement chatter
    if threads > 0:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(
    session: ort.InferenceSession, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Run an exported model over uint8 or float 0..255 images; float32 logits."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().numpy()
        out.append(torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]))
    return torch.cat(out)


# --------------------------------------------------------------------------- TorchScript


def torchscript_bytes(wrapper: RawImageModel, example: torch.Tensor, metadata: dict) -> bytes:
    """Trace the wrapper (uint8 example; float input works too) and save it with model.json inside."""
    # torch.jit is deprecated in favour of torch.export, but TorchScript is what C++ (libtorch)
    # and older runtimes load; the warnings would only alarm the user.
    with warnings.catch_warnings(action="ignore", category=FutureWarning), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"model.json": json.dumps(metadata)})
    return buf.getvalue()


def torchscript_module(data: bytes) -> torch.jit.ScriptModule:
    """Reload a saved TorchScript model from its bytes, in eval mode on the CPU."""
    with warnings.catch_warnings(action="ignore", category=FutureWarning):
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def torchscript_logits(
    module: torch.jit.ScriptModule, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Run a TorchScript export over uint8 or float 0..255 images; float32 logits."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(module(images[start : start + batch_size]).float())
    return torch.cat(out)


# --------------------------------------------------------------------------- export + parity


def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict:
    """Max |logit difference| and top-1 agreement between the bundle and its export."""
    if reference.shape != exported.shape:
        return {"max_abs_diff": float("inf"), "top1_agree": 0, "n": len(reference), "ok": False}
    diff = float((reference - exported).abs().max()) if reference.numel() else 0.0
    agree = int((reference.argmax(1) == exported.argmax(1)).sum())
    ok = bool(np.isfinite(diff)) and diff < PARITY_TOLERANCE and agree == len(reference)
    return {"max_abs_diff": diff, "top1_agree": agree, "n": len(reference), "ok": ok}


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path | None = None, data_dir: str | None = None,
    parity_images: torch.Tensor | None = None,
) -> dict:
    """Export a run's model to ONNX or TorchScript; write it only if parity holds on val images."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir, "cpu")
    out = Path(out) if out else run_dir_of(run_dir) / f"model{SUFFIX[fmt]}"
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file path, e.g. {out / ('model' + SUFFIX[fmt])}")
    if parity_images is None:
        split = run_split(run_dir, data_dir, purpose="the export parity check needs")
        parity_images = split.images[:PARITY_IMAGES]
    images = parity_images.cpu()
    model = model.float()
    reference = predict_logits(
        model, images, meta["resolution"], meta["mean"], meta["std"], PARITY_IMAGES, "fp32",
        channels_last=False,
    )
    wrapper = exportable_model(model, meta)
    t0 = time.perf_counter()
    metadata = export_metadata(meta)
    example = images[: max(2, min(8, len(images)))]
    exported: Callable[[torch.Tensor], torch.Tensor]
    try:
        if fmt == "onnx":
            data = with_onnx_metadata(onnx_bytes(wrapper, example), metadata)
            session = onnx_session(data, threads=torch.get_num_threads())
            exported = partial(onnx_logits, session)
        else:
            data = torchscript_bytes(wrapper, example, metadata)
            exported = partial(torchscript_logits, torchscript_module(data))
    except Exception as e:  # exporters fail in many ways; all of them mean "not exportable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"cannot export {meta['backbone']} to {fmt} ({type(e).__name__}: {first}): try the "
            f"other --format; --debug shows the exporter's traceback"
        ) from e
    seconds = time.perf_counter() - t0
    # The batch axis must really be dynamic (one image, an odd batch), and TorchScript also
    # takes float 0..255 input; every check must hold before anything is written.
    checks = [("", images)] + [(f" at batch size {n}", images[:n]) for n in (1, 7) if len(images) > n]
    if fmt == "torchscript":
        checks.append((" with float input", images.float()))
    result: dict = {}
    for label, x in checks:
        check = parity(reference[: len(x)], exported(x))
        result = result or check
        if not check["ok"]:
            raise UserError(
                f"{fmt} export of {run_dir} failed its parity check{label} on {check['n']} "
                f"validation images (max |logit diff| {check['max_abs_diff']:.3g}, needs < "
                f"{PARITY_TOLERANCE:g}; top-1 agrees on {check['top1_agree']}/{check['n']}): "
                f"nothing written; try the other --format, or report it with the backbone name "
                f"({meta['backbone']})"
            )
    result.update({
        "format": fmt, "path": str(out), "bytes": len(data), "export_seconds": seconds,
        "also_checked": [label.strip() for label, _ in checks[1:]],
    })
    atomic_write_bytes(out, data)
    return result
