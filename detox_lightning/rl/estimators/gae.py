"""PPO's estimator: per-token GAE on KL-shaped rewards, whitened, with a value head (trl 1.12 PPO)."""

from __future__ import annotations

from typing import ClassVar

import torch

from detox_lightning.rl import losses, stats
from detox_lightning.rl.estimators.base import Estimator, Rollout
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.kl import shape_rewards
from detox_lightning.rl.stats import AllReduceSum, identity
from detox_lightning.trl_compat import masked_mean


def discounted_cumsum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """y_t = sum_{j >= t} discount^(j - t) * x_j along the tokens, vectorised (no Python loop).

    Args:
        x: (B, T) per-token values, zero where they must not count.
        discount: the per-step factor; 0 keeps y = x exactly (0 ** 0 == 1).

    Returns:
        (B, T) discounted sums of the tokens from t on.
    """
    t = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)  # (T,)
    exponent = t[None, :] - t[:, None]  # (T, T): j - t
    weights = torch.pow(torch.tensor(discount, dtype=x.dtype, device=x.device), exponent.clamp(min=0))  # (T, T)
    weights = torch.triu(weights)  # (T, T): only j >= t
    return x @ weights.T  # (B, T)


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over tokens (no Python loop).

    A_t = sum_{k >= t} (gamma * lam)^(k - t) * delta_k with delta_t = r_t + gamma * V_{t+1} - V_t,
    and V = 0 after the last response token.

    Args:
        values: (B, T) value predictions of the rollout.
        rewards: (B, T) shaped per-token rewards.
        mask: (B, T) response mask.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        advantages (B, T) (not whitened) and returns = advantages + values, both zero outside the mask.
    """
    mask = mask.to(values.dtype)  # (B, T)
    values = values * mask  # (B, T)
    rewards = rewards * mask  # (B, T)
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # (B, T): V_{t+1}, 0 after the end
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantages = discounted_cumsum(deltas, gamma * lam) * mask  # (B, T)
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


class GAE(Estimator):
    """`gae`: rewards -kl_coef * KL per token plus the score on the last token; GAE with the value
    head; advantages whitened over every rank's tokens (trl's `masked_whiten`); clipped ratio per
    token plus `vf_coef` x the clipped value loss."""

    name: ClassVar[str] = "gae"
    needs_value_head: ClassVar[bool] = True
    token_normaliser: ClassVar[str] = "mini_batch"
    loss_description: ClassVar[str] = "clipped ratio per token, mean over the mini-batch's tokens, + vf_coef x clipped value loss"
    reference_defaults: ClassVar[str] = (
        "trl 1.12's PPOConfig: kl_coef 0.05 fixed; the notebook's classic trl: 0.2 adaptive, target 6"
    )

    def advantages(
        self, rollout: Rollout, all_reduce_sum: AllReduceSum = identity
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, mask = self.settings, rollout.mask
        rewards = shape_rewards(rollout.scores, rollout.kl_or_zeros(), mask, rollout.kl_coef)  # (B, T)
        advantages, returns = gae(rollout.values, rewards, mask, s.gamma, s.lam)  # (B, T) each
        advantages = stats.masked_whiten(advantages, mask, all_reduce_sum) * mask  # (B, T), by attribute: tests wrap it
        return advantages, returns

    def loss(
        self,
        mb: Experience,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        num_items: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        pg_loss, clipfrac, _ = losses.policy_loss(
            logprobs, mb.logprobs, mb.advantages, mb.mask, s.cliprange, num_items, is_weights=mb.is_weights
        )
        vf_loss, vf_clipfrac = losses.value_loss(values, mb.values, mb.returns, mb.mask, s.cliprange_value, num_items)
        loss = pg_loss + s.vf_coef * vf_loss
        return loss, {
            "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss,
            "ppo/policy/clipfrac": clipfrac, "ppo/val/clipfrac": vf_clipfrac,
            "ppo/val/vpred": masked_mean(values, mb.mask),
        }
