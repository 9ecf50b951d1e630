"""The stage loop (stages/loop.py) on a toy stage: cadence of logs, evaluations and checkpoints,
stop and exact resume, a finished run, the learning rate and guard counters after resume."""

import json
import os
import signal

import pytest
import torch

from ppo_rlhf.config import OptimConfig, RunConfig
from ppo_rlhf.metrics import write_summary
from ppo_rlhf.stages import common
from ppo_rlhf.stages.loop import StageLoop, StepResult


class ToyStage(common.Training):
    """Least squares on 16 fixed points, 4 per step in the order common.global_batch gives.
    `stop_at` sends this process SIGTERM during that step; `nan_at` poisons those steps' loss."""

    name, command, unit = "toy", "toy", "step"

    def __init__(self, total_steps=7, lr=0.1, stop_at=None, nan_at=()):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optim = OptimConfig(lr=lr, warmup_steps=0, schedule="cosine")
        super().__init__(model, optim, RunConfig(device="cpu"), torch.device("cpu"), total_steps)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 2, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0]]) + 0.5
        self.stop_at, self.nan_at = stop_at, set(nan_at)
        self.steps_made, self.evaluated = [], []
        self.extra = 0  # a plain value the stage keeps in its checkpoints

    def state(self):
        return {**super().state(), "extra": self.extra}

    def load(self, values):
        self.extra = values["extra"]

    def step(self, ctx):
        self.steps_made.append(ctx.step)
        if ctx.step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        rows = common.global_batch(16, 4, 0, ctx.step - 1)
        loss = ((self.model(self.x[rows]) - self.y[rows]) ** 2).mean()
        if ctx.step in self.nan_at:
            loss = loss * float("nan")
        loss.backward()
        _, gnorm = self.optimizer_step(ctx, loss.detach())
        self.extra += ctx.step
        return StepResult({"toy/loss": loss.detach(), "toy/grad_norm": gnorm}, {"loss": f"{loss.item():.3f}"})

    def evaluate(self, step):
        self.evaluated.append(step)
        with torch.no_grad():
            return StepResult({"toy/eval_loss": ((self.model(self.x) - self.y) ** 2).mean()},
                              samples=[{"x": 1.0}])


def run_cfg(**kw):
    return RunConfig(device="cpu", tensorboard=False, **{"log_every": 1, "eval_every": 0, "save_every": 0, **kw})


def records(out, name="metrics.jsonl"):
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_logs_evaluates_and_saves_at_their_cadence(tmp_path):
    stage = ToyStage(total_steps=7)
    loop = StageLoop(stage, tmp_path, run_cfg(log_every=2, eval_every=3, save_every=2, keep_last=10))
    assert loop.begin(resume=False) is None
    assert loop.run() is True
    loop.close()
    assert stage.steps_made == [1, 2, 3, 4, 5, 6, 7]
    rows = records(tmp_path)
    assert [r["step"] for r in rows if "toy/loss" in r] == [2, 4, 6, 7]  # and always the last step
    assert [r["step"] for r in rows if "toy/eval_loss" in r] == [3, 6]  # the stage evaluates the end itself
    assert stage.evaluated == [3, 6]
    assert all(r["stage"] == "toy" for r in rows)
    assert [r["step"] for r in records(tmp_path, "samples.jsonl")] == [3, 6]
    # every second step, and the last one
    assert checkpoints(tmp_path) == [f"step_{s:08d}" for s in (2, 4, 6, 7)]
    assert loop.last.metrics["toy/grad_norm"] == rows[-1]["toy/grad_norm"]


def test_a_stop_signal_saves_prints_the_command_and_resume_is_exact(tmp_path, capsys):
    want = tmp_path / "straight"
    straight = ToyStage()
    loop = StageLoop(straight, want, run_cfg(eval_every=2))
    loop.begin(resume=False)
    assert loop.run()
    loop.close()

    out = tmp_path / "stopped"
    first = ToyStage(stop_at=3)
    loop = StageLoop(first, out, run_cfg(eval_every=2))
    loop.begin(resume=False)
    assert loop.run() is False
    assert loop.step == 3 and first.steps_made == [1, 2, 3]  # the step in flight is finished
    assert checkpoints(out) == ["step_00000003"]
    assert "[toy] stopped at step 3; resume with: ppo-rlhf toy" in capsys.readouterr().out

    torch.manual_seed(123)  # the checkpoint's RNG state replaces whatever the new process has
    second = ToyStage()
    loop = StageLoop(second, out, run_cfg(eval_every=2))
    assert loop.begin(resume=True) is None
    assert loop.step == 3 and second.extra == 1 + 2 + 3
    assert loop.run()
    loop.close()
    assert second.steps_made == [4, 5, 6, 7]
    assert records(out) == records(want)
    assert torch.equal(second.model.weight, straight.model.weight)
    assert second.extra == straight.extra


def test_resume_of_a_finished_run_returns_its_summary_and_does_nothing(tmp_path, capsys):
    loop = StageLoop(ToyStage(), tmp_path, run_cfg())
    loop.begin(resume=False)
    loop.run()
    loop.close()
    write_summary(tmp_path, {"stage": "toy", "answer": 42})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = ToyStage()
    loop = StageLoop(again, tmp_path, run_cfg())
    assert loop.begin(resume=True)["answer"] == 42
    assert "already finished all 7 steps" in capsys.readouterr().out
    assert again.steps_made == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_without_a_summary_finishes_the_stage_without_stepping(tmp_path):
    """Killed after the last checkpoint but before the export: nothing to train, no second save."""
    loop = StageLoop(ToyStage(), tmp_path, run_cfg())
    loop.begin(resume=False)
    loop.run()
    loop.close()
    saved = (tmp_path / "checkpoints" / "step_00000007" / "manifest.json").stat().st_mtime_ns
    again = ToyStage()
    loop = StageLoop(again, tmp_path, run_cfg())
    assert loop.begin(resume=True) is None and loop.step == 7
    assert loop.run() is True
    assert again.steps_made == []
    assert (tmp_path / "checkpoints" / "step_00000007" / "manifest.json").stat().st_mtime_ns == saved


def test_resume_uses_the_config_learning_rate_and_keeps_the_guard_counters(tmp_path):
    loop = StageLoop(ToyStage(stop_at=4, nan_at={3, 4}), tmp_path, run_cfg())
    loop.begin(resume=False)
    assert not loop.run()
    assert (loop.guard.skipped_total, loop.guard.consecutive) == (2, 2)

    resumed = ToyStage(lr=0.01)
    loop = StageLoop(resumed, tmp_path, run_cfg())
    loop.begin(resume=True)
    assert (loop.guard.skipped_total, loop.guard.consecutive) == (2, 2)
    # the schedule keeps its position (4 of 7 steps), the base learning rate is the new config's
    cfg = OptimConfig(lr=0.01, warmup_steps=0, schedule="cosine")
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(0.01 * common.lr_lambda(4, 7, cfg))
    assert loop.run()
    assert loop.guard.skipped_total == 2 and loop.guard.consecutive == 0


def test_the_batch_of_a_step_does_not_depend_on_where_the_stream_started():
    stream = common.global_batches(10, 4, seed=3)
    batches = [next(stream) for _ in range(6)]
    assert batches == [common.global_batch(10, 4, 3, s) for s in range(6)]
    assert [next(common.global_batches(10, 4, 3, start_step=s)) for s in range(6)] == batches
    # two and a half epochs of 10 items laid end to end: every epoch holds each item once
    flat = sum(batches, [])
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))
    assert flat[:10] == common.epoch_order(10, 3, 0) and flat[10:20] == common.epoch_order(10, 3, 1)
