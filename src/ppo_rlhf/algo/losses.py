"""Losses for the three RLHF stages: the registered policy losses (PPO-clip, dual-clip, GSPO,
TRPO's surrogate) and loss aggregations, the value loss, the language-model loss (SFT and
PPO-ptx), the pairwise reward-model loss, and the entropy of a categorical.

Policy losses are per token; an aggregation (`AGGREGATIONS`) turns them into the minibatch loss. Inputs
at padded positions are replaced before any arithmetic, so inf/NaN there cannot reach the loss or
its gradient. Stats are detached Python floats, ready for the metrics logger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppo_rlhf.algo.advantages import masked_mean


def _fill_padding(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


class PolicyLossParams(NamedTuple):
    """Knobs of the policy losses: the ratio's clip range [1 - clip_low, 1 + clip_high] (DAPO's
    asymmetric "clip-higher" when they differ) and dual-clip's bound c on negative advantages."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float = 3.0


class PolicyLossOutput(NamedTuple):
    """Per-token policy losses and what is logged about them, all (B, R).

    losses carry the gradient (0 at padding); ratio is the importance ratio the loss used (per
    token, or the sequence ratio broadcast for GSPO); clipped is True where a clip is active.
    """

    losses: Tensor
    ratio: Tensor
    clipped: Tensor


class PolicyLoss(NamedTuple):
    """A registered policy loss: the per-token function and how the stage optimises it.

    update "gradient" = minibatch steps of the optimizer (PPO and friends); "trust_region" = one
    natural-gradient step with a KL-constrained line search per rollout (TRPO, `algo.trpo`).
    """

    fn: Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossParams], PolicyLossOutput]
    update: str = "gradient"


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, update: str = "gradient"):
    """Decorator: register `fn(logprobs, old_logprobs, advantages, mask, params) -> PolicyLossOutput`
    (all (B, R); logprobs carry the gradient)."""

    def wrap(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = PolicyLoss(fn, update)
        return fn

    return wrap


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, mask: Tensor, p: PolicyLossParams) -> PolicyLossOutput:
    """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) per token."""
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - p.clip_low, 1.0 + p.clip_high)
    losses = torch.maximum(pg_losses, pg_losses_clipped)
    return PolicyLossOutput(_fill_padding(losses, mask), ratio.detach(), (pg_losses_clipped > pg_losses) & mask)


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  p: PolicyLossParams) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017), L_t = -min(r_t A_t, clip(r_t) A_t) with
    r_t = pi(a_t|s_t) / pi_old(a_t|s_t). "clipped" marks tokens where the clipped term is the
    active one (as TRL counts clipfrac)."""
    mask = mask.bool()
    ratio = torch.exp(_fill_padding(logprobs - old_logprobs, mask))
    return _clipped_surrogate(ratio, _fill_padding(advantages, mask), mask, p)


@register_policy_loss("dual_clip")
def dual_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                   p: PolicyLossParams) -> PolicyLossOutput:
    """Dual-clip PPO (Ye et al. 2020): on negative advantages the clipped loss is also bounded by
    -c * A, so a token whose ratio exploded cannot dominate the batch: L_t = min(L_clip, -c A_t)."""
    mask = mask.bool()
    advantages = _fill_padding(advantages, mask)
    out = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, p)
    bound = -p.dual_clip_c * advantages
    capped = (advantages < 0) & (out.losses > bound) & mask
    losses = torch.where(advantages < 0, torch.minimum(out.losses, bound), out.losses)
    return PolicyLossOutput(_fill_padding(losses, mask), out.ratio, out.clipped | capped)


@register_policy_loss("gspo")
def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              p: PolicyLossParams) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean
    s_i = exp(mean_t log(pi / pi_old)) over its tokens, clipped per sequence. In token form
    s_it = sg(s_i) * pi(a_t) / sg(pi(a_t)): its value is s_i, its gradient s_i * grad log pi(a_t),
    so token advantages (e.g. from REINFORCE++) still work. Use a small clip range (3e-4 / 4e-4)."""
    mask = mask.bool()
    log_ratio = _fill_padding(logprobs - old_logprobs, mask)
    seq_log_ratio = log_ratio.sum(1) / mask.sum(1).clamp(min=1)
    token_log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
    ratio = torch.exp(_fill_padding(token_log_ratio, mask))
    return _clipped_surrogate(ratio, _fill_padding(advantages, mask), mask, p)


@register_policy_loss("trpo", update="trust_region")
def trpo_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                   p: PolicyLossParams) -> PolicyLossOutput:
    """TRPO's surrogate (Schulman et al. 2015), L_t = -r_t A_t, unclipped: the trust region is the
    KL constraint of the natural-gradient step (`algo.trpo`), not a clip."""
    mask = mask.bool()
    ratio = torch.exp(_fill_padding(logprobs - old_logprobs, mask))
    losses = -_fill_padding(advantages, mask) * ratio
    return PolicyLossOutput(_fill_padding(losses, mask), ratio.detach(), torch.zeros_like(mask))


# ----------------------------------------------------------------------------------------------
# Loss aggregation: per-token weights over a whole minibatch. A micro-batch's loss is the sum of
# weight * token loss over its rows, so however a minibatch is split (gradient accumulation, DDP
# ranks) the pieces add up to exactly the minibatch's loss.
# ----------------------------------------------------------------------------------------------
def _rows_with_tokens(mask: Tensor) -> Tensor:
    return (mask.sum(1) > 0).sum().clamp(min=1).to(torch.float32)


def token_mean_weights(mask: Tensor, norm_len: int) -> Tensor:
    """token-mean: every real token of the minibatch weighs 1 / (number of real tokens)."""
    return mask.float() / mask.sum().clamp(min=1)


def seq_mean_token_sum_weights(mask: Tensor, norm_len: int) -> Tensor:
    """seq-mean-token-sum: token losses summed per sequence, averaged over sequences."""
    return mask.float() / _rows_with_tokens(mask)


def seq_mean_token_mean_weights(mask: Tensor, norm_len: int) -> Tensor:
    """seq-mean-token-mean: token losses averaged per sequence, then over sequences (GRPO's paper
    form; long responses weigh less per token)."""
    per_row = mask.sum(1, keepdim=True).clamp(min=1)
    return mask.float() / per_row / _rows_with_tokens(mask)


def seq_mean_token_sum_norm_weights(mask: Tensor, norm_len: int) -> Tensor:
    """seq-mean-token-sum-norm (Dr. GRPO): token losses summed per sequence and divided by a
    constant length `norm_len` (the maximum response length), averaged over sequences -- no
    length bias either way."""
    return mask.float() / float(max(1, norm_len)) / _rows_with_tokens(mask)


AGGREGATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "token-mean": token_mean_weights,
    "seq-mean-token-sum": seq_mean_token_sum_weights,
    "seq-mean-token-mean": seq_mean_token_mean_weights,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm_weights,
}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Value loss 0.5 * (V - R)^2, or with `clip_eps` the clipped form
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) (PPO / TRL).

    values (B, R) carry the gradient; old_values and returns (B, R) are from the rollout. The
    per-token losses are averaged over the real tokens, or summed with `weights` (B, R) (a
    micro-batch's share of its minibatch, `token_mean_weights`). Returns (loss, clipfrac), the
    clip fraction (tokens where the clipped term is the larger one) reduced the same way.
    """
    mask = mask.bool()
    values = _fill_padding(values, mask)
    old_values = _fill_padding(old_values, mask)
    returns = _fill_padding(returns, mask)

    def reduce(x: Tensor) -> Tensor:
        return masked_mean(x, mask) if weights is None else (weights * _fill_padding(x, mask)).sum()

    vf_losses = (values - returns).square()
    if clip_eps is None:
        return 0.5 * reduce(vf_losses), torch.zeros((), device=values.device)
    # = V_old + clip(V - V_old, -eps, eps), but exactly V inside the band: the other form rounds,
    # and "clipped term larger" then counts rounding noise as clipping in the clipfrac.
    values_clipped = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    vf_losses_clipped = (values_clipped - returns).square()
    loss = 0.5 * reduce(torch.maximum(vf_losses, vf_losses_clipped))
    clipfrac = reduce((vf_losses_clipped > vf_losses).float()).detach()
    return loss, clipfrac


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, shape logits.shape[:-1].

    H = logsumexp(z) - sum_i p_i z_i, which never takes the log of an underflowed probability.
    Logits of -inf (filtered tokens) contribute 0 to the entropy and to its gradient.
    """
    # Entropy is shift-invariant; centring on the (constant) max avoids cancellation between two
    # large numbers when logits are large.
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(logits, dim=-1)
    # A finite stand-in for -inf keeps 0 * z at 0 instead of NaN, in the forward and backward pass.
    finite_logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, dim=-1) - (probs * finite_logits).sum(dim=-1)


def lm_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over positions where `mask` is True.

    logits (B, T, V) at position t predict labels (B, T) at position t: the caller has already
    shifted. Labels at padded positions are ignored (they may hold -100 or a pad id).
    """
    mask = mask.bool()
    labels = torch.where(mask, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    token_losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return masked_mean(token_losses.view_as(labels), mask)


def pairwise_rm_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, float]:
    """Bradley-Terry reward-model loss, mean of -log sigmoid(r_chosen - r_rejected [- margin]).

    chosen, rejected (B,) scalar rewards; optional margin (B,) or scalar (Llama 2 style).
    Returns (loss, accuracy) with accuracy = fraction of pairs where r_chosen > r_rejected.
    """
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).mean()
    accuracy = float((chosen > rejected).float().mean())
    return loss, accuracy
