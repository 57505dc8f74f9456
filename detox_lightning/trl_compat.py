"""Every import from trl lives here, so a move to another trl layout touches one file.

trl 1.13 removed its PPO code and value head; the 1.12.x line keeps them under
`trl.experimental.ppo`. We pin that line (see pyproject.toml).
"""

import os

# trl warns on every import of trl.experimental; we pin the version, so the warning says nothing new.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import AutoModelForSeq2SeqLMWithValueHead  # noqa: E402
from trl.experimental.ppo.ppo_trainer import masked_mean, masked_var, masked_whiten  # noqa: E402
from trl.trainer.utils import entropy_from_logits, selective_log_softmax  # noqa: E402

__all__ = [
    "AutoModelForSeq2SeqLMWithValueHead",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "selective_log_softmax",
]
