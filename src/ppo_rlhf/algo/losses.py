"""Losses for the three RLHF stages: the registered policy losses (PPO-clip, dual-clip, GSPO,
CISPO, SAPO, TRPO's surrogate) and loss aggregations, the value loss, the language-model loss (SFT and
PPO-ptx), the pairwise reward-model loss, and the entropy of a categorical.

Policy losses are per token; an aggregation (`AGGREGATIONS`) turns them into the minibatch loss. A
loss declares how the stage optimises it (`update`, one of `UPDATE_KINDS`) and may declare its own
knobs (a dataclass of `opt` fields, which the config offers as `loss.<name>.*`). Inputs
at padded positions are replaced before any arithmetic, so inf/NaN there cannot reach the loss or
its gradient. Stats are detached Python floats, ready for the metrics logger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppo_rlhf.algo.advantages import masked_mean
from ppo_rlhf.algo.options import opt


def _fill_padding(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


class PolicyLossParams(NamedTuple):
    """Knobs of the policy losses: the ratio's clip range [1 - clip_low, 1 + clip_high] (DAPO's
    asymmetric "clip-higher" when they differ), dual-clip's bound c on negative advantages, and
    `knobs`: the loss's own options (an instance of the dataclass it registered), or None."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float = 3.0
    knobs: Any = None


class PolicyLossOutput(NamedTuple):
    """Per-token policy losses and what is logged about them, all (B, R).

    losses carry the gradient (0 at padding); ratio is the importance ratio the loss used (per
    token, or the sequence ratio broadcast for GSPO); clipped is True where a clip is active.
    """

    losses: Tensor
    ratio: Tensor
    clipped: Tensor


# How the RL stage optimises a policy loss: "gradient" = minibatch steps of the optimizer (PPO and
# friends); "trust_region" = one natural-gradient step with a KL-constrained line search per rollout
# (TRPO, `algo.trpo`, algo/trpo.py's trust_region_step); "soft_actor_critic" = off-policy steps of
# twin soft Q critics and the actor on replayed rows (SAC, algo/sac.py).
UPDATE_KINDS = ("gradient", "trust_region", "soft_actor_critic")
# The kinds that can learn from replayed rows (IS-corrected gradient steps; SAC is off-policy by
# construction); a trust-region step is taken on its own rollout.
REPLAY_KINDS = ("gradient", "soft_actor_critic")


class PolicyLoss(NamedTuple):
    """A registered policy loss: the per-token function, how the stage optimises it (one of
    UPDATE_KINDS), the dataclass of its own knobs (None: it has none) and whether it reads the
    advantages (an actor-critic with its own critic does not). The gradient and trust-region kinds
    call `fn(logprobs, old_logprobs, advantages, mask, params)`; another kind names its own math."""

    fn: Callable
    update: str = "gradient"
    knobs: type | None = None
    uses_advantages: bool = True


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, update: str = "gradient", knobs: type | None = None,
                         uses_advantages: bool = True):
    """Decorator: register `fn(logprobs, old_logprobs, advantages, mask, params) -> PolicyLossOutput`
    (all (B, R); logprobs carry the gradient). `knobs`: a dataclass whose fields (each an `opt`) the
    config offers as `loss.<name>.<field>`; the loss reads them as `params.knobs`."""
    if update not in UPDATE_KINDS:
        raise ValueError(f"policy loss {name!r}: update={update!r} is not one of {UPDATE_KINDS}")

    def wrap(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = PolicyLoss(fn, update, knobs, uses_advantages)
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


@dataclass
class CISPOKnobs:
    """CISPO's clipped importance-sampling weight."""

    weight_max: float = opt(5.0, "Upper bound of CISPO's IS weight sg(min(r_t, weight_max)); MiniMax-M1 "
                            "sets no lower bound and tunes only this one.", min=1.0)
    weight_min: float = opt(0.0, "Lower bound of the IS weight (0 = none, as in MiniMax-M1).", min=0.0)


@register_policy_loss("cispo", knobs=CISPOKnobs)
def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
               p: PolicyLossParams) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, Chen et al. 2025): L_t = -sg(clip(r_t, w_min, w_max)) * A_t * log pi(a_t).

    The IS weight is clipped and detached instead of the update: every token keeps a gradient
    (PPO's clip zeroes the gradient of a token whose ratio left the band, which drops the rare
    tokens that matter most), and the weight bounds how much a stale token can count. On fresh
    data (r = 1) the gradient is REINFORCE's, -A_t * grad log pi. "clipped": the weight was capped.
    """
    mask = mask.bool()
    k = p.knobs if p.knobs is not None else CISPOKnobs()
    ratio = torch.exp(_fill_padding(logprobs - old_logprobs, mask))
    weight = ratio.detach().clamp(min=k.weight_min, max=k.weight_max)
    losses = -_fill_padding(advantages, mask) * weight * _fill_padding(logprobs, mask)
    clipped = ((ratio > k.weight_max) | (ratio < k.weight_min)) & mask
    return PolicyLossOutput(_fill_padding(losses, mask), ratio.detach(), clipped)


@dataclass
class SAPOKnobs:
    """SAPO's soft gate temperatures."""

    tau_pos: float = opt(1.0, "Gate temperature on positive-advantage tokens (SAPO: 1.0).", min=1e-6)
    tau_neg: float = opt(1.05, "Gate temperature on negative-advantage tokens (SAPO: 1.05; larger = "
                         "the gate closes faster as the ratio moves).", min=1e-6)


@register_policy_loss("sapo", knobs=SAPOKnobs)
def sapo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              p: PolicyLossParams) -> PolicyLossOutput:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): PPO's hard clip replaced by a
    smooth gate, L_t = -f(r_t) * A_t with f(r) = (4 / tau) * sigmoid(tau * (r - 1)) and tau =
    tau_pos where A_t > 0, tau_neg otherwise. f'(r) = 4 s (1 - s) with s = sigmoid(tau (r - 1)): 1 at
    r = 1 (the policy gradient on fresh data), decaying smoothly as the ratio drifts, faster on the
    negative side. "clipped": tokens whose gradient weight has fallen below one half."""
    mask = mask.bool()
    k = p.knobs if p.knobs is not None else SAPOKnobs()
    advantages = _fill_padding(advantages, mask)
    ratio = torch.exp(_fill_padding(logprobs - old_logprobs, mask))
    tau = torch.where(advantages > 0, torch.full_like(ratio, k.tau_pos), torch.full_like(ratio, k.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    losses = -(4.0 / tau) * gate * advantages
    grad_weight = (4.0 * gate * (1.0 - gate)).detach()
    return PolicyLossOutput(_fill_padding(losses, mask), ratio.detach(), (grad_weight < 0.5) & mask)


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
