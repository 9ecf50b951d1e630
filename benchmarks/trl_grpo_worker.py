"""TRL side of benchmarks/grpo_vs_trl.py: TRL 1.12.0's GRPOTrainer on one of our tasks, from our
SFT policy, with the task's gold as the reward function.

Run by grpo_vs_trl.py with the TRL virtualenv's Python (created with --system-site-packages, so
`ppo_rlhf` imports too), one run per process:

    /work/trl-venv/bin/python benchmarks/trl_grpo_worker.py SPEC.json OUT.json

SPEC.json (written by grpo_vs_trl.py) names the SFT policy, the prompts file, the task, where to
save the trained policy, and the settings both sides share. The prompts are given to TRL as text
with the BOS token written in front, so that TRL's tokenisation (add_special_tokens=False) gives the
token ids our rollout gives (`encode_prompts`: [bos] prompt); checked on every prompt before
training. Timing: `train_runtime` (all of `trainer.train()`), and the time of each optimizer step
from a callback. Nothing is evaluated during training; grpo_vs_trl.py evaluates the saved policy
with the same `ppo-rlhf eval` command as ours.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def trl_config(spec: dict, out_dir: str):
    """GRPOConfig with the settings both implementations share (grpo_vs_trl.py, SETTINGS)."""
    from trl import GRPOConfig

    s = spec["settings"]
    minibatch = s["prompts_per_update"] * s["samples_per_prompt"] // s["num_minibatches"]
    return GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True,
        bf16=spec["precision"] == "bf16", fp16=False, seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=10, gradient_checkpointing=False,
        # one generation of prompts_per_update x samples_per_prompt serves num_minibatches optimizer
        # steps of `minibatch` completions, num_iterations times (our ppo_epochs)
        per_device_train_batch_size=minibatch, gradient_accumulation_steps=1,
        steps_per_generation=s["num_minibatches"], num_generations=s["samples_per_prompt"],
        num_iterations=s["ppo_epochs"], max_steps=s["updates"] * s["num_minibatches"] * s["ppo_epochs"],
        max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0, top_k=0,
        beta=s["beta"], epsilon=s["clip_eps"], loss_type="grpo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=s["lr"], adam_beta1=s["adam_beta1"],
        adam_beta2=s["adam_beta2"], adam_epsilon=s["adam_eps"], weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, log_completions=False, shuffle_dataset=True,
    )


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    from ppo_rlhf.data.encode import encode_prompts
    from ppo_rlhf.data.jsonl import prompt_text, read_prompts
    from ppo_rlhf.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    transformers.set_seed(spec["seed"])
    tok = load_tokenizer(spec["sft"])
    policy = AutoModelForCausalLM.from_pretrained(spec["sft"], local_files_only=True)
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.generation_config.eos_token_id = tok.eos_token_id
    examples, _ = read_prompts(spec["prompts_file"])
    texts = [prompt_text(e) for e in examples]
    ours, _ = encode_prompts(tok, examples, spec["settings"]["max_prompt_len"])
    theirs = [tok(tok.bos_token + t, add_special_tokens=False)["input_ids"] for t in texts]
    mismatched = sum(a != b for a, b in zip(ours, theirs))
    assert mismatched == 0, f"{mismatched} prompts tokenise differently on the two sides"

    module, name = spec["reward_function"].split(":")
    gold = getattr(importlib.import_module(module), name)
    bos = tok.bos_token

    def reward(prompts, completions, **kwargs):  # TRL's prompts carry the BOS text: strip it
        return gold([p[len(bos):] if p.startswith(bos) else p for p in prompts], completions)

    reward.__name__ = "gold"
    record = {"side": "trl", "seed": spec["seed"], "precision": spec["precision"], "step_s": [],
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}}

    class Times(TrainerCallback):
        last = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            record["step_s"].append(time.perf_counter() - self.last)

    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=trl_config(spec, out_dir),
                              train_dataset=datasets.Dataset.from_dict({"prompt": [bos + t for t in texts]}),
                              processing_class=tok, callbacks=[Times()])
        out = trainer.train()
        record["train_runtime"] = out.metrics["train_runtime"]
        record["log"] = [h for h in trainer.state.log_history if "reward" in h or "kl" in h]
        trainer.model.save_pretrained(spec["save_to"])
        tok.save_pretrained(spec["save_to"])
    record["wall_s"] = time.perf_counter() - t_start
    Path(out_path).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
