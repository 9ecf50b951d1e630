"""GRPO against TRL 1.12's GRPOTrainer on matched work: time in updates and held-out gold
-> results/grpo_vs_trl_<task>.json (benchmarks/README.md, "GRPO against TRL").

    python benchmarks/grpo_vs_trl.py --task arithmetic                       # fp32, 150 updates
    python benchmarks/grpo_vs_trl.py --task arithmetic --precisions fp32,bf16 --updates 60

Both sides start from the same SFT policy (`ppo-rlhf pipeline --task T`'s, made first if `--base`
has none) and train on the task's gold as the only reward function, with the work matched
(SETTINGS): per update, 16 prompts x 4 samples at T = 0.7, at most the task's max_new_tokens, each
generation used for 2 iterations x 2 minibatches of 32 (4 optimizer steps), lr 1e-4 constant,
AdamW (0.9, 0.95), clip 0.2, the "grpo" loss (per-sequence token means), group-scaled rewards,
DeepSeekMath's k3 KL in the loss at beta 0.04. Ours:

    ppo-rlhf rl algo=grpo algo.kl_in=loss reward.kl_estimator=k3 reward.kl_coef=0.04 reward.normalize=false \
        policy=SFT reward.functions=ppo_rlhf.tasks.T:gold train.updates=N ...

(reward.normalize=false: TRL does not normalise; GRPO's group scaling makes it moot anyway). Times:
ours, the sum of `perf/seconds_per_update` (generate + score + train, no evaluation); TRL,
`train_runtime` (all of `trainer.train()`, which evaluates nothing here). The sides run one after
another in one invocation, ours first, `--rounds` times interleaved; the ratio is TRL's time over
ours. Quality: each final policy through the same `ppo-rlhf eval` on the task's 400 held-out
prompt samples, sampled (T = 0.7) and greedy, with the KL to the SFT policy. The CPU model, its
flags and the cores other processes kept busy during each run are recorded: compare ratios within
one invocation on a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from algorithms import cli  # noqa: E402
from bench_common import LABEL_HELP, OtherLoad, cpu_model_and_flags, suffix  # noqa: E402

SETTINGS = {"prompts_per_update": 16, "samples_per_prompt": 4, "temperature": 0.7, "ppo_epochs": 2,
            "num_minibatches": 2, "lr": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
            "clip_eps": 0.2, "beta": 0.04, "max_prompt_len": 64}


def evaluate(policy: Path, base: Path, task: str, out: Path, log: Path) -> dict:
    """Held-out gold (sampled and greedy) and KL of `policy` to the SFT model: `ppo-rlhf eval`."""
    res = {}
    for kind, temperature in (("sampled", 0.7), ("greedy", 0.0)):
        path = out / f"eval_{kind}.json"
        if not path.is_file():
            cli("eval", f"policy={policy}", f"reference={base / 'sft' / 'model'}",
                f"prompts_file={base / 'data' / 'prompts_eval.jsonl'}", f"task={task}",
                f"temperature={temperature}", "n=400", f"out={path}", log=log)
        r = json.loads(path.read_text())
        res[f"gold_{kind}"] = r["gold_reward"]
        res[f"kl_{kind}"] = r.get("kl")
    return res


def ours_overrides(task: str, base: Path, precision: str, seed: int, updates: int, threads: int) -> list[str]:
    """`ppo-rlhf rl` keys of our side of the matched work (SETTINGS) from `base`'s SFT model and
    prompts, with the gold as the only reward (grpo_step_floor.py builds its trainer from them too)."""
    s = SETTINGS
    return ["algo=grpo", "algo.kl_in=loss", "reward.kl_estimator=k3", f"reward.kl_coef={s['beta']}",
            "reward.normalize=false", f"policy={base / 'sft' / 'model'}",
            f"prompts_file={base / 'data' / 'prompts_train.jsonl'}", f"reward.functions=ppo_rlhf.tasks.{task}:gold",
            f"train.updates={updates}", f"rollout.batch_size={s['prompts_per_update']}",
            f"algo.samples_per_prompt={s['samples_per_prompt']}", f"rollout.temperature={s['temperature']}",
            f"train.ppo_epochs={s['ppo_epochs']}", f"train.num_minibatches={s['num_minibatches']}",
            f"optim.lr={s['lr']}", "optim.schedule=constant", "optim.warmup_steps=0",
            f"optim.adam_beta2={s['adam_beta2']}", f"loss.clip_eps={s['clip_eps']}",
            f"run.dtype={'bfloat16' if precision == 'bf16' else 'float32'}", f"run.seed={seed}",
            f"run.threads={threads}", "run.eval_every=0", "run.save_every=0"]


def run_ours(task: str, base: Path, out: Path, precision: str, seed: int, updates: int, threads: int,
             log: Path) -> dict:
    if not (out / "summary.json").is_file():
        cli("rl", "--out", out, *ours_overrides(task, base, precision, seed, updates, threads), log=log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per = [r for r in rows if "perf/seconds_per_update" in r]
    phases = {k: sum(r.get(f"time/{k}", 0.0) for r in per) for k in ("generate", "score", "train")}
    return {"side": "ours", "updates_s": sum(r["perf/seconds_per_update"] for r in per), "phases_s": phases,
            "updates": len(per), "model": out / "model"}


def run_trl(task: str, base: Path, out: Path, precision: str, seed: int, updates: int, threads: int,
            trl_python: str, max_new_tokens: int, log: Path) -> dict:
    result = out / "trl.json"
    if not result.is_file():
        out.mkdir(parents=True, exist_ok=True)
        spec = {"sft": str(base / "sft" / "model"), "prompts_file": str(base / "data" / "prompts_train.jsonl"),
                "reward_function": f"ppo_rlhf.tasks.{task}:gold", "save_to": str(out / "model"),
                "precision": precision, "seed": seed, "threads": threads,
                "settings": {**SETTINGS, "updates": updates, "max_new_tokens": max_new_tokens}}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(spec, fh)
        with log.open("a") as lf:
            env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
            subprocess.run([trl_python, str(HERE / "trl_grpo_worker.py"), fh.name, str(result)], check=True,
                           stdout=lf, stderr=subprocess.STDOUT, env=env)
    r = json.loads(result.read_text())
    return {"side": "trl", "updates_s": r["train_runtime"], "updates": updates, "model": out / "model",
            "versions": r["versions"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--base", type=Path, default=None, help="a `ppo-rlhf pipeline` run (default: WORK/base-TASK)")
    ap.add_argument("--work", type=Path, default=Path("runs/grpo_vs_trl"))
    ap.add_argument("--updates", type=int, default=150)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    ap.add_argument("--label", default="", help=LABEL_HELP)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    base = args.base or args.work / f"base-{args.task}"
    if not (base / "sft" / "model").is_dir():
        cli("pipeline", "--task", args.task, "--out", base, "seed=0", log=log)
    if not Path(args.trl_python).is_file():
        sys.exit(f"{args.trl_python} not found: create the TRL virtualenv as benchmarks/README.md says, "
                 "or pass --trl-python PATH")
    from ppo_rlhf.tasks import gold_task

    max_new_tokens = gold_task(args.task, "").default_max_new_tokens
    model, flags = cpu_model_and_flags()
    runs = []
    for rnd in range(args.rounds):
        for precision in args.precisions.split(","):
            for side in ("ours", "trl"):
                out = args.work / args.task / f"{side}-{precision}-u{args.updates}-s{args.seed}-r{rnd}"
                print(f"[run] {side} {precision} round {rnd}", flush=True)
                with OtherLoad() as load:
                    if side == "ours":
                        r = run_ours(args.task, base, out, precision, args.seed, args.updates, args.threads, log)
                    else:
                        r = run_trl(args.task, base, out, precision, args.seed, args.updates, args.threads,
                                    args.trl_python, max_new_tokens, log)
                r.update(evaluate(r.pop("model"), base, args.task, out, log), precision=precision, round=rnd,
                         other_load_cores=load.cores, steal_cores=load.steal_cores)
                runs.append(r)
                print(f"  {side}: {r['updates_s']:.1f} s in updates; gold sampled {r['gold_sampled']:.3f}, "
                      f"greedy {r['gold_greedy']:.3f}, KL {r['kl_sampled']:.2f}; other load "
                      f"{load.cores:.2f} cores", flush=True)
    sft = evaluate(base / "sft" / "model", base, args.task, args.work / args.task / "sft", log)
    table = []
    for precision in args.precisions.split(","):
        ours = [r for r in runs if r["side"] == "ours" and r["precision"] == precision]
        trl = [r for r in runs if r["side"] == "trl" and r["precision"] == precision]
        t_ours, t_trl = (statistics.median(r["updates_s"] for r in rs) for rs in (ours, trl))
        table.append({"precision": precision, "ours_s": t_ours, "trl_s": t_trl, "speedup": t_trl / t_ours,
                      **{f"{side}_{k}": statistics.mean(r[k] for r in rs) for side, rs in (("ours", ours), ("trl", trl))
                         for k in ("gold_sampled", "gold_greedy", "kl_sampled")}})
    res = {"task": args.task, "cpu": model, "flags": flags, "threads": args.threads, "updates": args.updates,
           "settings": SETTINGS, "sft": sft, "runs": runs, "table": table}
    dest = HERE / "results" / f"grpo_vs_trl_{args.task}{suffix(args.label)}.json"
    dest.write_text(json.dumps(res, indent=1, default=str))
    print(f"CPU: {model}; flags: {' '.join(flags) or 'none of avx512/amx'}; SFT gold sampled "
          f"{sft['gold_sampled']:.3f}, greedy {sft['gold_greedy']:.3f}")
    print("| precision | ours s | TRL s | TRL / ours | ours gold T=0.7 / greedy | TRL gold T=0.7 / greedy "
          "| KL ours / TRL |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['precision']} | {t['ours_s']:.1f} | {t['trl_s']:.1f} | {t['speedup']:.2f}x | "
              f"{t['ours_gold_sampled']:.3f} / {t['ours_gold_greedy']:.3f} | {t['trl_gold_sampled']:.3f} / "
              f"{t['trl_gold_greedy']:.3f} | {t['ours_kl_sampled']:.2f} / {t['trl_kl_sampled']:.2f} |")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
