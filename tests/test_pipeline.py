"""The pipeline end to end: a tiny run in the default suite (keys, skipping, report), and the
default run's learning result as a slow test."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["data.n_sft=64", "data.n_prefs=64", "data.n_prompts=32", "data.n_eval=16", "sft.max_steps=3",
        "sft.batch_size=8", "reward.max_steps=3", "reward.batch_size=8", "reward.norm_samples=8",
        "ppo.train.updates=2", "ppo.rollout.batch_size=8", "ppo.eval_samples=8", "eval.n=8",
        "sft.run.tensorboard=false", "reward.run.tensorboard=false", "ppo.run.tensorboard=false"]


def pipeline(out, *args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", "pipeline", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_tiny_pipeline_writes_summary_and_skips_done_stages(tmp_path):
    p = pipeline(tmp_path / "run", "--task", "sentiment", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("sft_gold_reward", "ppo_gold_reward", "sft_gold_reward_greedy", "ppo_gold_reward_greedy",
                "final_kl", "rm_accuracy", "stage_seconds"):
        assert key in summary, key
    assert summary["algo"] == "ppo" and summary["eval_temperature"] == 0.7
    assert isinstance(summary["ppo_gold_reward_greedy"], float) and isinstance(summary["sft_gold_reward_greedy"], float)
    assert set(summary["stage_seconds"]) == {"tokenizer", "data", "sft", "reward", "ppo", "eval"}
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    again = pipeline(tmp_path / "run", "--task", "sentiment", *TINY)
    assert again.returncode == 0
    assert again.stdout.count("skipped") == 6


@pytest.mark.slow
def test_default_arithmetic_pipeline_beats_sft(tmp_path):
    """The README's default run: PPO's gold reward on held-out prompts clearly above SFT's."""
    p = pipeline(tmp_path / "run", "--task", "arithmetic", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["ppo_gold_reward"] >= s["sft_gold_reward"] + 0.10, s
    assert s["rm_accuracy"] >= 0.8
    assert s["final_kl"] < 20
