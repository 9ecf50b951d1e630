"""The registered advantage estimators on hand-computed batches, and against plain loops."""

import math

import pytest
import torch

from ppo_rlhf.algo.advantages import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageParams,
    compute_gae,
    group_moments,
    returns_to_go,
)

T = torch.tensor


def inputs(rewards, mask=None, scores=None, groups=None, values=None, baselines=None):
    rewards = T(rewards, dtype=torch.float32)
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else T(mask, dtype=torch.bool)
    scores = rewards.sum(1) if scores is None else T(scores, dtype=torch.float32)
    groups = torch.zeros(len(rewards), dtype=torch.long) if groups is None else T(groups)
    return AdvantageInputs(rewards, mask, scores, groups,
                           None if values is None else T(values, dtype=torch.float32),
                           None if baselines is None else T(baselines, dtype=torch.float32))


def test_every_estimator_is_registered_with_its_needs():
    assert ADVANTAGES["gae"].needs_values and not ADVANTAGES["grpo"].needs_values
    assert ADVANTAGES["grpo"].needs_groups and ADVANTAGES["rloo"].needs_groups
    assert ADVANTAGES["remax"].baseline == "greedy" and not ADVANTAGES["reinforce++"].needs_groups


def test_grpo_hand_computed_group_normalised_returns():
    # group 0: returns 1 and 0 (mean .5, unbiased std .7071); group 1: 2 and 2 (std 0 -> 0 / eps = 0)
    x = inputs([[0.0, 1.0], [0.0, 0.0], [0.0, 2.0], [1.0, 1.0]], groups=[0, 0, 1, 1])
    adv, ret = ADVANTAGES["grpo"].fn(x, AdvantageParams())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv, T([[a, a], [-a, -a], [0.0, 0.0], [0.0, 0.0]]))
    assert ret is None


def test_grpo_gives_no_signal_to_a_group_whose_task_returns_are_equal():
    """Both rows scored 1, their returns differ only by the KL terms (-0.01 vs -0.03): the std
    scaling would make that +-0.71; the group carries no reward signal, so its advantage is 0.
    A second group with different task returns is normalised as usual."""
    x = inputs([[-0.01, 1.0], [-0.03, 1.0], [0.0, 1.0], [0.0, 0.0]], scores=[1.0, 1.0, 1.0, 0.0],
               groups=[0, 0, 1, 1])
    x = x._replace(task_returns=x.scores)
    adv, _ = ADVANTAGES["grpo"].fn(x, AdvantageParams())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv, T([[0.0, 0.0], [0.0, 0.0], [a, a], [-a, -a]]))
    # dense terms are task reward too: equal scores, different process rewards -> normalised
    x = x._replace(task_returns=T([1.0, 1.5, 1.0, 0.0]))
    adv, _ = ADVANTAGES["grpo"].fn(x, AdvantageParams())
    assert adv[0, 0] > 0 > adv[1, 0]


@pytest.mark.parametrize("name", ["rloo", "reinforce++_baseline"])
def test_unscaled_group_estimators_give_no_signal_to_a_group_whose_task_returns_are_equal(name):
    """Group 0 scored 1 and 1: its returns differ by the KL terms alone (-0.01 vs -0.03), which
    the leave-one-out / group-mean baseline would turn into advantages of +-0.02; the group says
    nothing about the task, so its advantages are 0. Group 1 (scores 1 and 0) is as before."""
    x = inputs([[-0.01, 1.0], [-0.03, 1.0], [0.0, 1.0], [0.0, 0.0]], scores=[1.0, 1.0, 1.0, 0.0],
               groups=[0, 0, 1, 1])
    x = x._replace(task_returns=x.scores)
    adv, _ = ADVANTAGES[name].fn(x, AdvantageParams())
    torch.testing.assert_close(adv[:2], torch.zeros(2, 2))
    expected = {"rloo": T([[1.0, 1.0], [-1.0, -1.0]]), "reinforce++_baseline": T([[0.5, 0.5], [-0.5, -0.5]])}
    torch.testing.assert_close(adv[2:], expected[name])


def test_dr_grpo_and_grpo_without_std_are_only_centred():
    x = inputs([[0.0, 3.0], [0.0, 1.0]], mask=[[True, True], [True, False]], groups=[5, 5])
    adv, _ = ADVANTAGES["dr_grpo"].fn(x, AdvantageParams())
    torch.testing.assert_close(adv, T([[1.5, 1.5], [-1.5, 0.0]]))
    adv2, _ = ADVANTAGES["grpo"].fn(x, AdvantageParams(norm_by_std=False))
    torch.testing.assert_close(adv2, adv)


def test_rloo_leave_one_out_baseline_hand_computed():
    x = inputs([[1.0], [2.0], [6.0], [4.0], [0.0]], groups=[0, 0, 0, 1, 1])
    adv, _ = ADVANTAGES["rloo"].fn(x, AdvantageParams())
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; 4 - 0, 0 - 4
    torch.testing.assert_close(adv, T([[-3.0], [-1.5], [4.5], [4.0], [-4.0]]))


def test_a_lone_sample_in_a_group_gets_no_signal():
    x = inputs([[1.0], [2.0], [7.0]], groups=[0, 0, 1])
    for name in ("grpo", "rloo"):
        adv, _ = ADVANTAGES[name].fn(x, AdvantageParams())
        assert adv[2, 0] == 0.0


def test_reinforce_pp_returns_to_go_hand_computed_and_masked():
    x = inputs([[0.1, 0.2, 1.0], [0.5, float("nan"), float("inf")]], mask=[[1, 1, 1], [1, 0, 0]])
    adv, ret = ADVANTAGES["reinforce++"].fn(x, AdvantageParams(gamma=0.5))
    torch.testing.assert_close(adv, T([[0.45, 0.7, 1.0], [0.5, 0.0, 0.0]]))
    assert ret is None


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_at_the_last_token():
    # per-token rewards: -0.1 KL on the first token, the score (1 or 3) at the last; group mean 2
    x = inputs([[-0.1, 1.0], [-0.1, 3.0]], scores=[1.0, 3.0], groups=[0, 0])
    adv, _ = ADVANTAGES["reinforce++_baseline"].fn(x, AdvantageParams())
    torch.testing.assert_close(adv, T([[-1.1, -1.0], [0.9, 1.0]]))


def test_remax_subtracts_the_greedy_baseline():
    x = inputs([[0.0, 1.0], [0.2, 0.0]], mask=[[1, 1], [1, 0]], baselines=[0.4, 0.5])
    adv, _ = ADVANTAGES["remax"].fn(x, AdvantageParams())
    torch.testing.assert_close(adv, T([[0.6, 0.6], [-0.3, 0.0]]))


def test_gae_estimator_decouples_the_critic_lambda():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x = AdvantageInputs(rewards, mask, rewards.sum(1), torch.arange(3), values)
    adv, ret = ADVANTAGES["gae"].fn(x, AdvantageParams(lam=0.9, critic_lam=1.0))
    torch.testing.assert_close(adv, compute_gae(rewards, values, mask, 1.0, 0.9)[0])
    torch.testing.assert_close(ret, compute_gae(rewards, values, mask, 1.0, 1.0)[1])
    same, _ = ADVANTAGES["gae"].fn(x, AdvantageParams(lam=0.9))
    torch.testing.assert_close(same, adv)


def test_gae_length_adaptive_lambda_matches_a_per_row_loop():
    torch.manual_seed(1)
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x = AdvantageInputs(rewards, mask, rewards.sum(1), torch.arange(2), values)
    adv, _ = ADVANTAGES["gae"].fn(x, AdvantageParams(gamma=0.9, adaptive_lam_alpha=0.5))
    for row, lam in ((0, 1 - 1 / (0.5 * 2)), (1, 1 - 1 / (0.5 * 4))):
        # plain loop: A_t = delta_t + gamma * lam * A_{t+1} over the row's real tokens
        n = int(mask[row].sum())
        a_next, v_next, expect = 0.0, 0.0, [0.0] * 4
        for t in reversed(range(n)):
            delta = float(rewards[row, t]) + 0.9 * v_next - float(values[row, t])
            a_next = delta + 0.9 * lam * a_next
            v_next = float(values[row, t])
            expect[t] = a_next
        torch.testing.assert_close(adv[row], torch.tensor(expect))


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_returns_to_go_matches_a_python_loop(gamma):
    torch.manual_seed(2)
    rewards = torch.randn(4, 6)
    lengths = [6, 3, 1, 0]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    got = returns_to_go(rewards, mask, gamma)
    for b, n in enumerate(lengths):
        for t in range(6):
            want = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, n)) if t < n else 0.0
            assert abs(float(got[b, t]) - want) < 1e-5


def test_group_moments_hand_computed():
    mean, std, count = group_moments(T([1.0, 3.0, 10.0, 2.0]), T([7, 7, 9, 7]))
    torch.testing.assert_close(mean.float(), T([2.0, 2.0, 10.0, 2.0]))
    torch.testing.assert_close(std[:2].float(), T([1.0, 1.0]))
    assert torch.isnan(std[2]) and count.tolist() == [3, 3, 1, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_estimators_match_plain_loops_on_random_groups(seed):
    torch.manual_seed(seed)
    B, R = 12, 5
    groups = torch.randint(0, 4, (B,))
    lengths = torch.randint(1, R + 1, (B,))
    mask = torch.arange(R)[None] < lengths[:, None]
    rewards = torch.randn(B, R)
    x = AdvantageInputs(rewards, mask, torch.randn(B), groups)
    returns = [float(rewards[i, : lengths[i]].sum()) for i in range(B)]
    grpo, _ = ADVANTAGES["grpo"].fn(x, AdvantageParams())
    rloo, _ = ADVANTAGES["rloo"].fn(x, AdvantageParams())
    for i in range(B):
        mates = [returns[j] for j in range(B) if groups[j] == groups[i]]
        others = [returns[j] for j in range(B) if groups[j] == groups[i] and j != i]
        if len(mates) > 1:
            mean = sum(mates) / len(mates)
            std = math.sqrt(sum((r - mean) ** 2 for r in mates) / (len(mates) - 1))
            want_grpo = (returns[i] - mean) / (std + 1e-6)
            want_rloo = returns[i] - sum(others) / len(others)
        else:
            want_grpo = want_rloo = 0.0
        n = int(lengths[i])
        torch.testing.assert_close(grpo[i, :n], torch.full((n,), want_grpo), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rloo[i, :n], torch.full((n,), want_rloo), rtol=1e-4, atol=1e-5)
        assert (grpo[i, n:] == 0).all() and (rloo[i, n:] == 0).all()
