"""KL coefficient (beta) controllers for the per-token KL penalty in the reward.

`AdaptiveKLController` is the proportional controller of Ziegler et al. 2019 ("Fine-Tuning
Language Models from Human Preferences", sec. 2.2): it nudges beta so that the measured KL between
policy and reference tracks `target`. Both controllers expose the same interface so the PPO stage
does not care which one it holds, and both checkpoint their state with `state_dict()`.
"""

from __future__ import annotations

import math
from typing import Any


class FixedKLController:
    """Constant beta (InstructGPT used 0.02)."""

    def __init__(self, kl_coef: float) -> None:
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Beta stays fixed; the arguments are accepted so both controllers are interchangeable."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019.

    e = clip(current_kl / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    where `n_steps` is the number of samples (episodes) in the batch that produced `current_kl`.
    The clip bounds how fast beta can move on one noisy batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not init_kl_coef > 0:
            raise ValueError(
                f"init_kl_coef must be > 0 for the adaptive controller, got {init_kl_coef}"
            )
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the value that makes the KL (summed over a response) hit `target`."""
        current_kl = float(current_kl)
        if math.isnan(current_kl):
            # A NaN here would silently poison beta for the rest of the run and the checkpoint.
            raise ValueError("current_kl is NaN; cannot update the adaptive KL coefficient")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Only beta is state; target and horizon come from the config of the resumed run."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kind: str, kl_coef: float, target: float = 6.0, horizon: float = 10_000
) -> KLController:
    """Build the controller named `kind` ("fixed" or "adaptive").

    For "adaptive", `kl_coef` is the initial beta; `target` (nats per response) and `horizon`
    (samples) default to Ziegler et al.'s 6 and 10,000. "fixed" ignores `target` and `horizon`.
    """
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; choose one of: adaptive, fixed")
