"""Our side of benchmarks/ppo_vs_trl.py: time `ppo_rlhf.stages.rl.RLTrainer.step`.

Run by ppo_vs_trl.py in its own process (so that its peak RSS is its own):
    python benchmarks/ours_worker.py CASE_JSON PATHS_JSON UPDATES THREADS

Each timed update is what `run_ppo` times: one `trainer.step()` (rollout, scoring, the
ppo_epochs x num_minibatches optimizer steps and the metrics). Phases come from the trainer's own
PhaseTimer (time/generate, time/score, time/train). Profiling is profile_ppo.py's job.

Prints one line `RESULT_JSON: {...}` at the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def make_config(case: bc.Case, paths: dict, updates: int, threads: int, out_dir: str):
    """The PPOConfig that matches TRL's settings in trl_worker.py."""
    from ppo_rlhf.config import PPOConfig, build_config

    overrides = {
        "out_dir": out_dir, "policy": paths["policy"], "reward_model": paths["reward"],
        "prompts_file": paths["prompts_jsonl"], "max_prompt_len": case.prompt_len,
        "rollout": {"batch_size": case.batch, "max_new_tokens": case.response_len, "temperature": 0.7,
                    "truncated": "keep"},
        "reward": {"kl_coef": 0.05, "kl_estimator": "k1"},
        "loss": {"clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95},
        "train": {"updates": updates + 1, "ppo_epochs": case.ppo_epochs,
                  "num_minibatches": case.num_minibatches, "grad_accum": 1},
        "optim": {"lr": 1e-5},
        "run": {"threads": threads, "device": case.device, "tensorboard": False, "eval_every": 0, "seed": 0},
    }
    if case.precision != "default":  # "default": run.dtype as the config leaves it
        overrides["run"]["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[case.precision]
    return build_config(PPOConfig, base=overrides)


def main(case_json: str, paths_json: str, updates: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    t_import = time.perf_counter()
    import transformers

    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages import common
    from ppo_rlhf.stages.loop import StepContext
    from ppo_rlhf.stages.rl import RLTrainer

    import_s = time.perf_counter() - t_import
    case = bc.Case.from_json(json.loads(case_json))
    paths = json.loads(paths_json)
    B, R = case.batch, case.response_len
    cfg = make_config(case, paths, updates, threads, out_dir="/tmp/ours-ppo-bench")

    t_setup = time.perf_counter()
    device = common.setup(cfg.run)
    trainer = RLTrainer(cfg, device)
    expected = json.loads(Path(paths["prompt_ids"]).read_text())
    assert [list(r) for r in trainer.prompts.ids] == expected, "ours and TRL must see the same prompt ids"
    setup_s = time.perf_counter() - t_setup
    rss_after_load = bc.current_rss_mb()

    guard = NonFiniteGuard(cfg.run.max_nonfinite)
    wall, cpu, phases, lengths, truncated = [], [], [], [], []
    for step in range(1, updates + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.step(StepContext(step, guard, None)).metrics
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        phases.append(trainer.timer.totals())
        lengths.append(metrics["rollout/response_length"])
        truncated.append(metrics["rollout/truncated_frac"])
    assert all(abs(n - R) < 1e-9 for n in lengths), f"responses must be full length {R}: {lengths}"
    keys = ("generate", "score", "train")
    return {"side": "ours", "case": case.to_json(), "update_s": wall[1:], "warmup_s": wall[0],
            "cpu_s": cpu[1:],
            "phases_s": {k: [p[f"time/{k}"] for p in phases[1:]] for k in keys},
            "peak_rss_mb": bc.peak_rss_mb(), "rss_after_load_mb": rss_after_load,
            "peak_gpu_mb": bc.gpu_memory_mb(),
            "import_s": import_s, "setup_s": setup_s, "threads": torch.get_num_threads(),
            "dtype": trainer.dtype,
            "mean_response_length": sum(lengths) / len(lengths), "truncated_frac": min(truncated),
            "response_tokens": int(sum(lengths) * B), "expected_response_tokens": B * R * (updates + 1),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print("RESULT_JSON: " + json.dumps(result), flush=True)
