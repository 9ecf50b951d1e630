"""`ppo-rlhf` command line: one sub-command per stage.

    ppo-rlhf pipeline --task arithmetic --out runs/demo
    ppo-rlhf sft --config configs/tiny-cpu-sft.yaml optim.lr=3e-4
    ppo-rlhf ppo --help

Training stages take `--config FILE.yaml`, dotted `key=value` overrides and `--resume`. Mistakes in
the input (config, data, paths) print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch is imported: idle OpenMP threads sleep instead of spinning. On a busy or shared
# machine the default (spinning) policy made a PPO update 5-25x slower (benchmarks/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import STAGE_CONFIGS, build_config, help_text
from .errors import UserError

DESCRIPTIONS = {
    "tokenizer": "train a byte-level BPE tokenizer on a task's text or JSONL files",
    "data": "write a built-in task's JSONL files (SFT, preferences, prompts, pretraining text)",
    "sft": "supervised fine-tuning on demonstrations",
    "reward": "train a reward model on preference pairs (Bradley-Terry)",
    "ppo": "PPO against the reward model with a KL penalty to the SFT model",
    "eval": "gold reward / RM score / KL of a policy on held-out prompts",
    "pipeline": "tokenizer -> data -> sft -> reward -> ppo -> eval on a built-in task",
    "report": "write the HTML report of a run directory",
    "label": "serve the preference-labelling page",
    "generate": "sample responses from a saved model",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppo-rlhf", description="RLHF with PPO: SFT -> reward model -> PPO.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, cls in STAGE_CONFIGS.items():
        sp = sub.add_parser(name, help=DESCRIPTIONS[name], description=help_text(cls),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", help="YAML file of options (overridden by key=value arguments)")
        sp.add_argument("--task", help="shortcut for task=NAME")
        sp.add_argument("--out", help="shortcut for out_dir=DIR")
        if name in ("sft", "reward", "ppo"):
            sp.add_argument("--resume", action="store_true",
                            help="continue from the newest complete checkpoint in out_dir")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides")
    rp = sub.add_parser("report", help=DESCRIPTIONS["report"])
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="HTML path (default RUN_DIR/report.html)")
    lp = sub.add_parser("label", help=DESCRIPTIONS["label"])
    src = lp.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL of {prompt, a, b} or {prompt, chosen, rejected}")
    src.add_argument("--model", help="model directory to sample two responses per prompt from")
    lp.add_argument("--prompts", help="prompts JSONL (with --model)")
    lp.add_argument("--n", type=int, default=50, help="pairs to sample (with --model)")
    lp.add_argument("--max-new-tokens", type=int, default=32)
    lp.add_argument("--temperature", type=float, default=1.0)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--out", required=True, help="preference JSONL to append the choices to")
    lp.add_argument("--host", default="127.0.0.1")
    lp.add_argument("--port", type=int, default=8765)
    gp = sub.add_parser("generate", help=DESCRIPTIONS["generate"])
    gp.add_argument("model_dir")
    gp.add_argument("--prompts", help="prompts JSONL; without it, read prompts interactively from stdin")
    gp.add_argument("--max-new-tokens", type=int, default=32)
    gp.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    gp.add_argument("--top-p", type=float, default=1.0)
    gp.add_argument("--n", type=int, default=0, help="first N prompts of the file (0 = all)")
    gp.add_argument("--seed", type=int, default=0)
    return p


def _stage_config(name: str, args: argparse.Namespace):
    cls = STAGE_CONFIGS[name]
    overrides = list(args.overrides)
    keys = {f.name for f in __import__("dataclasses").fields(cls)}
    for flag, key in (("task", "task"), ("out", "out_dir")):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if key not in keys:
            raise UserError(f"`ppo-rlhf {name}` has no --{flag} option")
        overrides.append(f"{key}={value}")
    return build_config(cls, args.config, overrides)


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in STAGE_CONFIGS:
        cfg = _stage_config(cmd, args)
        resume = getattr(args, "resume", False)
        if cmd == "tokenizer":
            from .stages.tools import run_tokenizer
            result = run_tokenizer(cfg)
        elif cmd == "data":
            from .stages.tools import run_data
            result = run_data(cfg)
        elif cmd == "sft":
            from .stages.sft import run_sft
            result = run_sft(cfg, resume=resume)
        elif cmd == "reward":
            from .stages.reward import run_reward
            result = run_reward(cfg, resume=resume)
        elif cmd == "ppo":
            from .stages.ppo import run_ppo
            result = run_ppo(cfg, resume=resume)
        elif cmd == "eval":
            from .stages.evaluate import run_eval
            result = run_eval(cfg)
        else:
            from .stages.pipeline import run_pipeline
            result = run_pipeline(cfg)
        _print_result(result)
        return 0
    if cmd == "report":
        from .report import write_report
        print(write_report(args.run_dir, args.out))
        return 0
    if cmd == "label":
        from .label import load_pairs, pairs_from_model, serve
        if args.model:
            if not args.prompts:
                raise UserError("label --model needs --prompts FILE (prompts JSONL)")
            pairs = pairs_from_model(args.model, args.prompts, args.n, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, seed=args.seed)
        else:
            pairs = load_pairs(args.pairs)
        serve(pairs, args.out, host=args.host, port=args.port)
        return 0
    if cmd == "generate":
        from .stages.tools import run_generate
        run_generate(args)
        return 0
    _parser().print_help()
    return 2


def _print_result(result) -> None:
    if not isinstance(result, dict):
        return
    shown = {k: v for k, v in result.items() if k not in ("config", "samples")}
    print(json.dumps(shown, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in (None, "report", "label"):
        # transformers' per-file "Loading weights" bars would drown the stage's own progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _run(args)
    except UserError as e:
        print(f"ppo-rlhf {args.command or ''}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        print(f"ppo-rlhf {args.command or ''}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
