"""Which generated tokens are the response: every token up to and including the first end token."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def response_mask(response_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Mask of the response tokens: every generated token up to and including the first end token.

    `response_ids` must not contain the decoder start token. The mask comes from the EOS position,
    not from `!= pad`, because T5's pad id is also a token the policy may sample. Every row's first
    token is inside the mask, whatever was sampled.

    Args:
        response_ids: (B, T) generated tokens.
        eos_token_id: the end-of-sequence id, or every id that ends a response (a chat model's
            end of turn and its EOS).

    Returns:
        (B, T) bool mask, a prefix of ones per row.
    """
    ends = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)  # (E,)
    is_eos = torch.isin(response_ids, ends)  # (B, T)
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # (B, T): an EOS strictly before t
    return ~eos_seen_before
