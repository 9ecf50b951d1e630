"""The one stage loop: stop, save, log, evaluate, resume and progress for SFT, reward and RL.

A stage is an object with a few members (`Stage` below); the loop does everything else:

    loop = StageLoop(stage, out_dir, cfg.run)
    if (done := loop.begin(resume)) is not None:   # --resume found the run finished
        return done
    if not loop.run():                             # stopped by SIGINT/SIGTERM, checkpoint saved
        return {"stopped_at": loop.step}
    final = loop.evaluate()                        # then the stage's own export and summary
    ...
    loop.close()

Each step of `run()`:
  1. `stage.step(ctx)` makes optimizer step `ctx.step` (SFT, RM) or one RL iteration;
  2. its metrics are logged every `run.log_every` steps and at the last one;
  3. every `run.eval_every` steps (before the last, which the stage evaluates itself)
     `stage.evaluate(step)` is logged;
  4. a stop signal on any rank is all-reduced, so every rank stops at the same step;
  5. every `run.save_every` steps, and when stopping, a checkpoint is written atomically.
After the last step the final checkpoint is saved (unless step 5 just did).

A checkpoint holds `stage.state()` plus the loop's own values: the step, the RNG states and the
non-finite guard's counters. `begin(resume=True)` loads the newest valid one into the stage's
objects, restores those values, hands the plain ones to `stage.load`, and puts each optimizer's
learning rate back to the config's (`stage.schedules`), so that resuming with a lower `optim.lr`
takes effect. The data position must be a pure function of (seed, step), e.g.
`common.global_batch(n, batch_size, seed, ctx.step - 1)`: then a resumed run makes exactly the
steps, logs exactly the metrics and writes exactly the model of the run left alone.

How the RL stage plugs in: its trainer is the stage. `step(ctx)` is one iteration -- draw the
prompt batch of iteration `ctx.step`, roll out, score, update -- and returns the rollout and update
statistics as `metrics` and a few figures (KL, RM score, gold) as `progress`; `unit = "update"`,
`name` is the algorithm (cfg.algo.name) and `command = "rl"`.
`state()` adds the policy, value model, both optimizers and schedulers, the KL controller, the
reward normaliser and the sampling generators; `load()` restores the generators and the
normaliser; `schedules` lists both optimizers with their configured learning rates.
`evaluate(step)` returns the held-out metrics and sample rows (`StepResult.samples`, logged to
samples.jsonl); an evaluation before the first update is `loop.evaluate()` after `begin()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import distributed as dist
from ..checkpoint import CheckpointManager, rng_state, set_rng_state
from ..config import RunConfig
from ..guards import GracefulStop, NonFiniteGuard
from ..metrics import MetricsLogger, Progress
from . import common
from .common import Schedule


@dataclass
class StepResult:
    """What a step (or an evaluation) reports: metrics for the log (numbers or 0-d tensors, read
    only when logged), short figures for the progress bar, and sample rows for samples.jsonl."""

    metrics: dict[str, Any]
    progress: dict[str, str] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepContext:
    """What a step needs from the loop: its number and the guard that decides whether it counts."""

    step: int  # the step being made, 1-based
    guard: NonFiniteGuard
    last_checkpoint: Path | None

    def clip_and_step(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, scheduler,
                      max_grad_norm: float, loss: torch.Tensor) -> tuple[bool, float]:
        """`common.clip_and_step` under this step's guard (see there)."""
        return common.clip_and_step(params, opt, scheduler, max_grad_norm, self.guard, loss,
                                    step=self.step, last_checkpoint=self.last_checkpoint)


class Stage(Protocol):
    """What a training stage gives the loop."""

    name: str  # "sft", "reward", the RL algorithm ("ppo", "grpo"): the metrics' stage, the messages
    command: str  # the `ppo-rlhf` subcommand that runs it ("sft", "reward", "rl"): the resume command
    unit: str  # "step" or "update", in the messages
    total_steps: int
    schedules: list[Schedule]

    def state(self) -> dict[str, Any]:
        """Checkpoint content: modules, objects with state_dict(), generators and plain values."""

    def load(self, values: dict[str, Any]) -> None:
        """Restore the plain values of a checkpoint (its objects are already loaded in place)."""

    def step(self, ctx: StepContext) -> StepResult:
        """Make step `ctx.step`: one optimizer step, or one RL iteration."""

    def evaluate(self, step: int) -> StepResult:
        """Held-out metrics (and sample rows) after `step` steps; empty metrics when there is nothing to evaluate."""


class StageLoop:
    """Runs a `Stage` from its newest checkpoint to `stage.total_steps` (see the module docstring)."""

    def __init__(self, stage: Stage, out_dir: Path, run: RunConfig):
        self.stage, self.out_dir, self.run_cfg = stage, Path(out_dir), run
        self.ckpt = CheckpointManager(out_dir, keep_last=run.keep_last, enabled=dist.is_main())
        self.guard = NonFiniteGuard(run.max_nonfinite)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.logger: MetricsLogger | None = None
        self.last: StepResult | None = None  # what this process's last step reported

    def begin(self, resume: bool) -> dict | None:
        """Resume from the newest valid checkpoint when asked, then open the metrics log.

        Returns the summary of a run that is already finished (nothing to do), else None.
        """
        stage = self.stage
        if resume and (path := self.ckpt.latest_valid()) is not None:
            values = self.ckpt.load(path, dist.for_loading(stage.state()))
            self.step = values["step"]
            set_rng_state(values["rng"])
            common.load_guard_state(self.guard, values)
            stage.load(values)
            for s in stage.schedules:
                common.use_config_lr(s.optimizer, s.scheduler, s.lr)
            self.last_checkpoint = path
            done = common.finished_summary(self.out_dir, self.step, stage.total_steps, stage.name)
            if done is not None:
                return done
        self.logger = MetricsLogger(self.out_dir, enabled=dist.is_main(), tensorboard=self.run_cfg.tensorboard,
                                    wandb_project=self.run_cfg.wandb_project or None,
                                    console_every=max(1, stage.total_steps // 10))
        # Drop what an interrupted attempt logged after the checkpoint (all of it when starting afresh).
        self.logger.truncate_after(self.step if self.step else -1)
        return None

    def run(self) -> bool:
        """Steps until `total_steps` (True) or until a stop signal (False, checkpoint saved)."""
        stage, run = self.stage, self.run_cfg
        total = stage.total_steps
        progress = Progress(total - self.step, stage.name, enabled=dist.is_main())
        with GracefulStop() as stop, progress:
            while self.step < total:
                result = stage.step(StepContext(self.step + 1, self.guard, self.last_checkpoint))
                self.step += 1
                self.last = result
                progress.update(**result.progress)
                if self.step % run.log_every == 0 or self.step == total:
                    self.log(result)
                if run.eval_every and self.step % run.eval_every == 0 and self.step < total:
                    self.evaluate()
                stopping = dist.any_rank(stop.requested)  # all ranks stop at the same step
                if (run.save_every and self.step % run.save_every == 0) or stopping:
                    self.save()
                if stopping:
                    progress.close()
                    self.close(barrier=False)
                    if dist.is_main():
                        print(f"[{stage.name}] stopped at {stage.unit} {self.step}; "
                              f"resume with: {common.resume_command(stage.command)}")
                    return False
        if self.last_checkpoint != self.ckpt.path_for(self.step):  # not saved by the loop (or resumed from)
            self.save()
        return True

    def log(self, result: StepResult) -> None:
        self.logger.log(self.step, result.metrics, stage=self.stage.name)
        if result.samples:
            self.logger.log_samples(self.step, [dict(r, step=self.step) for r in result.samples])

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the stage now and log it; returns the metrics."""
        result = self.stage.evaluate(self.step)
        if result.metrics or result.samples:
            self.log(result)
        return result.metrics

    def state(self) -> dict[str, Any]:
        """Checkpoint content now (on every rank: FSDP gathers the shards to rank 0)."""
        return dist.for_saving({**self.stage.state(), "step": self.step, "rng": rng_state(),
                                **common.guard_state(self.guard)})

    def save(self) -> None:
        self.last_checkpoint = self.ckpt.save(self.step, self.state())

    def close(self, barrier: bool = True) -> None:
        """Close the metrics log; with `barrier`, wait for every rank (the end of a stage)."""
        if self.logger is not None:
            self.logger.close()
        if barrier:
            dist.barrier()
