"""Importance-sampling corrections for off-policy (replayed or asynchronously sampled) rows, and
decoupled PPO.

Three policies meet in an off-policy update:

- pi_behaviour, which sampled the row (its log-probs were stored at rollout time, maybe several
  policy versions ago, maybe by an inference engine whose numerics differ from the trainer's);
- pi_prox, the proximal policy the update should stay close to: the policy at the start of this
  iteration's update, its log-probs recomputed without gradient for the replayed rows;
- pi_theta, the policy being optimised (carries the gradient).

Per token, rho_t = pi_prox(a_t|s_t) / pi_behaviour(a_t|s_t) corrects for the rows not having been
sampled by pi_prox. Unbounded, rho_t has unbounded variance; the corrections bound it:

| mode       | weight w_t                                               | function             |
|------------|----------------------------------------------------------|----------------------|
| "none"     | 1 (no correction: biased towards pi_behaviour)           | `no_is`              |
| "is"       | rho_t                                                    | `plain_is`           |
| "tis"      | min(rho_t, C)  (truncated IS)                            | `truncated_is`       |
| "mis"      | rho_t if 1/C <= rho_t <= C else 0  (masked IS)           | `masked_is`          |
| "seq_mask" | 1 if 1/C <= exp(mean_t log rho_t) <= C else 0, per row   | `sequence_masked_is` |

Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization") clips the
policy ratio around pi_prox instead of pi_behaviour and corrects with w_t (detached):

    L_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = pi_theta / pi_prox

(`is_corrected` over any registered loss computed around pi_prox; the RL stage's
`policy_objective`). On fresh rows pi_behaviour == pi_prox, so every w_t is exactly 1 and L_t is
the loss itself: the correction costs nothing on-policy.

All inputs are (B, R) response-aligned log-probs with `mask` True at the tokens the loss sees;
padding may hold inf/NaN (it is replaced before any arithmetic). Weights are detached and 0 at
padding; stats are 0-d detached tensors over the real tokens (one host sync when logged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class ISStats(NamedTuple):
    """The weights over the real tokens: mean, max, and the fraction of tokens whose weight a
    correction changed (truncated to C, or masked to 0)."""

    mean: Tensor
    max: Tensor
    clipped_frac: Tensor


class ISOutput(NamedTuple):
    """weights (B, R), detached, 0 at padding; their stats."""

    weights: Tensor
    stats: ISStats


def _log_rho(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not a product with the mask: padded log-probs may be inf or NaN.
    return torch.where(mask, (prox_logprobs - behaviour_logprobs).detach(), 0.0)


def _output(weights: Tensor, changed: Tensor, mask: Tensor) -> ISOutput:
    weights = torch.where(mask, weights, 0.0).detach()
    n = mask.sum().clamp(min=1)
    # weights are >= 0, so 0 at padding cannot be the max of a non-empty mask
    stats = ISStats(weights.sum() / n, weights.amax() if weights.numel() else weights.sum(),
                    (changed & mask).sum() / n)
    return ISOutput(weights, stats)


def no_is(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> ISOutput:
    """w_t = 1: no correction (the rows are treated as if pi_prox had sampled them)."""
    mask = mask.bool()
    return _output(torch.ones(mask.shape, device=mask.device), torch.zeros_like(mask), mask)


def plain_is(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> ISOutput:
    """w_t = rho_t = pi_prox / pi_behaviour, unbounded (`cap` unused)."""
    mask = mask.bool()
    return _output(torch.exp(_log_rho(prox_logprobs, behaviour_logprobs, mask)), torch.zeros_like(mask), mask)


def truncated_is(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> ISOutput:
    """Truncated IS, w_t = min(rho_t, C): bounded variance, biased only where rho_t > C."""
    mask = mask.bool()
    log_rho = _log_rho(prox_logprobs, behaviour_logprobs, mask)
    # compared in log space: exp(log_rho) may overflow to inf, log(C) cannot
    over = log_rho > math.log(cap)
    return _output(torch.where(over, cap, torch.exp(log_rho)), over, mask)


def masked_is(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> ISOutput:
    """Masked IS, w_t = rho_t on tokens with 1/C <= rho_t <= C and 0 elsewhere: a token the two
    policies disagree on too much is dropped rather than down-weighted."""
    mask = mask.bool()
    log_rho = _log_rho(prox_logprobs, behaviour_logprobs, mask)
    out = log_rho.abs() > math.log(cap)
    return _output(torch.where(out, 0.0, torch.exp(log_rho)), out, mask)


def sequence_masked_is(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> ISOutput:
    """Sequence-level masking: w_t = 1 on rows whose geometric-mean ratio
    exp(mean_t log rho_t) lies in [1/C, C], 0 on every token of the other rows (a response the
    behaviour policy sampled far from pi_prox is dropped whole)."""
    mask = mask.bool()
    log_rho = _log_rho(prox_logprobs, behaviour_logprobs, mask)
    seq_log_rho = log_rho.sum(1) / mask.sum(1).clamp(min=1)
    dropped = (seq_log_rho.abs() > math.log(cap))[:, None].expand_as(mask)
    return _output(torch.where(dropped, 0.0, 1.0), dropped, mask)


IS_CORRECTIONS: dict[str, Callable[[Tensor, Tensor, Tensor, float], ISOutput]] = {
    "none": no_is,
    "is": plain_is,
    "tis": truncated_is,
    "mis": masked_is,
    "seq_mask": sequence_masked_is,
}


def importance_weights(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str,
                       cap: float) -> ISOutput:
    """The correction named `mode` (`IS_CORRECTIONS`) with cap C = `cap` (> 1)."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown IS correction {mode!r}; choose one of {', '.join(IS_CORRECTIONS)}")
    if mode != "none" and mode != "is" and not cap > 1.0:
        raise ValueError(f"the IS cap C must be > 1 (the band is [1/C, C]); got {cap}")
    return IS_CORRECTIONS[mode](prox_logprobs, behaviour_logprobs, mask, cap)


def is_corrected(token_losses: Tensor, prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                 mode: str, cap: float) -> tuple[Tensor, ISOutput]:
    """(w_t * L_t (B, R), the weights): any per-token policy loss L_t computed around pi_prox, made
    off-policy-correct by the detached weight `mode` of pi_prox / pi_behaviour. With
    L_t = ppo_clip_loss(logprobs, prox_logprobs, ...) this is decoupled PPO (Hilton et al. 2021):
    the clip around pi_prox, the behaviour policy corrected by w_t. On fresh rows w_t = 1 exactly."""
    out = importance_weights(prox_logprobs, behaviour_logprobs, mask, mode, cap)
    return out.weights * token_losses, out
