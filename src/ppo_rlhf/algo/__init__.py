"""Pure tensor functions of RLHF: KL estimators and controllers, rewards, the registered advantage
estimators, policy losses and loss aggregations, TRPO's conjugate gradient and line search. No I/O
and no model code; every function has a unit test on hand-made tensors."""

from ppo_rlhf.algo import sac  # noqa: F401  (registers the "sac" update's loss)
from ppo_rlhf.algo.advantages import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageParams,
    RunningMeanStd,
    compute_gae,
    compute_rewards,
    explained_variance,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from ppo_rlhf.algo.kl import KL_ESTIMATORS, kl_penalty
from ppo_rlhf.algo.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    make_kl_controller,
)
from ppo_rlhf.algo.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossParams,
    entropy_from_logits,
    lm_loss,
    pairwise_rm_loss,
    value_loss,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageInputs",
    "AdvantageParams",
    "FixedKLController",
    "KLController",
    "PolicyLossParams",
    "RunningMeanStd",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "kl_penalty",
    "last_token_index",
    "lm_loss",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_rm_loss",
    "value_loss",
]
