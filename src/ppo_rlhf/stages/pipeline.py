"""The whole InstructGPT loop on a built-in task, one stage after another:

    tokenizer -> data -> sft -> reward -> ppo -> eval

    ppo-rlhf pipeline --task arithmetic --out runs/demo

Every stage writes into RUN/<stage>/ and is skipped when its output already exists, so an
interrupted pipeline continues where it stopped. RUN/summary.json gathers the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import distributed as dist
from ..config import PipelineConfig, to_dict
from ..fileio import atomic_write_json
from ..tasks import get_task
from .evaluate import run_eval
from .ppo import run_ppo
from .reward import run_reward
from .sft import run_sft
from .tools import run_data, run_tokenizer

STAGES = ("tokenizer", "data", "sft", "reward", "ppo", "eval")


def _done(path: Path) -> bool:
    return (path / "summary.json").is_file()


def _read_summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def configure(cfg: PipelineConfig) -> PipelineConfig:
    """Fill every stage's paths from the run directory (explicit settings are kept)."""
    run = Path(cfg.out_dir)
    task = get_task(cfg.task)
    data = run / "data"
    cfg.tokenizer.out_dir = cfg.tokenizer.out_dir or str(run / "tokenizer")
    cfg.tokenizer.task = cfg.tokenizer.task or cfg.task
    cfg.data.out_dir = cfg.data.out_dir or str(data)
    cfg.data.task = cfg.task
    cfg.data.seed = cfg.seed

    s = cfg.sft
    s.out_dir = s.out_dir or str(run / "sft")
    s.train_file = s.train_file or str(data / "sft_train.jsonl")
    s.eval_file = s.eval_file or str(data / "sft_eval.jsonl")
    s.task = s.task or cfg.task
    s.eval_prompts_file = s.eval_prompts_file or str(data / "prompts_eval.jsonl")
    s.model.path = cfg.model if s.model.path == "tiny-gpt2" else s.model.path
    s.model.tokenizer = s.model.tokenizer or cfg.tokenizer.out_dir
    s.run.seed = cfg.seed

    r = cfg.reward
    r.out_dir = r.out_dir or str(run / "reward")
    r.train_file = r.train_file or str(data / "prefs_train.jsonl")
    r.eval_file = r.eval_file or str(data / "prefs_eval.jsonl")
    r.norm_prompts_file = r.norm_prompts_file or str(data / "prompts_train.jsonl")
    r.max_new_tokens = task.default_max_new_tokens
    r.model.path = str(Path(s.out_dir) / "model") if r.model.path == "tiny-gpt2" else r.model.path
    r.run.seed = cfg.seed

    p = cfg.ppo
    p.out_dir = p.out_dir or str(run / "ppo")
    p.policy = p.policy or str(Path(s.out_dir) / "model")
    p.reward_model = p.reward_model or str(Path(r.out_dir) / "model")
    p.prompts_file = p.prompts_file or str(data / "prompts_train.jsonl")
    p.eval_prompts_file = p.eval_prompts_file or str(data / "prompts_eval.jsonl")
    p.ptx_file = p.ptx_file or str(data / "pretrain.jsonl")
    p.task = p.task or cfg.task
    p.run.seed = cfg.seed

    e = cfg.eval
    e.policy = e.policy or str(Path(p.out_dir) / "model")
    e.reference = e.reference or p.policy
    e.reward_model = e.reward_model or p.reward_model
    e.prompts_file = e.prompts_file or p.eval_prompts_file
    e.task = e.task or cfg.task
    e.temperature = p.rollout.temperature
    e.seed = cfg.seed + 4242
    return cfg


def run_pipeline(cfg: PipelineConfig) -> dict:
    cfg = configure(cfg)
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    seconds = summary.get("stage_seconds", {})

    def stage(name: str, fn, out: Path) -> None:
        if _done(out):
            print(f"[pipeline] {name}: output exists in {out}, skipped")
            return
        print(f"[pipeline] {name} -> {out}")
        t0 = time.time()
        result = fn()
        if isinstance(result, dict) and "stopped_at" in result:
            print(f"[pipeline] stopped during {name}; run the same pipeline command again to continue "
                  f"(finished stages are skipped, {name} resumes from its newest checkpoint)")
            raise SystemExit(0)
        seconds[name] = round(time.time() - t0, 2)

    if dist.is_main():
        stage("tokenizer", lambda: run_tokenizer(cfg.tokenizer), Path(cfg.tokenizer.out_dir))
        stage("data", lambda: run_data(cfg.data), Path(cfg.data.out_dir))
    dist.barrier()
    # resume=True: a stage interrupted in an earlier call continues from its newest checkpoint
    stage("sft", lambda: run_sft(cfg.sft, resume=True), Path(cfg.sft.out_dir))
    stage("reward", lambda: run_reward(cfg.reward, resume=True), Path(cfg.reward.out_dir))
    stage("ppo", lambda: run_ppo(cfg.ppo, resume=True), Path(cfg.ppo.out_dir))

    eval_dir = run / "eval"

    def evaluate() -> None:
        ppo_res = run_eval(cfg.eval)
        cfg.eval.policy = cfg.eval.reference
        sft_res = run_eval(cfg.eval)
        if dist.is_main():
            atomic_write_json(eval_dir / "summary.json", {"stage": "eval", "ppo": ppo_res, "sft": sft_res})

    stage("eval", evaluate, eval_dir)
    ev = _read_summary(eval_dir)
    rm = _read_summary(Path(cfg.reward.out_dir))
    summary.update({
        "task": cfg.task,
        "sft_gold_reward": ev["sft"].get("gold_reward"), "sft_gold_reward_std": ev["sft"].get("gold_reward_std"),
        "ppo_gold_reward": ev["ppo"].get("gold_reward"), "ppo_gold_reward_std": ev["ppo"].get("gold_reward_std"),
        "sft_rm_score": ev["sft"].get("rm_score"), "ppo_rm_score": ev["ppo"].get("rm_score"),
        "final_kl": ev["ppo"].get("kl"), "rm_accuracy": rm.get("eval_accuracy"),
        "eval_prompts": ev["ppo"].get("n"), "stage_seconds": seconds,
        "config": to_dict(cfg),
    })
    if dist.is_main():
        atomic_write_json(summary_path, summary)
        try:
            from ..report import write_report

            summary["report"] = str(write_report(run))
        except ImportError:
            pass
    return summary
