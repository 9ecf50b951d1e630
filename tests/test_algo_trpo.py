"""TRPO's conjugate gradient, step size and line search on small known problems."""

import math

import pytest
import torch

from ppo_rlhf.algo.trpo import backtracking_line_search, conjugate_gradient, max_step_size


def test_conjugate_gradient_solves_a_damped_spd_system():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    fisher = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = conjugate_gradient(lambda v: fisher @ v, b, iters=20, damping=0.1)
    torch.testing.assert_close(x, torch.linalg.solve(fisher + 0.1 * torch.eye(6, dtype=torch.float64), b))


def test_conjugate_gradient_is_exact_in_n_steps_on_a_diagonal_system():
    fisher = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: fisher @ v, b, iters=3, damping=0.0)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def test_max_step_size_puts_the_quadratic_kl_on_the_bound():
    s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fisher = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    beta = max_step_size(s, fisher @ s, max_kl=0.01)  # s^T F s = 6
    assert beta == pytest.approx(math.sqrt(2 * 0.01 / 6))
    assert 0.5 * beta**2 * float(s @ fisher @ s) == pytest.approx(0.01)
    assert max_step_size(s, torch.zeros(2, dtype=torch.float64), 0.01) == 0.0


def test_line_search_backtracks_until_the_kl_and_the_surrogate_are_both_fine():
    seen = []

    def evaluate(f):  # surrogate improves linearly; KL grows as 0.05 f^2: the bound 0.01 needs f <= 0.447
        seen.append(f)
        return -f, 0.05 * f * f

    res = backtracking_line_search(evaluate, 0.0, max_kl=0.01, backtrack=0.5, max_tries=10)
    assert seen == [1.0, 0.5, 0.25] and res.fraction == 0.25 and res.tries == 3
    assert res.kl == pytest.approx(0.05 * 0.25**2) and res.surrogate == -0.25


def test_line_search_rejects_a_step_that_never_improves():
    res = backtracking_line_search(lambda f: (1.0 + f, 0.0), 1.0, max_kl=0.01, max_tries=4)
    assert res.fraction == 0.0 and res.tries == 4 and res.kl == 0.0
