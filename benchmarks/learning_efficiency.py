"""Learning efficiency: our PPO vs TRL 1.12.0's PPOTrainer from the same SFT and reward checkpoints.

    python benchmarks/learning_efficiency.py                        # 1 seed, 150 updates, ~3.5 min
    python benchmarks/learning_efficiency.py --seeds 0 1 2          # mean +- std over 3 PPO seeds, ~10 min
    python benchmarks/learning_efficiency.py --updates 20 --eval-every 5 --out /tmp/le.json   # smoke test

1. Checkpoints: `ppo-rlhf pipeline --task arithmetic --out WORK/base` (~2 min; skipped when WORK/base
   already has the SFT model, the reward model and the prompts files). Its own PPO stage is not used.
2. The reward model is exported for TRL (WORK/rm_export): TRL scores a sequence with the raw head
   output at the last non-pad token, our PPO with reward_gain * raw + reward_bias from config.json.
   The export folds both into the weights (`export_reward_model`); the TRL worker asserts that its
   `get_reward` on the export equals our `sequence_rewards` on the original to 1e-5.
3. Per seed, our PPO (`ppo-rlhf ppo`, one process) then TRL's PPOTrainer (benchmarks/
   trl_learning_worker.py in the TRL virtualenv), one at a time, one torch thread each, with the
   settings of `shared_settings()` (our PPO defaults) on both sides.
4. Both evaluate the policy at update 0, every --eval-every updates and after the last one with
   `ppo_rlhf.stages.evaluate.evaluate_policy` (400 held-out prompts, T=0.7, seed = PPO seed + 99,
   the task's gold reward, the normalised RM score, KL to the SFT reference).
5. Writes --out (JSON) and the PNG next to it, prints the tables.

LEARNING.md describes the settings, the differences that remain and the measured results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = "arithmetic"
SIDES = ("ours", "trl")
LABELS = {"ours": "ours", "trl": "TRL 1.12.0"}


# -- settings -----------------------------------------------------------------------------------
def shared_settings() -> dict:
    """The settings both sides get: our PPO defaults (config.py) for the arithmetic task."""
    from ppo_rlhf.config import PPOConfig
    from ppo_rlhf.tasks import get_task

    c = PPOConfig()
    return {"batch_size": c.rollout.batch_size, "ppo_epochs": c.train.ppo_epochs,
            "num_minibatches": c.train.num_minibatches, "lr": c.optim.lr, "adam_beta1": c.optim.adam_beta1,
            "adam_beta2": c.optim.adam_beta2, "adam_eps": c.optim.adam_eps, "weight_decay": c.optim.weight_decay,
            "temperature": c.rollout.temperature, "max_new_tokens": get_task(TASK).default_max_new_tokens,
            "kl_coef": c.reward.kl_coef, "clip_eps": c.loss.clip_eps, "value_clip_eps": c.loss.value_clip_eps,
            "vf_coef": c.loss.vf_coef, "gamma": c.loss.gamma, "lam": c.loss.lam,
            "max_prompt_len": c.max_prompt_len, "eval_samples": c.eval_samples}


def one_thread_env() -> dict:
    """Environment of every child process: one OpenMP thread that sleeps when idle."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd` (output to `log`), raise with the log's tail if it fails; returns wall seconds."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=one_thread_env(), stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.perf_counter() - t0


# -- 1. checkpoints -----------------------------------------------------------------------------
def base_paths(work: Path) -> dict:
    base = work / "base"
    return {"sft": base / "sft" / "model", "rm": base / "reward" / "model",
            "prompts_file": base / "data" / "prompts_train.jsonl",
            "eval_prompts_file": base / "data" / "prompts_eval.jsonl"}


def ensure_checkpoints(work: Path) -> dict:
    """SFT and reward checkpoints of the arithmetic task (our pipeline), reused when present."""
    paths = base_paths(work)
    if all(p.exists() for p in paths.values()):
        print(f"[checkpoints] reusing {work / 'base'}")
        return paths
    work.mkdir(parents=True, exist_ok=True)
    print(f"[checkpoints] ppo-rlhf pipeline --task {TASK} --out {work / 'base'} (~2-3 min)")
    stage_opts = [f"{s}.run.{k}" for s in ("sft", "reward", "ppo") for k in ("threads=1", "tensorboard=false")]
    wall = run_logged(["ppo-rlhf", "pipeline", "--task", TASK, "--out", str(work / "base"), *stage_opts],
                      work / "base.log")
    print(f"[checkpoints] done in {wall:.0f} s")
    return paths


# -- 2. reward-model export ---------------------------------------------------------------------
def export_reward_model(rm_dir: Path, out_dir: Path) -> Path:
    """Save the RM with its normalisation in the weights, for scorers that read the raw head.

    score(h) = gain * w.h + bias. The gain scales the head: w' = gain * w. GPT-2's classification
    head has no bias, but its input is ln_f's output, which only the head reads, so shifting
    ln_f's bias by delta = bias * w' / |w'|^2 adds w'.delta = bias to every score. config.json then
    says gain 1, bias 0, so our loader reads the export as the same normalised RM.
    """
    import torch

    from ppo_rlhf.models import load_scalar_model, save_model
    from ppo_rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(str(rm_dir))
    model = load_scalar_model(str(rm_dir), tok)
    if model.config.model_type != "gpt2":
        raise SystemExit(f"export_reward_model folds the bias into GPT-2's ln_f; got {model.config.model_type}")
    gain, bias = float(model.config.reward_gain), float(model.config.reward_bias)
    with torch.no_grad():
        w = model.score.weight.double() * gain  # (1, d)
        model.score.weight.copy_(w)
        model.transformer.ln_f.bias.add_((bias * w[0] / w.square().sum()).float())
    model.config.reward_gain, model.config.reward_bias = 1.0, 0.0
    save_model(model, tok, out_dir)
    return out_dir


# -- 3./4. the two sides --------------------------------------------------------------------------
def run_ours(paths: dict, settings: dict, seed: int, updates: int, eval_every: int, out: Path) -> dict:
    """`ppo-rlhf ppo` with the shared settings; evaluations and timings from its metrics.jsonl."""
    s = settings
    shutil.rmtree(out, ignore_errors=True)
    overrides = {
        "policy": paths["sft"], "reward_model": paths["rm"], "prompts_file": paths["prompts_file"],
        "eval_prompts_file": paths["eval_prompts_file"], "task": TASK, "max_prompt_len": s["max_prompt_len"],
        "eval_samples": s["eval_samples"],
        "rollout.batch_size": s["batch_size"], "rollout.temperature": s["temperature"],
        "rollout.max_new_tokens": s["max_new_tokens"], "rollout.truncated": "keep",
        "reward.kl_coef": s["kl_coef"], "reward.kl_estimator": "k1", "reward.kl_control": "fixed",
        "loss.clip_eps": s["clip_eps"], "loss.value_clip_eps": s["value_clip_eps"], "loss.vf_coef": s["vf_coef"],
        "loss.gamma": s["gamma"], "loss.lam": s["lam"],
        "train.updates": updates, "train.ppo_epochs": s["ppo_epochs"], "train.num_minibatches": s["num_minibatches"],
        "optim.lr": s["lr"], "optim.adam_beta1": s["adam_beta1"], "optim.adam_beta2": s["adam_beta2"],
        "optim.adam_eps": s["adam_eps"], "optim.weight_decay": s["weight_decay"], "optim.schedule": "constant",
        "optim.warmup_steps": 0,
        "run.seed": seed, "run.threads": 1, "run.eval_every": eval_every, "run.save_every": 0,
        "run.tensorboard": "false", "run.device": "cpu",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ppo-rlhf", "ppo", "--out", str(out), *(f"{k}={v}" for k, v in overrides.items())]
    wall = run_logged(cmd, out.parent / "ours.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [{"step": r["step"], "samples": r["step"] * s["batch_size"], "gold_reward": r["eval/gold_reward"],
              "kl": r["eval/kl"], "rm_score": r["eval/rm_score"], "response_length": r["eval/response_length"]}
             for r in rows if "eval/gold_reward" in r]
    train = [{"step": r["step"], "kl": r["objective/kl"], "rm_score": r["objective/rm_score"],
              "truncated_frac": r["rollout/truncated_frac"]} for r in rows if "objective/kl" in r]
    return {"side": "ours", "seed": seed, "evals": evals, "train": train, "wall_s": wall,
            "update_s": [r["perf/seconds_per_update"] for r in rows if "perf/seconds_per_update" in r],
            "command": " ".join(cmd)}


def run_trl(trl_python: str, paths: dict, export: Path, settings: dict, seed: int, updates: int,
            eval_every: int, out_dir: Path) -> dict:
    """benchmarks/trl_learning_worker.py in the TRL virtualenv with the same inputs and settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {**{k: str(v) for k, v in paths.items()}, "rm_export": str(export), "task": TASK, "seed": seed,
            "eval_seed": seed + 99, "updates": updates, "eval_every": eval_every, "threads": 1,
            "max_prompt_len": settings["max_prompt_len"], "eval_samples": settings["eval_samples"],
            "settings": settings}
    spec_path, result_path = out_dir / "trl_spec.json", out_dir / "trl_result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    cmd = [trl_python, str(HERE / "trl_learning_worker.py"), str(spec_path), str(result_path)]
    wall = run_logged(cmd, out_dir / "trl.log")
    return {**json.loads(result_path.read_text()), "wall_s": wall, "command": " ".join(cmd)}


# -- 5. analysis ----------------------------------------------------------------------------------
def first_crossing(evals: list[dict], key: str, level: float, read: str) -> float | None:
    """`read` where the eval trajectory first reaches `key` >= level (linear between the two eval
    points around the crossing); None if it never does."""
    for prev, cur in itertools.pairwise(evals):
        if prev[key] < level <= cur[key]:
            f = (level - prev[key]) / (cur[key] - prev[key])
            return prev[read] + f * (cur[read] - prev[read])
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(values) > 1 else "")


def summarise(runs: dict, kl_levels: list[float], gold_levels: list[float]) -> dict:
    """Per eval step, per KL level, per gold level and over the second half of training: the
    values of every seed, for each side."""
    seeds = list(runs.values())
    by_step = []
    for i, e in enumerate(seeds[0]["ours"]["evals"]):
        row = {"step": e["step"], "samples": e["samples"]}
        for side in SIDES:
            for key in ("gold_reward", "kl", "rm_score"):
                row[f"{side}/{key}"] = [r[side]["evals"][i][key] for r in seeds]
        by_step.append(row)

    def crossings(key: str, levels: list[float], read: str, name: str) -> list[dict]:
        rows = []
        for level in levels:
            row = {name: level}
            for side in SIDES:
                found = [first_crossing(r[side]["evals"], key, level, read) for r in seeds]
                row[f"{side}/{read}"] = [v for v in found if v is not None]
                row[f"{side}/seeds_reaching"] = sum(v is not None for v in found)
            rows.append(row)
        return rows

    half = seeds[0]["ours"]["evals"][-1]["step"] / 2
    second_half = {f"{side}/{key}": [statistics.fmean(e[key] for e in r[side]["evals"] if e["step"] >= half)
                                     for r in seeds]
                   for side in SIDES for key in ("gold_reward", "kl", "rm_score")}
    timing = {side: {"wall_s": [r[side]["wall_s"] for r in seeds],
                     "median_update_s": [statistics.median(r[side]["update_s"]) for r in seeds]}
              for side in SIDES}
    return {"by_step": by_step, "at_kl": crossings("kl", kl_levels, "gold_reward", "kl"),
            "samples_to_gold": crossings("gold_reward", gold_levels, "samples", "gold_reward"),
            "second_half": {"from_step": half, **second_half}, "timing": timing}


def print_tables(summary: dict, n_seeds: int) -> None:
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
    last = summary["by_step"][-1]["step"]
    print(f"\nGold reward (accuracy), KL(policy || SFT) and RM score on 400 held-out prompts, T=0.7 ({seeds}); "
          "updates <= 10 and every 10th (the JSON has every evaluation)")
    head = (f"{'update':>6} | {'samples':>7} | {'gold ours':>15} | {'gold TRL':>15} | {'KL ours':>15} | "
            f"{'KL TRL':>15} | {'RM ours':>15} | {'RM TRL':>15}")
    print(head + "\n" + "-" * len(head))
    for r in summary["by_step"]:
        if r["step"] <= 10 or r["step"] % 10 == 0 or r["step"] == last:
            print(f"{r['step']:>6} | {r['samples']:>7} | {fmt(r['ours/gold_reward']):>15} | "
                  f"{fmt(r['trl/gold_reward']):>15} | {fmt(r['ours/kl']):>15} | {fmt(r['trl/kl']):>15} | "
                  f"{fmt(r['ours/rm_score']):>15} | {fmt(r['trl/rm_score']):>15}")
    h = summary["second_half"]
    print(f"{'mean upd >= ' + format(h['from_step'], 'g'):>16} | {fmt(h['ours/gold_reward']):>15} | "
          f"{fmt(h['trl/gold_reward']):>15} | {fmt(h['ours/kl']):>15} | {fmt(h['trl/kl']):>15} | "
          f"{fmt(h['ours/rm_score']):>15} | {fmt(h['trl/rm_score']):>15}")

    print_crossings("Gold reward at matched KL (where each seed's eval trajectory first reaches that KL, "
                    "interpolated)", "KL (nats)", "gold", summary["at_kl"], "kl", "gold_reward", 3)
    print_crossings("Samples seen until gold reward first reaches a level (interpolated)", "gold", "samples",
                    summary["samples_to_gold"], "gold_reward", "samples", 0)

    print("\nWall time per run (s, incl. start-up and evaluations) and median s/update (training only)")
    for side in SIDES:
        t = summary["timing"][side]
        print(f"  {LABELS[side]:>10}: wall {fmt(t['wall_s'], 1)} s, {fmt(t['median_update_s'], 3)} s/update")


def print_crossings(title: str, level_label: str, value_label: str, rows: list[dict], level_key: str,
                    value_key: str, digits: int) -> None:
    """One `crossings()` table: per level, each side's value (mean ± std) and how many seeds reached it."""
    print(f"\n{title}")
    head = (f"{level_label:>9} | {value_label + ' ours':>15} | {'seeds':>5} | {value_label + ' TRL':>15} | "
            f"{'seeds':>5}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r[level_key]:>9.2f} | {fmt(r[f'ours/{value_key}'], digits):>15} | {r['ours/seeds_reaching']:>5} | "
              f"{fmt(r[f'trl/{value_key}'], digits):>15} | {r['trl/seeds_reaching']:>5}")


def plot(runs: dict, summary: dict, path: Path) -> None:
    """Gold vs samples seen (mean, +-std band over seeds; symlog x: the rise is in the first
    rollouts) and gold vs KL (every evaluation of every seed, with the matched-KL means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ours": "tab:blue", "trl": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    samples = [r["samples"] for r in summary["by_step"]]
    for side in SIDES:
        stats = [mean_std(r[f"{side}/gold_reward"]) for r in summary["by_step"]]
        ax1.plot(samples, [m for m, _ in stats], "o-", color=colours[side], ms=2.5, label=LABELS[side])
        if len(runs) > 1:
            ax1.fill_between(samples, [m - s for m, s in stats], [m + s for m, s in stats],
                             color=colours[side], alpha=0.2)
        points = [e for r in runs.values() for e in r[side]["evals"]]
        ax2.scatter([e["kl"] for e in points], [e["gold_reward"] for e in points], s=8, alpha=0.35,
                    color=colours[side], label=f"{LABELS[side]}: every evaluation")
        matched = [(r["kl"], *mean_std(r[f"{side}/gold_reward"])) for r in summary["at_kl"] if r[f"{side}/gold_reward"]]
        ax2.errorbar([k for k, _, _ in matched], [m for _, m, _ in matched], yerr=[s for _, _, s in matched],
                     fmt="s-", color=colours[side], ms=5, capsize=3, label=f"{LABELS[side]}: gold at first KL crossing")
    ax1.set_xscale("symlog", linthresh=640)
    ax1.set_xticks([0, 128, 256, 384, 512, 640, 1280, 3200, 6400, samples[-1]])
    ax1.set_xticklabels([0, 128, 256, 384, 512, 640, 1280, 3200, 6400, samples[-1]], fontsize=7)
    ax1.set(xlabel="samples seen (rollouts x 64 prompts; linear to 640, log beyond)",
            ylabel="gold reward (accuracy)", title="Gold reward vs samples seen (mean ± std over seeds)")
    ax2.set(xlabel="KL(policy || SFT), nats per response", ylabel="gold reward (accuracy)",
            title="Gold reward vs KL")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PPO on the arithmetic task from the same SFT and RM checkpoints, ours vs TRL "
                 f"({len(runs)} seed(s), 400 held-out prompts per evaluation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def src_state() -> dict:
    """Commit and a hash of src/ (it can change under a long run when others edit the tree)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(path.read_bytes())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    return {"commit": commit, "src_sha256": digest.hexdigest()[:16]}


# -- per seed ---------------------------------------------------------------------------------------
def run_seed(args, paths: dict, export: Path, settings: dict, seed: int, run_dir: Path) -> dict:
    """Our PPO, then TRL's, from the same checkpoints with the same PPO seed."""
    print(f"[seed {seed}] ours: ppo-rlhf ppo, {args.updates} updates ...", flush=True)
    ours = run_ours(paths, settings, seed, args.updates, args.eval_every, run_dir / "ours")
    print(f"[seed {seed}] ours done in {ours['wall_s']:.0f} s; TRL PPOTrainer ...", flush=True)
    trl = run_trl(args.trl_python, paths, export, settings, seed, args.updates, args.eval_every, run_dir)
    print(f"[seed {seed}] TRL done in {trl['wall_s']:.0f} s (export check: max |diff| "
          f"{trl['export_max_abs_diff']:.2g})", flush=True)
    return {"ours": ours, "trl": trl}


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(REPO / "runs" / "learning_efficiency"),
                   help="checkpoints (WORK/base, reused), the RM export and the runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="PPO seeds (same checkpoints)")
    p.add_argument("--updates", type=int, default=150, help="PPO updates (rollouts of 64 prompts) per run")
    p.add_argument("--eval-every", type=int, default=2, help="evaluate every N updates (and at 0 and the end)")
    p.add_argument("--kl-levels", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="KL values (nats) at which to compare gold reward")
    p.add_argument("--gold-levels", type=float, nargs="+", default=[0.75, 0.8],
                   help="gold rewards for the samples-to-reach table")
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="interpreter with trl 1.12.0")
    p.add_argument("--out", default=str(HERE / "results" / "learning_efficiency.json"),
                   help="results JSON; the PNG is written next to it")
    args = p.parse_args()
    if not Path(args.trl_python).is_file():
        raise SystemExit(f"no TRL interpreter at {args.trl_python} (see benchmarks/README.md to install it)")

    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    src_at_start = src_state()
    work = Path(args.work_dir).resolve()
    paths = ensure_checkpoints(work)
    export = export_reward_model(paths["rm"], work / "rm_export")
    settings = shared_settings()
    runs = {str(seed): run_seed(args, paths, export, settings, seed, work / f"seed{seed}") for seed in args.seeds}
    summary = summarise(runs, args.kl_levels, args.gold_levels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = {"start": src_at_start, "end": src_state()}
    if src["start"]["src_sha256"] != src["end"]["src_sha256"]:
        print("WARNING: src/ changed during the run; the seeds may have run different code")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": 1}
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "src": src,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
              "total_wall_s": time.time() - t_start, "machine": machine, "task": TASK, "settings": settings,
              "paths": {**{k: str(v) for k, v in paths.items()}, "rm_export": str(export)},
              "updates": args.updates, "eval_every": args.eval_every, "seeds": args.seeds,
              "summary": summary, "runs": runs}
    out.write_text(json.dumps(result, indent=1))
    plot(runs, summary, out.with_suffix(".png"))
    print_tables(summary, len(args.seeds))
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({time.time() - t_start:.0f} s in all)")

if __name__ == "__main__":
    main()
