"""What differs between encoder-decoder and decoder-only policies, in one place.

The RL step and the SFT stage never branch on the architecture; they ask the policy's
`Architecture` which classes load it (plain and with trl's value head), how its tokenizer pads,
where the response starts in what `generate` returns, how to run a teacher-forced pass over
prompt + response, and which hidden states the value head reads. Export and the model card ask it
which Auto class loads the result.

Token alignment, so that `logits[:, t]`, `logprobs[:, t]` and `values[:, t]` belong to response
token t in both:

- encoder-decoder (T5): the prompt is encoded (right-padded); the decoder input is
  `[start, r_1, ..., r_{T-1}]` and position t predicts `r_{t+1}`.
- decoder-only: one sequence `[prompt (left-padded), r_1, ..., r_T]`; the logits at the last prompt
  position score `r_1`, so the response's logits are positions `P - 1 ... P + T - 2`, and the
  values are read at the same positions (the state before each response token, as trl's causal PPO).
  Position ids count only attended tokens (`cumsum - 1` of the mask), as `generate` numbers a
  left-padded prompt: models with learned absolute positions (GPT-2, GPT-Neo) would otherwise read
  each padded row at shifted positions.
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

    @property
    def vllm_serves(self) -> bool:
        """Whether a vLLM server can sample this architecture: vLLM dropped encoder-decoder models."""
        return not self.is_encoder_decoder

    def auto_model_class(self):
        """The transformers Auto class that loads the base model, an exported merge, or the adapter's base."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM

    def value_head_class(self):
        """trl's value-head wrapper for this architecture (with our fixes, see trl_compat.py)."""
        from detox_lightning.trl_compat import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

        return AutoModelForSeq2SeqLMWithValueHead if self.is_encoder_decoder else AutoModelForCausalLMWithValueHead

    def prepare_tokenizer(self, tokenizer):
        """Pad on this architecture's side (right for T5's encoder, left for the prompts `generate`
        continues) and, without a pad token, with EOS (`pad_with_eos`). Returns the tokenizer."""
        pad_with_eos(tokenizer)
        tokenizer.padding_side = self.padding_side
        return tokenizer

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

    def teacher_forced_inputs(
        self,
        config,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> dict:
        """Model kwargs for one teacher-forced pass over prompt (B, P) and response (B, T).

        Args:
            config: the model's config (for T5's decoder start token).
        """
        if self.is_encoder_decoder:
            dec = decoder_inputs(response_ids, config.decoder_start_token_id)  # (B, T)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": dec}
        ids = torch.cat([input_ids, response_ids], dim=1)  # (B, P + T)
        mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P + T): 0 at the first attended token
        # only the T + 1 last positions' logits are computed: (B, P + T, V) would be mostly prompt
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": response_ids.shape[1] + 1}

    def response_logits(self, logits: torch.Tensor, length: int) -> torch.Tensor:
        """(B, T, V) logits of response tokens 1..T from the output logits of a pass fed
        `teacher_forced_inputs` (the RL pass below, or the SFT stage's through a plain LM)."""
        # causal: (B, T + 1, V) kept; positions P-1 .. P+T-2 score r_1 .. r_T, the last one nothing
        return logits if self.is_encoder_decoder else logits[:, :length]

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
        inputs = self.teacher_forced_inputs(model.pretrained_model.config, input_ids, attention_mask, response_ids, response_mask)
        logits, _, values = model(**inputs)
        width, length = input_ids.shape[1], response_ids.shape[1]
        if values is not None and not self.is_encoder_decoder:
            values = values[:, width - 1 : width - 1 + length]  # (B, T): the states before r_1 .. r_T
        return self.response_logits(logits, length), values


SEQ2SEQ = Architecture("seq2seq", "right", "SEQ_2_SEQ_LM")
CAUSAL = Architecture("causal", "left", "CAUSAL_LM")


def pad_with_eos(tokenizer):
    """A tokenizer without a pad token (most causal LMs) pads with EOS: padding is masked by
    attention, never compared by id, so the id it borrows does not matter. Returns the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def architecture_of(config) -> Architecture:
    """`SEQ2SEQ` for an encoder-decoder model config, else `CAUSAL`."""
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL
