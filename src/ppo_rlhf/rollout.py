"""Rollout: sample responses from the policy, score them, and turn the scores into per-token
rewards, advantages and returns -- an `Experience` batch that the PPO update consumes.

Shapes: B rollout rows on this rank, P prompt tokens (left-padded), R response tokens (right-padded
after EOS). Response-aligned tensors (B, R) start at the first response token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import distributed as dist
from .algo.advantages import RunningMeanStd, compute_gae, compute_rewards, masked_whiten
from .algo.kl import kl_penalty
from .config import PPOConfig
from .generation import generate, response_logprobs, response_values, sequence_rewards
from .models import token_scores


class Experience(NamedTuple):
    """One rollout, everything the update needs (all detached)."""

    sequences: torch.Tensor  # (B, P+R) prompt + response token ids
    attention_mask: torch.Tensor  # (B, P+R) bool
    response_mask: torch.Tensor  # (B, R) bool, True on response tokens incl. EOS
    logprobs: torch.Tensor  # (B, R) log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t|s_t)
    values: torch.Tensor  # (B, R) V_old(s_t)
    rewards: torch.Tensor  # (B, R) -beta*KL_t + score at the last token
    advantages: torch.Tensor  # (B, R) whitened GAE advantages
    returns: torch.Tensor  # (B, R) GAE returns (advantages before whitening + values)
    scores: torch.Tensor  # (B,) score used in the reward (after penalty/normalisation/clip)
    rm_scores: torch.Tensor  # (B,) raw normalised RM score
    kl: torch.Tensor  # (B, R) per-token KL estimate used in the reward
    entropy: torch.Tensor  # (B, R) policy entropy at each response position
    truncated: torch.Tensor  # (B,) bool, response ended without EOS

    @property
    def prompt_len(self) -> int:
        return self.sequences.size(1) - self.response_mask.size(1)


@torch.no_grad()
def sample(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: PPOConfig,
           max_new_tokens: int, eos_id: int, pad_id: int, generator: torch.Generator | None = None,
           row_seeds: list[int] | None = None):
    """Responses (B, R), their mask, and the policy's (B, R) log-probs and entropies at each response
    token, taken from the sampling logits (per-row streams with `row_seeds`).

    The log-probs are those of the full softmax(logits / temperature), before top-k / top-p, as
    `response_logprobs` computes them in the update, so they serve as the old log-probs without a
    second policy forward (they differ from a full forward's by float noise, ~1e-6).
    """
    r = cfg.rollout
    return generate(policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                    pad_token_id=pad_id, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                    generator=generator, row_seeds=row_seeds, return_logprobs=True, return_entropy=True)


def truncated_rows(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) True where the response has no EOS (it hit max_new_tokens)."""
    return ~((response_ids == eos_id) & response_mask).any(dim=1)


def shape_scores(rm_scores: torch.Tensor, truncated: torch.Tensor, cfg: PPOConfig,
                 running: RunningMeanStd | None) -> torch.Tensor:
    """Missing-EOS penalty, optional running normalisation (statistics over all ranks), clipping."""
    scores = rm_scores.clone()
    r = cfg.reward
    if running is not None:
        mean, var, n = dist.global_masked_moments(scores, torch.ones_like(scores, dtype=torch.bool))
        running.update_from_moments(mean.double(), var.double(), n.double())
        scores = (scores - running.mean) / (running.std + 1e-8)
    if cfg.rollout.penalise_missing_eos:
        scores = torch.where(truncated, torch.full_like(scores, cfg.rollout.missing_eos_penalty), scores)
    if r.score_clip:
        scores = scores.clamp(-r.score_clip, r.score_clip)
    return scores


@torch.no_grad()
def dense_credit(reward_model, sequences, attention_mask, prompt_len: int, response_mask) -> torch.Tensor:
    """Per-token credit from the RM: s_t - s_{t-1}, the RM score after token t minus before it
    (potential-based shaping: it sums to s_last - s_prompt, so it spreads credit without changing
    which responses are best). (B, R), zero past the mask."""
    s = token_scores(reward_model, sequences, attention_mask)  # (B, P+R)
    gain = float(getattr(reward_model.config, "reward_gain", 1.0))
    after = s[:, prompt_len:] * gain
    before = s[:, prompt_len - 1:-1] * gain
    return (after - before) * response_mask


@torch.no_grad()
def make_experience(policy, reference, value_model, reward_model, prompt_ids, prompt_mask,
                    response_ids, response_mask, cfg: PPOConfig, kl_coef: float, eos_id: int,
                    running: RunningMeanStd | None = None, reference_ctx=None,
                    logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None) -> Experience:
    """Score a sampled batch and compute rewards, advantages and returns.

    `reference_ctx` (a context manager factory) is used with LoRA: the reference log-probs are the
    policy's own with the adapters disabled, so no second copy of the weights is needed.
    `logprobs` and `entropy` (B, R), when given (from `sample`), are the policy's old log-probs and
    entropies; without them a policy forward computes both.
    """
    P = prompt_ids.size(1)
    sequences = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    temp = cfg.rollout.temperature
    if logprobs is None or entropy is None:
        logprobs, entropy = response_logprobs(policy, sequences, attention_mask, P, temperature=temp,
                                              with_entropy=True)
    if reference_ctx is not None:
        with reference_ctx():
            ref_logprobs, _ = response_logprobs(policy, sequences, attention_mask, P, temperature=temp)
    else:
        ref_logprobs, _ = response_logprobs(reference, sequences, attention_mask, P, temperature=temp)
    values = response_values(value_model, sequences, attention_mask, P).float()
    rm_scores = sequence_rewards(reward_model, sequences, attention_mask).float()
    truncated = truncated_rows(response_ids, response_mask, eos_id)
    scores = shape_scores(rm_scores, truncated, cfg, running)
    dense = None
    if cfg.reward.credit == "dense":
        dense = cfg.reward.dense_coef * dense_credit(reward_model, sequences, attention_mask, P, response_mask)
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef,
                                  estimator=cfg.reward.kl_estimator, dense_scores=dense)
    values = values * response_mask
    advantages, returns = compute_gae(rewards, values, response_mask, cfg.loss.gamma, cfg.loss.lam)
    if cfg.loss.whiten_advantages:
        mean, var, _ = dist.global_masked_moments(advantages, response_mask)
        advantages = masked_whiten(advantages, response_mask, shift_mean=True, stats=(mean, var))
    return Experience(sequences, attention_mask, response_mask, logprobs, ref_logprobs, values, rewards,
                      advantages, returns, scores, rm_scores, kl, entropy, truncated)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(pi||ref) of each response: the k1 sum over its tokens (unbiased for the sequence KL)."""
    return (kl_penalty(logprobs, ref_logprobs, "k1") * response_mask).sum(1)
