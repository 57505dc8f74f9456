"""Critic-free estimators beside GAE: RLOO and GRPO advantages and losses, as trl 1.12 computes them.

Pure functions on (N,) sequence rewards and (B, T) per-token tensors plus a mask; no model, no
Lightning. Rewards come in groups: the k samples of one prompt are k consecutive rows
(`[p0, p0, p1, p1, ...]` for k = 2), so a group never spans two data-parallel ranks. Whatever is
batch-wide (advantage normalisation, GRPO's `scale_rewards: batch`) takes an `all_reduce_sum`
that sums over ranks (the identity on one device), so it is the same on every rank as on one
device with the whole batch.

Sources (read from the installed trl 1.12): `RLOOTrainer._generate_and_score_completions` and
`_compute_loss` (trl/trainer/rloo_trainer.py), `GRPOTrainer._generate_and_score_completions` and
`_compute_loss` (trl/trainer/grpo_trainer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Estimator = Literal["gae", "rloo", "grpo"]
ScaleRewards = Literal["group", "batch", "none"]
GRPOLossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]
ESTIMATORS = ("gae", "rloo", "grpo")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
STD_EPS = 1e-4  # trl's epsilon under every std it divides by

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def global_mean_std(x: torch.Tensor, all_reduce_sum: AllReduceSum = _identity) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of `x` over every rank's values (trl's `nanstd`, without NaNs)."""
    count_sum = all_reduce_sum(torch.stack([x.new_tensor(float(x.numel())), x.sum()]))
    count, mean = count_sum[0], count_sum[1] / count_sum[0]
    sq = all_reduce_sum(((x - mean) ** 2).sum())
    return mean, torch.sqrt(sq / (count - 1))


def rloo_advantages(
    rewards: torch.Tensor, k: int, normalize: bool = False, all_reduce_sum: AllReduceSum = _identity
) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's reward minus the mean of its k - 1 siblings.

    Args:
        rewards: (N,) sequence rewards (trl: score - beta * summed KL), N = prompts * k, groups of
            k consecutive rows.
        k: samples per prompt (>= 2).
        normalize: trl's `normalize_advantages`: (A - mean) / (std + 1e-4) over the whole batch.

    Returns:
        (N,) advantages.
    """
    grouped = rewards.view(-1, k)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    advantages = (grouped - baselines).reshape(-1)
    if normalize:
        mean, std = global_mean_std(advantages, all_reduce_sum)
        advantages = (advantages - mean) / (std + STD_EPS)
    return advantages


def grpo_advantages(
    rewards: torch.Tensor, k: int, scale_rewards: ScaleRewards = "group", all_reduce_sum: AllReduceSum = _identity
) -> torch.Tensor:
    """Group-relative advantages: reward minus its group's mean, over a std (or not).

    Args:
        rewards: (N,) scores, N = prompts * k, groups of k consecutive rows.
        k: samples per prompt (>= 2).
        scale_rewards: trl's `scale_rewards`: divide by the group's std (`group`), by the whole
            batch's std (`batch`), or not at all (`none`); always + 1e-4.

    Returns:
        (N,) advantages.
    """
    grouped = rewards.view(-1, k)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        advantages = advantages / (std + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (global_mean_std(rewards, all_reduce_sum)[1] + STD_EPS)
    return advantages


def group_reward_std(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N / k,) unbiased std of the rewards within each group (trl logs their mean as `reward_std`)."""
    return rewards.view(-1, k).std(dim=1)


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """trl 1.12's RLOO loss: one clipped importance ratio per sequence, mean over sequences.

    Args:
        logprobs, old_logprobs: (B, T) per-token log-probs now and at the rollout.
        advantages: (B,) sequence advantages.
        mask: (B, T) response mask.
        cliprange: epsilon of the ratio clip [1 - eps, 1 + eps].

    Returns:
        loss, clip fraction (sequences whose ratio was clipped where it mattered), mean ratio.
    """
    log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    is_clipped = ((ratio < 1 - cliprange) & (advantages < 0)) | ((ratio > 1 + cliprange) & (advantages > 0))
    return loss, is_clipped.float().mean(), ratio.mean()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per token: exp(r) - r - 1, r = ref - policy."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: GRPOLossType = "dapo",
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """trl 1.12's GRPO loss (token-level ratio, two-sided clip, KL as a loss term).

    Args:
        logprobs, old_logprobs: (B, T) per-token log-probs now and at the rollout.
        advantages: (B,) sequence advantages (one per response, on each of its tokens).
        mask: (B, T) response mask.
        cliprange: epsilon of the ratio clip.
        beta: coefficient of the k3 KL to the reference added to every token's loss; 0: none.
        ref_logprobs: (B, T) the reference's log-probs (needed when beta > 0).
        loss_type: how token losses are aggregated: `dapo` (trl's default: sum over the optimizer
            step's tokens / their count, `num_items`), `grpo` (mean per sequence, then over
            sequences), `bnpo` (mean over this batch's tokens), `dr_grpo` (sum / (B * max length)).
        max_completion_length: the token cap (`dr_grpo`).
        num_items: `dapo`'s normaliser: response tokens of the whole optimizer step, per rank
            (global count / world size); None: this batch's tokens.

    Returns:
        loss, clip fraction (tokens clipped where it mattered), mean k3 KL per token (0 without beta).
    """
    adv = advantages.unsqueeze(1)
    coef_1 = torch.exp(logprobs - old_logprobs)
    coef_2 = torch.clamp(coef_1, 1 - cliprange, 1 + cliprange)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (tokens if num_items is None else max(num_items, 1.0))
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    is_clipped = ((coef_1 < 1 - cliprange) & (adv < 0)) | ((coef_1 > 1 + cliprange) & (adv > 0))
    clipfrac = (is_clipped.float() * mask).sum() / tokens
    return loss, clipfrac, (kl * mask).sum() / tokens
