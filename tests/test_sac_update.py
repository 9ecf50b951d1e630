"""sac_update on tiny GPT-2 policy, reference and critics: finite losses, every trained model
changes, the reference does not, the target critics move by exactly tau, beta follows the KL."""

from typing import NamedTuple

import pytest
import torch
from tiny_tokenizer import make_tokenizer

from ppo_rlhf.data.collate import position_ids_from_mask
from ppo_rlhf.generation import truncate_logits
from ppo_rlhf.models import load_causal_lm
from ppo_rlhf.stages.sac_update import SACParams, critic_q_values, sac_update, target_critic

TOK = make_tokenizer()
P, R = 3, 4


class Batch(NamedTuple):
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor


def batch() -> Batch:
    """4 rows; row 0's prompt has one pad; responses of 4, 3, 2, 1 tokens; the score at the last."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4, 3, 2, 1])
    response_mask = torch.arange(R)[None, :] < lengths[:, None]
    prompt_mask = torch.ones(4, P, dtype=torch.bool)
    prompt_mask[0, 0] = False
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    sequences = torch.where(attention_mask, torch.randint(4, len(TOK), (4, P + R), generator=g), TOK.pad_token_id)
    last = torch.nn.functional.one_hot(lengths - 1, R).bool()
    rewards = torch.where(last, torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None], 0.0)
    rewards = torch.where(response_mask, rewards, float("nan"))  # padding must not be read
    return Batch(sequences, attention_mask, response_mask, rewards)


def logsoftmax(model, b: Batch, top_k: int = 0):
    """The trainer's callable: log pi(.|s_t) (N, V) at the real response tokens of rows idx."""
    def fn(idx):
        seq, att, mask = b.sequences[idx], b.attention_mask[idx], b.response_mask[idx]
        logits = model(input_ids=seq, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
        logits = logits[:, P - 1:-1][mask].float()
        return truncate_logits(logits, top_k=top_k, keep=seq[:, P:][mask]).log_softmax(-1)
    return fn


def models():
    policy = load_causal_lm("tiny-gpt2", TOK, seed=0)
    reference = load_causal_lm("tiny-gpt2", TOK, seed=0).requires_grad_(False)
    critics = [load_causal_lm("tiny-gpt2", TOK, seed=s) for s in (1, 2)]
    return policy, reference, critics, [target_critic(c) for c in critics]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("top_k", [0, 5])
def test_one_step_trains_every_model_and_moves_the_targets_by_tau(top_k):
    torch.manual_seed(0)
    b = batch()
    policy, reference, critics, targets = models()
    # targets that differ from their critics, so that the Polyak step is visible
    for t in targets:
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.01)
    before = {name: snapshot(m) for name, m in [("policy", policy), ("reference", reference),
                                                ("target0", targets[0]), ("target1", targets[1])]}
    critic_opt = torch.optim.Adam([p for c in critics for p in c.parameters()], lr=1e-3)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    log_beta = torch.tensor(0.0, requires_grad=True)
    beta_opt = torch.optim.Adam([log_beta], lr=0.1)
    tau = 0.1
    out = sac_update(b, torch.arange(4), policy_logsoftmax=logsoftmax(policy, b, top_k),
                     ref_logsoftmax=logsoftmax(reference, b), critics=critics, target_critics=targets,
                     critic_optimizer=critic_opt, actor_optimizer=actor_opt, log_beta=log_beta,
                     beta_optimizer=beta_opt, params=SACParams(tau=tau, kl_target=0.5))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values()), out
    assert out["loss/critic"] > 0 and out["sac/kl"] >= 0
    assert any(not torch.equal(a, p) for a, p in zip(before["policy"], policy.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(before["reference"], reference.parameters()))
    for i, (critic, target) in enumerate(zip(critics, targets)):
        old = before[f"target{i}"]
        assert any(not torch.allclose(o, p) for o, p in zip(old, target.parameters()))
        for o, t, c in zip(old, target.parameters(), critic.parameters()):
            assert torch.allclose(t, (1 - tau) * o + tau * c.detach(), atol=1e-6)
    # one Adam step of 0.1 on log beta, down while the KL is under the target 0.5, up over it: the
    # policy starts as the reference (KL 0); its top-5 truncation alone costs -log(mass) > 0.5
    direction = -1 if out["sac/kl"] < 0.5 else 1
    assert direction == (-1 if top_k == 0 else 1)
    assert abs(log_beta.item() - 0.1 * direction) < 1e-4 and abs(out["sac/beta"] - torch.e ** (0.1 * direction)) < 1e-4


def test_repeated_steps_fit_the_critics_to_the_soft_bellman_targets():
    torch.manual_seed(0)
    b = batch()
    policy, reference, critics, targets = models()
    critic_opt = torch.optim.Adam([p for c in critics for p in c.parameters()], lr=3e-3)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        out = sac_update(b, torch.arange(4), policy_logsoftmax=logsoftmax(policy, b),
                         ref_logsoftmax=logsoftmax(reference, b), critics=critics, target_critics=targets,
                         critic_optimizer=critic_opt, actor_optimizer=actor_opt, log_beta=torch.tensor(-2.0),
                         params=SACParams(tau=0.01))
        losses.append(out["loss/critic"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_q_values_are_the_critic_logits_at_the_states():
    b = batch()
    critic = load_causal_lm("tiny-gpt2", TOK, seed=1)
    q = critic_q_values(critic, b.sequences, b.attention_mask, b.response_mask)
    logits = critic(input_ids=b.sequences, attention_mask=b.attention_mask,
                    position_ids=position_ids_from_mask(b.attention_mask)).logits
    assert q.shape == (int(b.response_mask.sum()), len(TOK))
    assert torch.allclose(q, logits[:, P - 1:-1][b.response_mask], atol=1e-5)


def test_a_kl_target_needs_a_beta_optimizer():
    b = batch()
    policy, reference, critics, targets = models()
    with pytest.raises(ValueError, match="beta_optimizer"):
        sac_update(b, torch.arange(4), policy_logsoftmax=logsoftmax(policy, b),
                   ref_logsoftmax=logsoftmax(reference, b), critics=critics, target_critics=targets,
                   critic_optimizer=torch.optim.SGD(critics[0].parameters()),
                   actor_optimizer=torch.optim.SGD(policy.parameters()), log_beta=torch.tensor(0.0),
                   params=SACParams(kl_target=1.0))
