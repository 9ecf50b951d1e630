"""Faults during the SFT, reward and PPO stages, end to end: SIGKILL at a random step, SIGTERM /
SIGINT, a corrupted newest checkpoint, non-finite losses, a full disk while saving.

Each stage runs as a real `ppo-rlhf` process (or in-process, to inject a fault) on a tiny model.
A run interrupted and resumed with --resume must log exactly the metrics (bit-identical JSON
numbers, wall-clock keys excepted) and write exactly the model of the same run left alone.
"""

import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Runs the CLI in a subprocess. PPO_RLHF_TEST_STEP_DELAY slows every optimizer step down (without
# touching the numbers) so that a signal reliably lands while the loop is running.
DRIVER = """
import os, sys, time
from ppo_rlhf.stages import common
delay = float(os.environ.get("PPO_RLHF_TEST_STEP_DELAY", "0"))
step = common.clip_and_step
def slow_step(*args, **kwargs):
    time.sleep(delay)
    return step(*args, **kwargs)
common.clip_and_step = slow_step
from ppo_rlhf.cli import main
sys.argv[0] = "ppo-rlhf"
sys.exit(main())
"""
WALL_CLOCK = ("time", "time/", "perf/")
STEPS = {"sft": 8, "sft-lora": 8, "reward": 8, "ppo": 6, "ppo-replay": 6, "sac": 6}
# Seconds added to each optimizer step (PPO makes 8 per update) when a signal must find it running.
DELAY = {"sft": 0.12, "sft-lora": 0.12, "reward": 0.12, "ppo": 0.03, "ppo-replay": 0.03, "sac": 0.03}


def stage_args(stage: str, fx: Path, out: Path) -> list[str]:
    """The command line of a tiny run of `stage`; sft-lora trains LoRA adapters with dropout; ppo-replay
    keeps a replay buffer (in the checkpoint) and draws its minibatches from it; sac adds twin
    critics, their targets and their optimizer to that."""
    common = ["run.tensorboard=false", "run.save_every=1", "run.keep_last=2"]
    if stage in ("ppo-replay", "sac"):
        ppo = [a for a in stage_args("ppo", fx, out)[:-len(common)] if not a.startswith("train.ppo_epochs")]
        algo = ["algo=sac"] if stage == "sac" else []
        return [*ppo, *algo, "train.ppo_epochs=1", "algo.replay_ratio=1.5", "algo.replay_capacity=12", *common]
    if stage == "sft-lora":
        return [*stage_args("sft", fx, out), "model.lora_r=4", "model.lora_dropout=0.1"]
    if stage == "sft":
        return ["sft", f"--out={out}", f"train_file={fx / 'sft.jsonl'}", f"eval_file={fx / 'sft_eval.jsonl'}",
                f"model.tokenizer={fx / 'tok'}", "model.path=tiny-gpt2", f"max_steps={STEPS['sft']}",
                "batch_size=4", "run.eval_every=3", "optim.warmup_steps=2", *common]
    if stage == "reward":
        return ["reward", f"--out={out}", f"train_file={fx / 'prefs.jsonl'}", f"eval_file={fx / 'prefs.jsonl'}",
                f"model.path={fx / 'policy'}", f"max_steps={STEPS['reward']}", "batch_size=4",
                "run.eval_every=3", "norm_samples=8", *common]
    return ["ppo", f"--out={out}", f"policy={fx / 'policy'}", f"reward_model={fx / 'rm'}",
            f"prompts_file={fx / 'prompts.jsonl'}", f"eval_prompts_file={fx / 'prompts.jsonl'}",
            "eval_samples=4", "run.eval_every=3", f"train.updates={STEPS['ppo']}",
            "rollout.batch_size=4", "train.num_minibatches=2", "train.ppo_epochs=2",
            "rollout.max_new_tokens=6", "reward.kl_control=adaptive", "reward.kl_target=0.1",
            "reward.normalize=true", *common]


def env(delay: float = 0.0) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PPO_RLHF_TEST_STEP_DELAY=str(delay))


def start(args: list[str], delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env(delay),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return out, err


def run(args: list[str], expect: int = 0) -> tuple[str, str]:
    return finish(start(args), expect)


def checkpoint_steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in d.iterdir() if p.name.startswith("step_"))


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in checkpoint_steps(out)):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before checkpoint {step}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.01)


def metrics(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """Logged records without wall-clock values; numbers compared exactly as JSON parses them."""
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows]


def assert_same_run(got: Path, want: Path) -> None:
    a, b = metrics(got), metrics(want)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"metrics line {i + 1} differs:\n{x}\n{y}"
    assert len(a) == len(b), f"{len(a)} metric lines, expected {len(b)}"
    if (want / "samples.jsonl").exists():
        assert metrics(got, "samples.jsonl") == metrics(want, "samples.jsonl")
    for model in ("model", "value_model"):
        if (want / model).is_dir():
            assert (got / model / "model.safetensors").read_bytes() == \
                (want / model / "model.safetensors").read_bytes(), f"{model} weights differ"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Tiny data, tokenizer, a random tiny-gpt2 'SFT' policy and a reward model from it."""
    from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model
    from ppo_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("fx")
    rng = random.Random(0)
    qs = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(48)]

    def write(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("sft.jsonl", [{"prompt": f"Q: {a}+{b}=", "response": f" {a + b}"} for a, b in qs])
    write("sft_eval.jsonl", [{"prompt": f"Q: {b}+{a}=", "response": f" {a + b}"} for a, b in qs[:8]])
    write("prefs.jsonl", [{"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 1 + i % 3}"}
                          for i, (a, b) in enumerate(qs)])
    write("prompts.jsonl", [{"prompt": f"Q: {a}+{b}="} for a, b in qs[:32]])
    tok = train_tokenizer([f"Q: {a}+{b}= {a + b}" for a in range(30) for b in range(30)], 320, root / "tok")
    save_model(load_causal_lm("tiny-gpt2", tok, seed=0), tok, root / "policy")
    rm = load_scalar_model(str(root / "policy"), tok, init_from_causal_lm=True, head_init_std=0.02, seed=1)
    save_model(rm, tok, root / "rm")
    return root


@pytest.fixture(scope="module")
def reference(fx, tmp_path_factory):
    """Uninterrupted run of each stage, made on first use."""
    done: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in done:
            out = tmp_path_factory.mktemp(f"{stage}_ref") / "run"
            run(stage_args(stage, fx, out))
            assert checkpoint_steps(out)[-1] == STEPS[stage]
            done[stage] = out
        return done[stage]

    return get


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "ppo-replay", "sac"])
def test_sigkill_at_a_random_step_then_resume_is_exact(stage, fx, reference, tmp_path):
    want = reference(stage)
    out = tmp_path / "run"
    args = stage_args(stage, fx, out)
    kill_after = random.Random().randint(1, STEPS[stage] - 2)
    print(f"killing {stage} after checkpoint {kill_after}")  # shown when the test fails
    proc = start(args, delay=DELAY[stage])
    wait_for_checkpoint(proc, out, kill_after)
    time.sleep(random.uniform(0, 0.15))  # anywhere in the step: mid-forward, mid-save, ...
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(out)[-1] < STEPS[stage], "the run finished before it was killed"
    run([*args, "--resume"])
    assert_same_run(out, want)


@pytest.mark.parametrize("stage, sig", [("sft-lora", signal.SIGINT), ("reward", signal.SIGTERM),
                                        ("ppo", signal.SIGTERM)])
def test_signal_stops_cleanly_and_the_printed_command_resumes_exactly(stage, sig, fx, reference, tmp_path):
    want = reference(stage)
    out = tmp_path / "run"
    proc = start(stage_args(stage, fx, out), delay=2 * DELAY[stage])
    wait_for_checkpoint(proc, out, 2)
    proc.send_signal(sig)
    stdout, stderr = finish(proc, expect=0)
    assert "Traceback" not in stderr
    stopped = checkpoint_steps(out)[-1]
    assert 2 <= stopped < STEPS[stage]
    assert [r["step"] for r in metrics(out) if "sft/train_loss" in r or "rm/train_loss" in r
            or "objective/kl" in r][-1] == stopped
    line = next(x for x in stdout.splitlines() if "resume with:" in x)
    assert f"stopped at {'update' if stage == 'ppo' else 'step'} {stopped}" in line
    command = shlex.split(line.split("resume with:", 1)[1])
    assert command[0] == "ppo-rlhf" and command[-1] == "--resume"
    assert command[1:-1] == stage_args(stage, fx, out)
    run(command[1:])
    assert_same_run(out, want)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_resume_of_a_finished_run_falls_back_from_a_corrupted_newest_checkpoint(stage, fx, reference, tmp_path):
    want = reference(stage)
    out = tmp_path / "run"
    shutil.copytree(want, out)
    newest = out / "checkpoints" / f"step_{STEPS[stage]:08d}"
    weights = next(newest.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    _, stderr = run([*stage_args(stage, fx, out), "--resume"])
    assert f"checkpoint step_{STEPS[stage]:08d} is corrupted" in stderr
    assert f"falling back to step_{STEPS[stage] - 1:08d}" in stderr
    assert checkpoint_steps(out) == [STEPS[stage] - 1, STEPS[stage]]
    assert_same_run(out, want)


def test_resume_of_a_finished_run_changes_nothing(fx, reference, tmp_path):
    """Also: the last checkpoint of a LoRA run holds the adapters, not the merged export."""
    want = reference("sft-lora")
    out = tmp_path / "run"
    shutil.copytree(want, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stdout, _ = run([*stage_args("sft-lora", fx, out), "--resume"])
    assert "already finished all 8 steps" in stdout
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_when_every_checkpoint_is_corrupted_starts_over_and_logs_nothing_twice(fx, reference, tmp_path):
    """As after a kill before the first checkpoint: --resume warns, starts at step 0 and drops the
    lines the failed attempt logged."""
    want = reference("sft")
    out = tmp_path / "run"
    shutil.copytree(want, out)
    for step in checkpoint_steps(out):
        (out / "checkpoints" / f"step_{step:08d}" / "state.pt").write_bytes(b"garbage")
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    _, stderr = run([*stage_args("sft", fx, out), "--resume"])
    assert "checkpoint step_00000008 is corrupted (state.pt: size 7 bytes" in stderr
    assert "checkpoint step_00000007 is corrupted" in stderr and "no earlier checkpoint" in stderr
    assert_same_run(out, want)


def test_resume_with_another_model_config_is_a_clear_error(fx, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference("sft"), out)
    (out / "summary.json").unlink()
    _, stderr = run([*stage_args("sft", fx, out), "model.lora_r=4", "--resume"], expect=2)
    assert "Traceback" not in stderr
    assert "step_00000008/model.safetensors: does not fit the current PeftModel" in stderr
    assert "fix: resume with the same model configuration the run was started with" in stderr


# -- in-process faults --------------------------------------------------------------------------------
def sft_config(fx: Path, out: Path, *overrides: str):
    from ppo_rlhf.config import SFTConfig, build_config

    args = [a.replace("--out=", "out_dir=") for a in stage_args("sft", fx, out)[1:]]
    return build_config(SFTConfig, overrides=[*args, *overrides])


def test_nonfinite_losses_skip_the_step_and_are_counted(fx, reference, tmp_path, monkeypatch, caplog):
    from ppo_rlhf.checkpoint import CheckpointManager
    from ppo_rlhf.stages import sft

    bad_steps, calls = {3, 4}, []
    token_losses = sft.token_losses

    def poisoned(model, batch):
        s, n = token_losses(model, batch)
        if model.training:
            calls.append(1)
            if len(calls) in bad_steps:
                s = s * float("nan")  # NaN loss and NaN gradients
        return s, n

    monkeypatch.setattr(sft, "token_losses", poisoned)
    out = tmp_path / "run"
    summary = sft.run_sft(sft_config(fx, out, "run.keep_last=10", "run.max_nonfinite=3"))
    assert summary["skipped_steps"] == 2
    rows = {r["step"]: r for r in metrics(out) if "sft/train_loss" in r}
    assert [rows[s]["sft/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert rows[3]["sft/train_loss"] is None and rows[4]["sft/grad_norm"] is None
    assert "non-finite loss/gradients at step 3: optimizer step skipped (1 in a row)" in caplog.text
    assert "at step 4: optimizer step skipped (2 in a row)" in caplog.text
    # the steps before the fault are those of the clean run; skipped steps leave the weights alone
    want = {r["step"]: r for r in metrics(reference("sft")) if "sft/train_loss" in r}
    assert rows[1] == want[1] and rows[2] == want[2]
    ckpt = CheckpointManager(out)
    weights = [(ckpt.path_for(s) / "model.safetensors").read_bytes() for s in (2, 3, 4, 5)]
    assert weights[0] == weights[1] == weights[2] != weights[3]


def test_nonfinite_streak_stops_with_a_clear_error_and_keeps_the_last_checkpoint(fx, tmp_path):
    from ppo_rlhf.checkpoint import CheckpointManager
    from ppo_rlhf.models import load_causal_lm
    from ppo_rlhf.tokenizer import load_tokenizer

    out = tmp_path / "run"
    # lr=1e30: step 1 is finite but blows the weights up; from step 2 on every loss is NaN.
    args = [*stage_args("sft", fx, out), "optim.lr=1e30", "run.max_nonfinite=3", "run.save_every=2"]
    _, stderr = run(args, expect=2)
    assert "Traceback" not in stderr
    last = out / "checkpoints" / "step_00000002"
    assert (f"error: loss/gradients were non-finite for 3 steps in a row at step 4; "
            f"the last good checkpoint is {last}; fix: lower the learning rate") in stderr
    rows = [r for r in metrics(out) if "sft/train_loss" in r]
    assert [(r["step"], r["sft/skipped_steps"]) for r in rows] == [(1, 0), (2, 1), (3, 2)]
    assert rows[0]["sft/train_loss"] is not None and rows[1]["sft/train_loss"] is None
    ckpt = CheckpointManager(out)
    assert ckpt.list() == [last] and ckpt.verify(last) is None
    model = load_causal_lm("tiny-gpt2", load_tokenizer(fx / "tok"))
    values = ckpt.load(last, {"model": model})
    assert values["step"] == 2 and values["skipped"] == 1 and values["nonfinite_streak"] == 1
    assert all(p.isfinite().all() for p in model.parameters())
    # Resuming with a lower learning rate (the advice) uses it, not the checkpoint's; these
    # weights are beyond repair, so the streak goes on and stops the run again.
    run([*args, "optim.lr=1e-3", "--resume"], expect=2)
    resumed = [r for r in metrics(out) if "sft/train_loss" in r]
    # step 3 of 8 after 2 warm-up steps: cosine at 1/6 of the way down to min_lr_ratio 0.1
    assert resumed[2]["step"] == 3
    assert resumed[2]["sft/lr"] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6))))


def test_full_disk_while_saving_keeps_the_previous_checkpoint(fx, reference, tmp_path, monkeypatch):
    import errno

    from ppo_rlhf import checkpoint
    from ppo_rlhf.errors import UserError
    from ppo_rlhf.stages.sft import run_sft

    torch_save = checkpoint._torch_save

    def full_disk(obj, file):
        if file.parent.name.startswith(".step_00000003"):
            file.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        torch_save(obj, file)

    monkeypatch.setattr(checkpoint, "_torch_save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"no space left while writing checkpoint .*step_00000003; "
                                        r"the previous checkpoint step_00000002 is intact"):
        run_sft(sft_config(fx, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    monkeypatch.undo()
    run_sft(sft_config(fx, out), resume=True)
    assert_same_run(out, reference("sft"))
