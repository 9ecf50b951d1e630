"""Soft actor-critic for tokens, with the reference model as the prior (KL-regularised SAC).

The MDP: state s_t = prompt + response tokens a_<t, action a_t = the next token, reward r_t = 0
except the sequence score at the last response token (plus any dense per-token terms -- but not
the -beta*KL penalty: the prior's KL is in the soft value below). The last real token (EOS, or the
last one a truncated response got) is terminal: V = 0 after it. The objective is

    J(pi) = E_pi[ sum_t gamma^t (r_t - beta * KL(pi(.|s_t) || pi_ref(.|s_t))) ]

whose optimum is pi*(a|s) = pi_ref(a|s) exp(Q*(s,a) / beta) / Z(s), with the soft Bellman equations

    Q(s_t, a_t) = r_t + gamma * V(s_{t+1})                                  (`soft_q_targets`)
    V(s)        = sum_a pi(a|s) [Q(s,a) - beta * log(pi(a|s) / pi_ref(a|s))]  (`soft_value`)

The sum over a is exact over the vocabulary (the critic outputs Q(s, .) in R^V: in the trainer a
causal LM whose logits are read as Q-values), so neither the value nor the actor's gradient needs
a sampled action. Pieces:

- two critics Q_1, Q_2 with Polyak-averaged targets (`polyak_update`); the target uses the min of
  the two target critics (clipped double-Q, against the overestimation of a max over actions);
- critic loss 1/2 sum_i E[(Q_i(s_t, a_t) - y_t)^2] at the buffer's (s_t, a_t) (`critic_loss`);
- actor loss E_s[ sum_a pi(a|s) (beta log(pi/pi_ref) - min_i Q_i(s,a)) ] = -E_s[V(s)] with Q
  detached, at the buffer's states (`actor_loss`): its minimiser at each state is
  pi_ref exp(Q / beta) / Z;
- beta fixed, or tuned to a KL target like SAC's temperature to a target entropy
  (`beta_loss`, a loss on log beta).

Top-k / top-p truncated policies have log-prob -inf outside the kept tokens: those entries
contribute exactly 0 (value and gradient; `_probs`). The reference should be the untruncated
softmax (finite everywhere): where pi > 0 and pi_ref = 0 the KL -- and V -- is truly -inf.

Soft Q-learning (`boltzmann_logprobs`) is the alternative without an actor: the policy is read off
the critic, pi = pi_ref exp(Q/beta) / Z (in the trainer: the policy LM's logits are the Q-values
plus the reference's log-probs), and V(s) = beta log sum_a pi_ref exp(Q/beta) -- `soft_value` of
that policy. Measured on the toy problems of tests/test_algo_sac.py (a 4-action bandit and a
two-step tree with an early EOS; tabular policy logits and Q tables, every episode in the buffer,
Adam lr 0.05, tau 0.05; the step from which the total variation to pi* stays below 0.02; seeds
0, 1, 2):

    beta = 0.5   SAC (actor + twin critics)  bandit 83 / 82 / 85    tree  71 /  67 /  58 steps
                 soft Q-learning             bandit 83 / 81 / 82    tree  51 /  53 /  54
    beta = 0.1   SAC                         bandit 86 / 86 / 101   tree 125 / 101 / 103
                 soft Q-learning             bandit 35 / 37 / 41    tree  52 /  48 /  52

Soft Q-learning converges as fast or faster, and about twice as fast at the small beta: its policy
is the exact minimiser of the actor loss for the current Q at every step, whereas SAC's actor
follows a moving Q by gradient steps and must move its logits by Q/beta -- far at a small beta,
where pi* is sharp. What SAC buys is not speed on exact tabular problems: its actor is a separate network that starts
as the SFT policy whatever the critic's initialisation (soft Q-learning's policy is pi_ref only
while Q = 0), and a critic error moves pi by the error / beta at once in soft Q-learning but only
through a damped actor step in SAC. With a tuned beta, give log beta a smaller learning rate than
the actor (1/10 in the test): at the same rate, dual ascent on beta oscillates around the target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ppo_rlhf.algo.losses import register_policy_loss
from ppo_rlhf.algo.options import opt


def _probs(logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, finite log p, kept) with p = 0 and log p = 0 where logp is -inf (a truncated entry).

    The -inf entries are replaced before exp and products: torch.where alone would still send
    NaN gradients through 0 * (-inf) in the branch it discards.
    """
    kept = logp > float("-inf")
    safe = torch.where(kept, logp, 0.0)
    return torch.where(kept, safe.exp(), 0.0), safe, kept


def soft_value(q: Tensor, logp: Tensor, ref_logp: Tensor, beta: float | Tensor) -> Tensor:
    """V(s) = sum_a pi(a|s) [Q(s,a) - beta (log pi(a|s) - log pi_ref(a|s))], shape (N,).

    q, logp (log pi), ref_logp (log pi_ref): (N, V) over the vocabulary at N states. Entries with
    logp = -inf contribute 0; Q there may hold anything.
    """
    p, lp, kept = _probs(logp)
    term = q - beta * (lp - torch.where(kept, ref_logp, 0.0))
    return torch.where(kept, p * term, 0.0).sum(-1)


def soft_q_targets(rewards: Tensor, state_values: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """y_t = r_t + gamma * V(s_{t+1}), with V(s_{t+1}) = 0 after the last real token; (B, R).

    rewards (B, R): r_t of the transition (s_t, a_t) (the score at the last token);
    state_values (B, R): V_target(s_t) of the state before response token t (`soft_value` of the
    target critics' min at that position); mask (B, R): True at real response tokens (right
    padding, so t + 1 is real only if t is). Padding may hold inf/NaN; y is 0 there.
    """
    mask = mask.bool()
    next_values = torch.zeros_like(state_values)
    # state t+1 exists iff token t+1 is real; at the last real token the episode has ended
    next_values[:, :-1] = torch.where(mask[:, 1:], state_values[:, 1:], 0.0)
    return torch.where(mask, rewards + gamma * next_values, 0.0)


class CriticStats(NamedTuple):
    """0-d detached tensors: the mean of Q_1, Q_2 at the taken actions and of the targets."""

    q_mean: Tensor
    target_mean: Tensor


def critic_loss(q1: Tensor, q2: Tensor, targets: Tensor, mask: Tensor,
                weights: Tensor | None = None) -> tuple[Tensor, CriticStats]:
    """1/2 sum_{i=1,2} E_t[(Q_i(s_t, a_t) - y_t)^2] over the real tokens, shape ().

    q1, q2 (B, R): each critic's Q at the taken token (carry the gradient); targets (B, R) from
    `soft_q_targets` (detached here); weights (B, R), summing to 1 over the minibatch (e.g.
    `algo.losses.token_mean_weights`; a micro-batch's share), default the token mean.
    """
    mask = mask.bool()
    if weights is None:
        weights = mask.float() / mask.sum().clamp(min=1)
    targets = torch.where(mask, targets.detach(), 0.0)
    err = [torch.where(mask, q - targets, 0.0) for q in (q1, q2)]
    loss = 0.5 * sum((weights * e.square()).sum() for e in err)
    with torch.no_grad():
        q_mean = 0.5 * (weights * torch.where(mask, q1 + q2, 0.0)).sum()
        stats = CriticStats(q_mean, (weights * targets).sum())
    return loss, stats


class ActorStats(NamedTuple):
    """0-d detached tensors, averaged over the states: KL(pi || pi_ref), the entropy of pi and the
    soft value V(s)."""

    kl: Tensor
    entropy: Tensor
    soft_value: Tensor


def actor_loss(logp: Tensor, ref_logp: Tensor, q: Tensor, beta: float | Tensor,
               weights: Tensor | None = None) -> tuple[Tensor, ActorStats]:
    """E_s[ sum_a pi(a|s) (beta (log pi(a|s) - log pi_ref(a|s)) - Q(s,a)) ] = -E_s[V(s)], shape ().

    logp (N, V) log pi at the buffer's states (carries the gradient); ref_logp (N, V); q (N, V)
    the min of the two online critics (detached here); beta detached too (its own loss tunes
    it); weights (N,) summing to 1 over the minibatch, default the mean over states.
    """
    if torch.is_tensor(beta):
        beta = beta.detach()
    values = soft_value(q.detach(), logp, ref_logp, beta)
    if weights is None:
        weights = torch.full_like(values, 1.0 / max(1, values.numel()))
    loss = -(weights * values).sum()
    with torch.no_grad():
        p, lp, kept = _probs(logp)
        kl = torch.where(kept, p * (lp - torch.where(kept, ref_logp, 0.0)), 0.0).sum(-1)
        entropy = -torch.where(kept, p * lp, 0.0).sum(-1)
        stats = ActorStats((weights * kl).sum(), (weights * entropy).sum(), (weights * values).sum())
    return loss, stats


def beta_loss(log_beta: Tensor, kl: Tensor, kl_target: float) -> Tensor:
    """log(beta) * (KL_target - KL), shape (); kl (the policy's mean KL to pi_ref, from
    `actor_loss`'s stats) is detached.

    Descending it raises beta while KL > KL_target and lowers it below: the dual of the
    constraint KL <= KL_target (SAC's temperature loss with an entropy target). The loss is on
    log(beta), so beta stays positive and its step does not scale with beta.
    """
    return log_beta * (kl_target - kl.detach())


@torch.no_grad()
def polyak_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], tau: float) -> None:
    """theta_target <- (1 - tau) theta_target + tau theta_online, in place, for each pair."""
    targets, onlines = list(target_params), list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"polyak_update: {len(targets)} target tensors but {len(onlines)} online ones")
    for t, o in zip(targets, onlines):
        t.lerp_(o.to(t.dtype), tau)


def boltzmann_logprobs(q: Tensor, ref_logp: Tensor, beta: float | Tensor) -> Tensor:
    """Soft Q-learning's policy, log pi(a|s) = log pi_ref(a|s) + Q(s,a)/beta - log Z(s); (N, V).

    The soft value of this policy, `soft_value(q, boltzmann_logprobs(q, ref_logp, beta), ref_logp,
    beta)`, is beta log sum_a pi_ref(a|s) exp(Q(s,a)/beta). Entries with pi_ref = 0 stay -inf.
    """
    return torch.log_softmax(ref_logp + q / beta, dim=-1)


@dataclass
class SACKnobs:
    """SAC's critics."""

    tau: float = opt(0.05, "Polyak rate of the target critics per step (SAC: 0.005 over millions of "
                     "steps; a few thousand here need a faster target).", min=1e-6, max=1.0)
    critic_lr: float | None = opt(None, "Learning rate of the two soft Q critics; null = optim.lr.", min=0)
    head_init_std: float = opt(1e-3, "Std of the critics' new Q heads (each critic its own seed, so "
                               "the two differ and their minimum means something).", min=0)


# The RL stage's "soft_actor_critic" update: two soft Q critics and the actor on replayed rows.
# `fn` is the actor's objective (the per-token losses of the gradient kinds do not apply); beta is
# the KL controller's (reward.kl_coef, or reward.kl_control=adaptive towards reward.kl_target).
register_policy_loss("sac", update="soft_actor_critic", knobs=SACKnobs, uses_advantages=False)(actor_loss)
