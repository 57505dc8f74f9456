"""Lean checkpoints: a LightningModule's state is its trainable tensors only.

Frozen weights (the base model, a frozen reference adapter, the reward classifier) reload from
their source at start, so a checkpoint holds megabytes of LoRA and value head instead of the
whole model; the RL and the SFT modules both mix this in.
"""

from __future__ import annotations

import torch

from detox_lightning.errors import ConfigError


class TrainableStateMixin:
    """Lean checkpoints for a LightningModule with a `policy_config`: only trainable tensors.

    (trl's value-head wrapper overrides `state_dict` in a way that drops the LoRA weights, so the
    state is read from the parameters.)
    """

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The trainable tensors only (LoRA, value head)."""
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = self.trainable_parameters()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
        if missing or unexpected or wrong:
            details = []
            if wrong:
                details.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
            if missing:
                details.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            raise ConfigError(
                f"checkpoint does not fit model.policy (model_name_or_path={self.policy_config.model_name_or_path!r}, "
                f"lora_r={self.policy_config.lora_r}): trainable tensors {'; '.join(details)}; "
                f"was it saved for another base model or adapter shape?"
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state_dict[name])
