"""The LightningModules (RL and SFT), their settings, and the glue that keeps ranks, restarts and
non-finite iterations in order."""

from detox_lightning.training.module import PPODetoxModule, RLDetoxModule
from detox_lightning.training.settings import GenerationSettings, PPOSettings, RLSettings, RolloutSettings
from detox_lightning.training.sft import SFTSummarizationModule

__all__ = [
    "GenerationSettings",
    "PPODetoxModule",
    "PPOSettings",
    "RLDetoxModule",
    "RLSettings",
    "RolloutSettings",
    "SFTSummarizationModule",
]
