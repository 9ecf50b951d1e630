"""One soft actor-critic step on a replay minibatch, for the RL stage's "sac" update kind.

The math is in `algo/sac.py`; this module runs it on models. The critics are causal LMs (their
own trunks, the policy's tokenizer) whose logits at position P - 1 + t are read as
Q(s_t, .) in R^V, the soft Q-values of every next token in the state before response token t.
The trainer provides the policy and reference distributions as callables, so this module needs no
knowledge of LoRA, DDP, FSDP, temperature or top-k:

    policy_logsoftmax(idx) -> (N, V)  log pi_theta(.|s_t) at the real response tokens of rows idx
                                      (with gradient; the sampling temperature / top-k / top-p
                                      applied, -inf outside the kept tokens)
    ref_logsoftmax(idx)    -> (N, V)  log pi_ref(.|s_t) at the same tokens (no gradient; leave it
                                      untruncated, so the KL is finite wherever pi > 0)

"The real response tokens" are `batch.response_mask[idx]`, in row-major order (boolean indexing),
N of them. A step (`sac_update`):

1. targets (no gradient): V_target(s_t) = soft_value(min(Q'_1, Q'_2), log pi, log pi_ref, beta)
   at every real token, y_t = r_t + gamma V_target(s_{t+1}), 0 after the last token;
2. critic step on 1/2 sum_i E[(Q_i(s_t, a_t) - y_t)^2];
3. actor step on E_s[sum_a pi (beta log(pi/pi_ref) - min(Q_1, Q_2))] with the updated critics;
4. with a KL target, a step on log beta;
5. Polyak update of both target critics.

`batch.rewards` (B, R) must be the task reward only -- the sequence score at the last token, plus
any dense terms -- without the -beta*KL penalty: the prior's KL is in the soft value.
One call is one minibatch without gradient accumulation; the trainer splits rows across DDP ranks
before calling (each rank's critics and policy see their rows, DDP averages the gradients).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import distributed as dist
from ..algo.sac import actor_loss, beta_loss, critic_loss, polyak_update, soft_q_targets, soft_value
from ..data.collate import position_ids_from_mask
from ..generation import fp32_logits
from ..models import capture_output, disable_dropout, load_q_model, unwrap
from . import common


class SACParams(NamedTuple):
    """gamma: discount per token; tau: Polyak rate of the target critics; kl_target: None keeps
    beta fixed, a value tunes log beta so that KL(pi || pi_ref) per token approaches it;
    max_grad_norm: gradient clipping of the default optimizer step (0 = none)."""

    gamma: float = 1.0
    tau: float = 0.005
    kl_target: float | None = None
    max_grad_norm: float = 1.0


def target_critic(critic: nn.Module) -> nn.Module:
    """A frozen copy of `critic` (outside its DDP / peft wrapper) to Polyak-average into."""
    return copy.deepcopy(unwrap(critic)).requires_grad_(False).eval()


def critic_q_values(critic: nn.Module, sequences: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
    """(N, V) float32 Q(s_t, .) at the real response tokens: the critic's logits at position
    P - 1 + t (the state that response token t is chosen in). The head runs only on the N
    states, so no (B, P+R, V) tensor is made."""
    hf = unwrap(critic)
    with capture_output(hf.base_model) as outputs:  # through the wrapper: DDP must see the forward
        critic(input_ids=sequences, attention_mask=attention_mask,
               position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1)
    hidden = outputs[-1].last_hidden_state
    P = sequences.size(1) - response_mask.size(1)
    return fp32_logits(hf.get_output_embeddings(), hidden[:, P - 1:-1][response_mask.bool()])


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def default_step(max_grad_norm: float) -> Callable[[torch.optim.Optimizer, Tensor], float]:
    """clip the optimizer's gradients to max_grad_norm, step, zero them; returns the grad norm."""

    def step(optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
        params = [p for p in _params(optimizer) if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    return step


def sac_update(batch, idx: Tensor, *, policy_logsoftmax: Callable[[Tensor], Tensor],
               ref_logsoftmax: Callable[[Tensor], Tensor], critics: Sequence[nn.Module],
               target_critics: Sequence[nn.Module], critic_optimizer: torch.optim.Optimizer,
               actor_optimizer: torch.optim.Optimizer, log_beta: Tensor,
               beta_optimizer: torch.optim.Optimizer | None = None, params: SACParams | None = None,
               step: Callable[[torch.optim.Optimizer, Tensor], float] | None = None) -> dict[str, float]:
    """One SAC step on rows `idx` of `batch` (anything with sequences (B, P+R), attention_mask
    (B, P+R), response_mask (B, R) and rewards (B, R): an Experience, a replayed minibatch).

    critics / target_critics: two each; critic_optimizer steps both critics, actor_optimizer the
    policy; log_beta a 0-d tensor (a parameter of beta_optimizer when params.kl_target is set);
    params default `SACParams()`.
    `step(optimizer, loss) -> grad_norm` clips, steps and zeroes gradients after each backward
    (default: `default_step(params.max_grad_norm)`; the trainer passes its guarded
    `clip_and_step`). Returns the step's metrics as floats.
    """
    params = params or SACParams()
    if len(critics) != 2 or len(target_critics) != 2:
        raise ValueError(f"SAC uses two critics and two target critics (got {len(critics)}, {len(target_critics)})")
    if params.kl_target is not None and beta_optimizer is None:
        raise ValueError("SACParams.kl_target is set, so sac_update needs a beta_optimizer over log_beta")
    step = step or default_step(params.max_grad_norm)
    seq, att = batch.sequences[idx], batch.attention_mask[idx]
    mask = batch.response_mask[idx].bool()
    P = seq.size(1) - mask.size(1)
    tokens = seq[:, P:][mask]  # (N,) the action a_t taken in each state
    beta = log_beta.detach().exp()

    def q_all(models):
        return [critic_q_values(m, seq, att, mask) for m in models]

    def taken(q: Tensor) -> Tensor:  # (N, V) -> (B, R) Q(s_t, a_t), 0 at padding
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_scatter(
            mask, q.gather(-1, tokens[:, None]).squeeze(-1))

    # 1. soft Bellman targets from the target critics and the current policy
    with torch.no_grad():
        ref_logp = ref_logsoftmax(idx)
        tq1, tq2 = q_all(target_critics)
        v = soft_value(torch.minimum(tq1, tq2), policy_logsoftmax(idx), ref_logp, beta)
        state_values = torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)
        targets = soft_q_targets(batch.rewards[idx].float(), state_values, mask, params.gamma)

    # 2. critics
    q1, q2 = q_all(critics)
    c_loss, c_stats = critic_loss(taken(q1), taken(q2), targets, mask)
    c_loss.backward()
    critic_norm = step(critic_optimizer, c_loss)

    # 3. actor, against the updated critics
    with torch.no_grad():
        q = torch.minimum(*q_all(critics))
    a_loss, a_stats = actor_loss(policy_logsoftmax(idx), ref_logp, q, beta)
    a_loss.backward()
    actor_norm = step(actor_optimizer, a_loss)

    # 4. temperature
    b_loss = torch.zeros(())
    if params.kl_target is not None:
        b_loss = beta_loss(log_beta, a_stats.kl, params.kl_target)
        b_loss.backward()
        beta_optimizer.step()
        beta_optimizer.zero_grad(set_to_none=True)

    # 5. targets
    for target, online in zip(target_critics, critics):
        polyak_update(target.parameters(), unwrap(online).parameters(), params.tau)

    values = torch.stack([c_loss.detach(), a_loss.detach(), b_loss.detach().to(c_loss.device), c_stats.q_mean,
                          c_stats.target_mean, a_stats.kl, a_stats.entropy, a_stats.soft_value,
                          log_beta.detach().exp().to(c_loss.device)]).tolist()  # one host sync
    names = ["loss/critic", "loss/actor", "loss/beta", "sac/q_mean", "sac/target_mean", "sac/kl", "sac/entropy",
             "sac/soft_value", "sac/beta"]
    return {**dict(zip(names, values)), "sac/critic_grad_norm": critic_norm, "sac/actor_grad_norm": actor_norm}


class SoftQCritics:
    """The "soft_actor_critic" update's own models: two soft Q critics over the vocabulary (the SFT
    trunk with a new head each, `models.load_q_model`), their Polyak targets, and one optimizer and
    schedule over both critics. `state()` is their part of the checkpoint."""

    def __init__(self, policy_dir: str, tokenizer, device: torch.device, run_cfg, optim_cfg, knobs,
                 total_steps: int):
        self.critics = []
        for i in range(2):
            critic = load_q_model(policy_dir, tokenizer, seed=run_cfg.seed * 2 + i + 1,
                                  head_init_std=knobs.head_init_std).to(device)
            disable_dropout(critic)
            self.critics.append(critic)
        self.wrapped = [dist.wrap_model(c, device, run_cfg) for c in self.critics]
        self.targets = [target_critic(c) for c in self.critics]
        self.params = [p for c in self.critics for p in c.parameters() if p.requires_grad]
        lr = knobs.critic_lr if knobs.critic_lr is not None else optim_cfg.lr
        self.optimizer = common.make_optimizer(self.params, optim_cfg, lr=lr)
        self.scheduler = common.make_scheduler(self.optimizer, optim_cfg, total_steps)
        self.lr = lr

    def state(self) -> dict:
        return {"q_critic_1": self.critics[0], "q_critic_2": self.critics[1], "q_target_1": self.targets[0],
                "q_target_2": self.targets[1], "q_optimizer": self.optimizer, "q_scheduler": self.scheduler}
