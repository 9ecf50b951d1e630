"""Losses for the three RLHF stages: PPO policy and value losses, the language-model loss
(SFT and PPO-ptx), the pairwise reward-model loss, and the entropy of a categorical.

Token-level losses are masked means over the real tokens (`mask` True) of the minibatch. Inputs
at padded positions are replaced before any arithmetic, so inf/NaN there cannot reach the loss or
its gradient. Stats are detached Python floats, ready for the metrics logger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ppo_rlhf.algo.advantages import masked_mean


def _fill_padding(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, L = -E[min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)].

    logprobs (B, R) carry the gradient; old_logprobs (B, R) are from the rollout policy;
    advantages (B, R). Stats: "clipfrac" (fraction of tokens where the clipped term is the active
    one, as in TRL), "approx_kl" (k3 estimate of KL(old || new)), "ratio_mean", "ratio_max".
    """
    mask = mask.bool()
    log_ratio = _fill_padding(logprobs - old_logprobs, mask)
    advantages = _fill_padding(advantages, mask)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)

    with torch.no_grad():
        ratio_max = _fill_padding(ratio, mask, float("-inf")).max()
        stats = {
            "clipfrac": float(masked_mean((pg_losses_clipped > pg_losses).float(), mask)),
            "approx_kl": float(masked_mean((ratio - 1.0) - log_ratio, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "ratio_max": float(ratio_max),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, dict[str, float]]:
    """Value loss 0.5 * (V - R)^2, or with `clip_eps` the clipped form
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) (PPO / TRL).

    values (B, R) carry the gradient; old_values and returns (B, R) are from the rollout.
    Stats: "clipfrac", the fraction of tokens where the clipped term is the larger one.
    """
    mask = mask.bool()
    values = _fill_padding(values, mask)
    old_values = _fill_padding(old_values, mask)
    returns = _fill_padding(returns, mask)
    vf_losses = (values - returns).square()
    if clip_eps is None:
        return 0.5 * masked_mean(vf_losses, mask), {"clipfrac": 0.0}
    # = V_old + clip(V - V_old, -eps, eps), but exactly V inside the band: the other form rounds,
    # and "clipped term larger" then counts rounding noise as clipping in the clipfrac.
    values_clipped = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    vf_losses_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    clipfrac = float(masked_mean((vf_losses_clipped > vf_losses).float(), mask))
    return loss, {"clipfrac": clipfrac}


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
