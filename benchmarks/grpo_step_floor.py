"""Our GRPO optimizer step against the floor of its work: a plain HF step on the same rows.

    python benchmarks/grpo_step_floor.py --base RUN        # RUN: a default arithmetic pipeline's directory

`grpo_vs_trl.py` measures whole runs; this asks how much of our train phase is the work itself.
It builds the RL trainer at grpo_vs_trl.py's matched settings (16 prompts x 4 samples, 2 iterations
x 2 minibatches of 32 rows, clip 0.2, k3 KL in the loss at beta 0.04, the gold as the reward), runs
a few updates, keeps one update's experience, and then times, alternating step by step on the same
32 rows:
- ours: `RLTrainer.optimizer_step` (the per-token weights, the policy objective with its importance
  weights and statistics, backward, the guarded clip and AdamW step);
- plain: what any trainer must do for that step -- an HF forward with `logits_to_keep`, log-softmax
  at the temperature, the clipped surrogate plus beta * k3, backward, `clip_grad_norm_`, a fused
  AdamW step (what TRL's `GRPOTrainer` computes).
The ratio bounds what a faster step could buy: a GRPO update is 4 such steps plus sampling and the
reference forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="a pipeline run directory (sft/model, data/)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side (after 5 warm-up pairs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import bench_common as bc
    import torch
    from grpo_vs_trl import SETTINGS, ours_overrides

    from ppo_rlhf.config import PPOConfig, build_config
    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages import common
    from ppo_rlhf.stages.loop import StepContext
    from ppo_rlhf.stages.rl import RLTrainer

    s = SETTINGS
    cfg = build_config(PPOConfig, overrides=[
        f"out_dir={tempfile.mkdtemp(prefix='grpo-floor-')}", "run.tensorboard=false",
        *ours_overrides("arithmetic", args.base, "bf16" if args.dtype == "bfloat16" else "fp32", 0, 100, args.threads)])
    trainer = RLTrainer(cfg, common.setup(cfg.run, work=RLTrainer.work))
    guard = NonFiniteGuard(5)
    for i in range(3):
        trainer.step(StepContext(i + 1, guard, None))
    kept = {}
    update = trainer.gradient_update

    def keep(exp, ctx, *rest, **kw):
        kept.update(exp=exp, ctx=ctx)
        return update(exp, ctx, *rest, **kw)

    trainer.gradient_update = keep
    trainer.step(StepContext(4, guard, None))
    exp, ctx = kept["exp"], kept["ctx"]
    rows = s["prompts_per_update"] * s["samples_per_prompt"] // s["num_minibatches"]  # one minibatch
    mb = torch.arange(rows)
    policy, P, temp, eps, beta = trainer.policy, exp.prompt_len, s["temperature"], s["clip_eps"], s["beta"]
    seq, mask = exp.sequences[mb], exp.attention_mask[mb]
    old, ref, adv = exp.logprobs[mb], exp.ref_logprobs[mb], exp.advantages[mb]
    weights = exp.loss_mask[mb].float()
    R = seq.size(1) - P
    plain_opt = torch.optim.AdamW(policy.parameters(), lr=s["lr"], betas=(0.9, s["adam_beta2"]), fused=True)

    def plain() -> None:
        with common.autocast(trainer.device, args.dtype):
            logits = policy(input_ids=seq, attention_mask=mask, logits_to_keep=R + 1, use_cache=False).logits
        logp = torch.gather((logits[:, :-1].float() / temp).log_softmax(-1), 2, seq[:, P:, None]).squeeze(-1)
        ratio = torch.exp(logp - old)
        surrogate = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        ((surrogate + beta * kl) * weights).sum().div(weights.sum()).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def ours() -> None:
        trainer.optimizer_step(exp, mb, ctx, True, False)

    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for r in range(args.steps + 5):
        for name, fn in (("ours", ours), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            if r >= 5:
                times[name].append((time.perf_counter() - t0) * 1000)
    cpu, flags = bc.cpu_model_and_flags()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"GRPO optimizer step, {rows} rows x {seq.size(1)} tokens, {args.dtype}, {args.threads} threads; "
          f"CPU {cpu} ({' '.join(flags)})")
    print(f"  ours  {med['ours']:.2f} ms/step   plain {med['plain']:.2f} ms/step   "
          f"ours/plain {med['ours'] / med['plain']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
