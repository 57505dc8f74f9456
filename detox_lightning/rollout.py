"""Model-facing steps of a PPO iteration: sample responses, and log-probs/values of given responses.

Token alignment (encoder-decoder): the decoder input is `[start, r_1, ..., r_{T-1}]`; position t
predicts `r_{t+1}`, so `logits[:, t]`, `logprobs[:, t]` and `values[:, t]` all belong to response
token t. The decoder start token is never a response token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detox_lightning.ppo_math import response_mask
from detox_lightning.trl_compat import AutoModelForSeq2SeqLMWithValueHead, selective_log_softmax


@dataclass
class Samples:
    """Sampled responses with what generation already computed for them.

    Attributes:
        response_ids: (B, T) tokens, padded after the first EOS.
        decoder_input_ids: (B, T) the decoder inputs that produced them.
        mask: (B, T) bool response mask.
        logits: (B, T, V) raw logits of the sampling steps, float32.
        values: (B, T) value-head predictions from the decoder's last hidden states.
    """

    response_ids: torch.Tensor
    decoder_input_ids: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor


def decoder_inputs(response_ids: torch.Tensor, decoder_start_token_id: int) -> torch.Tensor:
    """Shift responses right behind the decoder start token: (B, T) -> (B, T)."""
    start = response_ids.new_full((response_ids.shape[0], 1), decoder_start_token_id)
    return torch.cat([start, response_ids[:, :-1]], dim=1)


@torch.no_grad()
def sample(
    model: AutoModelForSeq2SeqLMWithValueHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_kwargs: dict,
    **adapter_kwargs,
) -> Samples:
    """One batched `generate` call; keeps the raw logits and last decoder hidden states.

    Taking log-probs and values from generation saves a forward pass: they are computed with the
    same weights (checked against `logprobs_and_values` in the tests).
    """
    config = model.pretrained_model.config
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        return_dict_in_generate=True,
        output_logits=True,
        output_hidden_states=True,
        **generation_kwargs,
        **adapter_kwargs,
    )
    response_ids = out.sequences[:, 1:]
    mask = response_mask(response_ids, config.eos_token_id)
    response_ids = response_ids.masked_fill(~mask, config.pad_token_id)
    logits = torch.stack(out.logits, dim=1).float()  # (B, T, V)
    hidden = torch.cat([step[-1] for step in out.decoder_hidden_states], dim=1)  # (B, T, H)
    values = model.v_head(hidden).squeeze(-1).float()
    return Samples(
        response_ids=response_ids,
        decoder_input_ids=decoder_inputs(response_ids, config.decoder_start_token_id),
        mask=mask,
        logits=logits,
        values=values,
    )


def token_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (B, T) of the response tokens under `softmax(logits / temperature)`, in float32."""
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 would still copy all (B, T, V) logits
        logits = logits / temperature
    return selective_log_softmax(logits, response_ids)


def logprobs_and_values(
    model: AutoModelForSeq2SeqLMWithValueHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    response_ids: torch.Tensor,
    temperature: float,
    **adapter_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced forward pass.

    Returns:
        logits (B, T, V) float32 (not divided by the temperature), logprobs (B, T) and values (B, T).
    """
    logits, _, values = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        **adapter_kwargs,
    )
    return logits, token_logprobs(logits, response_ids, temperature), values.float()
