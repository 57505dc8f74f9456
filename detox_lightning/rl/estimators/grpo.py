"""Group-relative policy optimisation (`grpo`), as trl 1.12's `GRPOTrainer` computes it.

Source (read from the installed trl 1.12): `GRPOTrainer._generate_and_score_completions` and
`_compute_loss` (trl/trainer/grpo_trainer.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from detox_lightning.rl import losses
from detox_lightning.rl.estimators.base import Rollout, SequenceEstimator, per_sequence, per_token
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.stats import STD_EPS, AllReduceSum, global_mean_std, identity

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS = ("group", "batch", "none")


def grpo_advantages(
    rewards: torch.Tensor, k: int, scale_rewards: ScaleRewards = "group", all_reduce_sum: AllReduceSum = identity
) -> torch.Tensor:
    """Group-relative advantages: reward minus its group's mean, over a std (or not).

    Args:
        rewards: (N,) scores, N = prompts * k, groups of k consecutive rows.
        k: samples per prompt (>= 2).
        scale_rewards: trl's `scale_rewards`: divide by the group's std (`group`), by the whole
            batch's std (`batch`), or not at all (`none`); always + 1e-4.
        all_reduce_sum: sums over ranks, for the batch's std.

    Returns:
        (N,) advantages.
    """
    grouped = rewards.view(-1, k)  # (N / k, k): one row per prompt
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # (N,) the group's std on each row
        advantages = advantages / (std + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (global_mean_std(rewards, all_reduce_sum)[1] + STD_EPS)
    return advantages


class GRPO(SequenceEstimator):
    """`grpo`: the score minus its group's mean, over a std (`scale_rewards`); clipped ratio per
    token plus beta x the k3 KL per token in the loss (times the ratio with
    `use_bias_correction_kl`, trl's default), aggregated as `loss_type`."""

    name: ClassVar[str] = "grpo"
    reference_defaults: ClassVar[str] = (
        "trl 1.12's GRPOConfig: beta 0.0, loss_type dapo, scale_rewards group, use_bias_correction_kl true"
    )

    def __init__(self, settings: Any, max_completion_length: int | None = None) -> None:
        super().__init__(settings, max_completion_length)
        # dapo sums over the step's tokens on every rank, bnpo averages this rank's tokens; grpo and
        # dr_grpo are means over sequences
        self.token_normaliser = {"dapo": "step", "bnpo": "mini_batch"}.get(settings.loss_type, "sequences")
        self.loss_description = (
            f"clipped ratio per token, {settings.loss_type} aggregation, beta x k3 KL"
            + (" x ratio (bias-corrected)" if settings.use_bias_correction_kl else "")
        )

    def advantages(self, rollout: Rollout, all_reduce_sum: AllReduceSum = identity) -> tuple[torch.Tensor, None]:
        advantages = grpo_advantages(rollout.scores, self.k, self.settings.scale_rewards, all_reduce_sum)  # (B,)
        return per_token(advantages, rollout.mask), None  # (B, T); the KL enters the loss, not the advantages

    def loss(
        self,
        mb: Experience,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        num_items: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        beta = kl_coef if self.needs_reference else 0.0
        loss, clipfrac, kl = losses.grpo_loss(
            logprobs, mb.logprobs, per_sequence(mb.advantages), mb.mask, s.cliprange, beta=beta,
            ref_logprobs=mb.ref_logprobs, loss_type=s.loss_type, max_completion_length=self.max_completion_length,
            num_items=num_items, use_bias_correction_kl=s.use_bias_correction_kl, is_weights=mb.is_weights,
        )
        return loss, {"ppo/loss/policy": loss, "ppo/loss/total": loss, "ppo/policy/clipfrac": clipfrac, "ppo/policy/kl_k3": kl}
