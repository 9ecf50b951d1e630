"""Evaluation: sample a policy on held-out prompts and measure gold reward, RM score and KL.
With a gold reward, the greedy responses' gold reward is reported beside the sampled one.

    ppo-rlhf eval policy=run/ppo/model reference=run/sft/model reward_model=run/reward/model \
        prompts_file=run/data/prompts_eval.jsonl task=arithmetic --out eval.json

`task=` may name your own task (`path/to/task.py:MyTask`) and `gold=module:fn` a gold function;
see docs/tasks.md.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as dist
from ..config import EvalConfig
from ..data.collate import collate_prompts
from ..data.encode import TruncationReport, encode_prompts
from ..data.jsonl import prompt_text, read_prompts
from ..fileio import atomic_write_json
from ..generation import generate, response_logprobs, sequence_rewards
from ..models import check_same_tokenizer, load_causal_lm, load_scalar_model
from ..rollout import Reference
from ..tasks import gold_task
from ..tokenizer import load_tokenizer
from . import common


@dataclass
class PromptSet:
    """Prompts as text (for the gold reward) and as token ids (for the model).

    `fields` are each prompt row's other JSONL keys (for a gold function), `distinct` the number of
    different prompts (rows repeat when a small file is cycled), `truncation` the encoding's report.
    """

    texts: list[str]
    ids: list[list[int]]
    fields: list[dict] = field(default_factory=list)
    distinct: int = 0
    truncation: TruncationReport | None = None

    @property
    def samples_per_prompt(self) -> float:
        return len(self.ids) / self.distinct if self.distinct else 1.0


def load_eval_prompts(path: str, tokenizer, max_prompt_len: int, n: int | None = None) -> PromptSet:
    """The first `n` prompts of a file; a file with fewer is cycled (several samples per prompt,
    reported as `samples_per_prompt`), so that small prompt spaces still give `n` samples and a
    stable mean. A truncation is reported on the console and kept in `PromptSet.truncation`."""
    examples, _ = read_prompts(path)
    distinct = len(examples) if n is None else min(n, len(examples))
    if n is not None:
        examples = [examples[i % len(examples)] for i in range(n)]
    texts = [prompt_text(e) for e in examples]
    ids, report = encode_prompts(tokenizer, examples, max_prompt_len)
    if report.prompts_truncated and dist.is_main():
        print(f"[eval] {path}: {report.describe()}", file=sys.stderr)
    return PromptSet(texts, ids, [e.fields for e in examples], distinct, report)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor
                     ) -> tuple[list[str], list[bool]]:
    """Text of each response (without EOS/pad) and whether it ended without EOS (truncated)."""
    eos = tokenizer.eos_token_id
    texts, truncated = [], []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        ended = bool(real) and real[-1] == eos
        if ended:
            real = real[:-1]
        texts.append(tokenizer.decode(real, skip_special_tokens=True))
        truncated.append(not ended)
    return texts, truncated


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: PromptSet, *, task: str = "", gold: str = "", device=None,
                    reward_model=None, reference=None, max_new_tokens: int | None = None,
                    temperature: float = 0.7, batch_size: int = 64, seed: int = 1234,
                    sample_rows: int = 0) -> dict:
    """Gold reward (mean/std), RM score and KL(policy||reference) per sequence on `prompts`.

    The gold reward comes from `task` (a built-in task or your own, `path/task.py:Class`) or from
    a gold function `gold` (`module:fn`), which receive the prompt rows' fields. `reference` is a
    `rollout.Reference`: a frozen model, or the LoRA policy with its adapters disabled, as in RL.

    Prompts are sharded over ranks and the statistics combined; prompt j samples from its own
    stream seeded from (seed, j), so the result does not depend on the number of ranks. KL is the
    k1 sum over response tokens under the sampling temperature, the quantity the PPO reward penalises.
    """
    device = device or next(policy.parameters()).device
    task_obj = gold_task(task, gold)
    if max_new_tokens is None:
        max_new_tokens = task_obj.default_max_new_tokens if task_obj else 32
    greedy = temperature == 0
    temp = 1.0 if greedy else temperature
    was_training = policy.training
    policy.eval()
    golds, scores, kls, lengths, rows = [], [], [], [], []
    mine = dist.shard(list(range(len(prompts.ids))))
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        batch = collate_prompts([prompts.ids[j] for j in idx], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        resp, resp_mask = generate(policy, ids, mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   temperature=0.0 if greedy else temp,
                                   row_seeds=[seed * 2**32 + j for j in idx])
        texts, truncated = decode_responses(tokenizer, resp, resp_mask)
        lengths += resp_mask.sum(1).tolist()
        seq = torch.cat([ids, resp], 1)
        seq_mask = torch.cat([mask, resp_mask], 1)
        if task_obj is not None:
            golds += task_obj.gold_rewards([prompts.texts[j] for j in idx], texts, truncated,
                                           [prompts.fields[j] if prompts.fields else {} for j in idx])
        if reward_model is not None:
            scores += sequence_rewards(reward_model, seq, seq_mask).float().tolist()
        if reference is not None:
            lp, _ = response_logprobs(policy, seq, seq_mask, ids.size(1), temperature=temp)
            ref_lp = reference.logprobs(seq, seq_mask, ids.size(1), temp)
            kls += ((lp - ref_lp) * resp_mask).sum(1).tolist()
        for k, j in enumerate(idx[: max(0, sample_rows - len(rows))]):
            rows.append({"prompt": prompts.texts[j], "response": texts[k],
                         "gold_reward": golds[-len(idx) + k] if golds else None,
                         "rm_score": scores[-len(idx) + k] if scores else None})
    policy.train(was_training)
    out = {"n": len(prompts.ids), "distinct_prompts": prompts.distinct or len(prompts.ids),
           "samples_per_prompt": prompts.samples_per_prompt, "response_length": _mean(lengths)}
    if task_obj is not None:
        out["gold_reward"], out["gold_reward_std"] = _mean_std(golds)
    if reward_model is not None:
        out["rm_score"], out["rm_score_std"] = _mean_std(scores)
    if reference is not None:
        out["kl"], _ = _mean_std(kls)
    out["samples"] = rows
    return out


def evaluate_sampled_and_greedy(policy, tokenizer, prompts: PromptSet, *, temperature: float = 0.7,
                                **kwargs) -> dict:
    """`evaluate_policy` at `temperature`, with the greedy gold reward beside it
    (`gold_reward_greedy`, `gold_reward_greedy_std`) when there is a gold reward.

    Sampled gold is what the policy does at the RL stage's temperature; greedy gold what its most
    likely answer is worth (SFT reports both). The greedy pass scores only the gold reward; at
    temperature 0 the one pass is the greedy one, and both keys hold it.
    """
    res = evaluate_policy(policy, tokenizer, prompts, temperature=temperature, **kwargs)
    if "gold_reward" not in res:
        return res
    if temperature == 0:
        greedy = res
    else:
        greedy = evaluate_policy(policy, tokenizer, prompts, temperature=0.0,
                                 **{**kwargs, "reward_model": None, "reference": None, "sample_rows": 0})
    res["gold_reward_greedy"], res["gold_reward_greedy_std"] = greedy["gold_reward"], greedy["gold_reward_std"]
    return res


def _mean(values: list[float]) -> float:
    return _mean_std(values)[0]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std over all ranks' values."""
    t = torch.tensor(values, dtype=torch.float64)
    s = dist.all_reduce_sum(torch.stack([t.sum(), (t * t).sum(), torch.tensor(float(len(values)),
                                                                                dtype=torch.float64)]))
    n = s[2].item()
    if n == 0:
        return float("nan"), float("nan")
    mean = s[0].item() / n
    return mean, math.sqrt(max(0.0, s[1].item() / n - mean * mean))


def run_eval(cfg: EvalConfig) -> dict:
    """`ppo-rlhf eval`: print (and optionally write) the evaluation of one policy."""
    policy_dir = common.require_file(cfg.policy, "policy", "a model directory saved by a stage")
    common.require_file(cfg.prompts_file, "prompts_file", "a prompts JSONL")
    device = common.resolve_device("auto")
    dist.init_distributed(device)
    tokenizer = load_tokenizer(str(policy_dir))
    for other, what in ((cfg.reference, "reference"), (cfg.reward_model, "reward_model")):
        if other:  # scored with the policy's token ids
            check_same_tokenizer(policy_dir, "policy", other, what)
    policy = load_causal_lm(str(policy_dir), tokenizer).to(device)
    reference = Reference(model=load_causal_lm(cfg.reference, tokenizer).to(device).eval()) if cfg.reference else None
    rm = load_scalar_model(cfg.reward_model, tokenizer).to(device).eval() if cfg.reward_model else None
    prompts = load_eval_prompts(cfg.prompts_file, tokenizer, cfg.max_prompt_len, cfg.n)
    if prompts.distinct < cfg.n and dist.is_main():
        print(f"[eval] {cfg.prompts_file} has {prompts.distinct} prompts: n={cfg.n} samples are "
              f"{prompts.samples_per_prompt:.3g} per prompt (the file is cycled)", file=sys.stderr)
    res = evaluate_sampled_and_greedy(policy, tokenizer, prompts, task=cfg.task, gold=cfg.gold, device=device,
                                      reward_model=rm, reference=reference, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed,
                                      sample_rows=5)
    res["temperature"] = cfg.temperature
    if cfg.out and dist.is_main():
        atomic_write_json(Path(cfg.out), res)
    return res
