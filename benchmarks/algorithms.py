"""Every RL algorithm from the same SFT and reward checkpoints: gold reward against samples seen,
wall time and KL, over several seeds -> benchmarks/ALGORITHMS.md, results/algorithms_*.json/png.

    python benchmarks/algorithms.py --task arithmetic --seeds 0 1 2
    python benchmarks/algorithms.py --task arithmetic --reward gold     # the task's gold as a reward
                                                                        # function, no reward model
    python benchmarks/algorithms.py --task arithmetic --reward process --algos ppo   # the gold split
                                                 # into process-reward steps (tasks.arithmetic:gold_steps)
    python benchmarks/algorithms.py --algos ppo grpo --seeds 0 --updates 60   # a quick look

1. Once per task: `ppo-rlhf pipeline --task T` at seed 0 (tokenizer, data, SFT, RM and the default
   PPO run, whose figures are the regression check for the default pipeline).
2. Per algorithm preset and seed: `ppo-rlhf rl algo=NAME run.seed=S` from that SFT policy and RM
   (or `--reward gold`: `reward.functions=ppo_rlhf.tasks.<task>:gold` and no RM), the preset's own
   settings otherwise (every preset sees 64 responses per update: 64 prompts x 1 or 16 x 4).
3. From each run's metrics.jsonl: the held-out evaluations (eval/gold_reward and eval/kl on 400
   held-out prompt samples every 25 updates; update 0 is the SFT policy) against samples seen and
   wall time. Final figures are the last evaluation's. Greedy gold (`ppo-rlhf eval temperature=0`
   on the same 400 held-out prompts) of the final policy and of the SFT policy, beside it.
Each run is a separate process, one after another (2 CPU threads each).
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
sys.path.insert(0, str(HERE.parent / "src"))

from bench_common import cpu_model_and_flags  # noqa: E402

from ppo_rlhf.config import algorithm_presets  # noqa: E402


def cpu_info() -> dict:
    """{"model", "flags"} of this CPU (bench_common.cpu_model_and_flags), for the results JSON."""
    model, flags = cpu_model_and_flags()
    return {"model": model, "flags": flags}


def cli(*args, log: Path) -> float:
    t0 = time.time()
    with log.open("a") as fh:
        subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", *map(str, args)], check=True, stdout=fh,
                       stderr=subprocess.STDOUT)
    return time.time() - t0


def base(task: str, work: Path, log: Path) -> Path:
    run = work / f"base-{task}"
    if not (run / "summary.json").is_file():
        print(f"[base] ppo-rlhf pipeline --task {task} --out {run}", flush=True)
        cli("pipeline", "--task", task, "--out", run, "seed=0", log=log)
    return run


def greedy_gold(model: Path, base_run: Path, task: str, out: Path, log: Path) -> float:
    """Gold reward of `model`'s greedy responses to the 400 held-out prompts (cached in `out`)."""
    if not out.is_file():
        cli("eval", f"policy={model}", f"prompts_file={base_run / 'data' / 'prompts_eval.jsonl'}", f"task={task}",
            "temperature=0", "n=400", f"out={out}", log=log)
    return json.loads(out.read_text())["gold_reward"]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_run(task: str, algo: str, seed: int, reward: str, base_run: Path, work: Path, updates: int | None,
            log: Path, extra: list[str], label: str, run: bool = True) -> dict | None:
    out = work / task / f"{reward}{label}-{algo}-s{seed}"
    if not run and not (out / "summary.json").is_file():
        return None
    args = ["rl", "--out", out, f"algo={algo}", f"policy={base_run / 'sft' / 'model'}",
            f"prompts_file={base_run / 'data' / 'prompts_train.jsonl'}",
            f"eval_prompts_file={base_run / 'data' / 'prompts_eval.jsonl'}", f"task={task}",
            f"run.seed={seed}", "run.threads=2", "run.save_every=0"]
    if reward == "rm":
        args.append(f"reward_model={base_run / 'reward' / 'model'}")
    elif reward == "gold":
        args.append(f"reward.functions=ppo_rlhf.tasks.{task}:gold")
    else:  # the same gold total, as per-step process rewards
        args.append(f"reward.functions=ppo_rlhf.tasks.{task}:gold_steps")
    if updates:
        args.append(f"train.updates={updates}")
    args += extra
    wall = None
    if not (out / "summary.json").is_file():
        print(f"[run] {' '.join(map(str, args))}", flush=True)
        wall = cli(*args, log=log)
    summary = json.loads((out / "summary.json").read_text())
    greedy = greedy_gold(out / "model", base_run, task, out / "eval_greedy.json", log)
    sft_greedy = greedy_gold(base_run / "sft" / "model", base_run, task, base_run / "eval_sft_greedy.json", log)
    rows = read_metrics(out / "metrics.jsonl")
    start = min(r["time"] for r in rows) if rows and "time" in rows[0] else None
    samples_per_update = summary["config"]["rollout"]["batch_size"] * summary["config"]["algo"]["samples_per_prompt"]
    evals = [{"update": r["step"], "samples": r["step"] * samples_per_update,
              "seconds": (r["time"] - start) if start is not None else None,
              "gold": r["eval/gold_reward"], "kl": r.get("eval/kl")}
             for r in rows if "eval/gold_reward" in r]
    return {"algo": algo, "seed": seed, "reward": reward, "evals": evals,
            "sft_gold": evals[0]["gold"] if evals else None, "final_gold": summary.get("gold_reward"),
            "final_kl": summary.get("kl"), "seconds": summary.get("seconds", wall),
            "sft_greedy": sft_greedy, "final_greedy": greedy,
            "trpo_kl_max": max((r["trpo/kl"] for r in rows if "trpo/kl" in r), default=None),
            "trpo_step_fraction": statistics.mean([r["trpo/step_fraction"] for r in rows if "trpo/step_fraction" in r])
            if any("trpo/step_fraction" in r for r in rows) else None}


def ms(values, fmt: str = "{:.3f}") -> str:
    """'mean ± std' of the values that are not None (one value: itself; none: n/a), each as `fmt`."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(results: list[dict], algos: list[str]) -> str:
    lines = ["| algorithm | SFT gold T=0.7 | final T=0.7 | gain T=0.7 (points) | SFT greedy | final greedy | "
             "gain greedy (points) | KL (nats) | wall s | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        if not rs:
            continue
        gains = [100 * (r["final_gold"] - r["sft_gold"]) for r in rs if r["final_gold"] is not None]
        greedy_gains = [100 * (r["final_greedy"] - r["sft_greedy"]) for r in rs if r.get("final_greedy") is not None]
        lines.append(f"| {algo} | {ms([r['sft_gold'] for r in rs])} | {ms([r['final_gold'] for r in rs])} | "
                     f"{ms(gains)} | {ms([r.get('sft_greedy') for r in rs])} | "
                     f"{ms([r.get('final_greedy') for r in rs])} | {ms(greedy_gains)} | "
                     f"{ms([r['final_kl'] for r in rs])} | {ms([r['seconds'] for r in rs])} | {len(rs)} |")
    return "\n".join(lines)


PANELS = {"samples": "samples seen", "seconds": "wall time (s)", "kl": "KL(policy || SFT), nats"}


def plot(results: list[dict], names: list[str], path: Path, key: str = "algo",
         panels: tuple[str, ...] = ("samples", "seconds", "kl")) -> None:
    """Mean held-out gold over the seeds of each `names` (runs grouped by `key`) against each of
    `panels` (keys of PANELS), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for name in names:
        rs = [r for r in results if r[key] == name and r["evals"]]
        if not rs:
            continue
        n = min(len(r["evals"]) for r in rs)
        curves = {k: [statistics.mean(r["evals"][i][k] or 0.0 for r in rs) for i in range(n)]
                  for k in ("gold", *panels)}
        for ax, k in zip(axes, panels):
            ax.plot(curves[k], curves["gold"], marker="o", ms=3, label=name)
    for ax, k in zip(axes, panels):
        ax.set_xlabel(PANELS[k])
        ax.set_ylabel("held-out gold reward (T = 0.7)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--algos", nargs="*", default=algorithm_presets())
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--reward", choices=("rm", "gold", "process"), default="rm",
                    help="rm: the reward model; gold: the task's gold as a reward function, no RM; "
                         "process: the task's gold as process-reward steps (gold_steps), no RM")
    ap.add_argument("--updates", type=int, default=None, help="train.updates (default: the stage's, 150)")
    ap.add_argument("--work", default="runs/algorithms")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra RL-stage overrides for every run (e.g. algo.kl_in=reward)")
    ap.add_argument("--no-run", action="store_true", help="only gather the runs that exist (a report)")
    ap.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                    help="no runs: combine the runs of these results files (of this task and reward; e.g. "
                         "seeds made from different SFT/RM checkpoints or machines) into one table and "
                         "results/algorithms_<task>_<reward>_<label>.json; each run keeps its own SFT "
                         "baseline and CPU")
    ap.add_argument("--label", default="", help="suffix of the run directories and result files "
                    "(needed with --set, so runs with other settings are not mixed up)")
    args = ap.parse_args()
    if args.set and not args.label:
        ap.error("--set needs --label")
    if args.merge:
        merge(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    base_run = base(args.task, work, log)
    results = []
    for seed in args.seeds:  # every algorithm once before the next seed: a partial run still compares them
        for algo in args.algos:
            r = one_run(args.task, algo, seed, args.reward, base_run, work, args.updates, log, args.set,
                        f"-{args.label}" if args.label else "", run=not args.no_run)
            if r is None:
                continue
            print(f"[done] {algo} seed {seed}: gold {r['sft_gold']:.3f} -> {r['final_gold']:.3f}, "
                  f"KL {r['final_kl']:.2f}, {r['seconds']:.0f} s", flush=True)
            results.append(r)
    name = f"algorithms_{args.task}_{args.reward}" + (f"_{args.label}" if args.label else "")
    out = {"task": args.task, "reward": args.reward, "overrides": args.set, "cpu": cpu_info(), "seeds": args.seeds,
           "base_summary": json.loads((base_run / "summary.json").read_text()).get("ppo_gold_reward"),
           "results": results, "command": " ".join(sys.argv)}
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"{name}.json").write_text(json.dumps(out, indent=1))
    plot(results, args.algos, res_dir / f"{name}.png")
    print(f"\n{args.task}, reward={args.reward}, CPU {out['cpu']['model']} {' '.join(out['cpu']['flags'])}\n")
    print(table(results, args.algos))


def merge(args) -> None:
    """--merge: one table of the runs in several results files. `FILE:algo,algo` takes only those
    algorithms' runs from FILE; runs of benchmarks/off_policy.py are taken only at the preset's
    shipped settings (its configuration without overrides). A later file's run of the same
    algorithm, seed and SFT gold replaces an earlier one."""
    from off_policy import CONFIGS  # off_policy imports this module

    shipped = {name for name, (_, extra) in CONFIGS.items() if not extra}
    if not args.label:
        raise SystemExit("--merge needs --label (the combined file's name)")
    runs: dict[tuple, dict] = {}
    sources = []
    for spec in args.merge:
        path, _, only = spec.partition(":")
        wanted = set(only.split(",")) if only else set(args.algos)
        data = json.loads(Path(path).read_text())
        sources.append({"file": Path(path).name, "algos": sorted(wanted), "cpu": data["cpu"]["model"],
                        "command": data["command"]})
        for r in data["results"]:
            if data["task"] != args.task or r["reward"] != args.reward or r["algo"] not in wanted:
                continue
            if r.get("config", r["algo"]) not in shipped | {r["algo"]}:
                continue
            runs[(r["algo"], r["seed"], r["sft_gold"])] = {**r, "cpu": data["cpu"]["model"],
                                                           "source": Path(path).name}
    results = sorted(runs.values(), key=lambda r: (args.algos.index(r["algo"]), r["seed"], r["sft_gold"]))
    name = f"algorithms_{args.task}_{args.reward}_{args.label}"
    out = {"task": args.task, "reward": args.reward, "merged_from": sources, "results": results,
           "command": " ".join(sys.argv)}
    (HERE / "results" / f"{name}.json").write_text(json.dumps(out, indent=1))
    plot(results, args.algos, HERE / "results" / f"{name}.png")
    print(table(results, args.algos))


if __name__ == "__main__":
    main()
