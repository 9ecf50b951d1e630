"""The preference losses of algo/preference.py, each hand-computed on small tensors, with the
beta -> 0 and equal-log-prob limits, and the registry's declarations."""

import math

import pytest
import torch

from ppo_rlhf.algo.preference import (
    PREFERENCE_LOSSES,
    PreferenceBatch,
    PreferenceParams,
    kto_reference_point,
    register_preference_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


# Two pairs: policy and reference sums of log-probs, response lengths.
BATCH = PreferenceBatch(chosen_logps=t(-4.0, -6.0), rejected_logps=t(-5.0, -3.0),
                        chosen_lengths=t(2, 3), rejected_lengths=t(4, 1),
                        ref_chosen_logps=t(-4.5, -5.0), ref_rejected_logps=t(-4.0, -3.5),
                        mismatched_logps=t(-7.0, -8.0, -6.0), ref_mismatched_logps=t(-7.5, -8.0, -6.1))
H_W = [0.5, -1.0]  # chosen - ref_chosen
H_L = [-1.0, 0.5]  # rejected - ref_rejected


def loss(name, batch=BATCH, **params):
    return PREFERENCE_LOSSES[name].fn(batch, PreferenceParams(**params))


def test_dpo_by_hand():
    out = loss("dpo", beta=0.5)
    want = [-math.log(sig(0.5 * (hw - hl))) for hw, hl in zip(H_W, H_L)]  # 0.5*1.5, 0.5*-1.5
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])


def test_cdpo_label_smoothing_by_hand():
    out = loss("dpo", beta=0.5, label_smoothing=0.2)
    want = [-0.8 * math.log(sig(z)) - 0.2 * math.log(sig(-z)) for z in (0.75, -0.75)]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_dpo_at_beta_to_zero_and_at_equal_log_ratios_is_log_2(smoothing):
    assert loss("dpo", beta=1e-12, label_smoothing=smoothing).losses.tolist() == pytest.approx([math.log(2)] * 2)
    same = BATCH._replace(rejected_logps=BATCH.chosen_logps, ref_rejected_logps=BATCH.ref_chosen_logps)
    assert loss("dpo", same, beta=3.0, label_smoothing=smoothing).losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(-4.0, -6.0).requires_grad_(), t(-5.0, -3.0).requires_grad_()
    loss("dpo", BATCH._replace(chosen_logps=chosen, rejected_logps=rejected), beta=0.5).losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # dL/dlogp_w = -beta * sigma(-z)
    assert chosen.grad.tolist() == pytest.approx([-0.5 * sig(-0.75), -0.5 * sig(0.75)])


def test_ipo_by_hand_on_per_token_log_ratios():
    out = loss("ipo", beta=0.25)  # target 1 / (2 * 0.25) = 2
    d = [0.5 / 2 - (-1.0) / 4, -1.0 / 3 - 0.5 / 1]
    assert out.losses.tolist() == pytest.approx([(x - 2) ** 2 for x in d], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.125, -0.25])


def test_ipo_limits():
    same = BATCH._replace(rejected_logps=BATCH.chosen_logps, ref_rejected_logps=BATCH.ref_chosen_logps,
                          rejected_lengths=BATCH.chosen_lengths)
    assert loss("ipo", same, beta=0.1).losses.tolist() == pytest.approx([25.0, 25.0])  # (1/(2*0.1))^2
    assert (loss("ipo", beta=1e-6).losses > 1e11).all()  # the target 1/(2 beta) runs away


def test_simpo_by_hand_is_reference_free():
    out = loss("simpo", BATCH._replace(ref_chosen_logps=None, ref_rejected_logps=None), beta=2.0, gamma=0.5)
    r_w, r_l = [2.0 * -4 / 2, 2.0 * -6 / 3], [2.0 * -5 / 4, 2.0 * -3 / 1]
    want = [-math.log(sig(w - r - 0.5)) for w, r in zip(r_w, r_l)]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(r_w)
    assert out.rejected_rewards.tolist() == pytest.approx(r_l)


def test_simpo_limits():
    same = BATCH._replace(rejected_logps=BATCH.chosen_logps, rejected_lengths=BATCH.chosen_lengths)
    assert loss("simpo", same, beta=2.0, gamma=0.5).losses.tolist() == pytest.approx([math.log1p(math.exp(0.5))] * 2)
    # beta -> 0: only the margin is left, -log sigma(-gamma)
    assert loss("simpo", beta=1e-12, gamma=1.0).losses.tolist() == pytest.approx([math.log1p(math.e)] * 2)
    assert loss("simpo", beta=1e-12, gamma=0.0).losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_kto_by_hand_with_the_mismatched_reference_point():
    z0 = (0.5 + 0.0 + 0.1) / 3
    assert float(kto_reference_point(BATCH)) == pytest.approx(z0)
    out = loss("kto", beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    want = [(1.0 * (1 - sig(0.5 * (hw - z0))) + 2.0 * (1 - sig(0.5 * (z0 - hl)))) / 2 for hw, hl in zip(H_W, H_L)]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    mism = t(-7.0, -8.0).requires_grad_()
    b = BATCH._replace(mismatched_logps=mism, ref_mismatched_logps=t(-6.0, -7.0))  # mean -1 -> 0
    assert float(kto_reference_point(b)) == 0.0
    b = BATCH._replace(mismatched_logps=mism, ref_mismatched_logps=t(-8.0, -9.0))
    z0 = kto_reference_point(b)
    assert float(z0) == pytest.approx(1.0) and not z0.requires_grad


def test_kto_limits():
    assert loss("kto", beta=1e-12).losses.tolist() == pytest.approx([0.5, 0.5])  # (1/2 + 1/2) / 2
    assert loss("kto", beta=1e-12, desirable_weight=1.0, undesirable_weight=3.0).losses.tolist() == \
        pytest.approx([1.0, 1.0])
    # equal log-probs everywhere (policy = reference): h = z0 = 0, each term 1 - sigma(0) = 1/2
    ref = BATCH._replace(ref_chosen_logps=BATCH.chosen_logps, ref_rejected_logps=BATCH.rejected_logps,
                         ref_mismatched_logps=BATCH.mismatched_logps)
    assert loss("kto", ref, beta=5.0).losses.tolist() == pytest.approx([0.5, 0.5])


def test_orpo_by_hand():
    out = loss("orpo", BATCH._replace(ref_chosen_logps=None, ref_rejected_logps=None), beta=0.1)
    want = []
    for lw, nw, ll, nl in ((-4, 2, -5, 4), (-6, 3, -3, 1)):
        a_w, a_l = lw / nw, ll / nl
        log_odds = (a_w - math.log(1 - math.exp(a_w))) - (a_l - math.log(1 - math.exp(a_l)))
        want.append(-a_w - 0.1 * math.log(sig(log_odds)))
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * -2, 0.1 * -2])


def test_orpo_limits():
    # beta -> 0: the SFT term alone, the chosen response's mean NLL
    assert loss("orpo", beta=1e-12).losses.tolist() == pytest.approx([2.0, 2.0])
    # equal per-token log-likelihoods: odds ratio 1, L = -a_w + beta * log 2
    same = BATCH._replace(rejected_logps=BATCH.chosen_logps, rejected_lengths=BATCH.chosen_lengths)
    assert loss("orpo", same, beta=0.5).losses.tolist() == pytest.approx([2.0 + 0.5 * math.log(2)] * 2)
    # near-certain responses (a -> 0) stay finite
    tiny = BATCH._replace(chosen_logps=t(-1e-9, -1e-9), rejected_logps=t(-1.0, -2.0))
    assert torch.isfinite(loss("orpo", tiny, beta=0.1).losses).all()


def test_the_registry_declares_what_each_loss_needs():
    assert set(PREFERENCE_LOSSES) >= {"dpo", "ipo", "simpo", "kto", "orpo"}
    needs = {n: (e.needs_reference, e.needs_mismatched) for n, e in PREFERENCE_LOSSES.items()}
    assert needs["dpo"] == needs["ipo"] == (True, False)
    assert needs["simpo"] == needs["orpo"] == (False, False)
    assert needs["kto"] == (True, True)
    with pytest.raises(ValueError, match="twice"):
        register_preference_loss("dpo", needs_reference=True)(lambda b, p: None)


@pytest.mark.parametrize("name", ["dpo", "ipo", "kto"])
def test_losses_that_need_the_reference_refuse_to_run_without_it(name):
    with pytest.raises(ValueError, match="reference"):
        loss(name, BATCH._replace(ref_chosen_logps=None, ref_rejected_logps=None))
