"""Training throughput, the tutorial way vs this tool's way, in one run, as a ratio (issue 3, goal 3).

    .venv/bin/python benchmarks/side_by_side.py --data-dir ../shared/cifar10 \
        [--backbone resnet50] [--resolution 224] [--batch-size 32] [--steps 8]

Same model (random init: speed does not depend on the weights), same batch size, same
resolution, same optimizer (SGD momentum), every layer trained, real CIFAR-10 images:

- tutorial: a torchvision `Dataset` of PIL images with `Resize(224)`, `RandomHorizontalFlip`,
  `ToTensor`, `Normalize`, a `DataLoader` with 2 workers, fp32, NCHW (what the write-ups'
  Keras and most PyTorch tutorials do);
- ours: the uint8 images resident on the device as one tensor, random crop + flip and the
  resize to 224 done batched on the device (`transforms.augment`, `transforms.to_model_input`), bf16
  autocast where the hardware runs it fast (`hardware.pick_precision("auto")`), channels_last,
  and glibc malloc keeping freed memory (`allocator.keep_freed_memory()`, as the `cifar-transfer`
  command does at start). The tutorial runs first, before that setting, as a plain script would.

Each side runs `--warmup` untimed steps, then `--steps` timed ones, end to end (input pipeline
included).

`--frozen` times write-up 1's model instead: the backbone frozen, only a linear head trained,
for `--epochs` epochs over the first `--images` training images. The tutorial pushes every image
through the frozen backbone again every epoch (fp32, NCHW, the PIL pipeline above, flips off as
in the write-up); ours extracts the features once (`features.extract_features`: resident uint8,
device resize, bf16 where fast, channels_last, eager) and trains the head on them. Both sides
use the same optimizer, batch size and number of head updates. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar_transfer.data.augment import augment
from cifar_transfer.data.cifar10 import load_split, resolve_data_dir
from cifar_transfer.data.transforms import to_model_input
from cifar_transfer.models.transfer import apply_freeze, create_model
from cifar_transfer.system import allocator, hardware
from cifar_transfer.training.features import extract_features


class PILCifar(Dataset):
    """CIFAR-10 as PIL images through torchvision transforms, the way tutorials feed a model."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3) uint8
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def sgd_step(model, opt, x, y, precision: str) -> None:
    with hardware.autocast(torch.device("cpu"), precision):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def tutorial(args, images, labels) -> float:
    torch.manual_seed(0)
    model = create_model(args.backbone, "none", "linear").train()
    spec = model.spec
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    tf = transforms.Compose([
        transforms.Resize(args.resolution), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])  # fmt: skip
    loader = DataLoader(
        PILCifar(images, labels, tf), batch_size=args.batch_size, shuffle=True, num_workers=2,
        drop_last=True,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(args.warmup):
        x, y = next(it)
        sgd_step(model, opt, x, y, "fp32")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(it)
        sgd_step(model, opt, x, y, "fp32")
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def ours(args, images, labels, compile_model: bool = False) -> tuple[float, str]:
    torch.manual_seed(0)
    precision = hardware.pick_precision("auto", torch.device("cpu"))
    model = create_model(args.backbone, "none", "linear").train()
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    spec = model.spec
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(labels), (args.batch_size,), generator=gen)
        x = augment(images[idx], "crop-flip", gen)
        x = to_model_input(x, args.resolution, spec.mean, spec.std, True)
        sgd_step(net, opt, x, labels[idx], precision)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if compile_model:
        print(f"  compile + {args.warmup} warm-up steps: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - t0), precision


def frozen_model(args):
    """Write-up 1's model: the backbone frozen (BatchNorm statistics too), a linear head trained."""
    torch.manual_seed(0)
    model = create_model(args.backbone, "none", "linear")
    model.train()
    apply_freeze(model, "all")
    opt = torch.optim.SGD(model.head.parameters(), lr=1e-3, momentum=0.9)
    return model, opt


def tutorial_frozen(args, images, labels) -> float:
    """Every epoch runs every image through the frozen backbone, as the write-up's Keras model does."""
    model, opt = frozen_model(args)
    spec = model.spec
    tf = transforms.Compose([
        transforms.Resize(args.resolution), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])  # fmt: skip
    loader = DataLoader(
        PILCifar(images, labels, tf), batch_size=args.batch_size, shuffle=True, num_workers=2
    )
    x, y = next(iter(loader))  # warm-up step, untimed
    sgd_step(model, opt, x, y, "fp32")
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in loader:
            sgd_step(model, opt, x, y, "fp32")
        print(f"  tutorial epoch {epoch + 1}: {time.perf_counter() - t0:.0f} s", flush=True)
    return args.epochs * len(labels) / (time.perf_counter() - t0)


def ours_frozen(args, images, labels) -> tuple[float, float, str]:
    """Features extracted once, then the head trained on them: (img/s over all epochs, after 1, precision)."""
    precision = hardware.pick_precision("auto", torch.device("cpu"))
    model, opt = frozen_model(args)
    model = model.to(memory_format=torch.channels_last)
    extract_features(model, images[: args.batch_size], args.resolution, args.batch_size, precision,
                     True, progress=False)  # warm-up, untimed
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    feats = extract_features(model, images, args.resolution, args.batch_size, precision, True,
                             "ours: features", progress=False)
    model.head.train()
    after_one = None
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(args.batch_size):
            sgd_step(model.head, opt, feats[idx], labels[idx], "fp32")
        if epoch == 0:
            after_one = len(labels) / (time.perf_counter() - t0)
        print(f"  ours epoch {epoch + 1}: {time.perf_counter() - t0:.1f} s", flush=True)
    return args.epochs * len(labels) / (time.perf_counter() - t0), after_one, precision


def main_frozen(args, images, labels) -> dict:
    images, labels = images[: args.images], labels[: args.images]
    slow = tutorial_frozen(args, images, labels)
    print(f"tutorial, frozen backbone every epoch (PIL, DataLoader x2, fp32, NCHW): {slow:7.2f} img/s")
    allocator.keep_freed_memory()  # ours from here on: the tool's process setting
    fast, fast_one, precision = ours_frozen(args, images, labels)
    print(f"ours, features once ({precision}, channels_last) + head: {fast:7.2f} img/s over "
          f"{args.epochs} epochs ({fast_one:.2f} img/s for 1 epoch)")
    print(f"ratio ours / tutorial = {fast / slow:.2f}x over {args.epochs} epochs "
          f"({fast_one / slow:.2f}x for a single epoch)", flush=True)
    return {
        "mode": "frozen", "backbone": args.backbone, "resolution": args.resolution,
        "batch_size": args.batch_size, "images": len(labels), "epochs": args.epochs,
        "threads": torch.get_num_threads(), "tutorial_img_per_s": slow, "ours_img_per_s": fast,
        "ours_img_per_s_one_epoch": fast_one, "ours_precision": precision, "ratio": fast / slow,
        "ratio_one_epoch": fast_one / slow,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/cifar10")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--frozen", action="store_true", help="write-up 1's model: frozen backbone + head")
    ap.add_argument("--epochs", type=int, default=4, help="--frozen: head epochs (write-up 1: 4)")
    ap.add_argument("--images", type=int, default=1024, help="--frozen: training images per epoch")
    args = ap.parse_args()
    images, labels = load_split(resolve_data_dir(args.data_dir), "train")
    if args.frozen:
        result = main_frozen(args, images, labels)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    slow = tutorial(args, images, labels)
    print(f"tutorial (PIL Resize, DataLoader x2 workers, fp32, NCHW): {slow:7.2f} img/s", flush=True)
    allocator.keep_freed_memory()  # ours from here on: the tool's process setting
    fast, precision = ours(args, images, labels)
    print(f"ours (resident uint8, device resize, {precision}, channels_last): {fast:7.2f} img/s")
    result = {
        "backbone": args.backbone, "resolution": args.resolution, "batch_size": args.batch_size,
        "steps": args.steps, "threads": torch.get_num_threads(), "tutorial_img_per_s": slow,
        "ours_img_per_s": fast, "ours_precision": precision, "ratio": fast / slow,
    }  # fmt: skip
    print(f"ratio ours / tutorial = {fast / slow:.2f}x", flush=True)
    if args.compile:
        compiled, _ = ours(args, images, labels, compile_model=True)
        print(f"ours + torch.compile: {compiled:7.2f} img/s, ratio {compiled / slow:.2f}x")
        result["ours_compiled_img_per_s"] = compiled
        result["ratio_compiled"] = compiled / slow
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
