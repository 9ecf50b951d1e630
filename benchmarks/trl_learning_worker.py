"""TRL side of benchmarks/learning_efficiency.py: TRL 1.12.0's PPOTrainer on our arithmetic task,
evaluated every K updates with our own `evaluate_policy`.

Run by learning_efficiency.py with the TRL virtualenv's Python (created with
--system-site-packages, so `ppo_rlhf` imports too), one seed per process:

    /work/trl-venv/bin/python benchmarks/trl_learning_worker.py SPEC.json OUT.json

SPEC.json (written by learning_efficiency.py) names the SFT policy, the reward model as our PPO
loads it (`rm`: raw head + reward_gain/reward_bias in config.json), its export for TRL
(`rm_export`: the normalisation folded into the weights), the prompts files and the shared
settings. Models given to TRL are loaded with plain `transformers`:

- policy and reference: the SFT directory;
- reward model: the export, so that TRL's `get_reward` (raw head at the last non-pad token) gives
  our normalised score -- checked here against `ppo_rlhf.generation.sequence_rewards` on the SFT
  policy's own samples before training (assertion, max |difference| <= 1e-5, written to OUT);
- value model: the original RM directory (raw head), as our PPO initialises its value model.

Evaluation (step 0 in `on_train_begin`, then every `eval_every` updates and after the last one in
`on_step_end`) calls `ppo_rlhf.stages.evaluate.evaluate_policy` on the policy TRL is training, with
our SFT reference and RM, on the same prompts, seed and temperature as our `run_ppo` uses.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

EXPORT_TOLERANCE = 1e-5


def load_trl_models(spec: dict):
    """Policy, reference, reward (the export) and value (the raw RM) with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(spec["sft"], local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(spec["sft"], local_files_only=True)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_export"], local_files_only=True)
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm"], local_files_only=True)
    return policy, ref, reward, value


def load_eval_models(spec: dict, tok):
    """Our SFT reference and RM, loaded the way our PPO loads them (for the shared evaluation)."""
    from ppo_rlhf.models import load_causal_lm, load_scalar_model

    reference = load_causal_lm(spec["sft"], tok).eval().requires_grad_(False)
    rm = load_scalar_model(spec["rm"], tok).eval().requires_grad_(False)
    return reference, rm


def check_export(spec: dict, tok, policy, trl_reward, our_rm, prompt_ids: list[list[int]]) -> float:
    """Max |TRL get_reward(export) - our sequence_rewards(RM)| over SFT samples of 64 prompts."""
    from trl.experimental.utils import get_reward

    from ppo_rlhf.data.collate import collate_prompts
    from ppo_rlhf.generation import generate, sequence_rewards

    batch = collate_prompts(prompt_ids[:64], tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    resp, resp_mask = generate(policy, ids, mask, max_new_tokens=spec["settings"]["max_new_tokens"],
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               temperature=spec["settings"]["temperature"],
                               row_seeds=list(range(ids.size(0))))
    seq = torch.cat([ids, resp], 1)
    with torch.no_grad():
        ours = sequence_rewards(our_rm, seq, torch.cat([mask, resp_mask], 1))
        _, theirs, _ = get_reward(trl_reward, seq, tok.pad_token_id, ids.size(1))
    diff = float((ours - theirs).abs().max())
    assert diff <= EXPORT_TOLERANCE, f"TRL reward != our reward: max |diff| = {diff:.3g}"
    return diff


def trl_config(spec: dict, out_dir: str):
    """TRL's PPOConfig with the settings both implementations have (see LEARNING.md)."""
    from trl.experimental.ppo import PPOConfig

    s = spec["settings"]
    return PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=spec["seed"], dataloader_num_workers=0, disable_tqdm=True,
        logging_steps=1, num_sample_generations=0,
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=s["batch_size"], num_mini_batches=s["num_minibatches"],
        num_ppo_epochs=s["ppo_epochs"], total_episodes=s["batch_size"] * spec["updates"],
        response_length=s["max_new_tokens"], temperature=s["temperature"], stop_token="eos",
        missing_eos_penalty=None, kl_coef=s["kl_coef"], kl_estimator="k1", cliprange=s["clip_eps"],
        cliprange_value=s["value_clip_eps"], vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"],
        whiten_rewards=False, learning_rate=s["lr"], adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"],
        adam_epsilon=s["adam_eps"], weight_decay=s["weight_decay"], lr_scheduler_type="constant",
        warmup_steps=0,
    )


def make_callback(spec: dict, tok, eval_prompts, reference, rm, record: dict):
    """A TrainerCallback that evaluates the policy being trained and times the updates."""
    from transformers import TrainerCallback

    from ppo_rlhf.stages.evaluate import evaluate_policy

    s = spec["settings"]

    class Evaluate(TrainerCallback):
        trainer = None  # set after the trainer exists
        last = 0.0

        def _evaluate(self, step: int) -> None:
            t0 = time.perf_counter()
            res = evaluate_policy(self.trainer.model.policy, tok, eval_prompts, task=spec["task"],
                                  reward_model=rm, reference=reference, max_new_tokens=s["max_new_tokens"],
                                  temperature=s["temperature"], seed=spec["eval_seed"])
            record["evals"].append({"step": step, "samples": step * s["batch_size"],
                                    "gold_reward": res["gold_reward"], "kl": res["kl"],
                                    "rm_score": res["rm_score"], "response_length": res["response_length"]})
            record["eval_s"] += time.perf_counter() - t0

        def on_train_begin(self, args, state, control, **kw):
            self._evaluate(0)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            record["update_s"].append(time.perf_counter() - self.last)
            step = state.global_step
            if step % spec["eval_every"] == 0 or step == state.max_steps:
                self._evaluate(step)
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/kl" in logs:
                record["train"].append({"step": state.global_step, "kl": logs["objective/kl"],
                                        "rm_score": logs["objective/scores"],
                                        "truncated_frac": 1 - logs["val/num_eos_tokens"] / s["batch_size"]})

    return Evaluate()


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from trl.experimental.ppo import PPOTrainer

    from ppo_rlhf.data.encode import encode_prompts
    from ppo_rlhf.data.jsonl import read_prompts
    from ppo_rlhf.stages.evaluate import load_eval_prompts
    from ppo_rlhf.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    transformers.set_seed(spec["seed"])  # TRL's minibatch order comes from numpy's global RNG
    tok = load_tokenizer(spec["sft"])
    tok.padding_side = "left"  # TRL's DataCollatorWithPadding pads prompts as our rollout does
    policy, ref, reward, value = load_trl_models(spec)
    policy.generation_config.pad_token_id = tok.pad_token_id
    reference, rm = load_eval_models(spec, tok)
    # The same token ids as our PPO's prompts ([bos] prompt, encode_prompts).
    examples, _ = read_prompts(spec["prompts_file"])
    prompt_ids, _ = encode_prompts(tok, examples, spec["max_prompt_len"])
    eval_prompts = load_eval_prompts(spec["eval_prompts_file"], tok, spec["max_prompt_len"], spec["eval_samples"])
    record = {"side": "trl", "seed": spec["seed"], "evals": [], "train": [], "update_s": [], "eval_s": 0.0,
              "export_max_abs_diff": check_export(spec, tok, policy, reward, rm, prompt_ids),
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}}
    callback = make_callback(spec, tok, eval_prompts, reference, rm, record)
    with tempfile.TemporaryDirectory(prefix="trl-learning-") as out_dir:  # TRL saves nothing here
        trainer = PPOTrainer(args=trl_config(spec, out_dir), processing_class=tok,
                             model=policy, ref_model=ref, reward_model=reward, value_model=value,
                             train_dataset=datasets.Dataset.from_dict({"input_ids": prompt_ids}),
                             eval_dataset=datasets.Dataset.from_dict({"input_ids": eval_prompts.ids}),
                             callbacks=[callback])
        callback.trainer = trainer
        trainer.train()
    record["wall_s"] = time.perf_counter() - t_start
    Path(out_path).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
