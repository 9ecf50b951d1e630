import math

import pytest

from ppo_rlhf.algo.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.02)
    for kl in (0.0, 6.0, 100.0):
        ctl.update(kl, n_steps=64)
    assert ctl.value == 0.02


def test_adaptive_three_hand_computed_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9 > target: e = clip(9/6 - 1 = 0.5) = 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)
    # KL 6.6: e = 0.1 (inside the clip); beta *= 1 + 0.1 * 0.0256
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.10076931072, rel=1e-12)
    # KL 0: e = clip(-1) = -0.2; beta *= 1 - 0.2 * 512 / 10000 = 0.98976
    ctl.update(0.0, n_steps=512)
    assert ctl.value == pytest.approx(0.0997374329782272, rel=1e-12)


def test_adaptive_is_steady_at_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(6.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.1)


def test_adaptive_nan_kl_is_refused():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    with pytest.raises(ValueError, match="NaN"):
        ctl.update(math.nan, n_steps=8)
    assert ctl.value == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_kl_coef": 0.0, "target": 6.0, "horizon": 100},
        {"init_kl_coef": 0.1, "target": 0.0, "horizon": 100},
        {"init_kl_coef": 0.1, "target": 6.0, "horizon": 0},
    ],
)
def test_adaptive_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AdaptiveKLController(**kwargs)


def test_fixed_rejects_negative_coef():
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_state_dict_round_trip(kind):
    ctl = make_kl_controller(kind, 0.1, target=6.0, horizon=1000)
    ctl.update(12.0, n_steps=100)
    restored = make_kl_controller(kind, 0.5, target=6.0, horizon=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    ctl.update(3.0, n_steps=100)
    restored.update(3.0, n_steps=100)
    assert restored.value == ctl.value


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.05, 6.0, 10_000), FixedKLController)
    adaptive = make_kl_controller("adaptive", 0.1, 4.0, 500)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 4.0, 500.0)
    with pytest.raises(ValueError, match="adaptive, fixed"):
        make_kl_controller("pid", 0.1, 6.0, 10_000)
