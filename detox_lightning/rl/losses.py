"""Clipped policy-gradient losses and the clipped value loss, on one micro-batch.

Shapes: B = responses, T = response tokens; `mask` is 1.0 on response tokens, 0.0 on padding.
Sources of the critic-free losses (read from the installed trl 1.12): `RLOOTrainer._compute_loss`
(trl/trainer/rloo_trainer.py) and `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py).
"""

from __future__ import annotations

from typing import Literal

import torch

from detox_lightning.rl.kl import k3_kl
from detox_lightning.trl_compat import masked_mean

GRPOLossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    num_items: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss per token (trl's PPO, OpenRLHF's `PolicyLoss`).

    Args:
        logprobs, old_logprobs: (B, T) per-token log-probs now and at the rollout.
        advantages: (B, T) per-token advantages.
        mask: (B, T) response mask.
        cliprange: epsilon of the ratio clip [1 - eps, 1 + eps].
        num_items: None: the masked mean over this batch's tokens; else the masked sum divided by
            it (the token count of a whole optimizer step, as OpenRLHF's `batch_num_tokens`).
        is_weights: (B, T) importance weights of a separate sampler (`rl.importance`), multiplying
            each token's loss; None: 1.

    Returns:
        loss (mean of max(-A r, -A clip(r)) over tokens), clipfrac (fraction of tokens where the
        clip was active) and approxkl (0.5 * masked mean of the squared log-ratio), all scalars.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    losses = -advantages * ratio  # (B, T)
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    per_token = torch.max(losses, losses_clipped)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights  # (B, T)
    if num_items is None:
        loss = masked_mean(per_token, mask)
    else:
        loss = (per_token * mask).sum() / max(num_items, 1.0)
    clipfrac = masked_mean((losses_clipped > losses).to(logprobs.dtype), mask)
    approxkl = 0.5 * masked_mean(log_ratio.square(), mask)
    return loss, clipfrac, approxkl


def value_loss(
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    num_items: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked mean of max(unclipped, clipped) squared errors.

    Args:
        vpred: (B, T) value predictions now; old_values: (B, T) at the rollout.
        returns: (B, T) GAE returns; mask: (B, T) response mask.
        cliprange_value: how far a prediction may move from its rollout value before clipping.
        num_items: None: the mean over this batch's tokens; else the masked sum divided by it.

    Returns:
        loss and clipfrac (fraction of tokens where the clipped error was the larger), scalars.
    """
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)  # (B, T)
    losses = (vpred - returns).square()  # (B, T)
    losses_clipped = (vpred_clipped - returns).square()  # (B, T)
    per_token = torch.max(losses, losses_clipped)  # (B, T)
    loss = 0.5 * (masked_mean(per_token, mask) if num_items is None else (per_token * mask).sum() / max(num_items, 1.0))
    clipfrac = masked_mean((losses_clipped > losses).to(vpred.dtype), mask)
    return loss, clipfrac


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """trl 1.12's RLOO loss: one clipped importance ratio per sequence, mean over sequences.

    Args:
        logprobs, old_logprobs: (B, T) per-token log-probs now and at the rollout.
        advantages: (B,) sequence advantages.
        mask: (B, T) response mask.
        cliprange: epsilon of the ratio clip [1 - eps, 1 + eps].
        is_weights: (B,) a separate sampler's importance weight of each sequence; None: 1.

    Returns:
        loss, clip fraction (sequences whose ratio was clipped where it mattered), mean ratio.
    """
    log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=1)  # (B,): the sequence's log-ratio
    ratio = torch.exp(log_ratio)  # (B,)
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange)  # (B,)
    per_sequence = -torch.min(ratio * advantages, clipped * advantages)  # (B,)
    loss = (per_sequence if is_weights is None else per_sequence * is_weights).mean()
    is_clipped = ((ratio < 1 - cliprange) & (advantages < 0)) | ((ratio > 1 + cliprange) & (advantages > 0))
    return loss, is_clipped.float().mean(), ratio.mean()


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
    use_bias_correction_kl: bool = False,
    is_weights: torch.Tensor | None = None,
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
        num_items: the token count of `dapo` (the whole optimizer step's, per rank: global count /
            world size) and `bnpo` (this rank's mini-batch); None: this batch's tokens.
        use_bias_correction_kl: trl's `use_bias_correction_kl`: multiply the k3 KL by the
            (differentiable) importance ratio, so that it estimates the KL of the current policy
            from samples of the rollout's.
        is_weights: (B, T) a separate sampler's importance weights, multiplying the clipped term
            (not the KL term), as trl's `vllm_importance_sampling_correction`; None: 1.

    Returns:
        loss, clip fraction (tokens clipped where it mattered), mean KL term per token (the k3 KL,
        times the ratio with the bias correction; 0 without beta).
    """
    adv = advantages.unsqueeze(1)  # (B, 1): one advantage on each of the response's tokens
    coef_1 = torch.exp(logprobs - old_logprobs)  # (B, T)
    coef_2 = torch.clamp(coef_1, 1 - cliprange, 1 + cliprange)  # (B, T)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights  # (B, T)
    kl = torch.zeros_like(per_token)  # (B, T)
    if beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)  # (B, T)
        if use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)  # (B, T)
    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / (tokens if num_items is None else max(num_items, 1.0))
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (tokens if num_items is None else max(num_items, 1.0))
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    is_clipped = ((coef_1 < 1 - cliprange) & (adv < 0)) | ((coef_1 > 1 + cliprange) & (adv > 0))  # (B, T)
    clipfrac = (is_clipped.float() * mask).sum() / tokens
    return loss, clipfrac, (kl.detach() * mask).sum() / tokens
