"""Device, precision and thread choices, made by what the hardware runs fast."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from cifar_transfer.system.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but no CUDA GPU is visible: use --set run.device=cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16; on plain AVX2 bf16 autocast is several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve 'auto' by the hardware's flags alone (measure.auto_precision measures instead)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast where asked for, a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def set_threads(threads: int) -> None:
    """Pin intra-op threads when asked (0 keeps torch's default of one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def describe(device: torch.device, precision: str) -> dict:
    """What the run ran on, for config and reports."""
    info = {"device": str(device), "precision": precision, "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def others_cpu_use(seconds: float = 0.3) -> float | None:
    """Cores' worth of CPU the rest of the machine used over `seconds`, while this process slept.

    From /proc/stat's all-CPU line (busy = everything but idle and iowait; a VM's steal counts
    as busy: it is contention too). None where there is no /proc/stat (not Linux).
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
