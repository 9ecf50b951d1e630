"""TRPO's step (Schulman et al. 2015, "Trust Region Policy Optimization", appendix C), as pure
functions over closures so they know nothing of models:

1. g = grad of the surrogate L(theta) = -E[r_t A_t] at theta_old;
2. s ~= -F^{-1} g by conjugate gradient, F the Fisher matrix, used only through Fisher-vector
   products F v (the Hessian of the mean KL(pi_old || pi_theta) at theta_old, times v);
3. the largest step theta_old + beta * s with 0.5 * beta^2 s^T F s = max_kl, i.e.
   beta = sqrt(2 max_kl / s^T F s);
4. a backtracking line search over fractions 1, b, b^2, ... that accepts the first step whose
   surrogate improves on theta_old's and whose measured KL(old || new) <= max_kl; none = no step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       damping: float = 0.1, residual_tol: float = 1e-10) -> Tensor:
    """Solve (F + damping * I) x = b for x, using only products F v (`fvp`); b is a flat vector.

    Damping keeps the solve well-posed where the Fisher matrix is (near) singular, as it is for
    an over-parametrised network.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr <= residual_tol:
            break
        ap = fvp(p) + damping * p
        alpha = rr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def max_step_size(direction: Tensor, fisher_direction: Tensor, max_kl: float) -> float:
    """beta with 0.5 * beta^2 * s^T F s = max_kl (the quadratic model of the KL hits the bound)."""
    shs = float(direction.dot(fisher_direction))
    if not shs > 0:
        return 0.0
    return math.sqrt(2.0 * max_kl / shs)


class LineSearchResult(NamedTuple):
    """fraction: the accepted fraction of the full step (0 = rejected, no step); surrogate and kl:
    the surrogate loss and KL(old || new) at the accepted point (the old point's when rejected);
    tries: how many points were evaluated."""

    fraction: float
    surrogate: float
    kl: float
    tries: int


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], old_surrogate: float,
                             max_kl: float, backtrack: float = 0.5, max_tries: int = 10) -> LineSearchResult:
    """Try fractions 1, backtrack, backtrack^2, ... of the full step; `evaluate(fraction)` moves
    the parameters there and returns (surrogate loss, KL(old || new)). The first fraction with a
    lower surrogate and KL <= max_kl is accepted (the caller leaves the parameters there); if none
    is, the result has fraction 0 and the caller restores the old parameters.
    """
    fraction = 1.0
    for tries in range(1, max_tries + 1):
        surrogate, kl = evaluate(fraction)
        if math.isfinite(surrogate) and surrogate < old_surrogate and kl <= max_kl:
            return LineSearchResult(fraction, surrogate, kl, tries)
        fraction *= backtrack
    return LineSearchResult(0.0, old_surrogate, 0.0, max_tries)
