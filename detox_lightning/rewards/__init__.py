"""Reward components: a Hugging Face classifier, an offline profanity classifier, plain Python
functions, and weighted sums of them."""

from detox_lightning.rewards.classifiers import HFClassifierReward, ProfanityCheckReward, RewardModel
from detox_lightning.rewards.functions import CombinedReward, FunctionReward

__all__ = ["CombinedReward", "FunctionReward", "HFClassifierReward", "ProfanityCheckReward", "RewardModel"]
