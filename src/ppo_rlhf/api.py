"""The Python API: every stage as a function, for notebooks and scripts.

    from ppo_rlhf import api

    sft = api.sft(out_dir="run/sft", train_file="data/sft_train.jsonl", model={"tokenizer": "run/tok"},
                  max_steps=50)
    rl = api.rl(out_dir="run/rl", policy="run/sft/model", prompts_file="data/prompts_train.jsonl",
                reward_functions=[my_reward], train={"updates": 20})

Each function takes a config (a config dataclass, a YAML path, or nothing for the defaults), then
keyword options -- the config's keys, a nested group as a dict (`optim={"lr": 3e-4}`) -- and
`overrides`, dotted `key=value` strings as on the command line; all of them are type- and
range-checked as on the command line. Each returns the stage's summary (what it writes to
summary.json). Reward functions can be Python callables: `rl(..., reward_functions=[fn])` and
`pipeline(..., reward_functions=[fn])` add them to those named in `reward.functions`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import (
    DataConfig,
    EvalConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    TokenizerConfig,
    _flatten,
    build_config,
    parse_override,
    set_key,
)
from .rewards import RewardFunctions, combine_scores, load_reward_function, process_rewards_to_tokens


def build(cls: type, config: Any = None, overrides: Iterable[str] = (), **options: Any) -> Any:
    """A `cls` config: `config` (an instance, copied; a YAML path; or None = defaults), then the
    keyword `options` (nested groups as dicts), then the dotted `overrides`."""
    if config is None or isinstance(config, (str, Path)):
        cfg = build_config(cls, config)
    elif isinstance(config, cls):
        cfg = copy.deepcopy(config)
    else:
        raise TypeError(f"config must be a {cls.__name__}, a YAML path or None, got {type(config).__name__}")
    for key, value in _flatten(options):
        set_key(cfg, key, value, where="keyword options: ")
    for text in overrides:
        set_key(cfg, *parse_override(text), where="overrides: ")
    return cfg


def tokenizer(config: TokenizerConfig | str | None = None, *, overrides: Iterable[str] = (), **options) -> dict:
    """`ppo-rlhf tokenizer`: train a BPE tokenizer (task=... or texts=FILE.jsonl,...)."""
    from .stages.tools import run_tokenizer

    return run_tokenizer(build(TokenizerConfig, config, overrides, **options))


def data(config: DataConfig | str | None = None, *, overrides: Iterable[str] = (), **options) -> dict:
    """`ppo-rlhf data`: write a task's JSONL files."""
    from .stages.tools import run_data

    return run_data(build(DataConfig, config, overrides, **options))


def sft(config: SFTConfig | str | None = None, *, resume: bool = False, overrides: Iterable[str] = (),
        **options) -> dict:
    """`ppo-rlhf sft`: supervised fine-tuning; model={"arch": "llama", "layers": 4} sizes a new model."""
    from .models import model_spec
    from .stages.sft import run_sft

    cfg = build(SFTConfig, config, overrides, **options)
    cfg.model.path = model_spec(cfg.model)
    return run_sft(cfg, resume=resume)


def reward(config: RewardConfig | str | None = None, *, resume: bool = False, overrides: Iterable[str] = (),
           **options) -> dict:
    """`ppo-rlhf reward`: a reward model from preference pairs (model={"path": SFT_MODEL_DIR})."""
    from .stages.reward import run_reward

    return run_reward(build(RewardConfig, config, overrides, **options), resume=resume)


def rl(config: PPOConfig | str | None = None, *, resume: bool = False,
       reward_functions: Sequence[Callable] | None = None, overrides: Iterable[str] = (), **options) -> dict:
    """The RL stage (`ppo-rlhf ppo`; `algo="grpo"` etc. selects the algorithm): against the reward
    model and/or reward functions -- `reward_functions` are Python callables
    fn(prompts, responses, **row_fields) -> list[float], added to `reward.functions`."""
    from .stages.rl import run_rl

    cfg = build(PPOConfig, config, overrides, **options)
    if reward_functions:
        RewardFunctions(list(reward_functions))  # fail early on what is not callable
        return run_rl(cfg, resume=resume, reward_functions=list(reward_functions))
    return run_rl(cfg, resume=resume)


ppo = rl


def evaluate(config: EvalConfig | str | None = None, *, overrides: Iterable[str] = (), **options) -> dict:
    """`ppo-rlhf eval`: gold reward (task= or gold=), RM score and KL of a policy."""
    from .stages.evaluate import run_eval

    return run_eval(build(EvalConfig, config, overrides, **options))


def pipeline(config: PipelineConfig | str | None = None, *, reward_functions: Sequence[Callable] | None = None,
             overrides: Iterable[str] = (), **options) -> dict:
    """`ppo-rlhf pipeline`: every stage; `data_dir=DIR` for your own JSONL files. The options you
    give are kept (the pipeline fills in only what you leave at its defaults)."""
    from .stages.pipeline import explicit_keys, run_pipeline

    cfg = build(PipelineConfig, config, overrides, **options)
    yaml_path = config if isinstance(config, (str, Path)) else None
    explicit = explicit_keys(yaml_path, overrides, options)
    return run_pipeline(cfg, explicit=explicit, reward_functions=reward_functions)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """`ppo-rlhf report`: the HTML report of a run directory; returns its path."""
    from .report import write_report

    return write_report(run_dir, out)


__all__ = ["RewardFunctions", "build", "combine_scores", "data", "evaluate", "load_reward_function",
           "pipeline", "ppo", "process_rewards_to_tokens", "reward", "rl", "sft", "tokenizer", "report"]
