"""Preference-optimisation losses (the DPO family): pure functions over per-sequence log-probs.

Every loss has one signature, `fn(batch: PreferenceBatch, params: PreferenceParams) ->
PreferenceLossOutput`, and is registered by name in `PREFERENCE_LOSSES` with what it needs:
`needs_reference` (log-probs of a frozen reference policy) and `needs_mismatched` (log-probs of
responses paired with the wrong prompt: KTO's KL reference point). The stage (stages/dpo.py)
provides each need by one generic path and never branches on a loss's name.

Notation, per pair i: x the prompt, y_w the chosen and y_l the rejected response,
    log pi(y|x) = sum_t log pi(y_t | x, y_<t)          (`chosen_logps`, `rejected_logps`: sums)
    |y| = the response's tokens (EOS included)          (`chosen_lengths`, `rejected_lengths`)
    h_w = log pi_theta(y_w|x) - log pi_ref(y_w|x)       (the implicit reward, over beta)
Shapes: B pairs; every input and output is (B,) except the mismatched log-probs, (M,).
The losses are per pair; the stage averages them over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceBatch(NamedTuple):
    """Per-sequence log-probs of a batch of pairs (policy ones carry the gradient)."""

    chosen_logps: Tensor  # (B,) sum log pi_theta(y_w|x)
    rejected_logps: Tensor  # (B,) sum log pi_theta(y_l|x)
    chosen_lengths: Tensor  # (B,) response tokens of y_w (EOS included)
    rejected_lengths: Tensor  # (B,)
    ref_chosen_logps: Tensor | None = None  # (B,) sum log pi_ref(y_w|x); losses with needs_reference
    ref_rejected_logps: Tensor | None = None  # (B,)
    mismatched_logps: Tensor | None = None  # (M,) sum log pi_theta(y_j|x_i), j != i; KTO
    ref_mismatched_logps: Tensor | None = None  # (M,) the same under pi_ref


class PreferenceParams(NamedTuple):
    """Knobs of the preference losses (each loss reads the ones its docstring names)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO / SimPO: the probability that a label is flipped
    gamma: float = 0.5  # SimPO's target reward margin
    desirable_weight: float = 1.0  # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U


class PreferenceLossOutput(NamedTuple):
    """Per-pair losses (with the gradient) and the implicit rewards of both sides (detached)."""

    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,)
    rejected_rewards: Tensor  # (B,)


class PreferenceLoss(NamedTuple):
    """A registered preference loss: the function, what it needs, its usual beta, and the
    `PreferenceParams` fields it reads (a stage refuses settings of the others)."""

    fn: Callable[[PreferenceBatch, PreferenceParams], PreferenceLossOutput]
    needs_reference: bool
    needs_mismatched: bool
    default_beta: float
    params: tuple[str, ...]


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, *, needs_reference: bool, needs_mismatched: bool = False,
                             default_beta: float = 0.1, params: tuple[str, ...] = ("beta",)):
    """Decorator: register `fn(batch, params) -> PreferenceLossOutput` under `name`; `params`
    names the `PreferenceParams` fields it reads."""

    def wrap(fn):
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is registered twice")
        if needs_mismatched and not needs_reference:
            raise ValueError(f"preference loss {name!r}: mismatched log-probs are compared with the reference's")
        unknown = set(params) - set(PreferenceParams._fields)
        if unknown:
            raise ValueError(f"preference loss {name!r} reads unknown params {sorted(unknown)}")
        PREFERENCE_LOSSES[name] = PreferenceLoss(fn, needs_reference, needs_mismatched, default_beta, tuple(params))
        return fn

    return wrap


def _log_ratios(b: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(h_w, h_l): log pi_theta - log pi_ref of the chosen and rejected responses."""
    if b.ref_chosen_logps is None or b.ref_rejected_logps is None:
        raise ValueError("this preference loss needs the reference log-probs")
    return b.chosen_logps - b.ref_chosen_logps, b.rejected_logps - b.ref_rejected_logps


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with labels flipped w.p. eps."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_preference_loss("dpo", needs_reference=True, default_beta=0.1, params=("beta", "label_smoothing"))
def dpo_loss(b: PreferenceBatch, p: PreferenceParams) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with conservative
    label smoothing eps (cDPO, Mitchell 2023):

        z = beta * (h_w - h_l)
        L = -(1 - eps) log sigma(z) - eps log sigma(-z)
        rewards: beta * h_w, beta * h_l

    At beta -> 0 (or h_w = h_l) every pair's loss is log 2.
    """
    h_w, h_l = _log_ratios(b)
    losses = _smoothed_sigmoid_loss(p.beta * (h_w - h_l), p.label_smoothing)
    return PreferenceLossOutput(losses, (p.beta * h_w).detach(), (p.beta * h_l).detach())


@register_preference_loss("ipo", needs_reference=True, default_beta=0.1)
def ipo_loss(b: PreferenceBatch, p: PreferenceParams) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17), beta = the paper's tau, on per-token log-ratios:

        d = h_w / |y_w| - h_l / |y_l|
        L = (d - 1 / (2 beta))^2
        rewards: beta * h_w, beta * h_l

    The paper writes d with sequence log-probs; like TRL (whose comment says the IPO authors
    confirmed that the paper's results used it) we divide each log-ratio by its response
    length, so that beta does not depend on how long the responses are. The regression target
    1/(2 beta) grows without bound as beta -> 0.
    """
    h_w, h_l = _log_ratios(b)
    d = h_w / b.chosen_lengths.clamp(min=1) - h_l / b.rejected_lengths.clamp(min=1)
    losses = (d - 1 / (2 * p.beta)) ** 2
    return PreferenceLossOutput(losses, (p.beta * h_w).detach(), (p.beta * h_l).detach())


@register_preference_loss("simpo", needs_reference=False, default_beta=2.0,
                          params=("beta", "label_smoothing", "gamma"))
def simpo_loss(b: PreferenceBatch, p: PreferenceParams) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6): the length-normalised log-likelihood is the reward, no reference model, a
    target margin gamma; label smoothing as in TRL's CPO trainer:

        r_w = beta * log pi_theta(y_w|x) / |y_w|,  r_l likewise
        L = -(1 - eps) log sigma(r_w - r_l - gamma) - eps log sigma(-(r_w - r_l - gamma))

    With equal per-token log-likelihoods the loss is -log sigma(-gamma) = softplus(gamma).
    """
    r_w = p.beta * b.chosen_logps / b.chosen_lengths.clamp(min=1)
    r_l = p.beta * b.rejected_logps / b.rejected_lengths.clamp(min=1)
    losses = _smoothed_sigmoid_loss(r_w - r_l - p.gamma, p.label_smoothing)
    return PreferenceLossOutput(losses, r_w.detach(), r_l.detach())


def kto_reference_point(b: PreferenceBatch) -> Tensor:
    """KTO's z_0 = max(0, mean_j [log pi_theta(y_j|x_i) - log pi_ref(y_j|x_i)]) over mismatched
    (prompt, response) pairs: a biased but cheap estimate of KL(pi_theta || pi_ref) that carries
    no gradient (Ethayarajh et al. 2024, section 4.1). A 0-d tensor."""
    if b.mismatched_logps is None or b.ref_mismatched_logps is None:
        raise ValueError("KTO needs the mismatched log-probs (its KL reference point)")
    return (b.mismatched_logps - b.ref_mismatched_logps).mean().clamp(min=0).detach()


@register_preference_loss("kto", needs_reference=True, needs_mismatched=True, default_beta=0.1,
                          params=("beta", "desirable_weight", "undesirable_weight"))
def kto_loss(b: PreferenceBatch, p: PreferenceParams) -> PreferenceLossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    eq. 8) on unpaired examples: each pair is split into a desirable (x, y_w) and an undesirable
    (x, y_l) example, with the reference point z_0 = `kto_reference_point` (detached):

        L_D = 1 - sigma(beta * (h_w - z_0)),   L_U = 1 - sigma(beta * (z_0 - h_l))
        L   = (lambda_D * L_D + lambda_U * L_U) / 2     (the mean over the pair's two examples)
        rewards: beta * h_w, beta * h_l

    At beta -> 0, L -> (lambda_D + lambda_U) / 4.
    """
    h_w, h_l = _log_ratios(b)
    z0 = kto_reference_point(b)
    desirable = 1 - torch.sigmoid(p.beta * (h_w - z0))
    undesirable = 1 - torch.sigmoid(p.beta * (z0 - h_l))
    losses = (p.desirable_weight * desirable + p.undesirable_weight * undesirable) / 2
    return PreferenceLossOutput(losses, (p.beta * h_w).detach(), (p.beta * h_l).detach())


@register_preference_loss("orpo", needs_reference=False, default_beta=0.1)
def orpo_loss(b: PreferenceBatch, p: PreferenceParams) -> PreferenceLossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 6-7), beta = the paper's lambda: the SFT loss on the chosen response plus an
    odds-ratio term, no reference model. With the per-token log-likelihood
    a = log pi_theta(y|x) / |y| and odds(y) = P / (1 - P), P = exp(a):

        log odds(y) = a - log(1 - exp(a))
        L = -a_w - beta * log sigma(log odds(y_w) - log odds(y_l))
        rewards: beta * a_w, beta * a_l

    `log1p(-exp(a))` is computed as log(-expm1(a)), exact for a near 0; a < 0 always (a
    probability below 1).
    """
    a_w = b.chosen_logps / b.chosen_lengths.clamp(min=1)
    a_l = b.rejected_logps / b.rejected_lengths.clamp(min=1)
    log_odds = (a_w - a_l) - (torch.log(-torch.expm1(a_w)) - torch.log(-torch.expm1(a_l)))
    losses = -a_w - p.beta * F.logsigmoid(log_odds)
    return PreferenceLossOutput(losses, (p.beta * a_w).detach(), (p.beta * a_l).detach())
