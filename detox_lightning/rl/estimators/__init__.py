"""The advantage estimators, by name: the only place that maps `advantage_estimator` to a class.

Adding one is one file (a subclass of `Estimator`) and one line below.
"""

from __future__ import annotations

from typing import Any

from detox_lightning.rl.estimators.base import Estimator, Rollout, SequenceEstimator, per_sequence, per_token
from detox_lightning.rl.estimators.gae import GAE, discounted_cumsum
from detox_lightning.rl.estimators.grpo import GRPO, SCALE_REWARDS, ScaleRewards, grpo_advantages
from detox_lightning.rl.estimators.reinforce_plus_plus import (
    ReinforcePlusPlus,
    cumulative_returns,
    reinforce_plus_plus_advantages,
)
from detox_lightning.rl.estimators.reinforce_plus_plus_baseline import ReinforcePlusPlusBaseline, group_baselined
from detox_lightning.rl.estimators.rloo import RLOO, rloo_advantages

ESTIMATORS: dict[str, type[Estimator]] = {
    "gae": GAE,
    "rloo": RLOO,
    "grpo": GRPO,
    "reinforce_plus_plus": ReinforcePlusPlus,
    "reinforce_plus_plus_baseline": ReinforcePlusPlusBaseline,
}


def samples_per_prompt_problem(settings: Any) -> str | None:
    """The line naming `samples_per_prompt` when it is below what the estimator needs (1 for any)."""
    k, name = settings.samples_per_prompt, settings.advantage_estimator
    least = ESTIMATORS[name].min_samples_per_prompt if name in ESTIMATORS else 1
    if k >= max(least, 1):
        return None
    why = f"{least} with advantage_estimator={name!r} (it compares a prompt's samples)" if least > 1 else "1"
    return f"model.ppo.samples_per_prompt={k} must be at least {why}"


def estimator_problems(settings: Any) -> list[str]:
    """An unknown `advantage_estimator`, or the chosen estimator's own setting problems."""
    name = settings.advantage_estimator
    if name not in ESTIMATORS:
        return [f"model.ppo.advantage_estimator={name!r} is not one of {', '.join(ESTIMATORS)}"]
    return ESTIMATORS[name].problems(settings)


def build_estimator(settings: Any, max_completion_length: int | None = None) -> Estimator:
    """The estimator that `settings.advantage_estimator` names, built from `settings`."""
    return ESTIMATORS[settings.advantage_estimator](settings, max_completion_length)


__all__ = [
    "ESTIMATORS",
    "GAE",
    "GRPO",
    "RLOO",
    "SCALE_REWARDS",
    "Estimator",
    "ReinforcePlusPlus",
    "ReinforcePlusPlusBaseline",
    "Rollout",
    "ScaleRewards",
    "SequenceEstimator",
    "build_estimator",
    "cumulative_returns",
    "discounted_cumsum",
    "estimator_problems",
    "group_baselined",
    "grpo_advantages",
    "per_sequence",
    "per_token",
    "reinforce_plus_plus_advantages",
    "rloo_advantages",
    "samples_per_prompt_problem",
]
