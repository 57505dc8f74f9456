"""Fluency: how likely a frozen evaluator model finds each response, given its prompt.

The detoxification literature reports the perplexity of the generated continuations under a
larger frozen LM; here the evaluator is the run's frozen reference (the starting policy), so a
policy that lowers toxicity by writing text its own starting point finds unlikely shows it.
"""

from __future__ import annotations

import torch

from detox_lightning.models.architectures import Architecture
from detox_lightning.models.rollout import logprobs_and_values


@torch.no_grad()
def response_log_perplexity(
    model,
    arch: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each response's tokens, NaN for an empty response.

    Teacher-forced at temperature 1 (the evaluator's own distribution, whatever the sampling
    temperature was), prompt tokens excluded: only the response is judged, conditioned on its prompt.

    Args:
        model: the evaluator (e.g. the policy inside `reference_mode`), in eval mode.
        input_ids, attention_mask: (B, P) prompts, padded on the architecture's side.
        response_ids: (B, T) responses; mask: (B, T) 1 on response tokens, EOS included.
    """
    _, logprobs, _ = logprobs_and_values(model, arch, input_ids, attention_mask, response_ids, mask, 1.0)  # (B, T)
    m = mask.to(logprobs.dtype)  # (B, T)
    return -(logprobs * m).sum(dim=1) / m.sum(dim=1)  # (B,): 0 / 0 is NaN for an empty response
