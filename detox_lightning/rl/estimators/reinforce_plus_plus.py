"""REINFORCE++ (`reinforce_plus_plus`), as OpenRLHF's `reinforce` advantage estimator.

Source: OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py (`compute_advantages_and_returns`,
`get_cumulative_returns`), openrlhf/models/utils.py (`compute_reward`) and openrlhf/models/loss.py
(`PolicyLoss`, `aggregate_loss`). Per token, the reward is -kl_coef * KL plus the score on the
last response token; the return is the discounted sum of the rewards from that token on (no
critic); the advantages are the returns normalised over every response token of the global batch
(mean and biased std, `masked_standardize`). The loss is PPO's clipped ratio per token, summed
over the optimizer step's tokens and divided by their count on every rank (OpenRLHF's token-level
`aggregate_loss`). One difference: OpenRLHF clamps each token's KL estimate to [-10, 10]; here the
KL is `kl_penalty`'s, unclamped, as for `gae`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from detox_lightning.rl import losses
from detox_lightning.rl.estimators.base import Estimator, Rollout
from detox_lightning.rl.estimators.gae import discounted_cumsum
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.kl import shape_rewards
from detox_lightning.rl.stats import AllReduceSum, identity, masked_standardize


def cumulative_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """OpenRLHF's `get_cumulative_returns`: G_t = sum_{j >= t} gamma^(j - t) * r_j over the response.

    Args:
        rewards: (B, T) per-token rewards.
        mask: (B, T) response mask.
        gamma: discount factor.

    Returns:
        (B, T) returns, zero outside the mask.
    """
    mask = mask.to(rewards.dtype)  # (B, T)
    return discounted_cumsum(rewards * mask, gamma) * mask  # (B, T)


def reinforce_plus_plus_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float,
    all_reduce_sum: AllReduceSum = identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages and returns.

    Args:
        scores: (B,) sequence scores (for the baseline variant: minus their group's mean).
        kl: (B, T) per-token KL estimate.
        mask: (B, T) response mask.
        kl_coef: the KL coefficient.
        gamma: discount factor.
        all_reduce_sum: sums over ranks: the normalisation uses every rank's response tokens.

    Returns:
        advantages (B, T) (normalised, zero outside the mask) and returns (B, T).
    """
    rewards = shape_rewards(scores, kl, mask, max(kl_coef, 0.0))  # (B, T): -kl_coef * KL, + score on the last token
    returns = cumulative_returns(rewards, mask, gamma)  # (B, T)
    advantages = masked_standardize(returns, mask, all_reduce_sum) * mask  # (B, T)
    return advantages, returns


class ReinforcePlusPlus(Estimator):
    """`reinforce_plus_plus`: REINFORCE with PPO's tricks and no critic (OpenRLHF's `reinforce`)."""

    name: ClassVar[str] = "reinforce_plus_plus"
    token_normaliser: ClassVar[str] = "step"
    loss_description: ClassVar[str] = "clipped ratio per token, summed over the optimizer step's tokens / their count"
    reference_defaults: ClassVar[str] = "OpenRLHF: the KL in the reward, advantages whitened over the global batch"

    def sequence_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) the scores that enter the reward: as they are."""
        return scores

    def advantages(
        self, rollout: Rollout, all_reduce_sum: AllReduceSum = identity
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.sequence_scores(rollout.scores)  # (B,)
        return reinforce_plus_plus_advantages(
            scores, rollout.kl_or_zeros(), rollout.mask, rollout.kl_coef, self.settings.gamma, all_reduce_sum
        )  # (B, T) advantages and returns

    def loss(
        self,
        mb: Experience,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        num_items: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, clipfrac, _ = losses.policy_loss(
            logprobs, mb.logprobs, mb.advantages, mb.mask, self.settings.cliprange, num_items=num_items,
            is_weights=mb.is_weights,
        )
        return loss, {"ppo/loss/policy": loss, "ppo/loss/total": loss, "ppo/policy/clipfrac": clipfrac}
