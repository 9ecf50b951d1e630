"""What would make our PPO update faster: measured ablations, without editing the library.

    python benchmarks/ablate_ppo.py                         # 2 layers d=64, B=32, 16+64
    python benchmarks/ablate_ppo.py --layers 4 --d 256      # the compute-bound configuration

Each variant runs in its own process (same fixtures and PPOConfig as ppo_vs_trl.py's ours side)
and undoes one of the library's speed choices at run time, to show what each one buys:

- baseline: the library as it is;
- no_onednn: float32 CPU linear layers on torch's default matmul (MKL) instead of oneDNN
  (`run.onednn=false`, see src/ppo_rlhf/onednn.py);
- gelu_unfused: GPT-2's `gelu_new` as NewGELUActivation's elementwise ops instead of the fused
  tanh GELU kernel (`models.fuse_gelu`);
- adamw_foreach: torch's default AdamW implementation instead of `fused=True`;
- threads1: one torch thread instead of two (the library already decodes tiny models on one);
- torch_default: no_onednn + gelu_unfused + adamw_foreach.

(The old log-probs come from the sampler since the sampler_logprobs ablation of
benchmarks/README.md measured it; that one is not undone here.)

Prints median s/update and the phase split per variant, and writes
benchmarks/results/ablate_<config>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

VARIANTS = ["baseline", "no_onednn", "gelu_unfused", "adamw_foreach", "threads1", "torch_default"]
UNDO_ALL = {"no_onednn", "gelu_unfused", "adamw_foreach"}


def apply_patches(names: set[str]) -> None:
    """Monkeypatch the library in this process (run before the trainer is built)."""
    import torch

    from ppo_rlhf import models, onednn
    from ppo_rlhf.stages import common

    if "no_onednn" in names:
        onednn.set_enabled(False)
        common.onednn.set_enabled = lambda flag: None  # setup() must not turn it back on
    if "gelu_unfused" in names:
        models.fuse_gelu = lambda model: 0
    if "adamw_foreach" in names:
        def make_optimizer(params, cfg, lr=None):
            params = [p for p in params if p.requires_grad]
            return torch.optim.AdamW(params, lr=lr if lr is not None else cfg.lr,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        common.make_optimizer = make_optimizer


def child(case_json: str, paths_json: str, updates: int, threads: int, variant: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import ours_worker

    names = UNDO_ALL if variant == "torch_default" else {variant}
    apply_patches(names)
    return ours_worker.main(case_json, paths_json, updates, threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work-dir", default="/tmp/ppo_vs_trl_work")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c, p, u, t, v = args.child
        print("RESULT_JSON: " + json.dumps(child(c, p, int(u), int(t), v)), flush=True)
        return 0
    case = bc.Case(bc.ModelShape(args.layers, args.d), args.batch, args.prompt, args.response)
    paths = bc.prepare(case, Path(args.work_dir))
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for variant in args.variants.split(","):
            threads = 1 if variant == "threads1" else args.threads
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
            cmd = [sys.executable, __file__, "--child", json.dumps(case.to_json()), json.dumps(paths),
                   str(args.updates), str(threads), variant]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT_JSON: ")]
            if not line:
                print(f"{variant}: failed\n{proc.stderr[-2000:]}")
                continue
            res = json.loads(line[0][len("RESULT_JSON: "):])
            res["median_s"] = statistics.median(res["update_s"])
            res["phases_median_s"] = {k: statistics.median(v) for k, v in res["phases_s"].items()}
            res["load"] = os.getloadavg()[0]
            results.setdefault(variant, []).append(res)
            print(f"round {rnd + 1} {variant:<17} {res['median_s']:.3f} s/update", flush=True)
    base = min(r["median_s"] for r in results["baseline"])
    print(f"\n{case.label}: best of {args.rounds} rounds, median of {args.updates} updates each")
    print(f"{'variant':<17} | s/update | speed-up | generate | score | train | peak RSS MB")
    summary = {}
    for variant, runs in results.items():
        best = min(runs, key=lambda r: r["median_s"])
        ph = best["phases_median_s"]
        print(f"{variant:<17} | {best['median_s']:8.3f} | {base / best['median_s']:7.2f}x | {ph['generate']:8.3f} | "
              f"{ph['score']:5.3f} | {ph['train']:5.3f} | {best['peak_rss_mb']:11,.0f}")
        summary[variant] = {"median_s": best["median_s"], "speedup": base / best["median_s"], "phases_median_s": ph,
                            "peak_rss_mb": best["peak_rss_mb"], "round_medians_s": [r["median_s"] for r in runs]}
    label = case.label.replace(" ", "_").replace("=", "").replace("+", "-")
    out = HERE / "results" / f"ablate_{label}.json"
    out.write_text(json.dumps({"case": case.to_json(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "threads": args.threads, "variants": summary}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
