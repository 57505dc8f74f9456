"""Which generated tokens are the response: every token up to and including the first EOS."""

from __future__ import annotations

import torch


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mask of the response tokens: every generated token up to and including the first EOS.

    `response_ids` must not contain the decoder start token. The mask comes from the EOS position,
    not from `!= pad`, because T5's pad id is also a token the policy may sample. Every row's first
    token is inside the mask, whatever was sampled.

    Args:
        response_ids: (B, T) generated tokens.
        eos_token_id: the end-of-sequence id.

    Returns:
        (B, T) bool mask, a prefix of ones per row.
    """
    is_eos = response_ids == eos_token_id  # (B, T)
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # (B, T): an EOS strictly before t
    return ~eos_seen_before
