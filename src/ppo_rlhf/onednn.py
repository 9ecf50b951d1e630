"""Float32 CPU matmuls of linear layers through oneDNN instead of torch's default BLAS.

Why: on the CPU, torch runs float32 `F.linear`/`matmul` through MKL, and MKL takes its AVX2 code
path on AMD processors even where they have AVX-512. oneDNN (bundled with torch, used by torch for
bf16 and by Inductor) runs the same float32 product with AVX-512. Measured on this project's
2-core AMD EPYC (Zen 5) machine, float32, same results to rounding (relative error 6e-7 against
float64, like MKL's 4e-7):

    (M, K, N)            1 thread: MKL -> oneDNN     2 threads
    (1280, 256, 768)     103 -> 226 GFLOP/s          204 -> 446 GFLOP/s
    (32, 256, 768)        89 -> 158 GFLOP/s (decoding one token for 32 rows)
    (8, 128, 384)        13 us -> 19 us (small: oneDNN's fixed cost per call loses)
    (32, 256, 256)       45 us -> 36 us

So a layer goes through oneDNN when its product has at least `MIN_MACS` multiply-adds, runs on
the CPU in float32 outside autocast, and its weight is a plain tensor (not an FSDP DTensor, not
under torch.compile); everything else is the usual `F.linear`. Forward and both backward products
use oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor emits for CPU linears); the
numbers are those of the same float32 products in another order of summation.

`use_onednn(model)` switches a model's `nn.Linear` and GPT-2 `Conv1D` layers to subclasses whose
forward does this (the class changes, nothing else: state dicts, `save_pretrained`, peft and
`isinstance` checks see the same layers). `set_enabled(False)` (config `run.onednn=false`) turns
the path off process-wide; it is also off where oneDNN is missing or fails a self-check, and the
stages use it only on AMD CPUs with AVX-512 (`pays_here`): without AVX-512 it measured slower, and
on Intel, where MKL has its AVX-512 path, oneDNN's gradient products measured 2x slower.

Under bf16 autocast (`run.dtype=bfloat16`) these layers call plain `F.linear`, and that is already
oneDNN: autocast casts the operands to bf16 and torch's CPU bf16 GEMM runs oneDNN's
`brg_matmul:avx512_core_bf16` kernel (AMX on CPUs that have it), as `ONEDNN_VERBOSE=1` shows, with
the weight cast cached for the whole autocast region. Calling `_linear_pointwise` on bf16 operands
instead measured the same (1 thread, this machine, GFLOP/s, best of 5): (2560, 256, 768) 124 via
torch vs 126 direct, (2560, 1024, 256) 142 vs 143, (2048, 2048, 2048) 211 vs 211 -- about 1.7-2.3x
fp32 oneDNN (75, 73, 90) -- so there is nothing to gain from a second bf16 route here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .precision import cpu_vendor as _cpu_vendor

log = logging.getLogger(__name__)

# Products smaller than this many multiply-adds stay on torch's default path. Single-threaded
# crossover ~1M: (32, 128, 256) 23.7 vs 23.1 us, but slower inside a decode loop; at 2M oneDNN
# wins 1.26-1.41x ((32, 256, 256) 44.9 -> 35.6 us, (128, 64, 256) 42.7 -> 30.2 us).
MIN_MACS = 1 << 21

_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn the oneDNN path on or off for this process (config `run.onednn`)."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    """Whether the path is switched on for this process (`set_enabled`)."""
    return _enabled


@contextlib.contextmanager
def disabled():
    """torch's own linear kernels inside the block (e.g. for double backward, which the oneDNN
    Function does not implement)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias on oneDNN; strided (transposed) operands are fine."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def available() -> bool:
    """oneDNN is built in, the CPU is x86-64, and the op gives F.linear's result."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((64, 96), (80, 96), (80,)))
        ok = torch.allclose(_onednn_linear(x, w.t().contiguous().t(), b), F.linear(x, w, b),
                            rtol=1e-4, atol=1e-4)
    except (AttributeError, RuntimeError, TypeError) as exc:  # op missing or changed in this build
        log.info("oneDNN linear unavailable (%s); using torch's default matmul", exc)
        return False
    return ok


def pays_here() -> bool:
    """Whether this CPU is one where the path gains: an AMD CPU with AVX-512 (torch's CPU
    capability).

    The gain comes from AVX-512, which MKL's path does not use on AMD. Without it, MKL's AVX2 code
    is what the CPU can do and oneDNN's is slower per call: measured on a 2-core AMD EPYC (Zen 3,
    AVX2, no AVX-512), quiet, the SFT stage's step (tiny-gpt2, 64 sequences) took 52.2 / 50.9 ms
    through oneDNN against 43.3 / 43.5 ms without (two runs each, interleaved). On Intel, MKL runs
    AVX-512 itself, and oneDNN was no faster forward (0.90-1.20x) and about 2x slower for the
    weight gradient ((960, 128, 384): 1,525 vs 727 us); a training step (forward, backward, AdamW,
    best of 3 interleaved rounds, 2-core Xeon with AMX, quiet) took tiny-gpt2 B=32 31.3 vs 26.4 ms,
    B=64 51.1 vs 34.4 ms, small-gpt2 B=32 x 80 tokens 509 vs 434 ms through oneDNN vs MKL.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_vendor() == "AuthenticAMD"


class _LinearFn(torch.autograd.Function):
    """y = x @ weight^T + bias with all three products on oneDNN. x: (M, K), weight: (N, K)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_out, weight.t(), None)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            if weight.is_contiguous():  # nn.Linear: (N, M) @ (M, K)
                grad_w = _onednn_linear(grad_out.t(), x.t(), None)
            else:  # Conv1D's (K, N) weight seen transposed: make the grad in its layout
                grad_w = _onednn_linear(x.t(), grad_out.t(), None).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_or_none(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight^T + bias on oneDNN where that pays (see the module docstring); None elsewhere."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if not (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and rows * in_features * out_features >= MIN_MACS
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and available()
    ):
        return None
    x2 = x.reshape(rows, in_features)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    # Without autograd (sampling, scoring) skip the Function's bookkeeping: decoding calls
    # this ~1,000 times per rollout.
    out = _LinearFn.apply(x2, weight, bias) if needs_grad else _onednn_linear(x2, weight, bias)
    return out.view(*x.shape[:-1], out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), on oneDNN where that pays (see the module docstring)."""
    out = _onednn_or_none(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU products run on oneDNN (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNConv1D(Conv1D):
    """GPT-2's `Conv1D` (weight stored (in, out)) on oneDNN: y = x @ W + b = linear(x, W^T, b).

    Off the path (bf16 autocast above all) it is Conv1D's own `addmm` on the stored weight: under
    autocast a cast of `W^T`, a view, would miss autocast's weight-cast cache and be redone, as a
    transposing copy, at every call (4L d=256 B=32 bf16 rollout: 1,024 such copies, 0.2 s).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _onednn_or_none(x, self.weight.t(), self.bias)
        return super().forward(x) if out is None else out


def use_onednn(model: nn.Module) -> int:
    """Switch `model`'s nn.Linear and Conv1D layers to the oneDNN subclasses; returns how many.

    Only exact classes are switched (peft's LoRA layers wrap them and keep working; other
    subclasses may have their own forward).
    """
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
        elif type(module) is Conv1D:
            module.__class__ = OneDNNConv1D
            swapped += 1
    return swapped
