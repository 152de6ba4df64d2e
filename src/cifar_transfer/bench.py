"""Throughput table: backbone x resolution x precision x train/infer, in images per second."""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cifar_transfer import hardware
from cifar_transfer.data import to_model_input
from cifar_transfer.models import create_model


@dataclass
class Cell:
    """One measured configuration."""

    backbone: str
    resolution: int
    precision: str
    mode: str
    batch_size: int
    steps: int
    seconds: float
    img_per_s: float
    device: str
    threads: int
    memory_format: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    backbone: str,
    resolution: int,
    precision: str,
    mode: str,
    batch_size: int,
    seconds: float,
    device: torch.device,
    channels_last: bool = True,
) -> Cell:
    """Time full steps (uint8 batch -> resize -> normalize -> model [-> backward -> SGD step])."""
    torch.manual_seed(0)
    model = create_model(backbone, "none", "linear").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = model.spec
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        x = to_model_input(images, resolution, spec.mean, spec.std, channels_last)
        if mode == "train":
            model.train()
            with hardware.autocast(device, precision):
                loss = F.cross_entropy(model(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.inference_mode(), hardware.autocast(device, precision):
                model(x)

    step()  # warm-up: allocator, oneDNN/cuDNN algorithm choice
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
        _sync(device)
        if n >= 2 and time.perf_counter() - t0 > 4 * seconds:  # a very slow cell: stop at 2 steps
            break
    elapsed = time.perf_counter() - t0
    return Cell(
        backbone, resolution, precision, mode, batch_size, n, round(elapsed, 2),
        round(n * batch_size / elapsed, 2), str(device), torch.get_num_threads(),
        "channels_last" if channels_last else "nchw",
    )


def run_bench(
    backbones: list[str],
    resolutions: list[int],
    precisions: list[str],
    modes: list[str],
    batch_size: int,
    seconds: float,
    device_name: str = "auto",
    memory_formats: tuple[str, ...] = ("channels_last",),
) -> list[dict]:
    """Measure every combination; print each row as it lands."""
    device = hardware.pick_device(device_name)
    rows = []
    grid = itertools.product(backbones, resolutions, precisions, modes, memory_formats)
    for b, r, p, m, fmt in grid:
        cell = measure(b, r, p, m, batch_size, seconds, device, fmt == "channels_last")
        rows.append(asdict(cell))
        print(
            f"{b:20s} {r:4d}px {p:5s} {m:6s} {fmt:13s} bs {batch_size:3d}: "
            f"{cell.img_per_s:9.2f} img/s "
            f"({cell.steps} steps, {cell.seconds:.1f}s)",
            flush=True,
        )
    return rows
