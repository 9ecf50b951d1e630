"""`ppo-rlhf` command line: one sub-command per stage.

    ppo-rlhf pipeline --task arithmetic --out runs/demo
    ppo-rlhf pipeline --config configs/arithmetic-cpu-pipeline.yaml sft.optim.lr=3e-4
    ppo-rlhf ppo --help

Training stages take `--config FILE.yaml`, dotted `key=value` overrides and `--resume`. Mistakes in
the input (config, data, paths) print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    "ppo": "RL (PPO by default; algo=grpo|rloo|reinforce++|remax|trpo|...) against the reward model "
           "and/or reward functions with a KL penalty to the SFT model",
    "rl": "the same stage as ppo (its algorithm-neutral name): ppo-rlhf rl algo=grpo ...",
    "dpo": "direct preference optimisation of the SFT model (loss=dpo|ipo|simpo|kto|orpo; "
           "online.enabled=true: iterative DPO on its own labelled samples)",
    "eval": "gold reward / RM score / KL of a policy on held-out prompts",
    "pipeline": "tokenizer -> data -> sft -> reward -> ppo -> eval on a built-in task or your own data",
    "report": "write the HTML report of a run directory",
    "label": "serve the preference-labelling page",
    "generate": "sample responses from a saved model",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the option list's layout and shows every flag's default (none for unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _shortcuts(cls: type) -> dict[str, str]:
    """The flags a stage offers as shortcuts for its own keys: --task, --out (out_dir or out)."""
    keys = {f.name for f in dataclasses.fields(cls)}
    flags = {}
    if "task" in keys:
        flags["task"] = "task"
    for key in ("out_dir", "out"):
        if key in keys:
            flags["out"] = key
            break
    return flags


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppo-rlhf", description="RLHF with PPO: SFT -> reward model -> PPO.",
                                epilog=f"Model presets (model.path=NAME, built from scratch):\n{preset_lines()}",
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, cls in STAGE_CONFIGS.items():
        sp = sub.add_parser(name, help=DESCRIPTIONS[name], description=help_text(cls),
                            formatter_class=_HelpFormatter,
                            epilog=f"Model presets:\n{preset_lines()}" if name in ("sft", "pipeline") else None)
        sp.add_argument("--config", help="YAML file of options (overridden by key=value arguments)")
        flags = _shortcuts(cls)
        if "task" in flags:
            sp.add_argument("--task", help="shortcut for task=NAME (a built-in task, or "
                            "path/to/task.py:Class / module:Class / module:gold_fn)")
        if "out" in flags:
            what = "FILE" if flags["out"] == "out" else "DIR"
            sp.add_argument("--out", help=f"shortcut for {flags['out']}={what}")
        if name == "pipeline":
            sp.add_argument("--data", help="directory of your own JSONL files (sft_train.jsonl, "
                            "prefs_train.jsonl, prompts_train.jsonl, ...) or a YAML listing them; "
                            "shortcut for data_dir=DIR")
        if name == "pipeline":
            sp.add_argument("--compare", help="methods to compare from one SFT and reward model, e.g. "
                            "ppo,dpo,online_dpo; shortcut for compare=LIST")
        if name in ("sft", "reward", "ppo", "rl", "dpo"):
            sp.add_argument("--resume", action="store_true",
                            help="continue from the newest complete checkpoint in out_dir")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides")
    rp = sub.add_parser("report", help=DESCRIPTIONS["report"], formatter_class=_HelpFormatter)
    rp.add_argument("run_dir", help="a pipeline run directory, or any directory of stage outputs")
    rp.add_argument("--out", help="HTML path (default RUN_DIR/report.html)")
    lp = sub.add_parser("label", help=DESCRIPTIONS["label"], formatter_class=_HelpFormatter)
    src = lp.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL of {prompt, a, b} or {prompt, chosen, rejected}")
    src.add_argument("--model", help="model directory to sample two responses per prompt from")
    lp.add_argument("--prompts", help="prompts JSONL (with --model)")
    lp.add_argument("--n", type=int, default=50, help="pairs to sample (with --model)")
    lp.add_argument("--max-new-tokens", type=int, default=32, help="response tokens (with --model)")
    lp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --model)")
    lp.add_argument("--seed", type=int, default=0, help="sampling seed (with --model)")
    lp.add_argument("--out", required=True, help="preference JSONL to append the choices to")
    lp.add_argument("--host", default="127.0.0.1", help="address to serve the page on")
    lp.add_argument("--port", type=int, default=8765, help="port to serve the page on")
    gp = sub.add_parser("generate", help=DESCRIPTIONS["generate"], formatter_class=_HelpFormatter)
    gp.add_argument("model_dir", help="a model directory saved by a stage, e.g. runs/demo/ppo/model")
    gp.add_argument("--prompts", help="prompts JSONL; without it, read prompts interactively from stdin")
    gp.add_argument("--out", help="write JSONL rows {\"prompt\", \"response\"} here instead of "
                    "prompt<TAB>response lines on stdout (a tab or newline in a response stays intact)")
    gp.add_argument("--max-new-tokens", type=int, default=32, help="response tokens at most")
    gp.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    gp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off")
    gp.add_argument("--n", type=int, default=0, help="first N prompts of the file (0 = all)")
    gp.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def preset_lines() -> str:
    """One line per model preset with its size, for --help and the README."""
    from .models import MODEL_PRESETS, preset_size

    return "\n".join(f"  {name:<15} {preset_size(name)}" for name in MODEL_PRESETS)


def _stage_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """The key=value overrides, with the --task/--out/--data shortcuts as keys."""
    overrides = list(args.overrides)
    for flag, key in _shortcuts(STAGE_CONFIGS[name]).items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "data", None) is not None:
        overrides.append(f"data_dir={args.data}")
    if getattr(args, "compare", None) is not None:
        overrides.append(f"compare={args.compare}")
    return overrides


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in STAGE_CONFIGS:
        overrides = _stage_overrides(cmd, args)
        cfg = build_config(STAGE_CONFIGS[cmd], args.config, overrides)
        resume = getattr(args, "resume", False)
        if cmd == "sft":  # model.arch/layers/hidden/heads -> the size spec to build
            from .models import model_spec
            cfg.model.path = model_spec(cfg.model)
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
        elif cmd in ("ppo", "rl"):
            from .stages.rl import run_rl
            result = run_rl(cfg, resume=resume)
        elif cmd == "dpo":
            from .stages.dpo import run_dpo
            result = run_dpo(cfg, resume=resume)
        elif cmd == "eval":
            from .stages.evaluate import run_eval
            result = run_eval(cfg)
        else:
            from .stages.pipeline import explicit_keys, run_pipeline
            result = run_pipeline(cfg, explicit=explicit_keys(args.config, overrides))
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
        code = _run(args)
        from . import distributed

        distributed.shutdown_distributed()
        return code
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
