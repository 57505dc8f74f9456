"""RL detoxification (PPO, RLOO, GRPO) of FLAN-T5 summaries with PyTorch Lightning."""

from detox_lightning.data import DialogSumDataModule
from detox_lightning.module import PPODetoxModule
from detox_lightning.policy import PolicyConfig
from detox_lightning.reward_functions import CombinedReward, FunctionReward
from detox_lightning.rewards import HFClassifierReward, ProfanityCheckReward, RewardModel
from detox_lightning.settings import GenerationSettings, PPOSettings

__all__ = [
    "CombinedReward",
    "DialogSumDataModule",
    "FunctionReward",
    "GenerationSettings",
    "HFClassifierReward",
    "PPODetoxModule",
    "PPOSettings",
    "PolicyConfig",
    "ProfanityCheckReward",
    "RewardModel",
]
