"""Pure RL math on (B, T) tensors plus a mask, torch only (no model, no Lightning).

One concept a file: `masks` (which tokens are the response), `kl` (per-token KL estimates and the
KL-shaped reward), `controllers` (the KL coefficient), `stats` (whitening and batch statistics
over ranks), `losses` (clipped policy and value losses), `experience` (the batch an update reads),
and `estimators/` (the advantage estimators behind one interface, and their registry).
"""

from detox_lightning.rl.controllers import AdaptiveKLController, FixedKLController, kl_controller
from detox_lightning.rl.estimators import (
    ESTIMATORS,
    Estimator,
    Rollout,
    build_estimator,
    cumulative_returns,
    grpo_advantages,
    rloo_advantages,
)
from detox_lightning.rl.estimators.gae import gae
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.kl import KL_PENALTIES, KLPenalty, full_kl, k3_kl, per_token_kl, shape_rewards
from detox_lightning.rl.losses import GRPO_LOSS_TYPES, grpo_loss, policy_loss, rloo_loss, value_loss
from detox_lightning.rl.masks import response_mask
from detox_lightning.rl.stats import (
    RunningMoments,
    global_mean_std,
    group_reward_std,
    masked_standardize,
    masked_whiten,
)

__all__ = [
    "ESTIMATORS",
    "GRPO_LOSS_TYPES",
    "KL_PENALTIES",
    "AdaptiveKLController",
    "Estimator",
    "Experience",
    "FixedKLController",
    "KLPenalty",
    "Rollout",
    "RunningMoments",
    "build_estimator",
    "cumulative_returns",
    "full_kl",
    "gae",
    "global_mean_std",
    "group_reward_std",
    "grpo_advantages",
    "grpo_loss",
    "k3_kl",
    "kl_controller",
    "masked_standardize",
    "masked_whiten",
    "per_token_kl",
    "policy_loss",
    "response_mask",
    "rloo_advantages",
    "rloo_loss",
    "shape_rewards",
    "value_loss",
]
