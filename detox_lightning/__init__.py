"""RL detoxification (PPO, RLOO, GRPO, REINFORCE++) of seq2seq and causal language models with
PyTorch Lightning.

Layers, lowest first (a test checks that none imports a higher one): `errors`, `moved`,
`trl_compat`; `io`; `offline`; `rl`; `models`; `data`; `rewards`; `training`; `evaluation`;
`bench`; the entry points `cli` and `export`.
"""

from detox_lightning.data import DialogSumDataModule
from detox_lightning.models import PolicyConfig
from detox_lightning.rewards import (
    CombinedReward,
    FunctionReward,
    HFClassifierReward,
    ProfanityCheckReward,
    RewardModel,
)
from detox_lightning.training import GenerationSettings, PPODetoxModule, PPOSettings, RLDetoxModule, RLSettings

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
    "RLDetoxModule",
    "RLSettings",
    "RewardModel",
]
