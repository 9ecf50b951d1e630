"""Every stage that reads another stage's model refuses one trained with another tokenizer
(issue 13, defect 2): the evaluation's reference and reward model, the reward stage's
normalisation policy. The comparison itself is tested in test_models.py."""

from __future__ import annotations

import json

import pytest
from tiny_tokenizer import make_tokenizer

from ppo_rlhf.config import EvalConfig, RewardConfig, build_config
from ppo_rlhf.data.jsonl import PromptExample, SFTExample, prompt_text
from ppo_rlhf.errors import UserError
from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model
from ppo_rlhf.stages.evaluate import run_eval
from ppo_rlhf.stages.reward import run_reward


@pytest.fixture
def run_dir(tmp_path):
    """An SFT model and a reward model of one tokenizer, and one of a larger vocabulary."""
    tok, other = make_tokenizer(), make_tokenizer(53)
    save_model(load_causal_lm("tiny-gpt2", tok), tok, tmp_path / "sft")
    save_model(load_causal_lm("tiny-gpt2", other), other, tmp_path / "other_sft")
    save_model(load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True), tok, tmp_path / "rm")
    save_model(load_scalar_model("tiny-gpt2", other, init_from_causal_lm=True), other,
               tmp_path / "other_rm")
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(8)))
    (tmp_path / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": f"w{i}", "chosen": "w1", "rejected": "w2"}) + "\n" for i in range(8)))
    return tmp_path


@pytest.mark.parametrize("key, model", [("reward_model", "other_rm"), ("reference", "other_sft")])
def test_eval_refuses_a_model_of_another_tokenizer(run_dir, key, model):
    cfg = build_config(EvalConfig, overrides=[
        f"policy={run_dir / 'sft'}", f"prompts_file={run_dir / 'prompts.jsonl'}",
        f"{key}={run_dir / model}", "n=4"])
    with pytest.raises(UserError, match=rf"policy \({run_dir / 'sft'}\) and {key} "
                                        rf"\({run_dir / model}\) use different tokenizers: "
                                        r"vocabulary size 44 vs 57"):
        run_eval(cfg)


def test_eval_accepts_models_of_one_tokenizer(run_dir):
    cfg = build_config(EvalConfig, overrides=[
        f"policy={run_dir / 'sft'}", f"prompts_file={run_dir / 'prompts.jsonl'}",
        f"reward_model={run_dir / 'rm'}", f"reference={run_dir / 'sft'}", "n=4", "max_new_tokens=2"])
    result = run_eval(cfg)
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference


def test_reward_stage_refuses_a_normalisation_policy_of_another_tokenizer(run_dir):
    cfg = build_config(RewardConfig, overrides=[
        f"out_dir={run_dir / 'out'}", f"train_file={run_dir / 'prefs.jsonl'}",
        f"model.path={run_dir / 'sft'}", f"norm_prompts_file={run_dir / 'prompts.jsonl'}",
        f"norm_policy={run_dir / 'other_sft'}"])
    with pytest.raises(UserError, match=r"normalisation policy \(norm_policy\) .* and reward model "
                                        r".* use different tokenizers: vocabulary size 57 vs 44"):
        run_reward(cfg)


def test_prompt_text_is_the_string_or_the_last_message():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    assert prompt_text("2+2=") == "2+2=" and prompt_text(messages) == "2+2="
    assert prompt_text(PromptExample(messages, "f.jsonl:1")) == "2+2="
    assert prompt_text(SFTExample("w1", "w2", "f.jsonl:2")) == "w1"
