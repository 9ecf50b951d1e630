"""SFT and reward-model steps under several settings, alternating in one process.

    python benchmarks/train_steps_ab.py                       # tiny-gpt2: float32 vs bfloat16, SFT and RM
    python benchmarks/train_steps_ab.py --settings tiny-gpt2@float32@32@1 tiny-gpt2@float32@32@8 \\
        --stages sft                                          # length bucketing (sft.bucket_batches)
    python benchmarks/train_steps_ab.py --stages dpo          # offline DPO steps (policy + reference)

Each setting is MODEL@DTYPE@BATCH@BUCKET: a preset or size spec, float32 or bfloat16, sequences
(SFT) or pairs (RM, DPO) per step, and `bucket_batches`. Every setting gets its own stage object
(stages/sft.py's SFTStage, stages/reward.py's RewardStage, stages/dpo.py's DPOStage, whose policy is
the preset saved once to the work directory) over the default pipeline's data of
`--task`, and the stages take turns, `--steps` optimizer steps at a time, for `--rounds` rounds
(the first two are warm-up). Why alternate: on a shared 2-core VM the machine's speed drifts by
30% over minutes, and drift hits every setting alike this way (benchmarks/README.md).

Prints the median ms per step of each setting and its ratio to the first, with the CPU model and
flags and the cores that other processes and the hypervisor (steal) took meanwhile
(`bench_common.OtherLoad`); `--out` writes them as JSON. This is where
`precision.BF16_MIN_HIDDEN`'s "train" figures come from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_SETTINGS = ("tiny-gpt2@float32@32@1", "tiny-gpt2@bfloat16@32@1")


def parse_setting(text: str) -> tuple[str, str, int, int]:
    try:
        model, dtype, batch, bucket = text.split("@")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError
        return model, dtype, int(batch), int(bucket)
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not MODEL@float32|bfloat16@BATCH@BUCKET, "
                         "e.g. tiny-gpt2@bfloat16@32@1") from None


def prepare_data(task: str, work: Path) -> Path:
    """The default pipeline's tokenizer and data for `task` under `work` (made once)."""
    from ppo_rlhf import api

    if not (work / "data" / "sft_train.jsonl").exists():
        api.tokenizer(task=task, out_dir=str(work / "tokenizer"))
        api.data(task=task, out_dir=str(work / "data"))
    return work


def build_stages(stage: str, settings, work: Path) -> list:
    import torch

    from ppo_rlhf.config import DPOConfig, RewardConfig, SFTConfig, build_config
    from ppo_rlhf.data.collate import padded_pairs, padded_sft
    from ppo_rlhf.data.encode import encode_pairs, encode_sft
    from ppo_rlhf.data.jsonl import read_preferences, read_sft
    from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model
    from ppo_rlhf.stages.dpo import DPOStage
    from ppo_rlhf.stages.reward import RewardStage
    from ppo_rlhf.stages.sft import SFTStage
    from ppo_rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(str(work / "tokenizer"))
    cpu = torch.device("cpu")
    if stage == "sft":
        rows = padded_sft(encode_sft(tok, read_sft(work / "data" / "sft_train.jsonl")[0], 64, 128)[0],
                          tok.pad_token_id)
    elif stage == "reward":
        rows = padded_pairs(encode_pairs(tok, read_preferences(work / "data" / "prefs_train.jsonl")[0], 64, 128)[0],
                            tok.pad_token_id)
    stages = []
    for i, (model, dtype, batch, bucket) in enumerate(settings):
        if stage == "dpo":  # the stage loads its policy and reference from a directory
            policy = work / f"dpo-policy-{i}"
            save_model(load_causal_lm(model, tok, seed=0), tok, policy)
            cfg = build_config(DPOConfig, overrides=[
                f"out_dir={work / f'dpo-out-{i}'}", f"policy={policy}", f"batch_size={batch}",
                f"train_file={work / 'data' / 'prefs_train.jsonl'}", f"bucket_batches={bucket}",
                f"run.dtype={dtype}", "run.tensorboard=false", "max_steps=1000000"])
            stages.append(DPOStage(cfg, cpu))
            continue
        cfg = SFTConfig() if stage == "sft" else RewardConfig()
        cfg.batch_size, cfg.bucket_batches, cfg.run.dtype, cfg.model.path = batch, bucket, dtype, model
        if stage == "sft":
            stages.append(SFTStage(cfg, load_causal_lm(model, tok, seed=0), rows, None, cpu, 10**6))
        else:
            net = load_scalar_model(model, tok, init_from_causal_lm=True, seed=0)
            stages.append(RewardStage(cfg, net, rows, None, cpu, 10**6))
    return stages


def time_alternating(stages, steps: int, rounds: int) -> list[list[float]]:
    """ms per step of each stage, one figure per round after two warm-up rounds."""
    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages.loop import StepContext

    guard = NonFiniteGuard(5)
    times: list[list[float]] = [[] for _ in stages]
    for r in range(rounds):
        for i, stage in enumerate(stages):
            t0 = time.perf_counter()
            for k in range(steps):
                result = stage.step(StepContext(r * steps + k + 1, guard, None))
                float(next(iter(result.metrics.values())))  # the loss: waits for the step
            if r >= 2:
                times[i].append((time.perf_counter() - t0) / steps * 1000)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--stages", default="sft,reward", help="comma-separated: sft, reward, dpo")
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="MODEL@DTYPE@BATCH@BUCKET")
    ap.add_argument("--steps", type=int, default=10, help="steps of one setting per turn")
    ap.add_argument("--rounds", type=int, default=12, help="turns per setting (the first 2 are warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default="/tmp/train_steps_ab_work")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds: at least 3 (two warm-up rounds, then timed ones)")

    import bench_common as bc
    import torch

    from ppo_rlhf import onednn
    from ppo_rlhf.stages import common

    settings = [parse_setting(s) for s in args.settings]
    work = prepare_data(args.task, Path(args.work_dir) / args.task)
    torch.set_num_threads(args.threads)
    onednn.set_enabled(onednn.pays_here())  # as the stages' setup does
    common.seed_everything(0)
    cpu, flags = bc.cpu_model_and_flags()
    print(f"{args.task}: {args.threads} threads; CPU {cpu} ({' '.join(flags)}); float32 linears "
          f"through {'oneDNN' if onednn.is_enabled() else 'MKL'}")
    results = {}
    for stage in args.stages.split(","):
        if stage not in ("sft", "reward", "dpo"):
            raise SystemExit(f"--stages: {stage!r} is not one of sft, reward, dpo")
        stages = build_stages(stage, settings, work)
        with bc.OtherLoad() as load:
            times = time_alternating(stages, args.steps, args.rounds)
        medians = [statistics.median(t) for t in times]
        unit = "sequences" if stage == "sft" else "pairs"
        print(f"[{stage}] {args.steps} steps per turn, {args.rounds - 2} timed turns per setting; other "
              f"processes {load.cores:.3f} cores, hypervisor steal {load.steal_cores:.3f} cores")
        for text, (_, _, batch, _), med, t in zip(args.settings, settings, medians, times):
            print(f"  {text:<36} {med:7.2f} ms/step  {batch / med * 1000:6.0f} {unit}/s  "
                  f"first/this {medians[0] / med:.2f}x   each: {' '.join(f'{x:.1f}' for x in t)}")
        results[stage] = {"settings": args.settings, "ms_per_step": times, "median_ms": medians,
                          "other_load_cores": load.cores, "steal_cores": load.steal_cores}
    if args.out:
        Path(args.out).write_text(json.dumps({"task": args.task, "cpu": cpu, "flags": flags,
                                              "threads": args.threads, "results": results,
                                              "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
