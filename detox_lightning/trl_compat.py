"""Every import from trl lives here, so a move to another trl layout touches one file.

trl 1.13 removed its PPO code and value head; the 1.12.x line keeps them under
`trl.experimental.ppo`. We pin that line (see pyproject.toml).
"""

import os

import torch

# trl warns on every import of trl.experimental; we pin the version, so the warning says nothing new.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import AutoModelForCausalLMWithValueHead as _TrlCausalWithValueHead
from trl.experimental.ppo import AutoModelForSeq2SeqLMWithValueHead as _TrlSeq2SeqWithValueHead
from trl.experimental.ppo.ppo_trainer import masked_mean, masked_var, masked_whiten
from trl.trainer.utils import entropy_from_logits, selective_log_softmax


class _ValueHeadFixes:
    """What we change in trl 1.12's two value-head wrappers (seq2seq and causal).

    - `from_pretrained` without touching `torch.distributed`: trl asks accelerate's `PartialState`
      for the device; under Lightning's DDP launcher a child rank already has `LOCAL_RANK` and
      `WORLD_SIZE` set when the CLI builds the model, so `PartialState` tries its own `env://`
      process group and fails (no `RANK`). The device only matters for 8/4-bit loading, which we do
      not use; Lightning moves the model later.
    - `forward` without trl's `past_key_values=None` on every call: transformers >= 5.24
      deprecates that argument (a FutureWarning on every forward: "will be removed in version
      5.40.0"); once it is gone, passing it would break every forward. We never run the value head
      with a cache (generation goes through `generate`), so nothing is lost.
    - a removable value head: `v_head = None` (critic-free estimators) gives values None.
    """

    @classmethod
    def _get_current_device(cls) -> int | str:
        return int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """Returns (logits float32, loss, values) as trl's forward; values None without a value head."""
        out = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs
        )
        hidden = (out.decoder_hidden_states if self.is_encoder_decoder else out.hidden_states)[-1]
        values = self.v_head(hidden).squeeze(-1) if self.v_head is not None else None
        return out.logits.float(), out.loss, values


class AutoModelForSeq2SeqLMWithValueHead(_ValueHeadFixes, _TrlSeq2SeqWithValueHead):
    """trl 1.12's seq2seq value-head model with `_ValueHeadFixes`."""

    is_encoder_decoder = True


class AutoModelForCausalLMWithValueHead(_ValueHeadFixes, _TrlCausalWithValueHead):
    """trl 1.12's causal value-head model with `_ValueHeadFixes`."""

    is_encoder_decoder = False


__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "selective_log_softmax",
]
