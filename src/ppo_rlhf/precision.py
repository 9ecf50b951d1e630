"""Compute precision: which dtype a stage computes in (`run.dtype`) and the bf16 autocast context.

A leaf module (torch only), so that distributed.py and stages/common.py both import it.
`run.dtype=auto` means bf16 on CUDA devices that support it and on CPUs with native bf16 products
(AMX or AVX512-BF16), else float32; weights, optimizer state, log-softmax and losses stay float32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import RunConfig


# CPU flags (as /proc/cpuinfo names them) of native bf16 products: AMX tiles (Intel Sapphire
# Rapids and later) or AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU from /proc/cpuinfo; (platform name, no flags)
    where there is none (macOS, Windows): such machines then count as having no bf16 units."""
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_dtype_choice(model: str, flags: frozenset[str] | set[str]) -> tuple[str, str]:
    """`run.dtype=auto` on a CPU: ("bfloat16", reason) where it has native bf16 products
    (`BF16_CPU_FLAGS`), else ("float32", reason). A pure function of the CPU's model and flags."""
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found:
        return "bfloat16", f"auto: the CPU ({model or 'unknown'}) has {'+'.join(found)}"
    return "float32", (f"auto: the CPU ({model or 'unknown'}) has no native bf16 products "
                       f"({' or '.join(BF16_CPU_FLAGS)})")


def dtype_choice(requested: str, device: torch.device) -> tuple[str, str]:
    """(dtype, reason) for the config value `run.dtype` ('auto', 'float32' or 'bfloat16')."""
    if requested != "auto":
        return requested, "run.dtype"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {name} supports bf16"
        return "float32", f"auto: {name} does not support bf16"
    if device.type == "cpu":
        return cpu_dtype_choice(*_cpu_info_cached())
    return "float32", f"auto: bf16 autocast is not used on {device.type}"


@functools.cache
def _cpu_info_cached() -> tuple[str, frozenset[str]]:
    return cpu_info()


def resolve_dtype(run: RunConfig, device: torch.device) -> str:
    """The precision a stage computes in: "float32" or "bfloat16" (from `run.dtype`, where "auto"
    means bf16 on CPUs with AMX or AVX512-BF16 and on CUDA devices that support it)."""
    return dtype_choice(run.dtype, device)[0]


def autocast(device: torch.device, dtype: str):
    """bf16 autocast (on the CPU or CUDA) when `dtype` resolves to bfloat16 (a resolved dtype or
    `run.dtype` itself, 'auto' included); a no-op context otherwise.

    Parameters, gradients and optimizer state stay float32; matmuls run in bf16, and log-softmax,
    losses and advantages are computed in float32 (generation.py applies the LM head in float32).
    """
    enabled = dtype_choice(dtype, device)[0] == "bfloat16" and device.type in ("cpu", "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
