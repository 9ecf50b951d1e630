import math

import pytest
import torch

from ppo_rlhf.algo.losses import (
    PolicyLossParams,
    entropy_from_logits,
    lm_loss,
    pairwise_rm_loss,
    ppo_clip_loss,
    token_mean_weights,
    value_loss,
)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """PPO-clip aggregated by token-mean, with the stats the RL stage logs."""
    out = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, PolicyLossParams(clip_eps, clip_eps))
    w = token_mean_weights(mask, 0).to(out.losses.dtype)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0).detach()
    stats = {"clipfrac": float((w * out.clipped).sum()),
             "approx_kl": float((w * (torch.expm1(log_ratio) - log_ratio)).sum()),
             "ratio_mean": float((w * out.ratio).sum()),
             "ratio_max": float(torch.where(mask, out.ratio, -math.inf).max())}
    return (w * out.losses).sum(), stats

# ---- policy loss -------------------------------------------------------------------------------
# Five real tokens (row 1 is padded at the end) with eps = 0.2:
#   ratio 1.5, A = +1: -1.5 vs clipped -1.2 -> -1.2, clipped branch active
#   ratio 0.5, A = -1:  0.5 vs clipped  0.8 ->  0.8, clipped branch active
#   ratio 1.1, A = -1:  1.1 vs          1.1 ->  1.1
#   ratio 0.9, A = +2: -1.8 vs         -1.8 -> -1.8
#   ratio 1.5, A = -1:  1.5 vs clipped  1.2 ->  1.5, outside the range but unclipped term wins
# loss = (-1.2 + 0.8 + 1.1 - 1.8 + 1.5) / 5 = 0.08, clipfrac = 2 / 5
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.9, 1.5, 1.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([[1.0, -1.0, -1.0], [2.0, -1.0, math.nan]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])


def _policy_inputs():
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -math.inf]], dtype=torch.float64)
    logprobs = (old_logprobs + RATIOS.log()).masked_fill(~MASK, -math.inf).requires_grad_()
    return logprobs, old_logprobs


def test_policy_loss_hand_computed():
    logprobs, old_logprobs = _policy_inputs()
    loss, stats = policy_loss(logprobs, old_logprobs, ADVANTAGES, MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.08)
    assert stats["clipfrac"] == pytest.approx(0.4)
    # mean of (r - 1) - log r over the five ratios
    assert stats["approx_kl"] == pytest.approx(0.07845346003942359)
    assert stats["ratio_mean"] == pytest.approx(1.1)
    assert stats["ratio_max"] == pytest.approx(1.5)
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_gradient_is_zero_on_clipped_tokens_and_padding():
    logprobs, old_logprobs = _policy_inputs()
    loss, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES, MASK, clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A * ratio / 5 is -A * ratio / 5 on unclipped tokens; clipped tokens and the
    # padded token (logprob -inf, advantage NaN) get exactly zero.
    expected = torch.tensor([[0.0, 0.0, 1.1 / 5], [-1.8 / 5, 1.5 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    adv = torch.tensor([[0.5, -2.0, 3.0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, stats = policy_loss(lp, lp, adv, torch.ones(1, 3, dtype=torch.bool), clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.5)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == 1.0


# ---- value loss --------------------------------------------------------------------------------
# eps = 0.2, returns 1.0 everywhere:
#   V 1.0, V_old 0.5: unclipped 0, clipped V = 0.7 -> 0.09; max 0.09, clipped term active
#   V 2.0, V_old 2.1: change inside the range, both 1.0
#   V 0.0, V_old 0.5: unclipped 1.0, clipped V = 0.3 -> 0.49; max 1.0
# loss = 0.5 * (0.09 + 1 + 1) / 3, clipfrac = 1 / 3


def _value_inputs():
    values = torch.tensor([[1.0, 2.0, 0.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.5, 2.1, 0.5, math.nan]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 1.0, math.inf]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    return values, old_values, returns, mask


def test_value_loss_clipped_hand_computed_and_gradient():
    values, old_values, returns, mask = _value_inputs()
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.09 / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # Token 0: the clipped term wins and is constant in V -> zero gradient. Others: (V - R) / 3.
    expected = torch.tensor([[0.0, 1.0 / 3, -1.0 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected)


def test_value_loss_unclipped():
    values, old_values, returns, mask = _value_inputs()
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * (0 + 1 + 1) / 3)
    assert clipfrac.item() == 0.0


def test_value_loss_with_weights_sums_to_the_masked_mean():
    values, old_values, returns, mask = _value_inputs()
    w = token_mean_weights(mask, 0).double()
    mean, clip_mean = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # the weights of the first two tokens and of the third, summed, give the same loss
    a, ca = value_loss(values, old_values, returns, mask, clip_eps=0.2, weights=w * torch.tensor([[1, 1, 0, 0]]))
    b, cb = value_loss(values, old_values, returns, mask, clip_eps=0.2, weights=w * torch.tensor([[0, 0, 1, 0]]))
    assert (a + b).item() == pytest.approx(mean.item()) and (ca + cb).item() == pytest.approx(clip_mean.item())


# ---- entropy -----------------------------------------------------------------------------------


def test_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]])
    # uniform over 4 -> ln 4; p = [0.25, 0.75] -> 0.5623351
    torch.testing.assert_close(
        entropy_from_logits(logits), torch.tensor([math.log(4.0), 0.5623351446188083])
    )


def test_entropy_is_stable_for_huge_logits_and_finite_gradient_with_minus_inf():
    logits = torch.tensor([1000.0, 1000.0 + math.log(3.0), -math.inf], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(0.5623351, rel=1e-4)
    h.backward()
    assert torch.all(torch.isfinite(logits.grad)) and logits.grad[2] == 0


def test_entropy_matches_torch_categorical():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)


# ---- language-model loss -----------------------------------------------------------------------


def test_lm_loss_hand_computed_ignores_padding_labels():
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [5.0, -5.0, 1.0]]]
    )  # uniform -> ln 3; p = [0.25, 0.5, 0.25] at label 1 -> ln 2; third position is padding
    labels = torch.tensor([[2, 1, -100]])
    mask = torch.tensor([[True, True, False]])
    assert lm_loss(logits, labels, mask).item() == pytest.approx(
        (math.log(3.0) + math.log(2.0)) / 2
    )


def test_lm_loss_matches_cross_entropy_on_full_mask():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 4, 7, generator=gen), torch.randint(0, 7, (2, 4), generator=gen)
    expected = torch.nn.functional.cross_entropy(logits.reshape(8, 7), labels.reshape(8))
    torch.testing.assert_close(
        lm_loss(logits, labels, torch.ones(2, 4, dtype=torch.bool)), expected
    )


# ---- reward-model loss -------------------------------------------------------------------------


def test_pairwise_rm_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, accuracy = pairwise_rm_loss(chosen, rejected)
    # (ln(1 + e^-2) + ln(1 + e^1)) / 2
    assert loss.item() == pytest.approx(0.7200948492805976)
    assert accuracy == 0.5 and isinstance(accuracy, float)
    loss, _ = pairwise_rm_loss(chosen, rejected, margin=1.0)
    # (ln(1 + e^-1) + ln(1 + e^2)) / 2
    assert loss.item() == pytest.approx(1.2200948492805979)
    loss, _ = pairwise_rm_loss(chosen, rejected, margin=torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(1.2200948492805979)


def test_pairwise_rm_loss_is_stable_and_has_the_right_gradient():
    chosen = torch.tensor([-1000.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1000.0, 0.0], requires_grad=True)
    loss, accuracy = pairwise_rm_loss(chosen, rejected)
    assert loss.item() == pytest.approx((2000.0 + math.log(2.0)) / 2)
    assert accuracy == 0.0
    loss.backward()
    # d/dchosen of -log sigmoid(d) / B is -(1 - sigmoid(d)) / B: -1/2 and -1/4
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5, -0.25]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5, 0.25]))
