"""The non-finite guard: which rollout quantities hold NaN/inf, and how many iterations were skipped."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn

from detox_lightning.rl.experience import Experience

# What `nonfinite_parts` and the update check can name; flags are summed over ranks in this order.
NONFINITE_PARTS = (
    "env/reward_mean", "ppo/scores_mean", "objective/kl", "logprobs", "values", "advantages", "returns",
    "loss", "updated weights",
)


class NonFiniteError(RuntimeError):
    """Training diverged: too many iterations in a row had NaN/inf rewards, advantages or loss."""


@dataclass
class SkipCounter:
    """Iterations skipped for non-finite values: in total and in a row (both saved in checkpoints)."""

    total: int = 0
    consecutive: int = 0

    def skip(self, parts: list[str], max_consecutive: int) -> None:
        self.total += 1
        self.consecutive += 1
        rank_zero_warn(f"PPO iteration skipped: non-finite {', '.join(parts)} ({self.consecutive} in a row)")
        if self.consecutive >= max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} PPO iterations in a row had non-finite {', '.join(parts)} "
                f"(model.ppo.max_consecutive_skips={max_consecutive}); the adapter was left as before them. "
                f"Check the reward component, or lower model.ppo.learning_rate"
            )


def nonfinite_parts(exp: Experience, stats: dict[str, float]) -> list[str]:
    """Names of the rollout quantities that hold NaN/inf (an empty list when all are finite)."""
    bad = [
        name for name in ("env/reward_mean", "ppo/scores_mean", "objective/kl") if not math.isfinite(stats.get(name, 0.0))
    ]
    for name in ("logprobs", "values", "advantages", "returns"):
        value = getattr(exp, name)  # values and returns are None where the estimator has none
        if value is not None and not torch.isfinite(value).all():
            bad.append(name)
    return bad
