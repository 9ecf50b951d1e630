"""SFT and reward-model training, ours vs TRL 1.12.0 `SFTTrainer` / `RewardTrainer`, on identical work.

    python benchmarks/train_vs_trl.py                       # both stages, fp32 and bf16, ~4 min
    python benchmarks/train_vs_trl.py --stages sft --precisions fp32 --rounds 1   # ~1 min

The work is the default `ppo-rlhf pipeline --task arithmetic`'s: its tokenizer, its data
(`ppo-rlhf data --task arithmetic`) encoded once by our encoders (BOS + prompt + response + EOS;
preference pairs likewise), and the tiny-gpt2 preset's initial weights saved with `save_pretrained`.
TRL gets the same token ids pre-tokenized (SFT: `input_ids` + `completion_mask`, so the loss is on
the same response tokens; RM: `chosen_ids` / `rejected_ids`), the same model directory, batch size,
learning rate and number of optimizer steps (`--sft-steps`, `--rm-steps`: a fixed slice of the
stages' epochs, so that a run takes seconds), fp32 or bf16 autocast on both sides (TRL `bf16=`), one
process per side and run (peak RSS is its own), the same torch threads. TRL's
`gradient_checkpointing` (default True) is turned off: it would add a recomputed forward, which is
not the same work. Everything else is each side's default (TRL: padding to the longest in the
batch, no packing; ours: whatever the stage does by default).

Timed: from the end of the first optimizer step to the end of the last (each side's own step
records: our metrics.jsonl times, a TRL callback), so model loading, data preparation and the
first step's warm-up are excluded on both sides. tokens/s = real (non-pad) tokens per step --
batch x the data's mean sequence length, the same for both sides -- x steps / seconds. Each run
records the cores other processes kept busy meanwhile; each side keeps its fastest round.
Results: benchmarks/results/train_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

LR = {"sft": 1e-3, "reward": 1e-4}


# -- the work, prepared once with our encoders ---------------------------------------------------
def prepare(root: Path, seed: int = 0) -> dict:
    """Tokenizer, data, the initial model and the pre-tokenized sets under `root`; their paths."""
    from ppo_rlhf.config import RewardConfig, SFTConfig
    from ppo_rlhf.data.encode import encode_pairs, encode_sft
    from ppo_rlhf.data.jsonl import read_preferences, read_sft
    from ppo_rlhf.models import load_causal_lm
    from ppo_rlhf.tokenizer import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir, init_dir = root / "tokenizer", root / "data", root / "init-model"
    cli = [sys.executable, "-m", "ppo_rlhf.cli"]
    if not (tok_dir / "tokenizer.json").is_file():
        subprocess.run(cli + ["tokenizer", "--task", "arithmetic", "--out", str(tok_dir)], check=True,
                       capture_output=True)
    if not (data_dir / "prefs_train.jsonl").is_file():
        subprocess.run(cli + ["data", "--task", "arithmetic", "--out", str(data_dir), f"seed={seed}"], check=True,
                       capture_output=True)
    tok = load_tokenizer(str(tok_dir))
    # saved afresh every invocation (it takes a moment): a cached copy would keep an older preset's
    # config, e.g. the tanh GELU that GPT-2 presets used before they switched to the exact one
    load_causal_lm("tiny-gpt2", tok, seed=seed).save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    sft_cfg, rm_cfg = SFTConfig(), RewardConfig()
    sft_path, rm_path = root / "sft_tokens.json", root / "rm_tokens.json"
    if not sft_path.is_file():
        examples, _ = read_sft(str(data_dir / "sft_train.jsonl"))
        encoded, _ = encode_sft(tok, examples, sft_cfg.max_prompt_len, sft_cfg.max_len)
        sft_path.write_text(json.dumps([{"input_ids": e.input_ids, "completion_mask": [int(m) for m in e.loss_mask]}
                                        for e in encoded]))
    if not rm_path.is_file():
        pairs, _ = read_preferences(str(data_dir / "prefs_train.jsonl"))
        encoded, _ = encode_pairs(tok, pairs, rm_cfg.max_prompt_len, rm_cfg.max_len)
        rm_path.write_text(json.dumps([{"chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
                                       for e in encoded]))
    sft_rows, rm_rows = json.loads(sft_path.read_text()), json.loads(rm_path.read_text())
    return {"tokenizer": str(tok_dir), "init_model": str(init_dir), "data": str(data_dir),
            "sft_tokens": str(sft_path), "rm_tokens": str(rm_path),
            "sft_mean_tokens": statistics.mean(len(r["input_ids"]) for r in sft_rows),
            "rm_mean_tokens": statistics.mean(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rm_rows),
            "sft_examples": len(sft_rows), "rm_pairs": len(rm_rows),
            "sft_batch": sft_cfg.batch_size, "rm_batch": rm_cfg.batch_size}


# -- our side ---------------------------------------------------------------------------------------
def ours(job: dict) -> dict:
    import torch

    from ppo_rlhf.config import RewardConfig, SFTConfig, build_config
    from ppo_rlhf.stages.reward import run_reward
    from ppo_rlhf.stages.sft import run_sft

    paths, stage = job["paths"], job["stage"]
    torch.set_num_threads(job["threads"])
    out_dir = tempfile.mkdtemp(prefix=f"ours-{stage}-bench-")
    run = {"threads": job["threads"], "dtype": {"fp32": "float32", "bf16": "bfloat16"}[job["precision"]],
           "tensorboard": False, "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0}
    common = {"out_dir": out_dir, "max_steps": job["steps"], "batch_size": job["batch"], "run": run,
              "model": {"path": paths["init_model"], "tokenizer": paths["tokenizer"]},
              "optim": {"lr": LR[stage]}}
    if stage == "sft":
        cfg = build_config(SFTConfig, base={**common, "train_file": f"{paths['data']}/sft_train.jsonl"})
        run_sft(cfg)
        key = "sft/train_loss"
    else:
        cfg = build_config(RewardConfig, base={**common, "train_file": f"{paths['data']}/prefs_train.jsonl"})
        run_reward(cfg)
        key = "rm/train_loss"
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if key in r]
    assert len(stamps) == job["steps"], (len(stamps), job["steps"])
    return {"stamps": stamps, "peak_rss_mb": bc.peak_rss_mb(), "dtype": run["dtype"],
            "threads": torch.get_num_threads()}


# -- TRL's side (no ppo_rlhf imports: TRL runs as its users run it) -------------------------------
def trl(job: dict) -> dict:
    import datasets
    import torch
    import trl as trl_pkg
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    paths, stage = job["paths"], job["stage"]
    torch.set_num_threads(job["threads"])
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    common = dict(output_dir=tempfile.mkdtemp(prefix=f"trl-{stage}-bench-"), report_to="none", save_strategy="no",
                  use_cpu=True, bf16=job["precision"] == "bf16", fp16=False, gradient_checkpointing=False,
                  per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
                  max_steps=job["steps"], learning_rate=LR[stage], disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    if stage == "sft":
        rows = json.loads(Path(paths["sft_tokens"]).read_text())
        model = AutoModelForCausalLM.from_pretrained(paths["init_model"])
        trainer = trl_pkg.SFTTrainer(model=model, args=trl_pkg.SFTConfig(**common, max_length=None),
                                     train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                     callbacks=[Stamp()])
    else:
        rows = json.loads(Path(paths["rm_tokens"]).read_text())
        model = AutoModelForSequenceClassification.from_pretrained(paths["init_model"], num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        trainer = trl_pkg.RewardTrainer(model=model, args=trl_pkg.RewardConfig(**common, max_length=None),
                                        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                        callbacks=[Stamp()])
    trainer.train()
    assert len(stamps) == job["steps"], (len(stamps), job["steps"])
    return {"stamps": stamps, "peak_rss_mb": bc.peak_rss_mb(),
            "dtype": "bfloat16" if trainer.args.bf16 else "float32", "threads": torch.get_num_threads(),
            "trl": trl_pkg.__version__}


# -- driver -----------------------------------------------------------------------------------------
def run_side(python: str, side: str, job: dict, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    with bc.OtherLoad() as load:
        try:
            proc = subprocess.run([python, __file__, "--worker", side, json.dumps(job)], capture_output=True,
                                  text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON: "):
            res = json.loads(line[len("RESULT_JSON: "):])
            # The worker's own CPU is part of the machine's busy time: OtherLoad counts this
            # process's children only after they exit, which they have.
            res["other_load_cores"], res["steal_cores"] = load.cores, load.steal_cores
            stamps = res.pop("stamps")
            res["timed_steps"] = len(stamps) - 1
            res["train_s"] = stamps[-1] - stamps[0]
            res["step_s"] = res["train_s"] / res["timed_steps"]
            res["tokens_per_s"] = job["tokens_per_step"] / res["step_s"]
            return res
    return {"error": f"exit {proc.returncode}: {(proc.stdout[-1500:] + proc.stderr[-3000:]).strip()}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="sft,reward", help="comma-separated: sft, reward")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (both sides alike)")
    ap.add_argument("--sft-steps", type=int, default=150, help="optimizer steps of each SFT run")
    ap.add_argument("--rm-steps", type=int, default=60, help="optimizer steps of each reward-model run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side; each side keeps its fastest")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each side")
    ap.add_argument("--trl-python", default="/work/trl-venv/bin/python",
                    help="Python of the virtualenv with trl==1.12.0 (see benchmarks/README.md)")
    ap.add_argument("--work-dir", default="/tmp/train_vs_trl_work")
    ap.add_argument("--out", default=str(HERE / "results" / "train_vs_trl.json"))
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args(argv)
    trl_python = args.trl_python if Path(args.trl_python).is_file() else None
    if trl_python is None:
        print(f"[train_vs_trl] TRL skipped: {args.trl_python} not found (see benchmarks/README.md)", flush=True)
    paths = prepare(Path(args.work_dir))
    print(f"[train_vs_trl] {bc.machine_kind()}; SFT: {paths['sft_examples']} examples, mean "
          f"{paths['sft_mean_tokens']:.1f} tokens; RM: {paths['rm_pairs']} pairs, mean "
          f"{paths['rm_mean_tokens']:.1f} tokens per pair", flush=True)
    t0 = time.time()
    results: dict[str, dict[str, list[dict]]] = {}
    for rnd in range(args.rounds):
        for stage in args.stages.split(","):
            sft = stage == "sft"
            steps, batch = (args.sft_steps, paths["sft_batch"]) if sft else (args.rm_steps, paths["rm_batch"])
            mean = paths["sft_mean_tokens"] if stage == "sft" else paths["rm_mean_tokens"]
            for precision in args.precisions.split(","):
                job = {"stage": stage, "precision": precision, "steps": steps, "batch": batch,
                       "threads": args.threads, "paths": paths, "tokens_per_step": batch * mean}
                sides = [("ours", sys.executable)] + ([("trl", trl_python)] if trl_python else [])
                if rnd % 2:
                    sides.reverse()
                for side, python in sides:
                    res = run_side(python, side, job, args.timeout)
                    res["round"] = rnd
                    results.setdefault(f"{stage} {precision}", {}).setdefault(side, []).append(res)
                    msg = res["error"][-600:] if "error" in res else (
                        f"{res['step_s'] * 1e3:.1f} ms/step, {res['tokens_per_s']:,.0f} tok/s, peak RSS "
                        f"{res['peak_rss_mb']:,.0f} MB, other load {res['other_load_cores']:.1f}")
                    print(f"[{time.time() - t0:5.0f} s] round {rnd + 1} {stage:<6} {precision} {side:<4} {msg}",
                          flush=True)
    rows, comparisons = [], []
    for name, by_side in results.items():
        best = {side: min((r for r in runs if "error" not in r), key=lambda r: r["step_s"], default=runs[-1])
                for side, runs in by_side.items()}
        for side, r in best.items():
            rows.append([name, side] + (["error", "-", "-", "-"] if "error" in r else [
                f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_rss_mb']:,.0f}",
                f"{r['other_load_cores']:.1f}"]))
        ok = all(side in best and "error" not in best[side] for side in ("ours", "trl"))
        tps = best["ours"]["tokens_per_s"] / best["trl"]["tokens_per_s"] if ok else None
        rss = best["ours"]["peak_rss_mb"] / best["trl"]["peak_rss_mb"] if ok else None
        rows.append(["", "ours/TRL", "", f"{tps:.2f}x" if tps else "-", f"{rss:.2f}x" if rss else "-", ""])
        comparisons.append({"run": name, "ours_over_trl_tokens_per_s": tps, "ours_over_trl_peak_rss": rss,
                            "best": best})
    header = ["stage precision", "side", "ms/step", "tokens/s", "peak RSS MB", "other load"]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    table = "\n".join(" | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in [header] + rows)
    print(f"\nSFT / RM training, ours vs TRL 1.12.0 on {bc.machine_kind()} (best of {args.rounds} round(s), "
          f"{args.threads} threads; RSS ratio = ours/TRL)\n{table}")
    cpu, flags = bc.cpu_model_and_flags()
    out = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpu": cpu, "cpu_flags": flags, "kind": bc.machine_kind(), "threads": args.threads},
           "work": {k: v for k, v in paths.items() if not k.endswith("_tokens") or k.endswith("mean_tokens")},
           "comparisons": comparisons, "runs": results, "table": table, "total_s": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"[train_vs_trl] wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, job = sys.argv[2], json.loads(sys.argv[3])
        print("RESULT_JSON: " + json.dumps((ours if side == "ours" else trl)(job)), flush=True)
    else:
        raise SystemExit(main())
