"""TRPO's step (Schulman et al. 2015, "Trust Region Policy Optimization", appendix C), as pure
functions over closures so they know nothing of models:

1. g = grad of the surrogate L(theta) = -E[r_t A_t] at theta_old;
2. s ~= -F^{-1} g by conjugate gradient, F the Fisher matrix, used only through Fisher-vector
   products F v (the Hessian of the mean KL(pi_old || pi_theta) at theta_old, times v);
3. the largest step theta_old + beta * s with 0.5 * beta^2 s^T F s = max_kl, i.e.
   beta = sqrt(2 max_kl / s^T F s);
4. a backtracking line search over fractions 1, b, b^2, ... that accepts the first step whose
   surrogate improves on theta_old's and whose measured KL(old || new) <= max_kl; none = no step.

`trust_region_step` runs the four steps on a list of parameters, given closures that evaluate the
surrogate and the KL on the caller's batches; the RL stage supplies them for the policy loss that
declares `update="trust_region"`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


class TrustRegionResult(NamedTuple):
    """What one trust-region step did: the line search's result, the natural-gradient step size
    beta, and the surrogate before the step."""

    search: LineSearchResult
    step_size: float
    old_surrogate: float


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def assign_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    """Copy a flat vector into `params` in place. (torch's vector_to_parameters would make every
    parameter a view of one vector, which breaks tied weights and the safetensors export.)"""
    start = 0
    for p in params:
        p.copy_(vector[start:start + p.numel()].view_as(p))
        start += p.numel()


def trust_region_step(
    params: Sequence[Tensor],
    batches: Sequence[Any],
    surrogate_and_kl: Callable[[Any], tuple[Tensor, Tensor]],
    fisher_batches: Sequence[Any],
    fisher_kl: Callable[[Any], Tensor],
    max_kl: float,
    cg_iters: int = 10,
    damping: float = 0.1,
    backtrack: float = 0.5,
    max_tries: int = 10,
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
    double_backward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> TrustRegionResult:
    """One TRPO step on `params`, which it leaves at the accepted point (theta_old if rejected).

    surrogate_and_kl(batch) -> (surrogate, KL(old || theta)) of one of `batches` at the current
    parameters, each already weighted by its share of the whole (so the sums over batches, and
    `all_reduce` over ranks, are the totals); fisher_kl(batch) -> the KL whose Hessian at theta_old
    is the Fisher matrix, on `fisher_batches` (a subsample: CG's cost). `double_backward` is a
    context for the Fisher-vector products' second derivatives (kernels without one opt out).
    """
    params = list(params)

    def totals() -> tuple[float, float]:
        sums = torch.zeros(2, dtype=torch.float64, device=params[0].device)
        for batch in batches:
            s, kl = surrogate_and_kl(batch)
            sums += torch.stack([s.detach().double(), kl.detach().double()])
        s, kl = all_reduce(sums).tolist()
        return s, kl

    # 1. the surrogate's gradient at theta_old
    g = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for batch in batches:
        s, _ = surrogate_and_kl(batch)
        g += _flat(torch.autograd.grad(s, params))
    g = all_reduce(g)

    # 2. F v by double backward of the mean KL at theta_old
    def fvp(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        with double_backward():
            for batch in fisher_batches:
                grads = _flat(torch.autograd.grad(fisher_kl(batch), params, create_graph=True))
                out += _flat(torch.autograd.grad(grads @ v, params))
        return all_reduce(out)

    direction = conjugate_gradient(fvp, -g, cg_iters, damping)
    beta = max_step_size(direction, fvp(direction), max_kl)
    full_step = beta * direction
    theta_old = torch.cat([p.detach().reshape(-1) for p in params]).clone()

    @torch.no_grad()
    def evaluate(fraction: float) -> tuple[float, float]:
        assign_flat(params, theta_old + fraction * full_step)
        return totals()

    # 3.-4. the largest step on the quadratic KL bound, then the line search on the measured one
    with torch.no_grad():
        old_surrogate, _ = totals()
    result = backtracking_line_search(evaluate, old_surrogate, max_kl, backtrack, max_tries)
    assign_flat(params, theta_old + result.fraction * full_step)
    return TrustRegionResult(result, beta, old_surrogate)
