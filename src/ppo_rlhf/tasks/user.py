"""Your own task: a gold reward (and optionally a data generator) from your own Python code.

    ppo-rlhf eval ... task=my_task.py:ReverseTask        # a class
    ppo-rlhf eval ... gold=my_task.py:reverse_gold       # just a gold function

The protocol is small (docs/tasks.md has a worked example):

- `gold_reward(self, prompt: str, response: str, **fields) -> float` -- required. `fields` are
  the prompt row's other JSONL keys (e.g. `answer`) and `truncated` (True when generation stopped
  without EOS); the method receives only those it names, all of them with `**fields`.
- `default_max_new_tokens: int` -- optional (default 32): the response budget of evaluations and
  rollouts when no max_new_tokens is set.
- `name`, `description` -- optional, for reports.
- A data generator -- optional: subclass `ppo_rlhf.tasks.Task` and implement its generator
  methods (`all_prompts`, `demonstration`, `candidate`, `pretrain_texts`, `tokenizer_corpus`); then
  `ppo-rlhf data` and `ppo-rlhf pipeline` without --data write the task's files as for a built-in task.

A gold function has the signature of a reward function (see `ppo_rlhf.rewards`):
`fn(prompts, responses, **fields) -> list[float]`, with `truncated` among the fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ppo_rlhf.errors import UserError
from ppo_rlhf.rewards import _accepted_fields, _check_value, _short, call_batch, fields_as_lists

DEFAULT_MAX_NEW_TOKENS = 32


class UserTask:
    """A user's gold reward behind the interface the stages use (`gold_reward`, `gold_rewards`,
    `default_max_new_tokens`); it has no data generator."""

    default_max_prompt_len = 64
    default_vocab_size = 512

    def __init__(self, batch_gold: Callable[..., list], spec: str, *, name: str = "",
                 description: str = "", default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self._gold = batch_gold
        self._accepts = _accepted_fields(batch_gold)
        self.spec = spec
        self.name = name or spec
        self.description = description or f"your task ({spec})"
        if not isinstance(default_max_new_tokens, int) or default_max_new_tokens < 1:
            raise UserError(f"task {spec!r}: default_max_new_tokens={default_max_new_tokens!r}; use a "
                            "positive integer")
        self.default_max_new_tokens = default_max_new_tokens

    @classmethod
    def from_function(cls, fn: Callable, spec: str) -> UserTask:
        return cls(fn, spec, name=getattr(fn, "__name__", spec))

    @classmethod
    def from_object(cls, obj: Any, spec: str) -> UserTask:
        method = getattr(obj, "gold_reward", None)
        if not callable(method):
            raise UserError(f"task {spec!r}: {type(obj).__name__} has no gold_reward(prompt, response, "
                            "**fields) method; a task needs at least that (see docs/tasks.md)")
        accepts = _accepted_fields(method)

        def batch_gold(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
            names = columns if accepts is None else {k: v for k, v in columns.items() if k in accepts}
            return [method(p, r, **{k: v[i] for k, v in names.items()})
                    for i, (p, r) in enumerate(zip(prompts, responses))]

        return cls(batch_gold, spec, name=getattr(obj, "name", "") or type(obj).__name__,
                   description=getattr(obj, "description", ""),
                   default_max_new_tokens=getattr(obj, "default_max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    def gold_rewards(self, prompts: list[str], responses: list[str], truncated: list[bool] | None = None,
                     fields: list[dict] | None = None) -> list[float]:
        """The gold reward of each response, checked: a failure names the task and the row."""
        n = len(prompts)
        rows = [dict(f) for f in (fields or [{}] * n)]
        for row, t in zip(rows, truncated or [False] * n):
            row["truncated"] = t
        columns = fields_as_lists(rows)
        if self._accepts is not None:
            columns = {k: v for k, v in columns.items() if k in self._accepts}

        def where(i: int) -> str:
            return f"row {i}, prompt {_short(prompts[i])}, response {_short(responses[i])}"

        name = self.spec
        values = call_batch(self._gold, name, prompts, responses, columns, where, what="gold reward of task")
        out = []
        for i, v in enumerate(values):
            value = _check_value(v, name, where(i), len(responses[i]))
            if isinstance(value, list):
                raise UserError(f"{name}: returned steps on {where(i)}; a gold reward is one float per response")
            out.append(value)
        return out

    def gold_reward(self, prompt: str, response: str, *, truncated: bool = False, **fields) -> float:
        return self.gold_rewards([prompt], [response], [truncated], [fields])[0]

    def __getattr__(self, name: str):
        if name in ("all_prompts", "demonstration", "candidate", "pretrain_texts", "tokenizer_corpus",
                    "sft_records", "preference_pairs", "prompts"):
            raise UserError(f"task {self.spec!r} has no data generator ({name}); give your own JSONL "
                            "files (`ppo-rlhf pipeline --data DIR`), or subclass ppo_rlhf.tasks.Task "
                            "and implement its generator methods (docs/tasks.md)")
        raise AttributeError(name)
