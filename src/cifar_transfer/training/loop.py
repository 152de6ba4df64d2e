"""The two loops every phase runs: `train_one_epoch` and `validate` (timm's and torchvision's
split), over device-resident inputs: raw uint8 images or cached backbone features.

Under torchrun every rank draws the same global batch from the shared generator and trains on
its own slice; validation scores each rank's slice and sums. One process is the one-slice case
of the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from cifar_transfer.data.augment import augment
from cifar_transfer.data.mixing import Mixed, mix
from cifar_transfer.data.transforms import batch_indices, to_model_input
from cifar_transfer.models.inference import logits_of
from cifar_transfer.system import hardware
from cifar_transfer.training import distributed

# Steps between two host reads of the loss (is it finite?), per device type: on a GPU each read
# waits for the queued steps to finish, on a CPU it costs nothing.
CHECK_EVERY = {"cpu": 1, "cuda": 50}


class Diverged(Exception):
    """The training loss stopped being finite; `loss` is the first bad value."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"loss became {loss}")
        self.loss = loss


@dataclass
class PhaseInputs:
    """What a phase trains and validates on, resident on the training device.

    Raw images are augmented, resized and normalized per batch; cached features (`cached`) are
    fed to the head as they are.
    """

    train_x: torch.Tensor  # uint8 (N, 3, H, W) images, or float (N, D) features
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    cached: bool
    resolution: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: str | list[str] = "none"  # phases.N.augment (data/augment.py)
    channels_last: bool = True
    extract_seconds: float = 0.0  # time spent getting cached features (0 for raw images)
    class_weights: torch.Tensor | None = None  # data.class_weights = "auto": loss weight per class
    mixup: float = 0.0  # phases.N.mixup / cutmix: Beta alphas, 0 = off (data/mixing.py)
    cutmix: float = 0.0
    features_from_maps: bool = False  # the cached features are the top run on a later phase's maps

    def extract_fields(self) -> dict:
        """What the phase's first metrics row says about getting its cached inputs."""
        return {"extract_seconds": self.extract_seconds,
                **({"features_from_maps": True} if self.features_from_maps else {})}

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the network takes it."""
        if self.cached:
            return x
        return to_model_input(x, self.resolution, self.mean, self.std, self.channels_last)

    def train_batch(
        self, idx: torch.Tensor, part: slice, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, Mixed | None]:
        """This rank's slice of the global batch `idx` (indices on the device), augmented; with
        mixup/cutmix the labels are each image's dominant one and the Mixed its soft targets."""
        if self.cached:
            return self.train_x[idx[part]], self.train_y[idx[part]], None
        x = augment(self.train_x[idx], self.augment, gen)[part]  # same draw on every rank
        x, y = self.model_input(x), self.train_y[idx[part]]
        if not (self.mixup or self.cutmix):
            return x, y, None
        # The same lambda on every rank (one draw per global batch); pairs within the slice.
        mixed = mix(x, y, gen, self.mixup, self.cutmix)
        return mixed.x, mixed.y, mixed


@dataclass
class EpochResult:
    loss: float
    acc: float
    seen: int
    seconds: float


def train_one_epoch(
    forward: torch.nn.Module, net: torch.nn.Module, inputs: PhaseInputs, batch_size: int,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator, precision: str, label_smoothing: float = 0.0,
    ema: AveragedModel | None = None, desc: str = "train", progress: bool = True,
    stop: Callable[[], bool] | None = None, scaler: torch.amp.GradScaler | None = None,
) -> EpochResult:
    """One pass over the training inputs; `forward` is `net` or its DDP/compiled wrapper.

    `stop` is asked after every step (a budgeted run's pacing.Pacer): True ends the epoch there.
    `scaler` scales fp16 losses (CUDA GPUs without bf16).

    Raises Diverged when the loss stops being finite (no checkpoint is written inside an epoch,
    so the last one stays good).
    """
    t0 = time.perf_counter()
    device, world = inputs.train_y.device, distributed.world_size()
    net.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # Reading a GPU value on the host makes the host wait for every queued step, so there the
    # finiteness check runs every CHECK_EVERY steps and at the end; the first bad loss is kept.
    check_every = CHECK_EVERY.get(device.type, 1)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    first_bad = torch.zeros((), device=device)
    bar = tqdm(
        batch_indices(len(inputs.train_y), batch_size, shuffle=True, generator=gen), desc=desc,
        unit="batch", disable=not progress, mininterval=1.0, dynamic_ncols=True, leave=False,
    )  # fmt: skip
    seen = 0
    for step, idx in enumerate(bar):
        if len(idx) < world:  # a tail batch too small to give every rank an image
            continue
        x, y, mixed = inputs.train_batch(idx.to(device, non_blocking=True), distributed.shard(len(idx)), gen)
        with hardware.autocast(device, precision):
            logits = forward(x)
        # Mixed batches: soft-target cross-entropy (label smoothing applies to the soft targets).
        target = y if mixed is None else mixed.targets(logits.shape[1])
        loss = F.cross_entropy(
            logits.float(), target, weight=inputs.class_weights, label_smoothing=label_smoothing
        )
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where(nonfinite | finite, first_bad, loss.detach())
        nonfinite |= ~finite
        if step % check_every == check_every - 1 and nonfinite:
            break
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting each slice by its share of the global
        # batch makes that the global batch's mean even when slices differ in size.
        share = len(y) * world / len(idx)
        scaled = loss if share == 1 else loss * share
        if scaler is not None:
            scaler.scale(scaled).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            scaled.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress:
            bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        if stop is not None and stop():
            break
    bar.close()
    if nonfinite:
        raise Diverged(first_bad.item())
    seen_t = torch.tensor(float(seen), device=device, dtype=torch.float64)
    totals = torch.stack([loss_sum.double(), correct.double(), seen_t])
    loss_total, hits, seen_all = distributed.all_reduce_sum(totals).tolist()
    seen = int(seen_all)
    return EpochResult(loss_total / max(1, seen), hits / max(1, seen), seen, time.perf_counter() - t0)


class Validation(NamedTuple):
    """One validation pass: mean loss, accuracy, balanced accuracy (the mean recall over the
    classes present), and the float32 logits of every validation image in order (one process;
    None under torchrun, where each rank saw its slice only)."""

    loss: float | None
    acc: float | None
    balanced: float | None
    logits: torch.Tensor | None = None


@torch.inference_mode()
def validate(net: torch.nn.Module, inputs: PhaseInputs, batch_size: int, precision: str) -> Validation:
    """The validation inputs scored in eval mode; Nones without any.

    Batched exactly as `evaluate` batches the bundle's forward pass (same batch size, order and
    autocast), so the bundle's val_acc is what `evaluate --split val` prints, and the logits kept
    are the ones `evaluate` would compute: the run fits its temperature on them, with no second
    pass over the images.
    """
    n = len(inputs.val_y)
    if n == 0:  # val_size=0: nothing to measure (JSON has no NaN)
        return Validation(None, None, None)
    device = inputs.val_y.device
    part = distributed.shard(n)
    x, y = inputs.val_x[part], inputs.val_y[part]
    logits_all = logits_of(net, x, batch_size, precision, inputs.model_input)
    sums, per_class = torch.zeros(2, dtype=torch.float64, device=device), None
    for start in range(0, len(y), batch_size):  # sums batch by batch, as they always added up
        logits, target = logits_all[start : start + batch_size], y[start : start + batch_size]
        right = logits.argmax(1) == target
        sums[0] += F.cross_entropy(logits, target, reduction="sum").double()
        sums[1] += right.sum().double()
        if per_class is None:  # (images, hits) per class
            per_class = torch.zeros(2, logits.shape[1], dtype=torch.float64, device=device)
        per_class[0] += torch.bincount(target, minlength=logits.shape[1]).double()
        per_class[1] += torch.bincount(target[right], minlength=logits.shape[1]).double()
    if per_class is None:  # this rank's shard was empty; the class count is the head's
        per_class = torch.zeros(2, _classes(net), dtype=torch.float64, device=device)
    loss_sum, hits = distributed.all_reduce_sum(sums).tolist()
    counts, class_hits = distributed.all_reduce_sum(per_class)
    present = counts > 0
    balanced = float((class_hits[present] / counts[present]).mean())
    # float32 division, as a float32 mean computes it, so the figure is the one `evaluate` prints
    # and best-epoch ties compare equal when a run resumes under another world size.
    whole = logits_all if len(y) and distributed.world_size() == 1 else None
    return Validation(loss_sum / n, float(torch.tensor(hits, dtype=torch.float32) / n), balanced, whole)


def _classes(net: torch.nn.Module) -> int:
    """The number of outputs of the last linear layer of net."""
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
