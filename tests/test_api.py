"""The Python API: configs from keywords / instances / YAML, and the README's snippet, run as written."""

import re
from pathlib import Path

import pytest

from ppo_rlhf import api
from ppo_rlhf.config import SFTConfig
from ppo_rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def readme_block(tag: str) -> str:
    """The fenced block that follows `<!-- test: TAG ... -->` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- test: {tag}\b.*?-->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README.md has no block tagged {tag}"
    return match.group(1)


def test_build_from_keywords_nested_dicts_and_overrides(tmp_path):
    cfg = api.build(SFTConfig, out_dir="x", optim={"lr": 3e-4}, overrides=["max_steps=7"])
    assert (cfg.out_dir, cfg.optim.lr, cfg.max_steps) == ("x", 3e-4, 7)
    base = SFTConfig(out_dir="y")
    copy = api.build(SFTConfig, base, batch_size=4)
    assert (copy.out_dir, copy.batch_size, base.batch_size) == ("y", 4, 32)  # the instance is copied
    yaml = tmp_path / "c.yaml"
    yaml.write_text("epochs: 2\n")
    assert api.build(SFTConfig, yaml, epochs=3).epochs == 3  # keywords after the YAML
    with pytest.raises(UserError, match="Did you mean 'optim.lr'"):
        api.build(SFTConfig, optim={"lrr": 1})
    with pytest.raises(UserError, match="above the maximum"):
        api.build(SFTConfig, optim={"adam_beta1": 2})


def test_package_reexports_the_api():
    import ppo_rlhf

    assert ppo_rlhf.sft is api.sft and ppo_rlhf.rl is api.rl and ppo_rlhf.pipeline is api.pipeline
    assert ppo_rlhf.RewardFunctions is api.RewardFunctions


def test_readme_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("api-example"), "README.md api-example", "exec"), scope)
    sft, rl = scope["sft"], scope["rl"]
    assert sft["steps"] == 150 and sft["final_train_loss"] < 4.0  # from ln(vocab) ~ 6.4
    assert 0.0 <= rl["gold_reward"] <= 1.0
    metrics = (tmp_path / "runs" / "api" / "rl" / "metrics.jsonl").read_text()
    assert '"reward_fn/exact"' in metrics  # the callable was the reward
    assert not (tmp_path / "runs" / "api" / "reward").exists()  # no reward model anywhere
