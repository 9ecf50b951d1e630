"""Rollout: sample responses from the policy, score them, and turn the scores into per-token
rewards, advantages and returns -- an `Experience` batch that the RL update consumes.

Three steps, each a function:
1. `sample` (on this rank's prompts): `samples_per_prompt` responses per prompt, grouped
   consecutively, with the sampling log-probs; an estimator that declares a baseline response
   (ReMax: the greedy one) gets it as one more row at the end of each group (`with_baselines`);
2. `score` (on this rank's rows): old and reference log-probs, values, the reward-model score
   and the reward functions, combined into one sequence score; then gathered in global order;
3. `make_experience` (on the global batch, the same on every rank): score shaping, per-token
   rewards, the algorithm's advantage estimator (`algo.advantages.ADVANTAGES`), whitening. Baseline
   rows are scored and shaped exactly like the samples, give the estimator their returns, and are
   then dropped: the update sees only sampled rows.

Shapes: B rollout rows, P prompt tokens (left-padded), R response tokens (right-padded after EOS).
Response-aligned tensors (B, R) start at the first response token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed as dist
from .algo.advantages import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageParams,
    RunningMeanStd,
    compute_rewards,
    masked_sum,
    masked_whiten,
    sequence_returns,
)
from .algo.kl import kl_penalty
from .config import PPOConfig
from .generation import generate, response_logprobs, sequence_rewards
from .models import adapters_disabled, token_scores
from .rewards import RewardFunctions, combine_scores, process_rewards_to_tokens


class Reference:
    """pi_ref's log-probs, the same way for a frozen copy and for a LoRA policy whose base model
    (adapters disabled) is the reference, so no second copy of the weights is needed."""

    def __init__(self, model=None, lora_policy=None):
        if (model is None) == (lora_policy is None):
            raise ValueError("Reference needs exactly one of a frozen model or a LoRA policy")
        self.model, self.lora_policy = model, lora_policy

    def context(self):
        """The context inside which `self.network` computes the reference distribution."""
        return adapters_disabled(self.lora_policy) if self.lora_policy is not None else contextlib.nullcontext()

    @property
    def network(self):
        return self.model if self.model is not None else self.lora_policy

    @torch.no_grad()
    def logprobs(self, sequences, attention_mask, prompt_len: int, temperature: float) -> torch.Tensor:
        """(B, R) log pi_ref of the response tokens at the sampling temperature."""
        with self.context():
            lp, _ = response_logprobs(self.network, sequences, attention_mask, prompt_len, temperature=temperature)
        return lp


class Rollout(NamedTuple):
    """Responses sampled on this rank; rows i*n .. i*n+n-1 answer prompt i (n = samples per prompt)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded, each prompt repeated for its group
    prompt_mask: torch.Tensor  # (B, P) bool
    response_ids: torch.Tensor  # (B, R) right-padded with pad after EOS
    response_mask: torch.Tensor  # (B, R) bool, True on response tokens incl. EOS
    logprobs: torch.Tensor  # (B, R) sampling log-probs (old log-probs unless recomputed)
    entropy: torch.Tensor  # (B, R) entropy of the sampling distribution


class Scored(NamedTuple):
    """A rollout with everything measured on it (before shaping); all rows of all ranks once gathered."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R) bool
    response_mask: torch.Tensor  # (B, R) bool
    logprobs: torch.Tensor  # (B, R) log pi_old
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref
    values: torch.Tensor  # (B, R) V_old(s_t); zeros without a critic
    entropy: torch.Tensor  # (B, R)
    score: torch.Tensor  # (B,) combined sequence score (RM and/or functions), before shaping
    dense: torch.Tensor  # (B, R) per-token additions: process rewards, RM dense credit
    rm_scores: torch.Tensor  # (B,) normalised RM score (zeros without an RM)
    function_scores: torch.Tensor  # (B, F) each reward function's sequence reward
    is_baseline: torch.Tensor  # (B,) bool, a baseline response (scored like a sample, not trained on)
    truncated: torch.Tensor  # (B,) bool, no EOS within max_new_tokens
    groups: torch.Tensor  # (B,) rows sampled together from one prompt share an id
    prompt_index: torch.Tensor  # (B,) the row's prompt in the training prompts

    @property
    def prompt_len(self) -> int:
        return self.sequences.size(1) - self.response_mask.size(1)


class Experience(NamedTuple):
    """One rollout, everything the update needs (all detached; global batch). Not tied to
    on-policy use: the replay buffer (replay.py) holds these, with each row's policy version."""

    sequences: torch.Tensor  # (B, P+R) prompt + response token ids
    attention_mask: torch.Tensor  # (B, P+R) bool
    response_mask: torch.Tensor  # (B, R) bool, True on response tokens incl. EOS
    loss_mask: torch.Tensor  # (B, R) bool, the tokens the policy loss sees (truncated=mask drops rows)
    logprobs: torch.Tensor  # (B, R) log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t|s_t)
    values: torch.Tensor  # (B, R) V_old(s_t) (zeros without a critic)
    rewards: torch.Tensor  # (B, R) per-token rewards (score at the end, dense terms, -beta*KL_t if in the reward)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R) value targets (zeros without a critic)
    scores: torch.Tensor  # (B,) shaped score used in the reward
    rm_scores: torch.Tensor  # (B,) normalised RM score
    function_scores: torch.Tensor  # (B, F)
    kl: torch.Tensor  # (B, R) per-token KL estimate (reward.kl_estimator)
    entropy: torch.Tensor  # (B, R)
    truncated: torch.Tensor  # (B,) bool
    groups: torch.Tensor  # (B,)
    prompt_index: torch.Tensor  # (B,)
    # (B, R) log pi_behaviour: the policy that sampled the row. `logprobs` is the proximal policy the
    # loss's ratio is taken against; both are the rollout's on fresh rows, and a replayed row's
    # `logprobs` are recomputed by the policy at the start of the update (the IS correction's pi_prox).
    behaviour_logprobs: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.sequences.size(1) - self.response_mask.size(1)


@torch.no_grad()
def sample(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: PPOConfig, max_new_tokens: int,
           eos_id: int, pad_id: int, row_seeds: list[int], greedy: bool = False) -> Rollout:
    """`algo.samples_per_prompt` responses to each prompt (B prompts -> B*n rows, grouped; the
    prompt's KV cache is computed once for its group), each row from its own random stream
    (`row_seeds`, B*n of them); `greedy` takes one argmax response each.

    The log-probs are those of the distribution sampled from (softmax(logits / temperature),
    after top-k / top-p), as `response_logprobs` computes them in the update.
    """
    r = cfg.rollout
    n = 1 if greedy else cfg.algo.samples_per_prompt
    resp, resp_mask, logprobs, entropy = generate(
        policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
        pad_token_id=pad_id, temperature=0.0 if greedy else r.temperature, top_k=r.top_k, top_p=r.top_p,
        row_seeds=None if greedy else row_seeds, num_samples=n, return_logprobs=True, return_entropy=True)
    return Rollout(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), resp, resp_mask,
                   logprobs, entropy)


def pad_responses(rollout: Rollout, length: int, pad_id: int) -> Rollout:
    """The rollout with responses right-padded to `length` tokens (one length on all ranks)."""
    extra = length - rollout.response_ids.size(1)
    if extra == 0:
        return rollout
    return rollout._replace(
        response_ids=F.pad(rollout.response_ids, (0, extra), value=pad_id),
        response_mask=F.pad(rollout.response_mask, (0, extra), value=False),
        logprobs=F.pad(rollout.logprobs, (0, extra), value=0.0),
        entropy=F.pad(rollout.entropy, (0, extra), value=0.0))


def with_baselines(samples: Rollout, baselines: Rollout, n: int, pad_id: int) -> tuple[Rollout, torch.Tensor]:
    """The sampled rows (B*n, n per prompt) with each prompt's baseline response (B rows) appended
    to its group: groups of n + 1 rows, the last the baseline. Returns (rollout, is_baseline (B*(n+1),))."""
    length = max(samples.response_ids.size(1), baselines.response_ids.size(1))
    samples, baselines = pad_responses(samples, length, pad_id), pad_responses(baselines, length, pad_id)
    B = baselines.response_ids.size(0)

    def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.reshape(B, n, *a.shape[1:]), b[:, None]], 1).reshape(B * (n + 1), *a.shape[1:])

    merged = Rollout(*(interleave(a, b) for a, b in zip(samples, baselines)))
    is_baseline = torch.zeros(B, n + 1, dtype=torch.bool, device=samples.response_ids.device)
    is_baseline[:, n] = True
    return merged, is_baseline.reshape(-1)


def truncated_rows(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) True where the response has no EOS (it hit max_new_tokens)."""
    return ~((response_ids == eos_id) & response_mask).any(dim=1)


@torch.no_grad()
def dense_credit(reward_model, sequences, attention_mask, prompt_len: int, response_mask) -> torch.Tensor:
    """Per-token credit from the RM: s_t - s_{t-1}, the RM score after token t minus before it
    (potential-based shaping: it sums to s_last - s_prompt, so it spreads credit without changing
    which responses are best). (B, R), zero past the mask."""
    s = token_scores(reward_model, sequences, attention_mask)  # (B, P+R)
    gain = float(getattr(reward_model.config, "reward_gain", 1.0))
    after = s[:, prompt_len:] * gain
    before = s[:, prompt_len - 1:-1] * gain
    return (after - before) * response_mask


class Scorer:
    """The sequence score of responses: the reward model's (normalised) score and/or the reward
    functions, combined as `reward.combine` says, plus their per-token terms (process rewards, the
    RM's dense credit). Called on each rank's rows; `texts` are the decoded responses."""

    def __init__(self, cfg: PPOConfig, tokenizer, reward_model=None, functions: RewardFunctions | None = None):
        self.cfg, self.tokenizer, self.reward_model = cfg, tokenizer, reward_model
        self.functions = functions if functions is not None and len(functions) else None

    @property
    def names(self) -> list[str]:
        return self.functions.names if self.functions is not None else []

    @torch.no_grad()
    def __call__(self, sequences, attention_mask, response_mask, prompts: list[str], texts: list[str],
                 fields: list[dict], row_ids: list[int]):
        """(score (B,), dense (B, R), rm_scores (B,), function_scores (B, F))."""
        cfg = self.cfg.reward
        B, R = response_mask.shape
        dev = sequences.device
        P = sequences.size(1) - R
        components, weights = [], []
        dense = torch.zeros(B, R, device=dev)
        rm_scores = torch.zeros(B, device=dev)
        if self.reward_model is not None:
            rm_scores = sequence_rewards(self.reward_model, sequences, attention_mask).float()
            components.append(rm_scores)
            weights.append(cfg.rm_weight)
            if cfg.credit == "dense":
                dense = dense + cfg.dense_coef * dense_credit(self.reward_model, sequences, attention_mask, P,
                                                              response_mask)
        function_scores = torch.zeros(B, 0, device=dev)
        if self.functions is not None:
            out = self.functions.score(prompts, texts, fields, row_ids)
            function_scores = torch.stack([out.per_function[n] for n in self.names], 1).to(dev)
            components.append(out.total.to(dev))
            weights.append(1.0)  # the functions' own weights are already in `total`
            if any(out.steps):
                dense = dense + process_rewards_to_tokens(
                    self.tokenizer, sequences[:, P:].cpu(), response_mask.cpu(), out.steps).to(dev)
        score = combine_scores(components, weights, cfg.combine)
        return score, dense, rm_scores, function_scores


def gather_groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """`dist.gather_shards` by groups of n consecutive rows, so a prompt's samples stay together:
    rank r holds prompts r, r + W, ...; the result holds every prompt's group in global order."""
    if not dist.is_distributed():
        return x
    groups = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    gathered = dist.gather_shards(groups)
    return gathered.reshape(gathered.shape[0] * n, *x.shape[1:])


def gather_scored(scored: Scored, n: int) -> Scored:
    return Scored(*(gather_groups(t, n) for t in scored))


def pad_scored(s: Scored, prompt_len: int, response_len: int, pad_id: int) -> Scored:
    """The rows with prompts left-padded to `prompt_len` and responses right-padded to
    `response_len` tokens (to concatenate rollouts of different shapes)."""
    P, R = s.prompt_len, s.response_mask.size(1)
    left, right = prompt_len - P, response_len - R
    if left == 0 and right == 0:
        return s
    pad_rows = lambda t, value: F.pad(t, (0, right), value=value)  # noqa: E731  (B, R) tensors
    sequences = F.pad(s.sequences, (left, right), value=pad_id)
    attention_mask = F.pad(s.attention_mask, (left, right), value=False)
    return s._replace(sequences=sequences, attention_mask=attention_mask,
                      response_mask=pad_rows(s.response_mask, False), logprobs=pad_rows(s.logprobs, 0.0),
                      ref_logprobs=pad_rows(s.ref_logprobs, 0.0), values=pad_rows(s.values, 0.0),
                      entropy=pad_rows(s.entropy, 0.0), dense=pad_rows(s.dense, 0.0))


def shape_scores(scores: torch.Tensor, truncated: torch.Tensor, lengths: torch.Tensor, cfg: PPOConfig,
                 max_new_tokens: int, running: RunningMeanStd | None) -> torch.Tensor:
    """Running normalisation (optional; the caller updates `running`), the missing-EOS penalty,
    DAPO's soft overlong punishment, clipping. scores, truncated, lengths (B,); on the global batch."""
    r, ro = cfg.reward, cfg.rollout
    scores = scores.float().clone()
    if running is not None:
        scores = running.normalize(scores)
    if ro.truncated == "penalty":
        scores = torch.where(truncated, torch.full_like(scores, ro.missing_eos_penalty), scores)
    if ro.overlong_buffer:
        # DAPO: 0 up to max - buffer, then linearly down to -overlong_penalty at max_new_tokens.
        start = max_new_tokens - ro.overlong_buffer
        excess = (lengths.float() - start).clamp(min=0) / ro.overlong_buffer
        scores = scores - ro.overlong_penalty * excess.clamp(max=1.0)
    if r.score_clip is not None:
        scores = scores.clamp(-r.score_clip, r.score_clip)
    return scores


def advantage_params(cfg: PPOConfig) -> AdvantageParams:
    loss = cfg.loss
    return AdvantageParams(gamma=loss.gamma, lam=loss.lam, critic_lam=loss.critic_lam,
                           adaptive_lam_alpha=loss.adaptive_lam_alpha or 0.0, norm_by_std=loss.norm_by_std)


def select_rows(s: Scored, rows: torch.Tensor) -> Scored:
    """The rows `rows` (a (B,) bool mask or indices) of a scored batch."""
    return Scored(*(t[rows] for t in s))


def baseline_returns(returns: torch.Tensor, groups: torch.Tensor, is_baseline: torch.Tensor) -> torch.Tensor:
    """(number of sampled rows,) each sampled row's baseline: the mean return of the baseline rows
    of its group. returns, groups, is_baseline (B,); every group must hold a baseline row."""
    match = groups[~is_baseline][:, None] == groups[is_baseline][None, :]
    if not bool(match.any(1).all()):
        raise ValueError("a group of sampled rows has no baseline row")
    match = match.to(returns.dtype)
    return (match @ returns[is_baseline]) / match.sum(1)


@torch.no_grad()
def make_experience(scored: Scored, cfg: PPOConfig, kl_coef: float, max_new_tokens: int,
                    running: RunningMeanStd | None = None) -> Experience:
    """Shape the scores and compute rewards, advantages and returns on the global batch.

    The KL goes into the per-token reward (algo.kl_in=reward) or is left to the loss; the
    advantage estimator is `ADVANTAGES[algo.advantage]`; advantages are whitened over the loss
    tokens when loss.whiten_advantages. Baseline rows (`scored.is_baseline`) go through the same
    shaping and rewards; their returns are the estimator's `baselines`, and they are not in the
    result. The running normaliser learns from the sampled rows only.
    """
    if running is not None:
        running.update(scored.score[~scored.is_baseline])
    scores = shape_scores(scored.score, scored.truncated, scored.response_mask.sum(1), cfg, max_new_tokens,
                          running)
    in_reward = cfg.algo.kl_in == "reward"
    rewards, kl = compute_rewards(scores, scored.logprobs, scored.ref_logprobs, scored.response_mask,
                                  kl_coef if in_reward else 0.0, estimator=cfg.reward.kl_estimator,
                                  dense_scores=scored.dense)
    estimator = ADVANTAGES[cfg.algo.advantage]
    baselines = None
    if estimator.baseline is not None:
        baselines = baseline_returns(sequence_returns(rewards, scored.response_mask), scored.groups,
                                     scored.is_baseline)
    sampled = ~scored.is_baseline
    scored, scores, rewards, kl = select_rows(scored, sampled), scores[sampled], rewards[sampled], kl[sampled]
    mask = scored.response_mask
    loss_mask = mask & ~scored.truncated[:, None] if cfg.rollout.truncated == "mask" else mask
    values = scored.values * mask
    task_returns = scores + masked_sum(scored.dense, mask, dim=1)
    inputs = AdvantageInputs(rewards, mask, scores, scored.groups, values if estimator.needs_values else None,
                             baselines, task_returns)
    advantages, returns = estimator.fn(inputs, advantage_params(cfg))
    if cfg.loss.whiten_advantages:
        advantages = masked_whiten(advantages, loss_mask, shift_mean=True)
    advantages = advantages * loss_mask
    returns = returns if returns is not None else torch.zeros_like(rewards)
    return Experience(scored.sequences, scored.attention_mask, mask, loss_mask, scored.logprobs,
                      scored.ref_logprobs, values, rewards, advantages, returns, scores, scored.rm_scores,
                      scored.function_scores, kl, scored.entropy, scored.truncated, scored.groups,
                      scored.prompt_index, scored.logprobs)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(pi||ref) of each response: the k1 sum over its tokens (unbiased for the sequence KL)."""
    return (kl_penalty(logprobs, ref_logprobs, "k1") * response_mask).sum(1)


def group_ids(groups: Sequence[int], n: int, device) -> torch.Tensor:
    """(len * n,) group id of each row: its prompt's group id, repeated for the n samples."""
    return torch.as_tensor(list(groups), device=device).repeat_interleave(n)
