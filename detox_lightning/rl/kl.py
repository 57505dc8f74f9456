"""Per-token KL estimates between the policy and the frozen reference, and the KL-shaped reward.

Shapes: B = responses, T = response tokens, V = vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch

KLPenalty = Literal["k1", "abs", "mse", "full"]
KL_PENALTIES = ("k1", "abs", "mse", "full")


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLPenalty = "k1") -> torch.Tensor:
    """Per-token KL estimate between policy and reference on the sampled tokens.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
        kind: `k1` (log-ratio, trl's default), `abs` (|log-ratio|) or `mse` (half squared log-ratio,
            Schulman's k2). `full` needs whole distributions: use `full_kl`.

    Returns:
        (B, T) estimate per token.
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"kl penalty {kind!r} is not computed from sampled log-probs; expected k1, abs or mse")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-token KL(policy || reference) over the whole vocabulary, in float32.

    Args:
        logits: (B, T, V) policy logits (already divided by the temperature).
        ref_logits: (B, T, V) reference logits (likewise).

    Returns:
        (B, T) KL per position.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)  # (B, T, V)
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per token: exp(r) - r - 1, r = ref - policy.

    Args:
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under policy and reference.

    Returns:
        (B, T) non-negative estimate, 0 exactly where the two agree.
    """
    r = ref_logprobs - logprobs  # (B, T)
    return torch.exp(r) - r - 1


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: `-kl_coef * kl` on every response token, plus the score on the last one.

    Args:
        scores: (B,) sequence-level reward-model scores.
        kl: (B, T) per-token KL estimate.
        mask: (B, T) response mask (a prefix of ones per row).
        kl_coef: the KL penalty coefficient.

    Returns:
        (B, T) rewards, zero outside the mask.
    """
    mask = mask.to(kl.dtype)  # (B, T)
    rewards = -kl_coef * kl * mask  # (B, T)
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of the last response token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards
