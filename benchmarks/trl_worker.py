"""TRL side of benchmarks/ppo_vs_trl.py: time `trl.experimental.ppo.PPOTrainer` (trl 1.12.0).

Run by ppo_vs_trl.py with the TRL virtualenv's Python, in its own process (so that its peak RSS is
its own):  /work/trl-venv/bin/python benchmarks/trl_worker.py CASE_JSON PATHS_JSON UPDATES THREADS

It prints one line `RESULT_JSON: {...}` at the end. Phases come from timing hooks: TRL's module
functions `batch_generation` (generation) and `forward` (its first call on the policy+value wrapper
marks the start of training) are wrapped, and a callback stamps the end of each update.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(case_json: str, paths_json: str, updates: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    t_import = time.perf_counter()
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    import_s = time.perf_counter() - t_import
    case = bc.Case.from_json(json.loads(case_json))
    paths = json.loads(paths_json)
    B, R = case.batch, case.response_len

    t_setup = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    ref = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    value = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    ids = json.loads(Path(paths["prompt_ids"]).read_text())
    train = datasets.Dataset.from_dict({"input_ids": ids})
    n_updates = updates + 1  # the first update is the warm-up
    out_dir = tempfile.mkdtemp(prefix="trl-ppo-bench-")
    # "fp32" / "bf16": autocast off / on (fp32 weights, like ours); "default": TRL's own (bf16=True).
    precision = {} if case.precision == "default" else {"bf16": case.precision == "bf16", "fp16": False}
    args = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=case.device == "cpu",
        **precision,
        gradient_checkpointing=False,  # TRL's default True would add a recompute forward
        per_device_train_batch_size=B, gradient_accumulation_steps=1,  # 1 micro-batch per minibatch
        num_mini_batches=case.num_minibatches, num_ppo_epochs=case.ppo_epochs,
        total_episodes=B * n_updates, response_length=R, temperature=0.7, stop_token=None,
        missing_eos_penalty=None, kl_coef=0.05, learning_rate=1e-5, num_sample_generations=0,
        disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0,
    )

    stamps: dict[str, list[float]] = {"gen_start": [], "gen_end": [], "train_start": [], "end": []}
    counts = {"pad": 0, "eos": 0, "response_tokens": 0}
    orig_batch_generation, orig_forward = ppo_mod.batch_generation, ppo_mod.forward

    def timed_batch_generation(model, queries, *a, **k):
        stamps["gen_start"].append(time.perf_counter())
        query_responses, logits = orig_batch_generation(model, queries, *a, **k)
        stamps["gen_end"].append(time.perf_counter())
        resp = query_responses[:, queries.shape[1]:]
        counts["pad"] += int((resp == tok.pad_token_id).sum())
        counts["eos"] += int((resp == tok.eos_token_id).sum())
        counts["response_tokens"] += resp.numel()
        return query_responses, logits

    def timed_forward(model, *a, **k):
        if hasattr(model, "value_model") and len(stamps["train_start"]) < len(stamps["gen_end"]):
            stamps["train_start"].append(time.perf_counter())
        return orig_forward(model, *a, **k)

    ppo_mod.batch_generation, ppo_mod.forward = timed_batch_generation, timed_forward

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps["begin"], stamps["cpu"] = [time.perf_counter()], [time.process_time()]

        def on_step_end(self, *a, **k):
            stamps["end"].append(time.perf_counter())
            stamps["cpu"].append(time.process_time())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train, callbacks=[Stamp()])
    setup_s = time.perf_counter() - t_setup
    rss_after_load = bc.current_rss_mb()
    trainer.train()

    ends = stamps["begin"] + stamps["end"]
    per_update = [b - a for a, b in zip(ends[:-1], ends[1:])]
    cpu = [b - a for a, b in zip(stamps["cpu"][:-1], stamps["cpu"][1:])]
    phases = {
        "generate": [b - a for a, b in zip(stamps["gen_start"], stamps["gen_end"])],
        "score": [b - a for a, b in zip(stamps["gen_end"], stamps["train_start"])],
        "train": [b - a for a, b in zip(stamps["train_start"], stamps["end"])],
    }
    assert len(per_update) == n_updates, (len(per_update), n_updates)
    return {"side": "trl", "case": case.to_json(), "update_s": per_update[1:], "warmup_s": per_update[0],
            "cpu_s": cpu[1:],
            "phases_s": {k: v[1:] for k, v in phases.items()},
            "peak_rss_mb": bc.peak_rss_mb(), "rss_after_load_mb": rss_after_load,
            "peak_gpu_mb": bc.gpu_memory_mb(),
            "import_s": import_s, "setup_s": setup_s, "threads": torch.get_num_threads(),
            "dtype": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
            "sampled_pad_tokens": counts["pad"], "sampled_eos_tokens": counts["eos"],
            "response_tokens": counts["response_tokens"], "expected_response_tokens": B * R * n_updates,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print("RESULT_JSON: " + json.dumps(result), flush=True)
