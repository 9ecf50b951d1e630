"""ppo-rlhf: the InstructGPT loop (SFT -> reward model -> PPO) in small readable pieces.

The Python API is `ppo_rlhf.api` (`from ppo_rlhf import api; api.sft(...)`); its stage functions
(except tokenizer, data and report, which name modules here) are also reachable as
`ppo_rlhf.sft(...)`, imported on first use so that `import ppo_rlhf`
stays light (the CLI sets thread policies before torch is imported).
"""

import importlib

__version__ = "0.1.0"

# Not `tokenizer`, `data`, `report`: those names are the package's modules (use api.tokenizer, ...).
_API = ("sft", "reward", "rl", "ppo", "evaluate", "pipeline",
        "RewardFunctions", "combine_scores", "load_reward_function", "process_rewards_to_tokens")


def __getattr__(name: str):
    if name == "api":
        return importlib.import_module(".api", __name__)
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'ppo_rlhf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "api", *_API])
