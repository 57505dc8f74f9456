"""REINFORCE leave-one-out (`rloo`), as trl 1.12's `RLOOTrainer` computes it.

Source (read from the installed trl 1.12): `RLOOTrainer._generate_and_score_completions` and
`_compute_loss` (trl/trainer/rloo_trainer.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from detox_lightning.rl import losses
from detox_lightning.rl.estimators.base import Rollout, SequenceEstimator, per_sequence, per_token
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.stats import STD_EPS, AllReduceSum, global_mean_std, identity


def rloo_advantages(
    rewards: torch.Tensor, k: int, normalize: bool = False, all_reduce_sum: AllReduceSum = identity
) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's reward minus the mean of its k - 1 siblings.

    Args:
        rewards: (N,) sequence rewards (trl: score - beta * summed KL), N = prompts * k, groups of
            k consecutive rows.
        k: samples per prompt (>= 2).
        normalize: trl's `normalize_advantages`: (A - mean) / (std + 1e-4) over the whole batch.
        all_reduce_sum: sums over ranks, for the batch-wide normalisation.

    Returns:
        (N,) advantages.
    """
    grouped = rewards.view(-1, k)  # (N / k, k): one row per prompt
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (N / k, k)
    advantages = (grouped - baselines).reshape(-1)  # (N,)
    if normalize:
        mean, std = global_mean_std(advantages, all_reduce_sum)
        advantages = (advantages - mean) / (std + STD_EPS)
    return advantages


class RLOO(SequenceEstimator):
    """`rloo`: sequence reward score - beta * summed KL, minus the mean of the prompt's other k - 1
    samples; one clipped importance ratio per sequence, mean over sequences."""

    name: ClassVar[str] = "rloo"
    ratio_level: ClassVar[str] = "sequence"  # one ratio per sequence: so is a sampler's importance weight
    loss_description: ClassVar[str] = "clipped ratio per sequence, mean over sequences"
    reference_defaults: ClassVar[str] = "trl 1.12's RLOOConfig: beta 0.05 fixed, normalize_advantages false"

    def advantages(self, rollout: Rollout, all_reduce_sum: AllReduceSum = identity) -> tuple[torch.Tensor, None]:
        mask = rollout.mask  # (B, T)
        rewards = rollout.scores - rollout.kl_coef * (rollout.kl_or_zeros() * mask).sum(dim=1)  # (B,)
        advantages = rloo_advantages(rewards, self.k, self.settings.normalize_advantages, all_reduce_sum)  # (B,)
        return per_token(advantages, mask), None  # (B, T)

    def loss(
        self,
        mb: Experience,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        num_items: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        advantages = per_sequence(mb.advantages)  # (b,)
        is_weights = per_sequence(mb.is_weights) if mb.is_weights is not None else None  # (b,)
        loss, clipfrac, _ = losses.rloo_loss(
            logprobs, mb.logprobs, advantages, mb.mask, self.settings.cliprange, is_weights=is_weights
        )
        return loss, {"ppo/loss/policy": loss, "ppo/loss/total": loss, "ppo/policy/clipfrac": clipfrac}
