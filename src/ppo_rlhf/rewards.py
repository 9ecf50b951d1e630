"""Reward functions: programmatic (verifiable) rewards given as Python functions.

    reward.functions=my_rewards.py:exact_answer,ppo_rlhf.tasks.arithmetic:gold reward.weights=1,0.5

A reward function is called on a batch, the way TRL's `reward_funcs` are:

    def exact_answer(prompts: list[str], responses: list[str], answer: list[str], **_) -> list[float]:
        return [1.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]

`prompts` and `responses` are the decoded texts (responses without EOS); every other key of the
prompt's JSONL row (`{"prompt": ..., "answer": "42"}`) arrives as a keyword argument holding one
value per prompt (None where a row lacks the key). A function receives only the fields it names,
unless it takes `**kwargs`, which receives them all.

It returns one float per response, or, per response, a list of `(char_offset, reward)` pairs: a
process reward, one reward per step of the response, where a step ends at `char_offset` in the
response text. `process_rewards_to_tokens` puts each step's reward on the token that completes
that character, so credit arrives where the step ends instead of only at the end of the sequence.

A function that raises, returns the wrong number of values or a non-finite value raises
`RewardFunctionError`, naming the function and the prompt row; nothing is caught and averaged away.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import distributed as dist
from .errors import UserError

COMBINE_MODES = ("sum", "sum_then_normalize", "normalize_then_sum")
"""How `combine_scores` mixes the reward components (reward-model score, functions)."""

_EPS = 1e-8


class RewardFunctionError(UserError):
    """A reward (or gold) function failed on a batch: it raised, or returned something unusable."""


# ----------------------------------------------------------------------------------------------
# Loading `module:name` and `path/to/file.py:name`
# ----------------------------------------------------------------------------------------------
def _split_spec(spec: str, key: str, what: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"{key}: {spec!r} is not a {what}; write it as `package.module:name` or "
                        f"`path/to/file.py:name`")
    return where, name


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _load_module(where: str, spec: str, key: str):
    """The module a spec names: a Python file (imported under a private name) or an importable module."""
    if _is_path(where):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"{key}: {spec!r}: no such file {path} (relative paths start at the "
                            f"current directory, {Path.cwd()})")
        name = f"_ppo_rlhf_user_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{key}: {spec!r}: {path} cannot be imported as Python (is it a .py file?)")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise UserError(f"{key}: {spec!r}: importing {path} failed: "
                            f"{type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        raise UserError(f"{key}: {spec!r}: no module named {err.name!r} (is it installed, or on "
                        f"PYTHONPATH? a file is given as path/to/file.py:name)") from err
    except Exception as err:
        raise UserError(f"{key}: {spec!r}: importing {where} failed: "
                        f"{type(err).__name__}: {err}") from err


def load_object(spec: str, key: str = "reward.functions", what: str = "function spec") -> Any:
    """The object `spec` names: `package.module:name` or `path/to/file.py:name`.

    `key` (the config key) and `what` only shape the error messages.
    """
    where, name = _split_spec(spec, key, what)
    module = _load_module(where, spec, key)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                        and getattr(v, "__module__", None) == module.__name__)
        listed = f"; it defines: {', '.join(public)}" if public else ""
        raise UserError(f"{key}: {spec!r}: {where} has no attribute {name!r}{listed}")
    return getattr(module, name)


def load_reward_function(spec: str) -> Callable:
    """The reward function `spec` names (`pkg.module:fn` or `path/to/file.py:fn`)."""
    fn = load_object(spec, "reward.functions", "reward-function spec")
    if not callable(fn):
        raise UserError(f"reward.functions: {spec!r} is a {type(fn).__name__}, not a function; "
                        "name a function fn(prompts, responses, **fields) -> list[float]")
    return fn


# ----------------------------------------------------------------------------------------------
# Calling the functions
# ----------------------------------------------------------------------------------------------
class FunctionScores(NamedTuple):
    """What the reward functions gave one batch of B responses.

    per_function: name -> (B,) each function's sequence-level reward, unweighted (for a process
        reward, the sum of its steps): what is logged as `reward_fn/<name>`.
    steps: per row, the weighted `(char_offset, reward)` steps of the process-reward functions,
        sorted by offset (empty lists when there are none); see `process_rewards_to_tokens`.
    total: (B,) weighted sum of the sequence-level rewards of the functions that are not process
        rewards (their reward goes at the end of the sequence).
    """

    per_function: dict[str, torch.Tensor]
    steps: list[list[tuple[int, float]]]
    total: torch.Tensor


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _accepted_fields(fn: Callable) -> set[str] | None:
    """Keyword names `fn` takes besides (prompts, responses); None = it takes **kwargs (all)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name for p in positional[2:] if p.kind is not p.POSITIONAL_ONLY} | {
        p.name for p in params if p.kind is p.KEYWORD_ONLY}


def fields_as_lists(fields: Sequence[dict], reserved: Sequence[str] = ("prompts", "responses")
                    ) -> dict[str, list]:
    """Row dicts -> {key: [value per row]} (None where a row lacks the key), keys in first-seen order."""
    keys: dict[str, None] = {}
    for row in fields:
        keys.update(dict.fromkeys(row))
    for key in keys:
        if key in reserved:
            raise UserError(f"the prompt rows have a field {key!r}, which is also the name of a "
                            f"reward-function argument; rename that key in the prompts JSONL")
    return {key: [row.get(key) for row in fields] for key in keys}


class RewardFunctions:
    """Weighted reward functions from `specs` (`module:fn` strings or Python callables).

    `names` are the functions' names (made unique with `_2`, `_3`, ...), the keys of
    `FunctionScores.per_function`.
    """

    def __init__(self, specs: Sequence[str | Callable], weights: Sequence[float] | None = None):
        if not specs:
            raise UserError("reward.functions is empty: give at least one `module:fn`")
        self.functions: list[Callable] = []
        self.specs: list[str] = []
        for spec in specs:
            if isinstance(spec, str):
                self.functions.append(load_reward_function(spec.strip()))
                self.specs.append(spec.strip())
            elif callable(spec):
                self.functions.append(spec)
                self.specs.append(f"{getattr(spec, '__module__', '?')}:{_function_name(spec)}")
            else:
                raise UserError(f"reward functions: {spec!r} is neither a `module:fn` string nor callable")
        weights = [1.0] * len(specs) if weights is None or len(weights) == 0 else [float(w) for w in weights]
        if len(weights) != len(specs):
            raise UserError(f"reward.weights has {len(weights)} values but reward.functions has "
                            f"{len(specs)} functions; give one weight per function (or none: all 1)")
        if not all(math.isfinite(w) for w in weights):
            raise UserError(f"reward.weights {weights}: every weight must be a finite number")
        self.weights = weights
        self.names: list[str] = []
        for fn in self.functions:
            base, k = _function_name(fn), 1
            name = base
            while name in self.names:
                k += 1
                name = f"{base}_{k}"
            self.names.append(name)
        self._accepts = [_accepted_fields(fn) for fn in self.functions]

    def __len__(self) -> int:
        return len(self.functions)

    def score(self, prompts: list[str], responses: list[str], fields: list[dict], row_ids: list[int],
              *, sources: list[str] | None = None) -> FunctionScores:
        """Call every function on the batch; see `FunctionScores`.

        `fields[i]` holds row i's other JSONL keys; `row_ids[i]` is the prompt's index in its file
        and `sources[i]` (optional) its `file:line`, both for error messages only.
        """
        n = len(prompts)
        if not (len(responses) == len(fields) == len(row_ids) == n):
            raise ValueError(f"score: {n} prompts, {len(responses)} responses, {len(fields)} field "
                             f"rows and {len(row_ids)} row ids; they must be aligned")
        columns = fields_as_lists(fields)
        per_function: dict[str, torch.Tensor] = {}
        steps: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        total = torch.zeros(n, dtype=torch.float32)
        for fn, name, weight, accepts in zip(self.functions, self.names, self.weights, self._accepts):
            kwargs = columns if accepts is None else {k: v for k, v in columns.items() if k in accepts}

            def where(i: int) -> str:
                src = f" ({sources[i]})" if sources else ""
                return f"row {row_ids[i]}{src}, prompt {_short(prompts[i])}, response {_short(responses[i])}"

            values = call_batch(fn, name, prompts, responses, kwargs, where)
            rows = [_check_value(v, name, where(i), len(responses[i])) for i, v in enumerate(values)]
            if any(isinstance(r, list) for r in rows):  # a process reward
                per_row = []
                for i, r in enumerate(rows):
                    row_steps = r if isinstance(r, list) else [(len(responses[i]), r)]
                    steps[i].extend((c, weight * x) for c, x in row_steps)
                    per_row.append(sum(x for _, x in row_steps))
                per_function[name] = torch.tensor(per_row, dtype=torch.float32)
            else:
                per_function[name] = torch.tensor(rows, dtype=torch.float32)
                total += weight * per_function[name]
        for row in steps:
            row.sort(key=lambda step: step[0])
        return FunctionScores(per_function, steps, total)


def call_batch(fn: Callable, name: str, prompts: list[str], responses: list[str], kwargs: dict[str, list],
               where: Callable[[int], str], what: str = "reward function") -> list:
    """`fn(prompts, responses, **kwargs)` checked to return one value per response.

    When the batch call raises, each row is retried alone to name the row that fails. `what`
    names the kind of function in the messages.
    """
    n = len(prompts)
    try:
        values = fn(prompts, responses, **kwargs)
    except Exception as err:
        bad = _first_failing_row(fn, prompts, responses, kwargs)
        at = f" on {where(bad)}" if bad is not None else f" on the batch of rows {where(0)} ... ({n} rows)"
        raise RewardFunctionError(f"{what} {name!r} raised{at}: {type(err).__name__}: {err}"
                                  ) from err
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"{what} {name!r} returned {type(values).__name__}; it must "
                                  f"return a list with one float per response ({n} here)")
    if len(values) != n:
        raise RewardFunctionError(f"{what} {name!r} returned {len(values)} values for {n} "
                                  f"responses (first row: {where(0)}); return one per response")
    return list(values)


def _first_failing_row(fn: Callable, prompts, responses, kwargs) -> int | None:
    for i in range(len(prompts)):
        try:
            fn(prompts[i:i + 1], responses[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:
            return i
    return None


def _check_value(value: Any, name: str, where: str, text_len: int) -> float | list[tuple[int, float]]:
    """A row's value as a float, or as a list of (char_offset, reward) steps; else RewardFunctionError."""
    if isinstance(value, (list, tuple)):
        out = []
        for k, step in enumerate(value):
            if (not isinstance(step, (list, tuple)) or len(step) != 2
                    or not _is_int(step[0]) or not _is_number(step[1])):
                raise RewardFunctionError(
                    f"reward function {name!r} returned step {k} = {step!r} on {where}; a process "
                    "reward is a list of (char_offset: int >= 0, reward: float) pairs")
            offset, reward = int(step[0]), float(step[1])
            if offset < 0:
                raise RewardFunctionError(f"reward function {name!r} returned the negative offset "
                                          f"{offset} in step {k} on {where}")
            if not math.isfinite(reward):
                raise RewardFunctionError(f"reward function {name!r} returned the non-finite reward "
                                          f"{reward} in step {k} on {where}")
            out.append((offset, reward))
        return out
    if not _is_number(value):
        raise RewardFunctionError(f"reward function {name!r} returned {value!r} on {where}; expected "
                                  "a float (or a list of (char_offset, reward) steps)")
    value = float(value)
    if not math.isfinite(value):
        raise RewardFunctionError(f"reward function {name!r} returned the non-finite value {value} "
                                  f"on {where}; return a finite float")
    return value


def _is_number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    if isinstance(x, (int, float)):
        return True
    return hasattr(x, "item") and hasattr(x, "dtype") and getattr(x, "size", 1) == 1  # numpy scalars


def _is_int(x: Any) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


# ----------------------------------------------------------------------------------------------
# Combining components, placing process rewards on tokens
# ----------------------------------------------------------------------------------------------
def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the global batch (all ranks; biased variance, as in whitening)."""
    mean, var, _ = dist.global_masked_moments(x, torch.ones_like(x, dtype=torch.bool))
    return (x - mean) * torch.rsqrt(var + _EPS)


def combine_scores(components: list[torch.Tensor], weights: list[float], mode: str) -> torch.Tensor:
    """One (B,) sequence score from (B,) components (e.g. the RM score and reward functions).

    sum:                 s = sum_i w_i c_i
    sum_then_normalize:  s = standardise(sum_i w_i c_i)
    normalize_then_sum:  s = sum_i w_i standardise(c_i)

    `standardise` uses the mean and (biased) std over the global batch, every rank's rows together,
    so that the result does not depend on the number of ranks. A constant component standardises to 0.
    """
    if mode not in COMBINE_MODES:
        raise UserError(f"reward.combine: {mode!r} is not one of {', '.join(COMBINE_MODES)}")
    if not components:
        raise ValueError("combine_scores: no components")
    if len(weights) != len(components):
        raise ValueError(f"combine_scores: {len(components)} components but {len(weights)} weights")
    parts = [c.float() for c in components]
    if mode == "normalize_then_sum":
        parts = [_standardise(c) for c in parts]
    total = sum(w * c for w, c in zip(weights, parts))
    if mode == "sum_then_normalize":
        total = _standardise(total)
    return total


def text_end_offsets(tokenizer, token_ids: list[int]) -> list[int]:
    """For each token of a response, the length of the decoded text up to and including it.

    Decoded as `stages.evaluate.decode_responses` decodes the whole response (skipping special
    tokens). Prefixes are decoded one by one, since a byte-level token can end mid-character; the
    ends are made non-decreasing and capped at the full text's length.
    """
    full = len(tokenizer.decode(token_ids, skip_special_tokens=True))
    ends, last = [], 0
    for k in range(1, len(token_ids) + 1):
        last = max(last, min(full, len(tokenizer.decode(token_ids[:k], skip_special_tokens=True))))
        ends.append(last)
    return ends


def process_rewards_to_tokens(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor,
                              steps: list[list[tuple[int, float]]]) -> torch.Tensor:
    """Per-token rewards (B, R) from per-row `(char_offset, reward)` steps.

    A step ending at character `c` of the response text goes on the first token whose decoded text
    reaches `c` (so `c = len(text)` lands on the last text token; a trailing EOS is not text). An
    offset beyond the text goes on the last real token (the EOS if there is one). Several steps on
    one token add up; positions past the mask are zero.

    response_ids, response_mask: (B, R), mask True = real token (the first response token at 0).
    """
    out = torch.zeros(response_ids.shape, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    for b, (ids, mask, row) in enumerate(zip(response_ids.tolist(), response_mask.tolist(), steps)):
        if not row:
            continue
        positions = [i for i, m in enumerate(mask) if m]
        real = [ids[i] for i in positions]
        if not real:
            raise ValueError(f"process_rewards_to_tokens: row {b} has rewards but no real response token")
        text_ids = real[:-1] if real[-1] == eos else real
        ends = text_end_offsets(tokenizer, text_ids)
        full = ends[-1] if ends else 0
        for offset, reward in row:
            if offset > full or not ends:
                k = len(real) - 1
            else:
                k = next(k for k, end in enumerate(ends) if end >= offset)
            out[b, positions[k]] += reward
    return out.to(response_ids.device)
