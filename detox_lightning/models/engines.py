"""Rollout engines: what samples the responses of an RL iteration.

Every engine takes the same batch (prompts padded on the architecture's side, the `generate`
kwargs the module built from its `GenerationSettings`) and returns `Samples`: response tokens
padded after the first end token and their mask. The trainer scores those tokens itself (old,
reference log-probs and values from its own forward pass), so the engine only decides where the
sampling runs:

- `GenerateEngine`: the policy's own `generate` in the trainer's process (every architecture).
- `vllm_engine.VLLMEngine`: a vLLM server (decoder-only policies), fed the policy's LoRA adapter;
  its samples carry vLLM's log-probs of the sampled tokens (`Samples.sampler_logprobs`), for the
  importance weights of `rl.importance`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from detox_lightning.errors import ConfigError
from detox_lightning.models.architectures import Architecture
from detox_lightning.models.rollout import Samples, sample

ENGINES = ("generate", "vllm")


class EngineError(ConfigError):
    """A rollout engine that cannot serve: a server that is down, a wrong URL, a malformed or late
    reply. A ConfigError, so the CLI ends with its one `error:` line (the checkpoints already
    written stay as they were: an iteration is checkpointed only after it finished)."""


class RolloutEngine(ABC):
    """Samples responses for a batch of prompts."""

    name: ClassVar[str]
    # Whether `sample` can keep the step logits and values of the sampling pass
    # (`RLSettings.logprobs_from_generate`): only where the trainer's own weights sampled.
    keeps_logits: ClassVar[bool] = False
    # Whether it samples with the trainer's own weights in the trainer's process (no sync, no
    # sampler log-probs): the evaluation's way of sampling too.
    in_process: ClassVar[bool] = False

    @abstractmethod
    def sample(
        self,
        policy,
        arch: Architecture,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_kwargs: dict,
        keep_logits: bool = False,
    ) -> Samples:
        """B responses, one per prompt row (k samples of a prompt: its row repeated k times).

        Args:
            policy: the value-head policy (its `pretrained_model` is the PeftModel, the policy
                adapter active).
            input_ids, attention_mask: (B, P) prompts padded on `arch.padding_side`.
            generation_kwargs: `RLDetoxModule.generation_kwargs`: temperature, top_k, top_p,
                max_new_tokens, the minimum length, `eos_token_id` (every end id), `pad_token_id`.
            keep_logits: keep the sampling pass's logits (only where `keeps_logits`).
        """

    def close(self) -> None:
        """Release what the engine holds (a server it started); sampling again restarts it."""


class GenerateEngine(RolloutEngine):
    """The policy's `generate`, in the trainer's process, with the trainer's weights."""

    name: ClassVar[str] = "generate"
    keeps_logits: ClassVar[bool] = True
    in_process: ClassVar[bool] = True

    def sample(
        self,
        policy,
        arch: Architecture,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_kwargs: dict,
        keep_logits: bool = False,
    ) -> Samples:
        return sample(policy, arch, input_ids, attention_mask, generation_kwargs, keep_logits)
