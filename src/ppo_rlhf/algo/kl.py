"""Per-token estimators of KL(pi || ref) from the log-probs of the sampled tokens.

With log r = ref_logprobs - logprobs and tokens sampled from pi (Schulman, "Approximating KL
divergence", 2020):

- k1 = -log r                 unbiased, high variance, can be negative per token;
- k2 = (log r)^2 / 2          biased, low variance, always >= 0;
- k3 = (r - 1) - log r        unbiased, low variance, always >= 0.

All estimators take `(logprobs, ref_logprobs)` of shape (B, R) and return (B, R), so they can be
registered by name in `KL_ESTIMATORS` and chosen from the config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logprobs - ref_logprobs, shape (B, R)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (ref_logprobs - logprobs)^2, shape (B, R)."""
    return 0.5 * (ref_logprobs - logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with log r = ref_logprobs - logprobs, shape (B, R)."""
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps precision when r is close to 1, which is the usual case near the reference.
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) estimate, shape (B, R), using the estimator named `estimator`.

    `logprobs` are the policy's log-probs of the sampled tokens, `ref_logprobs` the reference
    model's, both (B, R). Padded positions are not masked here; callers mask the result.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        names = ", ".join(sorted(KL_ESTIMATORS))
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of: {names}") from None
    return fn(logprobs, ref_logprobs)
