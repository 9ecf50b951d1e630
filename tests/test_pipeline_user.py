"""The pipeline on a user's own JSONL files, and `configure` keeping what the user set."""

import json
import shlex
import shutil
from pathlib import Path

import pytest
from test_api import readme_block

from ppo_rlhf.config import PipelineConfig, build_config
from ppo_rlhf.errors import UserError
from ppo_rlhf.stages.pipeline import configure, explicit_keys, split_off, user_data_files

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "reverse"
FAST = ["sft.max_steps=3", "sft.batch_size=8", "reward.max_steps=3", "reward.batch_size=8",
        "reward.norm_samples=8", "ppo.train.updates=2", "ppo.rollout.batch_size=8", "ppo.eval_samples=8",
        "eval.n=8", "sft.run.tensorboard=false", "reward.run.tensorboard=false", "ppo.run.tensorboard=false"]


def main(*args):
    from ppo_rlhf.cli import main as cli_main

    return cli_main([str(a) for a in args])


def configured(*overrides):
    cfg = build_config(PipelineConfig, overrides=list(overrides))
    return configure(cfg, explicit_keys(overrides=overrides))


def test_explicit_settings_are_kept_even_when_equal_to_the_default():
    cfg = configured("model=small-gpt2", "sft.model.path=tiny-gpt2", "reward.max_new_tokens=16",
                     "sft.run.seed=0", "seed=3", "eval.temperature=0.7", "ppo.rollout.temperature=1.0")
    assert cfg.sft.model.path == "tiny-gpt2"  # was replaced by `model` when equal to the default
    assert cfg.reward.max_new_tokens == 16  # was always replaced by the task's 6
    assert cfg.sft.run.seed == 0 and cfg.reward.run.seed == 3
    assert cfg.eval.temperature == 0.7  # explicit; not the RL temperature
    unset = configured("model=small-gpt2", "ppo.rollout.temperature=1.0")
    assert unset.sft.model.path == "small-gpt2" and unset.reward.max_new_tokens == 6
    assert unset.eval.temperature == 1.0
    attr = PipelineConfig()  # set from Python: a non-default value is kept too
    attr.sft.model.path = "tiny-llama"
    assert configure(attr).sft.model.path == "tiny-llama"


def test_user_data_paths_and_split_off_files(tmp_path):
    cfg = configured(f"data_dir={EXAMPLE}", f"out_dir={tmp_path}")
    assert cfg.task == "" and cfg.tokenizer.task == ""
    assert cfg.sft.train_file == str(EXAMPLE / "sft_train.jsonl")
    assert cfg.reward.train_file == str(tmp_path / "data" / "prefs_train.jsonl")  # split off
    assert cfg.reward.eval_file == str(tmp_path / "data" / "prefs_eval.jsonl")
    assert cfg.ppo.eval_prompts_file == str(EXAMPLE / "prompts_eval.jsonl")  # given: used as is
    assert str(EXAMPLE / "prefs_train.jsonl") in cfg.tokenizer.texts
    assert cfg.ppo.ptx_file == ""


def test_split_off_keeps_whole_prompts_and_is_seeded():
    lines = [json.dumps({"prompt": f"p{i % 10}", "chosen": "a", "rejected": f"b{i}"}) for i in range(40)]
    train, held = split_off(lines, 0.1, seed=0)
    assert len(train) + len(held) == 40 and 4 <= len(held) <= 8
    prompts = lambda rows: {json.loads(r)["prompt"] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(held)
    assert split_off(lines, 0.1, seed=0) == (train, held) and split_off(lines, 0.1, seed=1) != (train, held)
    with pytest.raises(UserError, match="1 distinct prompt"):
        split_off(lines[:1], 0.1, 0)


def test_missing_user_files_are_named(tmp_path):
    (tmp_path / "sft_train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(UserError, match="has no prompts_train.jsonl"):
        user_data_files(str(tmp_path))
    (tmp_path / "prompts_train.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match="no prefs_train.jsonl for the reward model"):
        configured(f"data_dir={tmp_path}", f"out_dir={tmp_path / 'run'}")
    listing = tmp_path / "files.yaml"
    listing.write_text("sft_train: sft_train.jsonl\nprompts_train: nope.jsonl\n")
    with pytest.raises(UserError, match="prompts_train: no such file"):
        user_data_files(str(listing))


def test_readme_user_data_example_runs(tmp_path, monkeypatch):
    """The README's commands as written, plus sizes that keep the test fast."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for line in readme_block("user-data-example").strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "ppo-rlhf"
        extra = FAST if args[1] == "pipeline" else []
        assert main(*args[1:], *extra) == 0, line
    run = tmp_path / "runs" / "reverse"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("sft_gold_reward", "ppo_gold_reward", "final_kl", "rm_accuracy"):
        assert summary[key] is not None, key
    assert summary["task"] == "examples/reverse/reverse.py:Reverse"
    assert (run / "report.html").stat().st_size > 10_000
    split = json.loads((run / "data" / "summary.json").read_text())["split"]
    assert "prefs_eval" in split and "prompts_eval" not in split
    ppo = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/gold_reward" in r for r in ppo)


def test_verifiable_reward_pipeline_without_preferences(tmp_path, monkeypatch):
    """No prefs_train.jsonl: the reward model stage is skipped, reward functions are the reward."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_train", "prompts_train"):
        shutil.copy(EXAMPLE / f"{name}.jsonl", data / f"{name}.jsonl")
    out = tmp_path / "run"
    assert main("pipeline", "--data", data, "--out", out, f"gold={EXAMPLE / 'reverse.py'}:gold",
                f"ppo.reward.functions={EXAMPLE / 'reverse.py'}:gold,{EXAMPLE / 'reverse.py'}:letters_ok",
                "ppo.reward.weights=1,0.5", *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rm_accuracy"] is None and not (out / "reward").exists()
    assert summary["ppo_gold_reward"] is not None and "reward" not in summary["stage_seconds"]
    ppo = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_fn/letters_ok" in r for r in ppo)


def test_pipeline_algo_selects_the_rl_preset_and_explicit_rl_settings_win():
    cfg = configured("algo=grpo", "ppo.algo.samples_per_prompt=3", "ppo.rollout.batch_size=64")
    assert cfg.ppo.algo.name == "grpo" and cfg.ppo.algo.advantage == "grpo"
    assert cfg.ppo.algo.samples_per_prompt == 3 and cfg.ppo.rollout.batch_size == 64
    assert configured("algo=grpo").ppo.rollout.batch_size == 16  # the preset's
    with pytest.raises(UserError, match="no algorithm preset 'grpoo'"):
        configured("algo=grpoo")
