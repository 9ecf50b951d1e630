"""Rewards, advantages and the statistics around them: masked reductions, whitening, GAE,
running mean/std and explained variance.

Every (B, R) tensor is response-aligned and `mask` is True at real response tokens (right padding
after EOS). Values at padded positions are never read: they may hold anything, including inf/NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ppo_rlhf.algo.kl import kl_penalty

WHITEN_EPS = 1e-8


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is True; over all elements when `dim` is None."""
    # torch.where instead of x * mask: padded positions may hold inf/NaN and 0 * inf is NaN.
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is True; NaN where the mask has no True entry."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of `x` over all positions where `mask` is True (biased unless `unbiased`)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        count = int(mask.bool().sum())
        if count < 2:
            raise ValueError(f"unbiased variance needs at least 2 masked-in values, got {count}")
        var = var * count / (count - 1)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Normalise `x` to zero mean and unit (biased) variance over the masked-in positions.

    With `shift_mean=False` the original mean is added back, so only the scale changes (used for
    rewards, whose sign carries meaning). `stats=(mean, var)` supplies precomputed statistics,
    e.g. all-reduced across DDP ranks, instead of this batch's. Padded positions are returned as 0.
    """
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(
        mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device)
    )


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True position in each row of `mask` (B, R), -1 for an empty row; (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    dense_scores: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: -kl_coef * KL_t on every real token, plus the sequence score at
    the last real token (Ziegler et al. 2019; InstructGPT).

    scores (B,), logprobs/ref_logprobs/mask (B, R); optional dense_scores (B, R) are added on real
    tokens (per-token credit). A row with no real token gets no score. Returns
    (rewards (B, R), kl (B, R)), both zero where `mask` is False.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, estimator), zero)
    rewards = -kl_coef * kl

    last = last_token_index(mask)
    has_token = last >= 0
    row_scores = torch.where(has_token, scores.to(rewards.dtype), zero)
    # clamp: an empty row "places" its zero score at index 0, which is padding and stays zero below.
    score_at_end = torch.zeros_like(rewards).scatter(
        1, last.clamp(min=0)[:, None], row_scores[:, None]
    )
    rewards = rewards + torch.where(mask, score_at_end, zero)
    if dense_scores is not None:
        rewards = rewards + torch.where(mask, dense_scores.to(rewards.dtype), zero)
    return rewards, kl


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), batched over rows.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = sum_l (gamma * lam)^l delta_{t+l},
    returns_t = A_t + V_t; `lam` is a float or a (B,) per-row lambda. The episode ends at the last
    real token, so V_{t+1} = 0 there; a False
    in `mask` ends the episode (masks are prefixes: right padding). rewards, values, mask are
    (B, R); returns (advantages (B, R), returns (B, R)), both zero where `mask` is False.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values.to(rewards.dtype), zero)

    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, zero)
        advantages_reversed.append(advantage)
        # Zero at padding, so the last real token bootstraps from V = 0 and A = 0.
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over real tokens; NaN when Var[returns] is 0.

    1 means the value function predicts the returns perfectly, 0 means no better than a constant,
    negative means worse than a constant.
    """
    values, returns = values.detach().double(), returns.detach().double()
    var_returns = float(masked_var(returns, mask))
    if not var_returns > 0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask)) / var_returns


class RunningMeanStd:
    """Running mean and (population) variance of a stream of scalars, e.g. reward-model scores.

    Batches are merged with Chan et al.'s parallel update, so `update_from_moments` can take
    moments that were all-reduced across DDP ranks first and every rank ends with the same state.
    Before any update, mean = 0 and var = 1, so `normalize` is the identity.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> None:
        """Merge all elements of `x` into the running statistics."""
        x = x.detach().double().flatten()
        if x.numel() == 0:
            return
        self.update_from_moments(float(x.mean()), float(x.var(unbiased=False)), x.numel())

    def update_from_moments(
        self, mean: float | Tensor, var: float | Tensor, count: int | Tensor
    ) -> None:
        """Merge a batch given by its mean, population variance and element count."""
        batch_mean, batch_var, batch_count = float(mean), float(var), int(count)
        if batch_count <= 0:
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = (
            self.var * self.count
            + batch_var * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean += delta * batch_count / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: Tensor, clip: float | None = None) -> Tensor:
        """(x - mean) / std, optionally clipped to [-clip, clip]."""
        normalized = (x - self.mean) / math.sqrt(self.var + self.eps)
        return normalized if clip is None else normalized.clamp(-clip, clip)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])


# ----------------------------------------------------------------------------------------------
# Advantage estimators, registered by name. The RL stage calls them only through `ADVANTAGES`.
# ----------------------------------------------------------------------------------------------
class AdvantageInputs(NamedTuple):
    """What every estimator receives (all on the global rollout batch, detached).

    rewards (B, R): per-token rewards -- the score at the last real token, any process rewards,
    and -beta * KL_t when the KL is in the reward. scores (B,): the sequence score alone.
    values (B, R) V_old(s_t), or None without a critic. groups (B,): rows sampled from the same
    prompt share an id. baselines (B,): for an estimator that declares a baseline response, the
    return (sum of per-token rewards, shaped exactly as the samples' are) of the baseline response
    to each row's prompt; else None. mask (B, R) is True at real response tokens.
    """

    rewards: Tensor
    mask: Tensor
    scores: Tensor
    groups: Tensor
    values: Tensor | None = None
    baselines: Tensor | None = None
    task_returns: Tensor | None = None  # (B,) the return without the KL penalty (score + dense terms); None = scores


class AdvantageParams(NamedTuple):
    """Knobs of the estimators. `lam` is the policy's GAE lambda, `critic_lam` the returns'
    (VC-PPO / VAPO decouple them; None = lam); `adaptive_lam_alpha` > 0 gives each row the
    length-adaptive lambda 1 - 1 / (alpha * length) of VAPO; `norm_by_std` divides GRPO's
    group-centred scores by the group std."""

    gamma: float = 1.0
    lam: float = 0.95
    critic_lam: float | None = None
    adaptive_lam_alpha: float = 0.0
    norm_by_std: bool = True
    eps: float = 1e-6


class Estimator(NamedTuple):
    """A registered estimator: the function and what the stage must provide for it."""

    fn: Callable[[AdvantageInputs, AdvantageParams], tuple[Tensor, Tensor | None]]
    needs_values: bool = False  # a critic (value model) is required
    needs_groups: bool = False  # several samples per prompt are required
    # A baseline response per prompt, sampled as this says ("greedy": the argmax response), scored
    # and shaped by the same path as the samples; its return reaches the estimator as `baselines`.
    baseline: str | None = None
    advantages: bool = True  # False: no advantages, for an update that learns its own critic (SAC)


ADVANTAGES: dict[str, Estimator] = {}


BASELINE_RESPONSES = ("greedy",)


def register_advantage(name: str, **needs):
    """Decorator: register `fn(inputs, params) -> (advantages (B, R), returns (B, R) | None)`."""
    if needs.get("baseline") not in (None, *BASELINE_RESPONSES):
        raise ValueError(f"estimator {name!r}: baseline={needs['baseline']!r} is not one of {BASELINE_RESPONSES}")

    def wrap(fn):
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGES[name] = Estimator(fn, **needs)
        return fn

    return wrap


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """(B,) undiscounted return of each response: the sum of its per-token rewards."""
    return masked_sum(rewards, mask, dim=1)


def group_moments(x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (mean, unbiased std, count) of `x` (B,) over the rows of its group.

    The std of a group of one is NaN (callers decide what a lone sample means).
    """
    ids, inverse = torch.unique(groups, return_inverse=True)
    x = x.double()
    count = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inverse, torch.ones_like(x))
    total = torch.zeros_like(count).index_add_(0, inverse, x)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (x - mean[inverse]).square())
    std = torch.sqrt(sq / (count - 1))  # unbiased, as GRPO (torch.std) uses; NaN for count 1
    return mean[inverse], std[inverse], count[inverse]


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s over the real tokens of each row, (B, R); 0 past the mask."""
    mask = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out.append(running)
    return torch.where(mask, torch.stack(out[::-1], dim=1), zero)


def _broadcast(row_values: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, R): the row's value on each of its real tokens, 0 elsewhere."""
    row_values = row_values.to(torch.float32)
    return torch.where(mask.bool(), row_values[:, None].expand(mask.shape), torch.zeros((), device=mask.device))


@register_advantage("gae", needs_values=True)
def gae_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """GAE (PPO's estimator). Advantages use `lam` (or each row's length-adaptive lambda
    1 - 1/(alpha*l), VAPO); the critic's returns use `critic_lam` (VC-PPO: 1.0 gives unbiased
    Monte-Carlo targets for the value model while the policy keeps a low-variance estimate)."""
    lam: float | Tensor = p.lam
    if p.adaptive_lam_alpha > 0:
        lengths = x.mask.sum(1).clamp(min=1).to(x.rewards.dtype)
        lam = (1.0 - 1.0 / (p.adaptive_lam_alpha * lengths)).clamp(0.0, 1.0)
    advantages, returns = compute_gae(x.rewards, x.values, x.mask, p.gamma, lam)
    critic_lam = p.lam if p.critic_lam is None else p.critic_lam
    if p.critic_lam is not None or p.adaptive_lam_alpha > 0:
        _, returns = compute_gae(x.rewards, x.values, x.mask, p.gamma, critic_lam)
    return advantages, returns


def has_task_signal(x: AdvantageInputs) -> Tensor:
    """(B,) True where the row's group has task returns (score + dense terms, without the KL
    penalty) that differ, so that comparing its samples says something about the task.

    A group whose task returns are all equal (all right or all wrong under a 0/1 reward) carries no
    reward signal. With the KL in the reward its returns still differ by the KL terms alone, and a
    group baseline turns those into advantages: GRPO's std scaling makes them unit-sized (on
    arithmetic with the 0/1 gold reward, seed 0, GRPO gained 10 points of gold with such groups and
    20 without them, dropped by dynamic sampling), and the unscaled group estimators (RLOO,
    REINFORCE++-baseline) weight KL noise as much as the reward.
    """
    task = x.task_returns if x.task_returns is not None else x.scores
    _, task_std, _ = group_moments(task, x.groups)
    return task_std > 0


def _group_normalised(x: AdvantageInputs, p: AdvantageParams, scale: bool) -> Tensor:
    returns = sequence_returns(x.rewards, x.mask)
    mean, std, count = group_moments(returns, x.groups)
    centred = returns.double() - mean
    if scale:
        centred = torch.where(has_task_signal(x), centred / (std + p.eps), torch.zeros_like(centred))
    # A lone sample has nothing to be compared with: no signal (the stage refuses n = 1 anyway).
    centred = torch.where(count > 1, centred, torch.zeros_like(centred))
    return _broadcast(centred, x.mask)


@register_advantage("grpo", needs_groups=True)
def grpo_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_group(R)) / (std_group(R) + eps) on every token
    of response i, R_i its return, and 0 for a group whose task returns (without the KL penalty) are
    all equal; without `norm_by_std` only centred (Dr. GRPO's fix)."""
    return _group_normalised(x, p, p.norm_by_std), None


@register_advantage("dr_grpo", needs_groups=True)
def dr_grpo_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """Dr. GRPO (Liu et al. 2025): A_i = R_i - mean_group(R), no std scaling (the std divides
    away the signal of easy and hard prompts); pair it with the seq-mean-token-sum-norm loss."""
    return _group_normalised(x, p, scale=False), None


@register_advantage("rloo", needs_groups=True)
def rloo_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean_{j != i} R_j over the other samples of the
    prompt, i.e. n/(n-1) * (R_i - mean_group(R))."""
    returns = sequence_returns(x.rewards, x.mask)
    mean, _, count = group_moments(returns, x.groups)
    total = mean * count
    loo = (total - returns.double()) / (count - 1).clamp(min=1)
    adv = torch.where((count > 1) & has_task_signal(x), returns.double() - loo, torch.zeros_like(loo))
    return _broadcast(adv, x.mask), None


@register_advantage("reinforce++")
def reinforce_pp_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """REINFORCE++ (Hu 2025): the discounted return-to-go of the per-token rewards (token-level KL
    in the reward); the stage then whitens it over the global batch."""
    return returns_to_go(x.rewards, x.mask, p.gamma), None


@register_advantage("reinforce++_baseline", needs_groups=True)
def reinforce_pp_baseline_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """REINFORCE++-baseline: the group-mean score is subtracted from each row's score (at its last
    token) before the return-to-go; the stage then whitens over the global batch."""
    mean, _, _ = group_moments(x.scores, x.groups)
    last = last_token_index(x.mask)
    shift = torch.zeros_like(x.rewards).scatter(1, last.clamp(min=0)[:, None], mean.to(x.rewards.dtype)[:, None])
    rewards = x.rewards - torch.where(x.mask.bool(), shift, torch.zeros_like(shift))
    signal = has_task_signal(x)[:, None].expand_as(rewards)
    return torch.where(signal, returns_to_go(rewards, x.mask, p.gamma), torch.zeros_like(rewards)), None


@register_advantage("none", advantages=False)
def no_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """No advantage estimate (zeros): for an update that learns its own soft Q critic from the
    rewards (SAC), which a loss that reads advantages may not be paired with."""
    return torch.zeros_like(x.rewards), None


@register_advantage("remax", baseline="greedy")
def remax_advantages(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    """ReMax (Li et al. 2023): the return-to-go minus the return of the greedy response to the same
    prompt (a baseline that costs one greedy rollout and no critic)."""
    if x.baselines is None:
        raise ValueError("remax needs baselines: the returns of greedy responses")
    g = returns_to_go(x.rewards, x.mask, p.gamma)
    return g - _broadcast(x.baselines, x.mask), None
