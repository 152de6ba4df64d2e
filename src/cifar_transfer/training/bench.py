"""Throughput table: backbone x resolution x precision x train/infer x input, in images per second.

`input = pipeline` times what a training step does: pick a batch of indices into a resident uint8
set of images, augment (crop + flip; none for infer), resize, normalize, model. `input = model`
feeds a tensor already resized and normalized on the device: the model alone. pipeline / model
close to 1 means the device never waits for its input.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cifar_transfer.data.augment import augment, map_shift, translate
from cifar_transfer.data.transforms import batch_indices, to_model_input
from cifar_transfer.models.split import TopModel, frozen_split
from cifar_transfer.models.transfer import apply_freeze, create_model
from cifar_transfer.system import hardware


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
    input: str
    compiled: bool
    weights: str


INPUTS = ("pipeline", "model")
MODES = ("train", "infer", "train-maps", "infer-maps")


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
    input: str = "pipeline",
    compiled: bool = False,
    weights: str = "none",
    freeze: str = "none",
) -> Cell:
    """Time full steps (input as `input` says -> model [-> backward -> SGD step]).

    `mode` "train-maps" times a cached partial phase's step: the top blocks + head on stored
    maps of the frozen part (`freeze`'s prefix, as phases.N.cache_frozen cuts it), map
    translation included; "infer-maps" the frozen part alone (what extracting the maps costs).
    `compiled` runs the model through torch.compile; the compile happens in the untimed warm-up.
    `weights` as model.weights: real weights can run at another speed than random init (in fp32
    on a CPU, tiny values that denormalize are slow). `freeze` as a phase's freeze: a train step
    of a partly frozen backbone skips the frozen layers' weight gradients.
    """
    if input not in INPUTS:
        raise ValueError(f"unknown input {input!r}: use one of {', '.join(INPUTS)}")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = create_model(backbone, weights, "linear").to(device)
    apply_freeze(model, freeze)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = model.spec
    # A resident set of 8 batches: each step draws a fresh random batch from it, as training does.
    pool = torch.randint(0, 256, (8 * batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    ready = to_model_input(pool[:batch_size], resolution, spec.mean, spec.std, channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    maps, step_mode = None, mode.removesuffix("-maps")
    if mode in ("train-maps", "infer-maps"):
        split = frozen_split(model)
        forward = split.bottom if mode == "infer-maps" else TopModel(split, model)
        with torch.no_grad(), hardware.autocast(device, precision):
            maps = split.bottom.eval()(ready)

    def batch() -> torch.Tensor:
        if maps is not None and step_mode == "train":  # stored maps: a batch is rows, then a shift
            return translate(maps, gen, map_shift(maps.shape[-1])).contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if input == "model":
            return ready
        idx = batch_indices(len(pool), batch_size, True, gen)[0].to(device, non_blocking=True)
        images = augment(pool[idx], "crop-flip" if step_mode == "train" else "none", gen)
        return to_model_input(images, resolution, spec.mean, spec.std, channels_last)

    def step() -> None:
        x = batch()
        if step_mode == "train":
            forward.train()
            with hardware.autocast(device, precision):
                loss = F.cross_entropy(forward(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            forward.eval()
            with torch.no_grad(), hardware.autocast(device, precision):
                forward(x)

    step()  # warm-up: allocator, oneDNN/cuDNN algorithm choice
    _sync(device)
    # Steps are queued without waiting (as in training); the clock is read after a sync.
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        for _ in range(8 if device.type == "cuda" else 1):
            step()
            n += 1
        _sync(device)
        if n >= 2 and time.perf_counter() - t0 > 4 * seconds:  # a very slow cell: stop at 2 steps
            break
    elapsed = time.perf_counter() - t0
    return Cell(
        backbone, resolution, precision, mode, batch_size, n, round(elapsed, 2),
        round(n * batch_size / elapsed, 2), str(device), torch.get_num_threads(),
        "channels_last" if channels_last else "nchw", input, compiled, weights,
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
    inputs: tuple[str, ...] = ("pipeline",),
    compiles: tuple[bool, ...] = (False,),
    weights: str = "none",
    freeze: str = "none",
) -> list[dict]:
    """Measure every combination (each with `freeze`); print each row as it lands."""
    device = hardware.pick_device(device_name)
    rows = []
    grid = itertools.product(backbones, resolutions, precisions, modes, memory_formats, inputs, compiles)
    for b, r, p, m, fmt, inp, comp in grid:
        cell = measure(b, r, p, m, batch_size, seconds, device, fmt == "channels_last", inp, comp, weights,
                       freeze)
        rows.append(asdict(cell))
        print(
            f"{b:20s} {r:4d}px {p:5s} {m:10s} {fmt:13s} {inp:8s} {'compiled' if comp else 'eager':8s} "
            f"bs {batch_size:3d}: "
            f"{cell.img_per_s:9.2f} img/s "
            f"({cell.steps} steps, {cell.seconds:.1f}s)",
            flush=True,
        )
    return rows
