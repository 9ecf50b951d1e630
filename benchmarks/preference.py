"""Preference optimisation against RL, from one tokenizer, data set, SFT model and reward model per
seed: `ppo-rlhf pipeline --compare` over tasks and pipeline seeds -> benchmarks/PREFERENCE.md,
results/preference_<task>.json and .png (held-out gold against KL, every method's evaluations).

    python benchmarks/preference.py --tasks arithmetic sentiment --seeds 0 1 2 --work /work/bench
    python benchmarks/preference.py --tasks sentiment --seeds 0 1 2 --work /work/bench --no-run

Each seed is a whole pipeline (data, SFT, RM and every method re-made), run as

    ppo-rlhf pipeline --task T --out WORK/pref/T-sS seed=S --compare ppo,grpo,dpo,ipo,simpo,kto,orpo,online_dpo

and evaluated by the comparison itself: the same 400 held-out prompt samples for every method,
greedy and sampled at the RL stage's temperature, KL to the SFT model of the sampled responses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from algorithms import cpu_info, ms, read_metrics  # noqa: E402

METHODS = "ppo,grpo,dpo,ipo,simpo,kto,orpo,online_dpo"


def run_seed(task: str, seed: int, work: Path, methods: str, threads: int) -> Path:
    """The comparison of one pipeline seed (skipped stage by stage when its output exists)."""
    out = work / "pref" / f"{task}-s{seed}"
    if not (out / "compare.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        print(f"[run] ppo-rlhf pipeline --task {task} --out {out} seed={seed} --compare {methods}", flush=True)
        with (out.parent / f"{task}-s{seed}.log").open("a") as fh:
            subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", "pipeline", "--task", task, "--out", str(out),
                            f"seed={seed}", "--compare", methods], check=True, stdout=fh,
                           stderr=subprocess.STDOUT, env=env)
    return out


def curve(run_dir: Path) -> list[dict]:
    """A method's held-out evaluations during training: [{"kl", "gold"}], from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{"kl": r["eval/kl"], "gold": r["eval/gold_reward"]} for r in read_metrics(path)
            if "eval/kl" in r and "eval/gold_reward" in r]


def gather(task: str, seeds: list[int], work: Path) -> list[dict]:
    """One row per (seed, method): the comparison's figures, the gain over that seed's SFT, the curve."""
    rows = []
    for seed in seeds:
        out = work / "pref" / f"{task}-s{seed}"
        if not (out / "compare.json").is_file():
            continue
        compare = json.loads((out / "compare.json").read_text())
        res = compare["results"]
        sft = res["sft"]
        rm = json.loads((out / "reward" / "summary.json").read_text()) if (out / "reward").is_dir() else {}
        for method in compare["methods"]:
            r = res[method]
            method_dir = out / ("sft" if method == "sft" else method)
            rows.append({"task": task, "seed": seed, "method": method, "gold": r["gold_reward"],
                         "greedy": r["gold_reward_greedy"], "kl": r["kl"], "rm_score": r.get("rm_score"),
                         "seconds": r.get("seconds"), "gain": 100 * (r["gold_reward"] - sft["gold_reward"]),
                         "greedy_gain": 100 * (r["gold_reward_greedy"] - sft["gold_reward_greedy"]),
                         "rm_accuracy": rm.get("eval_accuracy"), "curve": curve(method_dir)})
    return rows


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | gold sampled | gold greedy | KL (nats) | gain sampled, points (min) | gain greedy, points "
             "| RM score | seconds | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        gains = [r["gain"] for r in rs]
        lines.append(f"| {m} | {ms([r['gold'] for r in rs])} | {ms([r['greedy'] for r in rs])} | "
                     f"{ms([r['kl'] for r in rs], '{:.2f}')} | "
                     f"{statistics.mean(gains):+.1f} (min {min(gains):+.1f}) | "
                     f"{statistics.mean(r['greedy_gain'] for r in rs):+.1f} | "
                     f"{ms([r['rm_score'] for r in rs])} | {ms([r['seconds'] for r in rs], '{:.0f}')} | "
                     f"{len(rs)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for r in rows:
        c = colors[r["method"]]
        first = r["seed"] == min(x["seed"] for x in rows)
        if r["curve"]:
            ax.plot([p["kl"] for p in r["curve"]], [p["gold"] for p in r["curve"]], color=c, alpha=0.35, linewidth=1)
        ax.scatter([r["kl"]], [r["gold"]], color=c, s=28, label=r["method"] if first else None, zorder=3)
    ax.set_xscale("symlog", linthresh=1.0)  # the RL methods stay below 1 nat, offline ones reach 10+
    ax.set_xlabel("KL to the SFT model (nats per response, sampled; linear below 1, log above)")
    ax.set_ylabel("held-out gold reward (sampled)")
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"{task}: gold against KL, {len(seeds)} pipeline seed(s); lines: evaluations during training")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="*", default=["arithmetic", "sentiment"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--work", default="runs/preference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only gather the comparisons that exist")
    args = ap.parse_args()
    work = Path(args.work)
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    for task in args.tasks:
        if not args.no_run:
            for seed in args.seeds:
                run_seed(task, seed, work, args.methods, args.threads)
        rows = gather(task, args.seeds, work)
        if not rows:
            print(f"[{task}] no comparisons in {work / 'pref'}")
            continue
        out = {"task": task, "cpu": cpu_info(), "seeds": sorted({r["seed"] for r in rows}), "rows": rows,
               "command": " ".join(sys.argv)}
        (res_dir / f"preference_{task}.json").write_text(json.dumps(out, indent=1))
        plot(rows, res_dir / f"preference_{task}.png", task)
        print(f"## {task}\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
