"""IS corrections and decoupled PPO, hand-computed on a 2 x 3 batch whose padding holds NaN."""

import math

import pytest
import torch

from ppo_rlhf.algo.losses import PolicyLossParams, ppo_clip_loss
from ppo_rlhf.algo.off_policy import IS_CORRECTIONS, importance_weights, is_corrected

NAN = float("nan")
MASK = torch.tensor([[True, True, True], [True, True, False]])
# rho = pi_prox / pi_behaviour = [[2, 0.5, 3], [4, 4, pad]]
PROX = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.8, 0.4, NAN]]))
BEHAVIOUR = torch.log(torch.tensor([[0.25, 0.4, 0.3], [0.2, 0.1, NAN]]))


def close(x, expected):
    return torch.allclose(x, torch.as_tensor(expected, dtype=x.dtype), atol=1e-6)


@pytest.mark.parametrize("mode,weights,mean,mx,changed", [
    ("none", [[1, 1, 1], [1, 1, 0]], 1.0, 1.0, 0.0),
    ("is", [[2, 0.5, 3], [4, 4, 0]], 13.5 / 5, 4.0, 0.0),
    # min(rho, 2.5): 3, 4 and 4 are truncated
    ("tis", [[2, 0.5, 2.5], [2.5, 2.5, 0]], 10 / 5, 2.5, 3 / 5),
    # outside [0.4, 2.5] -> 0
    ("mis", [[2, 0.5, 0], [0, 0, 0]], 2.5 / 5, 2.0, 3 / 5),
    # geometric means 3^(1/3) = 1.44 (kept) and 4 (dropped)
    ("seq_mask", [[1, 1, 1], [0, 0, 0]], 3 / 5, 1.0, 2 / 5),
])
def test_each_correction_by_hand(mode, weights, mean, mx, changed):
    out = importance_weights(PROX, BEHAVIOUR, MASK, mode, cap=2.5)
    assert close(out.weights, weights)
    assert close(out.stats.mean, mean) and close(out.stats.max, mx) and close(out.stats.clipped_frac, changed)


def test_a_huge_ratio_is_truncated_not_overflowed():
    prox, behaviour, mask = torch.tensor([[0.0]]), torch.tensor([[-1000.0]]), torch.tensor([[True]])
    assert importance_weights(prox, behaviour, mask, "tis", 2.0).weights.item() == 2.0
    assert importance_weights(prox, behaviour, mask, "mis", 2.0).weights.item() == 0.0


def test_decoupled_ppo_by_hand():
    # r = pi_theta / pi_prox = [[1.2, 0.5, 1], [1, 1, pad]]
    logprobs = torch.log(torch.tensor([[0.6, 0.1, 0.9], [0.8, 0.4, NAN]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, NAN]])
    clip = ppo_clip_loss(logprobs, PROX, advantages, MASK, PolicyLossParams(0.1, 0.1))
    losses, weights = is_corrected(clip.losses, PROX, BEHAVIOUR, MASK, "tis", 2.5)
    # t0: -2 * min(1.2, 1.1) * 1; t1: -0.5 * min(-0.5, -0.9); t2: -2.5 * 2; row 1: -2.5 * 0.5
    assert close(losses, [[-2.2, 0.45, -5.0], [-1.25, -1.25, 0.0]])
    assert clip.clipped.sum().item() == 2 and close(weights.stats.mean, 2.0)
    losses.sum().backward()
    # d/dlogp of -w A r is -w A r where unclipped; 0 where the clip is active; 0 at padding
    assert close(logprobs.grad, [[0.0, 0.0, -5.0], [-1.25, -1.25, 0.0]])


@pytest.mark.parametrize("mode", sorted(IS_CORRECTIONS))
def test_on_fresh_rows_every_weight_is_one_and_the_loss_is_ppo_clip(mode):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 6, generator=g) > 0.3
    behaviour = torch.where(mask, -torch.rand(4, 6, generator=g) * 3, NAN)
    prox = behaviour.clone()  # fresh rows: the proximal policy sampled them
    advantages = torch.where(mask, torch.randn(4, 6, generator=g), NAN)
    theta = torch.where(mask, behaviour + 0.3 * torch.randn(4, 6, generator=g), NAN)

    out = importance_weights(prox, behaviour, mask, mode, cap=1.5)
    assert torch.equal(out.weights, mask.float())
    assert out.stats.clipped_frac.item() == 0.0

    lp_a, lp_b = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    ours, _ = is_corrected(ppo_clip_loss(lp_a, prox, advantages, mask, PolicyLossParams(0.2, 0.28)).losses,
                           prox, behaviour, mask, mode, 1.5)
    ppo = ppo_clip_loss(lp_b, behaviour, advantages, mask, PolicyLossParams(0.2, 0.28)).losses
    assert torch.equal(ours, ppo)
    ours.sum().backward()
    ppo.sum().backward()
    assert torch.equal(lp_a.grad, lp_b.grad)
    assert not lp_a.grad.isnan().any()


def test_the_cap_must_make_a_band():
    with pytest.raises(ValueError, match="must be > 1"):
        importance_weights(PROX, BEHAVIOUR, MASK, "tis", cap=1.0)
    with pytest.raises(ValueError, match="unknown IS correction"):
        importance_weights(PROX, BEHAVIOUR, MASK, "vtrace", cap=2.0)
    assert math.isfinite(importance_weights(PROX, BEHAVIOUR, MASK, "is", cap=0.0).stats.mean.item())
