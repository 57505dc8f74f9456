"""One batch of rollouts with everything the update needs, whatever the estimator."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Experience:
    """One batch of rollouts; every tensor has the responses on dim 0 (B = prompts x k).

    Shape contract, the same for every estimator: `advantages` is (B, T), one value per response
    token and zero on padding; a sequence-level estimator (rloo, grpo) repeats its (B,) advantage
    on each of the response's tokens. `values` and `returns` are (B, T) where the estimator has
    them (gae: both; reinforce_plus_plus: returns), else None; `ref_logprobs` (B, T) wherever the
    reference pass ran.

    Attributes:
        input_ids, attention_mask: (B, P) prompts, padded on `padding_side`.
        response_ids: (B, T) sampled tokens, padded after the first EOS.
        mask: (B, T) float response mask.
        logprobs: (B, T) the rollout policy's log-probs of the response tokens.
        is_weights: (B, T) importance weights of a separate sampler (`rl.importance`: trainer over
            sampler probability, truncated), multiplying each token's policy-gradient loss; None
            when the trainer sampled itself. A sequence-level weight is repeated on its tokens.
        first_epoch: the first update epoch's mini-batches, each a list of micro-batch row
            indices; the rollout was scored in exactly these micro-batches (see `score_rollout`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    padding_side: str = "right"  # of the prompts, "left" or "right": the policy architecture's
    first_epoch: list[list[torch.Tensor]] | None = None

    def select(self, idx: torch.Tensor) -> Experience:
        """Rows `idx`, with prompt and response padding trimmed to this selection's longest."""
        prompt_len = int(self.attention_mask[idx].sum(dim=1).max())
        response_len = int(self.mask[idx].sum(dim=1).max())
        fields = {}
        for name, value in vars(self).items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value[idx]  # (b, ...)
            if name in ("input_ids", "attention_mask"):  # prompt padding sits on `padding_side`
                keep = slice(None, prompt_len) if self.padding_side == "right" else slice(-prompt_len, None)
                value = value[:, keep]  # (b, p)
            else:
                value = value[:, :response_len]  # (b, t): every other tensor is per response token
            fields[name] = value
        return replace(self, first_epoch=None, **fields)  # a selection has no epoch plan of its own
