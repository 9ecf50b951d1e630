import math

import pytest
import torch

from ppo_rlhf.algo.kl import kl_penalty

# log r = ref - logprobs = [-0.5, 1.0]
LOGPROBS = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF_LOGPROBS = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", [0.5, -1.0]),  # -log r
        ("k2", [0.125, 0.5]),  # (log r)^2 / 2
        (
            "k3",
            [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1],
        ),  # (r - 1) - log r = 0.1065307, 0.7182818
    ],
)
def test_estimators_hand_computed(estimator, expected):
    kl = kl_penalty(LOGPROBS, REF_LOGPROBS, estimator)
    assert kl.shape == (1, 2)
    torch.testing.assert_close(kl, torch.tensor([expected], dtype=torch.float64))


def test_default_is_k1():
    torch.testing.assert_close(kl_penalty(LOGPROBS, REF_LOGPROBS), LOGPROBS - REF_LOGPROBS)


def test_unknown_estimator_lists_the_names():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(LOGPROBS, REF_LOGPROBS, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_when_policy_equals_reference(estimator):
    lp = torch.log_softmax(torch.randn(3, 5), dim=-1)
    assert torch.all(kl_penalty(lp, lp, estimator) == 0)


def test_k2_k3_are_nonnegative():
    gen = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(4, 7, generator=gen) * 5, -torch.rand(4, 7, generator=gen) * 5
    assert torch.all(kl_penalty(lp, ref, "k2") >= 0)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    """sum_x p(x) k(x) over the whole vocabulary equals KL(p || q) exactly for k1 and k3."""
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), dim=-1)
    logq = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), dim=-1)
    exact = (logp.exp() * (logp - logq)).sum()
    for estimator in ("k1", "k3"):
        expectation = (logp.exp() * kl_penalty(logp, logq, estimator)).sum()
        torch.testing.assert_close(expectation, exact)


def test_k3_keeps_precision_near_the_reference_in_float32():
    """For log r = 1e-4, k3 ~ (log r)^2 / 2 = 5e-9; exp(x) - 1 in float32 would lose it entirely."""
    lp = torch.tensor([-1.0])
    ref = lp + 1e-4
    log_r = float(ref.double() - lp.double())
    exact = math.expm1(log_r) - log_r
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(exact, rel=1e-2)
