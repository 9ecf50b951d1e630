"""torchrun / DDP helpers: process-group set-up, rank-aware I/O, all-reduce of statistics.

Everything here also works in a plain single process (world size 1), where the collectives are
identities, so the stages call them unconditionally.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); no-op otherwise."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes logs, reports and checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor; identity in one process)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, count) of x[mask] over all ranks, in float64 for stability."""
    m = mask.to(torch.float64)
    xs = x.to(torch.float64)
    stats = torch.stack([(xs * m).sum(), (xs * xs * m).sum(), m.sum()])
    s, ss, n = all_reduce_sum(stats).unbind()
    n_safe = n.clamp(min=1.0)
    mean = s / n_safe
    var = (ss / n_safe - mean * mean).clamp(min=0.0)
    return mean.to(x.dtype), var.to(x.dtype), n


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of a global batch: every world_size-th item starting at rank."""
    return list(indices[rank()::world_size()])


def reduce_metrics(metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean of scalar metrics over ranks (weight = this rank's sample count)."""
    if not is_distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) * weight for k in keys] + [weight], dtype=torch.float64)
    vals = all_reduce_sum(vals)
    total = vals[-1].item()
    return {k: (vals[i].item() / total if total else float("nan")) for i, k in enumerate(keys)}


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when running under torchrun; the model itself otherwise."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
