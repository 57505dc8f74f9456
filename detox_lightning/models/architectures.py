"""What differs between encoder-decoder and decoder-only policies, in one place.

The RL step never branches on the architecture; it asks the policy's `Architecture` how to pad
prompts, where the response starts in what `generate` returns, how to run a teacher-forced pass
over prompt + response, and which hidden states the value head reads.

Token alignment, so that `logits[:, t]`, `logprobs[:, t]` and `values[:, t]` belong to response
token t in both:

- encoder-decoder (T5): the prompt is encoded (right-padded); the decoder input is
  `[start, r_1, ..., r_{T-1}]` and position t predicts `r_{t+1}`.
- decoder-only: one sequence `[prompt (left-padded), r_1, ..., r_T]`; the logits at the last prompt
  position score `r_1`, so the response's logits are positions `P - 1 ... P + T - 2`, and the
  values are read at the same positions (the state before each response token, as trl's causal PPO).
  Position ids count only attended tokens, as `generate` numbers a left-padded prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PaddingSide = Literal["left", "right"]


def decoder_inputs(response_ids: torch.Tensor, decoder_start_token_id: int) -> torch.Tensor:
    """Shift responses right behind the decoder start token: (B, T) -> (B, T)."""
    start = response_ids.new_full((response_ids.shape[0], 1), decoder_start_token_id)
    return torch.cat([start, response_ids[:, :-1]], dim=1)


@dataclass(frozen=True)
class Architecture:
    """How one kind of policy is fed and read. Use `SEQ2SEQ` or `CAUSAL`."""

    name: Literal["seq2seq", "causal"]
    padding_side: PaddingSide
    task_type: Literal["SEQ_2_SEQ_LM", "CAUSAL_LM"]

    @property
    def is_encoder_decoder(self) -> bool:
        return self.name == "seq2seq"

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM

    def min_length_kwargs(self, min_length: int) -> dict:
        """`generate` kwargs for at least `min_length - 1` response tokens (EOS banned before them).

        `min_length` counts the decoder start token for encoder-decoders, as `generate` does; for
        decoder-only models `generate`'s `min_length` would count the prompt, so `min_new_tokens`.
        """
        if self.is_encoder_decoder:
            return {"min_length": min_length}
        return {"min_new_tokens": max(min_length - 1, 0)}

    def trim_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int):
        """Prompts cut to `width` columns, keeping the tokens (padding is on `padding_side`)."""
        if self.padding_side == "right":
            return input_ids[:, :width], attention_mask[:, :width]
        return input_ids[:, input_ids.shape[1] - width :], attention_mask[:, attention_mask.shape[1] - width :]

    def responses(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The generated tokens of `generate`'s output: after the decoder start token, or after the prompt."""
        return sequences[:, 1:] if self.is_encoder_decoder else sequences[:, prompt_width:]

    def generated_hidden(self, out) -> torch.Tensor:
        """(B, T, H) last-layer hidden states that produced each generated token (`output_hidden_states`)."""
        if self.is_encoder_decoder:
            return torch.cat([step[-1] for step in out.decoder_hidden_states], dim=1)
        first = out.hidden_states[0][-1][:, -1:]  # the prompt pass: its last position predicts r_1
        return torch.cat([first, *(step[-1] for step in out.hidden_states[1:])], dim=1)

    def forward(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One teacher-forced pass of the value-head `model` over prompt and response.

        Returns:
            logits (B, T, V) float32 and values (B, T) (None without a value head), position t
            belonging to response token t.
        """
        if self.is_encoder_decoder:
            start = model.pretrained_model.config.decoder_start_token_id
            dec = decoder_inputs(response_ids, start)
            logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec)
            return logits, values
        width, length = input_ids.shape[1], response_ids.shape[1]
        ids = torch.cat([input_ids, response_ids], dim=1)
        mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # only the T + 1 last positions' logits are computed: (B, P + T, V) would be mostly prompt
        logits, _, values = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=length + 1)
        logits = logits[:, :length]
        if values is not None:
            values = values[:, width - 1 : width - 1 + length]
        return logits, values


SEQ2SEQ = Architecture("seq2seq", "right", "SEQ_2_SEQ_LM")
CAUSAL = Architecture("causal", "left", "CAUSAL_LM")


def architecture_of(config) -> Architecture:
    """`SEQ2SEQ` for an encoder-decoder model config, else `CAUSAL`."""
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL
