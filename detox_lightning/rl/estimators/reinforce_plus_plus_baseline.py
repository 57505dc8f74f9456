"""REINFORCE++-baseline (`reinforce_plus_plus_baseline`), as OpenRLHF's `reinforce_baseline`.

Source: OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py (`compute_advantages_and_returns`):
each score minus the mean of its prompt's k scores (no division by the group's std: that is
OpenRLHF's `group_norm`), then exactly REINFORCE++: KL-shaped per-token rewards, cumulative
returns, normalised over the global batch's response tokens. OpenRLHF sets gamma to 1 for this
estimator; here another gamma is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from detox_lightning.rl.estimators.reinforce_plus_plus import ReinforcePlusPlus


def group_baselined(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) each score minus the mean of its group of k consecutive rows."""
    grouped = scores.view(-1, k)  # (N / k, k): one row per prompt
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)


class ReinforcePlusPlusBaseline(ReinforcePlusPlus):
    """`reinforce_plus_plus_baseline`: REINFORCE++ on scores minus their group's mean (k >= 2)."""

    name: ClassVar[str] = "reinforce_plus_plus_baseline"
    min_samples_per_prompt: ClassVar[int] = 2

    @classmethod
    def problems(cls, settings: Any) -> list[str]:
        if settings.gamma != 1.0:
            why = "a group-mean baseline of whole-response scores; OpenRLHF sets it to 1"
            return [f"model.ppo.gamma={settings.gamma} must be 1.0 with advantage_estimator={cls.name!r} ({why})"]
        return []

    def sequence_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) each score minus its group's mean: the groups are whole on every rank."""
        return group_baselined(scores, self.k)
