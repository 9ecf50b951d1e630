"""The registered policy losses and loss aggregations on hand-computed tensors."""

import math

import pytest
import torch

from ppo_rlhf.algo.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    CISPOKnobs,
    PolicyLossParams,
    SAPOKnobs,
    register_policy_loss,
)

T = torch.tensor


def lp_from_ratios(ratios, old=-1.0):
    old_lp = torch.full((1, len(ratios)), old, dtype=torch.float64)
    return (old_lp + T([ratios], dtype=torch.float64).log()).requires_grad_(), old_lp


def test_an_unknown_update_kind_is_refused_at_registration():
    with pytest.raises(ValueError, match="update='trust-region' is not one of"):
        register_policy_loss("typo_loss", update="trust-region")
    assert "typo_loss" not in POLICY_LOSSES


def test_cispo_clips_and_detaches_the_is_weight_hand_computed():
    # weight = sg(clip(r, 0, 2)): r 3 -> 2 (capped), r 0.5 -> 0.5, r 1 -> 1.
    # L = -w * A * log pi; d L / d log pi = -w * A (every token keeps a gradient, capped or not)
    lp, old = lp_from_ratios([3.0, 0.5, 1.0])
    adv = T([[1.0, -2.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = POLICY_LOSSES["cispo"].fn(lp, old, adv, mask, PolicyLossParams(knobs=CISPOKnobs(weight_max=2.0)))
    logp = lp.detach()
    torch.testing.assert_close(out.losses, -T([[2.0, 0.5 * -2.0, 0.5]], dtype=torch.float64) * logp)
    assert out.clipped.tolist() == [[True, False, False]]
    out.losses.sum().backward()
    torch.testing.assert_close(lp.grad, T([[-2.0, 1.0, -0.5]], dtype=torch.float64))


def test_cispo_on_fresh_data_is_the_reinforce_gradient():
    lp = T([[-0.7, -1.2]], dtype=torch.float64, requires_grad=True)
    adv = T([[0.3, -0.4]], dtype=torch.float64)
    out = POLICY_LOSSES["cispo"].fn(lp, lp.detach(), adv, torch.ones(1, 2, dtype=torch.bool), PolicyLossParams())
    out.losses.sum().backward()
    torch.testing.assert_close(lp.grad, -adv)


def test_sapo_soft_gate_hand_computed():
    # f(r) = 4/tau * sigmoid(tau (r - 1)); tau_pos = 2 on A > 0, tau_neg = 4 on A <= 0.
    # r 1, A 1: f = 4/2 * 0.5 = 1, L = -1, dL/dlogp = -A * r * f'(r) = -(4 s (1-s)) = -1.
    # r 1.5, A -1: x = 4 * 0.5 = 2, s = sigmoid(2); L = +4/4 * s; dL/dlogp = r * 4 s (1-s) * 1.
    lp, old = lp_from_ratios([1.0, 1.5])
    adv = T([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = POLICY_LOSSES["sapo"].fn(lp, old, adv, mask, PolicyLossParams(knobs=SAPOKnobs(tau_pos=2.0, tau_neg=4.0)))
    s2 = 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(out.losses, T([[-1.0, s2]], dtype=torch.float64))
    out.losses.sum().backward()
    torch.testing.assert_close(lp.grad, T([[-1.0, 1.5 * 4 * s2 * (1 - s2)]], dtype=torch.float64))
    # the gradient weight 4 s (1 - s) at r 1.5 on the negative side is 0.42 < 1/2: counted as clipped
    assert out.clipped.tolist() == [[False, True]]


def test_ppo_clip_asymmetric_range_hand_computed():
    # clip range [1 - 0.2, 1 + 0.3]:
    #   r 1.5, A +1: -1.5 vs -1.3 -> -1.3 (clipped);  r 0.5, A -1: 0.5 vs 0.8 -> 0.8 (clipped)
    #   r 1.1, A +1: -1.1 (inside);  r 1.25, A +1: -1.25 (inside the high side only)
    lp, old = lp_from_ratios([1.5, 0.5, 1.1, 1.25])
    adv = T([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = POLICY_LOSSES["ppo_clip"].fn(lp, old, adv, mask, PolicyLossParams(0.2, 0.3))
    torch.testing.assert_close(out.losses, T([[-1.3, 0.8, -1.1, -1.25]], dtype=torch.float64))
    assert out.clipped.tolist() == [[True, True, False, False]]
    out.losses.sum().backward()
    # d(-A r)/d log p = -A r on unclipped tokens, 0 on clipped ones
    torch.testing.assert_close(lp.grad, T([[0.0, 0.0, -1.1, -1.25]], dtype=torch.float64))


def test_dual_clip_bounds_negative_advantage_losses_by_c():
    # r 5, A -1: PPO-clip gives max(5, 1.2) = 5; dual-clip caps it at -c*A = 3 (zero gradient)
    # r 0.5, A -1: 0.8 (below c); r 5, A +1: -1.2 (positive advantages are untouched)
    lp, old = lp_from_ratios([5.0, 0.5, 5.0])
    adv = T([[-1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = POLICY_LOSSES["dual_clip"].fn(lp, old, adv, mask, PolicyLossParams(0.2, 0.2, 3.0))
    torch.testing.assert_close(out.losses, T([[3.0, 0.8, -1.2]], dtype=torch.float64))
    assert out.clipped.tolist() == [[True, True, True]]
    ppo = POLICY_LOSSES["ppo_clip"].fn(lp, old, adv, mask, PolicyLossParams(0.2, 0.2))
    assert ppo.losses[0, 0].item() == pytest.approx(5.0)


def test_gspo_uses_one_sequence_ratio_and_token_gradients():
    # token log-ratios log 2 and 0: the sequence ratio is exp(log 2 / 2) = sqrt 2 for both tokens
    lp, old = lp_from_ratios([2.0, 1.0])
    adv = T([[1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    wide = PolicyLossParams(10.0, 10.0)  # no clipping
    out = POLICY_LOSSES["gspo"].fn(lp, old, adv, mask, wide)
    torch.testing.assert_close(out.ratio, torch.full((1, 2), math.sqrt(2), dtype=torch.float64))
    out.losses.sum().backward()
    # value s_i, gradient s_i * d log pi(a_t): d(-A s_it)/d log p_t = -A s_i for each token
    torch.testing.assert_close(lp.grad, torch.full((1, 2), -math.sqrt(2), dtype=torch.float64))
    clipped = POLICY_LOSSES["gspo"].fn(lp.detach(), old, adv, mask, PolicyLossParams(0.2, 0.2))
    torch.testing.assert_close(clipped.losses, torch.full((1, 2), -1.2, dtype=torch.float64))


def test_trpo_surrogate_is_unclipped():
    lp, old = lp_from_ratios([3.0, 0.1])
    out = POLICY_LOSSES["trpo"].fn(lp, old, T([[1.0, -2.0]], dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool),
                                   PolicyLossParams())
    torch.testing.assert_close(out.losses, T([[-3.0, 0.2]], dtype=torch.float64))


def test_padding_never_reaches_the_losses():
    lp = T([[-1.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    old = T([[-1.0, float("-inf")]], dtype=torch.float64)
    adv = T([[1.0, float("inf")]], dtype=torch.float64)
    mask = T([[True, False]])
    for name, loss in POLICY_LOSSES.items():
        if loss.update not in ("gradient", "trust_region"):  # another kind's fn has its own signature
            continue
        out = loss.fn(lp, old, adv, mask, PolicyLossParams())
        assert torch.isfinite(out.losses).all() and out.losses[0, 1] == 0, name
        lp.grad = None
        out.losses.sum().backward()
        assert torch.isfinite(lp.grad).all(), name


# ---- aggregation --------------------------------------------------------------------------------
# token losses [[1, 2, pad], [3, pad, pad]]:
#   token-mean (1 + 2 + 3) / 3 = 2;  seq-mean-token-sum (3 + 3) / 2 = 3
#   seq-mean-token-mean (1.5 + 3) / 2 = 2.25;  seq-mean-token-sum-norm, L = 4: (3/4 + 3/4) / 2 = 0.75
LOSSES = T([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
MASK = T([[True, True, False], [True, False, False]])


@pytest.mark.parametrize("name,expected", [("token-mean", 2.0), ("seq-mean-token-sum", 3.0),
                                           ("seq-mean-token-mean", 2.25), ("seq-mean-token-sum-norm", 0.75)])
def test_aggregations_hand_computed(name, expected):
    w = AGGREGATIONS[name](MASK, 4)
    assert (w * LOSSES).sum().item() == pytest.approx(expected)
    assert (w[~MASK] == 0).all()


@pytest.mark.parametrize("name", list(AGGREGATIONS))
def test_aggregation_weights_of_a_minibatch_split_into_parts_add_up(name):
    torch.manual_seed(0)
    mask = torch.arange(7)[None] < torch.randint(0, 8, (10, 1))
    losses = torch.randn(10, 7)
    w = AGGREGATIONS[name](mask, 7)
    whole = (w * losses).sum()
    parts = sum((w[idx] * losses[idx]).sum() for idx in torch.arange(10).tensor_split(3))
    torch.testing.assert_close(parts, whole)
