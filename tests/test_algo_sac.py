"""Token SAC with the reference as prior: the soft Bellman target and the losses by hand, then
tabular SAC and soft Q-learning on a bandit and a two-step tree reach pi* = pi_ref exp(Q*/beta) / Z
with Q* from soft value iteration."""

import math
from typing import NamedTuple

import pytest
import torch

from ppo_rlhf.algo.sac import (
    actor_loss,
    beta_loss,
    boltzmann_logprobs,
    critic_loss,
    polyak_update,
    soft_q_targets,
    soft_value,
)

NAN, INF = float("nan"), float("inf")
TOL = 0.02  # total variation to pi*


def test_soft_value_by_hand_with_a_truncated_entry():
    # pi = [0.5, 0.5, 0 (top-k cut)], pi_ref = [0.25, 0.5, 0.25], Q = [1, 2, NaN], beta = 1
    logits = torch.tensor([[0.0, 0.0, -INF]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    q = torch.tensor([[1.0, 2.0, NAN]])
    v = soft_value(q, logp, ref, 1.0)
    # 0.5 (1 - log 2) + 0.5 (2 - log 1) = 1.5 - 0.5 log 2
    assert torch.allclose(v, torch.tensor([1.5 - 0.5 * math.log(2)]))
    v.sum().backward()
    assert not logits.grad.isnan().any() and logits.grad[0, 2] == 0


def test_soft_q_target_is_reward_plus_next_soft_value_and_zero_after_the_last_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]])
    state_values = torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, NAN]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    y = soft_q_targets(rewards, state_values, mask, gamma=0.5)
    assert torch.equal(y, torch.tensor([[3.0, 3.5, 1.0], [4.5, 2.0, 0.0]]))


def test_soft_value_and_targets_match_plain_loops_on_random_masked_batches():
    g = torch.Generator().manual_seed(0)
    B, R, V, beta, gamma = 5, 6, 7, 0.3, 0.9
    lengths = torch.randint(0, R + 1, (B,), generator=g)
    mask = torch.arange(R)[None, :] < lengths[:, None]
    logits = torch.randn(B * R, V, generator=g)
    logits[torch.rand(B * R, V, generator=g) < 0.3] = -INF  # top-k style cuts
    logits[:, 0] = 0.0  # at least one kept token per state
    logp, ref = torch.log_softmax(logits, -1), torch.log_softmax(torch.randn(B * R, V, generator=g), -1)
    q = torch.randn(B * R, V, generator=g)
    v = soft_value(q, logp, ref, beta)
    for n in range(B * R):
        expected = sum(math.exp(logp[n, a]) * (q[n, a] - beta * (logp[n, a] - ref[n, a]))
                       for a in range(V) if logp[n, a] > -INF)
        assert abs(float(v[n]) - float(expected)) < 1e-5
    rewards = torch.where(mask, torch.randn(B, R, generator=g), NAN)
    state_values = torch.where(mask, v.view(B, R), NAN)
    y = soft_q_targets(rewards, state_values, mask, gamma)
    for b in range(B):
        for t in range(R):
            if t >= lengths[b]:
                assert y[b, t] == 0
                continue
            expected = rewards[b, t] + (gamma * state_values[b, t + 1] if t + 1 < lengths[b] else 0.0)
            assert abs(float(y[b, t] - expected)) < 1e-6


def test_critic_loss_by_hand():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([[3.0, 3.5, 1.0], [4.5, 2.0, 0.0]])
    q1 = torch.tensor([[3.0, 3.0, 1.0], [4.0, 2.0, NAN]], requires_grad=True)
    q2 = torch.tensor([[2.0, 3.5, 1.0], [4.5, 3.0, INF]], requires_grad=True)
    loss, stats = critic_loss(q1, q2, targets, mask)
    # squared errors: q1 0.25 + 0.25, q2 1 + 1, over 5 tokens; 1/2 (0.5/5 + 2/5)
    assert torch.allclose(loss, torch.tensor(0.25))
    assert torch.allclose(stats.q_mean, torch.tensor((13 + 14) / 10)) and torch.allclose(stats.target_mean,
                                                                                       torch.tensor(2.8))
    loss.backward()
    assert torch.allclose(q1.grad, torch.tensor([[0.0, -0.1, 0.0], [-0.1, 0.0, 0.0]]))
    assert torch.allclose(q2.grad, torch.tensor([[-0.2, 0.0, 0.0], [0.0, 0.2, 0.0]]))


def test_actor_loss_is_minus_the_soft_value_and_stationary_at_the_boltzmann_policy():
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    q = torch.tensor([[1.0, 2.0, 0.5]])
    logits = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    loss, stats = actor_loss(torch.log_softmax(logits, -1), ref, q, 0.5)
    # pi uniform: V = 3.5/3 - 0.5 (log(1/3) - mean log ref); KL = log(1/3) - mean log ref
    kl = math.log(1 / 3) - (2 * math.log(0.25) + math.log(0.5)) / 3
    assert torch.allclose(loss, torch.tensor(-(3.5 / 3 - 0.5 * kl)))
    assert torch.allclose(stats.kl, torch.tensor(kl)) and torch.allclose(stats.entropy, torch.tensor(math.log(3)))
    loss.backward()
    assert logits.grad.abs().max() > 0.1
    best = (ref + q / 0.5).requires_grad_()  # pi_ref exp(Q / beta) up to Z
    loss, _ = actor_loss(torch.log_softmax(best, -1), ref, q, 0.5)
    loss.backward()
    assert best.grad.abs().max() < 1e-6


def test_beta_loss_raises_beta_while_the_kl_is_over_target():
    log_beta = torch.tensor(math.log(2.0), requires_grad=True)
    loss = beta_loss(log_beta, torch.tensor(3.0), kl_target=1.0)
    assert torch.allclose(loss, torch.tensor(-2 * math.log(2.0)))
    loss.backward()
    assert log_beta.grad.item() == -2.0  # descending the loss increases log beta


def test_polyak_update_moves_targets_by_tau():
    target, online = [torch.zeros(2), torch.ones(1)], [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    polyak_update(target, online, 0.1)
    assert torch.allclose(target[0], torch.tensor([0.1, 0.2])) and torch.allclose(target[1], torch.tensor([1.2]))


def test_the_soft_value_of_the_boltzmann_policy_is_the_log_partition():
    ref = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]]))
    q = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, 9.0]])
    logp = boltzmann_logprobs(q, ref, 0.7)
    assert logp[1, 2] == -INF
    expected = 0.7 * torch.logsumexp(ref + q / 0.7, -1)
    assert torch.allclose(soft_value(q, logp, ref, 0.7), expected)


# ---------------------------------------------------------------------------------------------
# Toy problems: tabular policy logits and Q tables. A problem lists its states' reference
# distributions, what each action leads to, and the episodes as (B, R) rows of a replay buffer.
# ---------------------------------------------------------------------------------------------
class Problem(NamedTuple):
    ref_logp: torch.Tensor  # (S, V)
    next_state: torch.Tensor  # (S, V) long, -1 = terminal
    reward: torch.Tensor  # (S, V)
    states: torch.Tensor  # (B, R) long, state before token t (0 at padding)
    actions: torch.Tensor  # (B, R) long
    mask: torch.Tensor  # (B, R)
    rewards: torch.Tensor  # (B, R), NaN at padding


def problem(ref: list[list[float]], next_state: list[list[int]], reward: list[list[float]]) -> Problem:
    """Every episode from state 0 (all of them in the buffer: uniform coverage)."""
    next_state_t = torch.tensor(next_state)
    paths = []

    def walk(s, path):
        for a in range(next_state_t.size(1)):
            step = path + [(s, a, reward[s][a])]
            if next_state[s][a] < 0:
                paths.append(step)
            else:
                walk(next_state[s][a], step)

    walk(0, [])
    B, R = len(paths), max(len(p) for p in paths)
    states, actions = torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    mask, rewards = torch.zeros(B, R, dtype=torch.bool), torch.full((B, R), NAN)
    for b, p in enumerate(paths):
        for t, (s, a, r) in enumerate(p):
            states[b, t], actions[b, t], mask[b, t], rewards[b, t] = s, a, True, r
    return Problem(torch.log(torch.tensor(ref)), next_state_t, torch.tensor(reward), states, actions, mask, rewards)


# one state, 4 actions
BANDIT = problem([[0.4, 0.3, 0.2, 0.1]], [[-1, -1, -1, -1]], [[0.0, 1.0, 0.5, 2.0]])
# token 2 at the root is EOS (reward 0.3); tokens 0, 1 lead to a second step, after which it ends
TREE = problem(
    [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.2, 0.2]],
    [[1, 2, -1], [-1, -1, -1], [-1, -1, -1]],
    [[0.0, 0.0, 0.3], [1.0, 0.0, -0.5], [0.2, 0.8, 0.0]],
)


def soft_optimal_policy(p: Problem, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """pi* (S, V) from soft value iteration, Q <- r + gamma V(s'), V(s) = beta log sum pi_ref exp(Q/beta)
    (exact after depth-many sweeps on a tree)."""
    S = p.ref_logp.size(0)
    q = torch.zeros(S, p.ref_logp.size(1), dtype=torch.float64)
    ref, reward = p.ref_logp.double(), p.reward.double()
    for _ in range(S + 1):
        v = beta * torch.logsumexp(ref + q / beta, -1)
        v_next = torch.where(p.next_state >= 0, v[p.next_state.clamp(min=0)], 0.0)
        q = reward + gamma * v_next
    return torch.softmax(ref + q / beta, -1).float()


def total_variation(pi: torch.Tensor, pi_star: torch.Tensor) -> float:
    return float(0.5 * (pi - pi_star).abs().sum(-1).max())


def converged_at(tvs: list[float], window: int = 100) -> int | None:
    """The first step from which the total variation stays below TOL (for at least `window` steps)."""
    last_bad = max((i for i, tv in enumerate(tvs) if tv >= TOL), default=-1)
    return last_bad + 1 if len(tvs) - (last_bad + 1) >= window else None


def state_values(p: Problem, v: torch.Tensor) -> torch.Tensor:
    """(B, R) V(s_t) from (S,) state values; NaN at padding (it must not be read)."""
    return torch.where(p.mask, v[p.states], NAN)


def train_sac(p: Problem, beta: float, steps: int, seed: int = 0, kl_target: float | None = None, lr: float = 0.05,
              tau: float = 0.05, beta_lr: float = 0.005):
    g = torch.Generator().manual_seed(seed)
    S, V = p.ref_logp.shape
    theta = p.ref_logp.clone().requires_grad_()  # the actor starts at the reference (the SFT model)
    q1, q2 = (0.1 * torch.randn(S, V, generator=g)).requires_grad_(), (0.1 * torch.randn(S, V, generator=g)
                                                                         ).requires_grad_()
    tq1, tq2 = q1.detach().clone(), q2.detach().clone()
    log_beta = torch.tensor(math.log(beta), requires_grad=True)
    critic_opt, actor_opt = torch.optim.Adam([q1, q2], lr=lr), torch.optim.Adam([theta], lr=lr)
    beta_opt = torch.optim.Adam([log_beta], lr=beta_lr)
    pi_star = soft_optimal_policy(p, beta)
    tvs = []
    for _ in range(steps):
        b = log_beta.detach().exp()
        with torch.no_grad():
            v = soft_value(torch.minimum(tq1, tq2), torch.log_softmax(theta, -1), p.ref_logp, b)
            y = soft_q_targets(p.rewards, state_values(p, v), p.mask)
        loss, _ = critic_loss(q1[p.states, p.actions], q2[p.states, p.actions], y, p.mask)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        loss, stats = actor_loss(torch.log_softmax(theta, -1), p.ref_logp, torch.minimum(q1, q2), b)
        actor_opt.zero_grad()
        loss.backward()
        actor_opt.step()
        if kl_target is not None:
            beta_opt.zero_grad()
            beta_loss(log_beta, stats.kl, kl_target).backward()
            beta_opt.step()
        polyak_update([tq1, tq2], [q1, q2], tau)
        if kl_target is None:  # (with a moving beta, pi* moves: compare at the end)
            tvs.append(total_variation(torch.softmax(theta.detach(), -1), pi_star))
    return torch.softmax(theta.detach(), -1), tvs, float(log_beta.detach().exp())


def train_soft_q(p: Problem, beta: float, steps: int, seed: int = 0, lr: float = 0.05, tau: float = 0.05):
    """Soft Q-learning: no actor, pi = pi_ref exp(min(Q_1, Q_2)/beta) / Z."""
    g = torch.Generator().manual_seed(seed)
    S, V = p.ref_logp.shape
    q1, q2 = (0.1 * torch.randn(S, V, generator=g)).requires_grad_(), (0.1 * torch.randn(S, V, generator=g)
                                                                         ).requires_grad_()
    tq1, tq2 = q1.detach().clone(), q2.detach().clone()
    opt = torch.optim.Adam([q1, q2], lr=lr)
    pi_star = soft_optimal_policy(p, beta)
    tvs = []
    for _ in range(steps):
        with torch.no_grad():
            tq = torch.minimum(tq1, tq2)
            v = soft_value(tq, boltzmann_logprobs(tq, p.ref_logp, beta), p.ref_logp, beta)
            y = soft_q_targets(p.rewards, state_values(p, v), p.mask)
        loss, _ = critic_loss(q1[p.states, p.actions], q2[p.states, p.actions], y, p.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        polyak_update([tq1, tq2], [q1, q2], tau)
        pi = boltzmann_logprobs(torch.minimum(q1, q2).detach(), p.ref_logp, beta).exp()
        tvs.append(total_variation(pi, pi_star))
    return pi, tvs


@pytest.mark.parametrize("name,p", [("bandit", BANDIT), ("tree", TREE)])
def test_sac_reaches_the_soft_optimal_policy(name, p):
    pi, tvs, _ = train_sac(p, beta=0.5, steps=400)
    assert converged_at(tvs) is not None, f"{name}: TV {tvs[-1]:.4f} after 400 steps"
    assert total_variation(pi, soft_optimal_policy(p, 0.5)) < TOL


@pytest.mark.parametrize("name,p", [("bandit", BANDIT), ("tree", TREE)])
def test_soft_q_learning_reaches_the_soft_optimal_policy(name, p):
    pi, tvs = train_soft_q(p, beta=0.5, steps=400)
    assert converged_at(tvs) is not None, f"{name}: TV {tvs[-1]:.4f} after 400 steps"
    assert total_variation(pi, soft_optimal_policy(p, 0.5)) < TOL


def test_tuned_beta_reaches_the_kl_target():
    pi, _, beta = train_sac(BANDIT, beta=1.0, steps=800, kl_target=0.3)
    kl = float((pi * (pi.log() - BANDIT.ref_logp)).sum())
    assert abs(kl - 0.3) < 0.02, (kl, beta)
    # and the policy is the soft-optimal one for the beta it found
    assert total_variation(pi, soft_optimal_policy(BANDIT, beta)) < TOL


def test_soft_q_learning_converges_faster_than_sac_at_a_small_beta():
    # the module docstring's measurement: at beta = 0.1 pi* is sharp, SAC's actor needs many steps
    # to move its logits by Q/beta while soft Q-learning's policy is exp(Q/beta) at once
    _, sac_tvs, _ = train_sac(TREE, beta=0.1, steps=400)
    _, sql_tvs = train_soft_q(TREE, beta=0.1, steps=400)
    assert converged_at(sql_tvs) < 0.7 * converged_at(sac_tvs)
