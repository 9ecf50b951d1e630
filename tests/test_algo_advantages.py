import math

import numpy as np
import pytest
import torch

from ppo_rlhf.algo.advantages import (
    RunningMeanStd,
    compute_gae,
    compute_rewards,
    explained_variance,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

NAN = math.nan


# ---- masked reductions -------------------------------------------------------------------------


def test_masked_sum_mean_var_hand_computed_and_ignore_padding_garbage():
    x = torch.tensor([[1.0, 2.0, NAN], [3.0, math.inf, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_sum(x, mask).item() == 12.0
    assert masked_mean(x, mask).item() == 3.0
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 9.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([2.0, 2.0, 6.0]))
    # values 1, 2, 3, 6: mean 3, squared deviations 4, 1, 0, 9 -> biased 14/4, unbiased 14/3
    assert masked_var(x, mask).item() == pytest.approx(3.5)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(14 / 3)


def test_masked_reductions_accept_integer_masks():
    x = torch.tensor([1.0, 2.0, 4.0])
    assert masked_mean(x, torch.tensor([1, 0, 1])).item() == 2.5


def test_masked_mean_of_empty_mask_is_nan_and_unbiased_var_needs_two_values():
    x = torch.tensor([1.0, 2.0])
    assert math.isnan(masked_mean(x, torch.tensor([False, False])).item())
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([True, False]), unbiased=True)


# ---- whitening ---------------------------------------------------------------------------------

DESIGN_REWARDS = torch.tensor([[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]])
DESIGN_WHITENED_NO_SHIFT = torch.tensor(
    [[0.0508, 0.4381, 0.8254], [1.2127, 1.6000, 1.9873], [2.3746, 2.7619, 3.1492]]
)


def test_whiten_reproduces_design_check():
    mask = torch.ones(3, 3, dtype=torch.bool)
    out = masked_whiten(DESIGN_REWARDS, mask, shift_mean=False)
    torch.testing.assert_close(out, DESIGN_WHITENED_NO_SHIFT, atol=1e-4, rtol=0)


def test_whiten_shift_mean_gives_zero_mean_unit_biased_variance():
    mask = torch.ones(3, 3, dtype=torch.bool)
    out = masked_whiten(DESIGN_REWARDS, mask)
    # mean 1.6, biased variance 0.6 / 9 -> (x - 1.6) / 0.2582
    torch.testing.assert_close(out, DESIGN_WHITENED_NO_SHIFT - 1.6, atol=1e-4, rtol=0)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_whiten_uses_only_real_tokens_and_zeroes_padding():
    x = torch.tensor([[1.0, 3.0, NAN], [100.0, 5.0, -math.inf]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    out = masked_whiten(x, mask)
    # real values 1, 3, 5: mean 3, biased std sqrt(8/3)
    std = math.sqrt(8 / 3)
    expected = torch.tensor([[-2 / std, 0.0, 0.0], [0.0, 2 / std, 0.0]])
    torch.testing.assert_close(out, expected)


def test_whiten_with_precomputed_stats():
    x = torch.tensor([[2.0, 4.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    stats = (torch.tensor(1.0), torch.tensor(4.0))  # e.g. all-reduced over DDP ranks
    torch.testing.assert_close(masked_whiten(x, mask, stats=stats), torch.tensor([[0.5, 1.5]]))
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False, stats=stats), torch.tensor([[1.5, 2.5]])
    )


def test_whiten_all_masked_out_returns_zeros():
    out = masked_whiten(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 3))


# ---- rewards -----------------------------------------------------------------------------------


def test_last_token_index():
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert last_token_index(mask).tolist() == [1, 2, -1]


def _reward_case():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, NAN], [-0.5, -1.0, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    scores = torch.tensor([1.0, 2.0, 5.0])
    return scores, logprobs, ref_logprobs, mask


def test_compute_rewards_kl_per_token_and_score_at_last_real_token():
    scores, logprobs, ref_logprobs, mask = _reward_case()
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # k1 = logprobs - ref: row 0 [0.5, -1.0], row 1 [0, 0.5, -0.5]; row 2 has no real token.
    torch.testing.assert_close(
        kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.5, -0.5], [0.0, 0.0, 0.0]])
    )
    expected = torch.tensor(
        [
            [-0.05, 0.1 + 1.0, 0.0],  # score 1.0 at index 1, the last real token
            [0.0, -0.05, 0.05 + 2.0],  # score 2.0 at index 2
            [0.0, 0.0, 0.0],  # empty row: no score placed
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_compute_rewards_dense_scores_and_estimator():
    scores, logprobs, ref_logprobs, mask = _reward_case()
    dense = torch.tensor([[0.3, 0.2, 9.0], [0.1, 0.1, 0.1], [7.0, 7.0, 7.0]])
    rewards, kl = compute_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k2", dense_scores=dense
    )
    # k2 = (log r)^2 / 2: row 0 [0.125, 0.5], row 1 [0, 0.125, 0.125]
    torch.testing.assert_close(
        kl, torch.tensor([[0.125, 0.5, 0.0], [0.0, 0.125, 0.125], [0.0, 0.0, 0.0]])
    )
    expected = torch.tensor(
        [
            [-0.0125 + 0.3, -0.05 + 1.0 + 0.2, 0.0],
            [0.1, -0.0125 + 0.1, -0.0125 + 2.0 + 0.1],
            [0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_compute_rewards_sum_is_score_minus_beta_total_kl():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 4, 6, 3])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    logprobs, ref = -torch.rand(4, 6, generator=gen), -torch.rand(4, 6, generator=gen)
    scores = torch.randn(4, generator=gen)
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.05)
    torch.testing.assert_close(rewards.sum(1), scores - 0.05 * kl.sum(1))


# ---- GAE ---------------------------------------------------------------------------------------


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: t2 = 1 - 0.3 = 0.7, t1 = 0.3 - 0.4 = -0.1, t0 = 0.4 - 0.5 = -0.1
    # A2 = 0.7, A1 = -0.1 + 0.95 * 0.7 = 0.565, A0 = -0.1 + 0.95 * 0.565 = 0.43675
    torch.testing.assert_close(adv, torch.tensor([[0.43675, 0.565, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.93675, 0.965, 1.0]], dtype=torch.float64))
    # gamma = lam = 1: returns are the undiscounted rewards-to-go.
    _, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64))


def test_gae_episode_ends_at_last_real_token():
    rewards = torch.tensor([[2.0, 0.0, 50.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.5, NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t1: delta = 0 + 0.9 * 0 - 0.5 = -0.5 (V after the last real token is 0), A1 = -0.5
    # t0: delta = 2 + 0.9 * 0.5 - 1 = 1.45, A0 = 1.45 + 0.45 * -0.5 = 1.225
    torch.testing.assert_close(adv, torch.tensor([[1.225, -0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.225, 0.0, 0.0]], dtype=torch.float64))


def _gae_reference_loop(rewards, values, lengths, gamma, lam):
    """Plain per-row Python loop, straight from the formula."""
    batch, length = rewards.shape
    adv = [[0.0] * length for _ in range(batch)]
    ret = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        n = int(lengths[b])
        last_gae = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last_gae = delta + gamma * lam * last_gae
            adv[b][t] = last_gae
            ret[b][t] = last_gae + float(values[b, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_vectorised_matches_python_loop(gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length = 9, 11
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0], lengths[1] = 0, length  # always include an empty and a full row
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    # Garbage past the mask must not leak into anything.
    rewards = rewards.masked_fill(~mask, math.nan)
    values = values.masked_fill(~mask, math.inf)

    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


# ---- explained variance ------------------------------------------------------------------------


def test_explained_variance_hand_computed():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, NAN, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # returns 1..4: Var = 1.25; residual [0, 0, 0, -1]: Var = 0.1875 -> 1 - 0.15 = 0.85
    assert explained_variance(values, returns, mask) == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)


def test_explained_variance_is_nan_for_constant_returns():
    returns = torch.full((2, 3), 2.0)
    assert math.isnan(
        explained_variance(torch.randn(2, 3), returns, torch.ones(2, 3, dtype=torch.bool))
    )


# ---- running mean / std ------------------------------------------------------------------------


def test_running_mean_std_matches_numpy_on_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 64, 3, 250)]
    rms = RunningMeanStd()
    for batch in batches:
        rms.update(torch.tensor(batch, dtype=torch.float32))
    everything = np.concatenate([b.astype(np.float32) for b in batches]).astype(np.float64)
    assert rms.count == everything.size
    assert rms.mean == pytest.approx(everything.mean(), rel=1e-10)
    assert rms.var == pytest.approx(everything.var(), rel=1e-10)
    assert rms.std == pytest.approx(everything.std(), rel=1e-10)


def test_running_mean_std_update_from_moments_equals_update():
    x1, x2 = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([[4.0, 0.0], [5.0, 3.0]])
    direct, from_moments = RunningMeanStd(), RunningMeanStd()
    for x in (x1, x2):
        direct.update(x)
        from_moments.update_from_moments(x.mean(), x.var(unbiased=False), torch.tensor(x.numel()))
    assert direct.state_dict() == pytest.approx(from_moments.state_dict())
    # values 1, 2, 6, 4, 0, 5, 3: mean 3, biased var 28 / 7 = 4
    assert (direct.mean, direct.var, direct.count) == (pytest.approx(3.0), pytest.approx(4.0), 7)


def test_running_mean_std_normalize_and_clip():
    rms = RunningMeanStd()
    x = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(rms.normalize(x), x)  # no data yet: identity
    rms.update(torch.tensor([1.0, 3.0]))  # mean 2, var 1
    torch.testing.assert_close(
        rms.normalize(torch.tensor([2.0, 4.0, 12.0])), torch.tensor([0.0, 2.0, 10.0])
    )
    torch.testing.assert_close(
        rms.normalize(torch.tensor([2.0, 4.0, -12.0]), clip=3.0), torch.tensor([0.0, 2.0, -3.0])
    )


def test_running_mean_std_empty_update_is_a_no_op_and_state_round_trips():
    rms = RunningMeanStd()
    rms.update(torch.tensor([]))
    assert rms.count == 0
    rms.update(torch.tensor([1.0, 5.0, 9.0]))
    restored = RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    assert restored.state_dict() == rms.state_dict()
    rms.update(torch.tensor([2.0]))
    restored.update(torch.tensor([2.0]))
    assert restored.state_dict() == rms.state_dict()
