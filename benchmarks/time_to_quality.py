"""Time to quality: the default pipeline against cheaper schedules, gold reward against wall time
per stage -> benchmarks/TIME_TO_QUALITY.md, results/time_to_quality_<task>.json/png.

    python benchmarks/time_to_quality.py --task arithmetic --variants default sft_b64 --seeds 0 1 2
    python benchmarks/time_to_quality.py --task arithmetic --no-run      # tabulate the runs that exist

Each variant is a set of pipeline overrides (VARIANTS below); each run is `ppo-rlhf pipeline --task T
--out WORK/T/<variant>-s<seed> seed=S <overrides>` in its own process, one after another, with the
default threads. The stage times are the pipeline's own (`stage_seconds` in its summary.json); the
cores that other processes kept busy during each run (`bench_common.OtherLoad`) are recorded beside
them, and a run during which they exceeded 0.1 core is flagged: its times are not comparable.
Quality: the SFT and final policies' held-out gold, sampled (T = 0.7) and greedy, the KL to the SFT
policy and the RM's accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import LABEL_HELP, OtherLoad, cpu_model_and_flags, suffix  # noqa: E402

# The schedules compared: the defaults (run.dtype=auto; SFT 20 epochs of 32 sequences at lr 1e-3, 2,500 steps on
# arithmetic; RM 3 epochs; 150 RL updates) and cheaper ones, each changing one stage.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "sft_b64": ["sft.batch_size=64", "sft.optim.lr=2e-3"],  # half the steps, 1.48x the time per step
    "sft_16_epochs": ["sft.epochs=16"],
    "sft_10_epochs": ["sft.epochs=10"],
    "sft_6_epochs": ["sft.epochs=6"],
    "rl_50_updates": ["ppo.train.updates=50"],
    # the default precision before run.dtype=auto (which on AMX CPUs trains SFT and the RM in bf16)
    "float32": ["sft.run.dtype=float32", "reward.run.dtype=float32", "ppo.run.dtype=float32"],
}
QUIET_LOAD = 0.1  # cores busy with other processes during the run
STAGES = ("tokenizer", "data", "sft", "reward", "ppo", "eval")


def one_run(task: str, variant: str, seed: int, work: Path, run: bool) -> dict | None:
    out = work / task / f"{variant}-s{seed}"
    summary = out / "summary.json"
    meta = out / "time_to_quality.json"
    if not summary.is_file():
        if not run:
            return None
        args = ["pipeline", "--task", task, "--out", str(out), f"seed={seed}", *VARIANTS[variant]]
        print(f"[run] ppo-rlhf {' '.join(args)}", flush=True)
        t0 = time.time()
        with (work / f"{task}.log").open("a") as fh, OtherLoad() as load:
            subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", *args], check=True, stdout=fh,
                           stderr=subprocess.STDOUT)
        meta.write_text(json.dumps({"other_load_cores": load.cores, "steal_cores": load.steal_cores,
                                    "wall": time.time() - t0}))
        print(f"      other processes kept {load.cores:.2f} cores busy; the hypervisor took "
              f"{load.steal_cores:.2f} cores (steal)", flush=True)
    s = json.loads(summary.read_text())
    m = json.loads(meta.read_text()) if meta.is_file() else {}
    secs = s["stage_seconds"]
    return {"variant": variant, "seed": seed, "stage_seconds": secs,
            "stages_total": sum(secs.get(k, 0.0) for k in STAGES), "process_wall": m.get("wall"),
            "other_load_cores": m.get("other_load_cores"), "steal_cores": m.get("steal_cores"),
            "quiet": m.get("other_load_cores") is not None and m["other_load_cores"] <= QUIET_LOAD,
            "sft_gold": s["sft_gold_reward"], "sft_gold_greedy": s["sft_gold_reward_greedy"],
            "final_gold": s["ppo_gold_reward"], "final_gold_greedy": s["ppo_gold_reward_greedy"],
            "kl": s["final_kl"], "rm_accuracy": s.get("rm_accuracy")}


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def table(rows: list[dict]) -> str:
    head = ("| variant | seeds | SFT s | RM s | RL s | stages s | SFT gold T=0.7 / greedy | final gold T=0.7 / greedy "
            "| KL | RM acc | quiet runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]

        def st(k, rs=rs):
            return statistics.mean(r["stage_seconds"].get(k, 0.0) for r in rs)

        def pair(a, b, rs=rs):
            return f"{mean(rs, a):.3f} / {mean(rs, b):.3f}"

        acc = mean(rs, "rm_accuracy")
        lines.append(f"| {variant} | {len(rs)} | {st('sft'):.1f} | {st('reward'):.1f} | {st('ppo'):.1f} | "
                     f"{mean(rs, 'stages_total'):.1f} | {pair('sft_gold', 'sft_gold_greedy')} | "
                     f"{pair('final_gold', 'final_gold_greedy')} | {mean(rs, 'kl'):.2f} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {sum(r['quiet'] for r in rs)}/{len(rs)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        axes[0].scatter([r["stage_seconds"]["sft"] for r in rs], [r["sft_gold"] for r in rs], label=variant)
        axes[1].scatter([r["stages_total"] for r in rs], [r["final_gold"] for r in rs], label=variant)
    axes[0].set(xlabel="SFT stage seconds", ylabel="SFT held-out gold (T = 0.7)")
    axes[1].set(xlabel="pipeline stages, seconds", ylabel="final held-out gold (T = 0.7)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--work", type=Path, default=Path("runs/time_to_quality"))
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs that exist")
    ap.add_argument("--label", default="", help=LABEL_HELP)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seeds outermost: each variant's seeds spread over the session
        for variant in args.variants:
            r = one_run(args.task, variant, seed, args.work, not args.no_run)
            if r is not None:
                rows.append(r)
    if not rows:
        sys.exit("no runs to tabulate")
    model, flags = cpu_model_and_flags()
    res = {"task": args.task, "cpu": model, "flags": flags, "variants": {v: VARIANTS[v] for v in args.variants},
           "runs": rows}
    out = HERE / "results" / f"time_to_quality_{args.task}{suffix(args.label)}.json"
    out.write_text(json.dumps(res, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"CPU: {model}; flags: {' '.join(flags) or 'none of avx512/amx'}")
    print(table(rows))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
