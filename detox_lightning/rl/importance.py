"""Importance weights between the sampler and the trainer, and how far the two disagree.

When a separate engine (vLLM) samples the responses, the tokens come from its distribution, not
exactly from the trainer's: other kernels, another precision, a LoRA applied another way. The
loss is built on the trainer's old log-probs (ratio exactly 1 at the first step), so each token's
gradient is reweighted by w = p_trainer / p_sampler, truncated at `cap` (truncated importance
sampling, trl 1.12's `vllm_importance_sampling_correction`). Source (read from the installed trl
1.12): `GRPOTrainer._generate_and_score_completions` (trl/trainer/grpo_trainer.py), which
multiplies its per-token loss by these weights.

Shapes: B = responses, T = response tokens; `mask` is 1.0 on response tokens, 0.0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceMode = Literal["truncate", "mask"]
IMPORTANCE_MODES = ("truncate", "mask")
RatioLevel = Literal["token", "sequence"]


def importance_weights(
    logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    mode: ImportanceMode = "truncate",
    level: RatioLevel = "token",
) -> torch.Tensor:
    """Truncated (or masked) importance weights of the sampled tokens, trl's four modes.

    Args:
        logprobs: (B, T) the trainer's old log-probs of the sampled tokens.
        sampler_logprobs: (B, T) the sampler's log-probs of the same tokens (NaN where it gave none).
        mask: (B, T) response mask.
        cap: the upper bound C of the ratio.
        mode: `truncate`: min(ratio, C); `mask`: 0 where ratio > C (trl's `*_truncate`, `*_mask`).
        level: `token`: one ratio per token, exp(logp - logp_sampler); `sequence`: one per
            response, exp of the summed log-ratio, on each of its tokens (trl's `sequence_*`).

    Returns:
        (B, T) weights, 1 on padding and where the sampler gave no log-prob (no correction there).
    """
    diff = torch.nan_to_num((logprobs - sampler_logprobs) * mask, nan=0.0)  # (B, T): 0 on padding
    if level == "sequence":
        diff = diff.sum(dim=1, keepdim=True).expand_as(diff)  # (B, T): the response's log-ratio on each token
    ratio = torch.exp(diff)  # (B, T)
    if mode == "truncate":
        return ratio.clamp(max=cap)
    if mode == "mask":
        return ratio.masked_fill(ratio > cap, 0.0)
    raise ValueError(f"unknown importance-sampling mode {mode!r}; expected one of {IMPORTANCE_MODES}")


def sampler_mismatch(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's, over the response tokens.

    Args:
        logprobs: (B, T) the trainer's log-probs; sampler_logprobs: (B, T) the sampler's; mask: (B, T).

    Returns:
        sums over the tokens (to be divided by the global token count, also returned, so that
        ranks can be added up first): `abs_diff` of |logp_sampler - logp|, `kl_k1` of
        logp_sampler - logp and `kl_k3` of exp(d) - d - 1 with d = logp - logp_sampler, two
        estimates of KL(sampler || trainer) from the sampler's tokens (k3 is never negative), and
        `tokens`.
    """
    mask = mask.to(logprobs.dtype)  # (B, T)
    d = torch.nan_to_num((logprobs - sampler_logprobs) * mask, nan=0.0)  # (B, T)
    return {
        "abs_diff": d.abs().sum(),
        "kl_k1": (-d).sum(),
        "kl_k3": ((torch.exp(d) - d - 1) * mask).sum(),
        "tokens": mask.sum(),
    }
