"""Rewards, advantages and the statistics around them: masked reductions, whitening, GAE,
running mean/std and explained variance.

Every (B, R) tensor is response-aligned and `mask` is True at real response tokens (right padding
after EOS). Values at padded positions are never read: they may hold anything, including inf/NaN.
"""

from __future__ import annotations

import math
from typing import Any

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
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), batched over rows.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = sum_l (gamma * lam)^l delta_{t+l},
    returns_t = A_t + V_t. The episode ends at the last real token, so V_{t+1} = 0 there; a False
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
