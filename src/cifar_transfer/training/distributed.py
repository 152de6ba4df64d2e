"""DistributedDataParallel under torchrun: the process group, rank helpers and the few collectives.

`torchrun --nproc_per_node=N -m cifar_transfer train ...` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `process_group()` joins them (gloo on
the CPU, nccl on CUDA). Every rank draws the same global batch from the shared seeded generator
and trains on its slice of it; DDP averages the gradients, so a run follows the same curve as one
process with the same global batch. Outside torchrun every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from cifar_transfer.system.errors import UserError

T = TypeVar("T")
# Long enough for rank 0 to extract a frozen backbone's features on a slow device while the other
# ranks wait at a barrier (the default, 10 to 30 minutes, is not).
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """True when this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside torchrun)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine: its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the body: nccl when training on CUDA, else gloo.

    Drop every DistributedDataParallel model before the body ends: one still alive when the group
    is destroyed made a gloo rank abort at exit about 1 run in 4 ("terminate called without an
    active exception"); with the model dropped first, 0 in 40.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run without torchrun")
    backend = "gloo"
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPUs are visible: "
                f"start at most that many processes per machine (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA run uses the GPU of its local rank, whatever index was configured."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every rank (no-op for one)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it (unchanged for one rank)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(n: int) -> slice:
    """This rank's contiguous part of n items (sizes differ by at most one; all of it for one rank)."""
    size, r = world_size(), rank()
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def main_only(fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 only; its UserError is raised on every rank, so none is left waiting.

    Returns fn's result on rank 0 and None elsewhere.
    """
    if not active():
        return fn()
    result, message = None, [None]
    if is_main():
        try:
            result = fn()
        except UserError as e:
            message = [str(e)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. fills a cache on disk), then the other ranks run it."""
    if active() and not is_main():
        barrier()
    yield
    if active() and is_main():
        barrier()


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover every rank's slice of the batch, over gloo.

    torch's SyncBatchNorm runs on GPUs only. This does the same on the CPU: per-channel sums of
    each slice are all-reduced (autograd-aware, so gradients flow across ranks as in
    SyncBatchNorm's backward) and every rank normalizes with the global batch's mean and variance.
    Outside training, or with one rank, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize with the global batch's statistics in training, else like BatchNorm."""
        if not (self.training and active()):
            return super().forward(x)
        # The functional all_reduce is autograd-aware: its backward all-reduces the gradients, so
        # each rank's slice also receives the other slices' share through the statistics.
        from torch.distributed._functional_collectives import all_reduce

        def summed(t: torch.Tensor) -> torch.Tensor:
            return all_reduce(t, "sum", dist.group.WORLD)

        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        # Two passes (mean, then squared deviations), as precise as one process's BatchNorm.
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        sums = summed(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        var = summed(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """timm's BatchNormAct2d (BatchNorm, then dropout and activation) with CpuSyncBatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the global batch, then the layer's own dropout and activation."""
        return self.act(self.drop(super().forward(x)))


def _cpu_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Swap plain BatchNorm (and timm's BatchNormAct2d) for CpuSyncBatchNorm, sharing the tensors."""
    out = module
    kind = type(module)
    plain = kind in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    with_act = kind.__name__ == "BatchNormAct2d" and hasattr(module, "act")
    if plain or with_act:
        out = (CpuSyncBatchNormAct if with_act else CpuSyncBatchNorm)(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if with_act:
            out.act, out.drop = module.act, module.drop
    for name, child in module.named_children():
        out.add_module(name, _cpu_sync_batchnorm(child))
    return out


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm over the global batch: SyncBatchNorm on CUDA (timm's converter keeps BN+act
    layers whole), CpuSyncBatchNorm on the CPU. Returns the converted model."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _cpu_sync_batchnorm(model)
