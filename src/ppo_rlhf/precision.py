"""Compute precision: which dtype a stage computes in (`run.dtype`) and the bf16 autocast context.

A leaf module (torch only), so that distributed.py and stages/common.py both import it.
`run.dtype=auto` means bf16 on CUDA devices that support it and, on CPUs with native bf16 products
(AMX or AVX512-BF16), for models wide enough that bf16 was measured faster there
(`BF16_MIN_HIDDEN`); else float32. Weights, optimizer state, log-softmax and losses stay float32.
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

# The narrowest model (hidden size) for which `auto` picks bf16 on a CPU with that flag, by the kind
# of work (`WORKS`), from measurements on 2-core VMs (benchmarks/README.md, "On an Intel Xeon with
# AMX"; float32 time / bf16 time, A and B alternating in one process):
# - amx_bf16, Xeon, torch 2.13, float32 through MKL, exact GELU:
#   - "train" (SFT, reward model, DPO): tiny-gpt2 (2L d=128) SFT step 1.13-1.33x, RM step 1.18x,
#     DPO step 1.40x (benchmarks/train_steps_ab.py, 2 threads), at the same learning (arithmetic
#     pipeline, 3 seeds);
#   - "rl" (sampling, scoring and the PPO update): 2L d=128 B=64 1.01x, 4L d=256 B=32 1.53x
#     (benchmarks/interleaved_ab.py; with the tanh GELU 2L d=64 0.95-1.03x, d=128 0.89x).
# - avx512_bf16 without AMX, AMD EPYC Zen 5: tiny-gpt2 (d=128) steps 1.19x slower and its SFT
#   about 2x slower, small-gpt2 (d=256) 1.31x faster.
WORKS = ("train", "rl")
"""What a stage runs: "train" = teacher-forced forward and backward over whole sequences (SFT,
reward model, DPO); "rl" = token-by-token sampling, scoring and small updates (the RL stage)."""
BF16_MIN_HIDDEN = {("amx_bf16", "train"): 128, ("amx_bf16", "rl"): 256,
                   ("avx512_bf16", "train"): 256, ("avx512_bf16", "rl"): 256}


@functools.cache
def _cpuinfo() -> dict[str, str] | None:
    """The first value of each /proc/cpuinfo field (the first CPU's); None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU from /proc/cpuinfo; (platform name, no flags)
    where there is none (macOS, Windows): such machines then count as having no bf16 units."""
    fields = _cpuinfo()
    if fields is None:
        return platform.processor() or platform.machine(), frozenset()
    return fields.get("model name", ""), frozenset(fields.get("flags", fields.get("Features", "")).split())


def cpu_vendor() -> str:
    """The CPU's `vendor_id` ("AuthenticAMD", "GenuineIntel"); "" where it is unknown."""
    return (_cpuinfo() or {}).get("vendor_id", "")


def cpu_dtype_choice(model: str, flags: frozenset[str] | set[str], hidden: int | None = None,
                     work: str = "train") -> tuple[str, str]:
    """`run.dtype=auto` on a CPU: ("bfloat16", reason) where it has native bf16 products
    (`BF16_CPU_FLAGS`) and the model's hidden size is at least that kind's `BF16_MIN_HIDDEN` for
    `work` (an unknown size counts as wide enough), else ("float32", reason). A pure function."""
    if work not in WORKS:
        raise ValueError(f"work={work!r}: one of {WORKS}")
    cpu = model or "unknown"
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if not found:
        return "float32", f"auto: the CPU ({cpu}) has no native bf16 products ({' or '.join(BF16_CPU_FLAGS)})"
    need = BF16_MIN_HIDDEN[found[0], work]  # AMX first: the faster unit decides
    what = "training steps" if work == "train" else "RL iterations"
    if hidden is not None and hidden < need:
        return "float32", (f"auto: the CPU ({cpu}) has {'+'.join(found)}, but at hidden size {hidden} "
                           f"(< {need}) bf16 {what} measured no faster than float32 on such a CPU")
    size = f", and bf16 {what} measured faster from hidden size {need} (this model: {hidden})" \
        if hidden is not None else ""
    return "bfloat16", f"auto: the CPU ({cpu}) has {'+'.join(found)}{size}"


def dtype_choice(requested: str, device: torch.device, hidden: int | None = None,
                 work: str = "train") -> tuple[str, str]:
    """(dtype, reason) for the config value `run.dtype` ('auto', 'float32' or 'bfloat16'), for a
    model of `hidden` width (None: unknown) doing `work` (`WORKS`)."""
    if requested != "auto":
        return requested, "run.dtype"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {name} supports bf16"
        return "float32", f"auto: {name} does not support bf16"
    if device.type == "cpu":
        return cpu_dtype_choice(*cpu_info(), hidden=hidden, work=work)
    return "float32", f"auto: bf16 autocast is not used on {device.type}"


def resolve_dtype(run: RunConfig, device: torch.device) -> str:
    """The precision of `run.dtype` when the model's width is not known: "float32" or "bfloat16"
    (the stages use `common.compute_dtype`, which knows it)."""
    return dtype_choice(run.dtype, device)[0]


def autocast(device: torch.device, dtype: str):
    """bf16 autocast (on the CPU or CUDA) when `dtype` is bfloat16 (a dtype that `resolve_dtype`
    returned; 'auto' here knows no model size); a no-op context otherwise.

    Parameters, gradients and optimizer state stay float32; matmuls run in bf16, and log-softmax,
    losses and advantages are computed in float32 (generation.py applies the LM head in float32).
    """
    enabled = dtype_choice(dtype, device)[0] == "bfloat16" and device.type in ("cpu", "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
