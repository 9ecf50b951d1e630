"""torchrun / DDP / FSDP2 helpers: process-group set-up, rank-aware I/O, all-reduce of statistics,
model wrapping (DDP or `fully_shard`, activation checkpointing) and full-tensor checkpoints.

Everything here also works in a plain single process (world size 1), where the collectives are
identities, so the stages call them unconditionally. docs/distributed.md describes the semantics.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .precision import resolve_dtype

if TYPE_CHECKING:
    from .config import RunConfig


def init_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); no-op otherwise."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    # Statistics are reduced as small CPU tensors: on GPUs, gloo carries those and NCCL the rest.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group once a run has finished on every rank: a process that exits with
    gloo's threads still running can abort at exit ("terminate called without an active exception",
    seen on a loaded machine), failing a run that had succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """Reduce a tensor over ranks into a new tensor (identity in one process)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=op)
    return y


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over ranks."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop signal one rank received)."""
    return bool(all_reduce_max(torch.tensor(float(flag))).item())


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


def gather_shards(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `shard`: every rank's rows back in global order, on every rank.

    Rank r holds global rows r, r + W, r + 2W, ... (W = world size), all ranks the same number of
    equally-shaped rows; the result interleaves them. Bool tensors travel as uint8 (gloo has no bool).
    """
    if not is_distributed():
        return x
    y = all_gather_cat(x.to(torch.uint8) if x.dtype == torch.bool else x)
    rows = world_size() * x.shape[0]  # not -1: a (B, 0) tensor has no elements to infer it from
    y = y.view(world_size(), x.shape[0], *x.shape[1:]).transpose(0, 1).reshape(rows, *x.shape[1:])
    return y.bool() if x.dtype == torch.bool else y


def all_reduce_dict(values: dict[str, float | torch.Tensor], op: str = "sum") -> dict[str, float]:
    """Sum ("sum") or maximum ("max") of each scalar over ranks in one collective.

    Every rank must pass the same keys.
    """
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = all_reduce_max(t) if op == "max" else all_reduce_sum(t)
    return dict(zip(keys, t.tolist()))


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when running under torchrun; the model itself otherwise."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def wrap_model(model: nn.Module, device: torch.device, run: RunConfig) -> nn.Module:
    """The module to run training forwards through: DDP, or with `run.fsdp` the model itself
    sharded in place by FSDP2 (every transformer block, then the root), frozen models included.

    Create optimizers after this call (FSDP replaces the parameters with sharded DTensors).
    `run.activation_checkpointing` recomputes each block's activations in backward. With FSDP and
    `run.dtype=bfloat16` on CUDA, blocks compute in bf16 and gradients are reduced in fp32.
    """
    trainable = any(p.requires_grad for p in model.parameters())
    if run.activation_checkpointing and trainable:
        enable_activation_checkpointing(model)
    if not run.fsdp:
        return wrap_ddp(model, device)
    if not is_distributed():
        return model
    if callable(getattr(model, "get_base_model", None)):
        raise UserError("run.fsdp does not support LoRA models (model.lora_r > 0); fix: set "
                        "model.lora_r=0, or run.fsdp=false to train the adapters with DDP")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = device.type == "cuda" and resolve_dtype(run, device) == "bfloat16"  # run.dtype auto too
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    # An unsharded copy of the structure on the meta device (no memory, ties kept): the template
    # of the full-tensor replicas that checkpoints and exports are written from.
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.to("meta") for b in model.buffers()})
    _skeletons[model] = copy.deepcopy(model, memo)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


_skeletons: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (its ModuleList of num_hidden_layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    raise UserError(f"{type(model).__name__}: cannot find its {n} transformer blocks to shard or "
                    "checkpoint; fix: use a GPT-2, Llama or Qwen-style model, or run.fsdp=false and "
                    "run.activation_checkpointing=false")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block's activations in backward instead of storing them.

    The block's own `forward` is wrapped (not the module), so parameter names, state dicts and
    the generation fast path, which calls the blocks' submodules, are unchanged.
    """
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_checkpointed, layer.forward)


# Names Hugging Face blocks give their KV cache: a cache written during forward would be written
# again when backward replays the block, so checkpointed blocks run without one.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    bound = inspect.signature(forward).bind(*args, **kwargs)  # the cache may come positionally
    for name in _CACHE_KWARGS:
        if bound.arguments.get(name) is not None:
            bound.arguments[name] = None
    if bound.arguments.get("use_cache"):
        bound.arguments["use_cache"] = False
    return checkpoint(forward, *bound.args, use_reentrant=False, **bound.kwargs)


def _fsdp_modules(*models: nn.Module | None) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module | None) -> bool:
    return bool(model is not None and _skeletons.get(model) is not None)


@contextmanager
def full_params(*models: nn.Module | None) -> Iterator[None]:
    """Inside the block the FSDP models among `models` hold their full parameters and run without
    collectives, so ranks may do different amounts of work (sampling, evaluation) and code that
    calls submodules directly (the generation fast path) sees plain tensors. No-op without FSDP.

    Costs one full copy of each model per rank while it lasts.
    """
    modules = _fsdp_modules(*models)
    roots = {id(m) for m in models if m is not None}
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # FSDP's defaults: blocks free their full parameters after forward; the root keeps
            # them, since backward needs them at once.
            m.set_reshard_after_forward(id(m) not in roots, recurse=False)


def plain_copy(model: nn.Module) -> nn.Module | None:
    """An unsharded CPU copy of an FSDP model on rank 0 (None elsewhere), e.g. for save_pretrained;
    the model itself without FSDP. Collective under FSDP: call it on every rank."""
    if not is_fsdp(model):
        return model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    replica = _replica(model)
    replica.load_state_dict(state)
    return replica


def _replica(model: nn.Module) -> nn.Module:
    """An uninitialised unsharded CPU copy of FSDP `model` (ties restored, buffers not)."""
    replica = copy.deepcopy(_skeletons[model]).to_empty(device="cpu")
    if hasattr(model, "config"):  # the live config: e.g. the reward normalisation set after training
        replica.config = copy.deepcopy(model.config)
    if callable(getattr(replica, "tie_weights", None)):
        replica.tie_weights()
    return replica


class _FullOptimizerState:
    """A checkpoint entry: an FSDP optimizer's state as full tensors keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None):
        self.model, self.optimizer, self.state = model, optimizer, state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def _owner(optimizer: torch.optim.Optimizer, models: list[nn.Module]) -> nn.Module | None:
    """The FSDP model among `models` whose parameters `optimizer` updates."""
    first = optimizer.param_groups[0]["params"][0]
    return next((m for m in models if any(p is first for p in m.parameters())), None)


def for_saving(state: dict[str, Any]) -> dict[str, Any]:
    """`state` for `CheckpointManager.save`, with FSDP models and their optimizers gathered to
    full CPU tensors on rank 0 (the model files are those of an unsharded run). Collective under
    FSDP: call it on every rank. Identity without FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    models = [v for v in state.values() if isinstance(v, nn.Module) and is_fsdp(v)]
    if not models:
        return state
    out = dict(state)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for name, value in state.items():
        if isinstance(value, nn.Module) and is_fsdp(value):
            out[name] = plain_copy(value) or value
        elif isinstance(value, torch.optim.Optimizer) and (owner := _owner(value, models)) is not None:
            out[name] = _FullOptimizerState(owner, value, get_optimizer_state_dict(owner, value, options=options))
    return out


def for_loading(state: dict[str, Any]) -> dict[str, Any]:
    """`state` for `CheckpointManager.load` (on every rank): FSDP models load a checkpoint written
    via `for_saving` through a full CPU replica that then hands each rank its shard, and their
    optimizers likewise. Identity without FSDP."""
    models = [v for v in state.values() if isinstance(v, nn.Module) and is_fsdp(v)]
    if not models:
        return state
    out = dict(state)
    for name, value in state.items():
        if isinstance(value, nn.Module) and is_fsdp(value):
            replica = _replica(value)
            replica.register_load_state_dict_post_hook(functools.partial(_push_to_shards, value))
            out[name] = replica
        elif isinstance(value, torch.optim.Optimizer) and (owner := _owner(value, models)) is not None:
            out[name] = _FullOptimizerState(owner, value, None)
    return out


def _push_to_shards(model: nn.Module, replica: nn.Module, _incompatible) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, replica.state_dict(), options=StateDictOptions(full_state_dict=True))
