"""One setting of our RL update, A against B, alternating update by update in one process.

    python benchmarks/interleaved_ab.py --what dtype  --layers 4 --d 256 --batch 32   # fp32 vs bf16
    python benchmarks/interleaved_ab.py --what onednn --layers 2 --d 64 --batch 32    # MKL vs oneDNN

Why: on a shared 2-core VM the machine's speed drifts by 30% and more over minutes (a float32
2048^3 matmul measured 174-306 GFLOP/s within one hour on the same Xeon), so two runs one after
the other compare the machine with itself as much as A with B. Here one trainer (the ppo_vs_trl
configuration, benchmarks/README.md) runs 2 warm-up updates, then `--updates` pairs of updates,
A and B alternating, and the ratio is of the medians: drift hits both sides alike.

- `--what dtype`: `trainer.dtype` float32 against bfloat16 (autocast; fp32 master weights and
  AdamW state either way, so the two share one model and optimizer).
- `--what onednn`: float32 linears through MKL (torch's default) against oneDNN
  (`onednn.set_enabled`), whatever `onednn.pays_here` says of this CPU.
- `--what gelu`: GPT-2's tanh-approximate GELU (one fused kernel, what `gelu_new` models run)
  against the exact GELU (what our presets build), swapped in every model of the trainer, at
  `--dtype`. `--gelu exact` runs the other comparisons with the exact GELU.

Prints each side's per-update wall times (and generate/score/train medians) and the ratio, with the
CPU model and flags; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SIDES = {"dtype": (("float32", "float32"), ("bfloat16", "bfloat16")),
         "onednn": (("MKL", False), ("oneDNN", True)),
         "gelu": (("tanh", "tanh"), ("exact", "exact"))}


def set_gelu(trainer, kind: str) -> int:
    """Swap the activation of every GPT-2 MLP in the trainer's models ("tanh" or "exact"); returns
    how many were swapped. The weights stay: only the function changes (by at most ~5e-4)."""
    import torch.nn as nn
    from transformers.activations import GELUActivation, GELUTanh

    roots = [getattr(obj, "model", obj) for obj in vars(trainer).values()]
    n = 0
    for root in [r for r in roots if isinstance(r, nn.Module)]:
        for module in root.modules():
            if type(module).__name__ == "GPT2MLP":
                module.act = GELUTanh() if kind == "tanh" else GELUActivation()
                n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=tuple(SIDES), default="dtype")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--updates", type=int, default=6, help="timed updates per side")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="precision of both sides of --what gelu / onednn")
    ap.add_argument("--gelu", choices=("tanh", "exact"), default="tanh",
                    help="the activation of both sides of --what dtype / onednn")
    ap.add_argument("--work-dir", default="/tmp/ppo_vs_trl_work")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import bench_common as bc
    import ours_worker
    import torch

    from ppo_rlhf import onednn
    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages import common
    from ppo_rlhf.stages.loop import StepContext
    from ppo_rlhf.stages.rl import RLTrainer

    torch.set_num_threads(args.threads)
    case = bc.Case(bc.ModelShape(args.layers, args.d), args.batch, args.prompt, args.response)
    paths = bc.prepare(case, Path(args.work_dir))
    total = 2 * args.updates + 2
    cfg = ours_worker.make_config(case, paths, total, args.threads, out_dir=tempfile.mkdtemp(prefix="ab-"))
    trainer = RLTrainer(cfg, common.setup(cfg.run))
    steps = itertools.count(1)
    sides = SIDES[args.what]
    if args.what != "dtype":
        trainer.dtype = args.dtype
    if args.what != "gelu" and set_gelu(trainer, args.gelu) == 0:
        raise SystemExit("no GPT-2 MLP found in the trainer's models")
    record = {name: {"update_s": [], "generate": [], "score": [], "train": []} for name, _ in sides}
    for i in range(total):
        name, value = sides[i % 2]
        if args.what == "dtype":
            trainer.dtype = value
        elif args.what == "gelu":
            set_gelu(trainer, value)
        else:
            onednn.set_enabled(value)
        trainer.timer.reset()
        t0 = time.perf_counter()
        trainer.step(StepContext(next(steps), NonFiniteGuard(5), None))
        wall = time.perf_counter() - t0
        if i >= 2:  # the first update of each side warms it up
            record[name]["update_s"].append(wall)
            for phase, seconds in trainer.timer.totals().items():
                record[name][phase.split("/", 1)[-1]].append(seconds)
    model, flags = bc.cpu_model_and_flags()
    fixed = {"dtype": f"gelu {args.gelu}", "onednn": f"{args.dtype}, gelu {args.gelu}", "gelu": args.dtype}[args.what]
    print(f"{case.shape_label}, {args.what} ({fixed}): {args.updates} updates per side, alternating; "
          f"{args.threads} threads; CPU {model} ({' '.join(flags)})")
    medians = {}
    for name, rec in record.items():
        medians[name] = statistics.median(rec["update_s"])
        phases = "/".join(f"{statistics.median(rec[k]):.2f}" for k in ("generate", "score", "train") if rec[k])
        print(f"  {name:<9} median {medians[name]:.3f} s/update (gen/score/train {phases}); "
              f"each: {' '.join(f'{x:.3f}' for x in rec['update_s'])}")
    (a, _), (b, _) = sides
    ratio = medians[a] / medians[b]
    print(f"  {a} time / {b} time = {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"case": case.shape_label, "what": args.what, "fixed": fixed, "cpu": model,
                                              "flags": flags, "threads": args.threads, "sides": record,
                                              "ratio": ratio, "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
