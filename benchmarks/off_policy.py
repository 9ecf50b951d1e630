"""Off-policy RL from the same SFT and reward checkpoints: gold reward against samples drawn, with
the KL reached -> benchmarks/OFF_POLICY.md, results/off_policy_<task>.json/png.

    python benchmarks/off_policy.py --task arithmetic --seeds 0 1 2
    python benchmarks/off_policy.py --task sentiment --seeds 0

Configurations (each from the base pipeline's SFT policy and RM, as benchmarks/algorithms.py):
- ppo: on-policy PPO as shipped (2 epochs x 2 minibatches per rollout of 64);
- ppo-replay2 / ppo-replay4: PPO with a replay buffer, algo.replay_ratio 2 / 4 (4 / 8 optimizer
  steps an iteration from the buffer, 1 epoch), truncated IS (loss.is_correction=tis, cap 2);
- sac-r1 / sac-r2 / sac-r4: algo=sac at replay ratio 1, 2 (the preset) and 4.
The curves are held-out gold (400 samples at T = 0.7, every 25 updates) against samples drawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from algorithms import base, cpu_info, ms, one_run, plot  # noqa: E402
from bench_common import LABEL_HELP, suffix  # noqa: E402

CONFIGS = {
    "ppo": ("ppo", []),
    "ppo-replay2": ("ppo", ["algo.replay_ratio=2", "train.ppo_epochs=1"]),
    "ppo-replay4": ("ppo", ["algo.replay_ratio=4", "train.ppo_epochs=1"]),
    "sac-r1": ("sac", ["algo.replay_ratio=1"]),
    "sac-r2": ("sac", []),
    "sac-r4": ("sac", ["algo.replay_ratio=4"]),
}


def samples_to_reach(evals: list[dict], target: float) -> int | None:
    """Samples drawn when held-out gold first reached `target` (None: never)."""
    return next((e["samples"] for e in evals if e["gold"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--work", default="runs/algorithms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only gather the runs that exist (a report)")
    ap.add_argument("--label", default="", help=LABEL_HELP)
    args = ap.parse_args()
    work = Path(args.work)
    log = work / "log-off-policy.txt"
    base_run = base(args.task, work, log)
    results = []
    for seed in args.seeds:
        for name in args.configs:
            algo, extra = CONFIGS[name]
            r = one_run(args.task, algo, seed, "rm", base_run, work, None, log,
                        [*extra, f"run.threads={args.threads}"], f"-op-{name}", run=not args.no_run)
            if r is None:
                continue
            r["config"] = name
            print(f"[done] {name} seed {seed}: gold {r['sft_gold']:.3f} -> {r['final_gold']:.3f} "
                  f"(greedy {r['sft_greedy']:.3f} -> {r['final_greedy']:.3f}), KL {r['final_kl']:.2f}", flush=True)
            results.append(r)
    ppo_final = [r["final_gold"] for r in results if r["config"] == "ppo"]
    target = statistics.mean(ppo_final) if ppo_final else None
    lines = ["| config | SFT gold T=0.7 | final T=0.7 | SFT greedy | final greedy | KL (nats) | samples to on-policy "
             "PPO's final gold | seeds |", "|---|---|---|---|---|---|---|---|"]

    for name in args.configs:
        rs = [r for r in results if r["config"] == name]
        reach = [samples_to_reach(r["evals"], target) if target is not None else None for r in rs]
        reached = [x for x in reach if x is not None]
        reach_txt = (f"{statistics.mean(reached):.0f} ({len(reached)}/{len(rs)} seeds)" if reached
                     else f"never (0/{len(rs)})")
        lines.append(f"| {name} | {ms([r['sft_gold'] for r in rs])} | {ms([r['final_gold'] for r in rs])} | "
                     f"{ms([r['sft_greedy'] for r in rs])} | {ms([r['final_greedy'] for r in rs])} | "
                     f"{ms([r['final_kl'] for r in rs])} | {reach_txt} | {len(rs)} |")
    # Mean held-out gold (and KL) of each configuration at each evaluation, over the seeds that have it.
    points = sorted({e["samples"] for r in results for e in r["evals"]})
    curve = ["| config | " + " | ".join(f"{p:,}" for p in points) + " |", "|---|" + "---|" * len(points)]
    for name in args.configs:
        rs = [r for r in results if r["config"] == name]
        cells = []
        for p in points:
            at = [e for r in rs for e in r["evals"] if e["samples"] == p]
            cells.append(f"{statistics.mean(e['gold'] for e in at):.3f} ({statistics.mean(e['kl'] for e in at):.2f})"
                         if at else "")
        curve.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Mean held-out gold (mean KL) against samples drawn:", "", *curve]
    out = {"task": args.task, "cpu": cpu_info(), "seeds": args.seeds, "ppo_final_gold": target,
           "results": results, "command": " ".join(sys.argv)}
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"off_policy_{args.task}{suffix(args.label)}.json").write_text(json.dumps(out, indent=1))
    plot(results, args.configs, res_dir / f"off_policy_{args.task}{suffix(args.label)}.png", key="config",
         panels=("samples", "kl"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
