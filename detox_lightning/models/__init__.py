"""The policy (base model + LoRA + reference adapter + value head), how each architecture is fed,
sampling, and the teacher-forced passes that score a rollout."""

from detox_lightning.models.policy import PolicyConfig

__all__ = ["PolicyConfig"]
