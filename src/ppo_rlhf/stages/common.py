"""Pieces every training stage shares: device and seeding, optimiser + LR schedule, the guarded
optimizer step, and the deterministic data order that makes resume exact."""

from __future__ import annotations

import functools
import json
import math
import random
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import distributed as dist
from .. import onednn
from ..config import ModelConfig, OptimConfig, RunConfig
from ..errors import UserError
from ..models import hidden_size
from ..precision import autocast as autocast  # the helpers live in precision.py; stages call common.*
from ..precision import dtype_choice


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when available, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device: '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device: CUDA was requested but is not available; use run.device=cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def linear_path(device: torch.device) -> str:
    """'; float32 linears: ...' -- which matmuls a CPU stage's float32 linear layers run on."""
    if device.type != "cpu":
        return ""
    if onednn.is_enabled() and onednn.available():
        return "; float32 linears: oneDNN (AVX-512, AMD)"
    why = "" if onednn.pays_here() else " (oneDNN measured faster only on AMD CPUs with AVX-512)"
    return f"; float32 linears: torch's default{why}"


def compute_dtype(run: RunConfig, device: torch.device, model: str | None = None, work: str = "train") -> str:
    """The precision a stage computes in, "float32" or "bfloat16", for the model it trains (a
    preset, size spec or directory) and the kind of work it does (`precision.WORKS`: "train" for
    SFT, RM and DPO, "rl" for the RL stage); `run.dtype=auto` weighs both."""
    return _dtype_choice(run, device, model, work)[0]


def _dtype_choice(run: RunConfig, device: torch.device, model: str | None, work: str) -> tuple[str, str]:
    return dtype_choice(run.dtype, device, hidden_size(model) if model else None, work)


def setup(run: RunConfig, stage: str = "run", model: str | None = None, work: str = "train") -> torch.device:
    """Threads, seeds, device and (under torchrun) the process group; prints the precision chosen
    for `model` and `work` (see `compute_dtype`; once, on the main rank: `[stage] precision: ...`)."""
    if run.threads:
        torch.set_num_threads(run.threads)
    onednn.set_enabled(run.onednn and onednn.pays_here())
    device = resolve_device(run.device)
    dist.init_distributed(device)
    seed_everything(run.seed)
    dtype, reason = _dtype_choice(run, device, model, work)
    if dist.is_main():
        print(f"[{stage}] precision: {dtype} ({reason}){linear_path(device)}")
    return device


def require(value: str, key: str, what: str) -> str:
    if not value:
        raise UserError(f"{key} is required: {what}")
    return value


def require_file(path: str, key: str, hint: str = "") -> Path:
    p = Path(require(path, key, hint or "give a path"))
    if not p.exists():
        raise UserError(f"{key}: no such file or directory: {p}" + (f" ({hint})" if hint else ""))
    return p


def tokenizer_source(model: ModelConfig) -> str:
    """Where to load the tokenizer from: explicit, else the model directory.

    What is wrong with model.path is said first: missing, or neither a directory nor a preset
    (a typo), before a preset's need for model.tokenizer.
    """
    from ..models import MODEL_PRESETS, check_model_spec

    if not model.path:
        raise UserError("model.path is required: the model to start from, a directory saved by an "
                        "earlier stage (for `ppo-rlhf reward`, the SFT model, e.g. "
                        "model.path=runs/demo/sft/model) or, for `ppo-rlhf sft`, a preset "
                        f"({', '.join(MODEL_PRESETS)})")
    check_model_spec(model.path)
    if model.tokenizer:
        return model.tokenizer
    if Path(model.path).is_dir():
        return model.path
    raise UserError(f"model.tokenizer is required when model.path is the preset '{model.path}': "
                    "train one with `ppo-rlhf tokenizer --task arithmetic --out DIR` and pass "
                    "model.tokenizer=DIR")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    # The fused kernel updates all tensors in one pass: 7x faster than the per-tensor loop torch
    # picks on the CPU (8.3 -> 1.2 ms a step at 4 layers d=256). Sharded (FSDP2 DTensor)
    # parameters keep torch's default.
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr if lr is not None else cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_lambda(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR multiplier: linear warm-up, then cosine/linear decay to min_lr_ratio, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total_steps, cfg))


def use_config_lr(opt: torch.optim.Optimizer, scheduler, lr: float) -> None:
    """After loading a checkpoint: the base learning rate of the config, not the checkpoint's.

    Resuming with a lower optim.lr is the fix the non-finite guard suggests, so it must take
    effect; the schedule keeps its position. With the config unchanged nothing changes.
    """
    scheduler.base_lrs = [lr for _ in opt.param_groups]
    for group, fn in zip(opt.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)


def clip_and_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, scheduler,
                  max_grad_norm: float, guard, loss: torch.Tensor, *, step: int | None = None,
                  last_checkpoint: Path | None = None) -> tuple[bool, float]:
    """Clip, check finiteness and step. Returns (stepped, grad_norm).

    A non-finite loss or gradient skips the step (gradients are dropped) and is counted by the
    guard, which raises after too many in a row, naming `step` and `last_checkpoint`. The
    scheduler always advances so that the LR schedule stays aligned with the step counter (and
    resume stays exact).
    """
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm if max_grad_norm > 0 else float("inf"))
    ok = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(norm))
    guard.record(ok, step=step, last_checkpoint=last_checkpoint)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return ok, float(norm)


def guard_state(guard) -> dict[str, int]:
    """The non-finite guard's counters as checkpoint values, so a resumed run counts on."""
    return {"skipped": guard.skipped_total, "nonfinite_streak": guard.consecutive}


def load_guard_state(guard, values: dict) -> None:
    guard.skipped_total = values.get("skipped", 0)
    guard.consecutive = values.get("nonfinite_streak", 0)


def resume_command(stage: str) -> str:
    """The command that continues this run: the command line it was started with, plus --resume.
    `stage` is the stage's subcommand (`sft`, `reward`, `rl`)."""
    args = sys.argv[1:]
    names = {"ppo", "rl"} if stage in ("ppo", "rl") else {stage}  # `ppo-rlhf ppo` is the RL stage too
    if not args or args[0] not in names:  # started by the pipeline or from Python
        return f"ppo-rlhf {stage} <this stage's options> --resume"
    return shlex.join(["ppo-rlhf", *args, *([] if "--resume" in args else ["--resume"])])


def finished_summary(out_dir: Path, step: int, total: int, stage: str) -> dict | None:
    """The summary of a run that --resume finds complete (resumed at its last step, summary
    written), or None when work is left: training steps, or the final evaluation and export."""
    path = out_dir / "summary.json"
    if step < total or not path.is_file():
        return None
    if dist.is_main():
        print(f"[{stage}] {out_dir} already finished all {total} steps; nothing to resume")
    return json.loads(path.read_text())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch) so resume is exact."""
    return list(_epoch_order(n, seed, epoch))


@functools.lru_cache(maxsize=4)  # a step reads one or two epochs' orders, many steps the same ones
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def global_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Global batch number `step` (0-based; indices into the dataset): the epochs' shuffled orders
    laid end to end and cut into batches, so a batch at an epoch's end takes its tail from the
    next epoch's order. A pure function of (n, batch_size, seed, step), so resume is exact."""
    if n == 0:
        raise UserError("the training set is empty after filtering")
    batch: list[int] = []
    pos = step * batch_size
    while len(batch) < batch_size:
        epoch, offset = divmod(pos, n)
        take = _epoch_order(n, seed, epoch)[offset: offset + batch_size - len(batch)]
        batch.extend(take)
        pos += len(take)
    return batch


def bucketed_batch(lengths: torch.Tensor, batch_size: int, seed: int, step: int, pool: int) -> list[int]:
    """Global batch `step` of similar lengths: the examples of `pool` consecutive `global_batch`es
    are sorted by length and cut into `pool` batches again, taken in a shuffled order.

    A batch then needs little padding, while each pool -- and so each epoch -- holds the same
    examples as without bucketing. A pure function of (lengths, batch_size, seed, step), so resume
    is exact. `lengths`: (N,) tokens per example; `pool` <= 1 is `global_batch` itself.
    """
    n = len(lengths)
    if pool <= 1:
        return global_batch(n, batch_size, seed, step)
    first, k = divmod(step, pool)
    items = [i for s in range(first * pool, (first + 1) * pool) for i in global_batch(n, batch_size, seed, s)]
    items = [items[j] for j in lengths[items].argsort(stable=True).tolist()]  # ties keep the shuffle
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * first + 1)
    k = int(torch.randperm(pool, generator=g)[k])
    return items[k * batch_size: (k + 1) * batch_size]


def global_batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Endless stream of `global_batch`es from `start_step` on."""
    step = start_step
    while True:
        yield global_batch(n, batch_size, seed, step)
        step += 1


def micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    """Split a (rank-local) batch into grad_accum nearly equal micro-batches (none empty)."""
    k = max(1, min(grad_accum, len(indices)))
    size = math.ceil(len(indices) / k)
    return [indices[i: i + size] for i in range(0, len(indices), size)]


def total_steps(n_items: int, batch_size: int, epochs: float, max_steps: int) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * n_items / batch_size))


def check_batch(batch_size: int, grad_accum: int, key: str) -> None:
    world = dist.world_size()
    if batch_size % world:
        raise UserError(f"{key}: batch size {batch_size} is not divisible by the world size {world}")
    if (batch_size // world) < grad_accum:
        raise UserError(f"{key}: per-rank batch {batch_size // world} is smaller than grad_accum "
                        f"{grad_accum}; lower grad_accum or raise the batch size")


class Schedule(NamedTuple):
    """An optimizer, its LR scheduler and the learning rate the config asks for (restored on
    resume by `use_config_lr`)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    lr: float


class Training:
    """What an SFT-style stage trains: the model and its DDP/FSDP wrapper, the trainable
    parameters, the optimiser and the LR schedule. `state()` and `schedules` are what the stage
    loop checkpoints and restores (loop.py); `load` has no plain values to restore."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, run: RunConfig, device: torch.device,
                 total_steps: int):
        self.model = model
        self.ddp_model = dist.wrap_model(model, device, run)  # before the optimizer: FSDP swaps the parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, optim)
        self.sched = make_scheduler(self.opt, optim, total_steps)
        self.max_grad_norm = optim.max_grad_norm
        self.total_steps = total_steps
        self.schedules = [Schedule(self.opt, self.sched, optim.lr)]

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched}

    def load(self, values: dict[str, Any]) -> None:
        pass

    def optimizer_step(self, ctx, loss: torch.Tensor) -> tuple[bool, float]:
        """Clip, check and step under the loop's guard (`ctx`: a loop.StepContext)."""
        return ctx.clip_and_step(self.params, self.opt, self.sched, self.max_grad_norm, loss)
